"""Activation quantizer: fp32 blocks of 32 -> int8 q[32], fp32 d_x, int32 sumq (``nx.quantize_act``).

Per block (docs/numerics.md): ``amax = max|x|``; ``d = fmul(amax, fp32(1/127))``;
``id = fmul(recip(amax), 127)``, or 0 when ``d`` flushed to zero (a zero block);
``q = clamp(rne(fmul(x, id)), -127, 127)``; ``sumq = sum q``. Three parts, each a
stream stage:

1. collect: ``lanes`` elements per beat; the running ``max|x|`` over the
   block's ``32/lanes`` beats; every beat goes into a data FIFO.
2. scale: per block, ``d`` and ``id`` through a stalling pipeline (fmul,
   recip = table + two Newton steps, fmul).
3. apply: per beat, ``lanes`` multipliers ``x * id``, round to nearest even,
   clamp; a packer assembles the block and its ``sumq``.

Throughput: one beat (``lanes`` elements) per cycle, i.e. one block every
``32/lanes`` cycles, as long as the output is read; the data FIFO is deep
enough to cover the scale pipeline's latency.
"""

from amaranth import C, Cat, Module, Mux, Signal, signed
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from llmfab.core import numerics as nx
from .fp import F32, Pipe, f32_bits, stall_control
from .sfu import recip_rsqrt_pipe

__all__ = ["QBlock", "Quantizer", "rne_clamp127", "units"]

BLOCK = nx.BLOCK
#: One quantized block: q (int8 x 32), d_x (binary32), sumq (int32).
QBlock = data.StructLayout({
    "q": data.ArrayLayout(signed(8), BLOCK),
    "d": 32,
    "sumq": signed(32),
})

INV127 = f32_bits(nx.INV127)
F127 = f32_bits(nx.F127)
ONE = f32_bits(1.0)


def rne_clamp127(m, t, *, name="q"):
    """``clip(rint(t), -127, 127)`` as int8 for binary32 ``t``.

    Round half to even; +-inf clamp to +-127; NaN gives 0 (numpy's float -> int8
    cast of NaN on x86; the quantizer never produces one for finite inputs).
    """
    t = data.View(F32, t)
    mant = Cat(t.frac, C(1, 1))
    s = Signal(range(32), name=f"{name}_s")               # 23 - unbiased exponent, capped
    m.d.comb += s.eq(Mux(t.exp >= 150, 0, Mux(t.exp < 125, 25, 150 - t.exp)))
    wide = Signal(49, name=f"{name}_w")
    m.d.comb += wide.eq(Cat(C(0, 25), mant) >> s)
    ip = wide[25:49]
    g = wide[24]
    rest = wide[0:24].any()
    r = Signal(25, name=f"{name}_r")
    m.d.comb += r.eq(ip + (g & (rest | ip[0])))
    mag = Signal(7, name=f"{name}_mag")
    m.d.comb += mag.eq(Mux((t.exp >= 134) | (r > 127), 127, r[0:7]))
    out = Signal(signed(8), name=f"{name}_out")
    with m.If((t.exp == 255) & (t.frac != 0)):
        m.d.comb += out.eq(0)
    with m.Elif(t.exp == 0):
        m.d.comb += out.eq(0)
    with m.Else():
        m.d.comb += out.eq(Mux(t.sign, -mag, mag))
    return out


