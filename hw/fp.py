"""binary32 arithmetic for the accelerator: adder, multiplier, conversions, pipeline builder.

Every operation follows ``core/numerics.py`` bit for bit: IEEE binary32 round to
nearest even, computed as IEEE with gradual underflow and then flushed to a
zero of the same sign when the result is subnormal (FTZ). Inputs are never
subnormal in the datapath; a subnormal input is read as a zero of its sign.
NaN results are the canonical quiet NaN ``0x7fc00000`` (numpy may give another
NaN bit pattern; the tests compare NaN-ness only). See docs/hw-fp.md.

Pieces
------
* :class:`FAddCore`, :class:`FMulCore` -- fixed-latency pipelines (3 cycles
  each) whose registers advance when ``ce`` is high. They are the building
  blocks of every float datapath.
* :class:`Pipe` -- a builder of stall-able fixed-latency pipelines: values carry
  the pipeline stage where they are valid, operations delay the earlier
  operand to line up, so a datapath is written as a plain expression
  (``p.fmul(p.fadd(x, y), z)``) and the latency falls out.
* combinational helpers: :func:`int_to_f32`, :func:`f16_to_f32`,
  :func:`f32_to_f16`, :func:`ldexp`, :func:`floor_int`, :func:`f32_key`.
* stream units (the registry entries): :class:`FAdd` (``fp_add``),
  :class:`FMul` (``fp_mul``), :class:`FConvert` (``fp_cvt``).
"""




from amaranth import C, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = [
    "F32", "F16", "CANONICAL_NAN", "F16_NAN", "FADD_LATENCY", "FMUL_LATENCY",
    "f32_bits", "lzc", "lzc_tree", "round_pack", "int_to_f32", "f16_to_f32", "f32_to_f16", "ldexp",
    "floor_int", "f32_key", "FAddCore", "FMulCore", "Pipe", "Staged", "stall_control",
    "valid_chain",
    "FAddOperands", "FMulOperands", "CvtOp", "CvtOperands",
    "FAdd", "FMul", "FConvert", "units",
]

#: binary32 fields (LSB first).
F32 = data.StructLayout({"frac": 23, "exp": 8, "sign": 1})
#: binary16 fields (LSB first).
F16 = data.StructLayout({"frac": 10, "exp": 5, "sign": 1})
#: The NaN every unit produces.
CANONICAL_NAN = 0x7FC00000
F16_NAN = 0x7E00
POS_INF = 0x7F800000

FADD_LATENCY = 3
FMUL_LATENCY = 3


def f32_bits(x: float) -> int:
    """The binary32 bit pattern of a Python float (for constants)."""
    import numpy as np
    return int(np.float32(x).view(np.uint32))


# ---- combinational helpers ------------------------------------------------------------

def lzc(value, width=None):
    """Leading-zero count of ``value`` (``width`` bits); ``width`` when it is zero."""
    width = len(value) if width is None else width
    r = Const(width, range(width + 1))
    for i in range(width):                  # the most significant set bit wins (last Mux)
        r = Mux(value[i], width - 1 - i, r)
    return r


def lzc_tree(value):
    """Leading-zero count of ``value`` by a tree: ``(count, zero)``.

    ``value`` is padded with zeros below to a power of two ``w``; ``count``
    (``log2(w)`` bits) is exact when ``zero`` is low and 0 when it is high.
    Depth ``log2(w)`` 2:1 muxes instead of :func:`lzc`'s chain of ``width``.
    """
    width = len(value)
    w = 1
    while w < width:
        w *= 2
    bits_ = Cat(C(0, w - width), value) if w > width else value
    # level 0: one bit each, (zero, count with 0 bits)
    nodes = [(~bits_[i], None) for i in range(w)]       # LSB first
    while len(nodes) > 1:
        nxt = []
        for j in range(0, len(nodes), 2):
            (zl, cl), (zh, ch) = nodes[j], nodes[j + 1]   # low half, high half
            if ch is None:
                cnt = zh
            else:
                cnt = Cat(Mux(zh, cl, ch), zh)
            nxt.append((zh & zl, cnt))
        nodes = nxt
    zero, count = nodes[0]
    return (count if count is not None else C(0, 1)), zero


