"""The special-function unit: exp, recip, rsqrt, silu and the vector ops, bit-exact to the spec.

The special functions are pipeline builders (:func:`exp_pipe`,
:func:`recip_rsqrt_pipe`, :func:`silu_pipe`) on :class:`llmfab.hw.fp.Pipe`, in
the exact operation order of ``core/numerics.py``; the quantizer reuses
``recip_rsqrt_pipe``. :class:`Sfu` (unit ``sfu``) runs them and the vector
ops (rms_norm, softmax, rope, residual add, elementwise multiply, reduce_sum,
vdot) over fp32 streams; see its docstring and docs/hw-fp.md.
"""

from amaranth import Array, C, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from llmfab.core import numerics as nx
from .fp import (CANONICAL_NAN, F32, POS_INF, FAddCore, Pipe, Staged, f32_bits, f32_key,
                 floor_int, int_to_f32, ldexp, stall_control, valid_chain)

__all__ = ["exp_pipe", "recip_rsqrt_pipe", "silu_pipe", "SfuOp", "SfuIn", "SfuOut",
           "ReducerIn", "Reducer", "Sfu", "units"]


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
    Then ldexp by -e (recip, sign restored) or -(e - odd)/2. 26 stages, 7 fmuls, 2 fadds;
    with ``rsqrt`` the constant 0 (recip only) 20 stages, 4 fmuls, 2 fadds.
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
    recip_only = isinstance(rsqrt, int) and not rsqrt
    # recip only (a constant rsqrt=0): the multiplications by 1.0 are left out (exact anyway)
    h = mm if recip_only else p.fmul(kk, mm)
    for _ in range(2):
        if recip_only:
            t = p.fmul(h, y)
        else:
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


# ---- the reduction unit ----------------------------------------------------------------------

ReducerIn = data.StructLayout({"v": 32, "last": 1})
NEG_ZERO = 0x80000000
LANES = nx.LANES