class Quantizer(wiring.Component):
    """Activation quantizer (unit ``quantizer``).

    Parameters
    ----------
    lanes : int
        Elements per input beat (1, 2, 4, 8, 16 or 32); a block is ``32/lanes``
        beats.

    Members
    -------
    i : In(stream.Signature(ArrayLayout(32, lanes)))
        binary32 elements, block after block (element ``j`` of beat ``b`` is
        block element ``b * lanes + j``). Finite, non-subnormal inputs.
    o : Out(stream.Signature(QBlock))
        One beat per block: ``q``, ``d``, ``sumq``.
    """

    def __init__(self, *, lanes=8):
        if lanes not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"Quantizer lanes must be 1, 2, 4, 8, 16 or 32, not {lanes!r}")
        self._lanes = lanes
        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(32, lanes))),
            "o": Out(stream.Signature(QBlock)),
        })

    @property
    def lanes(self):
        return self._lanes

    @property
    def beats(self):
        """Input beats per block."""
        return BLOCK // self._lanes

    def elaborate(self, platform):
        m = Module()
        L, B = self._lanes, self.beats

        # ---- scale pipeline: amax -> (d, id), into a small FIFO so that it never waits
        # for the apply stage (a stalled pipeline would hold every block in flight)
        sc_valid = Signal()
        sc_amax = Signal(32)
        sc_ce = Signal()
        p = Pipe(m, sc_ce, name="sc")
        amax = p.input(sc_amax)
        d = p.fmul(amax, INV127)
        nz = p.comb(lambda a: a[0:31] != 0, amax, latency=0)
        r = recip_rsqrt_pipe(p, p.comb(lambda a, nz: Mux(nz, a, ONE), amax, nz, latency=0), 0)
        inv = p.fmul(r, F127)
        # a block whose d flushes to zero (amax < 127 * 2**-126) is a zero block
        inv = p.comb(lambda v, d: Mux(d[0:31] != 0, v, 0), inv, d, latency=0)
        sc_lat = p.stage_of(inv, d)
        sfifo = fifo.SyncFIFOBuffered(width=64, depth=4)
        m.submodules.sfifo = sfifo
        ce, sc_out_valid = stall_control(m, sc_valid, sfifo.w_rdy, sc_lat, name="sc")
        m.d.comb += [sc_ce.eq(ce), sfifo.w_en.eq(sc_out_valid),
                     sfifo.w_data.eq(Cat(p.at(inv, sc_lat), p.at(d, sc_lat)))]
        inv_o, d_o = sfifo.r_data[0:32], sfifo.r_data[32:64]
        sc_ready = Signal()
        m.d.comb += sfifo.r_en.eq(sc_ready)

        # ---- collect: running max|x| and the data FIFO
        depth = 1 << ceil_log2(sc_lat + 2 * B + 4)
        buf = fifo.SyncFIFOBuffered(width=32 * L, depth=depth)
        m.submodules.buf = buf
        beat = Signal(range(B)) if B > 1 else C(0, 1)
        acc = Signal(31)
        lane_abs = [self.i.payload[j][0:31] for j in range(L)]
        while len(lane_abs) > 1:             # a tree of comparators, each level a Signal
            nxt = []
            for k in range(0, len(lane_abs) - 1, 2):
                mx = Signal(31, name=f"amax_{len(lane_abs)}_{k}")
                m.d.comb += mx.eq(Mux(lane_abs[k] > lane_abs[k + 1], lane_abs[k], lane_abs[k + 1]))
                nxt.append(mx)
            lane_abs = nxt + lane_abs[len(lane_abs) & ~1:]
        bmax = lane_abs[0]
        cur = Signal(31)
        m.d.comb += cur.eq(Mux(beat == 0, bmax, Mux(acc > bmax, acc, bmax)))
        last_in = beat == B - 1
        m.d.comb += [
            self.i.ready.eq(buf.w_rdy & (~last_in | sc_ce)),
            buf.w_data.eq(self.i.payload.as_value()),
            buf.w_en.eq(self.i.valid & self.i.ready),
            sc_valid.eq(self.i.valid & buf.w_rdy & last_in),
            sc_amax.eq(cur),
        ]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += acc.eq(cur)
            if B > 1:
                m.d.sync += beat.eq(Mux(last_in, 0, beat + 1))

        # ---- apply: x * id, round, clamp (a stalling pipeline) then pack
        ap_ce = Signal()
        ap_in_valid = Signal()
        ap_out_ready = Signal()
        beat2 = Signal(range(B)) if B > 1 else C(0, 1)
        last2 = beat2 == B - 1
        m.d.comb += [
            ap_in_valid.eq(buf.r_rdy & sfifo.r_rdy),
            buf.r_en.eq(ap_in_valid & ap_ce),
            sc_ready.eq(ap_in_valid & ap_ce & last2),
        ]
        if B > 1:
            with m.If(ap_in_valid & ap_ce):
                m.d.sync += beat2.eq(Mux(last2, 0, beat2 + 1))
        q = Pipe(m, ap_ce, name="ap")
        x = data.View(data.ArrayLayout(32, L), buf.r_data)
        inv_s = q.input(inv_o)
        qs = []
        for j in range(L):
            t = q.fmul(q.input(x[j]), inv_s)
            qs.append(q.comb(lambda t, j=j: rne_clamp127(m, t, name=f"q{j}"), t))
        ap_lat = q.stage_of(*qs)
        q_out = [q.at(v, ap_lat) for v in qs]
        pos_o = q.at(q.input(beat2), ap_lat)
        last_o = q.at(q.input(last2), ap_lat)
        d_out = q.at(q.input(d_o), ap_lat)
        ce2, ap_valid = stall_control(m, ap_in_valid, ap_out_ready, ap_lat, name="ap")
        m.d.comb += ap_ce.eq(ce2)

        # ---- packer: assemble the block's q and sumq
        q_acc = Signal(data.ArrayLayout(signed(8), BLOCK))
        s_acc = Signal(signed(32))
        beat_sum = Signal(signed(32))
        m.d.comb += beat_sum.eq(sum(q_out))
        m.d.comb += ap_out_ready.eq(~last_o | ~self.o.valid | self.o.ready)
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(ap_valid & ap_out_ready):
            with m.If(last_o):
                m.d.sync += [self.o.valid.eq(1), self.o.payload.d.eq(d_out),
                             self.o.payload.sumq.eq(s_acc + beat_sum), s_acc.eq(0)]
                for k in range(BLOCK):
                    if k // L == B - 1:
                        m.d.sync += self.o.payload.q[k].eq(q_out[k % L])
                    else:
                        m.d.sync += self.o.payload.q[k].eq(q_acc[k])
            with m.Else():
                m.d.sync += s_acc.eq(s_acc + beat_sum)
                for k in range(BLOCK):
                    with m.If(pos_o == k // L):
                        m.d.sync += q_acc[k].eq(q_out[k % L])
        self._latency = (sc_lat, ap_lat)
        return m


def units(config) -> dict:
    """``quantizer``: 8 lanes (one 32-element block every 4 cycles)."""
    return {"quantizer": Quantizer(lanes=8)}
