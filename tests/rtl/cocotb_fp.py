"""cocotb tests of hw/fp.py (fp_add, fp_mul, fp_cvt) against core.numerics, bit for bit.

Also holds the float-vector generators and the comparison helper the other
float-unit tests import (cocotb_quantizer, cocotb_scaler, cocotb_sfu).
"""

import os

import cocotb
import numpy as np

from llmfab.hw.fp import CvtOp, CvtOperands, FAddOperands, FMulOperands
from llmfab.core import numerics as nx

from tb import TB, throughput

N = int(os.environ.get("FP_N", "12000"))
SEED = int(os.environ.get("FP_SEED", "1"))
STALL = 0.3

U32 = np.uint32
EDGE = np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001,
                 0x7F800001, 0x00800000, 0x80800000, 0x00800001, 0x00FFFFFF, 0x7F7FFFFF,
                 0xFF7FFFFF, 0x3F800000, 0xBF800000, 0x3F800001, 0x3FFFFFFF, 0x40000000,
                 0x00000001, 0x807FFFFF, 0x33800000, 0x4B800000, 0x7F000000, 0x01000000,
                 0x1F800000, 0x5F800000, 0x3F000000, 0x3FC00000], dtype=U32)


# ---- generators (shared) -------------------------------------------------------------------

def bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(U32)


def floats(b) -> np.ndarray:
    return np.asarray(b, dtype=U32).view(np.float32)


def make(rng, sign, exp, frac) -> np.ndarray:
    """Bit patterns from fields (arrays)."""
    return ((np.asarray(sign, np.uint64) << 31) | (np.asarray(exp, np.uint64) << 23)
            | np.asarray(frac, np.uint64)).astype(U32)


def rand_normal(rng, n, emin=1, emax=254) -> np.ndarray:
    """Random normal binary32 patterns with biased exponent in [emin, emax]."""
    return make(rng, rng.integers(0, 2, n), rng.integers(emin, emax + 1, n),
                rng.integers(0, 1 << 23, n))


def rand_mixed(rng, n) -> np.ndarray:
    """Normals of every exponent, moderate exponents, short significands (for ties), specials."""
    k = n // 4
    parts = [
        rand_normal(rng, k),
        rand_normal(rng, k, 100, 154),
        make(rng, rng.integers(0, 2, k), rng.integers(110, 145, k),
             rng.integers(0, 1 << 12, k) << 11),
        rng.choice(EDGE, n - 3 * k),
    ]
    out = np.concatenate(parts)
    rng.shuffle(out)
    return out


def flush_in(b) -> np.ndarray:
    """Inputs as the hardware reads them: a subnormal is a zero of its sign."""
    b = np.asarray(b, U32).copy()
    sub = ((b >> 23) & 0xFF) == 0
    b[sub] &= U32(0x80000000)
    return b


def check(name, got, exp, inputs=None, *, log=None, max_show=8):
    """Compare bit patterns (NaN matches any NaN); raise with the first mismatches."""
    got = np.asarray(got, dtype=U32)
    exp = np.asarray(exp, dtype=U32)
    gn = np.isnan(floats(got))
    en = np.isnan(floats(exp))
    bad = np.nonzero(~((got == exp) | (gn & en)))[0]
    if len(bad):
        lines = []
        for i in bad[:max_show]:
            ins = "" if inputs is None else " in=" + " ".join(
                f"{int(v[i]) & 0xFFFFFFFF:08x}" for v in inputs)
            lines.append(f"  #{i}:{ins} got {int(got[i]):08x} expected {int(exp[i]):08x}")
        raise AssertionError(f"{name}: {len(bad)} of {len(got)} mismatches\n" + "\n".join(lines))
    if log is not None:
        log.info("%s: %d results bit-exact", name, len(got))


# ---- add / sub ---------------------------------------------------------------------------

