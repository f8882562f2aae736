"""Attention on the chains on the simulated accelerator (``ci-chains``, two slices): what is
built around the MV and SFU units -- the validator's ranges and statuses of the chains words,
ST.x, R8/R9 in LD/ST, the KV buffer in the slice banks -- against the golden model.

The accelerator is built with the MiscExec test double as its execution unit (as
tests/rtl/test_top.py): these tests are about validation and data movement. The bundle is a
tiny model (head dim 32, the chains' Q8_0 K rows) compiled for ``ci-chains``, so its manifest
says ``attention: chains`` and ``onchip.weight`` starts at the KV buffer.
"""

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.compiler import isa
from llmfab.sim.golden import Golden

from test_top import corrupted, golden_status, rtl_status, with_program

CONFIG = "ci-chains"           # the configuration of the region-map test
N_CORRUPT = 120
F = isa.MISC_FUNCS


def _w(op, **f):
    return isa.encode(isa.make(op, **f))


#: The chains accelerators: ``ci-chains`` (two 32-byte ports, 64-byte on-chip lines) and
#: ``tiny4c``, test_top.py's ``tiny4`` (four 8-byte ports, 16-byte on-chip lines: LDs into the
#: banks take the load engine's per-port fast path) with attention on the chains and a KV buffer
#: that holds two KV-head regions.
MACHINES = ("ci-chains", "tiny4c")


def chains_config(name):
    from llmfab.boards.config import config_from_dict

    from test_top import machine_config
    if name != "tiny4c":
        return load_config(name)
    d = machine_config("tiny4").to_dict()
    d.update(name=name, attention="chains")
    d["buffers"] = dict(d["buffers"], kv_kib=32)
    return config_from_dict(d, f"{name} (tiny4 with attention on the chains, 32 KiB KV buffer)")


@pytest.fixture(scope="module", params=MACHINES)
def chains_machine(request, tmp_path_factory):
    """(config, the tiny model compiled for it, the running simulation)."""
    from tinymodel import write_tiny_gguf

    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    from llmfab.hw.execute import MiscExec
    from llmfab.sim.rtl.harness import RtlAccelerator
    path = tmp_path_factory.mktemp("tiny32") / "tiny32.gguf"
    write_tiny_gguf(path, "q4_1", dim=64, n_heads=2, n_kv_heads=1)     # head dim 32
    config = chains_config(request.param)
    bundle = compile_model(load_model(path), config)
    man = bundle.manifest
    assert man["onchip"]["attention"] == "chains"
    assert man["onchip"]["weight"][0] == man["onchip"]["kv"][0]
    with RtlAccelerator(config, bundle, timeout_seconds=900, exec_factory=MiscExec) as acc:
        yield config, bundle, acc


def test_chains_config_banks_the_kv_buffer():
    """With attention: chains the slice banks (hw/onchip.py) start at the KV buffer, where
    the compiler's manifest says MV operands may be; without it nothing moves."""
    from llmfab.hw.onchip import region_map, slice_geometry
    from llmfab.hw.top import geometry
    plain, chains = load_config("ci"), load_config(CONFIG)
    rp = region_map(plain)
    assert [r[0] for r in rp] == ["activation", "global", "kv", "weight"]
    rc = region_map(chains)
    kv = dict((r[0], r[1:]) for r in rp)["kv"]
    assert rc == rp[:2] + [("weight", kv[0], kv[1] + chains.buffer_bytes["weight"])]
    g = geometry(chains)
    bb = chains.buffer_bytes
    assert g["weight_base"] == kv[0]
    assert g["onchip_size"] == bb["activation"] + bb["global"] + bb["kv"] + bb["weight"]
    assert slice_geometry(chains)["weight_base"] == kv[0]
    # a bank holds its stripe of every line of the banked region (KV + weight buffers):
    # 640 KiB on 2 slices of 32-byte stripes is 10,240 bank lines (ci's 256 KiB weight buffer: 4,096)
    banked = (bb["kv"] + bb["weight"]) // (chains.slices * chains.stripe_bytes)
    assert slice_geometry(chains)["bank_addr_bits"] == (banked - 1).bit_length() == 14
    assert slice_geometry(plain)["bank_addr_bits"] == 12