def round_pack(m, sign, e, n24, g, rest, *, name="rp"):
    """Round a normalized result and pack it, with the spec's overflow and FTZ rules.

    The value is ``1.n24[22:0] x 2**(e-127)`` (``n24[23]`` set) with guard bit
    ``g`` and sticky ``rest`` below. ``e`` is a signed biased exponent (any
    range). Round to nearest even; ``e >= 255`` after rounding gives inf. When
    ``e <= 0`` the IEEE result would be subnormal: it is flushed to a signed
    zero, except that a value ``>= 2**-126 - 2**-150`` (``e == 0`` and ``n24``
    all ones) rounds to the minimum normal in IEEE arithmetic and is kept.
    """
    up = g & (rest | n24[0])
    mant = Signal(25, name=f"{name}_mant")
    m.d.comb += mant.eq(n24 + up)
    er = Signal(signed(12), name=f"{name}_er")
    m.d.comb += er.eq(e + mant[24])
    frac = Mux(mant[24], 0, mant[0:23])
    out = Signal(32, name=f"{name}_out")
    with m.If(er >= 255):
        m.d.comb += out.eq(Cat(C(0, 23), C(255, 8), sign))
    with m.Elif(er >= 1):
        m.d.comb += out.eq(Cat(frac, er[0:8], sign))
    with m.Elif((e == 0) & (n24 == 0xFFFFFF)):
        m.d.comb += out.eq(Cat(C(0, 23), C(1, 8), sign))
    with m.Else():
        m.d.comb += out.eq(Cat(C(0, 31), sign))
    return out


def int_to_f32(m, v, *, name="i2f"):
    """Integer (up to 32 bits, signed or unsigned below 2**31) to binary32, RNE (exact below 2**24)."""
    if not v.shape().signed:
        v = Cat(v, C(0, 1))
    v = v.as_signed()
    w = 32
    sign = v[-1]
    mag = Signal(w, name=f"{name}_mag")
    m.d.comb += mag.eq(Mux(sign, -v, v))
    lz = lzc(mag, w)
    norm = Signal(w, name=f"{name}_norm")
    m.d.comb += norm.eq(mag << lz)
    e = Signal(signed(10), name=f"{name}_e")
    m.d.comb += e.eq(127 + 31 - lz)
    packed = round_pack(m, sign, e, norm[8:32], norm[7], norm[0:7].any(), name=name)
    return Mux(mag == 0, 0, packed)


def f16_to_f32(m, h, *, name="h2f"):
    """binary16 to binary32, exact (fp16 subnormals become normal); NaN is canonical."""
    h = data.View(F16, h)
    out = Signal(32, name=f"{name}_out")
    lz = lzc(h.frac, 10)                       # subnormal: value = frac * 2**-24
    sub_frac = Signal(10, name=f"{name}_sf")
    m.d.comb += sub_frac.eq(h.frac << (lz + 1))
    with m.If(h.exp == 31):
        m.d.comb += out.eq(Mux(h.frac == 0, Cat(C(0, 23), C(255, 8), h.sign), CANONICAL_NAN))
    with m.Elif(h.exp != 0):
        m.d.comb += out.eq(Cat(C(0, 13), h.frac, h.exp + (127 - 15), h.sign))
    with m.Elif(h.frac != 0):
        # frac's top set bit at 9 - lz: value 2**(9-lz-24) * 1.xxx
        m.d.comb += out.eq(Cat(C(0, 13), sub_frac, (127 - 15 - lz).as_unsigned()[0:8], h.sign))
    with m.Else():
        m.d.comb += out.eq(Cat(C(0, 31), h.sign))
    return out


