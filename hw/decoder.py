"""The weight decoder: GGUF (and N:M sparse) block bytes from memory -> chain weight beats.

A matrix's weights arrive as a byte stream of ``data_width``-bit beats (byte ``i``
of a beat in bits ``[8i, 8i+8)``, the memory's little-endian order). Blocks are
18 (Q4_0), 20 (Q4_1), 34 (Q8_0) or, sparse, 6..26 bytes long (``compiler/sparse.py``),
so they straddle beats. The decoder keeps a window of whole beats and a byte
offset into it; each cycle it takes the window from the word (4 grains) holding the
offset into its stage-A register, and the next stage shifts that by the rest of the
offset (steps of the grain, the block sizes' common divisor) and cuts the next
``lanes`` blocks out at fixed positions; each output bit is then an AND-OR of the
aligned bits the supported modes take it from (:meth:`Decoder._bit_sources`, derived
from the blocks' :mod:`amaranth.lib.data` layouts :class:`Q4_0Block`, :class:`Q4_1Block`,
:class:`Q8_0Block`, :func:`sparse_block_layout`), gated by selects registered in stage A,
into a :func:`~llmfab.hw.chain.weight_beat_layout` beat for the chain.

Control: a ``cmd`` stream sets format, sparsity pattern, block count, blocks
per row and the first block's byte offset per matrix (what the instruction knows). A
matrix's bytes start ``offset`` bytes into its first beat (the bytes before it are
dropped: the window starts there, so no realigner is needed in front of the decoder)
and its rows follow each other unpadded; after its last block the rest of that beat is
dropped. An output beat never mixes rows: a row's final beat has
``last`` set and its lanes past the row's final block disabled (``en = 0``), so
with ``lanes`` blocks per beat lane ``l`` carries blocks ``l, l + lanes, ...`` of
every row (accum4's partial ``l`` when ``lanes`` is 4). The next command is taken
in the cycle the current one's last beat leaves (no idle cycle between matrices).
"""

import math

from amaranth import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from llmfab.core.formats import (BLOCK_WEIGHTS, SPARSITY_PATTERNS, WEIGHT_FORMATS, block_bytes,
                                  kept_weights)
from llmfab.hw.chain import (FORMAT_CODES, PATTERN_CODES, Sparsity, WeightFormat,
                             WeightLane, _check_names, weight_beat_layout)

__all__ = ["Q4_0Block", "Q4_1Block", "Q8_0Block", "sparse_block_layout", "block_layout",
           "DecodeCommand", "Decoder", "units"]


class Nibbles(data.Struct):
    """One byte of packed 4-bit codes: weight ``j`` low, weight ``j + 16`` high."""
    lo: unsigned(4)
    hi: unsigned(4)


class Q4_0Block(data.Struct):
    """GGUF Q4_0: fp16 ``d``, 16 bytes of nibbles; weight = (q - 8) * d."""
    d: unsigned(16)
    qs: data.ArrayLayout(Nibbles, 16)


class Q4_1Block(data.Struct):
    """GGUF Q4_1: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; weight = q * d + m."""
    d: unsigned(16)
    m: unsigned(16)
    qs: data.ArrayLayout(Nibbles, 16)


class Q8_0Block(data.Struct):
    """GGUF Q8_0: fp16 ``d``, 32 int8; weight = q * d."""
    d: unsigned(16)
    qs: data.ArrayLayout(unsigned(8), 32)


def sparse_block_layout(fmt: str, pattern: str) -> data.StructLayout:
    """The N:M sparse block of ``compiler/sparse.py``: header, K packed values, K indices.

    4-bit values: value ``j`` in bits ``[4j, 4j+4)`` of the value bytes (low nibble
    first); indices: ``log2(M)`` bits each, index ``j`` at bits ``[j*b, (j+1)*b)``.
    """
    K = kept_weights(pattern)
    _, M = SPARSITY_PATTERNS[pattern]
    fields = {"d": unsigned(16)}
    if fmt == "q4_1":
        fields["m"] = unsigned(16)
    fields["vals"] = data.ArrayLayout(unsigned(8 if fmt == "q8_0" else 4), K)
    fields["idx"] = data.ArrayLayout(unsigned(exact_log2(M)), K)
    return data.StructLayout(fields)


