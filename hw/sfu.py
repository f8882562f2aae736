"""The special-function unit: exp, recip, rsqrt, silu and the vector ops, bit-exact to the spec.

The special functions are pipeline builders (:func:`exp_pipe`,
:func:`recip_rsqrt_pipe`, :func:`silu_pipe`) on :class:`llmfab.hw.fp.Pipe`, in
the exact operation order of ``sim/numerics.py``; the quantizer reuses
``recip_rsqrt_pipe``. :class:`Sfu` (unit ``sfu``) runs them and the vector
ops (rms_norm, softmax, rope, residual add, elementwise multiply, reduce_sum,
vdot) over fp32 streams; see its docstring and docs/hw-fp.md.
"""

from amaranth import Array, C, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..sim import numerics as nx
from .fp import (CANONICAL_NAN, F32, POS_INF, FAddCore, Pipe, Staged, f32_bits, f32_key,
                 floor_int, int_to_f32, ldexp, stall_control)

__all__ = ["exp_pipe", "recip_rsqrt_pipe", "silu_pipe", "SfuOp", "SfuIn", "SfuOut",
           "Reducer", "Sfu", "units"]


def _table(values):
    return [int(v) for v in f32_bits_array(values)]


def f32_bits_array(values):
    import numpy as np
    return np.asarray(values, dtype=np.float32).view(np.uint32)


LOG2E = f32_bits(nx.LOG2E)
EXP_C1, EXP_C2, EXP_C3 = (f32_bits(nx.EXP_C1), f32_bits(nx.EXP_C2), f32_bits(nx.EXP_C3))
ONE, TWO, HALF, THREE_HALVES = (f32_bits(1.0), f32_bits(2.0), f32_bits(0.5), f32_bits(1.5))
F_M150, F_128 = f32_bits(-150.0), f32_bits(128.0)
EXP2_TABLE = _table(nx.EXP2_TABLE)
RECIP_TABLE = _table(nx.RECIP_TABLE)
RSQRT_TABLE_EVEN = _table(nx.RSQRT_TABLE_EVEN)
RSQRT_TABLE_ODD = _table(nx.RSQRT_TABLE_ODD)


def _key_const(bits):
    return (bits ^ 0xFFFFFFFF) if bits >> 31 else (bits | 0x80000000)


# ---- special functions as pipelines --------------------------------------------------------

def exp_pipe(p: Pipe, x) -> Staged:
    """``nx.exp``: y = x*log2e clamped to [-150, 128]; n = floor(y); f = y - n;
    k = min(floor(64 f), 63); r = f - k/64; cubic in r (fmul, fadd steps);
    ldexp(T[k] * p, n); inf when y >= 128; NaN for NaN. 35 stages."""
    m = p.m
    x = p.lift(x)
    y = p.fmul(x, LOG2E)

    def clamp_floor(y):
        k = f32_key(y)
        yc = Signal(32, name=p._fresh("yc"))
        m.d.comb += yc.eq(Mux(k < _key_const(F_M150), F_M150,
                              Mux(k > _key_const(F_128), F_128, y)))
        return yc, floor_int(m, yc, 10, name=p._fresh("fl")), k >= _key_const(F_128)
    yc, n, big = p.comb(clamp_floor, y)
    nf = p.comb(lambda n: int_to_f32(m, n, name=p._fresh("nf")), n)
    f = p.fsub(yc, nf)

    def index(f):
        fv = data.View(F32, f)
        f64 = Cat(fv.frac, Mux(fv.exp == 0, 0, fv.exp + 6)[0:8], fv.sign)   # f * 64, exact
        k = floor_int(m, f64, 8, name=p._fresh("k"))
        return Mux(k > 63, 63, k)[0:6]
    k = p.comb(index, f)

    def k_over_64(k):
        kk = int_to_f32(m, k.as_unsigned(), name=p._fresh("kf"))
        return Mux(k == 0, 0, (kk - (6 << 23))[0:32]), Array(Const(v, 32) for v in EXP2_TABLE)[k]
    kf, t = p.comb(k_over_64, k)
    r = p.fsub(f, kf)
    q = p.fadd(p.fmul(EXP_C3, r), EXP_C2)
    q = p.fadd(p.fmul(q, r), EXP_C1)
    q = p.fadd(p.fmul(q, r), ONE)
    v = p.fmul(t, q)
    x_nan = p.comb(lambda x: (x[23:31] == 0xFF) & (x[0:23] != 0), x, latency=0)

    def finish(v, n, big, x_nan):
        out = ldexp(m, v, n, name=p._fresh("ex"))
        return Mux(x_nan, CANONICAL_NAN, Mux(big, POS_INF, out))
    return p.comb(finish, v, n, big, x_nan)


