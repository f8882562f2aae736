"""cocotb tests of hw/scaler.py against core.numerics.block_values + accum4, bit for bit.

The design is a Scaler and a RowCombine in a row (test_scaler.py's ``ScalerSum``): blocks in,
row sums out, the path of one MV lane's rows."""

import os

import cocotb
import numpy as np

from llmfab.hw.scaler import ScalerIn, WeightFormat
from llmfab.core import numerics as nx

from cocotb_fp import bits, check, floats
from tb import TB, throughput

N = int(os.environ.get("S_N", "12000"))       # blocks
SEED = int(os.environ.get("S_SEED", "5"))
FORMATS = os.environ.get("S_FORMATS", "q4_0,q4_1,q8_0").split(",")
FMT = {"q4_0": WeightFormat.Q4_0, "q4_1": WeightFormat.Q4_1, "q8_0": WeightFormat.Q8_0}


def f16_bits(x):
    return np.asarray(x, np.float16).view(np.uint16)


def make_blocks(rng, n):
    """Realistic and extreme blocks: isum, d_w, m_w (fp16 bits), sumq, d_x (fp32), format."""
    fmt = rng.choice(FORMATS, n)
    isum = np.where(np.isin(fmt, ["q8_0"]), rng.integers(-520192, 520193, n),
                    rng.integers(-32512, 32513, n)).astype(np.int64)
    k = n // 8
    isum[:k] = rng.integers(-(1 << 20), 1 << 20, k)                 # the chain's range (21 bits)
    isum[k:k + k // 4] = 0
    edge = rng.random(n) < 0.03                                      # its ends
    isum[edge] = rng.choice([-(1 << 20), (1 << 20) - 1, -(1 << 20) + 1, 1 << 19], int(edge.sum()))
    d = f16_bits((rng.standard_normal(n) * 0.02).astype(np.float16))
    d[k:2 * k] = rng.integers(0, 1 << 16, k)                       # any fp16 (subnormal, inf, NaN)
    mm = f16_bits((-np.abs(rng.standard_normal(n)) * 0.1).astype(np.float16))
    mm[2 * k:3 * k] = rng.integers(0, 1 << 16, k)
    sumq = rng.integers(-32 * 127, 32 * 127 + 1, n)
    edge = rng.random(n) < 0.03                                      # the 13-bit range's ends
    sumq[edge] = rng.choice([-(1 << 12), (1 << 12) - 1, -1, 1], int(edge.sum()))
    sub = rng.random(n) < 0.03                                       # fp16 subnormal scales
    d[sub] = rng.integers(1, 1 << 10, int(sub.sum())) | (rng.integers(0, 2, int(sub.sum())) << 15)
    sub = rng.random(n) < 0.03
    mm[sub] = rng.integers(1, 1 << 10, int(sub.sum())) | (rng.integers(0, 2, int(sub.sum())) << 15)
    dx = (np.float32(10.0) ** rng.uniform(-6, 2, n).astype(np.float32)).astype(np.float32)
    dx[3 * k:4 * k] = floats(rng.integers(0x00800000, 0x7F800000, k).astype(np.uint32))
    dx[4 * k:4 * k + 16] = 0.0
    return fmt, isum, d, mm, sumq, dx


def value(fmt, isum, d, mm, dx, sumq):
    out = np.empty(len(fmt), np.float32)
    for f in set(fmt):
        sel = fmt == f
        out[sel] = nx.block_values(f, isum[sel].astype(np.int32), d[sel].view(np.float16),
                                   mm[sel].view(np.float16), dx[sel], sumq[sel].astype(np.int32))
    return out


def zero_sign_rows():
    """Rows whose partials flush to -0.0: with no padding of a last, partial group they keep
    their sign (nx.accum4), which decides the sign of a zero row sum."""
    rows = []
    d = f16_bits(np.float16(2.0 ** -14))
    dx = np.float32(2.0 ** -114)           # isum * 2**-128: 6 -> 1.5*2**-126, -7 -> -1.75*2**-126
    nz = f16_bits(np.float16(-0.0))
    for length in range(5, 14):
        isum, dd = [], []
        for jj in range(length):
            if jj < 4:
                isum.append(6); dd.append(d)
            elif jj < 8:
                isum.append(-7); dd.append(d)
            else:
                isum.append(0); dd.append(nz)
        rows.append((np.array(isum), np.array(dd, np.uint16), np.full(length, dx, np.float32)))
    return rows


def row_lengths(rng, n):
    """Rows of 1..40 blocks (some of 200) holding n blocks in all."""
    lens, left = [], n
    while left:
        ln = int(min(left, rng.choice([rng.integers(1, 9), rng.integers(1, 41), 200],
                                          p=[0.45, 0.5, 0.05])))
        lens.append(ln)
        left -= ln
    return lens


def make_rows(rng, n, lens=None, zero_sign=True):
    """Split n random blocks into rows (``lens``, or :func:`row_lengths`), plus the zero-sign
    rows."""
    fmt, isum, d, mm, sumq, dx = make_blocks(rng, n)
    lens = row_lengths(rng, n) if lens is None else list(lens)
    assert sum(lens) == n
    rows = []
    pos = 0
    for ln in lens:
        sl = slice(pos, pos + ln)
        f = fmt[sl]
        if rng.random() < 0.8:                      # usually one format per row
            f = np.full(ln, f[0])
        rows.append((f, isum[sl], d[sl], mm[sl], sumq[sl], dx[sl]))
        pos += ln
    fz = FORMATS[0] if "q4_1" not in FORMATS else "q8_0"
    for isum_, d_, dx_ in (zero_sign_rows() if zero_sign else []):
        ln = len(isum_)
        rows.append((np.full(ln, fz), isum_, d_, np.zeros(ln, np.uint16), np.zeros(ln, np.int64), dx_))
    return rows


def payloads_and_expected(rows):
    pays, exp, vals_all = [], [], []
    for f, isum, d, mm, sumq, dx in rows:
        with np.errstate(all="ignore"):
            vals = value(f, isum, d, mm, dx, sumq)
            exp.append(nx.accum4(vals))
        for jj in range(len(f)):
            pays.append({"isum": int(isum[jj]), "d_w": int(d[jj]), "m_w": int(mm[jj]),
                         "sumq": int(sumq[jj]), "d_x": int(bits(dx[jj])),
                         "fmt": FMT[str(f[jj])].value, "last": int(jj == len(f) - 1)})
    return pays, bits(np.array(exp, np.float32))


@cocotb.test()
async def scaler_rows(dut):
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED)
    rows = make_rows(rng, N)
    pays, exp = payloads_and_expected(rows)
    outs, src, snk = await tb.run_stream("i", "o", pays, layout=ScalerIn, stall=0.3, bp=0.3,
                                         seed=SEED, n_out=len(rows))
    check("scaler rows", outs, exp, log=dut._log)
    dut._log.info("scaler: %d blocks in %d rows (formats %s) bit-exact", len(pays), len(rows),
                  ",".join(FORMATS))


