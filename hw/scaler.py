"""The chain's float stage: block values (``nx.block_values``) and row sums (``nx.accum4``).

Per block the DSP chain delivers ``isum`` (exact integer) with the weight block's
fp16 ``d_w`` (and ``m_w``) and the activation block's ``d_x`` and ``sumq``:

    t = fmul(fp32(isum), fp32(d_w))
    t = fadd(t, fmul(fp32(m_w), fp32(sumq)))      Q4_1 only
    v = fmul(t, d_x)

Other formats add ``-0.0`` instead of the ``m`` term (``t + -0.0 == t`` for
every ``t``, zeros included), so every format has the same latency; the hardware
gets it as ``fmul(+-0.0, fp32(sumq))`` with the zero's sign opposite to ``sumq``'s.

Range assumption: ``isum`` fits in 21 bits signed (``-2**20 <= isum < 2**20``) and
``sumq`` in 13 bits signed (``-2**12 <= sumq < 2**12``): the chain's exact widths
(hw/chain.py ``ISUM_SHAPE`` / ``SUMQ_SHAPE``: ``|isum| <= 32 * 128 * 128 = 2**19``,
``|sumq| <= 32 * 128``; the stored dense ``sumq`` of ``nx.quantize_act`` is at most
``32 * 127``). The ports stay 32 bits wide, but the conversions read only those low 21
and 13 bits; a value outside the range gives a wrong block value. In range,
``fp32(...)`` is exact (no rounding): magnitude ``(v ^ s) + s`` and its leading zeros
are registered, the normalizing shift is the first multiplier stage's input logic.
``fp32(d_w)`` / ``fp32(m_w)`` are exact for every fp16 value (subnormal scales are
normalized; infinities and NaNs reach the multipliers as such).

A row's block values accumulate in four interleaved partials (block ``j`` of
the row into partial ``j mod 4``, each starting at +0.0) with one 3-stage
adder, then ``fadd(fadd(p0, p1), fadd(p2, p3))`` on a second adder shared by
the three sums: the pair without the last block's partial one stage before the
last block leaves the accumulator, the pair with it when it leaves, their sum
three stages later (latency 19, as with three adders). A last, partial group
adds nothing to the partials it does not reach (no +0.0 padding: a partial that
flushed to -0.0 keeps its sign, as in ``nx.accum4``). One block per cycle in
steady state for rows of 5 blocks or more; two rows' last blocks must not be 1,
3 or 4 stages apart (they would need the shared adder in the same cycle), so a
last block waits at the input until they are not: back to back, rows of 1 or 2
blocks take 3.5 cycles each, rows of 3 or 4 take 5. The whole unit stalls as
one pipeline when its output is not read.
"""

from amaranth import Array, C, Cat, Module, Mux, Signal, signed
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from llmfab.core import numerics as nx
from .fp import FADD_LATENCY, FAddCore, Pipe, lzc, valid_chain

__all__ = ["WeightFormat", "ScalerIn", "Scaler", "units"]

#: Signed widths of ``isum`` and ``sumq`` the conversions read (the chain's ``ISUM_SHAPE`` /
#: ``SUMQ_SHAPE``; the ports stay 32 bits wide, the bits above are ignored).
ISUM_BITS = 21
SUMQ_BITS = 13


def f16_operand(h, zero=None, zero_sign=None):
    """binary16 ``h`` as a binary32 *multiplier operand* (FMulCore's ``a`` / ``b``).

    Equal to ``f16_to_f32`` wherever FMulCore can tell: normal and subnormal values exactly
    (a subnormal is normalized), infinities exactly; a zero only has exponent 0 (its fraction
    is left as is: FMulCore reads any exponent-0 operand as a zero of its sign), a NaN keeps
    its payload (FMulCore gives the canonical NaN for any NaN operand).
    """
    frac, e, sign = h[0:10], h[10:15], h[15]
    lz = lzc(frac, 10)                           # subnormal: value = frac * 2**-24
    sub = (frac << (lz + 1))[0:10]
    # e + 112 for e in 1..30 without an adder: 0111eeee below 16, 1000eeee from 16
    exp_n = Cat(e[0:4], Mux(e[4], C(0b1000, 4), C(0b0111, 4)))
    exp = Mux(e == 31, 255, Mux(e != 0, exp_n, Mux(lz == 10, 0, (112 - lz)[0:8])))
    if zero is not None:                         # a zero of sign zero_sign instead of h
        exp = Mux(zero, 0, exp)
        sign = Mux(zero, zero_sign, sign)
    return Cat(C(0, 13), Mux(e == 0, sub, frac), exp, sign)