def f32_to_f16(m, x, *, name="f2h"):
    """binary32 to binary16: RNE, fp16 subnormals kept, overflow to inf (numpy astype)."""
    x = data.View(F32, x)
    out = Signal(16, name=f"{name}_out")
    mant = Cat(x.frac, C(1, 1))                  # 24 bits
    e = Signal(signed(10), name=f"{name}_e")
    m.d.comb += e.eq(x.exp - 127 + 15)          # fp16 biased exponent if normal
    # drop = 13 for normal fp16 results, 13 + (1 - e) for subnormal ones (capped at 25)
    drop = Signal(range(26), name=f"{name}_drop")
    with m.If(e >= 1):
        m.d.comb += drop.eq(13)
    with m.Elif(e >= -11):
        m.d.comb += drop.eq(14 - e)
    with m.Else():
        m.d.comb += drop.eq(25)
    wide = Signal(49, name=f"{name}_wide")
    m.d.comb += wide.eq(Cat(C(0, 25), mant) >> drop)   # kept bits at [25:], dropped below
    kept = wide[25:49]
    g = wide[24]
    rest = wide[0:24].any()
    up = g & (rest | kept[0])
    base = Signal(16, name=f"{name}_base")
    m.d.comb += base.eq(Mux(e >= 1, Cat(kept[0:10], e[0:5]), kept[0:10]))
    with m.If((x.exp == 255) & (x.frac != 0)):
        m.d.comb += out.eq(F16_NAN | (x.sign << 15))
    with m.Elif((x.exp == 255) | (e >= 31)):
        m.d.comb += out.eq(Cat(C(0, 10), C(31, 5), x.sign))
    with m.Elif(x.exp == 0):
        m.d.comb += out.eq(Cat(C(0, 15), x.sign))
    with m.Else():
        # a carry out of the fraction bumps the exponent (and reaches inf) by itself
        m.d.comb += out.eq(Cat((base[0:15] + up)[0:15], x.sign))
    return out


def ldexp(m, x, n, *, name="ldexp"):
    """``x * 2**n`` for binary32 ``x`` and a signed integer ``n`` (spec ``ldexp``).

    Exact unless it overflows (inf) or underflows: a subnormal result flushes
    to a signed zero, except the one that rounds up to the minimum normal.
    Zero, inf and NaN pass through (NaN canonical).
    """
    x = data.View(F32, x)
    n = n.as_signed()
    e = Signal(signed(max(len(n), 9) + 2), name=f"{name}_e")
    m.d.comb += e.eq(x.exp + n)
    out = Signal(32, name=f"{name}_out")
    with m.If(x.exp == 255):
        m.d.comb += out.eq(Mux(x.frac == 0, x.as_value(), CANONICAL_NAN))
    with m.Elif(x.exp == 0):
        m.d.comb += out.eq(Cat(C(0, 31), x.sign))
    with m.Elif(e >= 255):
        m.d.comb += out.eq(Cat(C(0, 23), C(255, 8), x.sign))
    with m.Elif(e >= 1):
        m.d.comb += out.eq(Cat(x.frac, e[0:8], x.sign))
    with m.Elif((e == 0) & (x.frac == 0x7FFFFF)):
        m.d.comb += out.eq(Cat(C(0, 23), C(1, 8), x.sign))
    with m.Else():
        m.d.comb += out.eq(Cat(C(0, 31), x.sign))
    return out


def floor_int(m, x, width, *, name="floor"):
    """``floor(x)`` of binary32 ``x`` as a signed ``width``-bit integer.

    Valid for ``|x| < 2**(width-1)`` and ``|x| < 2**24``; zeros and subnormals
    give 0. No NaN/inf handling (callers clamp first).
    """
    x = data.View(F32, x)
    mant = Cat(x.frac, C(1, 1))
    s = Signal(signed(10), name=f"{name}_s")
    m.d.comb += s.eq(150 - x.exp)                 # 23 - unbiased exponent
    ip = Signal(24, name=f"{name}_ip")
    fnz = Signal(name=f"{name}_fnz")
    sh = Signal(range(25), name=f"{name}_sh")
    m.d.comb += sh.eq(Mux(s > 24, 24, Mux(s < 0, 0, s)))
    m.d.comb += [ip.eq(mant >> sh),
                 fnz.eq((mant & ((C(1, 25) << sh) - 1)[0:24]).any())]
    out = Signal(signed(width), name=f"{name}_out")
    with m.If(x.exp == 0):
        m.d.comb += out.eq(0)
    with m.Elif(x.sign):
        m.d.comb += out.eq(-(ip + fnz))
    with m.Else():
        m.d.comb += out.eq(ip)
    return out


