"""hw/scaler.py under Verilator and Amaranth's simulator against core.numerics.block_values +
accum4: Scaler's partials, RowCombine's sums, and the two in a row as the MV unit uses them."""

from pathlib import Path

import numpy as np
import pytest
from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from llmfab.boards.config import load_config
from llmfab.core import numerics as nx
from llmfab.hw.scaler import Partials, RowCombine, Scaler, ScalerIn, WeightFormat, units
from llmfab.sim.rtl.runner import run_cocotb, to_verilog

from tb import soak  # noqa: E402  (tests/rtl is on sys.path)
from test_fp import verilator_lint  # noqa: E402


class ScalerSum(wiring.Component):
    """A scaler and a row combine in a row: blocks in, row sums out (the MV unit's path for
    one lane, without its pick of a lane)."""

    def __init__(self, scaler):
        self._scaler = scaler
        super().__init__({"i": In(stream.Signature(ScalerIn)), "o": Out(stream.Signature(32))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.scaler = sc = self._scaler
        m.submodules.combine = rc = RowCombine()
        wiring.connect(m, wiring.flipped(self.i), sc.i)
        m.d.comb += [rc.i.valid.eq(sc.o.valid), rc.i.payload.p.eq(sc.o.payload),
                     sc.o.ready.eq(rc.i.ready),
                     self.o.valid.eq(rc.o.valid), self.o.payload.eq(rc.o.payload.sum),
                     rc.o.ready.eq(self.o.ready)]
        return m


@soak(12_000)
def test_scaler(vectors):
    """Scaler -> RowCombine: ``vectors`` random blocks in rows (1,000, or 12,000 under slow),
    single blocks, short rows, specials, throughput (tests/rtl/cocotb_scaler.py)."""
    cfg = load_config("ci")
    unit = units(cfg)["scaler"]
    run_cocotb(to_verilog(ScalerSum(unit), "scaler"), "scaler", "cocotb_scaler",
               module_dir=Path(__file__).parent,
               extra_env={"S_FORMATS": ",".join(unit.formats), "S_N": str(vectors)})


def test_formats_validated():
    with pytest.raises(ValueError, match="weight format must be"):
        Scaler(formats=("q4_k",))


@pytest.mark.parametrize("formats", [("q4_0", "q4_1", "q8_0"), ("q4_0", "q8_0")])
def test_scaler_lint(formats, tmp_path):
    assert verilator_lint(to_verilog(Scaler(formats=formats), "scaler"), "scaler", tmp_path) == ""


@pytest.mark.parametrize("side", [0, 24])
def test_row_combine_lint(side, tmp_path):
    assert verilator_lint(to_verilog(RowCombine(side), "rc"), "rc", tmp_path) == ""


def _partials(vals):
    """accum4's four partials of a row's block values (block j into partial j % 4, each from
    +0.0; a partial a last, partial group does not reach keeps its value): binary32 bits."""
    p = [np.float32(0.0)] * 4
    for jj, v in enumerate(np.asarray(vals, np.float32)):
        p[jj % 4] = nx.fadd(p[jj % 4], v)
    return [int(np.float32(x).view(np.uint32)) for x in p]


def _block(f, isum, d, mm, sumq, dx, last):
    code = {"q4_0": WeightFormat.Q4_0, "q4_1": WeightFormat.Q4_1, "q8_0": WeightFormat.Q8_0}
    return ScalerIn.const({
        "isum": int(isum), "d_w": int(np.float16(d).view(np.uint16)),
        "m_w": int(np.float16(mm).view(np.uint16)), "sumq": int(sumq),
        "d_x": int(np.float32(dx).view(np.uint32)), "fmt": code[f], "last": int(last)},
    ).as_value().value


def _rows(rng, lens, formats):
    """Random blocks in rows of ``lens``, then rows whose partials flush to -0.0; per row the
    expected partials (:func:`_partials`) and sum (nx.accum4 of nx.block_values), and the
    rows' lengths."""
    blocks, parts, sums = [], [], []
    f16s = np.array([0.0, -0.0, np.inf, np.nan, 2.0 ** -20, 2.0 ** -24, -(2.0 ** -15),
                     6.1e-5, 65504.0, -65504.0], np.float16)
    rows = []
    for ln in lens:
        f = str(rng.choice(formats))
        isum = rng.integers(-(1 << 20), 1 << 20, ln)          # the chain's exact range
        isum[rng.random(ln) < 0.1] = rng.choice([-(1 << 20), (1 << 20) - 1, 0, 1, -1])
        d = (rng.standard_normal(ln) * 0.02).astype(np.float16)
        mm = (-np.abs(rng.standard_normal(ln)) * 0.1).astype(np.float16)
        sel = rng.random(ln) < 0.05
        d[sel] = rng.choice(f16s, int(sel.sum()))
        sumq = rng.integers(-32 * 127, 32 * 127 + 1, ln)
        sumq[rng.random(ln) < 0.1] = rng.choice([-(1 << 12), (1 << 12) - 1, 0, -1])
        dx = (np.float32(10.0) ** rng.uniform(-6, 2, ln)).astype(np.float32)
        rows.append((f, isum, d, mm, sumq, dx))
    # isum * 2**-14 * 2**-114: 6 -> 1.5 * 2**-126, -7 -> -1.75 * 2**-126; a partial that took
    # one of each flushes to -0.0 and keeps it (the blocks after are -0.0 or +0.0)
    f = "q8_0" if "q8_0" in formats else formats[0]
    for ln in (1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13):
        isum = np.array([6] * 4 + [-7] * 4 + [0] * 5)[:ln]
        d = np.array([2.0 ** -14] * 8 + [-0.0, 0.0, -0.0, -0.0, 0.0], np.float16)[:ln]
        rows.append((f, isum, d, np.zeros(ln, np.float16), np.zeros(ln, np.int64),
                     np.full(ln, 2.0 ** -114, np.float32)))
    for f, isum, d, mm, sumq, dx in rows:
        ln = len(isum)
        with np.errstate(all="ignore"):
            vals = nx.block_values(f, isum.astype(np.int32), d, mm, dx, sumq.astype(np.int32))
            parts.append(_partials(vals))
            sums.append(int(nx.accum4(vals).view(np.uint32)))
        blocks += [_block(f, isum[jj], d[jj], mm[jj], sumq[jj], dx[jj], jj == ln - 1)
                   for jj in range(ln)]
    return blocks, parts, sums, [len(r[1]) for r in rows]


def _same(got, exp):
    """Equal bits, or both NaN (the hardware's NaN is canonical)."""
    g, e = np.array(got, np.uint32), np.array(exp, np.uint32)
    nan = np.isnan(g.view(np.float32)) & np.isnan(e.view(np.float32))
    return bool(np.all((g == e) | nan))


def _combine(parts):
    """fadd(fadd(p0, p1), fadd(p2, p3)) of binary32 bits."""
    p = [np.uint32(x).view(np.float32) for x in parts]
    with np.errstate(all="ignore"):
        return int(nx.fadd(nx.fadd(p[0], p[1]), nx.fadd(p[2], p[3])).view(np.uint32))


def _run(dut, items, *, bp, stall=0.0, seed=3):
    """Feed ``items`` (the input payloads, as ints) to ``dut.i`` and collect ``dut.o``'s
    payloads: (outputs, input cycles, output cycles). ``stall`` / ``bp``: the chance that the
    source holds back a beat / the sink is not ready in a cycle."""
    from amaranth.sim import Simulator
    got, t_in, t_out = [], [], []
    n_out = [None]

    async def bench(ctx):
        pr = np.random.default_rng(seed)
        bi, cyc = 0, 0
        while len(got) < n_out[0]:
            offer = bi < len(items) and pr.random() >= stall
            ctx.set(dut.i.valid, offer)
            if offer:
                ctx.set(dut.i.payload.as_value(), items[bi])
            rd = pr.random() >= bp
            ctx.set(dut.o.ready, rd)
            if offer and ctx.get(dut.i.ready):
                t_in.append(cyc)
                bi += 1
            if rd and ctx.get(dut.o.valid):
                got.append(ctx.get(dut.o.payload.as_value()))
                t_out.append(cyc)
            await ctx.tick()
            cyc += 1
            assert cyc < 20 * len(items) + 100

    def run(n):
        n_out[0] = n
        sim = Simulator(dut)
        sim.add_clock(1e-8)
        sim.add_testbench(bench)
        sim.run()
        return got, t_in, t_out
    return run


@pytest.mark.parametrize("formats", [("q4_0", "q4_1", "q8_0"), ("q4_0", "q8_0")])
@pytest.mark.parametrize("bp", [0.0, 0.5])
def test_scaler_short_rows_pysim(bp, formats):
    """Amaranth's simulator, the scaler alone: back-to-back rows of 1..6 blocks (and a few
    longer, and rows whose partials flush to -0.0) give accum4's four partials bit for bit
    (-0.0 kept, +0.0 for a partial the row never reached), with and without output
    back-pressure; the latency and, without back-pressure, one block per cycle whatever the
    row lengths."""
    rng = np.random.default_rng(11 + int(bp * 10))
    lens = [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 1, 3, 2, 4, 6, 1, 9, 2, 5, 1, 4, 3, 17, 1]
    dut = Scaler(formats=formats)
    blocks, parts, sums, row_lens = _rows(rng, lens, dut.formats)
    # the model's partials are accum4's: their combine is its row sum
    assert _same([_combine(pp) for pp in parts], sums)
    neg0 = sum(x == 0x80000000 for pp in parts for x in pp)
    assert neg0 >= 20, neg0                             # the -0.0 rows are there
    got, t_in, t_out = _run(dut, blocks, bp=bp)(len(parts))
    got = [[(g >> (32 * k)) & 0xFFFFFFFF for k in range(4)] for g in got]
    assert _same(got, parts), [(i, [hex(x) for x in g], [hex(x) for x in e])
                               for i, (g, e) in enumerate(zip(got, parts)) if not _same(g, e)][:3]
    if bp == 0.0:
        ends = np.cumsum(row_lens) - 1
        # 13 with Q4_1's minimum term (one more multiply-add level), 10 without
        assert dut.latency == (13 if "q4_1" in formats else 10)
        assert [t_out[k] - t_in[e] for k, e in enumerate(ends)] == [dut.latency] * len(ends)
        assert t_in == list(range(len(blocks)))         # one block per cycle, no throttle


def _partial_vectors(rng, n):
    """Random binary32 partials (never subnormal, as the scaler's) with signed zeros,
    infinities, NaNs, tiny values (sums that flush) and equal magnitudes of both signs."""
    edge = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x00800000, 0x80800000,
                     0x3F800000, 0xBF800000, 0x7F7FFFFF, 0xFF7FFFFF], np.uint32)
    v = rng.integers(0, 1 << 32, (n, 4), np.uint64).astype(np.uint32)
    v[(v & 0x7F800000) == 0] &= 0x80000000              # no subnormals: the scaler flushes them
    v[:, 1::2] = np.where(rng.random((n, 2)) < 0.2, v[:, 0::2] ^ 0x80000000, v[:, 1::2])
    pick = rng.random((n, 4)) < 0.3
    v[pick] = rng.choice(edge, int(pick.sum()))
    tiny = rng.random((n, 4)) < 0.1                     # normal, near 2**-126: sums flush
    v[tiny] = (rng.integers(0x00800000, 0x00A00000, int(tiny.sum())) |
               (rng.integers(0, 2, int(tiny.sum())) << 31)).astype(np.uint32)
    return v


