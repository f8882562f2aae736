"""Instruction fetch and the validation pass.

:class:`Fetch` streams the program's 128-bit words (with their program
counters) from HBM: every port reads the same local lines, one beat of each
port makes one ``D``-byte line of ``D/16`` words. Per-port line buffers (the
configuration's instruction buffer) are reserved before a burst is requested,
so responses never block the port they share with the load engine.

:class:`Validator` is ``Golden.check`` in hardware: it decodes every word in
program order, with the run's registers, and reports the first fault --
illegal encoding (``compiler.isa.decode``), an illegal MISC operand
(``compiler.isa.misc_operand_error``: QUANT or EMBED ``n`` not a multiple of
32, ROPE or ATTN head dimension zero or odd, EMBED format >= 3), an HBM range
beyond ``hbm_size`` or an on-chip range beyond the on-chip size (every range
of ``Golden._ranges``, e.g. ATTN's ``R[reg] + t (+1 if cached)`` cache rows and
COPY's ``aux`` strided rows) -- or a program without END. Words after END are not
looked at. One word per cycle, three pipeline stages.

Attention on the chains (docs/isa.md; ``chains=True``, a configuration with ``attention:
chains``): its words are checked as ``Golden._check`` does -- an MV's shape ``rows + R[rreg]``
x ``cols + R[creg]`` (status 1 when the columns are not a multiple of 32 or either is 65536 or
more, ``compiler.isa.dynamic_operand_error``) and its weights ``[wb, wb +
isa.weight_span(...))`` in the weight buffer (which then starts at the KV buffer), QUANT, MUL
and SOFTMAX over ``n + R[reg]`` (a QUANT's a multiple of 32), SOFTMAX writing ``n`` rounded up
to 32, KVROW writing one KV head's region (``isa.kv_region``, head dim ``n`` a nonzero
multiple of 32), ST.x reading ``buf + R[ireg]*stride``. Without it they are refused with
status 1 (``compiler.isa.chains_feature``), and nothing of them is built.
"""

from amaranth import C, Cat, Const, Module, Mux, ResetInserter, Signal
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from llmfab.compiler import isa as _isa
from llmfab.hw.axi import BURST_BYTES, FLAT_BITS, read_client_signature
from llmfab.hw.dma import HW_REGS, QEntry, reg_value
from llmfab.hw.isa import (BLOCK_BYTES, QBLOCK_BYTES, SPARSE_BLOCK_BYTES, Instruction, MiscFunc,
                           Op, StFunc, SysFunc, is_legal)

__all__ = ["Fetch", "Footprint", "Validator", "is_end"]


def is_end(word) -> "Value":
    """High for a legal ``SYS END`` word."""
    w = data.View(Instruction, word)
    return ((w.header.op == Op.SYS) & (w.header.func == SysFunc.END) & (w.sys.rsv == 0)
            & (word[4:8] == 0))