def f32_key(x):
    """An unsigned key that orders non-NaN binary32 values like the reals (-0 < +0)."""
    x = x.as_value() if isinstance(x, data.View) else x
    return Mux(x[31], ~x, x | 0x80000000)


# ---- pipelined cores -----------------------------------------------------------------

class FAddCore(wiring.Component):
    """binary32 ``a + b`` (``a - b`` when ``sub``), RNE + FTZ, latency 3, advancing on ``ce``.

    Stage 1 orders the operands by magnitude (a 31-bit compare of the raw
    patterns) and aligns the smaller significand (27-bit right shift; the
    sticky bit from a mask of the shifted-out positions, no wide shift).
    Stage 2 adds or subtracts (one adder, ``big + (small ^ sub) + sub``) and
    counts leading zeros with a tree (:func:`lzc_tree`). Stage 3 shifts left
    by the count (the carry-out case is a count of 0, no separate right
    shift), rounds and packs: the fraction and the exponent field are one
    32-bit increment, so a rounding carry moves into the exponent by itself.
    An adder's result below ``2**-126`` is exact (both operands are multiples
    of ``2**-149``), so it never rounds and flushes whenever its exponent is
    ``<= 0``; :func:`round_pack`'s exception cannot occur here.

    Members
    -------
    a, b : In(32)
    sub : In(1)
    ce : In(1)
        Clock enable of every pipeline register.
    o : Out(32)
        The result ``latency`` enabled cycles after the operands.
    """
    a: In(32)
    b: In(32)
    sub: In(1)
    ce: In(1)
    o: Out(32)

    latency = FADD_LATENCY

    def elaborate(self, platform):
        m = Module()
        ce = self.ce
        a = data.View(F32, self.a)
        b = data.View(F32, self.b)
        sb = b.sign ^ self.sub

        # ---- stage 1: classify, order by magnitude, align the smaller operand
        a_zero, b_zero = a.exp == 0, b.exp == 0
        a_inf = (a.exp == 255) & (a.frac == 0)
        b_inf = (b.exp == 255) & (b.frac == 0)
        a_nan = (a.exp == 255) & (a.frac != 0)
        b_nan = (b.exp == 255) & (b.frac != 0)
        # The raw patterns order the magnitudes: a subnormal (read as zero) is below every
        # normal, and when both are zero the order does not matter.
        swap = Signal()
        m.d.comb += swap.eq(self.b[0:31] > self.a[0:31])
        ma = Mux(a_zero, 0, Cat(a.frac, C(1, 1)))
        mb = Mux(b_zero, 0, Cat(b.frac, C(1, 1)))
        big_m = Signal(24)
        small_m = Signal(24)
        big_e = Signal(8)
        d = Signal(8)
        m.d.comb += [big_m.eq(Mux(swap, mb, ma)), small_m.eq(Mux(swap, ma, mb)),
                     big_e.eq(Mux(swap, b.exp, a.exp)),
                     d.eq(Mux(swap, b.exp - a.exp, a.exp - b.exp))]
        far = d[5:8].any()                      # d >= 32: everything is shifted out
        aligned = Signal(27)
        m.d.comb += aligned.eq(Mux(far, 0, Cat(C(0, 3), small_m) >> d[0:5]))
        # small_m[i] is shifted out (below the 3 guard bits) when d >= i + 4
        lost = Cat(*[small_m[i] & (far | (d[0:5] >= i + 4)) for i in range(24)])
        sticky = lost.any()

        r1_sign = Signal()
        r1_exp = Signal(8)
        r1_big = Signal(24)
        r1_small = Signal(27)
        r1_sub = Signal()
        r1_nan = Signal()
        r1_inf = Signal()
        r1_inf_sign = Signal()
        with m.If(ce):
            m.d.sync += [
                r1_sign.eq(Mux(swap, sb, a.sign)),
                r1_exp.eq(big_e),
                r1_big.eq(big_m),
                r1_small.eq(aligned | sticky),
                r1_sub.eq(a.sign ^ sb),
                r1_nan.eq(a_nan | b_nan | (a_inf & b_inf & (a.sign ^ sb))),
                r1_inf.eq(a_inf | b_inf),
                r1_inf_sign.eq(Mux(a_inf, a.sign, sb)),
            ]

        # ---- stage 2: add or subtract the significands (big >= small), count leading zeros
        total = Signal(28)
        ys = Signal(28)
        m.d.comb += [ys.eq(Cat(r1_small, C(0, 1)) ^ r1_sub.replicate(28)),
                     total.eq(Cat(C(0, 3), r1_big) + ys + r1_sub)]
        lz, zero = lzc_tree(total)
        r2_total = Signal(28)
        r2_lz = Signal(5)
        r2_zero = Signal()
        r2 = [Signal.like(s, name=f"r2_{s.name[3:]}")
              for s in (r1_sign, r1_exp, r1_sub, r1_nan, r1_inf, r1_inf_sign)]
        r2_sign, r2_exp, r2_sub, r2_nan, r2_inf, r2_inf_sign = r2
        with m.If(ce):
            m.d.sync += [r2_total.eq(total), r2_lz.eq(lz), r2_zero.eq(zero)]
            m.d.sync += [d_.eq(s_) for d_, s_ in zip(
                r2, (r1_sign, r1_exp, r1_sub, r1_nan, r1_inf, r1_inf_sign))]

        # ---- stage 3: normalize (left by the count; 0 when the sum carried), round, pack
        n = Signal(28)
        m.d.comb += n.eq(r2_total << r2_lz)
        e = Signal(signed(10))
        m.d.comb += e.eq(r2_exp + 1 - r2_lz)
        up = n[3] & (n[0:3].any() | n[4])
        # 1.frac x 2**(e-127): the exponent field and the fraction in one increment (the
        # hidden bit n[27] is left out, a rounding carry out of the fraction bumps e)
        pk = Signal(32)
        m.d.comb += pk.eq(Cat(n[4:27], e[0:9]) + up)
        res = Signal(32)
        with m.If(r2_nan):
            m.d.comb += res.eq(CANONICAL_NAN)
        with m.Elif(r2_inf):
            m.d.comb += res.eq(Cat(C(0, 23), C(255, 8), r2_inf_sign))
        with m.Elif(r2_zero):
            m.d.comb += res.eq(Cat(C(0, 31), r2_sign & ~r2_sub))
        with m.Elif(e <= 0):                    # exact and subnormal: flush
            m.d.comb += res.eq(Cat(C(0, 31), r2_sign))
        with m.Elif(pk[23:32] >= 255):
            m.d.comb += res.eq(Cat(C(0, 23), C(255, 8), r2_sign))
        with m.Else():
            m.d.comb += res.eq(Cat(pk[0:31], r2_sign))
        with m.If(ce):
            m.d.sync += self.o.eq(res)
        return m


