"""The MV/MM execution unit: weight decoder -> DSP chain -> scaler over on-chip operands.

:class:`MvExec` has :func:`~llmfab.hw.execute.exec_signature` and executes MV and
MM words (docs/isa.md) bit-exactly as ``sim.numerics_model.matvec`` (the golden
model). An MV is an MM of one token; an MM's ``ntok`` tokens (vector ``t`` at
``qsrc + t*nb*40``, results at ``dst + t*rows*4``) run in **passes** of as many
tokens as the activation buffers hold (``max_blocks // nb``, all of them for
every compiled shape):

1. **Activation load.** For each token of the pass, its vector's three parts
   (``q``, ``d``, ``sumq``) are read through ``rd1`` (a
   :class:`~llmfab.hw.dma.LineReader`) and realigned to offset 0 one after
   the other (:class:`~llmfab.hw.dma.Realign`), cut into chunks of
   ``CB = min(line_bytes, 32)`` bytes, one chunk per cycle, into three buffers:
   ``q`` (``max_blocks`` x 256 bits, 32-bit write enables), ``d`` and ``sumq``
   (``CB``-byte entries, the read side selects the word): ``40 nb / CB`` cycles
   per token. Meanwhile the weight stream already fills the decoder (it stalls
   on the chain, which waits for activations).
2. **Weights.** Per token one command each to a line reader on ``rd0`` (the
   lines from ``wb``), a realigner (so ``wb`` may have any byte alignment) and
   the :class:`~llmfab.hw.decoder.Decoder` (``data_width = 8 * line_bytes``;
   format, pattern, ``rows * nb`` blocks, ``nb`` per row). The weights are
   **re-read from the on-chip buffer for every token** (the decoder and chain
   see ``ntok`` matrices back to back, without a pipeline drain between tokens).
3. **Compute.** The chain takes one weight beat (one block, ``lanes = 1``) with
   the activation block of the same index and token (a read port addressed one
   cycle ahead, so it delivers one block per cycle); its results, in order,
   meet that block's ``d_x`` and stored ``sumq`` (a second pair of read ports
   following the result index) in the :class:`~llmfab.hw.scaler.Scaler`. Dense
   blocks use the stored ``sumq`` (as ``matvec`` does for Q4_1), sparse ones the
   chain's kept-position sum. Row sums are written through ``wr`` to
   consecutive words from ``dst`` (two line writes when a word straddles a line).
4. After the pass's last row write is accepted: the next pass, or ``done``.

One instruction at a time. The unit accepts only MV/MM words (the combined unit in
``hw/exec_unit.py`` routes the others elsewhere; an unexpected word completes
without writing).
"""

from amaranth import C, Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, memory, wiring
from amaranth.utils import ceil_log2, exact_log2

from llmfab.boards.config import SPARSITY_PATTERNS, WEIGHT_FORMATS, block_bytes
from llmfab.hw.chain import FORMAT_CODES, PATTERN_CODES, Chain
from llmfab.hw.decoder import Decoder
from llmfab.hw.dma import LineReader, Realign
from llmfab.hw.execute import exec_signature
from llmfab.hw.isa import Instruction, Op
from llmfab.hw.scaler import Scaler

__all__ = ["MvExec", "QBLOCK_BYTES", "DEFAULT_MAX_BLOCKS"]

#: Bytes per block of a quantized vector: 32 int8, a binary32 scale, an int32 sum.
QBLOCK_BYTES = 40
#: ``cols`` is 16 bits and a multiple of 32: at most 2047 blocks per row.
DEFAULT_MAX_BLOCKS = 2048


