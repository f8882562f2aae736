"""A vector softmax: ``lanes`` elements per cycle in every pass, bit-exact to ``nx.softmax``.

:class:`VecSoftmax` computes ``core/numerics.py``'s ``softmax`` over a vector of
``n`` binary32 scores (``n <= max_len``) that arrives as ``L``-wide beats
(``L = lanes``) and sends the probabilities back as ``L``-wide beats:

* pass 1 (input, ``ceil(n/L)`` beats, one per cycle): the beat is stored in an
  ``L``-element-wide vector buffer and its exact maximum (an ``L``-way tree of
  :func:`~llmfab.hw.fp.f32_key` compares, registered, then folded into the
  running maximum ``m``);
* pass 2 (``ceil(n/32) * 32/L`` beats, one per cycle, never stalls): ``L`` lanes of
  ``e = exp(fsub(s, m))`` (:func:`~llmfab.hw.sfu.exp_pipe`) written back into the
  buffer and fed, ``L`` per cycle, into ``reduce_sum``'s 32 lanes: element ``t``
  (beat ``t // L``, slot ``t mod 32 // L``) goes to lane ``t mod 32`` on adder
  ``t mod L``; the first 32 are added to -0.0 (exact), the rest to their lane;
  past ``n`` the beats carry the spec's +0.0 padding up to a multiple of 32, so
  each reduce lane sees a new element every ``32/L >= 4`` cycles (the adder's
  latency is 3); then the binary tree ``acc[i] = fadd(acc[i], acc[i+h])`` for
  h = 16, 8, 4, 2, 1 on the same ``L`` adders (``ceil(h/L)`` issues and 3 bubble
  cycles per level);
* ``1/z`` on a recip-only :func:`~llmfab.hw.sfu.recip_rsqrt_pipe`;
* pass 3 (``ceil(n/L)`` beats, or the padded count with ``pad32``): ``L``
  multipliers ``fmul(e, 1/z)``, a pipeline that stalls as a whole on the output's
  ``ready`` (:func:`~llmfab.hw.fp.stall_control` style).

About ``3 n / L + 90`` cycles from the first input beat to the last output beat
(``pytest -s tests/rtl/test_softmax.py`` prints the measured cycles). The next
vector's input is taken while pass 3 drains; its pass 2 starts once pass 3's
pipeline is empty. See docs/hw-units.md ("Vector softmax").
"""

from amaranth import Array, C, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from .fp import FAddCore, Pipe, Staged, f32_key, valid_chain
from .sfu import NEG_ZERO, exp_pipe, recip_rsqrt_pipe

__all__ = ["softmax_beat", "VecSoftmax"]

RED_LANES = 32          # reduce_sum's lanes (nx.LANES)


def softmax_beat(lanes: int) -> data.StructLayout:
    """One ``lanes``-wide beat: ``data[k]`` binary32, ``count`` valid lanes (1..lanes; read on
    the beat with ``last``, the others are full), ``last`` ends the vector."""
    return data.StructLayout({"data": data.ArrayLayout(32, lanes),
                              "count": range(lanes + 1), "last": 1})


def _key_to_f32(k):
    """Inverse of :func:`f32_key`."""
    return Mux(k[31], k ^ 0x80000000, ~k)[0:32]