class FMulCore(wiring.Component):
    """binary32 ``a * b``, RNE + FTZ, latency 3, advancing on ``ce``.

    The 24x24 significand product sits alone in the middle stage, registered
    on both sides, so synthesis maps it to DSP blocks (two DSP48E2).

    Members
    -------
    a, b : In(32)
    ce : In(1)
    o : Out(32)
    """
    a: In(32)
    b: In(32)
    ce: In(1)
    o: Out(32)

    latency = FMUL_LATENCY

    def elaborate(self, platform):
        m = Module()
        ce = self.ce
        a = data.View(F32, self.a)
        b = data.View(F32, self.b)
        a_zero, b_zero = a.exp == 0, b.exp == 0
        a_inf = (a.exp == 255) & (a.frac == 0)
        b_inf = (b.exp == 255) & (b.frac == 0)
        a_nan = (a.exp == 255) & (a.frac != 0)
        b_nan = (b.exp == 255) & (b.frac != 0)

        # ---- stage 1: operands and exceptions
        r1_ma = Signal(24)
        r1_mb = Signal(24)
        r1_e = Signal(signed(11))
        r1_sign = Signal()
        r1_nan = Signal()
        r1_inf = Signal()
        r1_zero = Signal()
        with m.If(ce):
            m.d.sync += [
                r1_ma.eq(Cat(a.frac, C(1, 1))), r1_mb.eq(Cat(b.frac, C(1, 1))),
                r1_e.eq(a.exp + b.exp - 127),
                r1_sign.eq(a.sign ^ b.sign),
                r1_nan.eq(a_nan | b_nan | (a_inf & b_zero) | (b_inf & a_zero)),
                r1_inf.eq(a_inf | b_inf),
                r1_zero.eq(a_zero | b_zero),
            ]
        # ---- stage 2: the product (DSP)
        r2_p = Signal(48)
        r2 = [Signal.like(s, name=f"r2_{s.name[3:]}") for s in (r1_e, r1_sign, r1_nan, r1_inf, r1_zero)]
        r2_e, r2_sign, r2_nan, r2_inf, r2_zero = r2
        with m.If(ce):
            m.d.sync += r2_p.eq(r1_ma * r1_mb)
            m.d.sync += [d_.eq(s_) for d_, s_ in zip(r2, (r1_e, r1_sign, r1_nan, r1_inf, r1_zero))]
        # ---- stage 3: normalize, round, pack
        hi = r2_p[47]
        n24 = Mux(hi, r2_p[24:48], r2_p[23:47])
        g = Mux(hi, r2_p[23], r2_p[22])
        rest = Mux(hi, r2_p[0:23].any(), r2_p[0:22].any())
        e = Signal(signed(12))
        m.d.comb += e.eq(r2_e + hi)
        packed = round_pack(m, r2_sign, e, n24, g, rest, name="mul")
        res = Signal(32)
        with m.If(r2_nan):
            m.d.comb += res.eq(CANONICAL_NAN)
        with m.Elif(r2_inf):
            m.d.comb += res.eq(Cat(C(0, 23), C(255, 8), r2_sign))
        with m.Elif(r2_zero):
            m.d.comb += res.eq(Cat(C(0, 31), r2_sign))
        with m.Else():
            m.d.comb += res.eq(packed)
        with m.If(ce):
            m.d.sync += self.o.eq(res)
        return m