class MvExec(wiring.Component):
    """MV/MM execution unit (see the module docstring).

    Parameters
    ----------
    addr_bits, line_bytes : int
        The on-chip geometry (what ``Accelerator``'s ``exec_factory`` passes).
    chain_length : int
        Multiplier slots of the chain; only 32 (one block per beat) is supported.
    pack_int4 : bool
    formats, patterns : iterable of str
        Weight formats / sparsity patterns with hardware behind them.
    max_blocks : int
        Activation buffer depth in blocks (largest ``cols / 32``).
    """

    def __init__(self, *, addr_bits: int, line_bytes: int, chain_length: int = 32,
                 pack_int4: bool = True, formats=tuple(WEIGHT_FORMATS),
                 patterns=tuple(SPARSITY_PATTERNS), max_blocks: int = DEFAULT_MAX_BLOCKS):
        if chain_length != 32:
            raise ValueError(f"MvExec supports one block per chain beat (length 32), "
                             f"not {chain_length}")
        if line_bytes < 8 or line_bytes & (line_bytes - 1):
            raise ValueError(f"line_bytes must be a power of two >= 8, not {line_bytes}")
        self._ab = addr_bits
        self._d = line_bytes
        self._length = chain_length
        self._pack = pack_int4
        self._formats = tuple(formats)
        self._patterns = tuple(patterns)
        self._max_blocks = max_blocks
        super().__init__(exec_signature(addr_bits, line_bytes * 8))

    @classmethod
    def for_config(cls, config, **kw):
        """A factory for ``Accelerator(config, exec_factory=...)``."""
        def factory(*, addr_bits, line_bytes):
            return cls(addr_bits=addr_bits, line_bytes=line_bytes,
                       chain_length=config.chain.length, pack_int4=config.chain.pack_int4,
                       formats=tuple(config.weight_formats), patterns=tuple(config.sparsity),
                       **kw)
        return factory

    def elaborate(self, platform):
        m = Module()
        D = self._d
        lgd = exact_log2(D)
        wpl = D // 4                              # 32-bit words per line
        NB = self._max_blocks
        ab = self._ab

        # ---- units
        m.submodules.wrd = wrd = LineReader(addr_bits=ab, line_bytes=D)
        m.submodules.wal = wal = Realign(D)
        m.submodules.ard = ard = LineReader(addr_bits=ab, line_bytes=D)
        m.submodules.aal = aal = Realign(D)
        m.submodules.dec = dec = Decoder(lanes=1, data_width=D * 8, formats=self._formats,
                                         patterns=self._patterns)
        m.submodules.chain = chain = Chain(length=self._length, pack_int4=self._pack,
                                           formats=self._formats, patterns=self._patterns)
        m.submodules.scaler = sc = Scaler(formats=self._formats)
        wiring.connect(m, wrd.mem, wiring.flipped(self.rd0))
        wiring.connect(m, ard.mem, wiring.flipped(self.rd1))
        wiring.connect(m, wrd.o, wal.i)
        wiring.connect(m, ard.o, aal.i)
        m.d.comb += [dec.data.valid.eq(wal.o.valid), dec.data.payload.eq(wal.o.payload.data),
                     wal.o.ready.eq(dec.data.ready)]
        wiring.connect(m, dec.weights, chain.weights)

        # ---- activation buffers
        CB = min(D, 32)                           # bytes per load chunk (one chunk per cycle)
        cw = CB // 4                              # words per chunk
        lgc = exact_log2(CB)
        lgcw = exact_log2(cw)
        cpb = D // CB                             # chunks per line
        qpc = 32 // CB                            # chunks per q block
        m.submodules.qmem = qmem = memory.Memory(shape=unsigned(256), depth=NB, init=[])
        # d / sumq entries: each token's start on an entry, so up to one more per token
        DEPTH_D = -(-NB // cw) + 256
        m.submodules.dmem = dmem = memory.Memory(shape=unsigned(CB * 8), depth=DEPTH_D, init=[])
        m.submodules.smem = smem = memory.Memory(shape=unsigned(CB * 8), depth=DEPTH_D, init=[])
        qw = qmem.write_port(granularity=32)
        dw = dmem.write_port()
        sw = smem.write_port()
        qr = qmem.read_port()
        dr = dmem.read_port()
        sr = smem.read_port()

        # ---- the instruction
        word = Signal(128)
        w = data.View(Instruction, word)
        mv = w.mv
        fmt = Signal(2)
        pat = Signal(3)
        m.d.comb += [fmt.eq(mv.func[0:2]), pat.eq(mv.func[2:5])]
        nb = Signal(11)
        m.d.comb += nb.eq(mv.cols[5:16])
        nblk = Signal(32)                          # rows * nb
        wbytes = Signal(32)                        # weight bytes of the matrix
        bb = Signal(6)                             # bytes per block of the mode
        with m.Switch(Cat(fmt, pat)):
            for f in WEIGHT_FORMATS:
                for p in SPARSITY_PATTERNS:
                    with m.Case(FORMAT_CODES[f].value | (PATTERN_CODES[p].value << 2)):
                        m.d.comb += bb.eq(block_bytes(f, p))
            with m.Default():
                m.d.comb += bb.eq(block_bytes("q4_0", "dense"))
        qaddr = Signal(24)                         # the next pass's first vector
        sent = Signal(5)
        ntok_eff = Signal(8)                       # tokens of the instruction (MV: 1)
        t0 = Signal(9)                             # tokens done by earlier passes
        gmax = Signal(12)                          # tokens whose vectors fit the buffers
        g = Signal(9)                              # tokens of this pass
        pass_active = Signal()
        rows = mv.rows

        # ---- activation load: per token q, d, sumq, each realigned to offset 0 -> CB-byte chunks
        region = Signal(2)                         # 0 q, 1 d, 2 sumq
        cidx = Signal(range(max(NB * qpc, 2)))     # chunk within the region
        k = Signal(range(max(cpb, 2)))             # chunk within the line
        ltok = Signal(9)                           # token of the pass being loaded
        qbase_w = Signal(range(NB + 1))            # its first q entry
        dbase_w = Signal(range(DEPTH_D + 1))       # its first d / sumq entry
        loading = Signal()
        chunk = aal.o.payload.data.word_select(k, CB * 8)
        wvalid = loading & aal.o.valid
        nq = Signal(16)
        nd = Signal(16)                            # d (sumq) entries per token
        m.d.comb += [nq.eq(nb * qpc), nd.eq(((nb << 2) + CB - 1) >> lgc)]
        reg_last = Mux(region == 0, cidx == nq - 1, cidx == nd - 1)
        qlane = cidx[0:exact_log2(qpc)] if qpc > 1 else C(0, 1)
        m.d.comb += [
            aal.o.ready.eq(loading & ((k == cpb - 1) | reg_last)),
            qw.addr.eq(qbase_w + (cidx >> exact_log2(qpc))), qw.data.eq(Cat(*([chunk] * qpc))),
            qw.en.eq(Mux(wvalid & (region == 0), C((1 << cw) - 1, 8) << (qlane * cw), 0)),
            dw.addr.eq(dbase_w + cidx), dw.data.eq(chunk), dw.en.eq(wvalid & (region == 1)),
            sw.addr.eq(dbase_w + cidx), sw.data.eq(chunk), sw.en.eq(wvalid & (region == 2)),
        ]
        load_done = Signal()
        with m.If(wvalid):
            m.d.sync += [k.eq(Mux((k == cpb - 1) | reg_last, 0, k + 1)),
                         cidx.eq(Mux(reg_last, 0, cidx + 1))]
            with m.If(reg_last):
                m.d.sync += region.eq(Mux(region == 2, 0, region + 1))
                with m.If(region == 2):
                    m.d.sync += [ltok.eq(ltok + 1), qbase_w.eq(qbase_w + nb),
                                 dbase_w.eq(dbase_w + nd)]
                    with m.If(ltok == g - 1):
                        m.d.comb += load_done.eq(1)
        # per token the three regions' commands, in order, to the vector's reader and realigner
        abytes = Signal(18)
        m.d.comb += abytes.eq(nb * QBLOCK_BYTES)
        a_issue = Signal()
        issuers = []
        for name, cmd, is_rd in (("rd", ard.cmd, True), ("al", aal.cmd, False)):
            c_reg = Signal(2, name=f"c_reg_{name}")
            c_tok = Signal(9, name=f"c_tok_{name}")
            c_base = Signal(24, name=f"c_base_{name}")
            issuers.append((c_reg, c_tok, c_base))
            r_addr = Signal(24, name=f"r_addr_{name}")
            r_len = Signal(18, name=f"r_len_{name}")
            with m.Switch(c_reg):
                with m.Case(0):
                    m.d.comb += [r_addr.eq(c_base), r_len.eq(nb << 5)]
                with m.Case(1):
                    m.d.comb += [r_addr.eq(c_base + (nb << 5)), r_len.eq(nb << 2)]
                with m.Default():
                    m.d.comb += [r_addr.eq(c_base + (nb << 5) + (nb << 2)), r_len.eq(nb << 2)]
            r_off = r_addr[0:lgd]
            if is_rd:
                m.d.comb += [cmd.payload.line.eq(r_addr >> lgd),
                             cmd.payload.count.eq((r_off + r_len + D - 1) >> lgd)]
            else:
                m.d.comb += [cmd.payload.s_off.eq(r_off), cmd.payload.d_off.eq(0),
                             cmd.payload.n.eq(r_len)]
            m.d.comb += cmd.valid.eq(a_issue & (c_tok < g))
            with m.If(cmd.valid & cmd.ready):
                m.d.sync += c_reg.eq(Mux(c_reg == 2, 0, c_reg + 1))
                with m.If(c_reg == 2):
                    m.d.sync += [c_tok.eq(c_tok + 1), c_base.eq(c_base + abytes)]

        # ---- per token, one weight command to the reader, the realigner and the decoder
        w_off = mv.wb[0:lgd]
        wcmds = [
            (wrd.cmd, [wrd.cmd.payload.line.eq(mv.wb >> lgd),
                       wrd.cmd.payload.count.eq((w_off + wbytes + D - 1) >> lgd)]),
            (wal.cmd, [wal.cmd.payload.s_off.eq(w_off), wal.cmd.payload.d_off.eq(0),
                       wal.cmd.payload.n.eq(wbytes)]),
            (dec.cmd, [dec.cmd.payload.fmt.as_value().eq(fmt),
                       dec.cmd.payload.pattern.as_value().eq(pat),
                       dec.cmd.payload.count.eq(nblk), dec.cmd.payload.row_blocks.eq(nb)]),
        ]
        wcount = []
        for i, (s_, sets) in enumerate(wcmds):
            c = Signal(9, name=f"wcmd{i}")
            wcount.append(c)
            m.d.comb += [s_.valid.eq(pass_active & (c < g))] + sets
            with m.If(s_.valid & s_.ready):
                m.d.sync += c.eq(c + 1)

        # ---- compute: activations to the chain, results + (d_x, sumq) to the scaler
        computing = Signal()
        bi = Signal(range(NB))                     # block of the next activation beat
        arow = Signal(16)                          # its row
        qbase = Signal(range(NB + 1))              # its token's first q entry
        a_take = chain.acts.valid & chain.acts.ready
        a_row_end = bi == nb - 1
        a_tok_end = a_row_end & (arow == rows - 1)
        bi_n = Mux(a_row_end, 0, bi + 1)
        qbase_n = Mux(a_tok_end, qbase + nb, qbase)
        m.d.comb += [chain.acts.valid.eq(computing), chain.acts.payload.eq(qr.data),
                     qr.addr.eq(Mux(a_take, qbase_n + bi_n, qbase + bi))]
        with m.If(a_take):
            m.d.sync += [bi.eq(bi_n), qbase.eq(qbase_n),
                         arow.eq(Mux(a_tok_end, 0, Mux(a_row_end, arow + 1, arow)))]
        res = chain.results.payload
        lane = res.lanes[0]
        r_take = chain.results.valid & chain.results.ready
        rb = Signal(range(NB))                     # block of the next chain result
        rrow = Signal(16)
        dbase = Signal(range(DEPTH_D + 1))
        r_tok_end = res.last & (rrow == rows - 1)
        rb_n = Mux(res.last, 0, rb + 1)
        dbase_n = Mux(r_tok_end, dbase + nd, dbase)
        r_blk = Signal.like(rb)
        r_ent = Signal(range(DEPTH_D + 1))
        r_word = Signal(max(lgcw, 1))
        m.d.comb += [r_blk.eq(Mux(r_take, rb_n, rb)),
                     r_ent.eq(Mux(r_take, dbase_n, dbase) + (r_blk >> lgcw)),
                     dr.addr.eq(r_ent), sr.addr.eq(r_ent)]
        if lgcw:
            m.d.sync += r_word.eq(r_blk[0:lgcw])
        d_x = dr.data.word_select(r_word, 32) if lgcw else dr.data
        s_q = sr.data.word_select(r_word, 32) if lgcw else sr.data
        with m.If(r_take):
            m.d.sync += [rb.eq(rb_n), dbase.eq(dbase_n),
                         rrow.eq(Mux(r_tok_end, 0, Mux(res.last, rrow + 1, rrow)))]
        si = sc.i.payload
        m.d.comb += [
            sc.i.valid.eq(chain.results.valid), chain.results.ready.eq(sc.i.ready),
            si.isum.eq(lane.isum), si.d_w.eq(lane.d), si.m_w.eq(lane.m),
            si.sumq.eq(Mux(pat == 0, s_q, lane.sumq)), si.d_x.eq(d_x),
            si.fmt.as_value().eq(res.fmt.as_value()), si.last.eq(res.last),
        ]

        # ---- row results -> wr (a word straddling a line takes two writes); MM token t's
        # rows follow token t-1's (dst + t*rows*4), so the address just counts on
        waddr = Signal(24)
        rows_left = Signal(25)
        second = Signal()
        off = waddr[0:lgd]
        wide = Signal(D * 8 + 32)
        wbe = Signal(D + 4)
        m.d.comb += [wide.eq(sc.o.payload << (off * 8)), wbe.eq(C(0xF, 4) << off)]
        straddle = off > D - 4
        wr = self.wr.req
        m.d.comb += [
            wr.valid.eq(computing & sc.o.valid),
            wr.payload.addr.eq((waddr >> lgd) + second),
            wr.payload.data.eq(Mux(second, wide[D * 8:] , wide[0:D * 8])),
            wr.payload.be.eq(Mux(second, wbe[D:], wbe[0:D])),
            sc.o.ready.eq(computing & wr.ready & (~straddle | second)),
        ]
        with m.If(wr.valid & wr.ready):
            m.d.sync += second.eq(straddle & ~second)
        row_done = sc.o.valid & sc.o.ready
        with m.If(row_done):
            m.d.sync += [waddr.eq(waddr + 4), rows_left.eq(rows_left - 1)]

        # ---- control
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.instr.ready.eq(1)
                with m.If(self.instr.valid):
                    iw = data.View(Instruction, self.instr.payload.word)
                    op = iw.header.op
                    m.d.sync += [word.eq(self.instr.payload.word), t0.eq(0),
                                 ntok_eff.eq(Mux(op == Op.MM, iw.mm.ntok, 1)),
                                 qaddr.eq(iw.mv.qsrc), waddr.eq(iw.mv.dst)]
                    with m.If(((op != Op.MV) & (op != Op.MM)) | ((op == Op.MM) & (iw.mm.ntok == 0))):
                        m.next = "DONE"
                    with m.Else():
                        m.next = "SETUP"
            with m.State("SETUP"):
                m.d.sync += [nblk.eq(rows * nb), gmax.eq(C(NB, 12) // nb)]
                m.next = "SETUP2"
            with m.State("SETUP2"):
                m.d.sync += wbytes.eq(nblk * bb)
                m.next = "PLAN"
            with m.State("PLAN"):
                left = ntok_eff - t0
                m.d.sync += [g.eq(Mux(gmax < left, gmax, left)),
                             region.eq(0), cidx.eq(0), k.eq(0), ltok.eq(0), qbase_w.eq(0),
                             dbase_w.eq(0), bi.eq(0), arow.eq(0), qbase.eq(0), rb.eq(0),
                             rrow.eq(0), dbase.eq(0), second.eq(0)]
                m.d.sync += [c.eq(0) for c in wcount]
                for c_reg, c_tok, c_base in issuers:
                    m.d.sync += [c_reg.eq(0), c_tok.eq(0), c_base.eq(qaddr)]
                m.next = "PLAN2"
            with m.State("PLAN2"):
                m.d.sync += rows_left.eq(rows * g)
                m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [loading.eq(1), a_issue.eq(1), pass_active.eq(1)]
                with m.If(load_done):
                    m.next = "SETTLE"
            with m.State("SETTLE"):
                m.d.comb += [a_issue.eq(1), pass_active.eq(1)]
                m.next = "COMPUTE"
            with m.State("COMPUTE"):
                m.d.comb += [computing.eq(1), a_issue.eq(1), pass_active.eq(1)]
                with m.If(row_done & (rows_left == 1)):
                    m.d.sync += [t0.eq(t0 + g), qaddr.eq(issuers[0][2])]
                    with m.If(t0 + g < ntok_eff):
                        m.next = "PLAN"
                    with m.Else():
                        m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.done.eq(1)
                m.next = "IDLE"
        return m
