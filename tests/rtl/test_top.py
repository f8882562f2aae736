"""The accelerator under Verilator: ISA decoder, corrupted programs, LD/ST byte movement.

Builds: the decoder alone (small), and the whole accelerator for the ``tiny``
configuration and for ``tiny`` with four HBM ports (:data:`MACHINES`); the
accelerator tests of one configuration share one simulation
(:class:`llmfab.sim.rtl.harness.RtlAccelerator`, module-scoped), reloading the
program (and, where it matters, the HBM image) between runs.
"""

from pathlib import Path

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.compiler import isa
from llmfab.compiler.bundle import Bundle
from llmfab.hw.isa import InstrDecoder
from llmfab.sim.golden import Golden
from llmfab.sim.rtl.runner import run_cocotb, to_verilog

from tb import soak

HERE = Path(__file__).parent
N_CORRUPT = 240
#: Watchdog of every run (the tiny program takes about 5,000 cycles).
WATCHDOG = 400_000


@soak(8_000)
def test_isa_decoder_matches_compiler(vectors):
    """Every opcode x func (4,096 words), then random words (legal, corrupted, random; 1,000,
    or 8,000 under slow as the former 12,000-word total): legal flag and queue as
    compiler.isa.decode."""
    run_cocotb(to_verilog(InstrDecoder(), "instr_decoder"), "instr_decoder", "cocotb_top",
               module_dir=HERE, testcase="decoder_random",
               extra_env={"DEC_N": str(vectors)})


# ---------------------------------------------------------------------------------------
# the tiny model on the simulated accelerator
# ---------------------------------------------------------------------------------------

#: Accelerators the tests run on: the ``tiny`` configuration (one 128-bit port) and the same
#: with four 64-bit ports and four chains (four slices: the striping of HBM over several
#: ports, 32-byte HBM lines) and a 16-byte on-chip line (each on-chip line two ports' beats,
#: so the load and store engines gather and scatter by port group, and weight tiles take
#: the per-port fast path into the slice banks).
MACHINES = ("tiny", "tiny4")


def machine_config(name):
    from llmfab.boards.config import config_from_dict
    config = load_config("tiny")
    if name == "tiny":
        return config
    d = config.to_dict()
    d.update(name=name, hbm={"ports": 4, "data_width": 64, "line_bytes": 16})
    d["chain"] = dict(d["chain"], count=4)
    return config_from_dict(d, f"{name} (tiny with four 64-bit HBM ports, four chains, "
                               f"16-byte on-chip lines)")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tinymodel import write_tiny_gguf
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(path, "q4_1")
    return path


@pytest.fixture(scope="module", params=MACHINES)
def machine(request, tiny_model):
    """(config, the tiny model compiled for it, the running simulation).

    The execution unit is the MiscExec test double (NOP/COPY/ADD/MUL executed, the rest a
    fixed-latency placeholder): these tests are about control, validation and data movement,
    and the small build keeps them fast."""
    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    from llmfab.hw.execute import MiscExec
    from llmfab.sim.rtl.harness import RtlAccelerator
    config = machine_config(request.param)
    bundle = compile_model(load_model(tiny_model), config)
    with RtlAccelerator(config, bundle, timeout_seconds=900, exec_factory=MiscExec) as acc:
        yield config, bundle, acc


def with_program(bundle, words) -> Bundle:
    return Bundle(manifest=bundle.manifest, program=isa.to_bytes(words), hbm_image=bundle.hbm_image)


def golden_status(bundle, words, pos, token):
    """(status, pc) the golden model gives: pc -1 when the run is clean."""
    r = Golden(with_program(bundle, words)).check(pos, token)
    return (0, -1) if r is None else (r.status, r.pc)


def rtl_status(acc, words, pos, token):
    acc.load_program(isa.to_bytes(words))
    r = acc.run(pos, token, timeout_cycles=WATCHDOG)
    assert not r.timed_out, f"watchdog fired after {r.sim_cycles} cycles"
    return r


def _w(op, **f):
    return isa.encode(isa.make(op, **f))