# ---- pipeline builder ------------------------------------------------------------------

class Staged:
    """A value and the pipeline stage at which it is valid (``None``: a constant)."""

    __slots__ = ("value", "stage", "delays")

    def __init__(self, value, stage):
        self.value = value
        self.stage = stage
        self.delays = []

    def __repr__(self):
        return f"Staged({self.value!r}, stage={self.stage})"


class Pipe:
    """Builder of a fixed-latency pipeline whose registers all advance on ``ce``.

    Values are :class:`Staged`; every operation lines its operands up at the
    latest of their stages (inserting ``ce``-enabled delay registers) and
    returns its result with the stage where it is valid. ``p.latency(x)`` is
    the stage of ``x``. Use :func:`stall_control` for the valid bits and ``ce``.
    """

    def __init__(self, m, ce, *, name="p"):
        self.m = m
        self.ce = ce
        self.name = name
        self._n = 0

    def _fresh(self, what):
        self._n += 1
        return f"{self.name}_{what}{self._n}"

    def input(self, value, stage=0) -> Staged:
        return Staged(value, stage)

    def const(self, value) -> Staged:
        return Staged(Const(value, 32) if isinstance(value, int) else value, None)

    def lift(self, x) -> Staged:
        if isinstance(x, Staged):
            return x
        if isinstance(x, int):
            return self.const(x)
        return Staged(x, 0)

    def at(self, x, stage):
        """The value of ``x`` delayed to ``stage``."""
        x = self.lift(x)
        if x.stage is None:
            return x.value
        k = stage - x.stage
        if k < 0:
            raise ValueError(f"Value at stage {x.stage} is not available at stage {stage}")
        while len(x.delays) < k:
            prev = x.delays[-1] if x.delays else x.value
            shape = prev.shape()
            reg = Signal(shape, name=self._fresh("d"), reset_less=True)
            with self.m.If(self.ce):
                self.m.d.sync += reg.eq(prev)
            x.delays.append(reg)
        return x.delays[k - 1] if k else x.value

    @staticmethod
    def stage_of(*xs):
        stages = [x.stage for x in xs if isinstance(x, Staged) and x.stage is not None]
        return max(stages) if stages else 0

    def comb(self, fn, *xs, latency=1, name="c"):
        """``fn(*values)`` -- combinational logic on the operands lined up at their
        latest stage -- registered ``latency`` times. ``fn`` may return a tuple:
        the result is then a list of :class:`Staged`."""
        xs = [self.lift(x) for x in xs]
        s = self.stage_of(*xs)
        res = fn(*[self.at(x, s) for x in xs])
        many = isinstance(res, (tuple, list))
        outs = []
        for r in (res if many else [res]):
            if not isinstance(r, (Signal, data.View)):
                sig = Signal(r.shape(), name=self._fresh(name))
                self.m.d.comb += sig.eq(r)
                r = sig
            out = Staged(r, s)
            if latency:
                out = Staged(self.at(out, s + latency), s + latency)
            outs.append(out)
        return outs if many else outs[0]

    def fadd(self, a, b, sub=0) -> Staged:
        a, b, sub = self.lift(a), self.lift(b), self.lift(sub)
        s = self.stage_of(a, b, sub)
        core = FAddCore()
        self.m.submodules[self._fresh("fadd")] = core
        self.m.d.comb += [core.a.eq(self.at(a, s)), core.b.eq(self.at(b, s)),
                          core.sub.eq(self.at(sub, s)), core.ce.eq(self.ce)]
        return Staged(core.o, s + core.latency)

    def fsub(self, a, b) -> Staged:
        return self.fadd(a, b, 1)

    def fmul(self, a, b) -> Staged:
        a, b = self.lift(a), self.lift(b)
        s = self.stage_of(a, b)
        core = FMulCore()
        self.m.submodules[self._fresh("fmul")] = core
        self.m.d.comb += [core.a.eq(self.at(a, s)), core.b.eq(self.at(b, s)),
                          core.ce.eq(self.ce)]
        return Staged(core.o, s + core.latency)