class VecSoftmax(wiring.Component):
    """``nx.softmax`` over ``L``-wide beats, ``L`` elements per cycle in every pass.

    Parameters
    ----------
    lanes : int
        ``L``: 1, 2, 4 or 8 (so that each of reduce_sum's 32 lanes sees a new
        element at most every 4 cycles).
    max_len : int
        The longest vector: a power of two >= 32 (the buffer holds ``max_len / L``
        words of ``L`` binary32).
    pad32 : bool
        Send +0.0 beats after the probabilities up to a multiple of 32 elements
        (``count`` 0 on those beats; ``last`` on the final padding beat).

    Members
    -------
    i : In(stream.Signature(softmax_beat(L)))
        The scores: beats of ``L`` elements, ``count`` valid lanes on the ``last``
        beat (the lanes above it are ignored).
    o : Out(stream.Signature(softmax_beat(L)))
        The probabilities, beat by beat as the input (``count`` as the input's,
        +0.0 in lanes >= ``count``), ``last`` on the final beat. ``o.ready`` may
        be low at any time.
    """

    def __init__(self, *, lanes: int = 8, max_len: int = 2048, pad32: bool = False):
        if lanes not in (1, 2, 4, 8):
            raise ValueError(f"VecSoftmax lanes must be 1, 2, 4 or 8, not {lanes!r}")
        if not isinstance(max_len, int) or max_len < RED_LANES or max_len & (max_len - 1):
            raise ValueError(f"VecSoftmax max_len must be a power of two >= 32, not {max_len!r}")
        self._lanes = lanes
        self._max_len = max_len
        self._pad32 = bool(pad32)
        layout = softmax_beat(lanes)
        super().__init__({"i": In(stream.Signature(layout)),
                          "o": Out(stream.Signature(layout))})

    @property
    def lanes(self):
        return self._lanes

    @property
    def max_len(self):
        return self._max_len

    @property
    def pad32(self):
        return self._pad32

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        CB = RED_LANES // L               # beats per 32-element chunk
        lgcb = exact_log2(CB)
        depth = self._max_len // L
        one = Signal(init=1)

        mem = memory.Memory(shape=32 * L, depth=depth, init=[])
        m.submodules.buf = mem
        wp = mem.write_port()
        rp = mem.read_port()

        nb = Signal(range(depth + 1))      # beats of the vector
        nb2 = Signal(range(depth + 1))     # beats padded to a multiple of 32 elements
        lastc = Signal(range(L + 1))       # valid lanes of the last beat
        cnt = Signal(range(depth + 1))     # beats stored (pass 1) / issued (passes 2, 3)
        mkey = Signal(32)                  # running max (f32_key; 0 is below every value)
        mx = Signal(32)
        rz = Signal(32)                    # 1 / z

        # ---- pass 1: store, beat max (registered), fold into the running max
        x = self.i.payload
        go = self.i.valid & self.i.ready
        keys = [Mux(~x.last | (k < x.count), f32_key(x.data[k]), 0) for k in range(L)]
        while len(keys) > 1:
            nxt = []
            for a, b in zip(keys[0::2], keys[1::2]):
                s = Signal(32, name="mk")
                m.d.comb += s.eq(Mux(b > a, b, a))
                nxt.append(s)
            keys = nxt
        bmax = Signal(32)
        bmax_v = Signal()
        m.d.sync += [bmax.eq(keys[0]), bmax_v.eq(go)]
        clear_max = Signal()
        with m.If(clear_max):
            m.d.sync += mkey.eq(0)
        with m.Elif(bmax_v & (bmax > mkey)):
            m.d.sync += mkey.eq(bmax)
        m.d.comb += mx.eq(_key_to_f32(mkey))

        # ---- pass 2: e = exp(s - m), L lanes; back into the buffer and into the reducer
        p2_issue = Signal()
        p2_b = Signal(range(depth))
        p2 = Pipe(m, one, name="smx")
        mx_s = Staged(mx, None)            # stable during pass 2
        es = [exp_pipe(p2, p2.fsub(Staged(rp.data[32 * k:32 * k + 32], 1), mx_s))
              for k in range(L)]
        E = es[0].stage
        p2_valids = valid_chain(m, one, p2_issue, E, name="smxv")
        b_e = p2.at(p2.input(p2_b), E)
        v_e = p2_valids[E]
        emask = []
        for k in range(L):
            ok = (b_e < nb - 1) | ((b_e == nb - 1) & (k < lastc))
            emask.append(Mux(ok, es[k].value, 0))
        m.d.comb += [wp.en.eq(v_e), wp.addr.eq(b_e), wp.data.eq(Cat(*emask))]

        # ---- the reducer: 32 lane registers, L adders (accumulate, then the tree)
        acc = [Signal(32, name=f"lane{r}", reset_less=True) for r in range(RED_LANES)]
        adders = [FAddCore() for _ in range(L)]
        for k, ad in enumerate(adders):
            m.submodules[f"radd{k}"] = ad
            m.d.comb += ad.ce.eq(1)
        r_issue = Signal()
        r_row = Signal(max(lgcb, 1))
        r_mask = Signal(L)
        r_first = Signal()
        r_tree = Signal()
        bsel = [Signal(32, name=f"tb{k}") for k in range(L)]
        for k, ad in enumerate(adders):
            col = Array(acc[j * L + k] for j in range(CB))[r_row] if CB > 1 else acc[k]
            m.d.comb += [ad.a.eq(Mux(r_first, NEG_ZERO, col)),
                         ad.b.eq(Mux(r_tree, bsel[k], emask[k]))]
        lat = FAddCore.latency
        t_v = [r_issue] + [Signal(name=f"rv{i}") for i in range(lat)]
        t_row = [r_row] + [Signal.like(r_row, name=f"rrow{i}") for i in range(lat)]
        t_mask = [r_mask] + [Signal.like(r_mask, name=f"rmask{i}") for i in range(lat)]
        for i in range(1, lat + 1):
            m.d.sync += [t_v[i].eq(t_v[i - 1]), t_row[i].eq(t_row[i - 1]),
                         t_mask[i].eq(t_mask[i - 1])]
        for k, ad in enumerate(adders):
            for j in range(CB):
                with m.If(t_v[lat] & t_mask[lat][k] & (t_row[lat] == j)):
                    m.d.sync += acc[j * L + k].eq(ad.o)
        red_busy = Cat(*t_v).any()

        # the tree's issue steps: (h, j) -> adder k adds acc[jL+k] and acc[jL+k+h] if jL+k < h
        steps = [(h, j) for h in (16, 8, 4, 2, 1) for j in range(-(-h // L))]
        level_end = [i == len(steps) - 1 or steps[i + 1][0] != h for i, (h, j) in enumerate(steps)]
        step = Signal(range(len(steps)))
        tree_issue = Signal()
        with m.If(tree_issue):
            with m.Switch(step):
                for si, (h, j) in enumerate(steps):
                    with m.Case(si):
                        m.d.comb += [r_row.eq(j),
                                     r_mask.eq(sum(1 << k for k in range(L) if j * L + k < h))]
                        m.d.comb += [bsel[k].eq(acc[j * L + k + h])
                                     for k in range(L) if j * L + k < h]
        is_end = Signal()
        m.d.comb += is_end.eq(Array(Const(int(e), 1) for e in level_end)[step])

        # ---- 1 / z
        pz = Pipe(m, one, name="smz")
        z_v = Signal()
        zr = recip_rsqrt_pipe(pz, pz.input(acc[0]), 0)
        z_valids = valid_chain(m, one, z_v, zr.stage, name="smzv")

        # ---- pass 3: fmul(e, 1/z), L lanes, stalling on o.ready
        p3_issue = Signal()
        p3_b = Signal(range(depth))
        ce3 = Signal()
        p3 = Pipe(m, ce3, name="smo")
        ys = [p3.fmul(Staged(rp.data[32 * k:32 * k + 32], 1), Staged(rz, None)) for k in range(L)]
        Y = ys[0].stage
        p3_valids = valid_chain(m, ce3, p3_issue, Y, name="smov")
        # count and last are taken at issue: the next vector's input may change nb meanwhile
        nb3 = nb2 if self._pad32 else nb
        cnt_i = Signal(range(L + 1))
        m.d.comb += cnt_i.eq(Mux(p3_b < nb - 1, L, Mux(p3_b == nb - 1, lastc, 0)))
        cnt_y = p3.at(p3.input(cnt_i), Y)
        last_y = p3.at(p3.input(p3_b == nb3 - 1), Y)
        o_v = p3_valids[Y]
        m.d.comb += ce3.eq(~o_v | self.o.ready)
        m.d.comb += [self.o.valid.eq(o_v),
                     self.o.payload.count.eq(cnt_y),
                     self.o.payload.last.eq(last_y)]
        for k in range(L):
            m.d.comb += self.o.payload.data[k].eq(Mux(k < cnt_y, ys[k].value, 0))
        p3_busy = Cat(*p3_valids[1:]).any()

        # the read port: pass 2 reads every cycle, pass 3 when its pipeline advances
        m.d.comb += [rp.addr.eq(Mux(p2_issue, p2_b, p3_b)), rp.en.eq(p2_issue | ce3)]

        # ---- sequencer
        tw = Signal(range(lat + 1))
        with m.FSM(name="smx"):
            with m.State("IN"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(go):
                    m.d.comb += [wp.en.eq(1), wp.addr.eq(cnt), wp.data.eq(x.data.as_value())]
                    m.d.sync += cnt.eq(cnt + 1)
                    with m.If(x.last):
                        m.d.sync += [nb.eq(cnt + 1), lastc.eq(x.count), cnt.eq(0),
                                     nb2.eq(((cnt + CB) >> lgcb) << lgcb)]
                        m.next = "MAX"
            with m.State("MAX"):                   # the last beat's max is folded in
                m.next = "WAIT"
            with m.State("WAIT"):                  # the previous vector's pass 3 has drained
                with m.If(~p3_busy):
                    m.next = "EXP"
            with m.State("EXP"):
                m.d.comb += [p2_issue.eq(1), p2_b.eq(cnt)]
                m.d.sync += cnt.eq(cnt + 1)
                with m.If(cnt == nb2 - 1):
                    m.d.sync += cnt.eq(0)
                    m.next = "ACC"
            with m.State("ACC"):                   # the exps and the accumulation drain
                # chunk slot and first-chunk flag of the beat leaving exp (below)
                with m.If(~Cat(*p2_valids).any() & ~red_busy):
                    m.d.sync += [step.eq(0), tw.eq(0)]
                    m.next = "TREE"
            with m.State("TREE"):
                with m.If(tw == 0):
                    m.d.comb += [tree_issue.eq(1), r_issue.eq(1), r_tree.eq(1)]
                    m.d.sync += step.eq(step + 1)
                    with m.If(is_end):
                        m.d.sync += tw.eq(lat)
                    with m.If(step == len(steps) - 1):
                        m.next = "TREE_END"
                with m.Else():
                    m.d.sync += tw.eq(tw - 1)
            with m.State("TREE_END"):
                with m.If(tw == 0):
                    m.d.comb += z_v.eq(1)
                    m.next = "RZ"
                with m.Else():
                    m.d.sync += tw.eq(tw - 1)
            with m.State("RZ"):
                with m.If(z_valids[-1]):
                    m.d.sync += rz.eq(zr.value)
                    m.next = "OUT"
            with m.State("OUT"):
                m.d.comb += [p3_issue.eq(1), p3_b.eq(cnt)]
                with m.If(ce3):
                    m.d.sync += cnt.eq(cnt + 1)
                    with m.If(cnt == nb3 - 1):
                        m.d.sync += cnt.eq(0)
                        m.d.comb += clear_max.eq(1)
                        m.next = "IN"

        # pass 2's beats into the reducer as they leave exp
        slot = b_e[0:lgcb] if lgcb else C(0, 1)
        with m.If(v_e):
            m.d.comb += [r_issue.eq(1), r_row.eq(slot), r_mask.eq((1 << L) - 1),
                         r_first.eq((b_e >> lgcb) == 0)]
        return m