def chains_edges(man):
    """(name, word legal at ``pos``, word one step beyond, pos, token): the chains words'
    ranges and operand rules at their limits."""
    chip = int(man["onchip"]["size"])
    kv0 = int(man["onchip"]["kv"][0])
    ctx = int(man["onchip"]["context"])
    P, S = int(man["memory_map"]["hbm_ports"]), int(man["memory_map"]["hbm_stripe_bytes"])
    line = P * S
    q8 = isa.mv_func("q8_0")
    rt, bt = q8 | isa.MV_RT, q8 | isa.MV_BT
    regs40 = isa.run_registers(40)
    out = []
    # MV row tiles, rows = 1 + R1: at pos 40 two tiles of 32 rows
    span = isa.weight_span(rt, 41, 32, P, S)
    assert span == 2 * isa.mv_span(32, 34, P, S)
    out.append(("MV row tiles (rows + R1) to the last on-chip byte",
                _w("MV", func=rt, wb=chip - span, rows=1, cols=32, qsrc=0, dst=256, rreg=1),
                _w("MV", func=rt, wb=chip - span + line, rows=1, cols=32, qsrc=0, dst=256, rreg=1),
                40, 5))
    # MV block tiles, cols = 32 + R9: at pos 40 two blocks
    span = isa.weight_span(bt, 32, 64, P, S)
    out.append(("MV block tiles (cols + R9) to the last on-chip byte",
                _w("MV", func=bt, wb=chip - span, rows=32, cols=32, qsrc=0, dst=256, creg=9),
                _w("MV", func=bt, wb=chip - span + line, rows=32, cols=32, qsrc=0, dst=256, creg=9),
                40, 5))
    # the K/V tiles are MV operands: the weight buffer starts at the KV buffer
    out.append(("MV weights at the KV buffer's first byte",
                _w("MV", func=rt, wb=kv0, rows=1, cols=32, qsrc=0, dst=256, rreg=1),
                _w("MV", func=rt, wb=kv0 - line, rows=1, cols=32, qsrc=0, dst=256, rreg=1),
                40, 5))
    out.append(("MV weights on a line", _w("MV", func=bt, wb=kv0 + line, rows=32, cols=32, creg=9),
                _w("MV", func=bt, wb=kv0 + line + S, rows=32, cols=32, creg=9), 40, 5))
    # the register-dependent operand rules (status 1)
    out.append(("MV cols + R[creg] a multiple of 32",
                _w("MV", func=bt, wb=kv0, rows=32, cols=32, creg=9),
                _w("MV", func=bt, wb=kv0, rows=32, cols=32, creg=1), 40, 5))
    out.append(("MV cols + R[creg] below 65536",
                _w("MV", func=q8, wb=kv0, rows=1, cols=65472, creg=7),
                _w("MV", func=q8, wb=kv0, rows=1, cols=65504, creg=7), 40, 32))
    out.append(("MV rows + R[rreg] below 65536",
                _w("MV", func=q8, wb=kv0, rows=65535 - 40, cols=32, rreg=1),
                _w("MV", func=q8, wb=kv0, rows=65536 - 40, cols=32, rreg=1), 40, 5))
    out.append(("MV qsrc of cols + R9", _w("MV", func=bt, wb=kv0, rows=32, cols=32, creg=9,
                                           qsrc=chip - 2 * 40, dst=0),
                _w("MV", func=bt, wb=kv0, rows=32, cols=32, creg=9, qsrc=chip - 2 * 40 + 1, dst=0),
                40, 5))
    out.append(("MV dst of rows + R1", _w("MV", func=rt, wb=kv0, rows=1, cols=32, rreg=1,
                                          qsrc=0, dst=chip - 4 * 41),
                _w("MV", func=rt, wb=kv0, rows=1, cols=32, rreg=1, qsrc=0, dst=chip - 4 * 41 + 1),
                40, 5))
    # dynamic MISC lengths
    out.append(("QUANT n + R[reg] a multiple of 32",
                _w("MISC", func=F["QUANT"], dst=0, a=0, n=32, reg=9),
                _w("MISC", func=F["QUANT"], dst=0, a=0, n=32, reg=1), 40, 5))
    out.append(("QUANT n + R9 output to the last on-chip byte",
                _w("MISC", func=F["QUANT"], dst=chip - 80, a=0, n=32, reg=9),
                _w("MISC", func=F["QUANT"], dst=chip - 79, a=0, n=32, reg=9), 40, 5))
    out.append(("QUANT n + R9 input to the last on-chip byte",
                _w("MISC", func=F["QUANT"], dst=0, a=chip - 256, n=32, reg=9),
                _w("MISC", func=F["QUANT"], dst=0, a=chip - 252, n=32, reg=9), 40, 5))
    out.append(("MUL n + R1 to the last on-chip byte",
                _w("MISC", func=F["MUL"], dst=chip - 4 * 41, a=0, b=4096, n=1, reg=1),
                _w("MISC", func=F["MUL"], dst=chip - 4 * 41 + 1, a=0, b=4096, n=1, reg=1), 40, 5))
    out.append(("MUL n + R1 operand b to the last on-chip byte",
                _w("MISC", func=F["MUL"], dst=0, a=0, b=chip - 4 * 41, n=1, reg=1),
                _w("MISC", func=F["MUL"], dst=0, a=0, b=chip - 4 * 41 + 4, n=1, reg=1), 40, 5))
    out.append(("SOFTMAX writes n + R1 rounded up to 32",
                _w("MISC", func=F["SOFTMAX"], dst=chip - 4 * 64, a=0, n=1, reg=1),
                _w("MISC", func=F["SOFTMAX"], dst=chip - 4 * 64 + 1, a=0, n=1, reg=1), 40, 5))
    out.append(("SOFTMAX reads n + R1",
                _w("MISC", func=F["SOFTMAX"], dst=0, a=chip - 4 * 41, n=1, reg=1),
                _w("MISC", func=F["SOFTMAX"], dst=0, a=chip - 4 * 41 + 1, n=1, reg=1), 40, 5))
    # KVROW writes one KV head's whole region
    size = isa.kv_region(32, ctx, P, S)["size"]
    out.append(("KVROW region to the last on-chip byte",
                _w("MISC", func=F["KVROW"], dst=chip - size, a=0, n=32, reg=1),
                _w("MISC", func=F["KVROW"], dst=chip - size + 1, a=0, n=32, reg=1), 40, 5))
    out.append(("KVROW reads K and V rows",
                _w("MISC", func=F["KVROW"], dst=kv0, a=chip - 8 * 64, n=64, reg=1),
                _w("MISC", func=F["KVROW"], dst=kv0, a=chip - 8 * 64 + 1, n=64, reg=1), 40, 5))
    out.append(("KVROW head dim a nonzero multiple of 32",
                _w("MISC", func=F["KVROW"], dst=kv0, a=0, n=64, reg=1),
                _w("MISC", func=F["KVROW"], dst=kv0, a=0, n=48, reg=1), 40, 5))
    out.append(("KVROW head dim 0", _w("MISC", func=F["KVROW"], dst=kv0, a=0, n=32, reg=1),
                _w("MISC", func=F["KVROW"], dst=kv0, a=0, n=0, reg=1), 40, 5))
    # ST.x: the on-chip source is buf + R[ireg]*stride
    kvh = int(man["registers"]["kvbase"])
    kvn = int(man["memory_map"]["kv"][1])
    hoff = (kvn // 2) // 32
    r8 = regs40[isa.REG_PTILE]
    out.append(("ST.x source (R8 * stride) to the last on-chip byte",
                _w("ST", func=isa.ST_X, buf=chip - 1088 - r8 * 1088, hreg=4, hoff=hoff, ireg=8,
                   stride=1088, len=1088),
                _w("ST", func=isa.ST_X, buf=chip - 1088 - r8 * 1088 + 1, hreg=4, hoff=hoff, ireg=8,
                   stride=1088, len=1088), 40, 5))
    out.append(("ST.x source (R1 * stride), a plain ST's would be in range",
                _w("ST", func=isa.ST_F32, buf=chip - 4 - 1000, hreg=4, hoff=hoff, ireg=1, stride=25,
                   len=4),
                _w("ST", func=isa.ST_X, buf=chip - 4 - 1000, hreg=4, hoff=hoff, ireg=1, stride=25,
                   len=4), 41, 5))
    out.append(("ST.x HBM side as a plain ST's",
                _w("ST", func=isa.ST_X, buf=0, hreg=4, hoff=(kvn - 64) // 32, ireg=1, stride=1,
                   len=64 - 40),
                _w("ST", func=isa.ST_X, buf=0, hreg=4, hoff=(kvn - 64) // 32, ireg=1, stride=1,
                   len=64 - 40 + 1 + (int(man["hbm_size"]) - kvh - kvn)), 40, 5))
    # LD with R9 / R8
    out.append(("LD len + R9 * lmul to the last on-chip byte",
                _w("LD", buf=chip - 1088 - 32 * 34, hreg=4, len=1088, lreg=9, lmul=34),
                _w("LD", buf=chip - 1088 - 32 * 34 + 1, hreg=4, len=1088, lreg=9, lmul=34), 40, 5))
    return out


def test_chains_validator_matches_golden(chains_machine):
    """The chains words at their limits (legal, then one step beyond) inserted in the compiled
    chains program, and random corruptions of it at positions all over the context: the RTL
    ends every run with the golden model's status and faulting pc; the program runs clean."""
    config, bundle, acc = chains_machine
    man = bundle.manifest
    words = isa.from_bytes(bundle.program)
    ctx = int(man["onchip"]["context"])
    cases = []
    for name, ok, bad, pos, token in chains_edges(man):
        g_ok = golden_status(bundle, words[:2] + [ok] + words[2:], pos, token)
        g_bad = golden_status(bundle, words[:2] + [bad] + words[2:], pos, token)
        assert g_ok != g_bad, (name, g_ok, g_bad)
        cases.append((name, words[:2] + [ok] + words[2:], pos, token))
        cases.append((name + " + 1", words[:2] + [bad] + words[2:], pos, token))
    rng = np.random.default_rng(31)
    for k in range(N_CORRUPT):
        w, what = corrupted(words, rng)
        pos = int(rng.integers(0, ctx))
        cases.append((what, w, pos, int(rng.integers(0, 256))))
    for pos in (0, 31, 32, 33, ctx - 1):
        cases.append((f"the program at {pos}", words, pos, 7))
    seen, bad = {}, []
    for name, w, pos, token in cases:
        want = golden_status(bundle, w, pos, token)
        r = rtl_status(acc, w, pos, token)
        got = (r.status, r.pc if r.status else -1)
        seen[want[0]] = seen.get(want[0], 0) + 1
        if got != want:
            bad.append((name, pos, token, want, got))
    print(f"{len(cases)} programs, statuses {dict(sorted(seen.items()))}")
    assert not bad, bad[:10]
    assert {0, 1, 2, 3} <= set(seen), seen


# ---------------------------------------------------------------------------------------
# ST.x and R8/R9 in LD/ST, the KV buffer's banks: bytes against the golden model
# ---------------------------------------------------------------------------------------

def chains_ldst_program(man, rng, pos, token, rounds=4):
    """Rounds of LDs (lengths and HBM indices from R8/R9/R1, weight-tile-like LDs into the KV
    buffer that take the load engine's per-port fast path into the slice banks, unaligned
    ones through the line view) then STs (ST.x indexed by R1/R7/R8/R9, ST, ST.f16) reading
    what the LDs wrote, chained by tokens; END.

    The first LD fills the window every ST reads, the global buffer's end through the KV
    buffer's start (on-chip memory is not cleared between runs)."""
    regs = [0] * 16
    for k, v in man["registers"].items():
        regs[{"wbase": 3, "kvbase": 4, "iobase": 5, "tbase": 6}[k]] = int(v)
    for k, v in isa.run_registers(pos, token).items():
        regs[k] = v
    mm = man["memory_map"]
    kv0 = int(man["onchip"]["kv"][0])
    line = int(mm["hbm_ports"]) * int(mm["hbm_stripe_bytes"])
    hbm_kv0, hbm_kvn = mm["kv"]
    io0, ion = mm["io"]
    chip = int(man["onchip"]["size"])
    lo, hi = max(0, kv0 - 32768), min(chip, kv0 + 65536)   # the window the STs read
    assert hi - lo <= int(man["hbm_size"])
    words = [_w("LD", buf=lo, hreg=isa.REG_ZERO, len=hi - lo)]
    for r in range(rounds):
        lds = []
        for k in range(int(rng.integers(3, 7))):
            mode = int(rng.integers(0, 4))
            if mode == 0:      # K-tile-like: whole tiles up to pos's (len + R9*lmul), fast path
                tile = 1088
                n = 1 + regs[9] // 32
                buf = kv0 + line * int(rng.integers(0, (hi - kv0 - n * tile) // line))
                f = dict(buf=buf, hreg=isa.REG_KVBASE, hoff=0, len=tile, lreg=9, lmul=34)
            elif mode == 1:    # one tile indexed by R8 (HBM side), fast path
                buf = kv0 + line * int(rng.integers(0, (hi - kv0 - 1088) // line))
                f = dict(buf=buf, hreg=isa.REG_KVBASE, hoff=int(rng.integers(0, 50)) * 2, ireg=8,
                         stride=int(rng.choice([64, 128, 1088])), len=1088)
            elif mode == 2:    # unaligned into the KV buffer: the line view of the banks
                ln = int(rng.choice([1, 17, 100, 600]))
                buf = int(rng.integers(kv0 - 300, hi - ln))
                f = dict(buf=buf, hreg=isa.REG_TBASE, hoff=int(rng.integers(0, 40)), ireg=9,
                         stride=int(rng.integers(1, 20)), len=ln)
            else:              # a length from R8
                ln = int(rng.choice([0, 3, 64]))
                buf = int(rng.integers(lo, kv0 - 2000))
                f = dict(buf=buf, hreg=isa.REG_WBASE, hoff=int(rng.integers(0, 200)), len=ln,
                         lreg=8, lmul=int(rng.integers(1, 40)))
            lds.append(f)
        for k, f in enumerate(lds):
            if k == 0 and r > 0:
                f["wait_next"] = 1
            if k == len(lds) - 1:
                f["rel_next"] = 1
            words.append(_w("LD", **f))
        words.append(_w("MISC", func=0, wait_prev=1, rel_next=1))
        sts = []
        dests = [(hbm_kv0 + hbm_kvn // 2 + 64, hbm_kv0 + hbm_kvn), (io0 + 64, io0 + ion)]
        for k in range(int(rng.integers(3, 8))):
            kind = int(rng.integers(0, 4))
            func = [isa.ST_X, isa.ST_X, isa.ST_F32, isa.ST_F16][kind]
            ireg = int(rng.choice([1, 7, 8, 9]))
            stride = int(rng.choice([0, 1, 4, 34, 1088, int(rng.integers(1, 200))]))
            ln = 2 * int(rng.integers(1, 100)) if func == isa.ST_F16 else \
                int(rng.choice([1, 4, 33, 64, 100, 1088]))
            if regs[ireg] * stride > 20000:
                ireg = 8                                     # R8 <= context / 32
            off = regs[ireg] * stride                        # both sides' index (ST.x)
            src = int(rng.integers(lo, hi - 2 * ln))
            buf = src - off if func == isa.ST_X else src
            if buf < 0:
                buf, func = src, isa.ST_F32
            dst_lo, dst_hi = dests[int(rng.integers(0, 2))]     # KV upper half, I/O
            target = int(rng.integers(dst_lo, dst_hi - ln))
            hoff = (target - off) // 32
            sts.append(dict(func=func, buf=buf, hreg=isa.REG_ZERO, hoff=hoff, ireg=ireg,
                            stride=stride, len=ln))
        for k, f in enumerate(sts):
            if k == 0:
                f["wait_prev"] = 1
            if k == len(sts) - 1:
                f["rel_prev"] = 1
            words.append(_w("ST", **f))
        words.append(_w("MISC", func=0, wait_next=1, rel_prev=1))
    words.append(_w("SYS", func=isa.SYS_END))
    return words


def test_chains_ld_st_bytes_match_golden(chains_machine):
    """ST.x (on-chip source indexed by R[ireg]*stride), LD/ST with R8/R9 lengths and indices,
    LDs into the KV buffer through the fast path and the line view: after each run HBM holds
    the golden model's bytes and the byte counters agree."""
    config, bundle, acc = chains_machine
    man = bundle.manifest
    hbm = int(man["hbm_size"])
    rng = np.random.default_rng(5)
    n_stx = 0
    for trial, (pos, token) in enumerate([(40, 3), (0, 200), (33, 17), (int(man["onchip"]["context"]) - 1, 255)]):
        words = chains_ldst_program(man, rng, pos, token)
        n_stx += sum(1 for w in words if isa.decode(w).op == "ST" and isa.decode(w).fields["func"] == isa.ST_X)
        g = Golden(with_program(bundle, words), fast=False)
        chk = g.check(pos, token)
        assert chk is None, (chk.status, chk.pc, isa.disassemble(isa.decode(words[chk.pc])))
        assert g.run(pos, token).status == 0
        acc.reload_hbm()
        r = rtl_status(acc, words, pos, token)
        assert r.status == 0, (r.status, r.pc)
        got = acc.read_hbm(0, hbm)
        diff = np.flatnonzero(got != g.hbm)
        assert diff.size == 0, f"trial {trial}: {diff.size} bytes differ, first at {diff[:8]}"
        assert r.counters["ld_bytes"] == g.counters.get("ld_bytes", 0)
        assert r.counters["st_bytes"] == g.counters.get("st_bytes", 0)
    assert n_stx >= 10


# ---------------------------------------------------------------------------------------
# a compiled chains program on the whole accelerator (once the MV and SFU units have them)
# ---------------------------------------------------------------------------------------

def _units_have_chains() -> bool:
    import inspect

    from llmfab.hw.mv_exec import MvExec
    from llmfab.hw.sfu_exec import SfuExec
    return all("chains" in inspect.signature(c.__init__).parameters for c in (MvExec, SfuExec))


def tinyc_bundle(tmp_path):
    """(``tinyc``: ``tiny`` with attention on the chains and a 32 KiB KV buffer, the tiny model
    of head dim 32 compiled for it)."""
    from tinymodel import write_tiny_gguf

    from llmfab.boards.config import config_from_dict
    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    path = tmp_path / "tiny32.gguf"
    write_tiny_gguf(path, "q4_1", dim=64, n_heads=2, n_kv_heads=1)
    d = load_config("tiny").to_dict()
    d.update(name="tinyc", attention="chains")
    d["buffers"] = dict(d["buffers"], kv_kib=32)
    config = config_from_dict(d, "tinyc (tiny with attention on the chains, 32 KiB KV buffer)")
    return config, compile_model(load_model(path), config)


#: Decode positions run one after the other (the KV cache grows as in generation): the
#: first K/V tile, its last row, the second tile's first rows.
POSITIONS = list(range(0, 36))


@pytest.mark.skipif(not _units_have_chains(), reason="MvExec/SfuExec without attention on the "
                    "chains (the MV and SFU branches are not merged)")
def test_chains_decode_matches_golden(tmp_path):
    """The tiny model (head dim 32) compiled for ``tinyc`` (``tiny`` with attention on the
    chains and a 32 KiB KV buffer) on the whole accelerator (MvExec and SfuExec with chains):
    decode runs at positions 0..35 in turn leave the golden model's HBM (logits, KV cache)
    bit for bit and end with its status. Skipped until the MV and SFU branches are merged
    (their units take ``chains``): the merge's acceptance test."""
    from llmfab.sim.rtl.harness import RtlAccelerator
    config, bundle = tinyc_bundle(tmp_path)
    hbm = int(bundle.manifest["hbm_size"])
    g = Golden(bundle)
    rng = np.random.default_rng(9)
    bad = []
    with RtlAccelerator(config, bundle, timeout_seconds=3000) as acc:
        for pos in POSITIONS:
            token = int(rng.integers(0, 256))
            gr = g.run(pos, token)
            r = acc.run(pos, token, timeout_cycles=4_000_000)
            assert not r.timed_out, pos
            if (r.status, r.pc if r.status else -1) != (gr.status, gr.pc if gr.status else -1):
                bad.append((pos, "status", (r.status, r.pc), (gr.status, gr.pc)))
                break
            diff = np.flatnonzero(acc.read_hbm(0, hbm) != g.hbm)
            if diff.size:
                bad.append((pos, f"{diff.size} HBM bytes differ, first at {diff[:8]}"))
                break
    assert not bad, bad


@pytest.mark.skipif(not _units_have_chains(), reason="MvExec/SfuExec without attention on the "
                    "chains (the MV and SFU branches are not merged)")
def test_chains_prefill_matches_golden(tmp_path):
    """Prompts through ``tinyc``'s prefill programs (buckets 2, 4, 8 on two token lanes;
    attention on the chains, KVROW at R1 + t): runs from misaligned starts, across the
    32-position tile and longer than the largest bucket give the golden model's logits and
    KV cache bit for bit, and decoding goes on from the cache they left."""
    from llmfab.host.golden_backend import GoldenDevice
    from llmfab.host.rtl_backend import RtlDevice
    config, bundle = tinyc_bundle(tmp_path)
    assert bundle.manifest["prefill"]["buckets"] == [2, 4, 8] and config.chain.tokens == 2
    kv0, kvn = (int(v) for v in bundle.manifest["memory_map"]["kv"])
    rtl = RtlDevice(None, config, bundle=bundle, timeout_cycles=4_000_000)
    try:
        gold = GoldenDevice(None, config, bundle=bundle)
        rng = np.random.default_rng(4)
        for n in (3, 37, 1, 6):                      # positions 0..46
            toks = [int(t) for t in rng.integers(0, 256, n)]
            lr, lg = rtl.forward(toks), gold.forward(toks)
            assert np.array_equal(lr.view(np.uint32), lg.view(np.uint32)), n
            assert np.array_equal(rtl.acc.read_hbm(kv0, kvn), gold.golden.hbm[kv0:kv0 + kvn]), n
        # 2+1 | 1 4 8 8 8 8 (3 -> 40) | 1 | 1 2 2 1 (41 -> 47)
        assert [r["tokens"] for r in rtl.prefill_runs] == [2, 4, 8, 8, 8, 8, 2, 2]
        # as generate runs a prompt (47 -> 59: 1, 8 and 2 KV-only, 1): the last token's logits
        toks = [int(t) for t in rng.integers(0, 256, 12)]
        lr, lg = rtl.forward_last(toks), gold.forward_last(toks)
        assert lr.shape == (1, 256) and np.array_equal(lr.view(np.uint32), lg.view(np.uint32))
        assert np.array_equal(rtl.acc.read_hbm(kv0, kvn), gold.golden.hbm[kv0:kv0 + kvn])
        assert [(r["tokens"], r["logits"]) for r in rtl.prefill_runs[8:]] == [(8, False), (2, False)]
    finally:
        rtl.close()


def _split_heads(program: bytes) -> int:
    """How many times a QKV tile's MM comes between a KV head's scores MVs and their softmax
    (a prefill program's head in two parts: ``ProgramBuilder._qkv_prefill_chains``)."""
    n, scores = 0, False
    for w in isa.from_bytes(program):
        ins = isa.decode(w)
        if ins.op == "MV" and ins["func"] & isa.MV_RT:
            scores = True
        elif ins.op == "MISC" and ins["func"] == isa.MISC_FUNCS["SOFTMAX"]:
            scores = False
        elif ins.op == "MM" and scores:
            n, scores = n + 1, False
    return n


@pytest.mark.skipif(not _units_have_chains(), reason="MvExec/SfuExec without attention on the "
                    "chains (the MV and SFU branches are not merged)")
def test_chains_prefill_split_heads_matches_golden(tmp_path):
    """``tinyc`` with a model of two KV heads (head dim 32, groups of one) whose QKV matrix is
    four weight tiles: the first head's q/k/v rows are complete before the third tile, so its
    attention goes in two parts, the softmax chains after that tile's MM. Prompts through the
    prefill buckets give the golden model's logits and KV cache bit for bit."""
    from tinymodel import write_tiny_gguf

    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    from llmfab.host.golden_backend import GoldenDevice
    from llmfab.host.rtl_backend import RtlDevice
    config, _ = tinyc_bundle(tmp_path)
    path = tmp_path / "tiny2kv.gguf"
    write_tiny_gguf(path, "q4_1", dim=64, n_heads=2, n_kv_heads=2, seed=6)
    bundle = compile_model(load_model(path), config)
    assert all(_split_heads(p) > 0 for p in bundle.prefill.values()), bundle.manifest["prefill"]
    kv0, kvn = (int(v) for v in bundle.manifest["memory_map"]["kv"])
    rtl = RtlDevice(None, config, bundle=bundle, timeout_cycles=4_000_000)
    try:
        gold = GoldenDevice(None, config, bundle=bundle)
        rng = np.random.default_rng(8)
        for n in (5, 30):                            # positions 0..34: every bucket, a tile crossed
            toks = [int(t) for t in rng.integers(0, 256, n)]
            lr, lg = rtl.forward(toks), gold.forward(toks)
            assert np.array_equal(lr.view(np.uint32), lg.view(np.uint32)), n
            assert np.array_equal(rtl.acc.read_hbm(kv0, kvn), gold.golden.hbm[kv0:kv0 + kvn]), n
        assert {r["tokens"] for r in rtl.prefill_runs} == set(bundle.prefill)
    finally:
        rtl.close()
