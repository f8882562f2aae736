"""cocotb tests of hw/scaler.py against core.numerics.block_values + accum4, bit for bit."""

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
    isum[:k] = rng.integers(-(1 << 24) + 1, 1 << 24, k)             # full exact range
    isum[k:k + k // 4] = 0
    d = f16_bits((rng.standard_normal(n) * 0.02).astype(np.float16))
    d[k:2 * k] = rng.integers(0, 1 << 16, k)                       # any fp16 (subnormal, inf, NaN)
    mm = f16_bits((-np.abs(rng.standard_normal(n)) * 0.1).astype(np.float16))
    mm[2 * k:3 * k] = rng.integers(0, 1 << 16, k)
    sumq = rng.integers(-32 * 127, 32 * 127 + 1, n)
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


def make_rows(rng, n):
    """Split n random blocks into rows of 1..40 (some longer), plus the zero-sign rows."""
    fmt, isum, d, mm, sumq, dx = make_blocks(rng, n)
    lens = []
    left = n
    while left:
        ln = int(min(left, rng.choice([rng.integers(1, 9), rng.integers(1, 41), 200],
                                          p=[0.45, 0.5, 0.05])))
        lens.append(ln)
        left -= ln
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
    for isum_, d_, dx_ in zero_sign_rows():
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
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 2)
    rows = make_rows(rng, 2000)
    pays, exp = payloads_and_expected(rows)
    outs, src, snk = await tb.run_stream("i", "o", pays, layout=ScalerIn, stall=0.0, bp=0.0,
                                         seed=SEED, n_out=len(rows))
    check("scaler (no stalls)", outs, exp)
    tp = throughput(src.times)
    lat = (snk.times[0] - src.times[len(rows[0][0]) - 1]) / 10
    dut._log.info("scaler: %.3f blocks/cycle in steady state; a row's sum comes %d cycles "
                  "after its last block", tp, lat)
    assert tp == 1.0, tp
