"""The chain's float stage: block values (``nx.block_values``) and row sums (``nx.accum4``).

Per block the DSP chain delivers ``isum`` (exact int32) with the weight block's
fp16 ``d_w`` (and ``m_w``) and the activation block's ``d_x`` and ``sumq``:

    t = fmul(fp32(isum), fp32(d_w))
    t = fadd(t, fmul(fp32(m_w), fp32(sumq)))      Q4_1 only
    v = fmul(t, d_x)

Other formats add ``-0.0`` instead of the ``m`` term (``t + -0.0 == t`` for
every ``t``, zeros included), so every format has the same latency.

A row's block values accumulate in four interleaved partials (block ``j`` of
the row into partial ``j mod 4``, each starting at +0.0) with one 3-stage
adder, then ``fadd(fadd(p0, p1), fadd(p2, p3))``. A last, partial group adds
nothing to the partials it does not reach (no +0.0 padding: a partial that
flushed to -0.0 keeps its sign, as in ``nx.accum4``). One block per cycle in
steady state; the whole unit stalls as one pipeline when its output is not read.
"""

from amaranth import Array, C, Cat, Module, Mux, Signal, signed
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from llmfab.core import numerics as nx
from .fp import Pipe, f16_to_f32, int_to_f32, valid_chain

__all__ = ["WeightFormat", "ScalerIn", "Scaler", "units"]

NEG_ZERO = 0x80000000


class WeightFormat(enum.Enum, shape=2):
    """Block format (sparse blocks use their dense format's arithmetic)."""
    Q4_0 = 0
    Q4_1 = 1
    Q8_0 = 2


#: One block from the chain.
ScalerIn = data.StructLayout({
    "isum": signed(32),      # exact integer dot product (|isum| < 2**24)
    "d_w": 16,               # weight block scale, binary16
    "m_w": 16,               # weight block minimum, binary16 (Q4_1)
    "sumq": signed(32),      # activation block sum of q (over kept positions)
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
        One block per beat; ``last`` ends a row.
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

        # ---- block value
        fi, dw, mw, fs = p.comb(lambda isum, d, mm, s: (
            int_to_f32(m, isum, name="fi"), f16_to_f32(m, d, name="dw"),
            f16_to_f32(m, mm, name="mw"), int_to_f32(m, s, name="fs")),
            p.input(b.isum), p.input(b.d_w), p.input(b.m_w), p.input(b.sumq))
        t = p.fmul(fi, dw)
        if "q4_1" in self._formats:
            u = p.fmul(mw, fs)
            u = p.comb(lambda u, f: Mux(f == WeightFormat.Q4_1, u, NEG_ZERO),
                       u, p.input(b.fmt.as_value()), latency=0)
            t = p.fadd(t, u)
        v = p.fmul(t, p.input(b.d_x))
        s_acc = v.stage
        last = p.input(b.last)

        # ---- accum4: block j of the row into partial j % 4
        valids = valid_chain(m, ce, self.i.valid, s_acc + 3 + 6)
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
        prev = p.comb(lambda j, f: Mux(f, 0, Array(parts)[j]), j_s, first_s, latency=0)
        acc = p.fadd(prev, p.input(v.value, s_acc))
        s_res = acc.stage
        j_r, first_r, last_r = p.at(j_s, s_res), p.at(first_s, s_res), p.at(last, s_res)
        with m.If(ce & valids[s_res]):
            with m.Switch(j_r):
                for k in range(4):
                    with m.Case(k):
                        m.d.sync += parts[k].eq(acc.value)

        # ---- the row's result: ((p0 + p1) + (p2 + p3)); a partial the row never reached is +0.0
        def gather(res, jr, fr):
            g = []
            for k in range(4):
                before = Mux(fr, 0, parts[k])       # partial k not reached in the last group
                g.append(Mux(jr == k, res, before if k == 3 else Mux(jr > k, parts[k], before)))
            return tuple(g)
        g0, g1, g2, g3 = p.comb(gather, acc, p.input(j_r, s_res), p.input(first_r, s_res),
                                latency=0)
        out = p.fadd(p.fadd(g0, g1), p.fadd(g2, g3))
        s_out = out.stage
        assert s_out == s_acc + 3 + 6
        o_valid = valids[s_out] & p.at(last, s_out)
        m.d.comb += [
            ce.eq(~o_valid | self.o.ready),
            self.i.ready.eq(ce),
            self.o.valid.eq(o_valid),
            self.o.payload.eq(out.value),
        ]
        self.latency = s_out
        return m


def units(config) -> dict:
    """``scaler`` for the configuration's weight formats."""
    formats = tuple(getattr(config, "weight_formats", ("q4_0", "q4_1", "q8_0")))
    return {"scaler": Scaler(formats=formats)}
