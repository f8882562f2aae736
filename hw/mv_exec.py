"""The MV/MM execution unit: weight decoder -> DSP chain -> scaler over on-chip operands.

:class:`MvExec` has :func:`~llmfab.hw.execute.exec_signature` and executes MV and
MM words (docs/isa.md) bit-exactly as ``sim.numerics_model.matvec`` (the golden
model). Per token (MV: one; MM: ``ntok``, vector ``t`` at ``qsrc + t*nb*40``,
results at ``dst + t*rows*4``):

1. **Commands.** A :class:`~llmfab.hw.dma.LineReader` on ``rd0`` streams the
   weight lines from ``wb`` through a :class:`~llmfab.hw.dma.Realign` (so
   ``wb`` may have any byte alignment) into the :class:`~llmfab.hw.decoder.Decoder`
   (``data_width = 8 * line_bytes``; one command per token: format, pattern,
   ``rows * nb`` blocks, ``nb`` blocks per row). A second reader on ``rd1``
   streams the quantized vector (``q``, ``d``, ``sumq``: ``40 * nb`` bytes).
2. **Activation load.** The vector's three parts (``q``, ``d``, ``sumq``) are
   read and realigned to offset 0 one after the other, cut into chunks of
   ``CB = min(line_bytes, 32)`` bytes, one chunk per cycle, into three buffers:
   ``q`` (``max_blocks`` x 256 bits, 32-bit write enables), ``d`` and ``sumq``
   (``CB``-byte entries, the read side selects the word): ``40 nb / CB`` cycles.
   Meanwhile the weight stream already fills the decoder (it stalls on the
   chain, which waits for activations).
3. **Compute.** The chain takes one weight beat (one block, ``lanes = 1``) with
   the activation block of the same index (a read port addressed one cycle ahead,
   so it delivers one block per cycle); its results, in order, meet that block's
   ``d_x`` and stored ``sumq`` (a second pair of read ports following the result
   index) in the :class:`~llmfab.hw.scaler.Scaler`. Dense blocks use the stored
   ``sumq`` (as ``matvec`` does for Q4_1), sparse ones the chain's kept-position
   sum. Each row sum is written to ``dst + 4 r`` through ``wr`` (two line writes
   when the word straddles a line).
4. After the token's last row write is accepted: the next token (weights are
   **re-read per token**: an MM costs ``ntok`` MVs), or the ``done`` pulse.

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
        m.submodules.dmem = dmem = memory.Memory(shape=unsigned(CB * 8), depth=-(-NB // cw), init=[])
        m.submodules.smem = smem = memory.Memory(shape=unsigned(CB * 8), depth=-(-NB // cw), init=[])
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
        is_mm = Signal()
        ntok = Signal(8)
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
        tok = Signal(8)
        qaddr = Signal(24)                         # this token's vector
        daddr = Signal(24)                         # this token's results
        abytes = Signal(18)
        m.d.comb += abytes.eq(nb * QBLOCK_BYTES)
        sent = Signal(5)

        # ---- activation load: q, d, sumq each realigned to offset 0 -> CB-byte chunks
        region = Signal(2)                         # 0 q, 1 d, 2 sumq
        cidx = Signal(range(max(NB * qpc, 2)))     # chunk within the region
        k = Signal(range(max(cpb, 2)))             # chunk within the line
        loading = Signal()
        chunk = aal.o.payload.data.word_select(k, CB * 8)
        wvalid = loading & aal.o.valid
        nq = Signal(16)
        nd = Signal(16)
        m.d.comb += [nq.eq(nb * qpc), nd.eq(((nb << 2) + CB - 1) >> lgc)]
        reg_last = Mux(region == 0, cidx == nq - 1, cidx == nd - 1)
        qlane = cidx[0:exact_log2(qpc)] if qpc > 1 else C(0, 1)
        m.d.comb += [
            aal.o.ready.eq(loading & ((k == cpb - 1) | reg_last)),
            qw.addr.eq(cidx >> exact_log2(qpc)), qw.data.eq(Cat(*([chunk] * qpc))),
            qw.en.eq(Mux(wvalid & (region == 0), C((1 << cw) - 1, 8) << (qlane * cw), 0)),
            dw.addr.eq(cidx), dw.data.eq(chunk), dw.en.eq(wvalid & (region == 1)),
            sw.addr.eq(cidx), sw.data.eq(chunk), sw.en.eq(wvalid & (region == 2)),
        ]
        load_done = Signal()
        with m.If(wvalid):
            m.d.sync += [k.eq(Mux((k == cpb - 1) | reg_last, 0, k + 1)),
                         cidx.eq(Mux(reg_last, 0, cidx + 1))]
            with m.If(reg_last):
                m.d.sync += region.eq(region + 1)
                with m.If(region == 2):
                    m.d.comb += load_done.eq(1)
        # the three regions' commands, in order, to the vector's reader and realigner
        ard_i = Signal(2)
        aal_i = Signal(2)
        a_issue = Signal()
        for sel_i, cmd, is_rd in ((ard_i, ard.cmd, True), (aal_i, aal.cmd, False)):
            r_addr = Signal(24, name=f"r_addr_{'rd' if is_rd else 'al'}")
            r_len = Signal(18, name=f"r_len_{'rd' if is_rd else 'al'}")
            with m.Switch(sel_i):
                with m.Case(0):
                    m.d.comb += [r_addr.eq(qaddr), r_len.eq(nb << 5)]
                with m.Case(1):
                    m.d.comb += [r_addr.eq(qaddr + (nb << 5)), r_len.eq(nb << 2)]
                with m.Default():
                    m.d.comb += [r_addr.eq(qaddr + (nb << 5) + (nb << 2)), r_len.eq(nb << 2)]
            r_off = r_addr[0:lgd]
            if is_rd:
                m.d.comb += [cmd.payload.line.eq(r_addr >> lgd),
                             cmd.payload.count.eq((r_off + r_len + D - 1) >> lgd)]
            else:
                m.d.comb += [cmd.payload.s_off.eq(r_off), cmd.payload.d_off.eq(0),
                             cmd.payload.n.eq(r_len)]
            m.d.comb += cmd.valid.eq(a_issue & (sel_i != 3))
            with m.If(cmd.valid & cmd.ready):
                m.d.sync += sel_i.eq(sel_i + 1)

        # ---- compute: activations to the chain, results + (d_x, sumq) to the scaler
        computing = Signal()
        bi = Signal(range(NB))                     # block index of the next activation beat
        rb = Signal(range(NB))                     # block index of the next chain result
        a_take = chain.acts.valid & chain.acts.ready
        bi_next = Mux(bi == nb - 1, 0, bi + 1)
        m.d.comb += [chain.acts.valid.eq(computing), chain.acts.payload.eq(qr.data),
                     qr.addr.eq(Mux(a_take, bi_next, bi))]
        with m.If(a_take):
            m.d.sync += bi.eq(bi_next)
        res = chain.results.payload
        lane = res.lanes[0]
        r_take = chain.results.valid & chain.results.ready
        rb_next = Mux(res.last, 0, rb + 1)
        r_at = Signal.like(rb)
        r_word = Signal(max(lgcw, 1))
        m.d.comb += [r_at.eq(Mux(r_take, rb_next, rb)),
                     dr.addr.eq(r_at >> lgcw), sr.addr.eq(r_at >> lgcw)]
        if lgcw:
            m.d.sync += r_word.eq(r_at[0:lgcw])
        d_x = dr.data.word_select(r_word, 32) if lgcw else dr.data
        s_q = sr.data.word_select(r_word, 32) if lgcw else sr.data
        with m.If(r_take):
            m.d.sync += rb.eq(rb_next)
        si = sc.i.payload
        m.d.comb += [
            sc.i.valid.eq(chain.results.valid), chain.results.ready.eq(sc.i.ready),
            si.isum.eq(lane.isum), si.d_w.eq(lane.d), si.m_w.eq(lane.m),
            si.sumq.eq(Mux(pat == 0, s_q, lane.sumq)), si.d_x.eq(d_x),
            si.fmt.as_value().eq(res.fmt.as_value()), si.last.eq(res.last),
        ]

        # ---- row results -> wr (a word straddling a line takes two writes)
        waddr = Signal(24)
        rows_left = Signal(16)
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
                    m.d.sync += [word.eq(self.instr.payload.word), tok.eq(0),
                                 is_mm.eq(op == Op.MM), ntok.eq(iw.mm.ntok),
                                 qaddr.eq(iw.mv.qsrc), daddr.eq(iw.mv.dst)]
                    with m.If(((op != Op.MV) & (op != Op.MM)) | ((op == Op.MM) & (iw.mm.ntok == 0))):
                        m.next = "DONE"
                    with m.Else():
                        m.next = "SETUP"
            with m.State("SETUP"):
                m.d.sync += nblk.eq(mv.rows * nb)
                m.next = "SETUP2"
            with m.State("SETUP2"):
                m.d.sync += wbytes.eq(nblk * bb)
                m.next = "START"
            with m.State("START"):
                w_off = mv.wb[0:lgd]
                cmds = [
                    (wrd.cmd, [wrd.cmd.payload.line.eq(mv.wb >> lgd),
                               wrd.cmd.payload.count.eq((w_off + wbytes + D - 1) >> lgd)]),
                    (wal.cmd, [wal.cmd.payload.s_off.eq(w_off), wal.cmd.payload.d_off.eq(0),
                               wal.cmd.payload.n.eq(wbytes)]),
                    (dec.cmd, [dec.cmd.payload.fmt.as_value().eq(fmt),
                               dec.cmd.payload.pattern.as_value().eq(pat),
                               dec.cmd.payload.count.eq(nblk), dec.cmd.payload.row_blocks.eq(nb)]),
                ]
                m.d.comb += a_issue.eq(1)
                for i, (s, sets) in enumerate(cmds):
                    m.d.comb += [s.valid.eq(~sent[i])] + sets
                    with m.If(s.valid & s.ready):
                        m.d.sync += sent[i].eq(1)
                m.d.sync += [region.eq(0), cidx.eq(0), k.eq(0), bi.eq(0), rb.eq(0),
                             waddr.eq(daddr), rows_left.eq(mv.rows), second.eq(0)]
                with m.If(Cat(sent[i] | (s.valid & s.ready) for i, (s, _) in enumerate(cmds)).all()):
                    m.d.sync += sent.eq(0)
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [loading.eq(1), a_issue.eq(1)]
                with m.If(load_done):
                    m.next = "SETTLE"
            with m.State("SETTLE"):
                m.next = "COMPUTE"
            with m.State("COMPUTE"):
                m.d.comb += computing.eq(1)
                with m.If(row_done & (rows_left == 1)):
                    m.d.sync += [tok.eq(tok + 1), qaddr.eq(qaddr + abytes),
                                 daddr.eq(daddr + (mv.rows << 2))]
                    m.d.sync += [ard_i.eq(0), aal_i.eq(0)]
                    with m.If(is_mm & (tok + 1 < ntok)):
                        m.next = "START"
                    with m.Else():
                        m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.done.eq(1)
                m.next = "IDLE"
        return m
