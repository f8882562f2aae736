"""hw/fp.py under Verilator: fp_add, fp_mul and fp_cvt in one build, checked against core.numerics."""

import os
import subprocess
from pathlib import Path

import numpy as np

from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from llmfab.hw import fp
from llmfab.sim.rtl.runner import VERILATOR_ARGS, run_cocotb, to_verilog, verilator_env

from tb import soak

#: Beyond the runner's waivers, -Wall flags two things of Amaranth's Verilog style:
#: ``reg x = init;`` assigned in ``always`` (PROCASSINIT), FSM ``case``s without default.
LINT_WAIVERS = ("-Wno-PROCASSINIT", "-Wno-CASEINCOMPLETE")


def verilator_lint(verilog: str, top: str, tmp_path) -> str:
    """Warnings of ``verilator --lint-only -Wall`` (runner's and LINT_WAIVERS waived); "" if clean."""
    root = verilator_env()
    src = Path(tmp_path) / f"{top}.v"
    src.write_text(verilog)
    waived = [a for a in VERILATOR_ARGS if a.startswith("-Wno-") and a != "-Wno-fatal"]
    r = subprocess.run([os.path.join(root, "bin", "verilator"), "--lint-only", "-Wall", *waived,
                        *LINT_WAIVERS, "--top-module", top, str(src)],
                       capture_output=True, text=True)
    return "\n".join(line for line in (r.stdout + r.stderr).splitlines() if line.startswith("%"))


class FpTop(wiring.Component):
    """The three float stream units side by side (one Verilator build for all)."""

    def __init__(self):
        super().__init__({
            "add_i": In(stream.Signature(fp.FAddOperands)), "add_o": Out(stream.Signature(32)),
            "mul_i": In(stream.Signature(fp.FMulOperands)), "mul_o": Out(stream.Signature(32)),
            "cvt_i": In(stream.Signature(fp.CvtOperands)), "cvt_o": Out(stream.Signature(32)),
        })

    def elaborate(self, platform):
        m = Module()
        for name, unit in fp.units(None).items():
            short = name.split("_")[1]
            m.submodules[name] = unit
            wiring.connect(m, wiring.flipped(getattr(self, f"{short}_i")), unit.i)
            wiring.connect(m, unit.o, wiring.flipped(getattr(self, f"{short}_o")))
        return m


@soak(12_000)
def test_fp_units(vectors):
    """``vectors`` operand pairs per unit (1,000, or 12,000 under slow), then throughput."""
    run_cocotb(to_verilog(FpTop(), "fp_top"), "fp_top", "cocotb_fp",
               module_dir=Path(__file__).parent, extra_env={"FP_N": str(vectors)})


def test_fp_lint(tmp_path):
    for name, unit in fp.units(None).items():
        assert verilator_lint(to_verilog(unit, name), name, tmp_path) == "", name


# ---- FAddCore's own corner cases (Amaranth simulator, bit for bit against core.numerics) ----