def handcrafted(words, man):
    """Named corruptions of the compiled program: each is (name, words)."""
    hbm = int(man["hbm_size"])
    chip = int(man["onchip"]["size"])
    end = len(words) - 1
    mid = len(words) // 2
    out = []
    w = list(words)
    w[mid] = (w[mid] & ~0xF) | 0                                   # opcode 0
    out.append(("illegal opcode", w))
    w = list(words)
    w[mid] = (w[mid] & ~0xF) | 11                                  # opcode 11
    out.append(("opcode 11", w))
    w = list(words)
    w[3] = _w("LD", buf=0, hreg=isa.REG_ZERO, hoff=(hbm - 16) // 32, len=64)
    out.append(("HBM out of range", w))
    w = list(words)
    stride = min(hbm // 2, 0xFFFF)                 # the runs are at pos 3: 3 * stride > hbm
    assert 3 * stride + 16 > hbm
    w[5] = _w("LD", buf=0, hreg=isa.REG_ZERO, ireg=isa.REG_POS, stride=stride, len=16)
    out.append(("HBM out of range via R1*stride", w))
    w = list(words)
    w[4] = _w("LD", buf=chip - 8, hreg=isa.REG_ZERO, len=16)
    out.append(("on-chip out of range", w))
    w = list(words)
    w[6] = _w("ST", func=isa.ST_F16, buf=chip - 40, hreg=isa.REG_IOBASE, len=32)
    out.append(("ST.f16 on-chip range is 2*len", w))
    w = list(words)
    w[7] = _w("MISC", func=isa.MISC_FUNCS["QUANT"], dst=0, a=0, n=33)
    out.append(("QUANT n not a multiple of 32", w))
    w = list(words)
    w[7] = _w("MISC", func=isa.MISC_FUNCS["ATTN"], dst=0, a=0, b=chip - 64, n=1, aux=16,
              reg=isa.REG_SEQ)
    out.append(("ATTN cache beyond on-chip", w))
    out.append(("no END", list(words[:-1])))
    out.append(("END replaced by SYS NOP", list(words[:-1]) + [_w("SYS", func=isa.SYS_NOP)]))
    out.append(("empty program", []))
    w = list(words)
    w.insert(1, _w("MISC", func=0, wait_prev=1))                  # a wait nobody releases for
    out.append(("missing release -> deadlock", w))
    w = [_w("LD", wait_next=1), _w("SYS", func=isa.SYS_END)]
    out.append(("LD waits for a token never released", w))
    w = [_w("LD", rel_next=1)] * 20 + [_w("MISC", func=0, wait_next=1)] + [_w("SYS", func=isa.SYS_END)]
    out.append(("compute waits on st2cmp", w))
    w = [_w("MISC", func=0, wait_prev=1)] + [_w("MISC", func=0)] * 20 + [_w("LD", rel_next=1),
                                                                         _w("SYS", func=isa.SYS_END)]
    out.append(("full compute queue blocks the releasing LD", w))
    # queue depth 16: a head blocked on a token plus 15 more fit, the 17th blocks dispatch
    nop = _w("MISC", func=0)
    for more in (15, 16):
        out.append((f"compute head + {more} behind it, then the releasing LD",
                    [_w("MISC", func=0, wait_prev=1)] + [nop] * more
                    + [_w("LD", rel_next=1), _w("SYS", func=isa.SYS_END)]))
        out.append((f"LD head + {more} behind it, then the releasing compute",
                    [_w("LD", wait_next=1)] + [_w("LD")] * more
                    + [_w("MISC", func=0, rel_prev=1), _w("SYS", func=isa.SYS_END)]))
        out.append((f"ST head + {more} behind it, then the releasing compute",
                    [_w("ST", wait_prev=1)] + [_w("ST")] * more
                    + [_w("MISC", func=0, rel_next=1), _w("SYS", func=isa.SYS_END)]))
    w = [_w("ST", wait_prev=1), _w("SYS", func=isa.SYS_SYNC), _w("MISC", func=0, rel_next=1),
         _w("SYS", func=isa.SYS_END)]
    out.append(("SYNC before the release", w))
    w = list(words[:end]) + [_w("SYS", func=isa.SYS_END), (1 << 127) | 0xF]
    out.append(("garbage after END is not looked at", w))
    # ranges ending exactly at the limit are legal, one byte more is not (inserted words carry
    # no tokens, so the rest of the program runs as compiled)
    ctx = int(man["onchip"]["context"])
    q4 = isa.mv_func("q4_0")
    # a 2 x 64 Q4_0 tile: slice-major on several ports (docs/isa.md), starting on an HBM line,
    # so the next legal start is a line later
    P, S = int(man["memory_map"]["hbm_ports"]), int(man["memory_map"]["hbm_stripe_bytes"])
    span = isa.mv_span(2, 2 * 18, P, S)
    step = 1 if P == 1 else P * S
    edges = [
        ("LD to the last HBM byte", _w("LD", buf=0, hreg=isa.REG_ZERO, hoff=(hbm - 64) // 32, len=64),
         _w("LD", buf=0, hreg=isa.REG_ZERO, hoff=(hbm - 64) // 32, len=65)),
        ("LD len scaled by R1 to the last HBM byte",
         _w("LD", buf=0, hreg=isa.REG_ZERO, hoff=(hbm - 64) // 32, len=4, lreg=isa.REG_POS, lmul=20),
         _w("LD", buf=0, hreg=isa.REG_ZERO, hoff=(hbm - 64) // 32, len=5, lreg=isa.REG_POS, lmul=20)),
        ("ST to the last HBM byte", _w("ST", buf=0, hreg=isa.REG_IOBASE, hoff=(hbm - 32 - int(
            man["registers"]["iobase"])) // 32, ireg=isa.REG_TOKEN, stride=4, len=12),
         _w("ST", buf=0, hreg=isa.REG_IOBASE, hoff=(hbm - 32 - int(man["registers"]["iobase"])) // 32,
            ireg=isa.REG_TOKEN, stride=4, len=13)),
        ("LD to the last on-chip byte", _w("LD", buf=chip - 16, hreg=isa.REG_ZERO, len=16),
         _w("LD", buf=chip - 16, hreg=isa.REG_ZERO, len=17)),
        ("ST.f16 reading the last on-chip byte", _w("ST", func=isa.ST_F16, buf=chip - 64,
                                                    hreg=isa.REG_IOBASE, len=32),
         _w("ST", func=isa.ST_F16, buf=chip - 64, hreg=isa.REG_IOBASE, len=34)),
        ("MV weights to the last on-chip byte",
         _w("MV", func=q4, wb=chip - span, rows=2, cols=64, qsrc=0, dst=0),
         _w("MV", func=q4, wb=chip - span + step, rows=2, cols=64, qsrc=0, dst=0)),
        ("QUANT output to the last on-chip byte",
         _w("MISC", func=isa.MISC_FUNCS["QUANT"], dst=chip - 80, a=0, n=64),
         _w("MISC", func=isa.MISC_FUNCS["QUANT"], dst=chip - 79, a=0, n=64)),
        ("ATTN V rows to the last on-chip byte",
         _w("MISC", func=isa.MISC_FUNCS["ATTN"], dst=0, a=0, b=chip - 2 * ctx * 16 - 2 * 4 * 16,
            n=1, aux=16, reg=isa.REG_SEQ),
         _w("MISC", func=isa.MISC_FUNCS["ATTN"], dst=0, a=0, b=chip - 2 * ctx * 16 - 2 * 4 * 16 + 2,
            n=1, aux=16, reg=isa.REG_SEQ)),
        ("COPY rows to the last on-chip byte",
         _w("MISC", func=isa.MISC_FUNCS["COPY"], dst=chip - 4 * (2 * 10 + 4), a=0, b=10, n=4, aux=3),
         _w("MISC", func=isa.MISC_FUNCS["COPY"], dst=chip - 4 * (2 * 10 + 4) + 1, a=0, b=10, n=4,
            aux=3)),
        ("cached ATTN rows R2 + t + 1 to the last on-chip byte",
         _w("MISC", func=isa.MISC_FUNCS["ATTN"], dst=0, a=0, b=chip - 2 * ctx * 16 - 2 * 10 * 16,
            n=1 | 5 << 8, aux=16 | 1 << 15, reg=isa.REG_SEQ),
         _w("MISC", func=isa.MISC_FUNCS["ATTN"], dst=0, a=0,
            b=chip - 2 * ctx * 16 - 2 * 10 * 16 + 2, n=1 | 5 << 8, aux=16 | 1 << 15, reg=isa.REG_SEQ)),
    ]
    for name, ok, bad in edges:
        out.append((name, words[:2] + [ok] + words[2:]))
        out.append((name + " + 1", words[:2] + [bad] + words[2:]))
    return out


def corrupted(words, rng):
    """A randomly corrupted copy of the program and a description."""
    w = list(words)
    kind = rng.integers(0, 6)
    i = int(rng.integers(0, len(w)))
    if kind == 0:
        b = int(rng.integers(0, 128))
        w[i] ^= 1 << b
        return w, f"bit {b} of word {i}"
    if kind == 1:
        for _ in range(int(rng.integers(2, 5))):
            w[i] ^= 1 << int(rng.integers(0, 128))
        return w, f"bits of word {i}"
    if kind == 2:
        w[i] = int.from_bytes(rng.bytes(16), "little")
        return w, f"random word {i}"
    if kind == 3:
        w[i] = isa.encode(isa.random_instr(rng))
        return w, f"random legal instruction at {i}"
    if kind == 4:
        # a small field change: a low bit of a field above the header
        b = int(rng.integers(16, 128))
        w[i] ^= 1 << b
        j = int(rng.integers(0, len(w)))
        w[j] ^= 1 << int(rng.integers(4, 8))                       # and a token bit elsewhere
        return w, f"bit {b} of word {i}, token bit of word {j}"
    j = int(rng.integers(0, len(w)))
    w[i], w[j] = w[j], w[i]
    return w, f"words {i} and {j} swapped"


def test_corrupted_programs_end_with_golden_status(machine):
    """Handcrafted and >= 200 random corruptions of a compiled program: the RTL ends every run
    with the golden model's status (and faulting pc), never by the watchdog; then a clean run."""
    config, bundle, acc = machine
    words = isa.from_bytes(bundle.program)
    rng = np.random.default_rng(2024)
    cases = [(name, w, 3, 5) for name, w in handcrafted(words, bundle.manifest)]
    edge_bad = [c for c in cases if c[0].endswith(" + 1")]
    assert all(golden_status(bundle, w, 3, 5)[0] in (2, 3) for _, w, _, _ in edge_bad)
    assert all(golden_status(bundle, w, 3, 5)[0] == 0 for n, w, _, _ in cases
               if n + " + 1" in {c[0] for c in edge_bad})
    for k in range(N_CORRUPT):
        w, what = corrupted(words, rng)
        pos = int(rng.integers(0, 160)) if k % 4 == 0 else int(rng.integers(0, 20))
        token = int(rng.integers(0, 300)) if k % 4 == 1 else int(rng.integers(0, 256))
        cases.append((what, w, pos, token))
    seen = {}
    bad = []
    cycles = 0
    for name, w, pos, token in cases:
        want = golden_status(bundle, w, pos, token)
        r = rtl_status(acc, w, pos, token)
        cycles += r.sim_cycles
        got = (r.status, r.pc if r.status else -1)
        seen[want[0]] = seen.get(want[0], 0) + 1
        if got != want:
            bad.append((name, pos, token, want, got))
    print(f"{len(cases)} programs, statuses {dict(sorted(seen.items()))}, {cycles} cycles simulated")
    assert not bad, bad[:10]
    assert set(seen) == {0, 1, 2, 3, 4, 5}, seen
    # the unmodified program still runs clean afterwards
    r = rtl_status(acc, words, 7, 9)
    assert (r.status, r.counters["pc"]) == (0, len(words) - 1)


# ---------------------------------------------------------------------------------------
# LD/ST byte movement against the golden model
# ---------------------------------------------------------------------------------------

def ldst_program(man, rng, rounds=6):
    """Rounds of random LDs (any register addressing) then random STs (f32 and f16) chained by
    tokens: LD ... LD[r] NOP[W r] ST[W] ... ST[R] NOP[w R] LD[w] ... ; END.

    The first LD fills the whole on-chip space (from the weights), so that every byte a ST
    reads was written by this program (on-chip memory is not cleared between runs). One LD
    in five is a weight tile's: into the weight buffer, its HBM and on-chip addresses equal
    modulo the HBM line (on ``tiny4`` the load engine's per-port fast path)."""
    chip = int(man["onchip"]["size"])
    mm = man["memory_map"]
    wb_end = mm["weights"][1]
    kv0, kvn = mm["kv"]
    io0, ion = mm["io"]
    assert wb_end >= chip
    w0 = int(man["onchip"]["weight"][0])
    line = int(mm["hbm_ports"]) * int(mm["hbm_stripe_bytes"])
    words = [_w("LD", buf=0, hreg=isa.REG_WBASE, len=chip)]
    for r in range(rounds):
        lds = []
        for k in range(int(rng.integers(2, 7))):
            ln = int(rng.choice([0, 1, 3, 16, 17, 64, 100, 255, 600]))
            buf = int(rng.integers(0, chip - ln - 1))
            mode = rng.integers(0, 5)
            if mode == 4:      # a weight tile's LD: the load engine's per-port fast path
                hreg, ireg, stride, lreg, lmul = isa.REG_WBASE, 0, 0, 0, 0
                hoff = int(rng.integers(0, (wb_end - 700) // 32))
                src = int(man["registers"]["wbase"]) + hoff * 32
                buf = int(rng.integers(w0, chip - ln - 1 - line))
                buf += (src - buf) % line                # HBM and on-chip agree modulo the line
            elif mode == 0:    # weights/tables, plain offset
                hreg, ireg, stride, lreg, lmul = isa.REG_WBASE, 0, 0, 0, 0
                hoff = int(rng.integers(0, (wb_end - 700) // 32))
            elif mode == 1:    # tables indexed by pos
                hreg, ireg, stride, lreg, lmul = isa.REG_TBASE, isa.REG_POS, int(rng.integers(1, 200)), 0, 0
                hoff = int(rng.integers(0, 8))
            elif mode == 2:    # KV scratch, length scaled by pos
                hreg, ireg, stride, lreg, lmul = isa.REG_KVBASE, 0, 0, isa.REG_POS, int(rng.integers(1, 9))
                hoff = int(rng.integers(0, (kvn // 2 - 800) // 32))
            else:              # weights indexed by token
                hreg, ireg, stride, lreg, lmul = isa.REG_WBASE, isa.REG_TOKEN, int(rng.integers(1, 100)), 0, 0
                hoff = int(rng.integers(0, 40))
            lds.append(dict(buf=buf, hreg=hreg, hoff=hoff, ireg=ireg, stride=stride, len=ln,
                            lreg=lreg, lmul=lmul))
        for k, f in enumerate(lds):
            if k == 0 and r > 0:
                f["wait_next"] = 1
            if k == len(lds) - 1:
                f["rel_next"] = 1
            words.append(_w("LD", **f))
        words.append(_w("MISC", func=0, wait_prev=1, rel_next=1))
        sts = []
        for k in range(int(rng.integers(2, 7))):
            f16 = rng.random() < 0.5
            ln = int(rng.choice([2, 4, 6, 30, 32, 34, 64, 130, 256])) if f16 else \
                int(rng.choice([1, 5, 16, 33, 64, 100, 257]))
            buf = int(rng.integers(0, chip - 2 * ln - 1))
            if rng.random() < 0.5:       # I/O region, index by token
                hreg, hoff, ireg, stride = isa.REG_IOBASE, int(rng.integers(0, (ion - 2000) // 32)), \
                    isa.REG_TOKEN, int(rng.integers(0, 5))
            else:                        # upper half of the KV region, index by pos
                hreg, hoff, ireg, stride = isa.REG_KVBASE, int(rng.integers(kvn // 64, (kvn - 3000) // 32)), \
                    isa.REG_POS, int(rng.integers(0, 40))
            sts.append(dict(func=isa.ST_F16 if f16 else isa.ST_F32, buf=buf, hreg=hreg, hoff=hoff,
                            ireg=ireg, stride=stride, len=ln))
        for k, f in enumerate(sts):
            if k == 0:
                f["wait_prev"] = 1
            if k == len(sts) - 1:
                f["rel_prev"] = 1
            words.append(_w("ST", **f))
        words.append(_w("MISC", func=0, wait_next=1, rel_prev=1))
    words.append(_w("SYS", func=isa.SYS_END))
    return words


def special_floats(rng, n):
    """binary32 patterns that stress binary16 conversion: ties, subnormals, overflow, specials."""
    u = np.empty(n, np.uint32)
    kinds = rng.integers(0, 6, n)
    e = rng.integers(0, 256, n).astype(np.uint32)
    frac = rng.integers(0, 1 << 23, n).astype(np.uint32)
    sign = rng.integers(0, 2, n).astype(np.uint32) << 31
    u[:] = sign | (e << 23) | frac
    near = kinds == 1                      # around the binary16 range (2^-25 .. 2^16)
    u[near] = sign[near] | (rng.integers(102, 144, near.sum()).astype(np.uint32) << 23) | frac[near]
    tie = kinds == 2                       # exact ties at the binary16 rounding point
    u[tie] = sign[tie] | (rng.integers(103, 143, tie.sum()).astype(np.uint32) << 23) | \
        ((frac[tie] >> 13 << 13) | (1 << 12))
    u[kinds == 3] = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x477FF000, 0x477FE000, 0x33000000,
                              0x33000001, 0x387FC000, 0x38800000, 0x80000000], np.uint32)[
        rng.integers(0, 10, (kinds == 3).sum())]
    return u.view(np.uint8)


def test_ld_st_bytes_match_golden(machine):
    """Random LD/ST programs (register-indexed addresses, any alignment, ST.f16 on tricky floats):
    after each run HBM holds exactly the golden model's bytes, and the byte counters agree."""
    config, bundle, acc = machine
    man = bundle.manifest
    rng = np.random.default_rng(7)
    hbm = int(man["hbm_size"])
    kv0, kvn = man["memory_map"]["kv"]
    for trial in range(4):
        words = ldst_program(man, rng)
        pos, token = int(rng.integers(0, 60)), int(rng.integers(0, 256))
        b = with_program(bundle, words)
        g = Golden(b, fast=False)
        assert g.check(pos, token) is None
        scratch = special_floats(rng, kvn // 8)                   # lower half of the KV region
        g.hbm[kv0:kv0 + scratch.size] = scratch
        gr = g.run(pos, token)
        assert gr.status == 0
        acc.reload_hbm()
        acc.write_hbm(kv0, scratch)
        r = rtl_status(acc, words, pos, token)
        assert r.status == 0, (r.status, r.pc)
        got = acc.read_hbm(0, hbm)
        diff = np.flatnonzero(got != g.hbm)
        assert diff.size == 0, f"trial {trial}: {diff.size} bytes differ, first at {diff[:8]}"
        assert r.counters["ld_bytes"] == g.counters.get("ld_bytes", 0)
        assert r.counters["st_bytes"] == g.counters.get("st_bytes", 0)
        # the ports' traffic: counter block vs the HBM model (which also saw the block's own beats)
        beat = config.hbm.data_width // 8
        for p, pb in enumerate(r.port_bytes):
            assert r.counters[f"port{p}_rd_bytes"] == pb["rd_bytes"]
        block_beats = -(-8 * len(r.counters) // beat)
        assert sum(r.counters[f"port{p}_wr_bytes"] for p in range(len(r.port_bytes))) == \
            (sum(pb["wr_beats"] for pb in r.port_bytes) - block_beats) * beat


# ---------------------------------------------------------------------------------------
# the MISC operations the accelerator executes itself (COPY, ADD, MUL)
# ---------------------------------------------------------------------------------------

def finite_floats(rng, n):
    """binary32 operands for ADD/MUL: ordinary numbers, products that underflow (flushed),
    sums that cancel, ties; magnitudes below 2^39 so that no chain of these ops reaches inf
    and then NaN (the float units' NaN is canonical, numpy's is not: hw/fp.py)."""
    e = rng.integers(90, 166, n).astype(np.uint32)
    small = rng.random(n) < 0.15
    e[small] = rng.integers(1, 70, small.sum())
    frac = rng.integers(0, 1 << 23, n).astype(np.uint32)
    sign = (rng.integers(0, 2, n).astype(np.uint32)) << 31
    return (sign | (e << 23) | frac).view(np.float32)


def test_misc_copy_add_mul_match_golden(machine):
    """COPY (single and strided rows, any byte alignment), ADD, MUL (incl. in-place ADD, any
    word alignment), n = 0, between LDs and STs:
    HBM after the run is the golden model's, bit for bit."""
    config, bundle, acc = machine
    man = bundle.manifest
    rng = np.random.default_rng(11)
    hbm = int(man["hbm_size"])
    kv0, kvn = man["memory_map"]["kv"]
    io0, ion = man["memory_map"]["io"]
    ab = man["onchip"]["activation"][1]
    F = isa.MISC_FUNCS
    for trial in range(3):
        vals = finite_floats(rng, kvn // 8)
        # operand pairs that cancel or tie exactly
        vals[1::7] = -vals[0::7][:vals[1::7].size] * np.float32(1 + 2 ** -22 * rng.integers(0, 2))
        scratch = vals.view(np.uint8)
        words = [_w("LD", buf=0, hreg=isa.REG_KVBASE, len=ab, rel_next=1)]
        ops = []
        for k in range(int(rng.integers(6, 12))):
            n = int(rng.choice([0, 1, 5, 16, 17, 33, 64, 150]))
            fn = ["COPY", "ADD", "MUL"][k % 3]
            a = int(rng.integers(0, ab // 3 - 4 * n))
            b = int(rng.integers(ab // 3, 2 * ab // 3 - 4 * n))
            dst = a if (fn == "ADD" and rng.random() < 0.3) else int(rng.integers(2 * ab // 3, ab - 4 * n))
            if fn != "COPY":
                # binary32 operands on word boundaries (any line offset): an unaligned read makes
                # arbitrary bit patterns, NaNs among them, whose bits differ from numpy's by design
                a, b, dst = a & ~3, b & ~3, dst & ~3
            op = dict(func=F[fn], dst=dst, a=a, b=b, n=n)
            if fn == "COPY" and rng.random() < 0.6:
                # strided rows: aux rows of n words, destination rows b words apart
                reps, stride = int(rng.integers(2, 5)), n + int(rng.integers(0, 9))
                op.update(aux=reps, b=stride,
                          dst=int(rng.integers(2 * ab // 3, ab - 4 * ((reps - 1) * stride + n))))
            ops.append(op)
        ops[0]["wait_prev"] = 1
        ops[-1]["rel_next"] = 1
        words += [_w("MISC", **o) for o in ops]
        words.append(_w("ST", wait_prev=1, buf=0, hreg=isa.REG_IOBASE, len=min(ab, ion)))
        words.append(_w("SYS", func=isa.SYS_END))
        pos, token = 1, 2
        g = Golden(with_program(bundle, words), fast=False)
        assert g.check(pos, token) is None
        g.hbm[kv0:kv0 + scratch.size] = scratch
        with np.errstate(over="ignore"):
            assert g.run(pos, token).status == 0
        acc.reload_hbm()
        acc.write_hbm(kv0, scratch)
        r = rtl_status(acc, words, pos, token)
        assert r.status == 0, (r.status, r.pc)
        got = acc.read_hbm(0, hbm)
        diff = np.flatnonzero(got != g.hbm)
        assert diff.size == 0, f"trial {trial}: {diff.size} bytes differ, first at {diff[:8]}"


def test_control_registers(machine):
    """ap_ctrl_hs and the argument registers as the host sees them over AXI4-Lite."""
    from llmfab.hw.control import ARGS, REG_CTRL, REG_CYCLES, REG_PC, REG_STATUS
    config, bundle, acc = machine
    words = isa.from_bytes(bundle.program)
    r = rtl_status(acc, words, 4, 6)
    assert r.status == 0
    assert acc.read_reg(REG_CTRL) & 0b1111 == 0b0100        # idle; done/ready were read by the run
    assert acc.read_reg(REG_STATUS) == 0 and acc.read_reg(REG_PC) == len(words) - 1
    cycles = acc.read_reg(REG_CYCLES) | acc.read_reg(REG_CYCLES + 4) << 32
    assert cycles == r.counters["cycles"] > 0
    assert acc.read_reg(ARGS["pos"][0]) == 4 and acc.read_reg(ARGS["seq"][0]) == 5
    assert acc.read_reg(ARGS["token"][0]) == 6
    assert acc.read_reg(ARGS["hbm_size"][0]) == bundle.manifest["hbm_size"]
    acc.write_reg(ARGS["wbase"][0], 0x12345678)
    assert acc.read_reg(ARGS["wbase"][0]) == 0x12345678
    # a faulting run leaves its status and pc in the read-only registers
    bad = list(words)
    bad[9] = (bad[9] & ~0xF) | 13
    r = rtl_status(acc, bad, 4, 6)
    assert (r.status, r.pc) == (isa.STATUS_ILLEGAL, 9)
    assert (acc.read_reg(REG_STATUS), acc.read_reg(REG_PC)) == (isa.STATUS_ILLEGAL, 9)
    assert r.counters["exec_cycles"] == 0 and r.counters["instr_ld"] == 0
    # the watchdog: a run cut short is reported as such, the accelerator is reset and works again
    acc.load_program(bundle.program)
    r = acc.run(4, 6, timeout_cycles=500)
    assert r.timed_out and r.status is None
    r = rtl_status(acc, words, 4, 6)
    assert (r.status, r.pc) == (0, len(words) - 1)