def add_vectors(rng, n):
    a = rand_mixed(rng, n)
    b = rand_mixed(rng, n)
    k = n // 5
    # close magnitudes: cancellation, exact zero, opposite signs
    idx = rng.choice(n, k, replace=False)
    delta = rng.integers(-4, 5, k).astype(np.int64)
    b[idx] = ((a[idx].astype(np.int64) + delta) & 0x7FFFFFFF).astype(U32) \
        | ((~a[idx]) & U32(0x80000000))
    # exponent differences 0..30 with random significands
    idx = rng.choice(n, k, replace=False)
    ea = rng.integers(30, 225, k)
    b[idx] = make(rng, rng.integers(0, 2, k), ea - rng.integers(0, 31, k),
                  rng.integers(0, 1 << 23, k))
    a[idx] = make(rng, rng.integers(0, 2, k), ea, rng.integers(0, 1 << 23, k))
    # near the bottom of the range (results that become subnormal and flush) and the top
    idx = rng.choice(n, k // 2, replace=False)
    a[idx] = rand_normal(rng, len(idx), 1, 4)
    b[idx] = rand_normal(rng, len(idx), 1, 4)
    idx = rng.choice(n, k // 4, replace=False)
    a[idx] = rand_normal(rng, len(idx), 252, 254)
    b[idx] = rand_normal(rng, len(idx), 252, 254)
    # every pair of edge values
    ea_, eb_ = np.meshgrid(EDGE, EDGE)
    a = np.concatenate([ea_.ravel(), a])
    b = np.concatenate([eb_.ravel(), b])
    sub = rng.integers(0, 2, len(a))
    return a, b, sub


def mul_vectors(rng, n):
    a = rand_mixed(rng, n)
    b = rand_mixed(rng, n)
    k = n // 5
    # products around the minimum normal (sum of biased exponents near 127)
    idx = rng.choice(n, k, replace=False)
    ea = rng.integers(1, 127, k)
    a[idx] = make(rng, rng.integers(0, 2, k), ea, rng.integers(0, 1 << 23, k))
    b[idx] = make(rng, rng.integers(0, 2, k), np.clip(127 - ea + rng.integers(-3, 3, k), 1, 254),
                  rng.integers(0, 1 << 23, k))
    # significands whose product is all ones near 2**-126 (rounds up to the minimum normal)
    idx = rng.choice(n, k // 4, replace=False)
    fa = rng.integers(0, 1 << 23, len(idx))
    a[idx] = make(rng, 0, 63, fa)
    target = np.float32(2.0 ** -126) * (1 - rng.integers(0, 4, len(idx)) * np.float32(2.0 ** -25))
    b[idx] = bits((target.astype(np.float64) / floats(a[idx]).astype(np.float64)).astype(np.float32))
    # overflow region
    idx = rng.choice(n, k // 2, replace=False)
    ea = rng.integers(127, 254, len(idx))
    a[idx] = make(rng, rng.integers(0, 2, len(idx)), ea, rng.integers(0, 1 << 23, len(idx)))
    b[idx] = make(rng, rng.integers(0, 2, len(idx)), np.clip(381 - ea + rng.integers(-2, 2, len(idx)), 1, 254),
                  rng.integers(0, 1 << 23, len(idx)))
    # short significands: many exact ties
    idx = rng.choice(n, k, replace=False)
    a[idx] = make(rng, rng.integers(0, 2, k), rng.integers(100, 150, k),
                  rng.integers(0, 1 << 13, k) << 10)
    b[idx] = make(rng, rng.integers(0, 2, k), rng.integers(100, 150, k),
                  rng.integers(0, 1 << 13, k) << 10)
    ea_, eb_ = np.meshgrid(EDGE, EDGE)
    return np.concatenate([ea_.ravel(), a]), np.concatenate([eb_.ravel(), b])


@cocotb.test()
async def fp_add(dut):
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED)
    a, b, sub = add_vectors(rng, N)
    with np.errstate(all="ignore"):
        fa, fb = floats(flush_in(a)), floats(flush_in(b))
        exp = bits(np.where(sub == 1, nx.fsub(fa, fb), nx.fadd(fa, fb)))
    pays = [{"a": int(x), "b": int(y), "sub": int(s)} for x, y, s in zip(a, b, sub)]
    outs, src, snk = await tb.run_stream("add_i", "add_o", pays, layout=FAddOperands,
                                         stall=STALL, bp=STALL, seed=SEED)
    check("fp_add", outs, exp, (a, b, sub), log=dut._log)
    n_add = np.count_nonzero(sub == 0)
    dut._log.info("fp_add: %d operand pairs (%d adds, %d subs)", len(a), n_add, len(a) - n_add)


@cocotb.test()
async def fp_mul(dut):
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 10)
    a, b = mul_vectors(rng, N)
    with np.errstate(all="ignore"):
        exp = bits(nx.fmul(floats(flush_in(a)), floats(flush_in(b))))
        exact = floats(flush_in(a)).astype(np.float64) * floats(flush_in(b)).astype(np.float64)
    pays = [{"a": int(x), "b": int(y)} for x, y in zip(a, b)]
    outs, src, snk = await tb.run_stream("mul_i", "mul_o", pays, layout=FMulOperands,
                                         stall=STALL, bp=STALL, seed=SEED)
    check("fp_mul", outs, exp, (a, b), log=dut._log)
    with np.errstate(all="ignore"):
        tiny = np.count_nonzero((np.abs(exact) < 2.0 ** -126) & (exact != 0))
        up = np.count_nonzero((np.abs(exact) < 2.0 ** -126) & (floats(exp) != 0))
        ties = np.count_nonzero(np.abs(exact - floats(exp)) ==
                                np.spacing(np.abs(floats(exp))).astype(np.float64) / 2)
    dut._log.info("fp_mul: %d pairs; %d exact products below 2^-126 (%d rounded up to the "
                  "minimum normal), %d RNE ties", len(a), tiny, up, ties)


@cocotb.test()
async def fp_cvt(dut):
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 20)
    pays, exp, ins = [], [], []

    def add(op, x, n, e):
        for xi, ni, ei in zip(x, n, e):
            pays.append({"op": op.value, "x": int(xi) & 0xFFFFFFFF, "n": int(ni)})
            exp.append(int(ei) & 0xFFFFFFFF)
            ins.append(int(xi) & 0xFFFFFFFF)

    n = N // 2
    # int32 -> fp32: every magnitude, exact below 2**24, RNE above
    sh = rng.integers(0, 32, n)
    iv = (rng.integers(-(1 << 31), 1 << 31, n) >> sh).astype(np.int32)
    iv[:4] = [0, -(1 << 31), (1 << 31) - 1, (1 << 24) + 1]
    add(CvtOp.INT_TO_F32, iv, np.zeros(n), bits(iv.astype(np.float32)))
    # fp16 -> fp32: all 65536 patterns
    h = np.arange(1 << 16, dtype=np.uint16)
    add(CvtOp.F16_TO_F32, h, np.zeros(len(h)), bits(nx.from_f16(h.view(np.float16))))
    # fp32 -> fp16: random around the fp16 range (subnormals, overflow, ties) and edges
    x = np.concatenate([rand_normal(rng, n, 90, 150), rand_normal(rng, n // 4),
                        make(rng, rng.integers(0, 2, n // 4), rng.integers(97, 145, n // 4),
                             rng.integers(0, 1 << 12, n // 4) << 11), EDGE])
    x = flush_in(x)
    add(CvtOp.F32_TO_F16, x, np.zeros(len(x)), nx.to_f16(floats(x)).view(np.uint16))
    # ldexp: exact, overflow, underflow (flush / round up to the minimum normal)
    x = np.concatenate([rand_normal(rng, n), EDGE,
                        make(rng, 0, rng.integers(1, 40, 64), np.full(64, 0x7FFFFF))])
    nn = rng.integers(-300, 300, len(x))
    nn[-64:] = -(((x[-64:] >> 23) & 0xFF).astype(np.int64)) + rng.integers(-1, 2, 64)
    with np.errstate(all="ignore"):
        add(CvtOp.LDEXP, x, nn, bits(nx.ldexp(floats(flush_in(x)), nn)))
    # floor to int (|x| < 2**23)
    x = np.concatenate([rand_normal(rng, n, 100, 149), EDGE[:2]])
    add(CvtOp.FLOOR, x, np.zeros(len(x)), np.floor(floats(flush_in(x))).astype(np.int64))
    outs, src, snk = await tb.run_stream("cvt_i", "cvt_o", pays, layout=CvtOperands,
                                         stall=STALL, bp=STALL, seed=SEED)
    outs = np.array(outs, dtype=np.uint64)
    exp = np.array(exp, dtype=np.uint64)
    ops = np.array([p["op"] for p in pays])
    half = ops == CvtOp.F32_TO_F16.value
    # fp16 results: compare as fp16 (NaN = any NaN)
    gh, eh = outs[half].astype(np.uint16), exp[half].astype(np.uint16)
    hbad = ~((gh == eh) | (np.isnan(gh.view(np.float16)) & np.isnan(eh.view(np.float16))))
    assert not hbad.any(), f"f32_to_f16 mismatches: {np.nonzero(hbad)[0][:8]}"
    for op in CvtOp:
        sel = ops == op.value
        if op is CvtOp.F32_TO_F16 or not sel.any():
            continue
        check(op.name, outs[sel].astype(U32), exp[sel].astype(U32),
              (np.array(ins, dtype=np.uint64)[sel],), log=dut._log)
    dut._log.info("fp_cvt: %d conversions (%s)", len(pays),
                  ", ".join(f"{op.name} {np.count_nonzero(ops == op.value)}" for op in CvtOp))


@cocotb.test()
@cocotb.parametrize(unit=["add", "mul", "cvt"])
async def fp_throughput(dut, unit):
    """No stalls: one operation per cycle on the unit, latency as documented."""
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 30)
    m = 2000
    a, b = rand_normal(rng, m), rand_normal(rng, m)
    layout, pays = {
        "add": (FAddOperands, [{"a": int(x), "b": int(y), "sub": 0} for x, y in zip(a, b)]),
        "mul": (FMulOperands, [{"a": int(x), "b": int(y)} for x, y in zip(a, b)]),
        "cvt": (CvtOperands, [{"x": int(x), "n": 3, "op": CvtOp.LDEXP.value} for x in a]),
    }[unit]
    outs, src, snk = await tb.run_stream(f"{unit}_i", f"{unit}_o", pays, layout=layout,
                                         stall=0.0, bp=0.0, seed=SEED)
    tp = throughput(snk.times)
    lat = (snk.times[0] - src.times[0]) / 10
    assert tp == 1.0, f"{unit}: throughput {tp} < 1 op/cycle"
    dut._log.info("fp_%s: steady state %.3f ops/cycle, latency %d cycles", unit, tp, lat)
