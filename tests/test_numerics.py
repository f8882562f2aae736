"""The hardware numerics (core/numerics.py) against float64 references and bit-level rules.

Error bounds are the measured ones of docs/numerics.md ("Error bounds (measured)")
with a small margin; every random input comes from a seeded generator, so each run
checks the same values. Relative errors are in units of EPS = 2**-23 (one ulp at a
mantissa of 1.0). References are float64 computations on the same float32 inputs.
"""

import math
import struct
import warnings

import numpy as np
import pytest

from llmfab.compiler import quant
from llmfab.core import numerics as N

EPS = 2.0 ** -23
TINY = 2.0 ** -126           # smallest normal binary32
F32 = np.float32


def _rng(seed):
    return np.random.default_rng(seed)


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def _rel(got, ref):
    """|got - ref| / |ref| in units of EPS (float64)."""
    got = np.asarray(got, np.float64)
    return np.abs(got - ref) / np.abs(ref) / EPS


def _ulps(got, ref):
    """|got - ref| in ulps of the reference, ulp(r) = 2**(floor(log2|r|) - 23)."""
    got = np.asarray(got, np.float64)
    return np.abs(got - ref) / 2.0 ** (np.floor(np.log2(np.abs(ref))) - 23)


def _ref_round(v64):
    """float64 -> binary32 RNE, then the spec's flush to zero (subnormal -> signed zero)."""
    with np.errstate(over="ignore"):
        r = np.asarray(v64, np.float64).astype(np.float32)
    return np.where(np.abs(r) < F32(TINY), np.copysign(F32(0), r), r).astype(np.float32)


def _random_normals(rng, n, emin=-126, emax=127):
    """Random binary32 normals with exponents in [emin, emax] and either sign."""
    e = rng.integers(emin + 127, emax + 128, n).astype(np.uint32)
    frac = rng.integers(0, 1 << 23, n).astype(np.uint32)
    sign = rng.integers(0, 2, n).astype(np.uint32)
    return ((sign << np.uint32(31)) | (e << np.uint32(23)) | frac).view(np.float32)


# The exp error model (docs/numerics.md): y = fl(x * fp32(log2 e)) carries half an ulp
# of y plus fp32(log2 e)'s own relative error; each becomes a relative error of the
# result after 2**y. The rest (table, cubic, final product) is a constant.
_LOG2E_REL = abs(float(N.LOG2E) - 1.0 / math.log(2.0)) * math.log(2.0) / EPS   # ~0.112


def _exp_term(x):
    """Argument-rounding part of exp's relative error bound, in EPS, for input x."""
    x = np.abs(np.asarray(x, np.float64))
    y = x / math.log(2.0)
    uy = np.where(y >= TINY, 2.0 ** np.floor(np.log2(np.maximum(y, TINY))), 0.0)
    return 0.5 * math.log(2.0) * uy + _LOG2E_REL * x


EXP_C = 1.6        # measured 1.38
SILU_C = 2.8       # measured 2.47
SOFTMAX_C = 3.5    # measured 3.20


# ---------------------------------------------------------------- binary32 ops, bit level