def stall_control(m, i_valid, o_ready, latency, *, name="pipe"):
    """Valid bits of a ``latency``-stage pipeline that stalls as a whole.

    Returns ``(ce, o_valid)``: ``ce = ~o_valid | o_ready`` advances every
    register (input ready is ``ce``), so the pipeline takes one item per cycle
    while the output is consumed and holds everything while it is not.
    """
    ce = Signal(name=f"{name}_ce")
    valids = valid_chain(m, ce, i_valid, latency, name=name)
    o_valid = valids[-1]
    m.d.comb += ce.eq(~o_valid | o_ready)
    return ce, o_valid


def valid_chain(m, ce, i_valid, latency, *, name="pipe"):
    """``[i_valid, v1, ..., v_latency]``: the valid bit at every stage of a ``ce`` pipeline."""
    valids = [i_valid] + [Signal(name=f"{name}_v{i + 1}") for i in range(latency)]
    with m.If(ce):
        m.d.sync += [valids[i].eq(valids[i - 1]) for i in range(1, latency + 1)]
    return valids


# ---- stream units ----------------------------------------------------------------------

FAddOperands = data.StructLayout({"a": 32, "b": 32, "sub": 1})
FMulOperands = data.StructLayout({"a": 32, "b": 32})


class CvtOp(enum.Enum, shape=3):
    """Operation of :class:`FConvert`."""
    INT_TO_F32 = 0   #: x (int32) -> binary32, RNE
    F16_TO_F32 = 1   #: x[15:0] (binary16) -> binary32, exact
    F32_TO_F16 = 2   #: x (binary32) -> binary16 in o[15:0], RNE
    LDEXP = 3        #: x * 2**n
    FLOOR = 4        #: floor(x) as int32 (|x| < 2**24)


