"""MV/MM on the simulated accelerator (hw/mv_exec.py behind hw/exec_unit.py), bit for bit.

The ``tiny`` accelerator as the rtl backend builds it (the default ``ExecUnit``:
MV/MM -> MvExec, the SFU's MISC operations -> SfuExec, NOP/COPY/ADD/MUL -> MiscExec),
so the Verilator build is the one tests/rtl/test_rtl_backend.py and the others share,
and one simulation for every program here. Programs: LD (weights into the weight
buffer, quantized vectors into the activation buffer, both prepared in HBM by
the test) -> MV/MM ... -> ST of the results; HBM after the run must be the
golden model's (``sim.golden.Golden``, i.e. ``sim.numerics_model.matvec``).
"""

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.compiler import isa, quant, sparse
from llmfab.compiler.bundle import Bundle
from llmfab.core import formats
from llmfab.core import numerics as N
from llmfab.sim.golden import Golden

WATCHDOG = 2_000_000
#: (format, sparsity) of the random programs: every format dense, 2:4, and N:16 patterns
MODES = [("q4_0", "dense"), ("q4_1", "dense"), ("q8_0", "dense"), ("q4_0", "2:4"),
         ("q4_1", "2:4"), ("q8_0", "2:4"), ("q4_0", "4:16"), ("q4_1", "8:16"),
         ("q8_0", "2:16"), ("q4_0", "2:16")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tinymodel import write_tiny_gguf

    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(path, "q4_0")
    config = load_config("tiny")
    return config, compile_model(load_model(path), config)


@pytest.fixture(scope="module")
def acc(tiny):
    from llmfab.sim.rtl.harness import RtlAccelerator
    config, bundle = tiny
    with RtlAccelerator(config, bundle, timeout_seconds=1200) as a:
        yield a


def _w(op, **f):
    return isa.encode(isa.make(op, **f))


def with_program(bundle, words) -> Bundle:
    return Bundle(manifest=bundle.manifest, program=isa.to_bytes(words), hbm_image=bundle.hbm_image)


def weight_bytes(rng, fmt, sp, rows, cols) -> np.ndarray:
    """Real GGUF blocks (llama.cpp's quantizer), pruned and sparse-encoded for N:M."""
    vals = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(rng.uniform(0.01, 2))
    vals[rng.random(vals.shape) < 0.05] = 0
    raw = quant.quantize_rows(fmt, vals).reshape(rows, -1)
    if sp != "dense":
        raw = sparse.encode_sparse_rows(fmt, raw, sparse.prune(fmt, raw, sp), sp)
    return np.ascontiguousarray(raw, np.uint8).reshape(-1)


def qvec_bytes(rng, nb, ntok) -> np.ndarray:
    out = []
    for _ in range(ntok):
        x = rng.standard_normal(nb * 32).astype(np.float32) * np.float32(10 ** rng.uniform(-3, 2))
        x[rng.random(x.size) < 0.05] = 0
        if rng.random() < 0.2:
            x[:32] = 0                                      # an all-zero block (d_x = 0)
        q, d, s = N.quantize_act(x)
        out.append(np.concatenate([np.asarray(q, np.int8).view(np.uint8).reshape(-1),
                                   np.asarray(d, np.float32).view(np.uint8),
                                   np.asarray(s, np.int32).view(np.uint8)]))
    return np.concatenate(out)


def run_both(acc, bundle, words, scratch, hbm_at):
    """Run ``words`` on the golden model and the RTL with ``scratch`` in HBM at ``hbm_at``."""
    g = Golden(with_program(bundle, words), fast=False)
    assert g.check(1, 2) is None
    g.hbm[hbm_at:hbm_at + scratch.size] = scratch
    assert g.run(1, 2).status == 0
    acc.reload_hbm()
    acc.write_hbm(hbm_at, scratch)
    acc.load_program(isa.to_bytes(words))
    r = acc.run(1, 2, timeout_cycles=WATCHDOG)
    assert not r.timed_out, f"watchdog fired after {r.sim_cycles} cycles"
    assert r.status == 0, (r.status, r.pc)
    return g, r


class Layout:
    """Where the test puts things for the tiny configuration."""

    def __init__(self, bundle):
        man = bundle.manifest
        self.hbm = int(man["hbm_size"])
        self.kv0, self.kvn = man["memory_map"]["kv"]
        self.io0, self.ion = man["memory_map"]["io"]
        oc = man["onchip"]
        self.act0, self.actn = oc["activation"]
        self.glob0, self.globn = oc["global"]
        self.wb0, self.wbn = oc["weight"]


def mv_program(rng, L: Layout, modes, *, align_any=True):
    """LD weights + vectors, a few MV/MM (random shapes that fit the buffers), ST of the results.

    Returns (words, scratch bytes for HBM at kv0, list of instruction dicts)."""
    wblob, ablob, ins = [], [], []
    wpos, apos, dpos = 0, 0, 0
    for fmt, sp in modes:
        bpb = formats.block_bytes(fmt, sp)
        for _ in range(20):
            nb = int(rng.integers(1, 9))
            rows = int(rng.integers(1, 25))
            ntok = int(rng.integers(1, 4)) if rng.random() < 0.35 else 0
            wskip = int(rng.integers(0, 20)) if align_any else (-wpos) % 32
            askip = int(rng.integers(0, 20)) if align_any else (-apos) % 32
            dskip = int(rng.integers(0, 16)) if align_any else (-dpos) % 4
            need_w = wpos + wskip + rows * nb * bpb
            need_a = apos + askip + max(ntok, 1) * nb * 40
            need_d = dpos + dskip + max(ntok, 1) * rows * 4
            if need_w <= L.wbn and need_a <= L.actn and need_d <= min(L.globn, L.ion):
                break
        else:
            continue
        wblob.append(rng.integers(0, 256, wskip, dtype=np.uint8))
        wblob.append(weight_bytes(rng, fmt, sp, rows, nb * 32))
        ablob.append(rng.integers(0, 256, askip, dtype=np.uint8))
        ablob.append(qvec_bytes(rng, nb, max(ntok, 1)))
        func = isa.FMTS.index(fmt) | (isa.SPARSITIES.index(sp) << 2)
        f = dict(func=func, wb=L.wb0 + wpos + wskip, rows=rows, cols=nb * 32,
                 qsrc=L.act0 + apos + askip, dst=L.glob0 + dpos + dskip)
        if ntok:
            f["ntok"] = ntok
        ins.append(("MM" if ntok else "MV", f, (fmt, sp)))
        wpos, apos, dpos = need_w, need_a, need_d
    w = np.concatenate(wblob) if wblob else np.zeros(0, np.uint8)
    a = np.concatenate(ablob) if ablob else np.zeros(0, np.uint8)
    aoff = -(-max(w.size, 1) // 32) * 32
    zoff = -(-(aoff + a.size) // 32) * 32
    dpos = max(dpos, 4)
    scratch = np.zeros(zoff + dpos, np.uint8)          # zeros at zoff: clear the result area
    scratch[:w.size] = w
    scratch[aoff:aoff + a.size] = a
    words = [_w("LD", buf=L.wb0, hreg=isa.REG_KVBASE, len=max(w.size, 1)),
             _w("LD", buf=L.glob0, hreg=isa.REG_KVBASE, hoff=zoff // 32, len=dpos),
             _w("LD", buf=L.act0, hreg=isa.REG_KVBASE, hoff=aoff // 32, len=max(a.size, 1),
                rel_next=1)]
    for i, (op, f, _) in enumerate(ins):
        words.append(_w(op, wait_prev=int(i == 0), rel_next=int(i == len(ins) - 1), **f))
    words.append(_w("ST", wait_prev=1, buf=L.glob0, hreg=isa.REG_IOBASE, len=dpos))
    words.append(_w("SYS", func=isa.SYS_END))
    return words, scratch, ins


def test_mv_mm_match_golden(tiny, acc):
    """Random MV/MM programs over Q4_0/Q4_1/Q8_0 dense, 2:4, 8:16, 4:16, 2:16 (any byte
    alignment of wb, qsrc, dst): HBM after the run is the golden model's, bit for bit."""
    config, bundle = tiny
    L = Layout(bundle)
    rng = np.random.default_rng(2026)
    seen = set()
    n_mv = 0
    for trial in range(6):
        modes = [MODES[int(i)] for i in rng.permutation(len(MODES))[:4]]
        words, scratch, ins = mv_program(rng, L, modes, align_any=trial % 2 == 1)
        g, r = run_both(acc, bundle, words, scratch, L.kv0)
        got = acc.read_hbm(0, L.hbm)
        diff = np.flatnonzero(got != g.hbm)
        assert diff.size == 0, (f"trial {trial}: {diff.size} bytes differ, first at {diff[:8]} "
                                f"(io at {L.io0}); instructions {ins}")
        for op, f, mode in ins:
            seen.add(mode)
            n_mv += 1
    assert seen == set(MODES), set(MODES) - seen
    print(f"{n_mv} MV/MM instructions bit-exact")


def steady_cycles(acc, bundle, L, fmt, sp, nb=8):
    """Compute-queue busy cycles of one MV at two row counts -> cycles per block."""
    rng = np.random.default_rng(5)
    bpb = formats.block_bytes(fmt, sp)
    big = min(L.wbn // (nb * bpb), 64)
    busy = {}
    for rows in (4, big):
        w = weight_bytes(rng, fmt, sp, rows, nb * 32)
        a = qvec_bytes(rng, nb, 1)
        aoff = -(-w.size // 32) * 32
        scratch = np.zeros(aoff + a.size, np.uint8)
        scratch[:w.size] = w
        scratch[aoff:] = a
        func = isa.FMTS.index(fmt) | (isa.SPARSITIES.index(sp) << 2)
        words = [_w("LD", buf=L.wb0, hreg=isa.REG_KVBASE, len=w.size),
                 _w("LD", buf=L.act0, hreg=isa.REG_KVBASE, hoff=aoff // 32, len=a.size, rel_next=1),
                 _w("MV", wait_prev=1, rel_next=1, func=func, wb=L.wb0, rows=rows, cols=nb * 32,
                    qsrc=L.act0, dst=L.glob0),
                 _w("ST", wait_prev=1, buf=L.glob0, hreg=isa.REG_IOBASE, len=rows * 4),
                 _w("SYS", func=isa.SYS_END)]
        g, r = run_both(acc, bundle, words, scratch, L.kv0)
        got = acc.read_hbm(L.io0, rows * 4)
        assert np.array_equal(got, g.hbm[L.io0:L.io0 + rows * 4])
        busy[rows] = r.counters["busy_cmp"]
    return (busy[big] - busy[4]) / ((big - 4) * nb), busy


def test_mv_steady_state_cycles(tiny, acc):
    """Cycles per block in steady state (busy_cmp difference between two row counts)."""
    config, bundle = tiny
    L = Layout(bundle)
    D = config.hbm.ports * config.hbm.data_width // 8
    lines = []
    for fmt, sp in [("q4_0", "dense"), ("q4_1", "dense"), ("q8_0", "dense"), ("q4_0", "2:4"),
                    ("q8_0", "2:16")]:
        cpb, busy = steady_cycles(acc, bundle, L, fmt, sp)
        bpb = formats.block_bytes(fmt, sp)
        # bound: the chain.count row pipelines (one block per cycle each, one idle decoder
        # cycle per row; dense Q8_0: 2 cycles/block), or their weight reads: a row of
        # nb blocks is at most rb/D + 1 lines plus a command cycle, ceil(count/2) readers
        # per read port
        nb, n = 8, config.chain.count
        chain = 2.0 if (fmt, sp) == ("q8_0", "dense") else 1.0
        per_port = -(-n // 2)
        bound = max((chain * nb + 1) / (nb * n),
                    per_port * (nb * bpb / D + 2) / (nb * n))
        lines.append(f"{fmt} {sp}: {cpb:.3f} cycles/block (bound {bound:.3f}; busy {busy})")
        assert cpb < bound * 1.15 + 0.05, lines[-1]
    print("\n".join(lines))


def test_mm_activation_cache(tiny, acc):
    """The activation cache holds an MM's tokens: a second MM on the same vectors (another
    weight tile) skips their load, an MM on other vectors or after an LD rewrote the vectors
    loads them again; every result is the golden model's."""
    config, bundle = tiny
    L = Layout(bundle)
    rng = np.random.default_rng(9)
    rows, nb, ntok = 6, 4, 3
    w = np.concatenate([weight_bytes(rng, "q4_0", "dense", rows, nb * 32) for _ in range(2)])
    vecs = [qvec_bytes(rng, nb, ntok) for _ in range(3)]        # A, B, and A's replacement
    vb = vecs[0].size
    aoff = -(-w.size // 32) * 32
    scratch = np.zeros(aoff + 3 * vb + 32, np.uint8)
    scratch[:w.size] = w
    for i, v in enumerate(vecs):
        scratch[aoff + i * vb:aoff + (i + 1) * vb] = v
    half, out = w.size // 2, rows * ntok * 4

    def mm(i, qsrc, **tok):
        return _w("MM", func=0, wb=L.wb0 + (i % 2) * half, rows=rows, cols=nb * 32, qsrc=qsrc,
                  dst=L.glob0 + i * out, ntok=ntok, **tok)

    def program(second_qsrc, rewrite):
        words = [_w("LD", buf=L.wb0, hreg=isa.REG_KVBASE, len=w.size),
                 _w("LD", buf=L.act0, hreg=isa.REG_KVBASE, hoff=aoff // 32, len=2 * vb, rel_next=1),
                 mm(0, L.act0, wait_prev=1, rel_prev=int(rewrite))]
        if rewrite:         # the vectors at act0 replaced between the two MMs
            words += [_w("LD", buf=L.act0, hreg=isa.REG_KVBASE, hoff=(aoff + 2 * vb) // 32, len=vb,
                         wait_next=1, rel_next=1)]
        words += [mm(1, second_qsrc, wait_prev=int(rewrite), rel_next=1),
                  _w("ST", wait_prev=1, buf=L.glob0, hreg=isa.REG_IOBASE, len=2 * out),
                  _w("SYS", func=isa.SYS_END)]
        return words

    assert (aoff + 2 * vb) % 32 == 0 and vb % 32 == 0
    busy = {}
    for name, qsrc, rewrite in (("same", L.act0, False), ("other", L.act0 + vb, False),
                                ("rewritten", L.act0, True)):
        g, r = run_both(acc, bundle, program(qsrc, rewrite), scratch, L.kv0)
        got = acc.read_hbm(L.io0, 2 * out)
        assert np.array_equal(got, g.hbm[L.io0:L.io0 + 2 * out]), name
        busy[name] = r.counters["busy_mv"]
    load = ntok * (-(-nb * 40 // min(config.hbm.ports * config.hbm.data_width // 8, 32)))
    # the second MM's vectors: cached (no load) vs loaded (at least a chunk per cycle)
    assert busy["other"] - busy["same"] >= load, busy
    print(f"busy_mv: {busy} (a {ntok}-token load is >= {load} cycles)")


def test_compiled_qkv_tiles_match_golden(tiny, acc):
    """The compiled tiny model's decode program, truncated after its first QKV tiles, with an
    ST of their outputs appended. EMBED/RMSNORM/QUANT are still placeholders in RTL, so the
    quantized vector the QKV MVs read is prepared by an LD prepended to the program (the bytes
    the golden model's QUANT writes there; the golden model's QUANT rewrites the same bytes)."""
    config, bundle = tiny
    L = Layout(bundle)
    words = [int.from_bytes(bytes(bundle.program[16 * i:16 * i + 16]), "little")
             for i in range(len(bundle.program) // 16)]
    dec = [isa.decode(w) for w in words]
    mvs = [i for i, d in enumerate(dec) if d.op in ("MV", "MM")]
    first = mvs[0]
    qsrc = dec[first].fields["qsrc"]
    # the first run of MVs on the same vector (the QKV tiles)
    tiles = [i for i in mvs if dec[i].fields["qsrc"] == qsrc and
             all(dec[j].op != "MISC" or dec[j].fields["func"] == 0 for j in range(first, i))]
    last = tiles[-1]
    lo = min(dec[i].fields["dst"] for i in tiles)
    hi = max(dec[i].fields["dst"] + 4 * dec[i].fields["rows"] * dec[i].fields.get("ntok", 1)
             for i in tiles)
    body = list(words[:last + 1])
    f = dict(dec[last].fields)
    f["rel_next"] = 1
    body[last] = _w(dec[last].op, **f)
    tail = [_w("ST", wait_prev=1, buf=lo, hreg=isa.REG_IOBASE, len=hi - lo),
            _w("SYS", func=isa.SYS_END)]
    pos, token = 3, 5
    g = Golden(with_program(bundle, body + tail), fast=False)
    assert g.check(pos, token) is None
    assert g.run(pos, token).status == 0
    nb = dec[first].fields["cols"] // 32
    qv = g.mem[qsrc:qsrc + 40 * nb].copy()
    expect = g.hbm[L.io0:L.io0 + hi - lo].copy()
    prog = [_w("LD", buf=qsrc, hreg=isa.REG_KVBASE, len=qv.size)] + body + tail
    g2, r = None, None
    g2 = Golden(with_program(bundle, prog), fast=False)
    assert g2.check(pos, token) is None
    g2.hbm[L.kv0:L.kv0 + qv.size] = qv
    assert g2.run(pos, token).status == 0
    assert np.array_equal(g2.hbm[L.io0:L.io0 + hi - lo], expect)
    acc.reload_hbm()
    acc.write_hbm(L.kv0, qv)
    acc.load_program(isa.to_bytes(prog))
    r = acc.run(pos, token, timeout_cycles=WATCHDOG)
    assert not r.timed_out and r.status == 0, (r.status, r.pc)
    got = acc.read_hbm(L.io0, hi - lo)
    assert np.array_equal(got, expect), np.flatnonzero(got != expect)[:8]
    print(f"compiled QKV tiles (pcs {tiles}, {hi - lo} bytes) bit-exact; "
          f"{r.counters['cycles']} cycles, busy_cmp {r.counters['busy_cmp']}")


def test_mv_exec_ci_geometry_cocotb():
    """MvExec alone in the ``ci`` geometry (64-byte lines, 2 load chunks per line; a 64-block
    activation buffer, so MMs of up to 6 tokens x 24 blocks take several passes) under
    cocotb with a memory model (random stalls on rd0 and wr): random MV/MM over all 15
    modes at any alignment vs ``matvec``, bit for bit; then steady-state cycles per block."""
    from pathlib import Path

    from llmfab.hw.mv_exec import MvExec
    from llmfab.hw.onchip import slice_geometry
    from llmfab.hw.top import geometry
    from llmfab.sim.rtl.runner import run_cocotb, to_verilog
    config = load_config("ci")
    g = geometry(config)
    D = g["line_bytes"]
    ab = (g["onchip_size"] // D - 1).bit_length()
    unit = MvExec.for_config(config, max_blocks=64)(addr_bits=ab, line_bytes=D)
    from amaranth.hdl import Signal as _Signal
    from amaranth.hdl import Value as _Value
    ports = [_Value.cast(v) for _, _, v in unit.signature.flatten(unit)]
    ports = [v for v in ports if isinstance(v, _Signal)]       # not rsp.ready (a constant)
    bdir = run_cocotb(to_verilog(unit, "mv_exec", ports=ports), "mv_exec", "cocotb_mv_exec",
                      module_dir=Path(__file__).parent,
                      extra_env={"MV_D": str(D), "MV_AB": str(ab), "MV_N": "30",
                                 "MV_L": str(unit.pipelines), "MV_P": str(unit.slices),
                                 "MV_WB": str(g["weight_base"]),
                                 "MV_BAB": str(slice_geometry(config)["bank_addr_bits"]),
                                 "MV_REPORT": "mv_steady.txt"})
    print((bdir / "mv_steady.txt").read_text())


def test_mv_exec_half_lines_cocotb():
    """MvExec on one slice of 64-byte stripes (the U280's port width, 64-byte lines, four row
    pipelines of 32 weights): every bank read is a half-line of one of the bank's two half
    memories (``bank[0][j]``, four ports, pipelines 0 and 2 sharing port 0 of both halves, 1 and
    3 port 1), rows at any byte; random MV/MM over all 15 modes vs ``matvec`` bit for bit,
    then steady-state cycles per block (the bench's bound: a block per pipeline per cycle)."""
    from pathlib import Path

    from llmfab.hw.mv_exec import MvExec
    from llmfab.hw.top import geometry
    from llmfab.sim.rtl.runner import run_cocotb, to_verilog
    config = load_config("ci")
    g = geometry(config)
    D = 64
    ab = (g["onchip_size"] // D - 1).bit_length()
    wbytes = config.buffer_bytes["weight"]
    bab = (wbytes // D - 1).bit_length()
    unit = MvExec(addr_bits=ab, line_bytes=D, chain_length=32, count=4, max_blocks=64,
                  slices=1, stripe=64, weight_base=g["weight_base"], bank_addr_bits=bab)
    assert len(unit.bank[0]) == 4
    bdir = run_cocotb(to_verilog(unit, "mv_exec", ports=_ports(unit)), "mv_exec",
                      "cocotb_mv_exec", module_dir=Path(__file__).parent,
                      extra_env={"MV_D": str(D), "MV_AB": str(ab), "MV_N": "30",
                                 "MV_L": str(unit.pipelines), "MV_P": "1", "MV_S": "64",
                                 "MV_WB": str(g["weight_base"]), "MV_BAB": str(bab),
                                 "MV_REPORT": "mv_steady.txt"})
    print((bdir / "mv_steady.txt").read_text())


def _ports(unit):
    from amaranth.hdl import Signal, Value
    return [v for v in (Value.cast(x) for _, _, x in unit.signature.flatten(unit))
            if isinstance(v, Signal)]


def test_mv_exec_chain_lengths():
    """A chain of length 32 k is k block lanes, each its own row pipeline; other lengths and
    more than 64 pipelines are errors naming the value."""
    from llmfab.hw.mv_exec import MvExec
    assert [MvExec(addr_bits=12, line_bytes=64, chain_length=n, count=2).pipelines
            for n in (32, 64, 128, 256)] == [2, 4, 8, 16]
    with pytest.raises(ValueError, match=r"^MvExec chain length must be 32, 64, 128 or 256 "
                                         r"\(whole blocks between break points\), not 96$"):
        MvExec(addr_bits=12, line_bytes=64, chain_length=96)
    with pytest.raises(ValueError, match=r"^MvExec needs 1..256 row pipelines \(chain count x "
                                         r"length / 32\), not 128 x 4$"):
        MvExec(addr_bits=12, line_bytes=64, chain_length=128, count=128)


@pytest.mark.parametrize("name", ["ci", "tiny"])
def test_mv_exec_and_exec_unit_lint(name, tmp_path):
    """``verilator --lint-only -Wall`` (the shared waivers) is clean for MvExec and ExecUnit."""
    from test_fp import verilator_lint

    from llmfab.hw.exec_unit import ExecUnit
    from llmfab.hw.mv_exec import MvExec
    from llmfab.hw.top import geometry
    from llmfab.sim.rtl.runner import to_verilog
    config = load_config(name)
    g = geometry(config)
    D = g["line_bytes"]
    ab = (g["onchip_size"] // D - 1).bit_length()
    for top, unit in (("mv_exec", MvExec.for_config(config)(addr_bits=ab, line_bytes=D)),
                      ("exec_unit", ExecUnit.factory(config, sfu=False)(addr_bits=ab, line_bytes=D))):
        assert verilator_lint(to_verilog(unit, top, ports=_ports(unit)), top, tmp_path) == "", top


@pytest.mark.filterwarnings("ignore:.*created but never used")
def test_exec_unit_routes():
    """The routing table: MV/MM -> mv, NOP/COPY/ADD/MUL -> misc, the rest -> sfu or misc."""
    from llmfab.hw.exec_unit import ExecUnit, default_routes
    from llmfab.hw.isa import MiscFunc, Op
    r = default_routes(have_sfu=True)
    assert r[Op.MV] == r[Op.MM] == "mv"
    for f in MiscFunc:
        simple = f in (MiscFunc.NOP, MiscFunc.COPY, MiscFunc.ADD, MiscFunc.MUL)
        assert r[(Op.MISC, f)] == ("misc" if simple else "sfu")
        assert default_routes(have_sfu=False)[(Op.MISC, f)] == "misc"
    config = load_config("tiny")
    u = ExecUnit.factory(config, sfu=False)(addr_bits=12, line_bytes=16)
    u._MustUse__silence = True                     # never elaborated here
    assert set(u.routes.values()) == {"mv", "misc"}
    with pytest.raises(ValueError, match="names unit"):
        ExecUnit(addr_bits=12, line_bytes=16, config=config, sfu=False,
                 routes={Op.MV: "nope"})
    import gc
    gc.collect()                                   # the failed one warns here, not elsewhere
