"""The chain's float stage: block values (``nx.block_values``) and row sums (``nx.accum4``)
as per-lane partials (:class:`Scaler`) and one shared final sum (:class:`RowCombine`).

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
adder; when the row's last block leaves the accumulator the scaler outputs the
row's four partials (:data:`Partials`), one beat per row. A last, partial group
adds nothing to the partials it does not reach (no +0.0 padding: a partial that
flushed to -0.0 keeps its sign, as in ``nx.accum4``); a partial the row never
reached is +0.0. One block per cycle whatever the row lengths (latency 13 from
the last block, 10 without Q4_1). The whole unit stalls as one pipeline when its
output is not read.

The row's sum ``fadd(fadd(p0, p1), fadd(p2, p3))`` is :class:`RowCombine`'s: the MV
unit (hw/mv_exec.py) writes one row per cycle whichever lane it comes from, so one
combine after its pick of a lane serves every scaler: its three adders once for the
unit instead of an adder and its select logic in every lane.
"""

from amaranth import Array, C, Cat, Module, Mux, Shape, Signal, signed
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from llmfab.core import numerics as nx
from .fp import FADD_LATENCY, Pipe, lzc, valid_chain

__all__ = ["WeightFormat", "ScalerIn", "Partials", "Scaler", "RowCombine", "units"]

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

#: A row's four accum4 partials (block ``j`` of the row went into ``[j % 4]``), binary32 each.
Partials = data.ArrayLayout(32, 4)


class Scaler(wiring.Component):
    """Block values and a row's accum4 partials (unit ``scaler``).

    Parameters
    ----------
    formats : tuple of str
        Weight formats to support (``"q4_0"``, ``"q4_1"``, ``"q8_0"``); without
        ``q4_1`` the minimum term (one fmul, one fadd) is left out.

    Members
    -------
    i : In(stream.Signature(ScalerIn))
        One block per beat; ``last`` ends a row.
    o : Out(stream.Signature(Partials))
        One row's four partials per row (:class:`RowCombine` sums them).
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
            "o": Out(stream.Signature(Partials)),
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
        s_res = s_acc + FADD_LATENCY     # accumulated value of a block: the row's partials
        valids = valid_chain(m, ce, self.i.valid, s_res)

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

        # ---- the row's partials, as the row's last block leaves the accumulator: its own
        # partial is the accumulator's result, the others are final (their latest blocks left
        # earlier). A partial the row never reached (its first group was its last, partial
        # one) is +0.0; one that the last, partial group did not reach keeps its value (-0.0
        # included, as nx.accum4 specifies). One LUT per bit: j_r, first_r and two values.
        o_valid = valids[s_res] & p.at(last, s_res)
        out = Signal(Partials)
        for k in range(4):
            reached = ~first_r | (j_r > k) if k < 3 else ~first_r
            m.d.comb += out[k].eq(Mux(j_r == k, acc.value, Mux(reached, parts[k], 0)))
        m.d.comb += [
            ce.eq(~o_valid | self.o.ready),
            self.i.ready.eq(ce),
            self.o.valid.eq(o_valid),
            self.o.payload.eq(out),
        ]
        self.latency = s_res
        return m


class RowCombine(wiring.Component):
    """A row's sum from its four partials: ``fadd(fadd(p0, p1), fadd(p2, p3))`` (``nx.accum4``).

    Three binary32 adders as a tree, ``p0 + p1`` and ``p2 + p3`` side by side, then their sum:
    latency ``2 * FADD_LATENCY`` (6), one row per cycle, the whole pipeline stalls on ``ce`` when
    its output is not read (``i.ready`` is ``ce``). A sideband payload (``side``, any shape:
    MvExec's byte address) travels with the row.

    Parameters
    ----------
    side : shape-castable
        The sideband's shape (0: none, and no ``side`` field).

    Members
    -------
    i : In(stream.Signature(StructLayout({"p": Partials, "side": side})))
        One row's partials (:class:`Scaler`'s output) per beat.
    o : Out(stream.Signature(StructLayout({"sum": 32, "side": side})))
        The row sum (binary32), with the row's sideband.
    idle : Out(1)
        No row in the pipeline (its output included).
    """

    latency = 2 * FADD_LATENCY

    def __init__(self, side=0):
        self._side = Shape.cast(side).width > 0
        sb = {"side": side} if self._side else {}          # no zero-width field (Verilog)
        super().__init__({
            "i": In(stream.Signature(data.StructLayout({"p": Partials} | sb))),
            "o": Out(stream.Signature(data.StructLayout({"sum": 32} | sb))),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        ce = Signal()
        valids = valid_chain(m, ce, self.i.valid, self.latency, name="rc")
        p = Pipe(m, ce, name="rc")
        x = self.i.payload
        lo = p.fadd(p.input(x.p[0]), p.input(x.p[1]))
        hi = p.fadd(p.input(x.p[2]), p.input(x.p[3]))
        s = p.fadd(lo, hi)
        assert s.stage == self.latency
        m.d.comb += [
            ce.eq(~valids[-1] | self.o.ready),
            self.i.ready.eq(ce),
            self.o.valid.eq(valids[-1]),
            self.o.payload.sum.eq(s.value),
            self.idle.eq(~Cat(*valids[1:]).any()),
        ]
        if self._side:
            m.d.comb += self.o.payload.side.eq(p.at(p.input(x.side), s.stage))
        return m


def units(config) -> dict:
    """``scaler`` for the configuration's weight formats."""
    formats = tuple(getattr(config, "weight_formats", ("q4_0", "q4_1", "q8_0")))
    return {"scaler": Scaler(formats=formats)}