class Fetch(wiring.Component):
    """Program words from HBM, in order.

    Members
    -------
    start : In(1)
        Pulse: fetch ``nwords`` words from flat byte address ``base``
        (a multiple of 16), dropping whatever was buffered.
    stop : In(1)
        Request no more bursts (those in flight still land).
    base : In(64), nwords : In(32)
    o : Out(stream.Signature(QEntry))
    idle : Out(1)
        No burst requested or in flight.
    rd : Out(read_client_signature) per port
    """

    def __init__(self, *, ports: int, beat_bytes: int, buffer_bytes: int):
        self._p, self._s = ports, beat_bytes
        self._depth = max(4, buffer_bytes // (ports * beat_bytes))
        super().__init__({
            "start": In(1), "stop": In(1), "base": In(64), "nwords": In(32),
            "o": Out(stream.Signature(QEntry)),
            "idle": Out(1),
            "rd": Out(read_client_signature(beat_bytes * 8)).array(ports),
        })

    def elaborate(self, platform):
        m = Module()
        P, S = self._p, self._s
        D = P * S
        lgs, lgd = exact_log2(S), exact_log2(D)
        depth = self._depth
        bb = min(BURST_BYTES // S, 256, depth // 2)
        bb = 1 << (bb.bit_length() - 1)
        wpl = D // 16
        first = Signal(64)
        end = Signal(64)
        pc = Signal(32)
        widx = Signal(range(max(wpl, 2)))
        m.d.comb += first.eq(self.base >> lgd)
        with m.If(self.start):
            m.d.sync += [end.eq(first + ((self.base[0:lgd] + (self.nwords << 4) + D - 1) >> lgd)),
                         pc.eq(0), widx.eq(self.base[4:lgd] if lgd > 4 else 0)]
        fifos = []
        idle_p = []
        pop = Signal()
        for p in range(P):
            f = ResetInserter(self.start)(fifo.SyncFIFOBuffered(width=S * 8, depth=depth))
            m.submodules[f"lines{p}"] = f
            fifos.append(f)
            nxt = Signal(64, name=f"next{p}")
            reserved = Signal(range(depth + 1), name=f"reserved{p}")
            flying = Signal(range(depth + 1), name=f"flying{p}")
            ar = self.rd[p].ar
            pend = Signal(name=f"pend{p}")
            alen = Signal(9, name=f"alen{p}")
            room = end - nxt
            to_bound = bb - nxt[0:exact_log2(bb)] if bb > 1 else C(1, 9)
            blen = Signal(9, name=f"blen{p}")
            m.d.comb += blen.eq(Mux(room < to_bound, room, to_bound))
            inc = Signal(range(depth + 1), name=f"inc{p}")
            with m.If(self.start):
                m.d.sync += [nxt.eq(first), pend.eq(0)]
            with m.Elif(~pend & ~self.stop & (nxt < end) & (reserved + blen <= depth)):
                m.d.sync += [pend.eq(1), alen.eq(blen)]
            m.d.comb += [ar.valid.eq(pend), ar.payload.addr.eq(nxt << lgs),
                         ar.payload.len.eq(alen - 1)]
            with m.If(ar.valid & ar.ready):
                m.d.sync += [pend.eq(0), nxt.eq(nxt + alen)]
                m.d.comb += inc.eq(alen)
            r = self.rd[p].r
            m.d.comb += [f.w_en.eq(r.valid), f.w_data.eq(r.payload.data), r.ready.eq(f.w_rdy),
                         f.r_en.eq(pop)]
            with m.If(self.start):
                m.d.sync += reserved.eq(0)
            with m.Else():
                m.d.sync += reserved.eq(reserved + inc - pop)
            m.d.sync += flying.eq(flying + inc - (r.valid & r.ready))
            idle_p.append(~pend & (flying == 0))
        line = Cat(f.r_data for f in fifos)
        have = Cat(f.r_rdy for f in fifos).all()
        o = self.o
        m.d.comb += [o.valid.eq(have & (pc < self.nwords)),
                     o.payload.word.eq(line.word_select(widx, 128)), o.payload.pc.eq(pc),
                     self.idle.eq(Cat(idle_p).all())]
        with m.If(o.valid & o.ready & ~self.start):
            m.d.sync += pc.eq(pc + 1)
            with m.If(widx == wpl - 1):
                m.d.comb += pop.eq(1)
                m.d.sync += widx.eq(0)
            with m.Else():
                m.d.sync += widx.eq(widx + 1)
        return m


def _mul(m, a, b, name):
    s = Signal(len(a) + len(b), name=name)
    m.d.sync += s.eq(a * b)
    return s


class Footprint:
    """The on-chip ranges of an MV, MM or MISC word (``sim/golden_plan.py``'s
    ``onchip_ranges``), computed over two cycles: the products are registered from the
    word presented this cycle, and ``starts`` / ``lens`` (:data:`SLOTS` ranges, unused ones
    of length 0) are valid the next cycle from those registers; LD, ST and SYS words have no
    range here. ``misc_illegal``: an illegal MISC operand (``compiler.isa.misc_operand_error``;
    with ``chains`` also ``compiler.isa.dynamic_operand_error``, an MV's included),
    ``wb``: the MV/MM weight address. The validation pass and the execution unit's overlap
    check (``hw/exec_unit.py``) both use it.

    ``rval`` is ``R`` of bits 120..123 (a MISC's ``reg``, an MV's ``rreg``); with ``chains``
    (attention on the chains) ``rval2`` is ``R`` of bits 124..127 (an MV's ``creg``) and the
    ranges are those of the chains words too (module docstring); ``unsupported`` is then 0.
    Without ``chains``, ``unsupported`` flags every chains word (status 1) and the hardware is
    what it was before them.
    """

    SLOTS = 5

    def __init__(self, m, word, rval, context, *, global_base: int, slices: int = 1,
                 stripe: int = 64, chains: bool = False, rval2=None):
        w = data.View(Instruction, word)
        op, func = w.header.op, w.header.func
        op2, func2 = Signal(4), Signal(8)
        m.d.sync += [op2.eq(op), func2.eq(func)]
        mv, mm, misc = w.mv, w.mm, w.misc
        P, S = slices, stripe
        if chains:
            # attention on the chains (docs/isa.md): an MV's shape is rows + R[rreg] x
            # cols + R[creg] (``rval``, ``rval2``: the registers of bits 120..123, 124..127;
            # an MM's bits there are ntok), its func bits 5, 6 the tiled layouts (not sparsity)
            if rval2 is None:
                raise ValueError("Footprint(chains=True) needs rval2 (R[creg] of an MV)")
            is_mv = op == Op.MV
            rows_x, cols_x = Signal(33, name="fp_rows_x"), Signal(33, name="fp_cols_x")
            m.d.comb += [rows_x.eq(mv.rows + Mux(is_mv, rval, 0)),
                         cols_x.eq(mv.cols + Mux(is_mv, rval2, 0))]
            rows, cols = rows_x[0:16], cols_x[0:16]
            bb_sel = Cat(mv.func[2:5], C(0, 3), mv.func[0:2])
        else:
            rows, cols = mv.rows, mv.cols
            bb_sel = Cat(mv.func[2:8], mv.func[0:2])
        nb = cols[5:16]
        nt = Mux(op == Op.MM, mm.ntok, 1)
        bb_tab = Signal(6)
        with m.Switch(bb_sel):
            for fi in range(3):
                for si in range(len(SPARSE_BLOCK_BYTES[0])):
                    with m.Case(si | (fi << 6)):
                        m.d.comb += bb_tab.eq(SPARSE_BLOCK_BYTES[fi][si])
        rn = _mul(m, rows, nb, "rn")
        # slice-major weights (docs/isa.md, "Slices"): slice p's rows p, p+P, ... in its bank
        lgp, lgs = exact_log2(P), exact_log2(S)
        pn = _mul(m, (rows + P - 1) >> lgp, nb, "pn")      # blocks of the fullest slice
        bb2 = Signal(6)
        ntnb = _mul(m, nt, nb, "ntnb")
        ntrows = _mul(m, nt, rows, "ntrows")
        if chains:
            def span_of(r_per_slice_bytes):
                """mv_span's bytes from one slice's bytes (before rounding to stripes)."""
                if P == 1:
                    return r_per_slice_bytes
                return ((r_per_slice_bytes + S - 1) >> lgs) << (lgs + lgp)
            if P > 32:
                raise ValueError("attention on the chains needs at most 32 slices (row tiles)")
            # the register-dependent operand rules (compiler.isa.dynamic_operand_error)
            mv_bad2 = Signal(name="fp_mv_bad")
            m.d.sync += mv_bad2.eq(is_mv & ((cols_x[0:5] != 0) | (cols_x >= (1 << 16))
                                            | (rows_x >= (1 << 16))))
            # weight_span of the tiled layouts: row tiles of TILE_ROWS rows, one
            # mv_span(TILE_ROWS, row bytes) each; block tiles, one mv_span(rows, block) each
            TR = _isa.TILE_ROWS
            nbb = Signal(17, name="fp_nbb")
            m.d.comb += nbb.eq(nb * bb_tab)
            rt_tile = span_of(nbb * (TR // P))
            rt_span = _mul(m, (rows + TR - 1) >> exact_log2(TR), rt_tile, "rt_span")
            bt_block = span_of(((rows + P - 1) >> lgp) * bb_tab)
            bt_span = _mul(m, nb, bt_block, "bt_span")
            lay2 = Signal(2, name="fp_layout")
            m.d.sync += lay2.eq(Mux(is_mv, mv.func[5:7], 0))
            # dynamic MISC lengths n + R[reg] (QUANT, MUL, SOFTMAX: compiler.isa.misc_len)
            dyn_len = (op == Op.MISC) & ((func == MiscFunc.QUANT) | (func == MiscFunc.MUL)
                                         | (func == MiscFunc.SOFTMAX))
            nd2 = Signal(33, name="fp_nd")
            m.d.sync += nd2.eq(misc.n + Mux(dyn_len, rval, 0))
            # KVROW writes one KV head's region (compiler.isa.kv_region of n = head dim)
            hd = misc.n
            q8 = BLOCK_BYTES[_isa.FMTS.index("q8_0")]
            k_tile = span_of(hd[5:16] * ((TR // P) * q8))      # mv_span(TR, hd/32 blocks)
            v_tile = span_of(((hd + P - 1) >> lgp) * q8)        # mv_span(hd, one block)
            kv_tiles = _mul(m, (context + TR - 1) >> exact_log2(TR), k_tile + v_tile, "kv_tiles")
        wb2, qsrc2, dst2 = Signal(24), Signal(24), Signal(24)
        m.d.sync += [bb2.eq(bb_tab), wb2.eq(mv.wb), qsrc2.eq(mv.qsrc), dst2.eq(mv.dst)]
        n2, aux2, a2, b2, mdst2 = Signal(16), Signal(16), Signal(24), Signal(24), Signal(24)
        m.d.sync += [n2.eq(misc.n), aux2.eq(misc.aux), a2.eq(misc.a), b2.eq(misc.b),
                     mdst2.eq(misc.dst)]
        na = _mul(m, misc.n, misc.aux, "na")
        # ATTN operands: n = heads[7:0] | t[15:8], aux = head_dim[14:0] | cached[15]
        a_nh, a_t, a_hd, a_cached = misc.n[0:8], misc.n[8:16], misc.aux[0:15], misc.aux[15]
        a_rows = Signal(34)
        m.d.comb += a_rows.eq(rval + a_t + a_cached)
        attn_q = _mul(m, a_nh + Mux(a_cached, 0, 2), a_hd, "attn_q")      # query (+ new K, V) rows
        attn_o = _mul(m, a_nh, a_hd, "attn_o")
        attn_kv = _mul(m, a_rows, a_hd, "attn_kv")
        attn_ctx = _mul(m, context, a_hd, "attn_ctx")
        # COPY operands: aux rows (0 = 1) of n words, destination rows b words apart
        c_reps = Signal(16)
        m.d.comb += c_reps.eq(Mux(misc.aux == 0, 1, misc.aux))
        copy_src = _mul(m, c_reps, misc.n, "copy_src")
        copy_gap = _mul(m, c_reps - 1, Mux(c_reps > 1, misc.b, misc.n), "copy_gap")
        # attention on the chains (docs/isa.md, compiler.isa.chains_feature): legal encodings
        # that a configuration without attention: chains refuses (status 1); with it they are
        # validated like every other word (the ranges below)
        if chains:
            self.unsupported = C(0, 1)
        else:
            self.unsupported = Signal(name="fp_unsupported")
            m.d.sync += self.unsupported.eq(
                ((op == Op.MISC) & ((func == MiscFunc.KVROW) | (func == MiscFunc.SOFTMAX)
                                    | (((func == MiscFunc.QUANT) | (func == MiscFunc.MUL)) & (misc.reg != 0))))
                | ((op == Op.MV) & ((mv.func[5:7] != 0) | (mv.rreg != 0) | (mv.creg != 0)))
                | ((op == Op.ST) & (func == StFunc.X)))
        emb_bb = Signal(6)
        m.d.sync += emb_bb.eq(Mux(misc.aux == 0, BLOCK_BYTES[0],
                                  Mux(misc.aux == 1, BLOCK_BYTES[1], BLOCK_BYTES[2])))

        # ---- the next cycle: the ranges
        self.starts = [Signal(64, name=f"fp_s{k}") for k in range(self.SLOTS)]
        self.lens = [Signal(64, name=f"fp_l{k}") for k in range(self.SLOTS)]
        self.misc_illegal = Signal(name="fp_misc_illegal")
        self.wb = wb2
        starts, lens = self.starts, self.lens
        n4 = n2 << 2
        nq = n2[5:16]
        gb = C(global_base, 24)

        def slots(*pairs):
            return [s.eq(a) for s, (a, _) in zip(starts, pairs)] + \
                   [s.eq(b) for s, (_, b) in zip(lens, pairs)]

        with m.If((op2 == Op.MV) | (op2 == Op.MM)):
            span = rn * bb2 if P == 1 else ((pn * bb2 + S - 1) >> lgs) << (lgs + lgp)
            if chains:
                span = Mux(lay2[0], rt_span, Mux(lay2[1], bt_span, span))
                m.d.comb += self.misc_illegal.eq(mv_bad2)
            m.d.comb += slots((wb2, span), (qsrc2, ntnb * QBLOCK_BYTES), (dst2, ntrows << 2))
        with m.Elif(op2 == Op.MISC):
            with m.Switch(func2):
                if chains:
                    nd4 = nd2 << 2
                    with m.Case(MiscFunc.QUANT):
                        m.d.comb += slots((a2, nd4), (mdst2, nd2[5:] * QBLOCK_BYTES))
                        m.d.comb += self.misc_illegal.eq((n2[0:5] != 0) | (nd2[0:5] != 0))
                    with m.Case(MiscFunc.MUL):
                        m.d.comb += slots((a2, nd4), (b2, nd4), (mdst2, nd4))
                    with m.Case(MiscFunc.SOFTMAX):
                        m.d.comb += slots((a2, nd4), (mdst2, ((nd2 + 31) >> 5) << 7), (gb, C(8, 4)))
                    with m.Case(MiscFunc.KVROW):
                        m.d.comb += slots((a2, n2 << 3), (mdst2, kv_tiles + (context << 2)))
                        m.d.comb += self.misc_illegal.eq((n2 == 0) | (n2[0:5] != 0))
                else:
                    with m.Case(MiscFunc.QUANT):
                        m.d.comb += slots((a2, n4), (mdst2, nq * QBLOCK_BYTES))
                        m.d.comb += self.misc_illegal.eq(n2[0:5] != 0)
                with m.Case(MiscFunc.RMSNORM):
                    m.d.comb += slots((a2, n4), (b2, n4), (mdst2, n4), (gb, C(12, 4)))
                with m.Case(MiscFunc.ROPE):
                    m.d.comb += slots((a2, na << 2), (b2, aux2 << 2), (mdst2, na << 2))
                    m.d.comb += self.misc_illegal.eq((aux2 == 0) | aux2[0])
                with m.Case(*((MiscFunc.ADD, MiscFunc.SILU_MUL) if chains else
                              (MiscFunc.ADD, MiscFunc.MUL, MiscFunc.SILU_MUL))):
                    m.d.comb += slots((a2, n4), (b2, n4), (mdst2, n4))
                with m.Case(MiscFunc.ATTN):
                    m.d.comb += slots((a2, attn_q << 2), (b2, attn_kv << 1),
                                      (b2 + (attn_ctx << 1), attn_kv << 1), (mdst2, attn_o << 2),
                                      (gb, C(8, 4)))
                    m.d.comb += self.misc_illegal.eq((aux2[0:15] == 0) | aux2[0])
                with m.Case(MiscFunc.COPY):
                    m.d.comb += slots((a2, copy_src << 2), (mdst2, (copy_gap + n2) << 2))
                with m.Case(MiscFunc.EMBED):
                    m.d.comb += slots((a2, nq * emb_bb), (mdst2, n4))
                    m.d.comb += self.misc_illegal.eq((n2[0:5] != 0) | (aux2 >= 3))


class Validator(wiring.Component):
    """The validation pass (``Golden.check``) over the fetched program.

    Members
    -------
    start : In(1)
        Pulse at the start of a run (``nwords`` and the registers are stable).
    i : In(stream.Signature(QEntry))
    regs : In(32) x HW_REGS, hbm_size : In(64), context : In(32), nwords : In(32)
    done : Out(1)
        Level: the pass is over; ``status`` (0 or a fault) and ``pc`` hold.
    status : Out(3), pc : Out(32)
    """

    def __init__(self, *, onchip_size: int, global_base: int, weight_base: int = 0,
                 slices: int = 1, stripe: int = 64, chains: bool = False):
        self._chains = chains
        self._size = onchip_size
        self._gb = global_base
        self._wbase = weight_base
        self._slices = slices
        self._stripe = stripe
        super().__init__({
            "start": In(1),
            "i": In(stream.Signature(QEntry)),
            "regs": In(32).array(HW_REGS), "hbm_size": In(64), "context": In(32), "nwords": In(32),
            "done": Out(1), "status": Out(3), "pc": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        regs = list(self.regs)
        taking = Signal()
        seen_end = Signal()
        with m.If(self.start):
            m.d.sync += [taking.eq(self.nwords != 0), seen_end.eq(0), self.done.eq(self.nwords == 0),
                         self.status.eq(Mux(self.nwords == 0, _isa.STATUS_NO_END, 0)),
                         self.pc.eq(0)]
        m.d.comb += self.i.ready.eq(taking & ~seen_end & ~self.done)

        # ---- stage 1: the word
        v1 = Signal()
        word1 = Signal(128)
        pc1 = Signal(32)
        m.d.sync += v1.eq(self.i.valid & self.i.ready)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [word1.eq(self.i.payload.word), pc1.eq(self.i.payload.pc)]
            with m.If(is_end(self.i.payload.word)):
                m.d.sync += seen_end.eq(1)

        # ---- stage 2: decode, register values, products
        w = data.View(Instruction, word1)
        op = w.header.op
        func = w.header.func
        v2 = Signal()
        pc2 = Signal(32)
        legal2 = Signal()
        end2 = Signal()
        op2 = Signal(4)
        func2 = Signal(8)
        m.d.sync += [v2.eq(v1), pc2.eq(pc1), legal2.eq(is_legal(m, word1)), end2.eq(is_end(word1)),
                     op2.eq(op), func2.eq(func)]
        ld = w.ld
        rh = Signal(32)
        hoff = Signal(28)
        len0 = Signal(20)
        buf = Signal(24)
        m.d.sync += [rh.eq(reg_value(regs, ld.hreg)), hoff.eq(ld.hoff), len0.eq(ld.len),
                     buf.eq(ld.buf)]
        p_str = _mul(m, reg_value(regs, ld.ireg), ld.stride, "p_str")
        p_len = _mul(m, reg_value(regs, ld.lreg), ld.lmul, "p_len")
        if self._chains:
            fp = Footprint(m, word1, reg_value(regs, w.misc.reg), self.context,
                           global_base=self._gb, slices=self._slices, stripe=self._stripe,
                           chains=True, rval2=reg_value(regs, w.mv.creg))
        else:
            fp = Footprint(m, word1, reg_value(regs, w.misc.reg), self.context,
                           global_base=self._gb, slices=self._slices, stripe=self._stripe)

        # ---- stage 3: ranges and the fault of this word
        is_ldst = (op2 == Op.LD) | (op2 == Op.ST)
        is_mvmm = (op2 == Op.MV) | (op2 == Op.MM)
        hbm_start = Signal(64)
        hbm_len = Signal(64)
        m.d.comb += [hbm_start.eq(rh + (hoff << 5) + p_str), hbm_len.eq(len0 + p_len)]
        starts, lens = list(fp.starts), list(fp.lens)
        st16 = (op2 == Op.ST) & (func2 == StFunc.F16)
        if self._chains:
            # ST.x: the on-chip source is indexed like the HBM side, buf + R[ireg]*stride
            stx = (op2 == Op.ST) & (func2 == StFunc.X)
            starts[0] = Mux(is_ldst, Mux(stx, buf + p_str, buf), starts[0])
        else:
            starts[0] = Mux(is_ldst, buf, starts[0])
        lens[0] = Mux(is_ldst, Mux(st16, hbm_len << 1, hbm_len), lens[0])
        misc_illegal = fp.misc_illegal | fp.unsupported
        nslots = len(starts)
        wb2 = fp.wb
        P, S = self._slices, self._stripe
        lgp, lgs = exact_log2(P), exact_log2(S)
        # the engines' flat addresses are FLAT_BITS wide (hw/axi.py): nothing ends past 2**40
        hbm_limit = Signal(FLAT_BITS + 1)
        m.d.comb += hbm_limit.eq(Mux(self.hbm_size > (1 << FLAT_BITS), 1 << FLAT_BITS,
                                     self.hbm_size))
        hbm_bad = is_ldst & (hbm_len != 0) & (hbm_start + hbm_len > hbm_limit)
        # MV/MM weights lie in the weight buffer, on a line when there are several slices
        w_bad = wb2 < self._wbase
        if P > 1:
            w_bad = w_bad | (wb2[0:lgs + lgp] != 0)
        chip_bad = Cat(*[((lens[k] != 0) & (starts[k] + lens[k] > self._size))
                         for k in range(nslots)], is_mvmm & w_bad).any()
        v3 = Signal()
        pc3 = Signal(32)
        end3 = Signal()
        fault3 = Signal(3)
        m.d.sync += [v3.eq(v2), pc3.eq(pc2), end3.eq(end2 & legal2)]
        m.d.sync += fault3.eq(Mux(~legal2 | misc_illegal, _isa.STATUS_ILLEGAL,
                                  Mux(hbm_bad, _isa.STATUS_HBM_RANGE,
                                      Mux(chip_bad, _isa.STATUS_BUF_RANGE, 0))))

        # ---- the verdict, in program order
        with m.If(v3 & ~self.done & ~self.start):
            with m.If(fault3 != 0):
                m.d.sync += [self.done.eq(1), self.status.eq(fault3), self.pc.eq(pc3)]
            with m.Elif(end3):
                m.d.sync += [self.done.eq(1), self.status.eq(0), self.pc.eq(pc3)]
            with m.Elif(pc3 == self.nwords - 1):
                m.d.sync += [self.done.eq(1), self.status.eq(_isa.STATUS_NO_END),
                             self.pc.eq(self.nwords)]
        return m