def block_layout(fmt: str, pattern: str) -> data.StructLayout:
    """Layout of one block of ``fmt`` stored with ``pattern``; its size is ``8 * block_bytes``."""
    if pattern == "dense":
        lay = data.Layout.cast({"q4_0": Q4_0Block, "q4_1": Q4_1Block, "q8_0": Q8_0Block}[fmt])
    else:
        lay = sparse_block_layout(fmt, pattern)
    assert lay.size == 8 * block_bytes(fmt, pattern), (fmt, pattern, lay.size)
    return lay


class DecodeCommand(data.Struct):
    """One matrix: format, sparsity pattern, number of blocks (0: nothing to do), blocks
    per row (0: the whole command is one row) and the byte offset of its first block in its
    first beat (a multiple of the decoder's grain, below one beat). Rows follow each other
    without padding."""
    fmt: WeightFormat
    pattern: Sparsity
    count: unsigned(32)
    row_blocks: unsigned(32)
    offset: unsigned(8)


class Decoder(wiring.Component):
    """Byte-realigning decoder of weight blocks into chain weight beats.

    Parameters
    ----------
    lanes : int
        Blocks per output beat (``AccelConfig.block_lanes_per_chain``).
    data_width : int
        Bits per input beat, a power of two from 64 to 2048 (the MV unit's row pipelines:
        a slice's bank line, or half of it from 64 bytes on).
    formats, patterns : iterable of str
        Supported weight formats and sparsity patterns.
    any_offset : bool
        Whether ``cmd.offset`` may be any byte (a one-slice MV unit, whose tiles may start on
        any byte). Otherwise it must be a multiple of the grain, the greatest common divisor
        of the beat and the block sizes (2 bytes: every block size is even), which halves
        the shifter's positions.

    Members
    -------
    cmd : In(stream.Signature(DecodeCommand))
        Per matrix: format, pattern, block count.
    data : In(stream.Signature(data_width))
        The matrix's bytes, little-endian, starting ``cmd.offset`` bytes into the first beat.
    weights : Out(stream.Signature(weight_beat_layout(lanes)))
        Up to ``lanes`` decoded blocks of one row per beat; ``last`` on a row's final
        beat, whose lanes past the row's final block have ``en = 0`` and all-zero fields.
    """

    def __init__(self, *, lanes: int, data_width: int,
                 formats=tuple(WEIGHT_FORMATS), patterns=tuple(SPARSITY_PATTERNS),
                 any_offset: bool = False, lookahead: int = 0):
        if not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
            raise ValueError(f"Decoder lanes must be a positive integer, not {lanes!r}")
        if (not isinstance(data_width, int) or data_width < 64 or data_width > 2048
                or data_width & (data_width - 1)):
            raise ValueError(f"Decoder data width must be a power of two from 64 to 2048 "
                             f"(the command's 8-bit offset), not {data_width!r}")
        self._lanes = lanes
        self._data_width = data_width
        self._formats = _check_names("Decoder formats", formats, WEIGHT_FORMATS)
        self._patterns = _check_names("Decoder patterns", patterns, SPARSITY_PATTERNS)
        if "dense" not in self._patterns:
            raise ValueError(f"Decoder patterns must include dense, not {self._patterns!r}")
        self._modes = [(f, p) for f in self._formats for p in self._patterns]
        self._bb = {mode: block_bytes(*mode) for mode in self._modes}
        beat = data_width // 8
        # offsets are multiples of it
        self._grain = 1 if any_offset else math.gcd(beat, *self._bb.values())
        self._span = lanes * max(self._bb.values())            # most bytes cut per cycle
        # the shift in two registered steps: whole `coarse`-byte words (stage A), then
        # `grain`-byte steps inside a word (stage B)
        self._coarse = min(beat, 4 * self._grain)
        # beats the shifter looks at: the largest offset plus the largest cut
        self._view_beats = -(-(beat - self._grain + self._span) // beat)
        if not isinstance(lookahead, int) or isinstance(lookahead, bool) or not 0 <= lookahead <= 4:
            raise ValueError(f"Decoder lookahead must be 0 to 4 beats, not {lookahead!r}")
        # beats held beyond the view: the next command's first beats wait there while the
        # current one's last block leaves, so a row starting mid-block loses no cycle
        self._window_beats = self._view_beats + lookahead
        super().__init__({
            "cmd": In(stream.Signature(DecodeCommand)),
            "data": In(stream.Signature(data_width)),
            "weights": Out(stream.Signature(weight_beat_layout(lanes))),
        })

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def data_width(self) -> int:
        return self._data_width

    @property
    def formats(self) -> tuple:
        return self._formats

    @property
    def patterns(self) -> tuple:
        return self._patterns

    @property
    def block_bytes(self) -> dict:
        """``{(fmt, pattern): bytes}`` of the supported modes."""
        return dict(self._bb)

    @property
    def grain(self) -> int:
        """Bytes: every offset (``cmd.offset`` and between blocks) is a multiple of it."""
        return self._grain

    @property
    def window_beats(self) -> int:
        return self._window_beats

    def _mode_switch(self, m, fmt, pattern):
        """Generate nested Switch cases, yielding ``(fmt, pattern)`` inside each supported
        mode's case. Codes outside the configuration fall into the last format / dense."""
        with m.Switch(fmt):
            for i, f in enumerate(self._formats):
                last = i == len(self._formats) - 1
                with (m.Default() if last else m.Case(FORMAT_CODES[f])):
                    with m.Switch(pattern):
                        for p in self._patterns[1:]:       # canonical order: dense first
                            with m.Case(PATTERN_CODES[p]):
                                yield f, p
                        with m.Default():
                            yield f, "dense"

    def elaborate(self, platform):
        m = Module()
        lanes = self._lanes
        beat = self._data_width // 8
        beat_log = exact_log2(beat)
        grain = self._grain
        NV, NW = self._view_beats, self._window_beats

        # ---- command state ------------------------------------------------------------
        active = Signal()
        fmt = Signal(WeightFormat)
        pattern = Signal(Sparsity)
        remaining = Signal(32)                   # blocks left in the command
        row_len = Signal(32)
        row_left = Signal(32)                    # blocks left in the current row
        cmd = self.cmd.payload

        # ---- beat window -------------------------------------------------------------
        window = [Signal(self._data_width, name=f"win{k}", reset_less=True) for k in range(NW)]
        count = Signal(range(NW + 1))            # beats held
        off = Signal(range(beat))                # byte offset of the next block in win0

        # blocks this beat: up to `lanes`, never across a row end or past the command
        last_blk = Signal()                      # the command's final beat
        row_end = Signal()                       # a row's final beat
        m.d.comb += [last_blk.eq(remaining <= lanes), row_end.eq(row_left <= lanes)]
        n_blk = Signal(range(lanes + 1))
        with m.If(last_blk & (remaining <= row_left)):
            m.d.comb += n_blk.eq(remaining)
        with m.Elif(row_end):
            m.d.comb += n_blk.eq(row_left)
        with m.Else():
            m.d.comb += n_blk.eq(lanes)
        cmd_end = Signal()
        m.d.comb += cmd_end.eq(remaining == n_blk)
        cut = Signal(range(self._span + 1))      # bytes taken this cycle
        for f, p in self._mode_switch(m, fmt, pattern):
            bb = self._bb[(f, p)]
            with m.Switch(n_blk):
                for k in range(1, lanes + 1):
                    with (m.Case(k) if k < lanes else m.Default()):
                        m.d.comb += cut.eq(k * bb)
        need = Signal(range(beat + self._span + 1))
        m.d.comb += need.eq(off + cut)

        # stage A: aligned bytes of the blocks taken
        a_valid = Signal()
        coarse = self._coarse
        a_bytes = Signal(8 * (self._span + coarse - grain), reset_less=True)
        a_next = Signal(8 * (self._span + coarse - grain))
        a_fmt = Signal(WeightFormat, reset_less=True)
        a_pattern = Signal(Sparsity, reset_less=True)
        a_nblk = Signal(range(lanes + 1), reset_less=True)
        a_last = Signal(reset_less=True)
        b_take = Signal()
        a_free = Signal()
        m.d.comb += a_free.eq(~a_valid | b_take)

        emit = Signal()
        m.d.comb += emit.eq(active & (need <= (count << beat_log)) & a_free)

        pops = Signal(range(NW + 1))
        with m.If(emit):
            with m.If(cmd_end):      # drop the rest of the matrix's final beat
                m.d.comb += pops.eq((need + beat - 1) >> beat_log)
            with m.Else():
                m.d.comb += pops.eq(need >> beat_log)
        accept = Signal()
        base = Signal(range(NW + 1))
        m.d.comb += base.eq(count - pops)
        m.d.comb += [self.data.ready.eq(base < NW),
                     accept.eq(self.data.valid & (base < NW))]
        for k in range(NW):
            with m.Switch(pops):
                for q in range(0, NW - k):
                    with (m.Case(q) if q < NW - k - 1 else m.Default()):
                        m.d.sync += window[k].eq(window[k + q])
            with m.If(accept & (base == k)):
                m.d.sync += window[k].eq(self.data.payload)
        m.d.sync += count.eq(base + accept)
        with m.If(emit):
            with m.If(cmd_end):
                m.d.sync += [off.eq(0), active.eq(0)]
            with m.Else():
                m.d.sync += [off.eq(need[:beat_log]), remaining.eq(remaining - n_blk),
                             row_left.eq(Mux(row_end, row_len, row_left - n_blk))]
        # the next command is taken while the current one emits its final beat (no idle cycle
        # between matrices); its bytes start `offset` bytes into the next beat, where the
        # window now begins
        m.d.comb += self.cmd.ready.eq(~active | (emit & cmd_end))
        with m.If(self.cmd.valid & self.cmd.ready & (cmd.count != 0)):
            rl = Mux(cmd.row_blocks != 0, cmd.row_blocks, cmd.count)
            m.d.sync += [active.eq(1), fmt.eq(cmd.fmt), pattern.eq(cmd.pattern),
                         remaining.eq(cmd.count), row_len.eq(rl), row_left.eq(rl),
                         off.eq(cmd.offset[:beat_log])]

        # coarse shift (stage A): the viewed beats from the `coarse`-byte word holding `off`
        view = Cat(*window[:NV])
        lg_c, lg_g = exact_log2(coarse), exact_log2(grain)
        word = off[lg_c:]
        a_fine = Signal(max(lg_c - lg_g, 1), reset_less=True)
        with m.Switch(word):
            for k in range(beat // coarse):
                with (m.Case(k) if k < beat // coarse - 1 else m.Default()):
                    m.d.comb += a_next.eq(view[8 * coarse * k:])
        with m.If(a_free):
            m.d.sync += a_valid.eq(emit)
        with m.If(emit):
            m.d.sync += [a_bytes.eq(a_next), a_fmt.eq(fmt), a_pattern.eq(pattern),
                         a_nblk.eq(n_blk), a_last.eq(row_end | cmd_end)]
            if lg_c > lg_g:
                m.d.sync += a_fine.eq(off[lg_g:lg_c])
        # fine shift (stage B): `grain`-byte steps inside the word
        aligned = Signal(8 * self._span)
        if lg_c > lg_g:
            with m.Switch(a_fine):
                for k in range(coarse // grain):
                    with (m.Case(k) if k < coarse // grain - 1 else m.Default()):
                        m.d.comb += aligned.eq(a_bytes[8 * grain * k:])
        else:
            m.d.comb += aligned.eq(a_bytes)

        # ---- stage B: field decode into the output beat ---------------------------------
        # Every output bit is an AND-OR of the few aligned bits it comes from across the modes
        # (:meth:`_bit_sources`), each gated by a select that stage A registers: "the mode is
        # one of those that take this bit from there, and the lane holds a block".
        table, groups = self._bit_sources()
        sels = [Signal(name=f"sel{k}", reset_less=True) for k in range(len(groups))]
        sel_next = [Signal(name=f"sel{k}_next") for k in range(len(groups))]
        for f, p in self._mode_switch(m, fmt, pattern):
            for k, (modes, lane) in enumerate(groups):
                m.d.comb += sel_next[k].eq((n_blk > lane) if (f, p) in modes else 0)
        with m.If(emit):
            m.d.sync += [s.eq(n) for s, n in zip(sels, sel_next)]
        out = self.weights.payload
        nxt = Signal(weight_beat_layout(lanes))
        m.d.comb += [nxt.fmt.eq(a_fmt), nxt.pattern.eq(a_pattern), nxt.last.eq(a_last)]
        for lane in range(lanes):
            m.d.comb += nxt.lanes[lane].en.eq(lane < a_nblk)
        bits = nxt.as_value()
        for pos, terms in table.items():
            m.d.comb += bits[pos].eq(Cat(*((aligned[src] ^ inv) & sels[g]
                                           for src, inv, g in terms)).any())
        m.d.comb += b_take.eq(~self.weights.valid | self.weights.ready)
        with m.If(b_take):
            m.d.sync += [self.weights.valid.eq(a_valid), out.eq(nxt)]
        return m

    def _bit_sources(self):
        """``({bit of the output beat: [(aligned bit, invert, group)]}, groups)``: per output
        lane bit, the aligned bits it is taken from; ``groups[g] = (modes, lane)``, the modes
        taking it from there (in that lane). Bits with no term are zero."""
        lanes = self._lanes
        lay = weight_beat_layout(lanes)
        lane_lay = WeightLane
        lane_off = lay["lanes"].offset
        lane_size = data.Layout.cast(lane_lay).size
        fld = {n: data.Layout.cast(lane_lay)[n].offset for n in ("w", "idx", "d", "m")}
        per_bit = {}                             # pos -> {(src, inv): set of modes}
        for mode in self._modes:
            f, p = mode
            bb = self._bb[mode]
            for lane in range(lanes):
                base = 8 * bb * lane
                lbase = lane_off + lane * lane_size
                for pos, src, inv in self._mode_bits(f, p, fld):
                    per_bit.setdefault((lane, lbase + pos), {}).setdefault(
                        (base + src, inv), set()).add(mode)
        groups, gidx, table = [], {}, {}
        for (lane, pos), srcs in per_bit.items():
            terms = []
            for (src, inv), modes in sorted(srcs.items()):
                key = (frozenset(modes), lane)
                if key not in gidx:
                    gidx[key] = len(groups)
                    groups.append(key)
                terms.append((src, inv, gidx[key]))
            table[pos] = terms
        return table, groups

    @staticmethod
    def _mode_bits(fmt, pattern, fld):
        """``(lane bit, block bit, invert)`` of every lane bit that mode ``(fmt, pattern)``
        takes from its block (the others are zero): docs/hw-units.md's ``WeightLane`` fields,
        Q4_0 codes as ``nibble ^ 8`` read as signed 4-bit."""
        lay = block_layout(fmt, pattern)
        out = [(fld["d"] + i, lay["d"].offset + i, 0) for i in range(16)]
        if fmt == "q4_1":
            out += [(fld["m"] + i, lay["m"].offset + i, 0) for i in range(16)]

        def weight(j, src):                      # weight j from block bits src..
            wb = fld["w"] + 8 * j
            if fmt == "q8_0":
                return [(wb + b, src + b, 0) for b in range(8)]
            if fmt == "q4_0":                    # (nibble ^ 8) as signed 4-bit
                return ([(wb + b, src + b, 0) for b in range(3)]
                        + [(wb + b, src + 3, 1) for b in range(3, 8)])
            return [(wb + b, src + b, 0) for b in range(4)]
        if pattern == "dense":
            qs = lay["qs"].offset
            for j in range(BLOCK_WEIGHTS):
                if fmt == "q8_0":
                    out += weight(j, qs + 8 * j)
                else:
                    out += weight(j, qs + 8 * (j % 16) + (0 if j < 16 else 4))
        else:
            K = kept_weights(pattern)
            vals, idx = lay["vals"], lay["idx"]
            vw = 8 if fmt == "q8_0" else 4
            ib = data.Layout.cast(idx.shape).elem_shape.width
            for j in range(K):
                out += weight(j, vals.offset + vw * j)
                out += [(fld["idx"] + 4 * j + b, idx.offset + ib * j + b, 0) for b in range(ib)]
        return out


def units(config) -> dict:
    """The weight decoder of an accelerator configuration (one per chain)."""
    return {"decoder": Decoder(lanes=config.block_lanes_per_chain, data_width=config.hbm.data_width,
                               formats=config.weight_formats, patterns=config.sparsity)}