def recip_rsqrt_pipe(p: Pipe, a, rsqrt) -> Staged:
    """``nx.recip`` (``rsqrt`` low) or ``nx.rsqrt`` (``rsqrt`` high), one shared datapath.

    a = m 2**e; y0 from the 64-entry table; h = fmul(kk, mm) with kk = 1 (recip)
    or 0.5 (rsqrt), mm = m or 2m (rsqrt, odd e); twice
    ``y = fmul(y, fsub(c, fmul(h, fmul(y, s))))`` with s = 1.0, c = 2 (recip: the
    spec's ``fmul(m, y)``, as ``y * 1.0`` is exact) or s = y, c = 1.5 (rsqrt).
    Then ldexp by -e (recip, sign restored) or -(e - odd)/2. 30 stages.
    A subnormal input is read as zero.
    """
    m = p.m
    a = p.lift(a)
    rs = p.lift(rsqrt)

    def decode(a, rs):
        av = data.View(F32, a)
        e = Signal(signed(10), name=p._fresh("e"))
        m.d.comb += e.eq(av.exp - 127)
        odd = e[0]
        idx = av.frac[17:23]
        roms = Array(Const(v, 32) for v in RECIP_TABLE + RSQRT_TABLE_EVEN + [0] * 64
                     + RSQRT_TABLE_ODD)
        y0 = roms[Cat(idx, rs, rs & odd)]
        mm = Cat(av.frac, Mux(rs & odd, C(128, 8), C(127, 8)), C(0, 1))
        kk = Mux(rs, HALF, ONE)
        cc = Mux(rs, THREE_HALVES, TWO)
        ss = Mux(rs, 0, ONE)                 # 0 selects y itself below
        scale = Signal(signed(10), name=p._fresh("sc"))
        m.d.comb += scale.eq(Mux(rs, -((e - odd) >> 1), -e))
        zero = av.exp == 0
        inf = (av.exp == 255) & (av.frac == 0)
        nan = (av.exp == 255) & (av.frac != 0)
        special = Signal(name=p._fresh("sp"))
        sval = Signal(32, name=p._fresh("sv"))
        m.d.comb += special.eq(zero | inf | nan | (rs & av.sign))
        with m.If(nan | (rs & av.sign & ~zero)):
            m.d.comb += sval.eq(CANONICAL_NAN)
        with m.Elif(zero):
            m.d.comb += sval.eq(Mux(rs, POS_INF, Cat(C(0, 23), C(255, 8), av.sign)))
        with m.Else():                        # inf
            m.d.comb += sval.eq(Mux(rs, 0, Cat(C(0, 31), av.sign)))
        return y0, mm, kk, cc, ss, scale, special, sval, av.sign & ~rs
    y, mm, kk, cc, ss, scale, special, sval, sign = p.comb(decode, a, rs)
    h = p.fmul(kk, mm)
    for _ in range(2):
        s = p.comb(lambda ss, y: Mux(ss == 0, y, ss), ss, y, latency=0)
        t = p.fmul(h, p.fmul(y, s))
        y = p.fmul(y, p.fsub(cc, t))

    def finish(y, scale, special, sval, sign):
        out = ldexp(m, y, scale, name=p._fresh("nr"))
        return Mux(special, sval, out | (sign << 31))
    return p.comb(finish, y, scale, special, sval, sign)


def silu_pipe(p: Pipe, x) -> Staged:
    """``nx.silu``: fmul(x, recip(fadd(1, exp(-x))))."""
    x = p.lift(x)
    e = exp_pipe(p, p.comb(lambda x: x ^ 0x80000000, x, latency=0))
    r = recip_rsqrt_pipe(p, p.fadd(ONE, e), 0)
    return p.fmul(x, r)


def units(config) -> dict:
    return {}
