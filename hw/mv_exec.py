"""The MV/MM execution unit: row pipelines (weight decoder -> DSP chain lane -> scaler).

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
   (``CB``-byte entries): ``40 nb / CB`` cycles per token. **Activation
   cache:** an MV or MM whose vectors (``qsrc``, ``nb``, ``ntok``) are the ones
   the buffers already hold skips the load. The copy is valid from a load that
   took every vector of its instruction in one pass until any on-chip write
   (the ``snoop`` input: the load engine's line writes and the execution unit's own)
   touches one of its lines, or a load of one pass of several replaces it (vectors in
   the banked region, where the load engine's per-port writes do not show on ``snoop``,
   are not kept) -- so
   consecutive weight tiles of one matrix (the compiler splits matrices into
   tiles of whole rows) load the vector, or a prefill MM's tokens, once. With
   ``chains`` the cache has two entries, each half the buffers (vectors that fit half;
   the least recently used entry is replaced, larger vectors take the whole buffers and
   both entries), so an attention MV between two weight tiles does not evict them.
2. **Row pipelines.** ``count * chain_length / 32`` (the configuration's ``chain.count``
   chains, each cut by its break points into ``chain_length / 32`` block lanes) copies of
   line reader -> :class:`~llmfab.hw.decoder.Decoder` (one block
   per beat, starting at the row's byte offset in its first line) -> :class:`~llmfab.hw.chain.Chain` -> :class:`~llmfab.hw.scaler.Scaler`.
   Pipeline ``l`` of ``L`` computes rows ``l, l + L, ...`` of every token of the
   pass. **Slices** (``slices`` = P, one per HBM port): pipeline ``l`` belongs to
   slice ``p = l % P``, whose weight bank (``bank[p]``: stripe ``p`` of every line
   of the weight buffer, ``S`` = one port's beat) holds the tile's rows
   ``p, p + P, ...`` back to back from ``b0`` (docs/isa.md's slice-major tile;
   ``b0`` is ``wb``'s place in every bank), so row ``l + i L`` is that slice's
   local row ``l // P + i L / P``. Per row one command to its reader (the row's
   ``S``-byte bank lines from ``b0 + j * rb``, any byte alignment on one slice;
   from 64-byte stripes on its ``S / 2``-byte half-lines: ``decoder_beat_bytes``)
   and decoder (``nb`` blocks, one row, from the row's offset in that first beat: no
   realigner in the weight path; with ``decoder_lookahead`` the decoder holds a third beat, so
   the next row's first beat waits there while a row's last block leaves: docs/hw-units.md,
   "Lookahead"): nothing in a pipeline is wider than one port's
   beat, from 64-byte stripes on half of it (a row needs at most 34 bytes a cycle).
   A slice's pipelines share its bank's read ports (``l // P`` even on port 0, odd on
   1, fixed priority), which they take when the line view (store engine,
   ``rd0``/``rd1``) leaves them free; from 64-byte stripes on the bank is two half
   memories (hw/onchip.py) and a pair of pipelines shares port ``k`` of both, a
   half-line request going to the half that holds it (``_arbitrate_halves``), so
   the pair gets two half-lines a cycle while its rows read different halves.
   **One module per slice:** a slice's pipelines, their command counters, its bank
   arbitration and its copy of the activation buffers are :class:`MvSlice`, written once
   (:class:`~llmfab.hw.blackbox.Shared`, the slice number an input) and instantiated ``P``
   times; MvExec keeps the activation loader, the instruction's control and the result
   writer, and broadcasts the loader's buffer writes to every slice's copy.
   **Token lanes:** each pipeline's
   decoder feeds ``tokens`` chains (and scalers) in lock step, lane ``k`` taking tokens
   ``k, k + tokens, ...`` of the pass, so an MM reads and decodes a row once per
   ``tokens`` tokens (lanes past the pass's last token run on whatever activations they
   address and their results are dropped). Each chain takes one weight block per cycle
   with the activation block of the same index and token (its own read port on ``q``);
   its results meet that block's ``d_x`` and stored ``sumq`` (its own read
   ports) in its scaler (a row's four accum4 partials, as ``matvec``). Dense blocks
   use the stored ``sumq`` (as ``matvec`` does for Q4_1), sparse ones the
   chain's kept-position sum.
3. **Results.** Rows leave each pipeline in its row order as their four accum4
   partials; one at a time (lowest pipeline first) they go through the unit's one
   :class:`~llmfab.hw.scaler.RowCombine` (the row sum ``fadd(fadd(p0, p1), fadd(p2,
   p3))``, one row per cycle, 6 cycles: the rate rows are written at, so one combine
   serves every lane) and are written through ``wr`` to ``dst + (t*rows + row)*4`` (two line writes when a
   word straddles a line). With ``combines`` C > 1 (``chain.combines``), lane ``i`` goes to
   combine ``i % C`` and a line write a cycle takes every combine's word that shares the
   lowest busy combine's line (``_combine_many``; docs/hw-units.md, "row combines").
4. Once every lane's outputs have left (into the combine, or dropped past the pass's
   last token) and the combine has written them all: the next pass, or ``done`` -- and in
   that same cycle the unit takes the next word if the execution unit offers one
   (``ExecUnit`` lets the MV class issue in the cycle of its done). The word's set-up (row
   bytes, passes ``max_blocks // nb``, the bank start, the row step, the vectors' bytes) is
   computed in two register stages from the offered word (``instr.payload``) while the
   unit is still busy, so a taken word goes straight to its PLAN cycle: ``instr.ready``
   waits until the offered word's fields have been the same for two cycles (two cycles
   after a new word appears in the execution unit's issue stage; a word waiting behind a
   running MV is long settled).

**Attention on the chains** (``chains``, set by :meth:`MvExec.for_config` for ``attention:
chains``; without it the unit is built exactly as before): an MV's shape is ``rows + rval``
by ``cols + rval2`` (the execution unit's ``R[rreg]`` and ``R[creg]``, registered with the
word; an MM ignores them), and its weights may be in **row tiles** (``MV_RT``, the K cache:
tiles of 32 slice-major rows, each tile's streams padded to whole bank lines, so a
pipeline's row step adds the pad when it crosses a tile) or **block tiles** (``MV_BT``, the
transposed V cache: tile ``j`` holds block ``j`` of every row, so a row is ``nb`` one-block
commands to its reader and decoder, a tile's bank span apart; the decoder marks each block
``last`` and the pipeline passes ``last`` to its chains on the row's final block only, and
every block's ``d`` is binary16 1.0 whatever its bytes hold). The arithmetic is untouched. A chains build's readers take their next command in the cycle their
last request leaves (:class:`_EagerReader`). docs/hw-units.md has the details and cycles.

Throughput (``tests/rtl/cocotb_mv_exec.py``, ci geometry, memory never stalling):
one block per pipeline per cycle (0.250 cycles/block measured with 4 pipelines; dense
Q8_0 half that: the packed chain takes two cycles per 8-bit block), as long as
each slice's bank ports deliver its rows' beats (per row at most ``rb/W + 1`` beats of
``W = decoder_beat_bytes(S)`` bytes and a command cycle per reader). One instruction
at a time. The unit accepts only MV/MM words (the combined unit in
``hw/exec_unit.py`` routes the others elsewhere; an unexpected word completes
without writing).
"""

from amaranth import C, Cat, Const, Module, Mux, Signal, Value, unsigned
from amaranth.lib import data, fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from llmfab.core.formats import QBLOCK_BYTES, SPARSITY_PATTERNS, WEIGHT_FORMATS, block_bytes
from llmfab.hw.blackbox import Shared
from llmfab.hw.chain import FORMAT_CODES, PATTERN_CODES, Chain
from llmfab.hw.decoder import Decoder
from llmfab.hw.dma import LineReader, Realign
from llmfab.hw.execute import exec_signature
from llmfab.hw.isa import Instruction, Op
from llmfab.hw.onchip import bank_halves, mem_read_signature, slice_geometry
from llmfab.hw.scaler import Partials, RowCombine, Scaler

__all__ = ["MvExec", "MvSlice", "DEFAULT_MAX_BLOCKS", "CHAIN_LENGTHS", "decoder_beat_bytes"]

#: Chain lengths the unit builds: 1, 2, 4 or 8 GGUF blocks between break points.
CHAIN_LENGTHS = (32, 64, 128, 256)

#: ``cols`` is 16 bits and a multiple of 32: at most 2047 blocks per row.
DEFAULT_MAX_BLOCKS = 2048