CvtOperands = data.StructLayout({"x": 32, "n": signed(10), "op": CvtOp})


class _StreamOp(wiring.Component):
    def __init__(self, operands):
        super().__init__({
            "i": In(stream.Signature(operands)),
            "o": Out(stream.Signature(32)),
        })


class FAdd(_StreamOp):
    """Stream binary32 adder/subtractor (unit ``fp_add``).

    Latency 3 cycles, one operation per cycle: ``i.ready`` is high whenever
    the output register is empty or being read.

    Members
    -------
    i : In(stream.Signature(FAddOperands))
        ``a``, ``b`` (binary32) and ``sub`` (1: ``a - b``).
    o : Out(stream.Signature(32))
        ``a + b`` or ``a - b``.
    """

    latency = FADD_LATENCY

    def __init__(self):
        super().__init__(FAddOperands)

    def elaborate(self, platform):
        m = Module()
        ce, valid = stall_control(m, self.i.valid, self.o.ready, self.latency)
        p = Pipe(m, ce)
        r = p.fadd(self.i.payload.a, self.i.payload.b, self.i.payload.sub)
        m.d.comb += [self.i.ready.eq(ce), self.o.valid.eq(valid), self.o.payload.eq(r.value)]
        return m


class FMul(_StreamOp):
    """Stream binary32 multiplier (unit ``fp_mul``): latency 3, one operation per cycle.

    Members
    -------
    i : In(stream.Signature(FMulOperands))
    o : Out(stream.Signature(32))
    """

    latency = FMUL_LATENCY

    def __init__(self):
        super().__init__(FMulOperands)

    def elaborate(self, platform):
        m = Module()
        ce, valid = stall_control(m, self.i.valid, self.o.ready, self.latency)
        p = Pipe(m, ce)
        r = p.fmul(self.i.payload.a, self.i.payload.b)
        m.d.comb += [self.i.ready.eq(ce), self.o.valid.eq(valid), self.o.payload.eq(r.value)]
        return m


class FConvert(_StreamOp):
    """Conversions and exponent helpers (unit ``fp_cvt``): latency 1, one per cycle.

    Members
    -------
    i : In(stream.Signature(CvtOperands))
        ``op`` (:class:`CvtOp`), ``x``, ``n`` (for ``LDEXP``).
    o : Out(stream.Signature(32))
    """

    latency = 1

    def __init__(self):
        super().__init__(CvtOperands)

    def elaborate(self, platform):
        m = Module()
        ce, valid = stall_control(m, self.i.valid, self.o.ready, self.latency)
        x, n, op = self.i.payload.x, self.i.payload.n, self.i.payload.op
        res = Signal(32)
        outs = {CvtOp.INT_TO_F32: int_to_f32(m, x.as_signed()), CvtOp.F16_TO_F32: f16_to_f32(m, x[0:16]),
                CvtOp.F32_TO_F16: f32_to_f16(m, x), CvtOp.LDEXP: ldexp(m, x, n),
                CvtOp.FLOOR: floor_int(m, x, 32)}
        with m.Switch(op):
            for k, v in outs.items():
                with m.Case(k):
                    m.d.comb += res.eq(v)
            with m.Default():
                m.d.comb += res.eq(0)
        with m.If(ce):
            m.d.sync += self.o.payload.eq(res)
        m.d.comb += [self.i.ready.eq(ce), self.o.valid.eq(valid)]
        return m


def units(config) -> dict:
    """The float units: ``fp_add``, ``fp_mul``, ``fp_cvt`` (independent of the configuration)."""
    return {"fp_add": FAdd(), "fp_mul": FMul(), "fp_cvt": FConvert()}