@cocotb.test()
async def scaler_single_blocks(dut):
    """Rows of one block: the row sum is fadd(v, +0) = the block value (up to -0 -> +0)."""
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 1)
    fmt, isum, d, mm, sumq, dx = make_blocks(rng, 3000)
    rows = [(fmt[i:i + 1], isum[i:i + 1], d[i:i + 1], mm[i:i + 1], sumq[i:i + 1], dx[i:i + 1])
            for i in range(len(fmt))]
    pays, exp = payloads_and_expected(rows)
    outs, src, snk = await tb.run_stream("i", "o", pays, layout=ScalerIn, stall=0.2, bp=0.2,
                                         seed=SEED, n_out=len(rows))
    check("scaler block values", outs, exp, log=dut._log)


@cocotb.test()
async def scaler_throughput(dut):
    """Rows of 5 blocks or more follow each other at one block per cycle; a row's sum
    comes 19 cycles after its last block (13 in the scaler, 6 in the combine)."""
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 2)
    lens = [int(x) for x in rng.choice([5, 6, 7, 8, 9, 12, 18, 33, 40, 200], 80)]
    rows = make_rows(rng, sum(lens), lens, zero_sign=False)
    pays, exp = payloads_and_expected(rows)
    outs, src, snk = await tb.run_stream("i", "o", pays, layout=ScalerIn, stall=0.0, bp=0.0,
                                         seed=SEED, n_out=len(rows))
    check("scaler (no stalls)", outs, exp)
    tp = throughput(src.times)
    lat = (snk.times[0] - src.times[len(rows[0][0]) - 1]) / 10
    dut._log.info("scaler: %.3f blocks/cycle in steady state; a row's sum comes %d cycles "
                  "after its last block", tp, lat)
    assert tp == 1.0, tp
    assert lat == 19, lat