def decoder_beat_bytes(stripe: int) -> int:
    """Bytes per beat a row pipeline's reader and decoder take from a slice's ``stripe``-byte
    bank: half-lines from 64-byte lines on (the bank's half memories, :func:`~llmfab.hw.onchip.
    bank_halves`; a row needs at most 34 bytes a cycle), else whole lines. ``sim/perf.py``
    costs a row's beats with it."""
    return stripe // bank_halves(stripe)


class _EagerReader(LineReader):
    """A :class:`~llmfab.hw.dma.LineReader` that takes its next command in the cycle its last
    request leaves (LineReader: the cycle after), so commands of a line or two (the block
    tiles' one block per command) follow each other without a lost cycle. MvExec's row
    pipelines use it with ``chains``."""

    def elaborate(self, platform):
        m = Module()
        m.submodules.buf = buf = fifo.SyncFIFO(width=self._lb, depth=self.DEPTH)
        line = Signal(self._ab)
        left = Signal(32)
        room = buf.level + self.mem.rsp.valid < self.DEPTH
        fire = self.mem.req.valid & self.mem.req.ready
        m.d.comb += [self.mem.req.valid.eq((left != 0) & room), self.mem.req.payload.eq(line),
                     self.cmd.ready.eq((left == 0) | ((left == 1) & fire))]
        with m.If(fire):
            m.d.sync += [line.eq(line + 1), left.eq(left - 1)]
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [line.eq(self.cmd.payload.line), left.eq(self.cmd.payload.count)]
        m.d.comb += [buf.w_en.eq(self.mem.rsp.valid), buf.w_data.eq(self.mem.rsp.payload),
                     self.o.valid.eq(buf.r_rdy), self.o.payload.eq(buf.r_data),
                     buf.r_en.eq(self.o.ready),
                     self.busy.eq((left != 0) | buf.r_rdy | self.mem.rsp.valid)]
        return m


def _arbitrate(m, port, clients, name):
    """Fixed-priority sharing of one on-chip read port (responses one cycle after the grant)."""
    n = len(clients)
    last = Signal(range(max(n, 2)), name=f"{name}_last")
    taken = C(0, 1)
    for i, c in enumerate(clients):
        grant = Signal(name=f"{name}_grant{i}")
        m.d.comb += grant.eq(c.req.valid & ~taken)
        with m.If(grant):
            m.d.comb += [port.req.valid.eq(1), port.req.payload.eq(c.req.payload)]
        m.d.comb += [c.req.ready.eq(grant & port.req.ready),
                     c.rsp.valid.eq(port.rsp.valid & (last == i)),
                     c.rsp.payload.eq(port.rsp.payload)]
        with m.If(grant & port.req.ready):
            m.d.sync += last.eq(i)
        t2 = Signal(name=f"{name}_taken{i}")
        m.d.comb += t2.eq(taken | c.req.valid)
        taken = t2


def _arbitrate_halves(m, ports, clients, name):
    """Fixed-priority sharing of one read port of each of a bank's two half memories.

    A client's request for half-line ``a`` goes to ``ports[a % 2]`` (the half holding it) at
    bank line ``a // 2``; each port grants the first client that wants it, so two clients
    asking for different halves are both served in a cycle (rows read their half-lines
    alternately from the two halves, so clients held back by a conflict fall out of step).
    A response comes one cycle after its grant from the port that granted it.
    """
    taken = [C(0, 1), C(0, 1)]
    for i, c in enumerate(clients):
        half = c.req.payload[0]
        grants = []
        for h, port in enumerate(ports):
            want = Signal(name=f"{name}_want{i}_{h}")
            grant = Signal(name=f"{name}_grant{i}_{h}")
            m.d.comb += [want.eq(c.req.valid & (half == h)), grant.eq(want & ~taken[h])]
            with m.If(grant):
                m.d.comb += [port.req.valid.eq(1), port.req.payload.eq(c.req.payload[1:])]
            grants.append(grant & port.req.ready)
            t2 = Signal(name=f"{name}_taken{i}_{h}")
            m.d.comb += t2.eq(taken[h] | want)
            taken[h] = t2
        got = Signal(name=f"{name}_got{i}")          # a response next cycle, from port rsp_h
        rsp_h = Signal(name=f"{name}_rsph{i}")
        m.d.comb += c.req.ready.eq(Cat(*grants).any())
        m.d.sync += [got.eq(c.req.valid & c.req.ready), rsp_h.eq(half)]
        m.d.comb += [c.rsp.valid.eq(got),
                     c.rsp.payload.eq(Mux(rsp_h, ports[1].rsp.payload, ports[0].rsp.payload))]


def _first(valids):
    """The lowest set bit of ``valids`` as a tree: ``(any, index)`` (index 0 when none)."""
    if len(valids) == 1:
        return valids[0], C(0, 0)
    half = 1 << (ceil_log2(len(valids)) - 1)
    a_lo, i_lo = _first(valids[:half])
    a_hi, i_hi = _first(valids[half:])
    if not len(i_lo):                        # two lanes (no zero-width nets: Verilog lint)
        return a_lo | a_hi, ~a_lo
    i_hi = Cat(i_hi, C(0, len(i_lo) - len(i_hi))) if len(i_hi) < len(i_lo) else i_hi
    return a_lo | a_hi, Cat(Mux(a_lo, i_lo, i_hi), ~a_lo)