class Reducer(wiring.Component):
    """``nx.reduce_sum`` over a stream of binary32 values (``last`` ends a vector).

    32 lane registers: element ``t`` goes to lane ``t mod 32`` (the first 32
    are added to -0.0, which is exact, the rest to their lane); at the end of
    the vector the lanes the final chunk did not reach get the spec's +0.0
    padding (+0.0 when there was one chunk, else ``fadd(lane, +0.0)``, which
    only turns -0.0 into +0.0); then the tree ``acc[i] = fadd(acc[i],
    acc[i+h])`` for h = 16, 8, 4, 2, 1 on the same adder. One element per
    cycle while accumulating; about 50 cycles for the tree.

    Members
    -------
    i : In(stream.Signature(ReducerIn))
    o : Out(stream.Signature(32))
    """

    def __init__(self):
        super().__init__({
            "i": In(stream.Signature(ReducerIn)),
            "o": Out(stream.Signature(32)),
        })

    def elaborate(self, platform):
        m = Module()
        acc = Array(Signal(32, name=f"lane{k}", reset_less=True) for k in range(LANES))
        add = FAddCore()
        m.submodules.add = add
        lat = add.latency
        m.d.comb += add.ce.eq(1)
        tag_v = Signal(lat)
        tag = [Signal(5, name=f"tag{k}") for k in range(lat)]
        issue = Signal()
        issue_tag = Signal(5)
        m.d.sync += [tag_v.eq(Cat(issue, tag_v[:-1])), tag[0].eq(issue_tag)]
        m.d.sync += [tag[k].eq(tag[k - 1]) for k in range(1, lat)]
        with m.If(tag_v[-1]):
            m.d.sync += acc[tag[-1]].eq(add.o)

        cnt = Signal(5)                      # lane of the next element
        multi = Signal()                     # a chunk of 32 is complete: not the first chunk
        last_lane = Signal(5)
        h = Signal(range(LANES))
        idx = Signal(range(LANES + 1))
        drain = Signal(range(lat + 2))
        lane = cnt
        first_chunk = ~multi

        with m.FSM(name="red"):
            with m.State("ACC"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid):
                    m.d.comb += [issue.eq(1), issue_tag.eq(lane),
                                 add.a.eq(Mux(first_chunk, NEG_ZERO, acc[lane])),
                                 add.b.eq(self.i.payload.v)]
                    m.d.sync += cnt.eq(cnt + 1)
                    with m.If(lane == LANES - 1):
                        m.d.sync += multi.eq(1)
                    with m.If(self.i.payload.last):
                        m.d.sync += [last_lane.eq(lane), drain.eq(lat + 1)]
                        m.next = "DRAIN"
            with m.State("DRAIN"):
                m.d.sync += drain.eq(drain - 1)
                with m.If(drain == 0):
                    m.next = "PAD"
            with m.State("PAD"):
                for k in range(1, LANES):            # lane 0 always holds a value
                    with m.If(k > last_lane):
                        with m.If(~multi | (acc[k] == NEG_ZERO)):
                            m.d.sync += acc[k].eq(0)
                m.d.sync += [h.eq(LANES // 2), idx.eq(0)]
                m.next = "TREE"
            with m.State("TREE"):
                with m.If(idx < h):
                    m.d.comb += [issue.eq(1), issue_tag.eq(idx),
                                 add.a.eq(acc[idx]), add.b.eq(acc[idx + h])]
                    m.d.sync += idx.eq(idx + 1)
                    m.d.sync += drain.eq(lat)
                with m.Else():
                    m.d.sync += drain.eq(drain - 1)
                    with m.If(drain == 0):
                        m.d.sync += [h.eq(h >> 1), idx.eq(0)]
                        with m.If(h == 1):
                            m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(acc[0])]
                with m.If(self.o.ready):
                    m.d.sync += [cnt.eq(0), multi.eq(0)]
                    m.next = "ACC"
        return m


# ---- the SFU -----------------------------------------------------------------------------

class SfuOp(enum.Enum, shape=4):
    """Operation of a vector sent to the :class:`Sfu` (the same on all its beats)."""
    EXP = 0          #: y0 = exp(a)
    RECIP = 1        #: y0 = recip(a)
    RSQRT = 2        #: y0 = rsqrt(a)
    SILU = 3         #: y0 = silu(a)
    ADD = 4          #: y0 = fadd(a, b)              (residual add)
    MUL = 5          #: y0 = fmul(a, b)              (elementwise multiply)
    ROPE = 6         #: (a, b) = (x0, x1), c = cos, d = sin -> (y0, y1)
    REDUCE_SUM = 7   #: one beat out: y0 = reduce_sum(a)
    VDOT = 8         #: one beat out: y0 = reduce_sum(fmul(a, b))
    RMS_NORM = 9     #: a = x, b = w; c = fp32(1/n), d = fp32(eps) on the last beat
    SOFTMAX = 10     #: a = s
    RMS_SCALAR = 11  #: streaming: y0 = rsqrt(fadd(fmul(a, c), d)) (rms_norm's scalar: a = ss,
                     #: c = fp32(1/n), d = fp32(eps))


class _Uop(enum.Enum, shape=4):
    EXP = 0
    RECIP = 1
    RSQRT = 2
    SILU = 3
    ADD = 4
    MUL = 5
    ROPE = 6
    PASS = 7         # a (reduce_sum)
    SQ = 8           # fmul(a, a) (rms_norm pass 1)
    SM_EXP = 9       # exp(fsub(a, c)) (softmax pass 2)
    SCALE = 10       # fmul(a, c) (softmax pass 3)
    RMS_SCALAR = 11  # rsqrt(fadd(fmul(a, c), d))
    RMS_OUT = 12     # fmul(fmul(a, c), b)


class _Dest(enum.Enum, shape=2):
    OUT = 0
    RED = 1
    BUF_RED = 2
    SCALAR = 3


#: One input beat.
SfuIn = data.StructLayout({"op": SfuOp, "a": 32, "b": 32, "c": 32, "d": 32, "last": 1})
#: One output beat (``y1`` only for ROPE).
SfuOut = data.StructLayout({"y0": 32, "y1": 32, "last": 1})


class Sfu(wiring.Component):
    """The special-function unit (unit ``sfu``): one element per cycle through one datapath.

    Every beat runs through one fixed pipeline (about 80 stages): four
    multipliers (``a*b``/``a*a``/``a*c`` and RoPE's products), two adders,
    :func:`exp_pipe`, ``1 + e``, :func:`recip_rsqrt_pipe`, a last multiplier;
    an internal op code selects the operands. Vector ops are sequenced by an
    FSM around it:

    * EXP, RECIP, RSQRT, SILU, ADD, MUL, ROPE, RMS_SCALAR: streaming, one beat
      per cycle, outputs in order with the input's ``last``.
    * REDUCE_SUM, VDOT: the values go to the :class:`Reducer`; one output beat.
    * RMS_NORM: pass 1 stores (x, w) in the vector buffer and reduces x*x;
      ``rsqrt(ss * c + d)`` goes through the pipeline; pass 2 reads the buffer:
      ``(x * r) * w``.
    * SOFTMAX: pass 1 stores s and takes the exact max m; pass 2
      ``e = exp(s - m)`` back into the buffer and into the reducer, taken at
      exp's stage (about 40) rather than the pipeline's end; ``recip(z)`` on a
      recip-only pipeline of its own (``recip_rsqrt_pipe(.., 0)``, about 20
      stages, the same values); pass 3 ``e * (1/z)`` on a short multiplier of
      its own once the long pipeline is empty. About 130 cycles + 2 per element.

    The unit takes the next vector once a reduction, RMS_NORM or SOFTMAX has
    issued its last pass; streaming ops follow each other without a gap.

    Parameters
    ----------
    max_len : int
        Vector buffer entries: the longest RMS_NORM / SOFTMAX vector.

    Members
    -------
    i : In(stream.Signature(SfuIn))
    o : Out(stream.Signature(SfuOut))
    """

    def __init__(self, *, max_len=1024):
        if not isinstance(max_len, int) or max_len < 2 or max_len & (max_len - 1):
            raise ValueError(f"SFU max_len must be a power of two >= 2, not {max_len!r}")
        self._max_len = max_len
        super().__init__({
            "i": In(stream.Signature(SfuIn)),
            "o": Out(stream.Signature(SfuOut)),
        })

    @property
    def max_len(self):
        return self._max_len

    def elaborate(self, platform):
        m = Module()
        aw = (self._max_len - 1).bit_length()
        ce = Signal()
        p = Pipe(m, ce, name="sfu")

        # ---- issue (stage 0)
        iss_valid = Signal()
        iss_uop = Signal(_Uop)
        iss_a = Signal(32)
        iss_b = Signal(32)
        iss_c = Signal(32)
        iss_d = Signal(32)
        iss_last = Signal()
        iss_dest = Signal(_Dest)
        iss_idx = Signal(aw)
        iss_buf = Signal()

        mem = memory.Memory(shape=64, depth=self._max_len, init=[])
        m.submodules.buf = mem
        rp = mem.read_port()
        wp = mem.write_port()
        m.d.comb += [rp.addr.eq(iss_idx), rp.en.eq(ce)]

        uop = p.input(iss_uop.as_value())
        fb = p.input(iss_buf)
        rd = Staged(rp.data, 1)
        a = p.comb(lambda fb, rd, a: Mux(fb, rd[0:32], a), fb, rd, p.input(iss_a), latency=0)
        b = p.comb(lambda fb, rd, b: Mux(fb, rd[32:64], b), fb, rd, p.input(iss_b), latency=0)
        c, d = p.input(iss_c), p.input(iss_d)

        def is_(u, *ops):
            return Cat(*(u == op for op in ops)).any()

        # P1: four multipliers
        x0 = p.comb(lambda u, a, b, c: Mux(u == _Uop.MUL, b, Mux(u == _Uop.SQ, a, c)),
                    uop, a, b, c, latency=0)
        m0 = p.fmul(a, x0)
        m1 = p.fmul(b, d)
        m2 = p.fmul(a, d)
        m3 = p.fmul(b, c)
        # P2: two adders
        l0, r0, s0 = p.comb(lambda u, a, b, c, d, m0, m1: (
            Mux(is_(u, _Uop.ROPE, _Uop.RMS_SCALAR), m0, a),
            Mux(u == _Uop.ROPE, m1, Mux(u == _Uop.ADD, b, Mux(u == _Uop.SM_EXP, c, d))),
            is_(u, _Uop.ROPE, _Uop.SM_EXP)), uop, a, b, c, d, m0, m1, latency=0)
        a0 = p.fadd(l0, r0, s0)
        a1 = p.fadd(m2, m3)
        # exp, 1 + e, recip/rsqrt, last multiplier
        ein = p.comb(lambda u, a, a0: Mux(u == _Uop.EXP, a, Mux(u == _Uop.SILU, a ^ NEG_ZERO, a0)),
                     uop, a, a0, latency=0)
        e = exp_pipe(p, ein)
        s = p.fadd(ONE, e)
        nin, rs = p.comb(lambda u, a, a0, s: (
            Mux(is_(u, _Uop.RECIP, _Uop.RSQRT), a, Mux(u == _Uop.SILU, s, a0)),
            is_(u, _Uop.RSQRT, _Uop.RMS_SCALAR)), uop, a, a0, s, latency=0)
        nr = recip_rsqrt_pipe(p, nin, rs)
        g, hh = p.comb(lambda u, a, m0, b, nr: (Mux(u == _Uop.SILU, a, m0),
                                                 Mux(u == _Uop.SILU, nr, b)),
                       uop, a, m0, b, nr, latency=0)
        f = p.fmul(g, hh)

        def select(u, e, nr, f, a0, m0, a):
            y = Signal(32, name="sfu_y0")
            with m.Switch(u):
                with m.Case(_Uop.EXP, _Uop.SM_EXP):
                    m.d.comb += y.eq(e)
                with m.Case(_Uop.RECIP, _Uop.RSQRT, _Uop.RMS_SCALAR):
                    m.d.comb += y.eq(nr)
                with m.Case(_Uop.SILU, _Uop.RMS_OUT):
                    m.d.comb += y.eq(f)
                with m.Case(_Uop.ADD, _Uop.ROPE):
                    m.d.comb += y.eq(a0)
                with m.Case(_Uop.MUL, _Uop.SQ, _Uop.SCALE):
                    m.d.comb += y.eq(m0)
                with m.Default():
                    m.d.comb += y.eq(a)
            return y
        y0 = p.comb(select, uop, e, nr, f, a0, m0, a)
        lat = y0.stage
        y0_o = y0.value
        y1_o = p.at(a1, lat)
        last_o = p.at(p.input(iss_last), lat)
        dest_o = p.at(p.input(iss_dest.as_value()), lat)
        idx_o = p.at(p.input(iss_idx), lat)
        valids = valid_chain(m, ce, iss_valid, lat)
        out_valid = valids[lat]
        self.latency = lat
        # softmax pass 2 leaves at exp's stage (into the buffer and the reducer), not at the end
        es = e.stage
        early = valids[es] & (p.at(p.input(iss_dest.as_value()), es) == _Dest.BUF_RED)
        idx_e = p.at(p.input(iss_idx), es)
        last_e = p.at(p.input(iss_last), es)

        # ---- reducer
        red = Reducer()
        m.submodules.red = red
        red_to_o = Signal()
        pipe_o = out_valid & (dest_o == _Dest.OUT)
        to_red = out_valid & (dest_o == _Dest.RED)
        early_go = Signal()
        # softmax's 1/z on a recip pipeline of its own (recip_rsqrt_pipe's recip-only form, the
        # same values), shorter than the long one
        one = Signal(init=1)
        pz = Pipe(m, one, name="smz")
        z_in = Signal(32)
        z_in_v = Signal()
        zr = recip_rsqrt_pipe(pz, pz.input(z_in), 0)
        z_valids = valid_chain(m, one, z_in_v, zr.stage, name="smz")
        # softmax pass 3, e * (1/z), on a short multiplier of its own: it starts once the long
        # pipeline is empty, so the outputs keep their order
        sm_in = Signal()
        sm_idx = Signal(aw)
        sm_last = Signal()
        sm_c = Signal(32)
        sce = Signal()
        ps = Pipe(m, sce, name="smo")
        rp2 = mem.read_port()
        m.d.comb += [rp2.addr.eq(sm_idx), rp2.en.eq(sce)]
        sm_y = ps.fmul(Staged(rp2.data[0:32], 1), ps.input(sm_c))
        sm_last_o = ps.at(ps.input(sm_last), sm_y.stage)
        sm_valids = valid_chain(m, sce, sm_in, sm_y.stage, name="smo")
        sm_o = sm_valids[-1]
        m.d.comb += sce.eq(~sm_o | self.o.ready)
        m.d.comb += [
            red.i.valid.eq(to_red | early_go),
            red.i.payload.v.eq(Mux(early, e.value, y0_o)),
            red.i.payload.last.eq(Mux(early, last_e, last_o)),
            self.o.valid.eq(pipe_o | sm_o | (red_to_o & red.o.valid)),
            self.o.payload.y0.eq(Mux(pipe_o, y0_o, Mux(sm_o, sm_y.value, red.o.payload))),
            self.o.payload.y1.eq(Mux(pipe_o, y1_o, 0)),
            self.o.payload.last.eq(Mux(pipe_o, last_o, Mux(sm_o, sm_last_o, 1))),
        ]
        dest_ready = Signal()
        with m.Switch(dest_o):
            with m.Case(_Dest.OUT):
                m.d.comb += dest_ready.eq(self.o.ready)
            with m.Case(_Dest.RED):
                m.d.comb += dest_ready.eq(red.i.ready)
            with m.Default():                       # BUF_RED: done at exp's stage
                m.d.comb += dest_ready.eq(1)
        m.d.comb += ce.eq((~out_valid | dest_ready) & (~early | red.i.ready))
        m.d.comb += early_go.eq(early & ce)

        # scalar results and buffer writes at the output
        scalar = Signal(32)
        scalar_done = Signal()
        m.d.comb += scalar_done.eq(out_valid & ce & (dest_o == _Dest.SCALAR))
        with m.If(scalar_done):
            m.d.sync += scalar.eq(y0_o)
        in_wen = Signal()
        in_wdata = Signal(64)
        in_waddr = Signal(aw)
        out_wen = early_go
        m.d.comb += [
            wp.en.eq(Mux(out_wen, 1, in_wen)),
            wp.addr.eq(Mux(out_wen, idx_e, in_waddr)),
            wp.data.eq(Mux(out_wen, Cat(e.value, C(0, 32)), in_wdata)),
        ]

        # ---- sequencer
        cnt = Signal(aw + 1)               # elements stored (pass 1) / issued (later passes)
        n = Signal(aw + 1)
        mx = Signal(32)                    # softmax max
        inv_n = Signal(32)
        eps = Signal(32)
        op = self.i.payload.op
        x = self.i.payload
        go = self.i.valid & self.i.ready
        m.d.comb += [iss_a.eq(x.a), iss_b.eq(x.b), iss_c.eq(x.c), iss_d.eq(x.d),
                     iss_last.eq(x.last)]
        with m.FSM(name="seq"):
            with m.State("ACCEPT"):
                with m.Switch(op):
                    with m.Case(SfuOp.EXP, SfuOp.RECIP, SfuOp.RSQRT, SfuOp.SILU, SfuOp.ADD,
                                SfuOp.MUL, SfuOp.ROPE):
                        m.d.comb += [iss_valid.eq(self.i.valid), self.i.ready.eq(ce),
                                     iss_uop.eq(op.as_value()), iss_dest.eq(_Dest.OUT)]
                    with m.Case(SfuOp.RMS_SCALAR):
                        m.d.comb += [iss_valid.eq(self.i.valid), self.i.ready.eq(ce),
                                     iss_uop.eq(_Uop.RMS_SCALAR), iss_dest.eq(_Dest.OUT)]
                    with m.Case(SfuOp.REDUCE_SUM, SfuOp.VDOT):
                        m.d.comb += [iss_valid.eq(self.i.valid), self.i.ready.eq(ce),
                                     iss_uop.eq(Mux(op == SfuOp.VDOT, _Uop.MUL, _Uop.PASS)),
                                     iss_dest.eq(_Dest.RED)]
                        with m.If(go & x.last):
                            m.next = "RED_OUT"
                    with m.Case(SfuOp.RMS_NORM):
                        m.d.comb += [iss_valid.eq(self.i.valid), self.i.ready.eq(ce),
                                     iss_uop.eq(_Uop.SQ), iss_dest.eq(_Dest.RED),
                                     in_wen.eq(go), in_waddr.eq(cnt),
                                     in_wdata.eq(Cat(x.a, x.b))]
                        with m.If(go):
                            m.d.sync += cnt.eq(cnt + 1)
                            with m.If(x.last):
                                m.d.sync += [n.eq(cnt + 1), cnt.eq(0), inv_n.eq(x.c),
                                             eps.eq(x.d)]
                                m.next = "RMS_SS"
                    with m.Case(SfuOp.SOFTMAX):
                        m.d.comb += [self.i.ready.eq(1), in_wen.eq(go), in_waddr.eq(cnt),
                                     in_wdata.eq(Cat(x.a, C(0, 32)))]
                        with m.If(go):
                            m.d.sync += cnt.eq(cnt + 1)
                            with m.If((cnt == 0) | (f32_key(x.a) > f32_key(mx))):
                                m.d.sync += mx.eq(x.a)
                            with m.If(x.last):
                                m.d.sync += [n.eq(cnt + 1), cnt.eq(0)]
                                m.next = "SM_EXP"
                    with m.Default():                       # unknown op: drop the beat
                        m.d.comb += self.i.ready.eq(1)
            with m.State("RED_OUT"):
                m.d.comb += [red_to_o.eq(1), red.o.ready.eq(self.o.ready & ~pipe_o)]
                with m.If(red.o.valid & red.o.ready):
                    m.next = "ACCEPT"
            # rms_norm: r = rsqrt(ss * (1/n) + eps); y = (x * r) * w
            with m.State("RMS_SS"):
                m.d.comb += [iss_valid.eq(red.o.valid), red.o.ready.eq(ce),
                             iss_uop.eq(_Uop.RMS_SCALAR), iss_dest.eq(_Dest.SCALAR),
                             iss_a.eq(red.o.payload), iss_c.eq(inv_n), iss_d.eq(eps)]
                with m.If(red.o.valid & ce):
                    m.next = "RMS_R"
            with m.State("RMS_R"):
                with m.If(scalar_done):
                    m.next = "RMS_OUT"
            with m.State("RMS_OUT"):
                m.d.comb += [iss_valid.eq(1), iss_uop.eq(_Uop.RMS_OUT), iss_dest.eq(_Dest.OUT),
                             iss_buf.eq(1), iss_idx.eq(cnt), iss_c.eq(scalar),
                             iss_last.eq(cnt == n - 1)]
                with m.If(ce):
                    m.d.sync += cnt.eq(cnt + 1)
                    with m.If(cnt == n - 1):
                        m.d.sync += cnt.eq(0)
                        m.next = "ACCEPT"
            # softmax: e = exp(s - m) -> buffer and reducer; 1/z; e * (1/z)
            with m.State("SM_EXP"):
                m.d.comb += [iss_valid.eq(1), iss_uop.eq(_Uop.SM_EXP), iss_dest.eq(_Dest.BUF_RED),
                             iss_buf.eq(1), iss_idx.eq(cnt), iss_c.eq(mx),
                             iss_last.eq(cnt == n - 1)]
                with m.If(ce):
                    m.d.sync += cnt.eq(cnt + 1)
                    with m.If(cnt == n - 1):
                        m.d.sync += cnt.eq(0)
                        m.next = "SM_Z"
            with m.State("SM_Z"):
                m.d.comb += [z_in_v.eq(red.o.valid), red.o.ready.eq(1), z_in.eq(red.o.payload)]
                with m.If(red.o.valid):
                    m.next = "SM_RZ"
            with m.State("SM_RZ"):
                with m.If(z_valids[-1]):
                    m.d.sync += scalar.eq(zr.value)
                    m.next = "SM_OUT"
            with m.State("SM_OUT"):
                empty = ~Cat(*valids[1:]).any()
                m.d.comb += [sm_in.eq(empty), sm_idx.eq(cnt), sm_c.eq(scalar),
                             sm_last.eq(cnt == n - 1)]
                with m.If(sce & empty):
                    m.d.sync += cnt.eq(cnt + 1)
                    with m.If(cnt == n - 1):
                        m.d.sync += cnt.eq(0)
                        m.next = "SM_DRAIN"
            with m.State("SM_DRAIN"):
                # the next vector's outputs may not pass the last of these
                with m.If(~Cat(sm_valids[1:]).any()):
                    m.next = "ACCEPT"
        return m


def units(config) -> dict:
    """``sfu`` with a vector buffer for the configuration's context (at least 2048 entries)."""
    ctx = int(getattr(config, "context", 0) or 0)
    return {"sfu": Sfu(max_len=1 << (max(ctx, 2048) - 1).bit_length())}