class WeightFormat(enum.Enum, shape=2):
    """Block format (sparse blocks use their dense format's arithmetic)."""
    Q4_0 = 0
    Q4_1 = 1
    Q8_0 = 2


#: One block from the chain.
ScalerIn = data.StructLayout({
    "isum": signed(32),      # exact integer dot product; read as 21 bits signed (the chain's range)
    "d_w": 16,               # weight block scale, binary16
    "m_w": 16,               # weight block minimum, binary16 (Q4_1)
    "sumq": signed(32),      # activation block sum of q (over kept positions); read as 13 bits signed
    "d_x": 32,               # activation block scale, binary32
    "fmt": WeightFormat,
    "last": 1,               # last block of the row
})


class Scaler(wiring.Component):
    """Block values and row accumulation (unit ``scaler``).

    Parameters
    ----------
    formats : tuple of str
        Weight formats to support (``"q4_0"``, ``"q4_1"``, ``"q8_0"``); without
        ``q4_1`` the minimum term (one fmul, one fadd) is left out.

    Members
    -------
    i : In(stream.Signature(ScalerIn))
        One block per beat; ``last`` ends a row. ``i.ready`` depends on ``i.payload.last``
        (a row's last block may have to wait a few cycles, see the module docstring).
    o : Out(stream.Signature(32))
        One binary32 row sum per row.
    """

    def __init__(self, *, formats=("q4_0", "q4_1", "q8_0")):
        formats = tuple(formats)
        for f in formats:
            if f not in ("q4_0", "q4_1", "q8_0"):
                raise ValueError(f"Scaler weight format must be q4_0, q4_1 or q8_0, not {f!r}")
        if not formats:
            raise ValueError("Scaler needs at least one weight format, not none")
        self._formats = formats
        super().__init__({
            "i": In(stream.Signature(ScalerIn)),
            "o": Out(stream.Signature(32)),
        })

    @property
    def formats(self):
        return self._formats

    def elaborate(self, platform):
        m = Module()
        ce = Signal()
        p = Pipe(m, ce, name="sc")
        b = self.i.payload

        # ---- block value. The integers are exact in binary32 and narrow (ISUM_BITS / SUMQ_BITS
        # signed, see the module docstring): the conversion needs no rounding; its magnitude and
        # leading zeros are registered and the normalizing shift is the first multiplier
        # stage's input logic. A zero needs only a zero exponent (FMulCore reads any operand
        # with exponent 0 as a zero of its sign).
        def int_split(v, w):
            v = v[0:w].as_signed()
            mag = Signal(w)
            # |v| as (v XOR sign) + sign: one adder (a LUT and a carry per bit), no mux behind it
            m.d.comb += mag.eq((v.as_unsigned() ^ v[w - 1].replicate(w)) + v[w - 1])
            return v[w - 1], mag, lzc(mag, w)

        def int_join(sign, mag, lz, w):
            # shifted as 24 bits with the w-bit magnitude on top: the same shifter (the low bits
            # stay zero), but no constant bits in the multiplier's operand, which would
            # specialize this FMulCore instance (Amaranth propagates constants into it)
            norm = Signal(24)
            m.d.comb += norm.eq(Cat(C(0, 24 - w), mag) << lz)
            # one 32-bit mux: FMulCore's operand is then a single net, so this instance's
            # module text is that of the others (one unit for the estimate); the bits equal
            # on both sides are wires after synthesis
            return Mux(lz == w, Cat(norm[0:23], C(0, 8), sign),
                       Cat(norm[0:23], (126 + w - lz)[0:8], sign))

        isum = p.comb(lambda v: int_split(v, ISUM_BITS), p.input(b.isum), name="isum")
        fi = p.comb(lambda *x: int_join(*x, ISUM_BITS), *isum, latency=0, name="fi")
        dw = p.comb(lambda d: f16_operand(d), p.input(b.d_w), name="dw")
        t = p.fmul(fi, dw)
        if "q4_1" in self._formats:
            sumq = p.comb(lambda v: int_split(v, SUMQ_BITS), p.input(b.sumq), name="sumq")
            fs = p.comb(lambda *x: int_join(*x, SUMQ_BITS), *sumq, latency=0, name="fs")
            # other formats: m_w is replaced by a zero of the sign opposite to sumq's, so the
            # product is -0.0 (the signed zero times a finite value), the spec's ``t + -0.0``
            mw = p.comb(lambda mm, f, sq: f16_operand(mm, f != WeightFormat.Q4_1, ~sq),
                        p.input(b.m_w), p.input(b.fmt.as_value()),
                        p.input(b.sumq[SUMQ_BITS - 1]), name="mw")
            u = p.fmul(mw, fs)
            t = p.fadd(t, u)
        v = p.fmul(t, p.input(b.d_x))
        s_acc = v.stage
        last = p.input(b.last)
        s_res = s_acc + FADD_LATENCY     # accumulated value of a block
        s_oth = s_res - 1                # a row's last block issues its other pair's sum
        s_fin = s_res + FADD_LATENCY     # ... and its final sum
        s_out = s_fin + FADD_LATENCY

        # ---- one adder for the three sums of a row's end: a row's last block issues them at
        # stages s_oth, s_res and s_fin; two last blocks 1, 3 or 4 stages apart would collide,
        # so a last block waits at the input while one is at stage 1, 3 or 4
        throttle = Signal()
        valids = valid_chain(m, ce, self.i.valid & ~throttle, s_out)

        def lasts(s):
            return valids[s] & p.at(last, s)

        m.d.comb += throttle.eq(b.last & (lasts(1) | lasts(3) | lasts(4)))

        # ---- accum4: block j of the row into partial j % 4
        j = Signal(range(4))             # partial of the next block
        first = Signal(init=1)           # the next block is in the row's first group
        v_acc = valids[s_acc]
        last_acc = p.at(last, s_acc)
        with m.If(ce & v_acc):
            m.d.sync += j.eq(Mux(last_acc, 0, j + 1))
            with m.If(last_acc):
                m.d.sync += first.eq(1)
            with m.Elif(j == 3):
                m.d.sync += first.eq(0)
        parts = [Signal(32, name=f"part{k}") for k in range(4)]
        j_s = p.input(j, s_acc)
        first_s = p.input(first, s_acc)
        # a partial the row has not reached yet reads as +0.0: only its exponent and sign are
        # cleared (FAddCore reads an exponent-0 operand as a zero of its sign). One 32-bit mux,
        # so the adder's operand is a single net (the same FAddCore module text as the others)
        def prev_of(j, f):
            pj = Signal(32, name="prev_part")
            m.d.comb += pj.eq(Array(parts)[j])
            return Mux(f, Cat(pj[0:23], C(0, 9)), pj)
        prev = p.comb(prev_of, j_s, first_s, latency=0)
        acc = p.fadd(prev, p.input(v.value, s_acc))
        assert acc.stage == s_res
        j_r, first_r = p.at(j_s, s_res), p.at(first_s, s_res)
        with m.If(ce & valids[s_res]):
            with m.Switch(j_r):
                for k in range(4):
                    with m.Case(k):
                        m.d.sync += parts[k].eq(acc.value)

        # ---- the row's result ((p0 + p1) + (p2 + p3)). The pair without the last block's
        # partial is final one stage before the last block leaves the accumulator (its latest
        # block is then the accumulator's result, forwarded); the other pair when it leaves.
        # A partial the row never reached is +0.0; one that the last, partial group did not
        # reach keeps its value (-0.0 included). Operand a is the adder's result, the
        # accumulator's, p0, p2 or +0.0, operand b the held result, the accumulator's, p1, p3
        # or +0.0: one-hot selects, computed a stage ahead from the pipeline's values (every
        # stage is the previous one registered on ce) so the operands are an AND-OR of
        # registers.
        def selects(back):
            def at(x, s):
                return p.at(x, s - back)

            def lasts_(s):
                return valids[s - back] & at(last, s)

            jr, fr, jo, fo = at(j_s, s_res), at(first_s, s_res), at(j_s, s_oth), at(first_s, s_oth)
            fwd = valids[s_res - back]       # the block at s_res (forwarded to the other pair)

            def reached(f, jj, k):
                return ~f | (jj > k) if k < 3 else ~f

            fin = lasts_(s_fin)
            own = ~fin & lasts_(s_res)           # the last block's pair: acc + its partner
            oth = ~fin & ~own                    # the other pair (used if a last block is at s_oth)
            hi = jo[1]                           # the other pair is (p0, p1) when set
            src = {}
            for k in range(4):
                kk = k - k % 2                   # the pair's first partial
                o_k = oth & (hi if kk == 0 else ~hi) & reached(fo, jo, k)
                src[k] = (own & (jr == (k ^ 1)) & reached(fr, jr, k)) | (o_k & ~(fwd & (jr == k)))
            acc_a = (own & ~jr[0]) | (oth & fwd & ((hi & (jr == 0) & reached(fo, jo, 0))
                                                   | (~hi & (jr == 2) & reached(fo, jo, 2))))
            acc_b = (own & jr[0]) | (oth & fwd & ((hi & (jr == 1) & reached(fo, jo, 1))
                                                  | (~hi & (jr == 3) & reached(fo, jo, 3))))
            return Cat(fin, acc_a, src[0], src[2]), Cat(fin, acc_b, src[1], src[3])

        # registered as a 2-bit index and a "some source" bit: a 4:1 mux per fraction bit, and
        # +0.0 (none selected) clears only the exponent and sign (an exponent-0 operand is a
        # zero of its sign for FAddCore)
        sel_a, sel_b = Signal(3), Signal(3)

        def encode(oh):
            return Cat(oh[1] | oh[3], oh[2] | oh[3], oh.any())

        with m.If(ce):
            m.d.sync += [x.eq(encode(y)) for x, y in zip((sel_a, sel_b), selects(1))]

        def and_or(sel, vals):
            pick = Signal(32)
            m.d.comb += pick.eq(Array(vals)[sel[0:2]])
            return Mux(sel[2], pick, Cat(pick[0:23], C(0, 9)))

        cadd = FAddCore()
        m.submodules.combine = cadd
        held = Signal(32)                # the adder's previous result: the other pair's sum
        with m.If(ce):
            m.d.sync += held.eq(cadd.o)
        # the final sum takes the two pair sums in either order: binary32 addition is
        # commutative bit for bit (FAddCore orders its operands by magnitude; test_fp checks
        # both orders)
        op_a, op_b = Signal(32), Signal(32)
        m.d.comb += [op_a.eq(and_or(sel_a, (cadd.o, acc.value, parts[0], parts[2]))),
                     op_b.eq(and_or(sel_b, (held, acc.value, parts[1], parts[3]))),
                     cadd.a.eq(op_a), cadd.b.eq(op_b), cadd.ce.eq(ce)]

        o_valid = lasts(s_out)
        m.d.comb += [
            ce.eq(~o_valid | self.o.ready),
            self.i.ready.eq(ce & ~throttle),
            self.o.valid.eq(o_valid),
            self.o.payload.eq(cadd.o),
        ]
        self.latency = s_out
        return m


def units(config) -> dict:
    """``scaler`` for the configuration's weight formats."""
    formats = tuple(getattr(config, "weight_formats", ("q4_0", "q4_1", "q8_0")))
    return {"scaler": Scaler(formats=formats)}