@pytest.mark.parametrize("bp,stall", [(0.0, 0.0), (0.5, 0.0), (0.3, 0.3)])
def test_row_combine_pysim(bp, stall):
    """Amaranth's simulator, RowCombine alone: fadd(fadd(p0, p1), fadd(p2, p3)) bit for bit on
    random and special partials, the sideband with its row, one row per cycle with latency 6
    when nothing stalls, ``idle`` only when no row is inside."""
    from amaranth.lib import data
    rng = np.random.default_rng(5 + int(bp * 10) + int(stall * 100))
    n = 600
    v = _partial_vectors(rng, n)
    side = rng.integers(0, 1 << 24, n)
    layout = data.StructLayout({"p": Partials, "side": 24})
    items = [layout.const({"p": [int(x) for x in v[i]], "side": int(side[i])}).as_value().value
             for i in range(n)]
    dut = RowCombine(24)
    got, t_in, t_out = _run(dut, items, bp=bp, stall=stall, seed=9)(n)
    sums = [g & 0xFFFFFFFF for g in got]
    assert _same(sums, [_combine(v[i]) for i in range(n)])
    assert [g >> 32 for g in got] == [int(x) for x in side]
    if bp == 0.0 and stall == 0.0:
        assert t_in == list(range(n))
        assert [o - i for i, o in zip(t_in, t_out)] == [RowCombine.latency] * n


def test_row_combine_idle_pysim():
    """``idle`` falls the cycle after a row enters and rises once its sum has been read, also
    while the output waits for ready."""
    from amaranth.sim import Simulator
    dut = RowCombine(8)
    trace = []

    async def bench(ctx):
        assert ctx.get(dut.idle)
        ctx.set(dut.i.valid, 1)
        ctx.set(dut.i.payload.p.as_value(), 0x3F800000_3F800000_3F800000_3F800000)
        ctx.set(dut.i.payload.side, 7)
        await ctx.tick()
        ctx.set(dut.i.valid, 0)
        for _ in range(12):                               # output held: not ready
            trace.append((ctx.get(dut.idle), ctx.get(dut.o.valid)))
            await ctx.tick()
        assert ctx.get(dut.o.payload.sum) == 0x40800000   # 4.0
        assert ctx.get(dut.o.payload.side) == 7
        ctx.set(dut.o.ready, 1)
        await ctx.tick()
        ctx.set(dut.o.ready, 0)
        trace.append((ctx.get(dut.idle), ctx.get(dut.o.valid)))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert trace[-1] == (1, 0)
    assert all(t == (0, 0) for t in trace[:5]) and all(t == (0, 1) for t in trace[5:12]), trace