@pytest.mark.parametrize("op,ref", [(N.fadd, np.add), (N.fsub, np.subtract), (N.fmul, np.multiply)])
def test_binary_ops_are_rne_with_flush(op, ref):
    rng = _rng(1)
    n = 200_000
    a = _random_normals(rng, n)
    if op is N.fmul:      # exponents that land products around the underflow and overflow edges
        b = _random_normals(rng, n, -126, 127)
        b[: n // 4] = _random_normals(rng, n // 4, -20, 20)
        a[: n // 4] = _random_normals(rng, n // 4, -126, -100)
    else:                 # near cancellations and sums of tiny numbers
        b = _random_normals(rng, n)
        k = n // 4
        a[:k] = _random_normals(rng, k, -126, -120)
        sgn = -1.0 if op is N.fadd else 1.0
        b[:k] = (sgn * a[:k].astype(np.float64) * (1 + rng.integers(-8, 9, k) * 2.0 ** -23)).astype(np.float32)
        b[k:2 * k] = _random_normals(rng, k, -126, -118)
    with np.errstate(over="ignore", invalid="ignore"):
        got = op(a, b)
        exact = ref(a.astype(np.float64), b.astype(np.float64))   # products exact; sums round once
        want = _ref_round(exact)
        assert got.dtype == np.float32
        # numpy's own float32 op agrees wherever its result is normal or inf
        npv = ref(a, b, dtype=np.float32)
    assert np.array_equal(_bits(got), _bits(want))
    normal = np.abs(npv) >= F32(TINY)
    assert np.array_equal(_bits(got)[normal], _bits(npv)[normal])
    flushed = ~normal
    assert flushed.sum() > 1000       # the flush path really was exercised
    assert np.all(got[flushed] == 0)
    assert np.array_equal(np.signbit(got[flushed]), np.signbit(npv[flushed]))


def test_flush_to_zero_cases():
    t = F32(TINY)
    # 2**-126 * 1.5 * 0.5 = 0.75 * 2**-126 is subnormal: flushed, sign kept
    assert _bits(N.fmul(N.fmul(t, F32(1.5)), F32(0.5))) == 0
    assert _bits(N.fmul(-t * F32(1.5), F32(0.5))) == 0x80000000
    assert _bits(N.fmul(t, F32(0.5))) == 0                      # exactly 2**-127
    assert N.fmul(t, F32(1.0)) == t                             # the smallest normal is kept
    assert _bits(N.fadd(t * F32(1.5), -t)) == 0                 # 0.5 * 2**-126
    assert _bits(N.fadd(t * F32(1.5), F32(-2) * t)) == 0x80000000   # -0.5 * 2**-126 -> -0
    assert _bits(N.fsub(t, t * F32(1.5))) == 0x80000000
    assert N.fadd(t * F32(3), -t) == F32(2) * t                 # normal results are untouched
    # signed zeros
    z, nz = F32(0.0), F32(-0.0)
    assert _bits(N.fadd(nz, nz)) == 0x80000000
    assert _bits(N.fadd(z, nz)) == 0 and _bits(N.fadd(nz, z)) == 0
    assert _bits(N.fsub(nz, z)) == 0x80000000
    assert _bits(N.fmul(nz, F32(5))) == 0x80000000
    assert _bits(N.fmul(nz, F32(-5))) == 0
    for x in [F32(1.5), F32(-3e38), F32(TINY), F32(-7.25)]:
        assert _bits(N.fadd(x, -x)) == 0                        # x + -x = +0 under RNE
        assert _bits(N.fsub(x, x)) == 0
    # inf / nan
    inf, nan = F32(np.inf), F32(np.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        assert N.fadd(inf, F32(1)) == inf and N.fadd(-inf, F32(1e38)) == -inf
        assert np.isnan(N.fadd(inf, -inf)) and np.isnan(N.fsub(inf, inf))
        assert np.isnan(N.fmul(F32(0), inf)) and np.isnan(N.fmul(nz, -inf))
        assert N.fmul(inf, F32(-2)) == -inf
        assert np.isnan(N.fadd(nan, F32(1))) and np.isnan(N.fmul(nan, F32(0)))
        assert N.fmul(F32(2.0 ** 127), F32(2)) == inf           # overflow -> inf
        assert N.fadd(F32(3e38), F32(3e38)) == inf
        assert N.fmul(F32(-2.0 ** 127), F32(2)) == -inf


def test_ldexp_exact():
    rng = _rng(2)
    n = 200_000
    x = _random_normals(rng, n)
    e = rng.integers(-300, 301, n)
    got = N.ldexp(x, e)
    assert got.dtype == np.float32
    exact = x.astype(np.float64) * np.exp2(e.astype(np.float64))        # exact in float64
    normal = (np.abs(exact) >= TINY) & (np.abs(exact) < 2.0 ** 128)
    assert normal.sum() > n // 4
    assert np.array_equal(got[normal].astype(np.float64), exact[normal])      # exact
    under = np.abs(exact) < TINY - 2.0 ** -150
    over = np.abs(exact) >= 2.0 ** 128
    assert under.sum() > 1000 and over.sum() > 1000
    assert np.all(got[under] == 0) and np.array_equal(np.signbit(got[under]), np.signbit(x[under]))
    assert np.all(np.isinf(got[over])) and np.array_equal(np.signbit(got[over]), np.signbit(x[over]))
    # the one subnormal product that IEEE rounding takes to the smallest normal is kept
    # (2 - 2**-23) * 2**-127 = 2**-126 - 2**-150 (hw/fp.py's ldexp does the same)
    assert N.ldexp(F32(2 - 2.0 ** -23), -127) == F32(TINY)
    assert N.ldexp(F32(-(2 - 2.0 ** -23)), -127) == -F32(TINY)
    assert _bits(N.ldexp(F32(2 - 2.0 ** -22), -127)) == 0
    assert N.ldexp(F32(1.5), 0) == F32(1.5)
    assert _bits(N.ldexp(F32(-0.0), 5)) == 0x80000000
    assert N.ldexp(F32(np.inf), -500) == np.inf and np.isnan(N.ldexp(F32(np.nan), 3))


# ---------------------------------------------------------------- fp16 (KV cache)

def _struct_f16(v):
    """Python's correctly rounded binary16 packing (RNE, subnormals) as an independent reference."""
    try:
        return struct.unpack("<e", struct.pack("<e", float(v)))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def test_to_f16_matches_numpy_and_rne():
    rng = _rng(3)
    n = 300_000
    # binary32 values around the whole binary16 range: subnormals (2**-24 .. 2**-14), underflow,
    # the overflow edge (65504 .. 65520 and beyond)
    x = _random_normals(rng, n, -30, 17)
    edge = np.array([65504, 65519.99, 65520, 65536, 1e5, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0001,
                     3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -11), 0.0, -0.0, np.inf, -np.inf,
                     1e-30], np.float32)
    x = np.concatenate([x, edge, -edge])
    h = N.to_f16(x)
    assert h.dtype == np.float16
    with np.errstate(over="ignore"):
        assert np.array_equal(h.view(np.uint16), x.astype(np.float16).view(np.uint16))
    assert np.isnan(N.to_f16(F32(np.nan)))
    sub = (np.abs(x) < 2.0 ** -14) & (np.abs(x) >= 2.0 ** -24)
    assert np.all(h[sub] != 0)                   # binary16 subnormals are kept, not flushed
    assert N.to_f16(F32(65519.99)) == np.float16(65504) and np.isinf(N.to_f16(F32(65520)))
    assert N.to_f16(F32(-1e5)) == -np.inf
    assert _bits(N.from_f16(N.to_f16(F32(-0.0)))) == 0x80000000
    # independent reference on a sample (Python's float packing, one value at a time)
    idx = np.concatenate([np.arange(0, n, 40), np.arange(n, len(x))])
    want = np.array([_struct_f16(v) for v in x[idx]])
    np.testing.assert_array_equal(h[idx].astype(np.float64), want)


def test_from_f16_exact_all_patterns():
    hb = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h = hb.view(np.float16)
    f = N.from_f16(h)
    assert f.dtype == np.float32
    nan = np.isnan(h)
    want = np.array([struct.unpack("<e", int(b).to_bytes(2, "little"))[0] for b in hb])
    assert np.array_equal(np.isnan(f), nan)
    assert np.array_equal(f[~nan].astype(np.float64), want[~nan])
    assert np.array_equal(np.signbit(f[~nan]), np.signbit(want[~nan]))
    assert np.array_equal(N.to_f16(f[~nan]).view(np.uint16), hb[~nan])    # round trip exact


# ---------------------------------------------------------------- reduction orders

def _accum4_by_hand(seq):
    p = [F32(0.0)] * 4
    for i, v in enumerate(seq):
        p[i % 4] = N.fadd(p[i % 4], v)
    return N.fadd(N.fadd(p[0], p[1]), N.fadd(p[2], p[3]))


def _reduce_sum_by_hand(v):
    lanes = [F32(0.0)] * 32
    for i, x in enumerate(v):
        lanes[i % 32] = x if i < 32 else N.fadd(lanes[i % 32], x)
    h = 16
    while h >= 1:
        lanes = [N.fadd(lanes[j], lanes[j + h]) for j in range(h)]
        h //= 2
    return lanes[0]


def test_accum4_order():
    rng = _rng(4)
    # values where the order matters: big values that cancel next to small ones
    for n in [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 31, 64, 101]:
        for _ in range(6):
            seq = (rng.normal(0, 1, n) * np.exp2(rng.integers(-12, 28, n))).astype(np.float32)
            got = N.accum4(seq)
            assert got.dtype == np.float32
            assert _bits(got) == _bits(_accum4_by_hand(seq)), n
    # a sequence that gives a different value in any other order
    seq = np.array([2.0 ** 24, 2.0 ** 24, -(2.0 ** 24), -(2.0 ** 24), 1, 1, 1, 1], np.float32)
    # p0 = p1 = 2**24 + 1 -> 2**24 (RNE ties to even), p2 = p3 = -2**24 + 1 (exact);
    # (2**25) + (-2**25 + 2) = 2, while the exact sum and the sequential order give 4
    assert N.accum4(seq) == F32(2.0)
    assert _accum4_by_hand(seq) == F32(2.0)
    seqsum = F32(0)
    for v in seq:
        seqsum = N.fadd(seqsum, v)
    assert seqsum == F32(4.0)
    # along another axis, and vectors of partials
    m = (rng.normal(0, 1, (5, 11, 3)) * np.exp2(rng.integers(-10, 20, (5, 11, 3)))).astype(np.float32)
    got = N.accum4(m, axis=1)
    assert got.shape == (5, 3) and got.dtype == np.float32
    for i in range(5):
        for j in range(3):
            assert _bits(got[i, j]) == _bits(_accum4_by_hand(m[i, :, j]))
    vals = (rng.normal(0, 1, (4, 9)) * np.exp2(rng.integers(-10, 20, (4, 9)))).astype(np.float32)
    mv = N.matvec_blocks(vals)
    assert np.array_equal(_bits(mv), _bits([_accum4_by_hand(r) for r in vals]))


def test_accum4_negative_zero_partials():
    t = F32(TINY)
    # every partial becomes 1.5t + -2t = -0.5t -> flushed to -0.0; the 9th item (-0.0) keeps p0 at -0.0
    seq = np.array([1.5 * t] * 4 + [-2 * t] * 4 + [-0.0], np.float32)
    assert _bits(_accum4_by_hand(seq)) == 0x80000000
    assert _bits(N.accum4(seq)) == 0x80000000


def test_reduce_sum_order():
    rng = _rng(5)
    for n in [1, 2, 5, 31, 32, 33, 63, 64, 65, 100, 129, 576]:
        for _ in range(3):
            v = (rng.normal(0, 1, n) * np.exp2(rng.integers(-12, 28, n))).astype(np.float32)
            got = N.reduce_sum(v)
            assert got.dtype == np.float32
            assert _bits(got) == _bits(_reduce_sum_by_hand(v)), n
    # batch axes: the sum is over the last axis only
    m = (rng.normal(0, 1, (3, 4, 70)) * np.exp2(rng.integers(-10, 20, (3, 4, 70)))).astype(np.float32)
    got = N.reduce_sum(m)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert _bits(got[i, j]) == _bits(_reduce_sum_by_hand(m[i, j]))
    # the order is visible: lane 0 holds 2**24, +1, +1 (each rounded away), lane 1 holds -2**24
    v = np.zeros(96, np.float32)
    v[0], v[32], v[64], v[1] = 2.0 ** 24, 1, 1, -(2.0 ** 24)
    assert N.reduce_sum(v) == 0.0 and float(np.sum(v.astype(np.float64))) == 2.0
    a, b = v, rng.normal(0, 1, 96).astype(np.float32)
    assert _bits(N.vdot(a, b)) == _bits(N.reduce_sum(N.fmul(a, b)))


# ---------------------------------------------------------------- reductions vs float64

def _fsum_rows(v):
    return np.array([math.fsum(r) for r in np.asarray(v, np.float64).reshape(-1, v.shape[-1])])


def _depth(n):
    """Additions on the longest path of reduce_sum over n elements."""
    return max(1, math.ceil(n / 32)) - 1 + 5


@pytest.mark.parametrize("kind", ["normal", "positive", "wide"])
def test_reduce_sum_and_vdot_error(kind):
    rng = _rng(6 + ["normal", "positive", "wide"].index(kind))
    worst_r = worst_v = 0.0
    for n in list(range(1, 70, 3)) + [96, 100, 576, 1000, 1536, 4096, 8192]:
        rows = 32 if n < 1000 else 8
        if kind == "normal":
            v = rng.normal(0, 1, (rows, n))
        elif kind == "positive":
            v = rng.uniform(0, 1, (rows, n))
        else:                        # magnitudes over 17 decades
            v = rng.normal(0, 1, (rows, n)) * np.exp(rng.uniform(-20, 20, (rows, n)))
        v = v.astype(np.float32)
        g = N.reduce_sum(v)
        assert g.dtype == np.float32
        s = np.abs(v.astype(np.float64)).sum(-1)
        ratio = np.abs(g - _fsum_rows(v)) / (EPS * s)
        # worst case for this order (k roundings of at most u = EPS/2 each) and the measured bound
        assert np.all(ratio <= _depth(n) / 2 * (1 + 1e-6)), n
        worst_r = max(worst_r, ratio.max())
        a = rng.normal(0, 1, (rows, n)).astype(np.float32)
        g = N.vdot(a, v)
        assert g.dtype == np.float32
        p = a.astype(np.float64) * v.astype(np.float64)          # exact products
        ratio = np.abs(g - _fsum_rows(p)) / (EPS * np.abs(p).sum(-1))
        assert np.all(ratio <= (_depth(n) + 1) / 2 * (1 + 1e-6)), n
        worst_v = max(worst_v, ratio.max())
    assert worst_r <= 2.0     # measured 1.64
    assert worst_v <= 2.0     # measured 1.75


# ---------------------------------------------------------------- special functions

def test_exp_error():
    rng = _rng(10)
    for lo, hi in [(-87.0, 88.0), (-100.0, 0.0)]:
        x = np.concatenate([rng.uniform(lo, hi, 600_000), np.linspace(lo, hi, 200_001)])
        # exponent extremes: tiny arguments of both signs, and the ends of the range
        small = np.ldexp(rng.uniform(1, 2, 40_000), rng.integers(-126, 7, 40_000)) * rng.choice([-1, 1], 40_000)
        x = np.concatenate([x, small, [lo, hi, 0.0, -0.0]]).astype(np.float32)
        x = x[(x >= lo) & (x <= hi)]
        g = N.exp(x)
        assert g.dtype == np.float32
        r = np.exp(x.astype(np.float64))
        nm = r >= TINY
        rel = _rel(g[nm], r[nm])
        assert np.all(rel <= EXP_C + _exp_term(x[nm]))
        assert rel.max() <= 34.0                        # measured 33.12 (at |x| ~ 86..88)
        small_x = np.abs(x[nm]) <= 1
        assert rel[small_x].max() <= 2.0                # measured 1.68
        assert _ulps(g[nm], r[nm]).max() <= 66          # measured 64.66
        # below e**-87.34 ~ 2**-126 the result flushes to +0 (right at the edge it may round up to
        # 2**-126 within the bound)
        gs, xs, rs = g[~nm], x[~nm], r[~nm]
        assert np.all((gs == 0) | (_rel(gs, rs) <= EXP_C + _exp_term(xs)))
        assert not np.any(np.signbit(gs)) and (lo > -87.3 or np.sum(gs == 0) > 1000)
    with np.errstate(over="ignore", invalid="ignore"):
        sp = N.exp(np.array([0.0, -0.0, 88.72, 88.73, 100, np.inf, -np.inf, np.nan, -87.33, -87.34, -1e30],
                            np.float32))
    assert sp[0] == 1 and sp[1] == 1
    assert np.isfinite(sp[2]) and sp[2] > 3.39e38
    assert np.all(np.isinf(sp[3:6])) and sp[6] == 0 and np.isnan(sp[7])
    assert sp[8] >= TINY and sp[9] == 0 and sp[10] == 0


def _mantissa_grid(stride):
    """binary32 values in [1, 2) on every stride-th mantissa (plus the largest one)."""
    frac = np.concatenate([np.arange(0, 1 << 23, stride), [(1 << 23) - 1]]).astype(np.uint32)
    return (frac | np.uint32(127 << 23)).view(np.float32)


def test_recip_error():
    rng = _rng(11)
    m = _mantissa_grid(3)                               # every 3rd mantissa of one binade
    g = N.recip(m)
    r = 1.0 / m.astype(np.float64)
    assert _ulps(g, r).max() <= 2.1                     # measured 2.02 (all 2**23 mantissas)
    assert _rel(g, r).max() <= 1.3                      # measured 1.24
    # the exponent is exact scaling: random mantissas over the whole exponent range, both signs
    n = 400_000
    a = _random_normals(rng, n)
    a = np.concatenate([a, np.exp2(np.arange(-126, 128)).astype(np.float32)])
    g = N.recip(a)
    assert g.dtype == np.float32
    r = 1.0 / a.astype(np.float64)
    nm = np.abs(r) >= TINY
    assert _ulps(g[nm], r[nm]).max() <= 2.1
    assert np.array_equal(np.signbit(g), np.signbit(a))
    # a >= 2**126 (the reciprocal would be subnormal) flushes to a signed zero
    assert np.all(g[~nm] == 0) and np.all(np.abs(a[~nm]) > 2.0 ** 126)
    assert N.recip(F32(2.0 ** 126)) == F32(TINY)
    assert N.recip(np.nextafter(F32(2.0 ** 126), F32(0))) == F32(TINY)
    assert N.recip(F32(TINY)) == F32(2.0 ** 126)
    sp = N.recip(np.array([0.0, -0.0, np.inf, -np.inf, np.nan], np.float32))
    assert sp[0] == np.inf and sp[1] == -np.inf
    assert _bits(sp[2]) == 0 and _bits(sp[3]) == 0x80000000 and np.isnan(sp[4])


def test_rsqrt_error():
    rng = _rng(12)
    m = _mantissa_grid(3)
    for mm in (m, m * F32(2)):                          # even and odd exponent tables
        g = N.rsqrt(mm)
        r = 1.0 / np.sqrt(mm.astype(np.float64))
        assert _ulps(g, r).max() <= 2.1                 # measured 1.98 (all mantissas, both parities)
        assert _rel(g, r).max() <= 1.4                  # measured 1.34
    n = 400_000
    a = np.abs(_random_normals(rng, n))
    a = np.concatenate([a, np.exp2(np.arange(-126, 128)).astype(np.float32), [F32(3.4028235e38)]])
    g = N.rsqrt(a)
    assert g.dtype == np.float32
    r = 1.0 / np.sqrt(a.astype(np.float64))
    assert _ulps(g, r).max() <= 2.1
    with np.errstate(invalid="ignore"):
        sp = N.rsqrt(np.array([0.0, np.inf, -1.0, -np.inf, np.nan], np.float32))
    assert sp[0] == np.inf and _bits(sp[1]) == 0 and np.all(np.isnan(sp[2:]))
    assert N.rsqrt(F32(4.0)) == F32(0.5) and N.rsqrt(F32(TINY)) == F32(2.0 ** 63)


def test_silu_error():
    rng = _rng(13)
    x = np.concatenate([rng.uniform(-87, 88, 500_000), rng.normal(0, 3, 200_000),
                        np.ldexp(rng.uniform(1, 2, 40_000), rng.integers(-125, 7, 40_000))
                        * rng.choice([-1, 1], 40_000)]).astype(np.float32)
    x = x[(x >= -87) & (x <= 88)]
    g = N.silu(x)
    assert g.dtype == np.float32
    x64 = x.astype(np.float64)
    r = x64 / (1 + np.exp(-x64))
    nm = np.abs(r) >= TINY
    rel = _rel(g[nm], r[nm])
    w = np.exp(-x64[nm]) / (1 + np.exp(-x64[nm]))      # how much of exp(-x)'s error reaches the result
    assert np.all(rel <= SILU_C + w * _exp_term(-x64[nm]))
    band = np.abs(x[nm]) <= 5
    assert rel[band].max() <= 4.5                       # measured 4.13
    assert rel[x[nm] >= 5].max() <= 2.0                 # measured 1.85
    assert rel.max() <= 34.5                            # measured 33.77 (x ~ -85)
    assert np.all(np.abs(g[~nm] - r[~nm]) <= TINY)
    # x < -87.34: exp(-x) > 2**126, its reciprocal flushes, silu is -0 (true value < 1e-35 in magnitude)
    xn = np.linspace(-104, -87.34, 1001).astype(np.float32)
    with np.errstate(over="ignore"):
        gn = N.silu(xn)
    assert np.all(gn == 0) and np.all(np.signbit(gn))
    assert np.all(np.abs(xn * np.exp(xn.astype(np.float64))) < 1e-35)


def test_softmax_error():
    rng = _rng(14)
    worst = dict(abs=0.0, l1=0.0, rel=0.0)
    scales = (0.5, 3.0, 12.0, 40.0)
    for n in range(1, 601):
        sc = scales[n % 4]
        s = (rng.normal(0, sc, (2, n)) + rng.uniform(-50, 50, (2, 1))).astype(np.float32)
        a = N.softmax(s)
        assert a.dtype == np.float32 and a.shape == s.shape
        s64 = s.astype(np.float64)
        d = s64 - s64.max(-1, keepdims=True)
        e = np.exp(d)
        r = e / e.sum(-1, keepdims=True)
        err = np.abs(a - r)
        worst["abs"] = max(worst["abs"], err.max() / EPS)
        worst["l1"] = max(worst["l1"], err.sum(-1).max() / EPS)
        nm = r >= 2 * TINY
        dd = d[nm]
        ud = np.where(dd != 0, np.exp2(np.floor(np.log2(np.maximum(np.abs(dd), TINY)))), 0.0)
        bound = SOFTMAX_C + _exp_term(dd) + 0.5 * ud     # + half an ulp of fl(s - max)
        rel = err[nm] / r[nm] / EPS
        assert np.all(rel <= bound), n
        worst["rel"] = max(worst["rel"], (err[r >= 2.0 ** -10] / r[r >= 2.0 ** -10]).max() / EPS)
        assert np.all(err[~nm] <= 2 * TINY)
    assert worst["abs"] <= 3.0     # measured 2.71
    assert worst["l1"] <= 3.5      # measured 3.07
    assert worst["rel"] <= 8.0     # measured 7.03 (probabilities >= 2**-10)
    assert N.softmax(np.float32([3.0]))[0] == 1.0


def test_softmax_length_truncates():
    s = np.float32([1, 2, 3, 4])
    a = N.softmax(s, length=2)
    assert a.shape == (2,)
    assert np.array_equal(a, N.softmax(s[:2]))


def test_rms_norm_error():
    rng = _rng(15)
    worst = {576: 0.0, 4096: 0.0}
    for n in (576, 4096):
        w = rng.normal(1.0, 0.3, n).astype(np.float32)
        for sc in (1e-3, 0.05, 1.0, 20.0, 300.0):
            for eps in (1e-5, 1e-6):
                x = rng.normal(0, sc, (40, n))
                x[:, rng.integers(0, n, 4)] *= 30                # outlier channels
                x = x.astype(np.float32)
                y = N.rms_norm(x, w, eps)
                assert y.dtype == np.float32 and y.shape == x.shape
                x64 = x.astype(np.float64)
                r = x64 * w / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + float(F32(eps)))
                nz = np.abs(r) >= TINY
                rel = _rel(y[nz], r[nz])
                # worst case: two products, rsqrt (1.34), half the error of fadd(ss * fl(1/n), eps)
                # where ss sums n rounded squares in _depth(n) additions
                assert np.all(rel <= 2.34 + 0.5 * ((_depth(n) + 1) / 2 + 1.5) + 1e-3)
                worst[n] = max(worst[n], rel.max())
                assert np.all(np.abs(y[~nz] - r[~nz]) <= TINY)
    assert worst[576] <= 3.5       # measured 2.87
    assert worst[4096] <= 5.0      # measured 4.16


def test_rope_error():
    rng = _rng(16)
    cos, sin = N.rope_tables(64, 10000.0, 4096)
    assert cos.dtype == np.float32 and sin.dtype == np.float32 and cos.shape == (4096, 32)
    worst = 0.0
    for sc in (0.01, 1.0, 10.0, 100.0):
        x = rng.normal(0, sc, (4096, 64)).astype(np.float32)
        y = N.rope(x, cos, sin)
        assert y.dtype == np.float32 and y.shape == x.shape
        x0, x1 = x[:, 0::2].astype(np.float64), x[:, 1::2].astype(np.float64)
        c, s = cos.astype(np.float64), sin.astype(np.float64)
        for got, ref, mag in [(y[:, 0::2], x0 * c - x1 * s, np.abs(x0 * c) + np.abs(x1 * s)),
                              (y[:, 1::2], x0 * s + x1 * c, np.abs(x0 * s) + np.abs(x1 * c))]:
            worst = max(worst, (np.abs(got - ref) / (EPS * mag)).max())
    # two products and one sum, each within half an ulp: |err| <= EPS * (|x0 c| + |x1 s|)
    assert worst <= 1.0        # measured 0.962
    # position 0 is the identity
    assert np.array_equal(N.rope(x[:1], cos[:1], sin[:1]), x[:1])


# ---------------------------------------------------------------- activation quantizer

def test_quantize_act_properties():
    rng = _rng(17)
    worst_excess = 0.0
    over = 0
    for e in range(-110, 117, 4):                 # block maxima from ~2**-108 to ~2**122
        x = N.ftz((rng.normal(0, 1, (500, 64)) * 2.0 ** e).astype(np.float32))   # inputs are never subnormal
        x[::5, 0:32] = 0                          # all-zero blocks next to nonzero ones
        x[1::7, 40] *= 20                         # an outlier
        q, d, sumq = N.quantize_act(x)
        assert q.shape == (500, 2, 32) and d.shape == (500, 2) and sumq.shape == (500, 2)
        assert q.dtype == np.int8 and d.dtype == np.float32
        assert q.min() >= -127 and q.max() <= 127
        assert np.array_equal(sumq, q.astype(np.int64).sum(-1))
        blocks = x.reshape(500, 2, 32)
        amax = np.abs(blocks).max(-1)
        zero = amax == 0
        assert zero.sum() >= 100
        assert np.all(_bits(d[zero]) == 0) and np.all(q[zero] == 0) and np.all(sumq[zero] == 0)
        nz = ~zero
        # the spec, operation by operation
        assert np.array_equal(_bits(d), _bits(N.fmul(amax, N.INV127)))
        assert np.all(np.abs(q[nz]).max(-1) == 127)                 # the largest element maps to +-127
        assert np.all(_rel(d[nz], amax[nz].astype(np.float64) / 127) <= 1.0)   # two roundings
        deq = q.astype(np.float64) * d.astype(np.float64)[..., None]
        err = np.abs(deq - blocks)
        half = d.astype(np.float64)[..., None] / 2
        over += int(np.sum(err > half))
        with np.errstate(divide="ignore", invalid="ignore"):
            excess = np.where(blocks != 0, (err - half) / (EPS * np.abs(blocks)), 0.0)
        worst_excess = max(worst_excess, excess.max())
    # |q d - x| <= d/2 holds up to the rounding of id = 127 * recip(amax): a few elements
    # (x * id within a few ulps of a half-integer) go over d/2 by at most ~1.6 EPS |x|
    assert worst_excess <= 2.0       # measured 1.57
    assert over < 100                # measured 104 of 43.6 million (here: a few of 3.8 million)


def test_quantize_act_sumq_int32():
    _, _, sumq = N.quantize_act(np.ones(64, np.float32))
    assert sumq.dtype == np.int32


def test_quantize_act_tiny_block():
    """A block whose scale flushes to zero is a zero block (documented), with no NaN on the way."""
    x = np.zeros(32, np.float32)
    x[0], x[1] = 1e-37, -5e-38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, d, s = N.quantize_act(x)
    assert d[0] == 0 and np.all(q == 0) and s[0] == 0
    x[0] = 127 * 2.0 ** -126 * 1.01           # just above the limit: a live block
    q, d, _ = N.quantize_act(x)
    assert d[0] > 0 and np.abs(q).max() == 127


def test_quantize_act_huge_block():
    """amax >= 2**126 is outside the quantizer's range: q = 0, d = amax/127 (documented)."""
    x = np.zeros(32, np.float32)
    x[0], x[1] = 1e38, -3e37
    q, d, _ = N.quantize_act(x)
    assert d[0] > 0
    assert np.all(q == 0)


# ---------------------------------------------------------------- block values, matvec

@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_block_values_and_matvec_error(fmt):
    rng = _rng(18 + ["q4_0", "q4_1", "q8_0"].index(fmt))
    worst_blk = worst_row = 0.0
    for nb in (1, 2, 3, 5, 18, 128, 256):
        w = rng.normal(0, 0.05, (48, nb * 32)).astype(np.float32)
        raw = quant.quantize_rows(fmt, w)
        qw, dw, mw = quant.split_blocks(fmt, raw)
        x = (rng.normal(0, 1, nb * 32) * np.exp(rng.normal(0, 1, nb * 32))).astype(np.float32)
        qx, dx, sumq = N.quantize_act(x)
        isum = N.block_isum(qw, qx)
        assert isum.dtype == np.int32 and isum.shape == (48, nb)
        assert np.array_equal(isum, np.einsum("rbk,bk->rb", qw.astype(np.int64), qx.astype(np.int64)))
        v = N.block_values(fmt, isum, dw, mw, dx, sumq)
        assert v.dtype == np.float32 and v.shape == (48, nb)
        y = N.matvec_blocks(v)
        assert y.dtype == np.float32 and y.shape == (48,)
        dx64 = dx.astype(np.float64)
        t1 = isum * dw.astype(np.float64)
        if fmt == "q4_1":
            t2 = mw.astype(np.float64) * sumq
            ref_b, mag_b = (t1 + t2) * dx64, (np.abs(t1) + np.abs(t2)) * dx64
        else:
            ref_b, mag_b = t1 * dx64, np.abs(t1) * dx64
        # the block formula is the dot product of the dequantized weights and activations
        wdq = quant.dequantize_rows(fmt, raw).astype(np.float64)
        xdq = (qx.astype(np.float64) * dx64[:, None]).reshape(-1)
        np.testing.assert_allclose(wdq @ xdq, ref_b.sum(-1), rtol=0, atol=1e-12 * mag_b.sum(-1).max())
        with np.errstate(divide="ignore", invalid="ignore"):
            blk = np.where(mag_b > 0, np.abs(v - ref_b) / (EPS * mag_b), 0.0)
        worst_blk = max(worst_blk, blk.max())
        with np.errstate(divide="ignore", invalid="ignore"):
            row = np.where(mag_b.sum(-1) > 0, np.abs(y - ref_b.sum(-1)) / (EPS * mag_b.sum(-1)), 0.0)
        # worst case: the block's roundings, then ceil(nb/4) + 2 additions in accum4
        k = math.ceil(nb / 4) + 2 + (4 if fmt == "q4_1" else 2)
        assert np.all(row <= k / 2 * (1 + 1e-6))
        worst_row = max(worst_row, row.max())
    assert worst_blk <= 1.0 + 1e-6  # two roundings (q4_1: relative to |isum d| + |m sumq|); measured 0.96
    assert worst_row <= 1.5         # measured 1.22 (q8_0), 0.98 (q4_0), 0.68 (q4_1)


# ---------------------------------------------------------------- dtypes

def test_no_float64_results():
    x64 = np.linspace(-3, 3, 64)                       # float64 inputs must not leak through
    w64 = np.linspace(0.5, 1.5, 64)
    c, s = N.rope_tables(64, 10000.0, 4)
    outs = {
        "f32": N.f32(x64), "ftz": N.ftz(x64), "fadd": N.fadd(x64, 1.0), "fsub": N.fsub(1.0, x64),
        "fmul": N.fmul(x64, 2.0), "ldexp": N.ldexp(x64, 3), "reduce_sum": N.reduce_sum(x64),
        "accum4": N.accum4(x64), "vdot": N.vdot(x64, w64), "exp": N.exp(x64), "exp_scalar": N.exp(1.0),
        "recip": N.recip(w64), "rsqrt": N.rsqrt(w64), "silu": N.silu(x64), "softmax": N.softmax(x64),
        "rms_norm": N.rms_norm(x64, w64, 1e-5), "rope": N.rope(x64, c[1].astype(np.float64), s[1]),
        "from_f16": N.from_f16(x64), "dequantize_act": N.dequantize_act(*N.quantize_act(x64)[:2]),
        "matvec_blocks": N.matvec_blocks(np.ones((3, 5))), "rope_cos": c, "rope_sin": s,
        "block_values": N.block_values("q4_1", np.arange(4), np.ones(4, np.float16), np.ones(4, np.float16),
                                       np.ones(4), np.arange(4)),
    }
    for name, v in outs.items():
        assert np.asarray(v).dtype == np.float32, name
    q, d, _ = N.quantize_act(x64)
    assert q.dtype == np.int8 and d.dtype == np.float32
    assert N.to_f16(x64).dtype == np.float16                    # the KV-cache format
    assert N.block_isum(np.ones((2, 3, 32), np.int8), np.ones((3, 32), np.int8)).dtype == np.int32
    isum, sk = N.sparse_isum(np.ones((2, 3, 16), np.int8), np.zeros((2, 3, 16), np.int64),
                             np.ones((3, 32), np.int8), 4)
    assert isum.dtype == np.int32 and sk.dtype == np.int32
    for t in (N.EXP2_TABLE, N.RECIP_TABLE, N.RSQRT_TABLE_EVEN, N.RSQRT_TABLE_ODD):
        assert t.dtype == np.float32 and t.shape == (64,)
