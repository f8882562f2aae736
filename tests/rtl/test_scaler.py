"""hw/scaler.py under Verilator against core.numerics.block_values + accum4."""

from pathlib import Path

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.hw.scaler import Scaler, ScalerIn, units
from llmfab.sim.rtl.runner import run_cocotb, to_verilog

from tb import soak  # noqa: E402  (tests/rtl is on sys.path)
from test_fp import verilator_lint  # noqa: E402



@soak(12_000)
def test_scaler(vectors):
    """``vectors`` random blocks in rows (1,000, or 12,000 under slow), single blocks, throughput."""
    cfg = load_config("ci")
    unit = units(cfg)["scaler"]
    run_cocotb(to_verilog(unit, "scaler"), "scaler", "cocotb_scaler",
               module_dir=Path(__file__).parent,
               extra_env={"S_FORMATS": ",".join(unit.formats), "S_N": str(vectors)})


def test_formats_validated():
    with pytest.raises(ValueError, match="weight format must be"):
        Scaler(formats=("q4_k",))


@pytest.mark.parametrize("formats", [("q4_0", "q4_1", "q8_0"), ("q4_0", "q8_0")])
def test_scaler_lint(formats, tmp_path):
    assert verilator_lint(to_verilog(Scaler(formats=formats), "scaler"), "scaler", tmp_path) == ""


def _rows(rng, lens, formats):
    """Random blocks in rows of ``lens``; the expected row sums (nx.block_values + accum4)."""
    from llmfab.core import numerics as nx
    from llmfab.hw.scaler import WeightFormat
    code = {"q4_0": WeightFormat.Q4_0, "q4_1": WeightFormat.Q4_1, "q8_0": WeightFormat.Q8_0}
    blocks, exp = [], []
    f16s = np.array([0.0, -0.0, np.inf, np.nan, 2.0 ** -20, 2.0 ** -24, -(2.0 ** -15),
                     6.1e-5, 65504.0, -65504.0], np.float16)
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
        with np.errstate(all="ignore"):
            vals = nx.block_values(f, isum.astype(np.int32), d, mm, dx, sumq.astype(np.int32))
            exp.append(int(nx.accum4(vals).view(np.uint32)))
        for jj in range(ln):
            blocks.append(ScalerIn.const({
                "isum": int(isum[jj]), "d_w": int(d[jj:jj + 1].view(np.uint16)[0]),
                "m_w": int(mm[jj:jj + 1].view(np.uint16)[0]), "sumq": int(sumq[jj]),
                "d_x": int(dx[jj:jj + 1].view(np.uint32)[0]), "fmt": code[f],
                "last": int(jj == ln - 1)}).as_value().value)
    return blocks, exp


def _same(got, exp):
    g, e = np.array(got, np.uint32), np.array(exp, np.uint32)
    nan = np.isnan(g.view(np.float32)) & np.isnan(e.view(np.float32))
    return bool(np.all((g == e) | nan))


@pytest.mark.parametrize("formats", [("q4_0", "q4_1", "q8_0"), ("q4_0", "q8_0")])
@pytest.mark.parametrize("bp", [0.0, 0.5])
def test_scaler_short_rows_pysim(bp, formats):
    """Amaranth's simulator: back-to-back rows of 1..6 blocks (and a few longer) against the
    spec, with and without output back-pressure; the latency and, without back-pressure,
    the input cycles the rows take (the row-end throttle: see docs/hw-fp.md)."""
    from amaranth.sim import Simulator
    rng = np.random.default_rng(11 + int(bp * 10))
    lens = [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 1, 3, 2, 4, 6, 1, 9, 2, 5, 1, 4, 3, 17, 1]
    dut = Scaler(formats=formats)
    blocks, exp = _rows(rng, lens, dut.formats)
    got, t_in, t_out = [], [], []

    async def bench(ctx):
        pr = np.random.default_rng(3)
        bi, cyc = 0, 0
        while len(got) < len(exp):
            ctx.set(dut.i.valid, bi < len(blocks))
            if bi < len(blocks):
                ctx.set(dut.i.payload.as_value(), blocks[bi])
            rd = pr.random() >= bp
            ctx.set(dut.o.ready, rd)
            if bi < len(blocks) and ctx.get(dut.i.ready):
                t_in.append(cyc)
                bi += 1
            if rd and ctx.get(dut.o.valid):
                got.append(ctx.get(dut.o.payload))
                t_out.append(cyc)
            await ctx.tick()
            cyc += 1
            assert cyc < 20 * len(blocks) + 100

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert _same(got, exp), [(hex(g), hex(e)) for g, e in zip(got, exp) if g != e][:4]
    ends = np.cumsum(lens) - 1
    if bp == 0.0:
        # 19 with Q4_1's minimum term (one more multiply-add level), 16 without
        assert t_out[0] - t_in[ends[0]] == dut.latency == (19 if "q4_1" in formats else 16)
        # a last block enters only when no other last block is 1, 3 or 4 stages in
        t_end = np.array(t_in)[ends]
        gaps = np.diff(t_end)
        assert not np.isin(gaps, [1, 3, 4]).any(), gaps
        # ... and waits no longer than that: each gap is the least allowed one
        for k in range(1, len(ends)):
            free = t_in[ends[k] - 1] + 1 if lens[k] > 1 else t_end[k - 1] + 1
            want = free
            while any(want - t in (1, 3, 4) for t in t_end[:k]):
                want += 1
            assert t_end[k] == want, (k, t_end[k], want)


def test_fadd_commutative_pysim():
    """The final sum adds the row's two pair sums in either order: FAddCore gives the same
    bits for a + b and b + a (signed zeros, infinities, NaNs, equal magnitudes)."""
    from amaranth.sim import Simulator
    from llmfab.hw.fp import FAddCore
    rng = np.random.default_rng(7)
    edge = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x00800000, 0x80800000,
                     0x00000001, 0x3F800000, 0xBF800000, 0x7F7FFFFF, 0xFF7FFFFF], np.uint32)
    a = np.concatenate([np.repeat(edge, len(edge)), rng.integers(0, 1 << 32, 600, np.uint64)
                        .astype(np.uint32)])
    b = np.concatenate([np.tile(edge, len(edge)), rng.integers(0, 1 << 32, 600, np.uint64)
                        .astype(np.uint32)])
    b[-200:] = a[-200:] ^ 0x80000000                    # x + (-x)
    b[-300:-200] = a[-300:-200] ^ rng.integers(0, 4, 100).astype(np.uint32)
    core = FAddCore()
    out = []

    async def bench(ctx):
        ctx.set(core.ce, 1)
        pairs = list(zip(a, b)) + list(zip(b, a))
        for i in range(len(pairs) + core.latency):
            if i < len(pairs):
                ctx.set(core.a, int(pairs[i][0]))
                ctx.set(core.b, int(pairs[i][1]))
            await ctx.tick()
            if i + 1 >= core.latency:
                out.append(ctx.get(core.o))

    sim = Simulator(core)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    n = len(a)
    assert out[:n] == out[n:2 * n]