#: Cycles per row of nb blocks, rows back to back (no stalls): one block per cycle whatever
#: the row length (the scaler hands each row's partials on; the combine takes one row a
#: cycle).
SHORT_ROW_CYCLES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 18: 18}


@cocotb.test()
async def scaler_short_rows(dut):
    """Rows of nb = 1..8 and 18 blocks back to back: cycles per row, bit-exact sums."""
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 3)
    got = {}
    for nb, want in SHORT_ROW_CYCLES.items():
        n_rows = 41
        rows = make_rows(rng, nb * n_rows, [nb] * n_rows, zero_sign=False)
        pays, exp = payloads_and_expected(rows)
        outs, src, snk = await tb.run_stream("i", "o", pays, layout=ScalerIn, stall=0.0,
                                             bp=0.0, seed=SEED + nb, n_out=len(rows))
        check(f"scaler rows of {nb}", outs, exp)
        ends = src.times[nb - 1::nb]                 # the rows' last blocks
        got[nb] = round((ends[-1] - ends[0]) / 10) / (n_rows - 1)
        await tb.cycles(30)
    dut._log.info("scaler: cycles per row of nb blocks, back to back: %s",
                  ", ".join(f"{k}: {v:g}" for k, v in got.items()))
    assert got == SHORT_ROW_CYCLES, got


@cocotb.test()
@cocotb.parametrize(traffic=[(0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.0, 0.9), (0.3, 0.3)])
async def scaler_mixed_short_rows(dut, traffic):
    """Back-to-back rows of random lengths 1..6 (some longer): every distance between two
    rows' ends, with and without input stalls and output back-pressure."""
    stall, bp = traffic
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 4 + int(stall * 10) + int(bp * 100))
    lens = [int(x) for x in np.where(rng.random(400) < 0.9, rng.integers(1, 7, 400),
                                     rng.integers(7, 20, 400))]
    rows = make_rows(rng, sum(lens), lens)
    pays, exp = payloads_and_expected(rows)
    outs, src, snk = await tb.run_stream("i", "o", pays, layout=ScalerIn, stall=stall, bp=bp,
                                         seed=SEED + 7, n_out=len(rows))
    check(f"scaler short rows (stall {stall}, back-pressure {bp})", outs, exp, log=dut._log)


def special_rows(rng, n_rows):
    """Rows of 1..9 blocks with signed zeros, infinities and NaNs in d_w, m_w and d_x, and
    block values that overflow (partials of +inf and -inf: a NaN row sum)."""
    f16_specials = f16_bits(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, -65504.0,
                                      2.0 ** -24, -(2.0 ** -24), 1.0, -1.0, 2.0 ** -15,
                                      -6.0975552e-05, 6.1035156e-05], np.float16))
    f32_specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38,
                             1.1754944e-38, -1.1754944e-38, 1.0, -2.5], np.float32)
    rows = []
    for _ in range(n_rows):
        ln = int(rng.integers(1, 10))
        fmt, isum, d, mm, sumq, dx = make_blocks(rng, ln)
        if rng.random() < 0.8:
            fmt = np.full(ln, fmt[0])
        for arr, pool in ((d, f16_specials), (mm, f16_specials), (dx, f32_specials)):
            sel = rng.random(ln) < 0.1
            arr[sel] = rng.choice(pool, int(sel.sum()))
        big = rng.random(ln) < 0.15                    # |value| overflows to inf
        isum[big] = rng.choice([-(1 << 20), (1 << 20) - 1], int(big.sum()))
        d[big] = f16_bits(np.float16(65504.0))
        dx[big] = np.float32(3.4028235e38)
        isum[rng.random(ln) < 0.15] = 0
        sumq[rng.random(ln) < 0.15] = 0
        rows.append((fmt, isum, d, mm, sumq, dx))
    return rows


@cocotb.test()
async def scaler_specials(dut):
    """Signed zeros, infinities, NaNs and overflow in short and long rows."""
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 5)
    rows = special_rows(rng, 600)
    pays, exp = payloads_and_expected(rows)
    outs, src, snk = await tb.run_stream("i", "o", pays, layout=ScalerIn, stall=0.2, bp=0.2,
                                         seed=SEED, n_out=len(rows))
    ev = floats(exp)
    check("scaler specials", outs, exp, log=dut._log)
    dut._log.info("scaler specials: %d rows, %d NaN, %d infinite, %d zero (%d -0.0) sums",
                  len(rows), np.isnan(ev).sum(), np.isinf(ev).sum(), (ev == 0).sum(),
                  ((ev == 0) & np.signbit(ev)).sum())