def _mux_tree(values, index):
    """``values[index]`` as a tree of 2:1 muxes on ``index``'s bits, lowest bit first."""
    level, k = list(values), 0
    while len(level) > 1:
        level = [Mux(index[k], level[i + 1], level[i]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
        k += 1
    return level[0]


class _Buffer:
    """One of a slice's activation buffers as copies of two read ports each.

    A block RAM has two ports. Each copy's first read port shares its address with the copy's
    write port (the buffer is written only while MvExec loads activations, ``writing``, and
    read only while it computes, so one port of the RAM does both), the second read port is
    the RAM's other port: ``n`` read ports cost ``n / 2`` copies, not ``n`` (Yosys and Vivado
    give every read port beyond a RAM's two a copy of its own). A first port read while the
    buffer is written returns the written address's old contents, which nothing takes: the
    chains take activations, the scalers d and sumq, only while MvExec computes.
    """

    class _Read:
        def __init__(self, addr, data):
            self.addr, self.data = addr, data

    def __init__(self, m, name, width, depth, w_addr, w_data, w_en, writing, granularity=None,
                 attrs=None):
        self._m, self._name, self._attrs = m, name, attrs
        self._width, self._depth, self._gran = width, depth, granularity
        self._w = (w_addr, w_data, w_en, writing)
        self._copies = []                         # (memory, whether its second port is used)

    def read_port(self):
        m = self._m
        if self._copies and not self._copies[-1][1]:
            mem = self._copies[-1][0]
            self._copies[-1] = (mem, True)
            return mem.read_port()
        w_addr, w_data, w_en, writing = self._w
        c = len(self._copies)
        mem = memory.Memory(shape=unsigned(self._width), depth=self._depth, init=[],
                            attrs=self._attrs)
        m.submodules[f"{self._name}{c}"] = mem
        self._copies.append((mem, False))
        wp = mem.write_port(granularity=self._gran) if self._gran else mem.write_port()
        rp = mem.read_port()
        addr = Signal.like(wp.addr, name=f"{self._name}{c}_raddr")    # the reader's address
        port = Signal.like(wp.addr, name=f"{self._name}{c}_addr")     # the RAM port's
        m.d.comb += [port.eq(Mux(writing, w_addr, addr)), wp.addr.eq(port), rp.addr.eq(port),
                     wp.data.eq(w_data), wp.en.eq(w_en)]
        return self._Read(addr, rp.data)


class MvSlice(wiring.Component):
    """One slice's row pipelines and its copy of the activation buffers (see MvExec).

    Slice ``p`` (the ``index`` input, so every slice is the same module) has the
    ``pipelines / slices`` row pipelines ``l = p + i * slices``; pipeline ``l`` does rows
    ``l, l + pipelines, ...`` of every token of the pass. MvExec broadcasts the instruction's
    fields, the pass's state and the activation load's writes to every slice; a slice
    returns each lane's rows as their four accum4 partials (the scaler's :data:`Partials`,
    which MvExec's one :class:`~llmfab.hw.scaler.RowCombine` sums), with their byte address
    and whether they are dropped (a lane past the pass's last token), and ``done`` (every
    lane's outputs have left). ``plan``
    is MvExec's PLAN cycle: every counter takes its start of the pass.

    A slice is generated once and instantiated per slice (:class:`~llmfab.hw.blackbox.Shared`),
    so the accelerator's Verilog and its resource estimate (``llmfab hw estimate``) hold it once
    with its count.
    """

    def __init__(self, *, pipelines: int, slices: int, stripe: int, bank_addr_bits: int,
                 tokens: int, max_blocks: int, chunk_bytes: int, pack_int4: bool,
                 formats, patterns, q_uram: bool = False, chains: bool = False,
                 decoder_lookahead: int = 0):
        self._q_uram = q_uram
        self._chains = chains
        self._lookahead = decoder_lookahead
        self._L = pipelines
        self._P = slices
        self._S = stripe
        self._bab = bank_addr_bits
        self._K = tokens
        self._NB = max_blocks
        self._CB = chunk_bytes
        self._pack = pack_int4
        self._formats = tuple(formats)
        self._patterns = tuple(patterns)
        self._DD = -(-max_blocks // (chunk_bytes // 4)) + 256   # d / sumq entries (MvExec)
        n = (pipelines // slices) * tokens
        CB = chunk_bytes
        super().__init__({
            "index": In(max(1, ceil_log2(slices))),
            "fmt": In(2), "pat": In(3), "nb": In(11), "rows": In(16), "rbytes": In(18),
            "rstep": In(24), "b0": In(24), "g": In(9), "g_round": In(10), "t0": In(9),
            "dst": In(24), "pass_active": In(1), "computing": In(1), "plan": In(1),
            "qw_addr": In(range(max_blocks)), "qw_data": In(256), "qw_en": In(8),
            "dw_addr": In(range(self._DD)), "dw_data": In(CB * 8), "dw_en": In(1),
            "sw_en": In(1),
            "bank": Out(mem_read_signature(bank_addr_bits, stripe * 8 // bank_halves(stripe)))
            .array(2 * bank_halves(stripe)),
            # the partials as one plain vector (``Partials`` bits): a port with the layout's
            # per-element nets (``o__0__payload[0]`` beside the vector ``o__0__payload``) trips
            # an assertion in Yosys's ABC reintegration when the slice is synthesized
            "o": Out(stream.Signature(Partials.size)).array(n),
            "o_addr": Out(24).array(n),
            "o_drop": Out(1).array(n),
            "done": Out(1),
            # attention on the chains (MvExec's ``chains``): the tiled layouts
            **({"rt": In(1), "bt": In(1), "tstep": In(24),
                # the activation cache's entry the pass reads (MvExec: two entries with chains)
                "qoff": In(range(max_blocks)), "doff": In(range(self._DD))} if chains else {}),
        })

    def _chains_commands(self, m, ls, l, cmds, resets):
        """Pipeline ``ls``'s reader and decoder commands with the tiled layouts (MvExec's
        ``chains``; docs/isa.md, "Attention on the chains").

        Plain and row-tile rows: one command per row of ``rbytes`` bytes (``nb * bb``), the
        pipeline's rows ``rstep`` (``Ls * rbytes``) apart in the bank; row tiles (``rt``) put
        the slice's ``T = 32 / P`` local rows of a tile back to back and pad the tile's stream
        to whole bank lines, so a step that crosses a tile boundary adds the pad (``tstep``,
        0 on one slice, where row tiles are the plain layout). Block tiles (``bt``): one
        command per block of ``rbytes`` (``bb``) bytes, block ``j`` of a row ``tstep`` (one
        tile's bank span) after block ``j - 1``; rows ``rstep`` (``Ls * bb``) apart in a tile.
        """
        L, P, K, Ls = self._L, self._P, self._K, self._L // self._P
        H = bank_halves(self._S)
        DW = self._S // H
        lgdw = exact_log2(DW)
        nb, rows, rbytes, rstep, b0 = self.nb, self.rows, self.rbytes, self.rstep, self.b0
        g, tstep, rt, bt = self.g, self.tstep, self.rt, self.bt
        T = 32 // P                               # a row tile's rows in one slice's stream
        ta, tb = Ls // T, Ls % T                  # a step of Ls local rows: ta tiles and tb rows
        # the pipeline's first row: local row ls, in tile ls // T
        start = Signal(24, name=f"p{ls}_start")
        pad0 = (ls // T) * tstep if (P > 1 and ls >= T) else 0
        m.d.comb += start.eq(b0 + ls * rbytes + Mux(rt, pad0, 0))
        for i, cmd in enumerate(cmds):
            j_tok = Signal(9, name=f"p{ls}_c{i}_tok")
            j_row = Signal(16, name=f"p{ls}_c{i}_row")
            j_addr = Signal(24, name=f"p{ls}_c{i}_addr")   # byte address of the command
            j_radr = Signal(24, name=f"p{ls}_c{i}_radr")   # of the row (its first block)
            j_blk = Signal(11, name=f"p{ls}_c{i}_blk")     # block tiles: the row's block
            resets += [(j_tok, 0), (j_row, l), (j_addr, start), (j_radr, start), (j_blk, 0)]
            # the next row's address: rstep on, plus the tile pads crossed (row tiles)
            nxt = Signal(24, name=f"p{ls}_c{i}_next")
            if P > 1:
                pad = tstep * ta if ta else C(0, 1)
                if tb:
                    j_kt = Signal(range(T), name=f"p{ls}_c{i}_kt")  # local row in its tile
                    resets.append((j_kt, ls % T))
                    pad = Mux(j_kt + tb >= T, tstep * (ta + 1), pad)
                m.d.comb += nxt.eq(j_radr + rstep + Mux(rt, pad, 0))
            else:
                m.d.comb += nxt.eq(j_radr + rstep)
            off = j_addr[0:lgdw]
            if i == 0:
                m.d.comb += [cmd.payload.line.eq(j_addr >> lgdw),
                             cmd.payload.count.eq((off + rbytes + DW - 1) >> lgdw)]
            else:
                cnt = Mux(bt, 1, nb)
                m.d.comb += [cmd.payload.fmt.as_value().eq(self.fmt),
                             cmd.payload.pattern.as_value().eq(self.pat),
                             cmd.payload.count.eq(cnt), cmd.payload.row_blocks.eq(cnt),
                             cmd.payload.offset.eq(off)]
            m.d.comb += cmd.valid.eq(self.pass_active & (j_tok < g) & (j_row < rows))
            row_done = ~bt | (j_blk == nb - 1)
            with m.If(cmd.valid & cmd.ready):
                with m.If(~row_done):
                    m.d.sync += [j_blk.eq(j_blk + 1), j_addr.eq(j_addr + tstep)]
                with m.Elif(j_row + L >= rows):
                    m.d.sync += [j_tok.eq(j_tok + K), j_row.eq(l), j_blk.eq(0),
                                 j_addr.eq(start), j_radr.eq(start)]
                    if P > 1 and tb:
                        m.d.sync += j_kt.eq(ls % T)
                with m.Else():
                    m.d.sync += [j_row.eq(j_row + L), j_blk.eq(0), j_addr.eq(nxt),
                                 j_radr.eq(nxt)]
                    if P > 1 and tb:
                        m.d.sync += j_kt.eq((j_kt + tb)[0:exact_log2(T)] if T > 1 else 0)

    def elaborate(self, platform):
        m = Module()
        L, P, S, K, NB, CB = self._L, self._P, self._S, self._K, self._NB, self._CB
        DEPTH_D = self._DD
        Ls = L // P
        lgk = exact_log2(K)
        lgc = exact_log2(CB)
        cw = CB // 4
        lgcw = exact_log2(cw)
        fmt, pat, nb, rows = self.fmt, self.pat, self.nb, self.rows
        rbytes, rstep, b0, g, g_round = self.rbytes, self.rstep, self.b0, self.g, self.g_round
        t0, dst = self.t0, self.dst
        pass_active, computing = self.pass_active, self.computing
        nd = Signal(16)                            # d (sumq) entries per token
        m.d.comb += nd.eq(((nb << 2) + CB - 1) >> lgc)

        # ---- this slice's copy of the activation buffers: every slice takes the same writes;
        # a read port per chain, two per block RAM (_Buffer). With q_uram the q copies are
        # UltraRAM: a 256-bit block RAM port with both ports used is 8 BRAM36 wide whatever
        # the depth, so q's 2,048 blocks take 16 BRAM36 per copy; Yosys maps the copy to 8
        # URAM288 (llmfab hw estimate; not the 4 its width suggests, not checked in Vivado)
        qmem = _Buffer(m, "qmem", 256, NB, self.qw_addr, self.qw_data, self.qw_en,
                       self.qw_en.any(), granularity=32,
                       attrs={"ram_style": "ultra"} if self._q_uram else None)
        dmem = _Buffer(m, "dmem", CB * 8, DEPTH_D, self.dw_addr, self.dw_data, self.dw_en,
                       self.dw_en)
        smem = _Buffer(m, "smem", CB * 8, DEPTH_D, self.dw_addr, self.dw_data, self.sw_en,
                       self.sw_en)

        resets = []                                # (signal, value at PLAN)
        lanes_done = []
        H = bank_halves(S)                         # the bank's half memories (hw/onchip.py)
        DW = S // H                                # bytes per read: a bank line or a half-line
        lgdw = exact_log2(DW)
        bank_clients = ([], [])
        n_out = 0
        for ls in range(Ls):
            # pipeline l = p + ls * P of the unit: its rows l, l + L, ... are this slice's local
            # rows ls, ls + L / P, ... (docs/isa.md's slice-major tile), read from the bank at
            # b0 + ls * rbytes through bank port ls % 2 (of each half memory from 64-byte
            # lines on)
            l = Signal(16, name=f"l{ls}")
            m.d.comb += l.eq(self.index + ls * P)
            bab, fm, pt, pk = self._bab, self._formats, self._patterns, self._pack
            # from 64-byte lines on the reader asks for half-lines (a row needs at most 34 bytes
            # a cycle: 20 for Q4_1, 26 for sparse Q8_0, dense Q8_0 34 every two cycles), its
            # FIFO and the decoder's shifter and window are half as wide
            wrd = (_EagerReader if self._chains else LineReader)(addr_bits=bab + exact_log2(H),
                                                                  line_bytes=DW)
            # one slice: tiles start on any byte (docs/isa.md), so rows do; several: on a line,
            # and rows on an even byte (every block size is even)
            ao = P == 1
            la = self._lookahead
            dec = Shared(("decoder", DW, fm, pt, ao, la),
                         lambda: Decoder(lanes=1, data_width=DW * 8, formats=fm, patterns=pt,
                                         any_offset=ao, lookahead=la))
            for nm, u in (("wrd", wrd), ("dec", dec)):
                m.submodules[f"{nm}{ls}"] = u
            bank_clients[ls % 2].append(wrd.mem)
            # the row's lines (half-lines from 64 bytes on) straight into the decoder, which
            # starts at the row's byte offset in its first beat (no realigner: rows start
            # anywhere on a slice)
            wiring.connect(m, wrd.o, dec.data)
            cmds = (wrd.cmd, dec.cmd)
            chains = []
            for tk in range(K):
                chain = Shared(("chain", pk, fm, pt),
                               lambda: Chain(length=32, pack_int4=pk, formats=fm, patterns=pt))
                sc = Shared(("scaler", fm), lambda: Scaler(formats=fm))
                sfx = f"{ls}" if K == 1 else f"{ls}_{tk}"
                m.submodules[f"chain{sfx}"] = chain
                m.submodules[f"scaler{sfx}"] = sc
                chains.append((chain, sc))
            # the decoder's blocks to every lane at once (each lane's valid waits for the others)
            for tk, (chain, _) in enumerate(chains):
                others = [c.weights.ready for j, (c, _) in enumerate(chains) if j != tk]
                m.d.comb += [chain.weights.valid.eq(dec.weights.valid & Cat(*others).all()
                                                    if others else dec.weights.valid),
                             chain.weights.payload.eq(dec.weights.payload)]
            m.d.comb += dec.weights.ready.eq(Cat(*(c.weights.ready for c, _ in chains)).all())

            # one command per row (and group of K tokens) to the reader (the row's beats: bank
            # lines or half-lines, from the one holding its first byte) and the decoder
            if self._chains:
                self._chains_commands(m, ls, l, cmds, resets)
            for i, cmd in enumerate(cmds if not self._chains else ()):
                j_tok = Signal(9, name=f"p{ls}_c{i}_tok")
                j_row = Signal(16, name=f"p{ls}_c{i}_row")
                j_addr = Signal(24, name=f"p{ls}_c{i}_addr")  # byte address of the row
                resets += [(j_tok, 0), (j_row, l), (j_addr, b0 + ls * rbytes)]
                off = j_addr[0:lgdw]
                if i == 0:
                    m.d.comb += [cmd.payload.line.eq(j_addr >> lgdw),
                                 cmd.payload.count.eq((off + rbytes + DW - 1) >> lgdw)]
                else:
                    m.d.comb += [cmd.payload.fmt.as_value().eq(fmt),
                                 cmd.payload.pattern.as_value().eq(pat),
                                 cmd.payload.count.eq(nb), cmd.payload.row_blocks.eq(nb),
                                 cmd.payload.offset.eq(off)]
                m.d.comb += cmd.valid.eq(pass_active & (j_tok < g) & (j_row < rows))
                with m.If(cmd.valid & cmd.ready):
                    with m.If(j_row + L >= rows):
                        m.d.sync += [j_tok.eq(j_tok + K), j_row.eq(l),
                                     j_addr.eq(b0 + ls * rbytes)]
                    with m.Else():
                        m.d.sync += [j_row.eq(j_row + L), j_addr.eq(j_addr + rstep)]
            if self._chains:
                # block tiles: the decoder's commands are single blocks, each its own "row"
                # to the decoder (last on every block); the chains' row ends are every nb-th
                w_blk = Signal(11, name=f"p{ls}_wblk")
                resets.append((w_blk, 0))
                w_last = dec.weights.payload.last & (~self.bt | (w_blk == nb - 1))
                for chain, _ in chains:
                    m.d.comb += chain.weights.payload.last.eq(w_last)
                    # block tiles hold the V cache's q bytes with a unit scale: every block's
                    # d is binary16 1.0, whatever its bytes (KVROW writes only the q bytes)
                    with m.If(self.bt):
                        m.d.comb += chain.weights.payload.lanes[0].d.eq(0x3C00)
                with m.If(dec.weights.valid & dec.weights.ready):
                    m.d.sync += w_blk.eq(Mux(w_last, 0, w_blk + 1))

            for tk, (chain, sc) in enumerate(chains):
                p = f"p{ls}" if K == 1 else f"p{ls}_{tk}"
                # activations to the chain (a read port addressed one cycle ahead)
                qr = qmem.read_port()
                bi = Signal(range(NB), name=f"{p}_bi")
                arow = Signal(16, name=f"{p}_arow")
                atok = Signal(9, name=f"{p}_atok")
                qbase = Signal(range(NB * K + 1), name=f"{p}_qbase")
                resets += [(bi, 0), (arow, l), (atok, tk), (qbase, nb * tk)]
                a_take = chain.acts.valid & chain.acts.ready
                a_row_end = bi == nb - 1
                a_tok_end = a_row_end & (arow + L >= rows)
                bi_n = Mux(a_row_end, 0, bi + 1)
                qbase_n = Mux(a_tok_end, qbase + (nb << lgk), qbase)
                m.d.comb += [chain.acts.valid.eq(computing & (atok < g_round) & (arow < rows)),
                             chain.acts.payload.eq(qr.data),
                             qr.addr.eq(Mux(a_take, qbase_n + bi_n, qbase + bi)
                                        + (self.qoff if self._chains else 0))]
                with m.If(a_take):
                    m.d.sync += [bi.eq(bi_n), qbase.eq(qbase_n),
                                 arow.eq(Mux(a_tok_end, l, Mux(a_row_end, arow + L, arow))),
                                 atok.eq(Mux(a_tok_end, atok + K, atok))]

                # chain results + (d_x, sumq) of the same block to the scaler
                dr = dmem.read_port()
                sr = smem.read_port()
                res = chain.results.payload
                lane = res.lanes[0]
                r_take = chain.results.valid & chain.results.ready
                rb = Signal(range(NB), name=f"{p}_rb")
                rrow = Signal(16, name=f"{p}_rrow")
                dbase = Signal(range(DEPTH_D * K + 1), name=f"{p}_dbase")
                resets += [(rb, 0), (rrow, l), (dbase, nd * tk)]
                r_tok_end = res.last & (rrow + L >= rows)
                rb_n = Mux(res.last, 0, rb + 1)
                dbase_n = Mux(r_tok_end, dbase + (nd << lgk), dbase)
                r_blk = Signal.like(rb, name=f"{p}_rblk")
                r_ent = Signal(range(DEPTH_D * K + 1), name=f"{p}_rent")
                r_word = Signal(max(lgcw, 1), name=f"{p}_rword")
                m.d.comb += [r_blk.eq(Mux(r_take, rb_n, rb)),
                             r_ent.eq(Mux(r_take, dbase_n, dbase) + (r_blk >> lgcw)),
                             dr.addr.eq(r_ent + (self.doff if self._chains else 0)),
                             sr.addr.eq(r_ent + (self.doff if self._chains else 0))]
                if lgcw:
                    m.d.sync += r_word.eq(r_blk[0:lgcw])
                d_x = dr.data.word_select(r_word, 32) if lgcw else dr.data
                s_q = sr.data.word_select(r_word, 32) if lgcw else sr.data
                with m.If(r_take):
                    m.d.sync += [rb.eq(rb_n), dbase.eq(dbase_n),
                                 rrow.eq(Mux(r_tok_end, l, Mux(res.last, rrow + L, rrow)))]
                si = sc.i.payload
                m.d.comb += [
                    sc.i.valid.eq(chain.results.valid), chain.results.ready.eq(sc.i.ready),
                    si.isum.eq(lane.isum), si.d_w.eq(lane.d), si.m_w.eq(lane.m),
                    si.sumq.eq(Mux(pat == 0, s_q, lane.sumq)), si.d_x.eq(d_x),
                    si.fmt.as_value().eq(res.fmt.as_value()), si.last.eq(res.last),
                ]

                # rows (their partials) leave in order: row l + j*L of token t goes to
                # dst + (t*rows + row)*4
                o_row = Signal(16, name=f"{p}_orow")
                o_tok = Signal(9, name=f"{p}_otok")         # token of the pass
                o_addr = Signal(24, name=f"{p}_oaddr")
                o_tbase = Signal(24, name=f"{p}_otbase")   # dst + t*rows*4
                resets += [(o_row, l), (o_tok, tk),
                           (o_addr, dst + ((t0 + tk) * rows << 2) + 4 * l),
                           (o_tbase, dst + ((t0 + tk) * rows << 2))]
                o = self.o[n_out]
                m.d.comb += [o.valid.eq(sc.o.valid), o.payload.eq(sc.o.payload),
                             sc.o.ready.eq(o.ready), self.o_addr[n_out].eq(o_addr),
                             self.o_drop[n_out].eq(o_tok >= g)]
                n_out += 1
                lanes_done.append((o_tok >= g_round) | (rows <= l))
                o_take = sc.o.valid & sc.o.ready
                with m.If(o_take):
                    with m.If(o_row + L >= rows):
                        m.d.sync += [o_row.eq(l), o_tok.eq(o_tok + K),
                                     o_tbase.eq(o_tbase + (rows << (2 + lgk))),
                                     o_addr.eq(o_tbase + (rows << (2 + lgk)) + 4 * l)]
                    with m.Else():
                        m.d.sync += [o_row.eq(o_row + L), o_addr.eq(o_addr + 4 * L)]

        for port in range(2):
            if not bank_clients[port]:
                continue
            if H == 1:
                _arbitrate(m, self.bank[port], bank_clients[port], f"bank{port}")
            else:
                _arbitrate_halves(m, self.bank[2 * port:2 * port + 2], bank_clients[port],
                                  f"bank{port}")
        m.d.comb += self.done.eq(Cat(*lanes_done).all())
        # MvExec's PLAN: every counter to its start of the pass (last: it wins over the above)
        with m.If(self.plan):
            m.d.sync += [sig.eq(v) for sig, v in resets]
        return m


class MvExec(wiring.Component):
    """MV/MM execution unit (see the module docstring).

    Parameters
    ----------
    addr_bits, line_bytes : int
        The on-chip geometry (what ``Accelerator``'s ``exec_factory`` passes).
    chain_length : int
        Multiplier slots of a chain: 32, 64, 128 or 256. With break points every 32
        slots, a chain of length ``32 k`` is ``k`` block lanes; each lane is its own row
        pipeline (activations broadcast), so the unit has ``count * k`` pipelines and
        ``count * k * 32`` multipliers, the configuration's ``macs_per_cycle``.
    count : int
        Chains (the configuration's ``chain.count``).
    pack_int4 : bool
    formats, patterns : iterable of str
        Weight formats / sparsity patterns with hardware behind them.
    max_blocks : int
        Activation buffer depth in blocks (largest ``cols / 32``).
    tokens : int
        Token lanes per row pipeline (1, 2, 4 or 8; the configuration's ``chain.tokens``):
        the pipeline's decoded blocks feed this many chains (and scalers), one token each.
    q_uram : bool
        Each slice's copies of the activation buffer ``q`` as UltraRAM (``ram_style =
        "ultra"``; :meth:`for_config` sets it on boards with URAM): 8 URAM288 per copy by
        Yosys instead of 16 BRAM36, which the slices' block RAM cannot spare on the U280.
    chains : bool
        Attention on the chains (module docstring; :meth:`for_config` sets it for
        ``attention: chains``): register-extended MV shapes and the row/block-tile layouts.
        Off, the unit's Verilog is what it was without the option.
    """

    def __init__(self, *, addr_bits: int, line_bytes: int, chain_length: int = 32,
                 count: int = 1, pack_int4: bool = True, formats=tuple(WEIGHT_FORMATS),
                 patterns=tuple(SPARSITY_PATTERNS), max_blocks: int = DEFAULT_MAX_BLOCKS,
                 tokens: int = 1, slices: int = 1, stripe: int | None = None,
                 weight_base: int = 0, bank_addr_bits=None, q_uram: bool = False,
                 chains: bool = False, decoder_lookahead: int = 0, combines: int = 1):
        if chain_length not in CHAIN_LENGTHS:
            raise ValueError(f"MvExec chain length must be 32, 64, 128 or 256 (whole blocks "
                             f"between break points), not {chain_length}")
        if line_bytes < 8 or line_bytes & (line_bytes - 1):
            raise ValueError(f"line_bytes must be a power of two >= 8, not {line_bytes}")
        if not 1 <= count * (chain_length // 32) <= 256:
            raise ValueError(f"MvExec needs 1..256 row pipelines (chain count x length / 32), "
                             f"not {count} x {chain_length // 32}")
        if tokens not in (1, 2, 4, 8):
            raise ValueError(f"MvExec token lanes must be 1, 2, 4 or 8, not {tokens}")
        stripe = stripe or line_bytes // slices
        if slices < 1 or slices & (slices - 1) or stripe & (stripe - 1):
            raise ValueError(f"MvExec slices and stripe must be powers of two, not {slices} x "
                             f"{stripe}")
        if (count * (chain_length // 32)) % slices:
            raise ValueError(f"MvExec needs whole row pipelines per slice: {count} chains of "
                             f"{chain_length} over {slices} slices")
        if chains and slices > 32:
            raise ValueError(f"MvExec chains needs at most 32 slices (a row tile's 32 rows), "
                             f"not {slices}")
        if decoder_lookahead not in (0, 1):
            raise ValueError(f"MvExec decoder lookahead must be 0 or 1 beats, not "
                             f"{decoder_lookahead!r}")
        lanes = count * (chain_length // 32) * tokens
        if combines < 1 or combines & (combines - 1) or combines > lanes or 4 * combines > line_bytes:
            raise ValueError(f"MvExec row combines must be a power of two, at most the {lanes} "
                             f"output lanes and {line_bytes // 4} words of a line, not {combines}")
        if weight_base % (slices * stripe):
            raise ValueError(f"the weight buffer must start on an HBM line, not at {weight_base}")
        self._slices = slices
        self._combines = combines
        self._chains = chains
        self._lookahead = decoder_lookahead
        self._q_uram = q_uram
        self._stripe = stripe
        self._wbase = weight_base
        self._bab = bank_addr_bits if bank_addr_bits is not None else addr_bits
        self._tokens = tokens
        self._ab = addr_bits
        self._d = line_bytes
        self._length = chain_length
        self._count = count
        self._pack = pack_int4
        self._formats = tuple(formats)
        self._patterns = tuple(patterns)
        self._max_blocks = max_blocks
        sig = exec_signature(addr_bits, line_bytes * 8)
        H = bank_halves(stripe)
        super().__init__(dict(sig.members) | {
            "bank": Out(mem_read_signature(self._bab, stripe * 8 // H)).array(slices, 2 * H)})

    @property
    def slices(self) -> int:
        return self._slices

    @property
    def count(self) -> int:
        return self._count

    @property
    def tokens(self) -> int:
        """Token lanes per row pipeline (chains per pipeline)."""
        return self._tokens

    @property
    def pipelines(self) -> int:
        """Row pipelines: ``count * chain_length / 32`` (one per block lane)."""
        return self._count * (self._length // 32)

    @property
    def combines(self) -> int:
        """RowCombines: rows summed and written per cycle (up to ``combines`` a line)."""
        return self._combines

    def _combine_many(self, m, outs, computing, second):
        """``combines`` RowCombines, output lane ``i`` (lane ``k`` of pipeline ``l`` is ``l * K
        + k``) into combine ``i % combines``, each taking its lowest waiting lane's row a cycle;
        their sums go out in one line write a cycle: the lowest busy combine's (the leader) and
        every other one whose word falls in the same line (a pass's rows are consecutive words,
        so ``combines`` of them share a line when aligned). A leader whose word straddles two
        lines writes alone, twice, and stays the leader between. Returns "every combine idle"."""
        D = self._d
        lgd = exact_log2(D)
        NC = self._combines
        rcs = []
        for c in range(NC):
            grp = [o for i, o in enumerate(outs) if i % NC == c]
            rc = RowCombine(24)
            m.submodules[f"combine{c}"] = rc
            a, idx = _first([o.valid & ~drop for o, _, drop in grp])
            pick = Signal(range(max(len(grp), 2)), name=f"pick{c}")
            m.d.comb += [pick.eq(idx),
                         rc.i.payload.p.eq(_mux_tree([Value.cast(o.payload) for o, _, _ in grp], pick)),
                         rc.i.payload.side.eq(_mux_tree([addr for _, addr, _ in grp], pick)),
                         rc.i.valid.eq(computing & a)]
            for j, (o, _, dropped) in enumerate(grp):
                m.d.comb += o.ready.eq((rc.i.ready & computing & (pick == j) & ~dropped)
                                       | (computing & dropped))
            rcs.append(rc)
        any_o, first = _first([rc.o.valid for rc in rcs])
        held = Signal(range(NC), name="lead_held")    # the straddling leader, between its writes
        lead = Signal(range(NC), name="lead")
        m.d.comb += lead.eq(Mux(second, held, first))
        laddr = Signal(24, name="lead_addr")
        lsum = Signal(32, name="lead_sum")
        m.d.comb += [laddr.eq(_mux_tree([rc.o.payload.side for rc in rcs], lead)),
                     lsum.eq(_mux_tree([rc.o.payload.sum for rc in rcs], lead))]
        loff = laddr[0:lgd]
        lstr = Signal(name="lead_straddles")
        m.d.comb += lstr.eq(loff > D - 4)
        line = laddr >> lgd
        data_or, be_or, joins = C(0, D * 8), C(0, D), []
        for c, rc in enumerate(rcs):
            a = rc.o.payload.side
            off = a[0:lgd]
            j = Signal(name=f"join{c}")
            m.d.comb += j.eq(rc.o.valid & ((a >> lgd) == line) & (off <= D - 4) & ~lstr)
            joins.append(j)
            w = Signal(D * 8, name=f"join{c}_data")
            b = Signal(D, name=f"join{c}_be")
            m.d.comb += [w.eq(Mux(j, (rc.o.payload.sum << (off * 8))[0:D * 8], 0)),
                         b.eq(Mux(j, (C(0xF, 4) << off)[0:D], 0))]
            data_or, be_or = data_or | w, be_or | b
        wide = Signal(D * 8 + 32, name="lead_wide")
        wbe = Signal(D + 4, name="lead_wbe")
        m.d.comb += [wide.eq(lsum << (loff * 8)), wbe.eq(C(0xF, 4) << loff)]
        wr = self.wr.req
        m.d.comb += [
            wr.valid.eq(computing & (any_o | second)),
            wr.payload.addr.eq(Mux(lstr, line + second, line)),
            wr.payload.data.eq(Mux(lstr, Mux(second, wide[D * 8:], wide[0:D * 8]), data_or)),
            wr.payload.be.eq(Mux(lstr, Mux(second, wbe[D:], wbe[0:D]), be_or)),
        ]
        for c, rc in enumerate(rcs):
            m.d.comb += rc.o.ready.eq(computing & wr.ready
                                      & Mux(lstr, (lead == c) & second, joins[c]))
        with m.If(wr.valid & wr.ready):
            m.d.sync += second.eq(lstr & ~second)
            with m.If(lstr & ~second):
                m.d.sync += held.eq(lead)
        idle = Signal(name="combines_idle")
        m.d.comb += idle.eq(Cat(*(rc.idle for rc in rcs)).all())
        return idle

    @classmethod
    def for_config(cls, config, **kw):
        """A factory for ``Accelerator(config, exec_factory=...)``."""
        def factory(*, addr_bits, line_bytes):
            return cls(addr_bits=addr_bits, line_bytes=line_bytes,
                       chain_length=config.chain.length, count=config.chain.count,
                       pack_int4=config.chain.pack_int4, formats=tuple(config.weight_formats),
                       patterns=tuple(config.sparsity), tokens=config.chain.tokens,
                       q_uram=config.board_spec.resources.uram > 0,
                       chains=getattr(config, "attention", "sfu") == "chains",
                       decoder_lookahead=config.chain.decoder_lookahead,
                       combines=config.chain.combines, **slice_geometry(config), **kw)
        return factory

    def elaborate(self, platform):
        m = Module()
        D = self._d
        L = self.pipelines                         # one row pipeline per 32-weight block lane
        lgd = exact_log2(D)
        NB = self._max_blocks
        ab = self._ab

        # ---- the activation loader
        m.submodules.ard = ard = LineReader(addr_bits=ab, line_bytes=D)
        m.submodules.aal = aal = Realign(D)
        wiring.connect(m, ard.o, aal.i)

        # ---- activation buffers: one write port here, broadcast to every slice's copy (MvSlice),
        # which has a read port per chain
        CB = min(D, 32)                           # bytes per load chunk (one chunk per cycle)
        cw = CB // 4                              # words per chunk
        lgc = exact_log2(CB)
        cpb = D // CB                             # chunks per line
        qpc = 32 // CB                            # chunks per q block
        # d / sumq entries: each token's start on an entry, so up to one more per token
        DEPTH_D = -(-NB // cw) + 256
        DD_HALF = DEPTH_D // 2                     # d / sumq entries of a cache entry's half
        qw_addr = Signal(range(NB))
        qw_data = Signal(256)
        qw_en = Signal(8)
        dw_addr = Signal(range(DEPTH_D))
        dw_data = Signal(CB * 8)
        dw_en = Signal()
        sw_en = Signal()

        # ---- the instruction
        word = Signal(128)
        w = data.View(Instruction, word)
        mv = w.mv
        fmt = Signal(2)
        pat = Signal(3)
        m.d.comb += [fmt.eq(mv.func[0:2]), pat.eq(mv.func[2:5])]
        nb = Signal(11)
        chains = self._chains
        if chains:
            # attention on the chains: an MV's rows + R[rreg] and cols + R[creg] (rval, rval2),
            # taken with the word; its tiled layouts (func bits 5 and 6)
            rows = Signal(16)
            rt, bt = Signal(), Signal()
            is_mv = w.header.op == Op.MV
            m.d.comb += [rt.eq(is_mv & mv.func[5]), bt.eq(is_mv & mv.func[6])]
            tstep = Signal(24)                     # block tiles: a tile's bank span; row tiles: its pad
        else:
            m.d.comb += nb.eq(mv.cols[5:16])
            rows = mv.rows
        rbytes = Signal(18)                        # weight bytes of one row
        rstep = Signal(24)                         # L / P rows of one slice's weights
        P = self._slices
        S = self._stripe
        lgs = exact_log2(S)
        lghd = exact_log2(P * S)                   # the HBM line: one beat of every slice
        Ls = L // P                                # row pipelines per slice
        b0 = Signal(24)                            # the tile's first byte in every bank
        qaddr = Signal(24)                         # the next pass's first vector
        ntok_eff = Signal(8)                       # tokens of the instruction (MV: 1)
        t0 = Signal(9)                             # tokens done by earlier passes
        gmax = Signal(12)                          # tokens whose vectors fit the buffers
        g = Signal(9)                              # tokens of this pass
        pass_active = Signal()
        computing = Signal()
        nd = Signal(16)                            # d (sumq) entries per token
        m.d.comb += nd.eq(((nb << 2) + CB - 1) >> lgc)

        # ---- activation cache: the last vectors loaded in one pass (an MV's vector, or all of
        # an MM's tokens) stay valid until a line of them is written. With ``chains`` two
        # entries, each half of the buffers (vectors that fit half: an attention MV between two
        # weight tiles then does not evict the tiles' vector), replaced least recently used;
        # vectors larger than half take entry 0 from offset 0 and evict both
        W = 2 if chains else 1
        c_valid = [Signal(name=f"c_valid{e}") for e in range(W)]
        c_qsrc = [Signal(24, name=f"c_qsrc{e}") for e in range(W)]
        c_nb = [Signal(11, name=f"c_nb{e}") for e in range(W)]
        c_ntok = [Signal(8, name=f"c_ntok{e}") for e in range(W)]
        c_lo = [Signal(ab, name=f"c_lo{e}") for e in range(W)]
        c_hi = [Signal(ab, name=f"c_hi{e}") for e in range(W)]
        c_big = Signal()                           # entry 0 holds vectors larger than half
        c_lru = Signal()                           # the entry to replace next
        use_e = Signal()                           # the entry this instruction's pass uses
        half_ok = Signal()                         # the instruction's vectors fit half
        c_set = Signal()                           # (comb) a whole-instruction load starts now
        c_clear = Signal()                         # (comb) a load of one pass of several starts now
        vbytes = Signal(26)                        # the instruction's vectors: ntok * nb * 40
        q_end = Signal(24)
        m.d.comb += q_end.eq(mv.qsrc + vbytes - 1)
        hits, matches = [], []
        for e in range(W):
            hit_e = Cat(s.valid & (s.addr >= c_lo[e]) & (s.addr <= c_hi[e]) for s in self.snoop).any()
            match_e = Signal(name=f"c_match{e}")
            m.d.comb += match_e.eq(c_valid[e] & (c_qsrc[e] == mv.qsrc) & (c_nb[e] == nb)
                                   & (c_ntok[e] == ntok_eff))
            hits.append(hit_e)
            matches.append(match_e)
        cached = Signal()
        m.d.comb += cached.eq(Cat(*matches).any())
        # the entry a whole-instruction load goes to: the least recently used one if the vectors
        # fit half, else entry 0 (the whole buffers)
        victim = Signal()
        m.d.comb += victim.eq(half_ok & c_lru if W > 1 else 0)
        with m.If(c_set):
            for e in range(W):
                with m.If(victim == e):
                    m.d.sync += [c_valid[e].eq(1), c_qsrc[e].eq(mv.qsrc), c_nb[e].eq(nb),
                                 c_ntok[e].eq(ntok_eff), c_lo[e].eq(mv.qsrc >> lgd),
                                 c_hi[e].eq(q_end >> lgd)]
            if W > 1:
                m.d.sync += [c_big.eq(~half_ok), c_lru.eq(~victim)]
                with m.If(~half_ok):                # the whole buffers: entry 1 is overwritten
                    m.d.sync += c_valid[1].eq(0)
                with m.If(victim & c_big):          # half 1 over a larger entry 0
                    m.d.sync += c_valid[0].eq(0)
        for e in range(W):
            with m.If(c_clear | hits[e]):
                m.d.sync += c_valid[e].eq(0)

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
        m.d.comb += nq.eq(nb * qpc)
        reg_last = Mux(region == 0, cidx == nq - 1, cidx == nd - 1)
        qlane = cidx[0:exact_log2(qpc)] if qpc > 1 else C(0, 1)
        m.d.comb += [
            aal.o.ready.eq(loading & ((k == cpb - 1) | reg_last)),
            qw_addr.eq(qbase_w + (cidx >> exact_log2(qpc))), qw_data.eq(Cat(*([chunk] * qpc))),
            qw_en.eq(Mux(wvalid & (region == 0), C((1 << cw) - 1, 8) << (qlane * cw), 0)),
            dw_addr.eq(dbase_w + cidx), dw_data.eq(chunk), dw_en.eq(wvalid & (region == 1)),
            sw_en.eq(wvalid & (region == 2)),
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

        # ---- row pipelines, one MvSlice per slice: pipeline l does rows l, l + L, ... of every
        # token of the pass; its decoded weight blocks feed K chains (token lanes), lane k taking
        # tokens k, k + K, ... of the pass. Lanes past the pass's last token (its last group of
        # K) still take the blocks (they run in lock step) and their results are dropped, not
        # written. Pipeline l belongs to slice p = l % P and reads its rows from bank p.
        K = self._tokens
        lgk = exact_log2(K)
        g_round = Signal(10)                       # g rounded up to whole groups of K
        m.d.comb += g_round.eq(((g + K - 1) >> lgk) << lgk)
        plan = Signal()                            # (comb) the PLAN cycle
        # the slices are instances of one module, outside the core's per-run ResetInserter: they
        # are reset one cycle after it (and with the domain), when this unit is still idle
        fresh = Signal(init=1)
        m.d.sync += fresh.eq(0)
        fm, pt, pk, bab, SB, qu = (self._formats, self._patterns, self._pack, self._bab, S,
                                   self._q_uram)
        slices = []
        for sp in range(P):
            la = self._lookahead
            key = (("mvslice", L, P, S, bab, K, NB, CB, pk, fm, pt, qu)
                   + (("chains",) if chains else ()) + ((("lookahead", la),) if la else ()))
            sl = Shared(key,
                        lambda: MvSlice(pipelines=L, slices=P, stripe=SB, bank_addr_bits=bab,
                                        tokens=K, max_blocks=NB, chunk_bytes=CB, pack_int4=pk,
                                        formats=fm, patterns=pt, q_uram=qu, chains=chains,
                                        decoder_lookahead=la),
                        reset=fresh)
            m.submodules[f"slice{sp}"] = sl
            slices.append(sl)
            m.d.comb += [sl.index.eq(sp), sl.fmt.eq(fmt), sl.pat.eq(pat), sl.nb.eq(nb),
                         sl.rows.eq(rows), sl.rbytes.eq(rbytes), sl.rstep.eq(rstep),
                         sl.b0.eq(b0), sl.g.eq(g), sl.g_round.eq(g_round), sl.t0.eq(t0),
                         sl.dst.eq(mv.dst), sl.pass_active.eq(pass_active),
                         sl.computing.eq(computing), sl.plan.eq(plan),
                         sl.qw_addr.eq(qw_addr), sl.qw_data.eq(qw_data), sl.qw_en.eq(qw_en),
                         sl.dw_addr.eq(dw_addr), sl.dw_data.eq(dw_data), sl.dw_en.eq(dw_en),
                         sl.sw_en.eq(sw_en)]
            if chains:
                m.d.comb += [sl.rt.eq(rt), sl.bt.eq(bt), sl.tstep.eq(tstep),
                             sl.qoff.eq(Mux(use_e, NB // 2, 0)), sl.doff.eq(Mux(use_e, DD_HALF, 0))]
            for port in range(2 * bank_halves(S)):
                wiring.connect(m, wiring.flipped(self.bank[sp][port]), sl.bank[port])
        # the lanes' rows in pipeline order (lane k of pipeline l is output l * K + k)
        outs = []                                  # (partials stream, its address, dropped)
        for l in range(L):
            sl, ls = slices[l % P], l // P
            for tk in range(K):
                j = ls * K + tk
                outs.append((sl.o[j], sl.o_addr[j], sl.o_drop[j]))
        lanes_done = [sl.done for sl in slices]
        _arbitrate(m, self.rd1, [ard.mem], "rd1")

        # ---- row results -> wr, one row at a time: the lowest pipeline's partials (and
        # address) into the one row combine (fadd(fadd(p0, p1), fadd(p2, p3)), 1 row per
        # cycle), its sums to wr (a word straddling a line takes two writes, the combine's
        # output is held for both). Dropped lanes' rows are taken without a write.
        NO = len(outs)                             # L pipelines x K lanes
        second = Signal()
        if self._combines == 1:
            m.submodules.combine = rc = RowCombine(24)
            pick = Signal(range(max(NO, 2)))
            any_row = Signal()
            a, idx = _first([o.valid & ~drop for o, _, drop in outs])
            m.d.comb += [any_row.eq(a), pick.eq(idx)]
            # the picked lane's partials and address: a mux tree on pick's bits (a 4:1 mux per
            # LUT), 152 bits wide
            m.d.comb += [rc.i.payload.p.eq(_mux_tree([Value.cast(o.payload) for o, _, _ in outs], pick)),
                         rc.i.payload.side.eq(_mux_tree([addr for _, addr, _ in outs], pick))]
            m.d.comb += rc.i.valid.eq(computing & any_row)
            for i, (o, _, dropped) in enumerate(outs):
                m.d.comb += o.ready.eq((rc.i.ready & computing & (pick == i) & ~dropped)
                                       | (computing & dropped))
            waddr = rc.o.payload.side
            off = waddr[0:lgd]
            wide = Signal(D * 8 + 32)
            wbe = Signal(D + 4)
            m.d.comb += [wide.eq(rc.o.payload.sum << (off * 8)), wbe.eq(C(0xF, 4) << off)]
            straddle = off > D - 4
            wr = self.wr.req
            m.d.comb += [
                wr.valid.eq(computing & rc.o.valid),
                wr.payload.addr.eq((waddr >> lgd) + second),
                wr.payload.data.eq(Mux(second, wide[D * 8:], wide[0:D * 8])),
                wr.payload.be.eq(Mux(second, wbe[D:], wbe[0:D])),
                rc.o.ready.eq(computing & wr.ready & (~straddle | second)),
            ]
            with m.If(wr.valid & wr.ready):
                m.d.sync += second.eq(straddle & ~second)
            rc_idle = rc.idle
        else:
            rc_idle = self._combine_many(m, outs, computing, second)

        # ---- the next instruction's set-up, while this one runs: the per-instruction products
        # (row bytes, passes, bank start, row step, vector bytes) in two register stages from
        # the word the execution unit offers (``instr.payload``, held while it waits), so an
        # accepted word goes straight to PLAN. ``instr.ready`` waits until the offered word's
        # fields have been the same for two cycles (the stages hold its products)
        ip = self.instr.payload
        iw = data.View(Instruction, ip.word)
        i_op = iw.header.op
        x_ntok = Signal(8)
        m.d.comb += x_ntok.eq(Mux(i_op == Op.MM, iw.mm.ntok, 1))
        x_nb = Signal(11)
        x_fmt, x_pat = iw.mv.func[0:2], iw.mv.func[2:5]
        if chains:
            x_mv = i_op == Op.MV
            x_rows = Signal(16)
            x_bt = Signal()
            m.d.comb += [x_rows.eq(iw.mv.rows + Mux(x_mv, ip.rval, 0)),
                         x_nb.eq((iw.mv.cols + Mux(x_mv, ip.rval2, 0))[5:16]),
                         x_bt.eq(x_mv & iw.mv.func[6])]
        else:
            m.d.comb += x_nb.eq(iw.mv.cols[5:16])
        x_bb = Signal(6)                           # bytes per block of the mode
        with m.Switch(Cat(x_fmt, x_pat)):
            for f in WEIGHT_FORMATS:
                for p in SPARSITY_PATTERNS:
                    with m.Case(FORMAT_CODES[f].value | (PATTERN_CODES[p].value << 2)):
                        m.d.comb += x_bb.eq(block_bytes(f, p))
            with m.Default():
                m.d.comb += x_bb.eq(block_bytes("q4_0", "dense"))
        x_wrel = Signal(24)
        m.d.comb += x_wrel.eq(iw.mv.wb - self._wbase)
        x_key = Cat(x_nb, x_bb, x_ntok, x_wrel, *((x_rows, x_bt) if chains else ()))
        key1 = Signal(len(x_key))
        same1 = Signal()                           # the key one cycle ago equalled the one before
        same = Signal()
        m.d.comb += same.eq(x_key == key1)
        m.d.sync += [key1.eq(x_key), same1.eq(same)]
        settled = Signal()
        m.d.comb += settled.eq(same & same1)
        s1_nb = Signal(11)
        s1_ntok = Signal(8)
        s1_rbytes = Signal(18)
        s1_gmax = Signal(12)
        s1_b0 = Signal(24)
        m.d.sync += [s1_nb.eq(x_nb), s1_ntok.eq(x_ntok), s1_gmax.eq(C(NB, 12) // x_nb),
                     s1_b0.eq(((x_wrel >> lghd) << lgs) | x_wrel[0:lgs])]
        if chains:
            # block tiles: a command per block; a tile's rows in one stream
            lgp = exact_log2(P)
            s1_bt = Signal()
            s1_tb_raw = Signal(24)
            m.d.sync += [s1_rbytes.eq(Mux(x_bt, x_bb, x_nb * x_bb)), s1_bt.eq(x_bt),
                         s1_tb_raw.eq(((x_rows + P - 1) >> lgp) * x_bb)]
        else:
            m.d.sync += s1_rbytes.eq(x_nb * x_bb)
        s2 = {name: Signal.like(sig, name=f"s2_{name}") for name, sig in
              (("rbytes", rbytes), ("gmax", gmax), ("b0", b0), ("rstep", rstep),
               ("vbytes", vbytes))}
        m.d.sync += [s2["rbytes"].eq(s1_rbytes), s2["gmax"].eq(s1_gmax), s2["b0"].eq(s1_b0),
                     s2["rstep"].eq(s1_rbytes * Ls),
                     s2["vbytes"].eq(s1_nb * QBLOCK_BYTES * s1_ntok)]
        if W > 1:
            s2["half_ok"] = Signal(name="s2_half_ok")
            s1_nd = ((s1_nb << 2) + CB - 1) >> lgc
            m.d.sync += s2["half_ok"].eq((s1_nb * s1_ntok <= NB // 2) & (s1_nd * s1_ntok <= DD_HALF))
        if chains:
            # a block tile's span in a bank (its stream in whole bank lines), or a row tile's
            # pad: its 32 / P rows' stream rounded up to whole bank lines
            s2["tstep"] = Signal(24, name="s2_tstep")
            if P > 1:
                lgt = exact_log2(32 // P)
                m.d.sync += s2["tstep"].eq(Mux(s1_bt, ((s1_tb_raw + S - 1) >> lgs) << lgs,
                                               (-(s1_rbytes << lgt))[0:lgs]))
            else:
                m.d.sync += s2["tstep"].eq(Mux(s1_bt, s1_tb_raw, 0))
        live = {"rbytes": rbytes, "gmax": gmax, "b0": b0, "rstep": rstep, "vbytes": vbytes}
        if W > 1:
            live["half_ok"] = half_ok
        if chains:
            live["tstep"] = tstep

        # ---- control. A word is taken in IDLE, or in the cycle the last one finishes (its
        # done): every lane has drained then, so its registers may change
        taking = Signal()                          # (comb) IDLE, or the last pass's last cycle
        m.d.comb += self.instr.ready.eq(taking & settled)
        accept = self.instr.valid & self.instr.ready
        with m.If(accept):
            m.d.sync += [word.eq(ip.word), t0.eq(0), ntok_eff.eq(x_ntok), qaddr.eq(iw.mv.qsrc)]
            m.d.sync += [live[k].eq(v) for k, v in s2.items()]
            if chains:
                m.d.sync += [rows.eq(x_rows), nb.eq(x_nb)]
        take_next = ((i_op != Op.MV) & (i_op != Op.MM)) | ((i_op == Op.MM) & (iw.mm.ntok == 0))
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += taking.eq(1)
                with m.If(accept):
                    with m.If(take_next):
                        m.next = "DONE"
                    with m.Else():
                        m.next = "PLAN"
            with m.State("PLAN"):
                left = ntok_eff - t0
                m.d.sync += [g.eq(Mux(gmax < left, gmax, left)),
                             region.eq(0), cidx.eq(0), k.eq(0), ltok.eq(0), qbase_w.eq(0),
                             dbase_w.eq(0), second.eq(0)]
                m.d.comb += plan.eq(1)
                for c_reg, c_tok, c_base in issuers:
                    m.d.sync += [c_reg.eq(0), c_tok.eq(0), c_base.eq(qaddr)]
                whole = (t0 == 0) & (gmax >= ntok_eff)  # one pass loads every vector
                with m.If(whole & cached):
                    if W > 1:                          # the entry that holds them
                        m.d.sync += [use_e.eq(matches[1]), c_lru.eq(~matches[1])]
                    m.next = "SETTLE"                  # the vectors are still in the buffers
                with m.Else():
                    # vectors in the banked region are not kept: the load engine's per-port
                    # writes into the banks do not show on snoop
                    with m.If(whole & (q_end < self._wbase)):
                        m.d.comb += c_set.eq(1)
                        if W > 1:                      # into the entry replaced
                            m.d.sync += [use_e.eq(victim), qbase_w.eq(Mux(victim, NB // 2, 0)),
                                         dbase_w.eq(Mux(victim, DD_HALF, 0))]
                    with m.Else():
                        m.d.comb += c_clear.eq(1)
                        if W > 1:
                            m.d.sync += use_e.eq(0)
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [loading.eq(1), a_issue.eq(1), pass_active.eq(1)]
                with m.If(load_done):
                    m.next = "SETTLE"
            with m.State("SETTLE"):
                m.d.comb += pass_active.eq(1)
                m.next = "COMPUTE"
            with m.State("COMPUTE"):
                m.d.comb += [computing.eq(1), pass_active.eq(1)]
                # every lane's outputs have left (dropped past the last token, or into the
                # combine) and the combine has written them all, so nothing of this pass is
                # left in a scaler or the combine when the next one starts (or done rises)
                with m.If(Cat(*lanes_done).all() & rc_idle):
                    with m.If(t0 + g < ntok_eff):
                        m.d.sync += [t0.eq(t0 + g), qaddr.eq(issuers[0][2])]
                        m.next = "PLAN"
                    with m.Else():
                        # done, and the next word (if offered) taken in the same cycle
                        m.d.comb += [self.done.eq(1), taking.eq(1)]
                        with m.If(accept):
                            with m.If(take_next):
                                m.next = "DONE"
                            with m.Else():
                                m.next = "PLAN"
                        with m.Else():
                            m.next = "IDLE"
            with m.State("DONE"):
                m.d.comb += self.done.eq(1)
                m.next = "IDLE"
        return m