def _fadd_corner_vectors(rng):
    """Operand patterns aimed at FAddCore's structure: cancellation to every leading-zero
    count it can see, every exponent difference 0..34 in both orders, RNE ties (ties to
    even and to odd, carrying into the exponent), results that flush, overflow at the top."""
    U64 = np.uint64

    def pat(s, e, f):
        return ((np.asarray(s, U64) << U64(31)) | (np.asarray(e, U64) << U64(23))
                | np.asarray(f, U64))

    a, b, sub = [], [], []

    def add(x, y, s):
        a.append(np.asarray(x, U64)), b.append(np.asarray(y, U64))
        sub.append(np.broadcast_to(np.asarray(s), np.shape(x)).astype(np.int64))

    k = 64
    # cancellation: b = a - delta (same exponent or one below), delta of every bit length
    for bl in range(0, 25):
        e = rng.integers(2, 254, k)
        f = rng.integers(0, 1 << 23, k)
        delta = (np.int64(1) << bl) | rng.integers(0, 1 << max(bl, 1), k) & ((1 << bl) - 1) \
            if bl else np.ones(k, np.int64)
        x = pat(0, e, f).astype(np.int64)
        y = np.clip(x - delta, 1 << 23, None)
        s = rng.integers(0, 2, k)
        add(x | (s << 31), y | (s << 31), 1)               # same signs, subtract
        add(x | (s << 31), y | ((1 - s) << 31), 0)         # opposite signs, add
    # the same across an exponent boundary (d = 1, the deepest cancellation: count 25)
    e = rng.integers(2, 254, k)
    x = pat(0, e, rng.integers(0, 4, k)).astype(np.int64)
    add(x, x - rng.integers(1, 9, k), 1)
    # every exponent difference, both orders, add and subtract
    for dd in range(0, 35):
        e = rng.integers(dd + 1, 255, k)
        x = pat(rng.integers(0, 2, k), e, rng.integers(0, 1 << 23, k))
        y = pat(rng.integers(0, 2, k), e - dd, rng.integers(0, 1 << 23, k))
        s = rng.integers(0, 2, k)
        add(x, y, s), add(y, x, s)
    # ties: the smaller operand is half an ulp of the larger (d = 24; 3/4 of one for d = 25),
    # larger significands even and odd, all-ones ones carrying into the exponent
    for dd in (24, 25):
        e = rng.integers(dd + 1, 255, 4 * k)
        f = rng.integers(0, 1 << 23, 4 * k)
        f[:k] = (1 << 23) - 1
        x = pat(0, e, f)
        y = pat(0, e - dd, 0 if dd == 24 else 1 << 22)
        add(x, y, 0), add(x, y, 1), add(y, x, 0)
    e = rng.integers(2, 254, 2 * k)                          # ties between same-exponent halves
    f = rng.integers(0, 1 << 23, 2 * k) | 1
    add(pat(0, e, f), pat(0, e, f ^ 1), 0)                   # d = 0: odd sums carry, a tie
    add(pat(0, e, f), pat(0, e - 1, f), 0)                   # d = 1: guard bit set
    # results below 2**-126 (flushed) and just above, signs mixed
    e = rng.integers(1, 4, 8 * k)
    x = pat(rng.integers(0, 2, 8 * k), e, rng.integers(0, 1 << 23, 8 * k))
    y = pat(rng.integers(0, 2, 8 * k), e + rng.integers(-1, 2, 8 * k).clip(1 - e, None),
            rng.integers(0, 1 << 23, 8 * k))
    add(x, y, rng.integers(0, 2, 8 * k))
    # the top of the range: overflow to inf, the largest finite value, a tie that overflows
    e = rng.integers(250, 255, 4 * k)
    x = pat(rng.integers(0, 2, 4 * k), e, rng.integers(0, 1 << 23, 4 * k))
    y = pat(rng.integers(0, 2, 4 * k), np.minimum(e + rng.integers(-2, 3, 4 * k), 254),
            rng.integers(0, 1 << 23, 4 * k))
    add(x, y, rng.integers(0, 2, 4 * k))
    add([0x7F7FFFFF, 0x7F7FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7FFFFE],
        [0x73000000, 0x72FFFFFF, 0x73000001, 0xF3000000, 0x73000000], 0)
    a, b, sub = (np.concatenate(v) for v in (a, b, sub))
    return a.astype(np.uint32), b.astype(np.uint32), sub


def _pre_round_count(a, b, sub):
    """FAddCore's leading-zero count of the 28-bit sum (1 + the larger operand's exponent -
    the exact result's exponent) where float64 holds the sum exactly, else -1."""
    from llmfab.core import numerics as nx  # noqa: F401
    from cocotb_fp import floats, flush_in
    fa = floats(flush_in(a)).astype(np.float64)
    fb = floats(flush_in(b)).astype(np.float64)
    ea, eb = (a >> 23) & 0xFF, (b >> 23) & 0xFF
    exact = np.where(sub == 1, fa - fb, fa + fb)
    ok = (np.abs(ea.astype(np.int64) - eb) <= 28) & (ea > 0) & (eb > 0) & (ea < 255) \
        & (eb < 255) & (exact != 0)
    big = np.maximum(np.abs(fa), np.abs(fb))
    _, e_big = np.frexp(np.where(ok, big, 1.0))
    _, e_res = np.frexp(np.where(ok, exact, 1.0))
    return np.where(ok, e_big.astype(np.int64) - e_res + 1, -1)


def test_fadd_core_corners_pysim():
    """FAddCore alone in Amaranth's simulator, ``ce`` low on a random 20% of the cycles:
    bit-exact to nx.fadd/nx.fsub on its corner cases, which reach every leading-zero count
    the adder can produce (0..25: with a 0 or 1 exponent difference the sum's two low bits
    are zero, with a larger one it loses at most one bit), every exponent difference, RNE
    ties, flushed results and overflow."""
    from amaranth.sim import Simulator
    from llmfab.core import numerics as nx
    from llmfab.hw.fp import FAddCore
    from cocotb_fp import bits, check, floats, flush_in

    rng = np.random.default_rng(11)
    a, b, sub = _fadd_corner_vectors(rng)
    with np.errstate(all="ignore"):
        fa, fb = floats(flush_in(a)), floats(flush_in(b))
        want = bits(np.where(sub == 1, nx.fsub(fa, fb), nx.fadd(fa, fb)))
        lz = _pre_round_count(a, b, sub)
        exact = np.where(sub == 1, fa.astype(np.float64) - fb, fa.astype(np.float64) + fb)
        got_f = floats(want).astype(np.float64)
        ulp = np.spacing(np.abs(floats(want))).astype(np.float64)
        tie = np.isfinite(got_f) & (got_f != 0) & (np.abs(exact - got_f) == ulp / 2)
    assert set(range(26)) <= set(lz.tolist()), sorted(set(range(26)) - set(lz.tolist()))
    assert np.count_nonzero(tie) >= 200
    assert np.count_nonzero((exact != 0) & (np.abs(exact) < 2.0 ** -126)) >= 100
    assert np.count_nonzero(np.isinf(floats(want)) & np.isfinite(fa) & np.isfinite(fb)) >= 20

    core = FAddCore()
    ces = rng.random(2 * len(a) + 16) >= 0.2
    out = []

    async def bench(ctx):
        pipe = [None] * core.latency        # which operand is in each stage
        i = c = 0
        while len(out) < len(a):
            ce = bool(ces[c])
            c += 1
            cur = i if i < len(a) else None
            ctx.set(core.ce, ce)
            if cur is not None:
                ctx.set(core.a, int(a[i]))
                ctx.set(core.b, int(b[i]))
                ctx.set(core.sub, int(sub[i]))
            await ctx.tick()
            if ce:
                pipe = [cur] + pipe[:-1]
                i += cur is not None
                if pipe[-1] is not None:
                    out.append((pipe[-1], ctx.get(core.o)))

    sim = Simulator(core)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert [k for k, _ in out] == list(range(len(a)))
    check("FAddCore", np.array([v for _, v in out], np.uint32), want, (a, b, sub))


def test_lzc_tree_pysim():
    """lzc_tree against the counting definition: every one-hot and random 28-bit values."""
    from amaranth.sim import Simulator
    from llmfab.hw.fp import lzc_tree
    rng = np.random.default_rng(3)
    vals = [0] + [1 << i for i in range(28)] + [int(v) >> int(s) for v, s in zip(
        rng.integers(0, 1 << 28, 400), rng.integers(0, 28, 400))]
    m = Module()
    x = Signal(28)
    count, zero = lzc_tree(x)
    cs, zs = Signal(len(count)), Signal()
    m.d.comb += [cs.eq(count), zs.eq(zero)]

    async def bench(ctx):
        for v in vals:
            ctx.set(x, v)
            assert ctx.get(zs) == (v == 0), v
            if v:
                assert ctx.get(cs) == 28 - v.bit_length(), v

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
