"""An execution unit for the SFU-class MISC operations (``exec_signature``).

:class:`SfuExec` executes MISC QUANT, RMSNORM, ROPE, SILU_MUL, EMBED, ATTN
(decode form, and the prefill form with ``t`` and the cached flag) and COPY
(plain and strided) bit-exactly as ``sim/golden.py``'s ``_misc``, one
instruction at a time, by sequencing on-chip line reads and writes around
``hw/sfu.py``'s :class:`~llmfab.hw.sfu.Sfu` and ``hw/quantizer.py``'s
:class:`~llmfab.hw.quantizer.Quantizer` (``L`` lanes):

* operand ``a`` is read through ``rd0`` (a :class:`~llmfab.hw.dma.LineReader`
  and a :class:`~llmfab.hw.dma.Realign` to line offset 0), operand ``b``
  through ``rd1``; a byte-window serializer (:class:`_Win`, takes of any size
  up to ``WN = max(8, 4 L)`` bytes, crossing line boundaries) hands out ``L``
  elements per cycle (ATTN, RMSNORM, QUANT, ROPE, COPY), ``silu_lanes`` (SILU_MUL) or
  a window of up to ``WN`` bytes of an EMBED block;
* the global-buffer constants line (eps, scale, 1/n) is read on ``rd1`` at
  the start of every instruction;
* results go through a small post stage (``fmul(y, s1)``: KVROW's scale; ATTN's
  probabilities pass through) or come up to ``L`` words at a time from the wide paths,
  then a line packer (up to ``L`` words per cycle) and a
  :class:`~llmfab.hw.dma.Realign` to the destination offset into ``wr``.
* ATTN, per query head: q -> a local buffer (``lanes`` elements per word); per row
  j the score ``vdot(q, K_j) * scale`` on an ``L``-lane datapath (``L = lanes``
  elements of q and K_j per cycle: cache rows binary16, the current row binary32
  rounded to binary16): ``L`` multipliers, ``L`` adders accumulating the 32
  ``reduce_sum`` lanes (time-multiplexed, one new element per lane every 32/L
  cycles), then a streaming adder tree fed in bit-reversed lane order, so row
  j+1 accumulates while row j's tree runs; the scores go into a score buffer;
  SFU SOFTMAX back into it; then ``accum4_j(a_j * V_j)``, ``L`` elements per
  cycle on the same multipliers and adders, with four partial memories (+0
  for a partial's first row) and the final ``(p0 + p1) + (p2 + p3)``, ``at_n``
  elements per cycle, to the writer. The heads overlap: two score buffers
  (head h in buffer h mod 2), and at each decision (state ANEXT) the sequencer
  starts the next softmax feed if that head's scores are in and the SFU is
  free, else the next head's scores if their buffer is free (head h-2's AV
  done), else the next AV once its softmax is back; so head h's softmax (the
  SFU's latency, about 130 cycles + 2 per row) runs while head h+1 scores
  and head h-1 does its AV, and outputs still leave in head order.
* RMSNORM: the sum of squares ``reduce_sum(x*x)`` on the ATTN score datapath
  (one row of ``n`` elements, ``L`` per cycle); ``rsqrt(ss * (1/n) + eps)``
  as one beat through the SFU (``SfuOp.RMS_SCALAR``); then ``x`` is read
  again with ``w`` and ``(x * r) * w`` goes ``L`` per cycle through 2L
  multipliers to the writer. ``x`` is read twice: a destination overlapping
  ``x`` (other than exactly in place) is not the golden model's result.
* ROPE: ``L/2`` pairs per cycle over the whole ``n x hd`` stream (2L
  multipliers, ``L`` adders; a beat may hold pairs of two heads), the cos/sin
  table read at ``(i + q) mod (hd/2)`` for pair ``q`` of the beat. The table (``hd``
  words at ``b``, one a cycle into the cos/sin memories) is read only when the last ROPE
  that read one had another ``b`` or ``hd``, or a write to one of its lines was seen since
  (``snoop``: the load engine's and the execution unit's writes); else it is still there,
  and the ROPE takes ``hd`` cycles less (the decode programs' ROPEs of one layer, one per
  KV head on the chains, share their layer's table).
* SILU_MUL: ``silu_lanes`` elements of ``a`` and ``b`` per cycle through as many lanes of
  ``fmul(silu(a), b)`` (``hw/sfu.py``'s ``silu_pipe``: the SFU's exp, ``1 + e``, the
  recip-only Newton steps and ``* x``, the same operations as the SFU's SILU; then ``* b``),
  one stalling pipeline into the writer. ``silu_lanes`` defaults to
  ``min(lanes, SILU_LANES)`` = 2: a lane is 11 multipliers and 8 adders.
* EMBED: ``L`` elements per cycle on the ROPE pipeline (its 2L multipliers and L adders:
  ``fmul(q, d)``, Q4_1 ``fadd(fmul(q, d), m)``, exactly the golden model's operations; see
  the ROPE pipeline's comment for the operand routing), the block's quants as exact
  small-integer binary32 values; the next block's bytes are collected meanwhile, a window of
  up to ``WN`` bytes per cycle, so a block takes ``32 / L`` cycles.
* COPY: up to ``L`` words of a row per cycle (the accelerator routes COPY to
  ``hw/execute.py``'s ``MiscExec``, a line per cycle; this path serves ``SfuExec`` alone).

Attention on the chains (``chains=True``; nothing of it is elaborated otherwise):

* SOFTMAX: ``n + R[reg]`` elements of ``a``, ``L`` per beat through ``L`` multipliers
  (``fmul(a, scale)``) into :class:`~llmfab.hw.softmax.VecSoftmax` (``L`` lanes,
  ``pad32``), its output beats (+0.0 words up to a multiple of 32 included) ``L`` words a
  cycle to the writer; ``a`` is read completely before the first write (VecSoftmax's
  first pass takes all of it), so in place works. About ``3 n / L + 110`` cycles.
* KVROW (position ``S = R[reg] + aux``): the K row through the quantizer, its Q8_0 blocks
  (binary16 ``d``) as bytes into row ``S % 32`` of K tile ``S // 32``; the V row's
  ``max|v|``, ``d_v`` and ``127 * recip(max)`` (post stage, SFU RECIP); the V row again,
  one ``q`` byte per dim (a cycle each) into V tile ``S // 32`` (not the blocks' ``d``:
  MV_BT reads them as 1.0); the scale. The bytes go
  through a one-line coalescer (byte enables) into ``wr``; slice-major tiles as
  ``compiler/isa.py``'s ``row_address`` with the ``slices``/``stripe`` parameters.
* QUANT on ``n + R[reg]`` elements.

See docs/hw-units.md ("SFU execution unit", and its "attention on the chains") for the
cycle tables.

``lanes`` defaults to ``min(8, line_bytes / 4)`` (:meth:`SfuExec.default_lanes`):
one line of binary32 operands per cycle, at most 8 so that each of the 32
reduce lanes sees a new element at most every 4 cycles (the adder's latency
is 3). ``tiny`` (16-byte lines) has 4 lanes, ``ci`` (64-byte lines) 8.

Cycles (tiny, measured by tests/rtl/test_sfu_exec.py::test_sfu_exec_cycles,
busy_cmp; ``pytest -s`` prints them): RMSNORM n=576 418, SILU_MUL n=1536 845 (2 lanes:
n/2 + 77; 1630 at one element per cycle), QUANT n=576 209 / 1536 459 (d and sumq up to L
words a cycle; 231 / 531 at one), ROPE 3x64 131,
EMBED 576 (18 blocks, any format) 166 (18 x 32/L + 22; 919 before), ATTN 3 heads x 64
at position 1 / 50 / 100: 595 / 5339 / 10289 (per head: scores hd/L q beats + rows x
ceil(hd/32)*32/L + 32/L + 36, AV rows x hd/L + hd/at_n + 13, the softmax feed rows
and its latency 128 + 2 x rows, overlapped as above: sim/perf.py's attn_schedule
replays it; ``at_n`` = the largest power of two <= L dividing hd elements per
cycle). Each op is 2 cycles more than alone in the unit (the execution unit's
footprint stage, hw/exec_unit.py).
MV/MM are not executed here (done without writing).

Limits: ATTN rows and SOFTMAX lengths <= ``max_len`` (the score buffer, the SFU's and
VecSoftmax's vector buffers); ROPE/ATTN head dim <= ``max_hd``; the strided COPY streams (a
destination row overlapping a not-yet-read source row is not the golden
model's read-first result); NaN results are the canonical NaN.
"""

from amaranth import Array, C, Cat, Module, Mux, Signal, signed
from amaranth.lib import data, memory, wiring
from amaranth.utils import exact_log2

from llmfab.hw import fp
from llmfab.hw.dma import LineReader, Realign
from llmfab.hw.execute import exec_signature
from llmfab.hw.isa import BLOCK_BYTES, Instruction, MiscFunc, Op
from llmfab.hw.quantizer import F127, INV127, Quantizer, rne_clamp127
from llmfab.hw.fp import Staged
from llmfab.hw.sfu import NEG_ZERO, Sfu, SfuOp, silu_pipe
from llmfab.hw.softmax import VecSoftmax

TILE = 32          # compiler/isa.py TILE_ROWS: positions per K/V tile
#: SILU_MUL lanes by default (``SfuExec.default_silu_lanes``: at most ``lanes``). A lane of
#: ``fmul(silu(a), b)`` is 11 binary32 multipliers and 8 adders, about 7k LUT and 24 DSP48E2
#: in the ``u280`` estimate (docs/hw-units.md, "SFU execution unit"): ``u280`` had 15.6k LUT
#: to spare, so 2 lanes (+13.8k LUT with EMBED's lanes), not ``lanes`` (8: about +55k).
SILU_LANES = 2

__all__ = ["SfuExec", "SFU_FUNCS", "CHAINS_FUNCS"]

#: MISC funcs this unit executes.
SFU_FUNCS = ("QUANT", "RMSNORM", "ROPE", "SILU_MUL", "EMBED", "COPY", "ATTN")
#: MISC funcs it executes too when built with ``chains=True`` (attention on the chains).
CHAINS_FUNCS = ("KVROW", "SOFTMAX")



def _small_int_to_f32(m, v, *, name):
    """A signed integer of at most 9 bits (|v| <= 256) to binary32, exactly."""
    w = len(v)
    mag = Signal(w, name=f"{name}_mag")
    m.d.comb += mag.eq(Mux(v[-1], -v, v))
    lz = fp.lzc(mag, w)
    norm = Signal(w, name=f"{name}_norm")
    m.d.comb += norm.eq(mag << lz)
    out = Signal(32, name=f"{name}_f")
    m.d.comb += out.eq(Mux(mag == 0, 0, Cat(C(0, 24 - w), norm[0:w - 1],
                                            (127 + w - 1 - lz)[0:8], v[-1])))
    return out


class _Win:
    """Serializer over a realigned line stream: ``take`` ``size`` bytes (1 .. ``WN``).

    ``bytes`` shows the next ``WN`` bytes of the stream; a take may cross from
    one line into the next (the line being read is kept in ``l0`` while the
    stream's next line waits at the realigner's output), so any sequence of
    sizes that sums to ``left`` works, without bubbles at line boundaries.
    ``avail`` is high when ``size`` bytes are there.
    """

    def __init__(self, m, o, D, WN, name):
        assert WN <= D
        self.o = o
        self.bp = Signal(range(D), name=f"{name}_bp")
        self.left = Signal(34, name=f"{name}_left")
        self.take = Signal(name=f"{name}_take")
        self.size = Signal(range(WN + 1), name=f"{name}_size")
        self.l0 = Signal(D * 8, name=f"{name}_l0")
        self.l0v = Signal(name=f"{name}_l0v")
        line = Signal(D * 8, name=f"{name}_line")
        m.d.comb += line.eq(o.payload.data if hasattr(o.payload, "data") else o.payload)
        cur = Mux(self.l0v, self.l0, line)
        self.bytes = Signal(8 * WN, name=f"{name}_bytes")
        m.d.comb += self.bytes.eq((Cat(cur, line) >> Cat(C(0, 3), self.bp))[0:8 * WN])
        end = Signal(range(2 * D + 1), name=f"{name}_end")
        m.d.comb += end.eq(self.bp + self.size)
        self.avail = ((self.left != 0) & (self.l0v | o.valid)
                      & ((end <= D) | (self.l0v & o.valid)))
        last = self.left == self.size
        m.d.comb += o.ready.eq(self.take & (~self.l0v | (end > D)))
        with m.If(self.take):
            m.d.sync += self.left.eq(self.left - self.size)
            with m.If(last | (end == D)):
                m.d.sync += [self.l0v.eq(0), self.bp.eq(0)]
            with m.Elif(end < D):
                m.d.sync += [self.bp.eq(end), self.l0v.eq(1)]
                with m.If(~self.l0v):
                    m.d.sync += self.l0.eq(line)
            with m.Else():                       # crossing into the next line
                m.d.sync += [self.l0.eq(line), self.l0v.eq(1), self.bp.eq(end - D)]

    def restart(self, nbytes):
        """Sync statements starting a stream of ``nbytes`` bytes."""
        return [self.left.eq(nbytes), self.bp.eq(0), self.l0v.eq(0)]


class SfuExec(wiring.Component):
    """MISC QUANT/RMSNORM/ROPE/SILU_MUL/EMBED/COPY with the execution-unit interface.

    Parameters
    ----------
    addr_bits, line_bytes : int
        As every execution unit (``exec_factory(addr_bits=, line_bytes=)``).
    gb_base : int
        On-chip byte address of the global buffer (its first line holds the
        constants: word 0 eps, word 1 attention scale, word 2 1/n).
    max_len : int
        SFU vector buffer (longest RMSNORM, ATTN row count); with ``chains`` also
        VecSoftmax's (longest SOFTMAX; a power of two >= 32).
    max_hd : int
        Longest ROPE head dimension.
    chains : bool
        Attention on the chains: also MISC SOFTMAX and KVROW, and QUANT's length
        ``n + R[reg]`` (docs/hw-units.md, "SFU execution unit: attention on the chains").
        False (default): none of that logic is elaborated.
    slices, stripe : int
        The accelerator's slices and stripe bytes (KVROW's slice-major tiles, as
        ``compiler/isa.py``'s ``row_address`` / ``kv_region``); on several slices
        ``slices * stripe`` (the HBM line) is the on-chip line or a multiple of it (then a line
        holds the stripes of only some slices: KVROW's byte addresses do not depend on the
        line).
    cache_below : int or None
        The ROPE table is kept only when it ends at or below this on-chip byte (the banked
        region's start, ``default_units``: the load engine's per-port writes into the banks
        do not show on ``snoop``); None: anywhere.
    """

    def __init__(self, *, addr_bits: int, line_bytes: int, gb_base: int, max_len: int = 2048,
                 max_hd: int = 256, lanes: int | None = None, chains: bool = False,
                 slices: int = 1, stripe: int = 64, silu_lanes: int | None = None,
                 cache_below: int | None = None):
        if lanes is None:
            lanes = self.default_lanes(line_bytes)
        if silu_lanes is None:
            silu_lanes = self.default_silu_lanes(lanes)
        if silu_lanes not in (1, 2, 4, 8) or silu_lanes > lanes:
            self._MustUse__silence = True
            raise ValueError(f"SfuExec silu_lanes must be 1, 2, 4 or 8 and at most lanes "
                             f"({lanes}), not {silu_lanes!r}")
        self.silu_lanes = silu_lanes
        if (slices < 1 or slices & (slices - 1) or stripe < 2 or stripe & (stripe - 1)
                or (slices > 1 and slices * stripe < line_bytes) or slices > 32):
            self._MustUse__silence = True
            raise ValueError(f"SfuExec slices ({slices!r}) and stripe ({stripe!r}) must be powers "
                             f"of two, slices <= 32, slices * stripe >= line_bytes ({line_bytes}) "
                             f"on several slices")
        self._chains = bool(chains)
        self._cache_below = cache_below
        self._slices = slices
        self._stripe = stripe
        if lanes not in (2, 4, 8) or 4 * lanes > line_bytes or max_hd % lanes:
            self._MustUse__silence = True        # no UnusedElaboratable warning
            raise ValueError(f"SfuExec lanes must be 2, 4 or 8, at most line_bytes/4 "
                             f"({line_bytes}/4) and divide max_hd ({max_hd}), not {lanes!r}")
        self.lanes = lanes
        self._ab = addr_bits
        self._d = line_bytes
        self._gb = gb_base
        self._max_len = max_len
        self._max_hd = max_hd
        super().__init__(exec_signature(addr_bits, line_bytes * 8))

    @staticmethod
    def default_lanes(line_bytes: int) -> int:
        """Lanes of the wide datapaths: ``min(8, line_bytes / 4)`` binary32 elements per cycle
        (one line of binary32 operands per cycle up to 8; 8 keeps the 32 reduce lanes
        time-multiplexed over 8 adders at one new element per lane every 4 cycles, more than
        the adder's 3-cycle latency)."""
        return max(2, min(8, line_bytes // 4))

    @staticmethod
    def default_silu_lanes(lanes: int) -> int:
        """Lanes of SILU_MUL's datapath (``fmul(silu(a), b)``, 11 multipliers and 8 adders a
        lane): ``SILU_LANES`` (see its comment for the cost), at most ``lanes``."""
        return min(lanes, SILU_LANES)

    def elaborate(self, platform):
        m = Module()
        D = self._d
        lgd = exact_log2(D)
        W = D // 4
        m.submodules.rda = rda = LineReader(addr_bits=self._ab, line_bytes=D)
        m.submodules.rdb = rdb = LineReader(addr_bits=self._ab, line_bytes=D)
        m.submodules.ala = ala = Realign(D)
        m.submodules.alb = alb = Realign(D)
        m.submodules.alw = alw = Realign(D)
        m.submodules.sfu = sfu = Sfu(max_len=self._max_len)
        m.submodules.quant = quant = Quantizer(lanes=self.lanes)
        wiring.connect(m, rda.mem, wiring.flipped(self.rd0))
        wiring.connect(m, rda.o, ala.i)
        wiring.connect(m, rdb.o, alb.i)

        # ---- the instruction
        word = Signal(128)
        w = data.View(Instruction, word)
        misc = w.misc
        func = Signal(8)
        m.d.comb += func.eq(misc.func)
        is_q, is_rms, is_rope, is_silu, is_emb, is_copy, is_attn = (
            func == getattr(MiscFunc, f) for f in SFU_FUNCS)
        CH = self._chains
        is_kv = (func == MiscFunc.KVROW) if CH else C(0, 1)
        is_sm = (func == MiscFunc.SOFTMAX) if CH else C(0, 1)
        rv = Signal(32)                 # R[reg] of the instruction (ATTN's S; dynamic lengths)
        aux = Signal(16)
        if CH:
            # QUANT and SOFTMAX work on n + R[reg] elements (reg 0 reads 0)
            n = Signal(18)
            m.d.comb += [n.eq(misc.n + Mux(is_q | is_sm, rv, 0)), aux.eq(misc.aux)]
        else:
            n = Signal(16)
            m.d.comb += [n.eq(misc.n), aux.eq(misc.aux)]
        nb = n >> 5
        fmt = aux[0:2]
        bs = Signal(6)
        m.d.comb += bs.eq(Mux(fmt == 0, BLOCK_BYTES[0], Mux(fmt == 1, BLOCK_BYTES[1], BLOCK_BYTES[2])))
        reps = Mux(aux > 1, aux, 1)

        # constants (read from the global buffer at every start)
        eps = Signal(32)
        inv_n = Signal(32)
        scale = Signal(32)
        gb_line = self._gb // D
        const_req = Signal()
        const_wait = Signal()
        m.d.comb += [self.rd1.req.valid.eq(Mux(const_req, 1, rdb.mem.req.valid)),
                     self.rd1.req.payload.eq(Mux(const_req, gb_line, rdb.mem.req.payload)),
                     rdb.mem.req.ready.eq(self.rd1.req.ready & ~const_req),
                     rdb.mem.rsp.valid.eq(self.rd1.rsp.valid & ~const_wait),
                     rdb.mem.rsp.payload.eq(self.rd1.rsp.payload)]
        with m.If(const_wait & self.rd1.rsp.valid):
            gbl = self.rd1.rsp.payload
            m.d.sync += [eps.eq(gbl[0:32]), scale.eq(gbl[32:64]), inv_n.eq(gbl[64:96])]

        # ---- operand serializers
        L = self.lanes
        lgl = exact_log2(L)
        WN = max(8, 4 * L)
        sa = _Win(m, ala.o, D, WN, "sa")
        sb = _Win(m, alb.o, D, WN, "sb")
        a_word = sa.bytes[0:32]
        b_word = sb.bytes[0:32]

        # ---- ROPE table
        # cos and sin tables; a beat's L/2 pairs read entries (ridx + q) mod half
        HP = L // 2
        half = aux >> 1
        tcm = memory.Memory(shape=32, depth=self._max_hd // 2, init=[])
        tsm = memory.Memory(shape=32, depth=self._max_hd // 2, init=[])
        m.submodules.tcm = tcm
        m.submodules.tsm = tsm
        tcw, tsw = tcm.write_port(), tsm.write_port()
        ridx = Signal(range(self._max_hd))
        # the table cache: the cos/sin memories hold the table of ``aux`` entries read from
        # ``b`` by the last ROPE that read one (tab_v), until a write to a line of it is seen
        # on ``snoop`` (the load engine's and the execution unit's writes): a ROPE with the
        # same ``b`` and ``aux`` then skips reading it (tab_hit, latched as rope_cached)
        tab_v = Signal()
        tab_b = Signal(32, name="tab_b")
        tab_n = Signal(16)
        tab_lo = Signal.like(self.snoop[0].addr, name="tab_lo")
        tab_hi = Signal.like(self.snoop[0].addr, name="tab_hi")
        tab_dirty = Signal()                # a write to the table's lines while it was read
        rope_cached = Signal()
        tab_snoop = Cat(s_.valid & (s_.addr >= tab_lo) & (s_.addr <= tab_hi)
                        for s_ in self.snoop).any()

        def mod_half(v):
            for _ in range(HP):          # v < ridx + HP: at most HP wraps (half may be 1)
                v = Mux(v >= half, v - half, v)
            return v
        t_cos, t_sin = [], []
        for q in range(HP):
            rc, rs_ = tcm.read_port(domain="comb"), tsm.read_port(domain="comb")
            ti = Signal(range(self._max_hd + HP), name=f"ropeidx{q}")
            m.d.comb += [ti.eq(mod_half(ridx + q)), rc.addr.eq(ti), rs_.addr.eq(ti)]
            t_cos.append(rc.data)
            t_sin.append(rs_.data)
        ridx_next = Signal(range(self._max_hd + HP))
        m.d.comb += ridx_next.eq(mod_half(ridx + HP))

        # ---- QUANT d/sumq buffer: block b's (d, sumq) in word b % L of entry b // L, so the d
        # and sumq phases write L words a cycle
        qmem = memory.Memory(shape=64 * L, depth=-(-2048 // L), init=[])
        m.submodules.qmem = qmem
        qwp = qmem.write_port(granularity=64)
        qrp = qmem.read_port(domain="comb")

        # ---- post stage: y = mode 0: x; 1: fmul(x, s1) (KVROW's d and 127/amax; ATTN's
        # probabilities pass through)
        pv = Signal()
        px = Signal(32)
        px1 = Signal(32)
        ps1 = Signal(32)
        pmode = Signal()
        ppair = Signal()
        w_ready = Signal()
        post_ce = Signal()
        p = fp.Pipe(m, post_ce, name="post")
        x_ = p.input(px)
        prod = p.fmul(x_, p.input(ps1))
        lat = p.stage_of(prod)
        md = p.at(p.input(pmode), lat)
        y = Mux(md == 0, p.at(x_, lat), prod.value)
        y1 = p.at(p.input(px1), lat)
        pair_o = p.at(p.input(ppair), lat)
        ce, post_valid = fp.stall_control(m, pv, w_ready, lat, name="post")
        m.d.comb += post_ce.eq(ce)

        # ---- writer input (words)
        wi_valid = Signal()
        LP = max(L, 2)
        wi_x = [Signal(32, name=f"wi_x{j}") for j in range(LP)]
        wi_x0, wi_x1 = wi_x[0], wi_x[1]
        wi_n = Signal(range(LP + 1), init=1)   # words this cycle (pk_k + wi_n <= W always)
        wi_ready = Signal()
        from_quant = Signal()
        to_sbuf = Signal()
        from_attn = Signal()
        from_rms = Signal()
        from_rope = Signal()
        from_silu = Signal()
        from_copy = Signal()
        cp_v = Signal()                  # COPY: words available (sequencer state CPY)
        cp_n = Signal(range(L + 1))
        # chains: SOFTMAX's output beats (VecSoftmax, L words each, its +0.0 padding
        # included) go to the writer (from_sm); KVROW's outputs go to the byte writer (from_kv)
        from_sm = Signal()
        from_kv = Signal()
        kv_wr = Signal()                 # KVROW: the post stage's output is taken
        if CH:
            m.d.comb += w_ready.eq(Mux(from_kv, kv_wr, Mux(
                to_sbuf, 1, wi_ready & ~from_quant & ~from_attn & ~from_rms & ~from_rope
                & ~from_sm & ~from_silu & ~from_copy)))
        else:
            m.d.comb += w_ready.eq(Mux(to_sbuf, 1, wi_ready & ~from_quant & ~from_attn & ~from_rms
                                       & ~from_rope & ~from_silu & ~from_copy))

        # ---- packer -> alw -> wr
        pk = Array(Signal(32, name=f"pk{j}") for j in range(W))
        pk_k = Signal(range(W + 1))
        seg_w = Signal(34)        # words per segment
        seg_left = Signal(34)
        pl_valid = Signal()
        pl_data = Signal(D * 8)
        cnt = wi_n
        m.d.comb += wi_ready.eq(~pl_valid | alw.i.ready)
        m.d.comb += [alw.i.valid.eq(pl_valid), alw.i.payload.eq(pl_data)]
        with m.If(alw.i.valid & alw.i.ready):
            m.d.sync += pl_valid.eq(0)
        newl = [Mux(pk_k > j, pk[j], Array(wi_x)[(j - pk_k)[0:exact_log2(LP)]]) for j in range(W)]
        with m.If(wi_valid & wi_ready):
            with m.If((pk_k + cnt == W) | (seg_left == cnt)):
                m.d.sync += [pl_valid.eq(1), pl_data.eq(Cat(*newl)), pk_k.eq(0),
                             seg_left.eq(Mux(seg_left == cnt, seg_w, seg_left - cnt))]
            with m.Else():
                m.d.sync += [pk[j].eq(newl[j]) for j in range(W)]
                m.d.sync += [pk_k.eq(pk_k + cnt), seg_left.eq(seg_left - cnt)]

        nseg = Signal(16)
        seg_i = Signal(16)
        seg_dst = Signal(32)
        seg_stride = Signal(34)
        wline = Signal(self._ab)
        wr = self.wr.req
        m.d.comb += [wr.valid.eq(alw.o.valid), wr.payload.addr.eq(wline),
                     wr.payload.data.eq(alw.o.payload.data), wr.payload.be.eq(alw.o.payload.be),
                     alw.o.ready.eq(wr.ready)]
        w_go = Signal()
        w_done = Signal()
        with m.FSM(name="writer"):
            with m.State("IDLE"):
                with m.If(w_go):
                    m.next = "CMD"
            with m.State("CMD"):
                m.d.comb += [alw.cmd.valid.eq(1), alw.cmd.payload.s_off.eq(0),
                             alw.cmd.payload.d_off.eq(seg_dst[0:lgd]),
                             alw.cmd.payload.n.eq(seg_w << 2)]
                m.d.sync += wline.eq(seg_dst >> lgd)
                with m.If(alw.cmd.ready):
                    m.next = "RUN"
            with m.State("RUN"):
                with m.If(wr.valid & wr.ready):
                    m.d.sync += wline.eq(wline + 1)
                    with m.If(alw.o.payload.last):
                        m.d.sync += [seg_i.eq(seg_i + 1), seg_dst.eq(seg_dst + seg_stride)]
                        with m.If(seg_i + 1 == nseg):
                            m.d.comb += w_done.eq(1)
                            m.next = "IDLE"
                        with m.Else():
                            m.next = "CMD"

        # ---- ATTN: q head, scores/probabilities, 4 partials per output element; L lanes.
        # One L-lane multiply-add datapath (L fmul, L fadd; never stalls) serves both phases:
        # * scores: beat k of row j carries elements d = kL .. kL+L-1 of q and K_j (+0 past
        #   hd: reduce_sum's padding); reduce lane r = d mod 32 sits in slot r mod L, register
        #   sacc[r]: the first 32-element chunk is added to -0.0 (exact), the others to their
        #   lane, one new element per lane every 32/L >= 4 cycles. After the row's last beat the
        #   32 lanes are copied to tbuf and streamed L per cycle in bit-reversed lane order
        #   into a tree of streaming adder levels (adjacent pairs = reduce_sum's
        #   acc[i] + acc[i+h]), while the next row accumulates; then * scale -> sbuf.
        # * AV: p[j % 4][d] = fadd(p or +0 (first four rows), fmul(a_j, V_jd)), L elements
        #   per beat, partial memories L elements wide.
        CB = 32 // L                      # beats per 32-element chunk
        lgcb = exact_log2(CB)
        hdw = self._max_hd // L           # L-element words of the longest head
        qhm = memory.Memory(shape=32 * L, depth=hdw, init=[])
        m.submodules.qhm = qhm
        qh_w = qhm.write_port()
        qh_r = qhm.read_port(domain="comb")
        # two score buffers (head h in bank h mod 2): head h+1's scores go into one while head
        # h's softmax writes its probabilities into the other and head h-1's AV reads them
        sb_ws, sb_rs = [], []
        for k in range(2):
            sbk = memory.Memory(shape=32, depth=self._max_len, init=[])
            m.submodules[f"sbm{k}"] = sbk
            sb_ws.append(sbk.write_port())
            sb_rs.append(sbk.read_port(domain="comb"))
        sb_raddr = Signal(range(self._max_len))
        sb_rbank = Signal()
        sb_rdata = Signal(32)
        m.d.comb += [r.addr.eq(sb_raddr) for r in sb_rs]
        m.d.comb += sb_rdata.eq(Mux(sb_rbank, sb_rs[1].data, sb_rs[0].data))
        sc_widx = Signal(range(self._max_len + 1))     # scores written (bank sc_bank)
        sm_widx = Signal(range(self._max_len + 1))     # probabilities written (bank sm_bank)
        sc_bank = Signal()
        sm_bank = Signal()
        sc_out_v = Signal()
        sc_out = Signal(32)
        sm_in_v = Signal()
        with m.If(sc_out_v):
            m.d.sync += sc_widx.eq(sc_widx + 1)
        with m.If(sm_in_v):
            m.d.sync += sm_widx.eq(sm_widx + 1)
        for k, wp_ in enumerate(sb_ws):
            on_sc = sc_out_v & (sc_bank == k)
            m.d.comb += [wp_.en.eq(on_sc | (sm_in_v & (sm_bank == k))),
                         wp_.addr.eq(Mux(on_sc, sc_widx, sm_widx)),
                         wp_.data.eq(Mux(on_sc, sc_out, y))]
        pms = []
        for k in range(4):
            pmk = memory.Memory(shape=32 * L, depth=hdw, init=[])
            m.submodules[f"pm{k}"] = pmk
            pms.append((pmk.write_port(), pmk.read_port(domain="comb")))
        av_mode = Signal()
        mv = Signal()
        m_a = [Signal(32, name=f"ma{k}") for k in range(L)]
        m_x = [Signal(32, name=f"mx{k}") for k in range(L)]
        m_mask = Signal(L)
        m_first = Signal()
        m_addr = Signal(16)
        m_lane4 = Signal(2)
        m_last = Signal()
        one = Signal(init=1)
        pa = fp.Pipe(m, one, name="acc")
        prods = [pa.fmul(pa.input(m_a[k]), pa.input(m_x[k])) for k in range(L)]
        st = prods[0].stage
        i_addr, i_lane4, i_first = pa.input(m_addr), pa.input(m_lane4), pa.input(m_first)
        i_last, i_mask = pa.input(m_last), pa.input(m_mask)
        addr3, lane43, first3 = pa.at(i_addr, st), pa.at(i_lane4, st), pa.at(i_first, st)
        mask3 = pa.at(i_mask, st)
        tree_d = Signal(range(self._max_hd))
        in_tree = Signal()
        for k, (wp_, rp_) in enumerate(pms):
            m.d.comb += rp_.addr.eq(Mux(in_tree, tree_d >> lgl, addr3))
        pword = Array(rp_.data for _, rp_ in pms)[lane43]
        sacc = [Signal(32, name=f"sacc{r}") for r in range(32)]
        sums = []
        for k in range(L):
            lane_old = Array(sacc[b * L + k] for b in range(CB))[addr3[0:lgcb]]
            old = Mux(av_mode, Mux(first3, 0, pword[32 * k:32 * k + 32]),
                      Mux(first3, NEG_ZERO, lane_old))
            x = Mux(mask3[k], prods[k].value, 0)
            sums.append(pa.fadd(Staged(old, st), Staged(x, st)))
        sst = sums[0].stage
        avs = fp.valid_chain(m, one, mv, sst + 1, name="accv")
        addr6, lane46 = pa.at(i_addr, sst), pa.at(i_lane4, sst)
        last7 = pa.at(i_last, sst + 1)
        for k, (wp_, rp_) in enumerate(pms):
            m.d.comb += [wp_.en.eq(avs[sst] & av_mode & (lane46 == k)), wp_.addr.eq(addr6),
                         wp_.data.eq(Cat(*(v.value for v in sums)))]
        for b in range(CB):
            with m.If(avs[sst] & ~av_mode & (addr6[0:lgcb] == b)):
                m.d.sync += [sacc[b * L + k].eq(sums[k].value) for k in range(L)]
        acc_busy = Cat(avs).any()
        # scores: the reduce tree of each row, streamed in bit-reversed lane order
        tbuf = [Signal(32, name=f"tbuf{r}") for r in range(32)]
        copy = avs[sst + 1] & ~av_mode & last7
        ts = Signal(range(CB))
        ts_on = Signal()
        with m.If(copy):
            m.d.sync += [tbuf[r].eq(sacc[r]) for r in range(32)]
            m.d.sync += [ts.eq(0), ts_on.eq(1)]
        with m.Elif(ts_on):
            m.d.sync += ts.eq(ts + 1)
            with m.If(ts == CB - 1):
                m.d.sync += ts_on.eq(0)

        def bitrev5(v):
            return int(f"{v:05b}"[::-1], 2)
        lv_x = [Array(tbuf[bitrev5(t * L + k)] for t in range(CB))[ts] if CB > 1
                else tbuf[bitrev5(k)] for k in range(L)]
        lv_v = ts_on
        pr = fp.Pipe(m, one, name="red")
        serial_ph = []
        for level in range(5):
            if len(lv_x) >= 2:
                outs = [pr.fadd(Staged(lv_x[2 * k], 0), Staged(lv_x[2 * k + 1], 0))
                        for k in range(len(lv_x) // 2)]
                lv_v = fp.valid_chain(m, one, lv_v, outs[0].stage, name=f"lv{level}")[-1]
                lv_x = [o.value for o in outs]
            else:
                held = Signal(32, name=f"held{level}")
                ph = Signal(name=f"ph{level}")
                serial_ph.append(ph)
                with m.If(lv_v):
                    m.d.sync += ph.eq(~ph)
                    with m.If(~ph):
                        m.d.sync += held.eq(lv_x[0])
                o = pr.fadd(Staged(held, 0), Staged(lv_x[0], 0))
                lv_v = fp.valid_chain(m, one, lv_v & ph, o.stage, name=f"lv{level}")[-1]
                lv_x = [o.value]
        red_v, red_y = lv_v, lv_x[0]      # the row's reduce_sum (RMSNORM: the sum of squares)
        scaled = pr.fmul(Staged(lv_x[0], 0), Staged(scale, 0))
        sv = fp.valid_chain(m, one, lv_v, scaled.stage, name="scv")
        m.d.comb += [sc_out_v.eq(sv[-1]), sc_out.eq(scaled.value)]
        score_busy = ts_on | Cat(sv).any()
        # final: fadd(fadd(p0, p1), fadd(p2, p3)) per element -> writer
        tree_in_v = Signal()
        tree_ce = Signal()
        pt = fp.Pipe(m, tree_ce, name="tree")
        rows = Signal(18)                 # ATTN rows (S + 1); partials rows..3 stay +0
        # at_n elements per cycle (the largest power of two <= L dividing hd): lane k takes
        # element tree_d + k of the partials' beat tree_d // L
        at_n = Signal(range(L + 1))
        tsums = []
        for k in range(L):
            tsel = (tree_d[0:lgl] + k)[0:lgl] if L > 1 else C(0, 1)
            tp = [pt.input(Mux(rows > j, Array(rp_.data[32 * q:32 * q + 32] for q in range(L))[tsel], 0))
                  for j, (_, rp_) in enumerate(pms)]
            tsums.append(pt.fadd(pt.fadd(tp[0], tp[1]), pt.fadd(tp[2], tp[3])))
        tce, tree_valid = fp.stall_control(m, tree_in_v, wi_ready, tsums[0].stage, name="tree")
        m.d.comb += tree_ce.eq(tce)
        tree_y = [t.value for t in tsums]

        # ---- SFU output -> post stage (ATTN's softmax, KVROW's recip); direct feed -> post
        # stage (KVROW)
        use_sfu = Signal()
        m.d.comb += sm_in_v.eq(to_sbuf & post_valid)
        d_valid = Signal()
        d_x = Signal(32)
        d_s1 = Signal(32)
        d_mode = Signal()
        with m.If(use_sfu):
            m.d.comb += [pv.eq(sfu.o.valid), px.eq(sfu.o.payload.y0),
                         px1.eq(sfu.o.payload.y1), ps1.eq(scale), pmode.eq(0),
                         ppair.eq(is_rope), sfu.o.ready.eq(post_ce)]
            if CH:
                with m.If(from_kv):             # KVROW: fmul(recip(amax), 127)
                    m.d.comb += [ps1.eq(F127), pmode.eq(1)]
        with m.Else():
            m.d.comb += [pv.eq(d_valid), px.eq(d_x), ps1.eq(d_s1),
                         pmode.eq(d_mode), ppair.eq(0)]

        # ---- RMSNORM, second pass: y = fmul(fmul(x, r), w), L elements per cycle (a stalling
        # pipeline of 2L multipliers into the writer). The first pass (ss = reduce_sum(x*x))
        # runs on the ATTN score datapath, r = rsqrt(ss * (1/n) + eps) on the SFU.
        rms_r = Signal(32)
        r2_in_v = Signal()
        r2_cnt_in = Signal(range(L + 1))
        r2_ce = Signal()
        p2 = fp.Pipe(m, r2_ce, name="r2")
        r_s = p2.input(rms_r)
        r2_out = [p2.fmul(p2.fmul(p2.input(sa.bytes[32 * k:32 * k + 32]), r_s),
                          p2.input(sb.bytes[32 * k:32 * k + 32])) for k in range(L)]
        r2_lat = r2_out[0].stage
        r2_y = [v.value for v in r2_out]
        r2_cnt = p2.at(p2.input(r2_cnt_in), r2_lat)
        ce2, r2_valid = fp.stall_control(m, r2_in_v, wi_ready, r2_lat, name="r2")
        m.d.comb += r2_ce.eq(ce2)

        # ---- ROPE: L elements (L/2 pairs) per cycle: y0 = x0 c - x1 s, y1 = x0 s + x1 c.
        # EMBED (emb_on) shares its 2L multipliers and L adders: element k of a beat is
        # fmul(q_k, d) (+ m for Q4_1): pair q's products become q_2q*d, 1*(-m), q_2q+1*d, 1*m,
        # so y0 = fsub(q d, -m) = fadd(q d, m) and y1 = fadd(q d, m); without m the second
        # products are +0 and -0: fsub(p, +0) = fadd(p, -0) = p for every p (-0 included),
        # the golden model's fmul alone.
        rp_in_v = Signal()
        rp_cnt_in = Signal(range(L + 1))
        rp_ce = Signal()
        emb_on = Signal()
        emb_q = [Signal(32, name=f"embq{k}") for k in range(L)]
        emb_d = Signal(32)
        emb_mn = Signal(32)              # -m (Q4_1) or +0
        emb_mp = Signal(32)              # m (Q4_1) or -0
        pq = fp.Pipe(m, rp_ce, name="rope")
        rp_y = []
        ONE = fp.f32_bits(1.0)
        for q in range(HP):
            x0 = sa.bytes[64 * q:64 * q + 32]
            x1 = sa.bytes[64 * q + 32:64 * q + 64]
            cq, sq = t_cos[q], t_sin[q]
            e = emb_on
            p1 = pq.fmul(pq.input(Mux(e, emb_q[2 * q], x0)), pq.input(Mux(e, emb_d, cq)))
            p2 = pq.fmul(pq.input(Mux(e, ONE, x1)), pq.input(Mux(e, emb_mn, sq)))
            p3 = pq.fmul(pq.input(Mux(e, emb_q[2 * q + 1], x0)), pq.input(Mux(e, emb_d, sq)))
            p4 = pq.fmul(pq.input(Mux(e, ONE, x1)), pq.input(Mux(e, emb_mp, cq)))
            rp_y += [pq.fsub(p1, p2), pq.fadd(p3, p4)]
        rp_lat = rp_y[0].stage
        rp_y = [v.value for v in rp_y]
        rp_cnt = pq.at(pq.input(rp_cnt_in), rp_lat)
        ce3, rp_valid = fp.stall_control(m, rp_in_v, wi_ready, rp_lat, name="rope")
        m.d.comb += rp_ce.eq(ce3)

        # ---- SILU_MUL: SL lanes of fmul(silu(a), b) (hw/sfu.py's silu_pipe: the SFU's
        # exp, 1 + e, the recip-only Newton steps, * x; then * b), a stalling pipeline into
        # the writer
        SL = self.silu_lanes
        si_in_v = Signal()
        si_cnt_in = Signal(range(SL + 1))
        si_ce = Signal()
        psi = fp.Pipe(m, si_ce, name="silu")
        si_y = [psi.fmul(silu_pipe(psi, psi.input(sa.bytes[32 * k:32 * k + 32])),
                         psi.input(sb.bytes[32 * k:32 * k + 32])) for k in range(SL)]
        si_lat = si_y[0].stage
        si_y = [v.value for v in si_y]
        si_cnt = psi.at(psi.input(si_cnt_in), si_lat)
        ce5, si_valid = fp.stall_control(m, si_in_v, wi_ready, si_lat, name="silu")
        m.d.comb += si_ce.eq(ce5)

        # ---- SOFTMAX (chains): s = fmul(a, scale) on L multipliers (a pipeline stalling on
        # VecSoftmax's input, whose ready does not depend on its valid) into VecSoftmax
        if CH:
            m.submodules.vsm = vsm = VecSoftmax(lanes=L, max_len=self._max_len, pad32=True)
            sm_in_v = Signal()
            sm_cnt_in = Signal(range(L + 1))
            sm_last_in = Signal()
            sm_ce = Signal()
            psm = fp.Pipe(m, sm_ce, name="smin")
            s_sc = psm.input(scale)
            sm_y = [psm.fmul(psm.input(sa.bytes[32 * k:32 * k + 32]), s_sc) for k in range(L)]
            sm_lat = sm_y[0].stage
            ce4, sm_valid = fp.stall_control(m, sm_in_v, vsm.i.ready, sm_lat, name="smin")
            m.d.comb += [sm_ce.eq(ce4), vsm.i.valid.eq(sm_valid),
                         vsm.i.payload.count.eq(psm.at(psm.input(sm_cnt_in), sm_lat)),
                         vsm.i.payload.last.eq(psm.at(psm.input(sm_last_in), sm_lat))]
            m.d.comb += [vsm.i.payload.data[k].eq(sm_y[k].value) for k in range(L)]

        # ---- QUANT output: q words of each block, then d[nb], then sumq[nb]
        qw = Signal(4)
        qblk = Signal(12)
        qphase = Signal(2)
        qv = data.View(data.ArrayLayout(32, 8), quant.o.payload.q.as_value())
        m.d.comb += qrp.addr.eq(qblk >> lgl)
        q_left = Signal(12)                      # d / sumq words still to write
        m.d.comb += q_left.eq(nb - qblk)
        with m.If(from_quant):
            with m.Switch(qphase):
                with m.Case(0):
                    m.d.comb += [wi_valid.eq(quant.o.valid), wi_n.eq(L)]
                    m.d.comb += [wi_x[j].eq(Array(qv)[(qw + j)[0:3]]) for j in range(L)]
                    with m.If(quant.o.valid & wi_ready):
                        m.d.sync += qw.eq(qw + L)
                        with m.If(qw + L == 8):
                            m.d.comb += [quant.o.ready.eq(1),
                                         qwp.en.eq(C(1, L) << (qblk[0:lgl] if L > 1 else 0)),
                                         qwp.addr.eq(qblk >> lgl),
                                         qwp.data.eq(Cat(quant.o.payload.d,
                                                         quant.o.payload.sumq).replicate(L))]
                            m.d.sync += [qw.eq(0), qblk.eq(qblk + 1)]
                            with m.If(qblk + 1 == nb):
                                m.d.sync += [qblk.eq(0), qphase.eq(1)]
                with m.Case(1, 2):
                    # up to L words a cycle: the d (phase 1) or sumq (2) of blocks qblk ..,
                    # never past the end of qblk's entry (one read), of the packer's line
                    # (pk_k + wi_n <= W) or of the array
                    qoff = qblk[0:lgl] if L > 1 else C(0, 1)
                    c1 = Signal(range(L + 1))
                    c2 = Signal(range(L + 1))
                    q_n = Signal(range(L + 1))
                    room = W - pk_k
                    m.d.comb += [c1.eq(L - qoff), c2.eq(Mux(room < c1, room, c1)),
                                 q_n.eq(Mux(q_left < c2, q_left, c2))]
                    m.d.comb += [wi_valid.eq(1), wi_n.eq(q_n)]
                    words = [Mux(qphase == 1, qrp.data[64 * j:64 * j + 32], qrp.data[64 * j + 32:64 * j + 64])
                             for j in range(L)]
                    m.d.comb += [wi_x[j].eq(Array(words)[(qoff + j)[0:lgl]] if L > 1 else words[0])
                                 for j in range(L)]
                    with m.If(wi_ready):
                        m.d.sync += qblk.eq(qblk + q_n)
                        with m.If(q_left == q_n):
                            m.d.sync += [qblk.eq(0), qphase.eq(qphase + 1)]
        with m.Elif(from_attn):
            m.d.comb += [wi_valid.eq(tree_valid), wi_n.eq(at_n)]
            m.d.comb += [wi_x[k].eq(tree_y[k]) for k in range(L)]
        with m.Elif(from_rms):
            m.d.comb += [wi_valid.eq(r2_valid), wi_n.eq(r2_cnt)]
            m.d.comb += [wi_x[k].eq(r2_y[k]) for k in range(L)]
        with m.Elif(from_rope):                  # ROPE and EMBED
            m.d.comb += [wi_valid.eq(rp_valid), wi_n.eq(rp_cnt)]
            m.d.comb += [wi_x[k].eq(rp_y[k]) for k in range(L)]
        with m.Elif(from_silu):
            m.d.comb += [wi_valid.eq(si_valid), wi_n.eq(si_cnt)]
            m.d.comb += [wi_x[k].eq(si_y[k]) for k in range(SL)]
        with m.Elif(from_copy):                  # COPY: up to L words of a row per cycle
            m.d.comb += [wi_valid.eq(cp_v), wi_n.eq(cp_n), sa.size.eq(cp_n << 2),
                         sa.take.eq(cp_v & wi_ready)]
            m.d.comb += [wi_x[k].eq(sa.bytes[32 * k:32 * k + 32]) for k in range(L)]
        if CH:
            with m.Elif(from_sm):
                m.d.comb += [wi_valid.eq(vsm.o.valid), wi_n.eq(L), vsm.o.ready.eq(wi_ready)]
                m.d.comb += [wi_x[k].eq(vsm.o.payload.data[k]) for k in range(L)]
            with m.Elif(from_kv):
                pass
        with m.Else():
            m.d.comb += [wi_valid.eq(post_valid), wi_x0.eq(y), wi_x1.eq(y1), wi_n.eq(Mux(pair_o, 2, 1))]

        # ---- KVROW (chains): byte items (address, byte) -> one pending line -> wr
        if CH:
            P, SB = self._slices, self._stripe
            lgp, lgs = exact_log2(P), exact_log2(SB)
            bi_valid = Signal()
            bi_addr = Signal(32)
            bi_data = Signal(8)
            bi_ready = Signal()
            cl_v = Signal()
            cl_line = Signal(self._ab)
            cl_be = Signal(D)
            cl_b = [Signal(8, name=f"cl_b{k}") for k in range(D)]
            cl_flush = Signal()
            it_line = bi_addr[lgd:lgd + self._ab]
            it_off = bi_addr[0:lgd]
            same = cl_v & (cl_line == it_line)
            with m.If(from_kv):
                m.d.comb += [wr.valid.eq(cl_v & ((bi_valid & ~same) | cl_flush)),
                             wr.payload.addr.eq(cl_line), wr.payload.data.eq(Cat(*cl_b)),
                             wr.payload.be.eq(cl_be)]
            m.d.comb += bi_ready.eq(~cl_v | same | (wr.ready & ~cl_flush))
            with m.If(bi_valid & bi_ready):
                for k in range(D):
                    with m.If(it_off == k):
                        m.d.sync += cl_b[k].eq(bi_data)
                m.d.sync += [cl_v.eq(1), cl_line.eq(it_line),
                             cl_be.eq(Mux(same, cl_be, 0) | (1 << it_off))]
            with m.Elif(cl_flush & wr.ready):
                m.d.sync += cl_v.eq(0)

            def lay(o, p):
                """Offset of byte ``o`` of slice ``p``'s stream of a slice-major tile."""
                if P == 1:
                    return o
                return (((o >> lgs) << (lgs + lgp)) | (p << lgs) | o[0:lgs])

            # the KV region (compiler/isa.py kv_region) of head dim n at position rv
            kv_nb = n >> 5
            kv_ti = rv[5:17]
            kv_r = rv[0:5]
            kv_nt = Signal(12)
            kv_ktile = Signal(24)
            kv_vtile = Signal(24)
            kv_rb = Signal(16)                   # K row bytes: 34 per block
            kv_kbase = Signal(32)
            kv_vbase = Signal(32)
            kv_sbase = Signal(32)
            kv_ko = Signal(24)                   # stream offset of the K row's next byte
            kv_t1 = Signal(32)
            kv_t2 = Signal(32)
            kv_t3 = Signal(32)

            def ceil_s(x):
                return (x + (SB - 1)) & ~(SB - 1)
            if P == 1:
                ktile_e = kv_nb * (TILE * 34)
                vtile_e = n * 34
            else:
                ktile_e = ceil_s(kv_nb * ((TILE // P) * 34)) << lgp
                vtile_e = ceil_s((n >> lgp) * 34) << lgp
            # K row: the quantizer's blocks -> f16 d (2 bytes) + 32 q bytes each
            kq_bj = Signal(6)
            kq_blk = Signal(8)
            kq_done = Signal()
            kq_h = fp.f32_to_f16(m, quant.o.payload.d, name="kvd16")
            kq_q = Array(quant.o.payload.q[k].as_unsigned() for k in range(32))
            kq_byte = Mux(kq_bj == 0, kq_h[0:8], Mux(kq_bj == 1, kq_h[8:16],
                                                      kq_q[(kq_bj - 2)[0:5]]))
            kq_on = from_kv & ~kq_done & quant.o.valid
            kv_amax = Signal(31)
            kv_dv = Signal(32)
            kv_inv = Signal(32)
            kv_row = Signal(16)                  # V: the row (dim) being written
            kv_sc = Signal(2)
            vrow_o = (kv_row >> lgp) * 34
            vj = kv_r + 2                        # V: the q byte of row kv_row's block
            vq = rne_clamp127(m, y, name="kvq")
            v_item = Signal()                    # the sequencer emits V items
            s_item = Signal()                    # the sequencer emits the scale's bytes
            with m.If(kq_on):
                m.d.comb += [bi_valid.eq(1), bi_data.eq(kq_byte),
                             bi_addr.eq(kv_kbase + lay(kv_ko, kv_r[0:lgp] if P > 1 else 0))]
                with m.If(bi_ready):
                    m.d.sync += [kq_bj.eq(kq_bj + 1), kv_ko.eq(kv_ko + 1)]
                    with m.If(kq_bj == 33):
                        m.d.comb += quant.o.ready.eq(1)
                        m.d.sync += [kq_bj.eq(0), kq_blk.eq(kq_blk + 1)]
                        with m.If(kq_blk + 1 == kv_nb):
                            m.d.sync += kq_done.eq(1)
            with m.Elif(v_item):
                m.d.comb += [bi_valid.eq(post_valid),
                             bi_data.eq(vq.as_unsigned()),
                             bi_addr.eq(kv_vbase + lay(vrow_o + vj, kv_row[0:lgp] if P > 1 else 0)),
                             kv_wr.eq(bi_ready)]
            with m.Elif(s_item):
                m.d.comb += [bi_valid.eq(1), bi_addr.eq(kv_sbase + kv_sc),
                             bi_data.eq(Array(kv_dv[8 * k:8 * k + 8] for k in range(4))[kv_sc])]

        # ---- the sequencer
        fcnt = Signal(34)           # elements fed
        ftot = Signal(34)
        tcnt = Signal(16)
        # EMBED: the block being dequantized (blk, valid bv) and the next one (blk2, b2v),
        # collected a window (WN bytes) per cycle meanwhile
        blk = [Signal(8, name=f"blk{k}") for k in range(34)]
        blk2 = [Signal(8, name=f"blk2_{k}") for k in range(34)]
        bv = Signal()
        b2v = Signal()
        ccol = Signal(12)           # blocks collected
        bcnt = Signal(range(-(-34 // WN) + 1))      # window of the block being collected
        ecnt = Signal(6)
        sent = Signal(4)
        a_bytes = Signal(34)
        b_bytes = Signal(34)
        use_b = Signal()
        done_r = Signal()
        nh = misc.n[0:8]
        hd = misc.aux[0:15]
        cached = misc.aux[15]
        ncache = Signal(18)
        # ATTN heads: hs the next to score, hm the next to softmax, hv the next to AV
        hs = Signal(8)
        hm = Signal(8)
        hv = Signal(8)
        jcnt = Signal(18)
        dcnt = Signal(16)
        m.d.comb += self.done.eq(done_r)

        def issue(k, rd, al, ser, addr, nbytes, en):
            off = addr[0:lgd]
            m.d.comb += [rd.cmd.valid.eq(~sent[k] & en), rd.cmd.payload.line.eq(addr >> lgd),
                         rd.cmd.payload.count.eq((off + nbytes + D - 1) >> lgd),
                         al.cmd.valid.eq(~sent[k + 1] & en), al.cmd.payload.s_off.eq(off),
                         al.cmd.payload.d_off.eq(0), al.cmd.payload.n.eq(nbytes)]
            with m.If(rd.cmd.valid & rd.cmd.ready):
                m.d.sync += sent[k].eq(1)
            with m.If(al.cmd.valid & al.cmd.ready):
                m.d.sync += sent[k + 1].eq(1)
            ok = ((sent[k] | ~en | rd.cmd.ready) & (sent[k + 1] | ~en | al.cmd.ready))
            return ok, ser.restart(Mux(en, nbytes, 0))

        # ATTN element source: beat kb of a row carries elements kd = kb*L .. kd+L-1 (cache rows
        # binary16; the current row binary32 rounded to binary16), n_el of them from the stream
        kb = Signal(16)
        kd = Signal(17)
        rem = Signal(signed(18))
        n_el = Signal(range(L + 1))
        vlen = Mux(is_rms, n, hd)             # elements per row: ATTN head dim, RMSNORM n
        m.d.comb += [kd.eq(kb << lgl), rem.eq(vlen - kd), n_el.eq(Mux(rem > L, L, rem))]
        from_cache = jcnt < ncache
        els = []
        for k in range(L):
            c16 = fp.f32_to_f16(m, sb.bytes[32 * k:32 * k + 32], name=f"cur16_{k}")
            h16 = Mux(from_cache, sa.bytes[16 * k:16 * k + 16], c16)
            els.append(fp.f16_to_f32(m, h16, name=f"kv32_{k}"))
        kv_ok = Mux(from_cache, sa.avail, sb.avail)
        nbs = ((vlen + 31) >> 5) << lgcb      # score beats per row (whole 32-element chunks)
        nbv = (vlen + L - 1) >> lgl           # AV (RMSNORM pass 2) beats per row

        def kv_take(go, data_beat, nbeats):
            m.d.comb += [sa.size.eq(n_el << 1), sb.size.eq(n_el << 2),
                         sa.take.eq(go & data_beat & from_cache),
                         sb.take.eq(go & data_beat & ~from_cache), mv.eq(go)]
            m.d.comb += [m_x[k].eq(els[k]) for k in range(L)]
            lastk = kb + 1 == nbeats
            with m.If(go):
                m.d.sync += kb.eq(Mux(lastk, 0, kb + 1))
                with m.If(lastk):
                    m.d.sync += jcnt.eq(jcnt + 1)
            return go & lastk & (jcnt + 1 == rows)
        m.d.sync += done_r.eq(0)

        with m.FSM(name="seq") as seq_fsm:
            self._seq_fsm = seq_fsm         # (tests: the sequencer state)
            with m.State("IDLE"):
                m.d.comb += self.instr.ready.eq(1)
                with m.If(self.instr.valid):
                    iw = data.View(Instruction, self.instr.payload.word)
                    f = iw.misc.func
                    nn = iw.misc.n
                    if CH:
                        nn = iw.misc.n + Mux((f == MiscFunc.QUANT) | (f == MiscFunc.SOFTMAX),
                                             self.instr.payload.rval, 0)
                    ax = iw.misc.aux
                    rv_in = self.instr.payload.rval
                    if CH:          # KVROW's position is R[reg] + aux (prefill: token t's row)
                        rv_in = rv_in + Mux(f == MiscFunc.KVROW, ax, 0)
                    m.d.sync += [rv.eq(rv_in), hs.eq(0), hm.eq(0), hv.eq(0),
                                 sc_bank.eq(0)]
                    m.d.sync += [word.eq(self.instr.payload.word), sent.eq(0), fcnt.eq(0),
                                 tcnt.eq(0), bcnt.eq(0), ecnt.eq(0), ridx.eq(0), qw.eq(0),
                                 bv.eq(0), b2v.eq(0), ccol.eq(0),
                                 qblk.eq(0), qphase.eq(0), pk_k.eq(0), seg_i.eq(0)]
                    empty = ((nn == 0) | ((f == MiscFunc.ROPE) & (ax == 0))
                             | ((f == MiscFunc.QUANT) & (nn[5:] == 0))
                             | ((f == MiscFunc.EMBED) & (nn[5:] == 0))
                             | ((f == MiscFunc.ATTN) & (nn[0:8] == 0)))
                    known = Cat(f == getattr(MiscFunc, x)
                                for x in SFU_FUNCS + (CHAINS_FUNCS if CH else ())).any()
                    with m.If((iw.header.op != Op.MISC) | ~known | empty):
                        m.d.sync += done_r.eq(1)
                    with m.Else():
                        m.next = "CONST"
            with m.State("CONST"):
                m.d.comb += const_req.eq(1)
                with m.If(self.rd1.req.ready):
                    m.next = "CONSTW"
            with m.State("CONSTW"):
                m.d.comb += const_wait.eq(1)
                tab_hit = tab_v & (tab_b == misc.b) & (tab_n == aux)
                if self._cache_below is not None:
                    # tables in the banked region are never kept: the load engine's per-port
                    # writes there do not show on snoop
                    tab_hit = tab_hit & (misc.b + (aux << 2) <= self._cache_below)
                nw = Signal(34)
                m.d.comb += nw.eq(Mux(is_rope, n * aux, Mux(is_copy, n * reps, n)))
                # ATTN's final tree: hd even, so at least 2 elements per cycle
                at_sel = C(1, 1)
                for lanes in [1 << i for i in range(1, lgl + 1)]:
                    at_sel = Mux(hd[0:exact_log2(lanes)] == 0, lanes, at_sel)
                m.d.sync += at_n.eq(at_sel if L > 1 else 1)
                m.d.sync += [
                    a_bytes.eq(Mux(is_emb, nb * bs, nw << 2)),
                    b_bytes.eq(Mux(is_rope, aux << 2, n << 2)),
                    use_b.eq(is_rms | is_silu | (is_rope & ~tab_hit)),
                    rope_cached.eq(is_rope & tab_hit),
                    use_sfu.eq(is_attn),
                    from_attn.eq(is_attn), to_sbuf.eq(is_attn), from_rms.eq(is_rms),
                    from_rope.eq(is_rope | is_emb), from_silu.eq(is_silu),
                    from_copy.eq(is_copy),
                    ncache.eq(rv + misc.n[8:16] + cached),
                    rows.eq(rv + misc.n[8:16] + 1),
                    from_quant.eq(is_q),
                    ftot.eq(Mux(is_rope, nw >> 1, Mux(is_emb, nb, nw))),
                    nseg.eq(Mux(is_copy, reps, 1)),
                    seg_w.eq(Mux(is_attn, nh * hd, Mux(is_q, nb * 10, Mux(is_copy, n, nw)))),
                    seg_left.eq(Mux(is_attn, nh * hd, Mux(is_q, nb * 10, Mux(is_copy, n, nw)))),
                    seg_stride.eq(misc.b << 2),
                    seg_dst.eq(misc.dst),
                ]
                if CH:
                    pad32 = ((n + 31) >> 5) << 5
                    with m.If(is_sm):
                        m.d.sync += [seg_w.eq(pad32), seg_left.eq(pad32)]
                    with m.If(is_kv):
                        m.d.sync += a_bytes.eq(n << 3)
                    m.d.sync += [from_sm.eq(is_sm), from_kv.eq(is_kv)]
                m.next = "START"
            with m.State("START"):
                a_off, b_off = misc.a[0:lgd], misc.b[0:lgd]
                cmds = [
                    (rda.cmd, ~is_attn, [rda.cmd.payload.line.eq(misc.a >> lgd),
                                        rda.cmd.payload.count.eq((a_off + a_bytes + D - 1) >> lgd)]),
                    (ala.cmd, ~is_attn, [ala.cmd.payload.s_off.eq(a_off), ala.cmd.payload.d_off.eq(0),
                                        ala.cmd.payload.n.eq(a_bytes)]),
                    (rdb.cmd, use_b, [rdb.cmd.payload.line.eq(misc.b >> lgd),
                                      rdb.cmd.payload.count.eq((b_off + b_bytes + D - 1) >> lgd)]),
                    (alb.cmd, use_b, [alb.cmd.payload.s_off.eq(b_off), alb.cmd.payload.d_off.eq(0),
                                      alb.cmd.payload.n.eq(b_bytes)]),
                ]
                for k, (s, en, sets) in enumerate(cmds):
                    m.d.comb += [s.valid.eq(~sent[k] & en)] + sets
                    with m.If(s.valid & s.ready):
                        m.d.sync += sent[k].eq(1)
                with m.If(Cat(sent[k] | ~en | (s.valid & s.ready)
                              for k, (s, en, _) in enumerate(cmds)).all()):
                    m.d.sync += sa.restart(a_bytes) + sb.restart(Mux(use_b, b_bytes, 0))
                    m.d.comb += w_go.eq(~is_kv if CH else 1)
                    m.d.sync += sent.eq(0)
                    with m.If(is_attn):
                        m.next = "AQ"
                    if CH:
                        with m.Elif(is_sm):
                            m.next = "SMF"
                        with m.Elif(is_kv):
                            m.next = "KV0"
                    with m.Elif(is_rope & rope_cached):
                        m.d.sync += [kb.eq(0), ridx.eq(0)]
                        m.next = "ROPEF"
                    with m.Elif(is_rope):
                        m.d.sync += [tab_v.eq(0), tab_dirty.eq(0), tab_b.eq(misc.b),
                                     tab_n.eq(aux), tab_lo.eq(misc.b >> lgd),
                                     tab_hi.eq((misc.b + (aux << 2) - 1) >> lgd)]
                        m.next = "TABLE"
                    with m.Elif(is_emb):
                        m.next = "EMB"
                    with m.Elif(is_rms):
                        m.d.sync += [kb.eq(0), av_mode.eq(0)]
                        m.next = "RMS1"
                    with m.Else():
                        m.next = "FEED"
            with m.State("TABLE"):
                is_sin = tcnt >= half
                m.d.comb += [sb.size.eq(4), sb.take.eq(sb.avail)]
                for wp_, sel in ((tcw, ~is_sin), (tsw, is_sin)):
                    m.d.comb += [wp_.en.eq(sb.avail & sel), wp_.data.eq(b_word),
                                 wp_.addr.eq(Mux(is_sin, tcnt - half, tcnt))]
                with m.If(sb.avail):
                    m.d.sync += tcnt.eq(tcnt + 1)
                    with m.If(tcnt + 1 == aux):
                        m.d.sync += [kb.eq(0), ridx.eq(0), tab_v.eq(~tab_dirty & ~tab_snoop)]
                        m.next = "ROPEF"
            with m.State("ROPEF"):
                # L elements per beat over the whole stream (a beat may hold pairs of two rows)
                ok = sa.avail
                r_left = (ftot << 1) - fcnt
                ne = Signal(range(L + 1))
                m.d.comb += ne.eq(Mux(r_left > L, L, r_left))
                m.d.comb += [sa.size.eq(ne << 2), rp_in_v.eq(ok), rp_cnt_in.eq(ne),
                             sa.take.eq(ok & rp_ce)]
                with m.If(ok & rp_ce):
                    m.d.sync += [ridx.eq(ridx_next), fcnt.eq(fcnt + ne)]
                    with m.If(fcnt + ne == (ftot << 1)):
                        m.next = "DRAIN"
            with m.State("FEED"):
                with m.If(is_q):
                    last = fcnt + L == ftot
                    m.d.comb += [sa.size.eq(4 * L), quant.i.valid.eq(sa.avail),
                                 quant.i.payload.eq(sa.bytes[0:32 * L]),
                                 sa.take.eq(sa.avail & quant.i.ready)]
                    with m.If(sa.avail & quant.i.ready):
                        m.d.sync += fcnt.eq(fcnt + L)
                        with m.If(last):
                            m.next = "DRAIN"
                with m.Elif(is_silu):            # SL elements of a and b per beat
                    s_left = ftot - fcnt
                    sne = Signal(range(SL + 1))
                    m.d.comb += sne.eq(Mux(s_left > SL, SL, s_left))
                    ok = sa.avail & sb.avail
                    m.d.comb += [sa.size.eq(sne << 2), sb.size.eq(sne << 2), si_in_v.eq(ok),
                                 si_cnt_in.eq(sne), sa.take.eq(ok & si_ce),
                                 sb.take.eq(ok & si_ce)]
                    with m.If(ok & si_ce):
                        m.d.sync += fcnt.eq(fcnt + sne)
                        with m.If(s_left <= SL):
                            m.next = "DRAIN"
                with m.Else():                   # COPY: up to L words of the row (tcnt) per beat
                    row_left = n - tcnt
                    m.d.comb += [cp_n.eq(Mux(row_left > L, L, row_left)), cp_v.eq(sa.avail),
                                 sa.size.eq(cp_n << 2), sa.take.eq(sa.avail & wi_ready)]
                    with m.If(sa.avail & wi_ready):
                        m.d.sync += [fcnt.eq(fcnt + cp_n),
                                     tcnt.eq(Mux(tcnt + cp_n == n, 0, tcnt + cp_n))]
                        with m.If(fcnt + cp_n == ftot):
                            m.next = "DRAIN"
            # ---- RMSNORM: ss on the L-lane reduce datapath; r on the SFU; y = (x * r) * w
            with m.State("RMS1"):
                data_beat = kd < n
                go = ~data_beat | sa.avail
                m.d.comb += [sa.size.eq(n_el << 2), sa.take.eq(go & data_beat), mv.eq(go),
                             m_first.eq(kb < CB), m_addr.eq(kb), m_last.eq(kb + 1 == nbs),
                             m_mask.eq(Cat(*((kd + k) < n for k in range(L))))]
                m.d.comb += [m_a[k].eq(sa.bytes[32 * k:32 * k + 32]) for k in range(L)]
                m.d.comb += [m_x[k].eq(sa.bytes[32 * k:32 * k + 32]) for k in range(L)]
                with m.If(go):
                    m.d.sync += kb.eq(kb + 1)
                    with m.If(kb + 1 == nbs):
                        m.d.sync += kb.eq(0)
                        m.next = "RMS_SS"
            with m.State("RMS_SS"):
                with m.If(red_v):
                    m.d.sync += rms_r.eq(red_y)
                    m.next = "RMS_R"
            with m.State("RMS_R"):
                m.d.comb += [sfu.i.valid.eq(1), sfu.i.payload.op.eq(SfuOp.RMS_SCALAR),
                             sfu.i.payload.a.eq(rms_r), sfu.i.payload.c.eq(inv_n),
                             sfu.i.payload.d.eq(eps), sfu.i.payload.last.eq(1)]
                with m.If(sfu.i.ready):
                    m.next = "RMS_RW"
            with m.State("RMS_RW"):
                m.d.comb += sfu.o.ready.eq(1)
                with m.If(sfu.o.valid):
                    m.d.sync += rms_r.eq(sfu.o.payload.y0)
                    m.next = "RMS_X"
            with m.State("RMS_X"):
                ok, sets = issue(0, rda, ala, sa, misc.a, n << 2, C(1, 1))
                with m.If(ok):
                    m.d.sync += sets + [sent.eq(0), kb.eq(0)]
                    m.next = "RMS2"
            with m.State("RMS2"):
                ok = sa.avail & sb.avail
                m.d.comb += [sa.size.eq(n_el << 2), sb.size.eq(n_el << 2), r2_in_v.eq(ok),
                             r2_cnt_in.eq(n_el), sa.take.eq(ok & r2_ce), sb.take.eq(ok & r2_ce)]
                with m.If(ok & r2_ce):
                    m.d.sync += kb.eq(kb + 1)
                    with m.If(kb + 1 == nbv):
                        m.next = "DRAIN"
            with m.State("EMB"):
                # collector: the next block, a window of up to WN bytes per cycle, into blk2
                c_left = bs - bcnt * WN
                csz = Signal(range(WN + 1))
                m.d.comb += csz.eq(Mux(c_left > WN, WN, c_left))
                c_go = ~b2v & (ccol != ftot) & sa.avail
                m.d.comb += [sa.size.eq(csz), sa.take.eq(c_go)]
                with m.If(c_go):
                    for c in range(-(-34 // WN)):
                        with m.If(bcnt == c):
                            m.d.sync += [blk2[c * WN + k].eq(sa.bytes[8 * k:8 * k + 8])
                                         for k in range(min(WN, 34 - c * WN))]
                    m.d.sync += bcnt.eq(bcnt + 1)
                    with m.If(c_left <= WN):
                        m.d.sync += [bcnt.eq(0), b2v.eq(1), ccol.eq(ccol + 1)]
                # emitter: L elements of blk per beat through the ROPE pipeline (emb_on):
                # element j = ecnt + k is fmul(q_j, d) (+ m)
                beat = ecnt[lgl:5]
                for k in range(L):
                    cands = []
                    for b in range(32 // L):
                        jj = b * L + k
                        lo = blk[2 + jj % 16]
                        hi = blk[4 + jj % 16]
                        n0 = lo[4:8] if jj >= 16 else lo[0:4]
                        n1 = hi[4:8] if jj >= 16 else hi[0:4]
                        cands.append(Mux(fmt == 0, Cat(n0, C(0, 4)).as_signed() - 8,
                                         Mux(fmt == 1, Cat(n1, C(0, 4)).as_signed(),
                                             blk[2 + jj].as_signed())))
                    qk = Signal(signed(9), name=f"embi{k}")
                    m.d.comb += qk.eq(Array(cands)[beat] if len(cands) > 1 else cands[0])
                    m.d.comb += emb_q[k].eq(_small_int_to_f32(m, qk, name=f"embf{k}"))
                dd = fp.f16_to_f32(m, Cat(blk[0], blk[1]), name="embd")
                mm = fp.f16_to_f32(m, Cat(blk[2], blk[3]), name="embm")
                m.d.comb += [emb_on.eq(1), emb_d.eq(dd),
                             emb_mn.eq(Mux(fmt == 1, mm ^ NEG_ZERO, 0)),
                             emb_mp.eq(Mux(fmt == 1, mm, NEG_ZERO)),
                             rp_in_v.eq(bv), rp_cnt_in.eq(L)]
                with m.If(bv & rp_ce):
                    m.d.sync += ecnt.eq(ecnt + L)
                    with m.If(ecnt + L == 32):
                        m.d.sync += [ecnt.eq(0), fcnt.eq(fcnt + 1)]
                        with m.If(b2v):
                            m.d.sync += [blk[k].eq(blk2[k]) for k in range(34)]
                            m.d.sync += b2v.eq(0)
                        with m.Else():
                            m.d.sync += bv.eq(0)
                        with m.If(fcnt + 1 == ftot):
                            m.next = "DRAIN"
                with m.Elif(~bv & b2v):
                    m.d.sync += [blk[k].eq(blk2[k]) for k in range(34)]
                    m.d.sync += [b2v.eq(0), bv.eq(1)]
            # ---- ATTN, per head: q -> qh; scores (VDOT * scale) -> sbuf; softmax in place;
            # partials of sum_j a_j v_j; the partial tree -> writer
            with m.State("AQ"):
                ok, sets = issue(0, rdb, alb, sb, misc.a + ((hs * hd) << 2), hd << 2, C(1, 1))
                with m.If(ok):
                    m.d.sync += sets + [sent.eq(0), kb.eq(0), av_mode.eq(0)]
                    m.next = "AQL"
            with m.State("AQL"):
                m.d.comb += [sb.size.eq(n_el << 2), sb.take.eq(sb.avail), qh_w.en.eq(sb.avail),
                             qh_w.addr.eq(kb), qh_w.data.eq(sb.bytes[0:32 * L])]
                with m.If(sb.avail):
                    m.d.sync += kb.eq(kb + 1)
                    with m.If(kb + 1 == nbv):
                        m.d.sync += kb.eq(0)
                        m.next = "AK"
            with m.State("AK"):
                ok1, s1 = issue(0, rda, ala, sa, misc.b, (ncache * hd) << 1, ncache != 0)
                ok2, s2 = issue(2, rdb, alb, sb, misc.a + ((nh * hd) << 2), hd << 2, ~cached)
                with m.If(ok1 & ok2):
                    m.d.sync += s1 + s2 + [sent.eq(0), jcnt.eq(0), kb.eq(0), sc_widx.eq(0),
                                           sc_bank.eq(hs[0])]
                    m.next = "AKF"
            with m.State("AKF"):
                data_beat = Signal(name="data_beat")
                m.d.comb += data_beat.eq(kd < hd)
                m.d.comb += [qh_r.addr.eq(kb), m_first.eq(kb < CB), m_addr.eq(kb),
                             m_last.eq(kb + 1 == nbs),
                             m_mask.eq(Cat(*((kd + k) < hd for k in range(L))))]
                m.d.comb += [m_a[k].eq(qh_r.data[32 * k:32 * k + 32]) for k in range(L)]
                with m.If(kv_take(~data_beat | kv_ok, data_beat, nbs)):
                    m.next = "AKW"
            with m.State("AKW"):
                with m.If(sc_widx == rows):
                    m.d.sync += hs.eq(hs + 1)
                    m.next = "ANEXT"
            # the heads overlap: head h's softmax (the SFU's long latency) runs while head h+1
            # scores and head h-1 does its AV; the next phase that may start: softmax, else
            # scores, else AV
            with m.State("ANEXT"):
                sm_done = sm_widx == rows           # the last softmax issued (head hm - 1)
                m_ok = (hm < hs) & ((hm == 0) | sm_done) & (hv + 1 >= hm)
                v_ok = (hv < hm) & ((hv + 1 < hm) | sm_done)
                s_ok = (hs < nh) & (hv + 1 >= hs)
                with m.If(m_ok):
                    m.d.sync += [jcnt.eq(0), sm_widx.eq(0), sm_bank.eq(hm[0])]
                    m.next = "ASM"
                with m.Elif(s_ok):
                    m.next = "AQ"
                with m.Elif(v_ok):
                    m.next = "AV"
                with m.Elif(hv == nh):
                    m.next = "DRAIN"
            with m.State("ASM"):
                m.d.comb += [sb_raddr.eq(jcnt), sb_rbank.eq(hm[0]), sfu.i.valid.eq(1),
                             sfu.i.payload.op.eq(SfuOp.SOFTMAX), sfu.i.payload.a.eq(sb_rdata),
                             sfu.i.payload.last.eq(jcnt + 1 == rows)]
                with m.If(sfu.i.ready):
                    m.d.sync += jcnt.eq(jcnt + 1)
                    with m.If(jcnt + 1 == rows):
                        m.d.sync += hm.eq(hm + 1)
                        m.next = "ANEXT"
            with m.State("AV"):
                ok1, s1 = issue(0, rda, ala, sa, misc.b + ((self.context * hd) << 1),
                                (ncache * hd) << 1, ncache != 0)
                ok2, s2 = issue(2, rdb, alb, sb, misc.a + (((nh + 1) * hd) << 2), hd << 2,
                                ~cached)
                with m.If(ok1 & ok2):
                    m.d.sync += s1 + s2 + [sent.eq(0), jcnt.eq(0), kb.eq(0), av_mode.eq(1)]
                    m.next = "AVF"
            with m.State("AVF"):
                m.d.comb += [sb_raddr.eq(jcnt), sb_rbank.eq(hv[0]), m_first.eq(jcnt < 4),
                             m_addr.eq(kb), m_lane4.eq(jcnt[0:2]), m_mask.eq((1 << L) - 1)]
                m.d.comb += [m_a[k].eq(sb_rdata) for k in range(L)]
                with m.If(kv_take(kv_ok, C(1, 1), nbv)):
                    m.next = "AVW"
            with m.State("AVW"):
                with m.If(~acc_busy):
                    m.d.sync += dcnt.eq(0)
                    m.next = "AT"
            with m.State("AT"):
                # the tree reads the partials as it takes them: the next head may overwrite
                # them once the last is in; its outputs drain to the writer behind
                m.d.comb += [in_tree.eq(1), tree_d.eq(dcnt), tree_in_v.eq(1)]
                with m.If(tree_ce):
                    m.d.sync += dcnt.eq(dcnt + at_n)
                    with m.If(dcnt + at_n == hd):
                        m.d.sync += [hv.eq(hv + 1), sent.eq(0)]
                        m.next = "ANEXT"
            if CH:
                # ---- SOFTMAX: L elements of a per beat, s = fmul(a, scale) on L multipliers
                # into VecSoftmax (count on the last beat); its output beats (and +0.0 padding
                # up to 32k words) go to the writer (from_sm) meanwhile; DRAIN waits for them
                with m.State("SMF"):
                    s_left = ftot - fcnt
                    ne = Signal(range(L + 1))
                    m.d.comb += ne.eq(Mux(s_left > L, L, s_left))
                    m.d.comb += [sa.size.eq(ne << 2), sm_in_v.eq(sa.avail), sm_cnt_in.eq(ne),
                                 sm_last_in.eq(s_left <= L), sa.take.eq(sa.avail & sm_ce)]
                    with m.If(sa.avail & sm_ce):
                        m.d.sync += fcnt.eq(fcnt + ne)
                        with m.If(s_left <= L):
                            m.next = "DRAIN"
                # ---- KVROW: the region's addresses; K row -> quantizer -> K bytes (the K
                # emitter above); V row max|v|; d = amax/127 and 127*recip(amax) (SFU); V again:
                # a q byte per dim (MV_BT takes the blocks' d as 1.0); the scale's 4 bytes; flush
                with m.State("KV0"):
                    m.d.sync += [kv_nt.eq((self.context + 31) >> 5), kv_ktile.eq(ktile_e),
                                 kv_vtile.eq(vtile_e), kv_rb.eq(kv_nb * 34), kq_bj.eq(0),
                                 kq_blk.eq(0), kq_done.eq(0), kv_amax.eq(0), kv_row.eq(0),
                                 kv_sc.eq(0), fcnt.eq(0), use_sfu.eq(0)]
                    m.next = "KV1"
                with m.State("KV1"):
                    m.d.sync += [kv_t1.eq(kv_ti * kv_ktile), kv_t2.eq(kv_nt * kv_ktile),
                                 kv_t3.eq(kv_ti * kv_vtile), kv_sbase.eq(kv_nt * kv_vtile),
                                 kv_ko.eq((kv_r >> lgp) * kv_rb)]
                    m.next = "KV2"
                with m.State("KV2"):
                    m.d.sync += [kv_kbase.eq(misc.dst + kv_t1),
                                 kv_vbase.eq(misc.dst + kv_t2 + kv_t3),
                                 kv_sbase.eq(misc.dst + kv_t2 + kv_sbase + (rv << 2))]
                    m.next = "KVK"
                with m.State("KVK"):
                    m.d.comb += [sa.size.eq(4 * L), quant.i.valid.eq(sa.avail),
                                 quant.i.payload.eq(sa.bytes[0:32 * L]),
                                 sa.take.eq(sa.avail & quant.i.ready)]
                    with m.If(sa.avail & quant.i.ready):
                        m.d.sync += fcnt.eq(fcnt + L)
                        with m.If(fcnt + L == n):
                            m.d.sync += fcnt.eq(0)
                            m.next = "KVM"
                with m.State("KVM"):
                    mags = [sa.bytes[32 * k:32 * k + 31] for k in range(L)] + [kv_amax]
                    while len(mags) > 1:
                        nxt = []
                        for k in range(0, len(mags) - 1, 2):
                            mx = Signal(31, name=f"kvmax_{len(mags)}_{k}")
                            m.d.comb += mx.eq(Mux(mags[k] > mags[k + 1], mags[k], mags[k + 1]))
                            nxt.append(mx)
                        mags = nxt + mags[len(mags) & ~1:]
                    m.d.comb += [sa.size.eq(4 * L), sa.take.eq(sa.avail)]
                    with m.If(sa.avail):
                        m.d.sync += [kv_amax.eq(mags[0]), fcnt.eq(fcnt + L)]
                        with m.If(fcnt + L == n):
                            m.d.sync += fcnt.eq(0)
                            m.next = "KVD"
                with m.State("KVD"):
                    m.d.comb += [d_valid.eq(1), d_x.eq(Cat(kv_amax, C(0, 1))), d_s1.eq(INV127),
                                 d_mode.eq(1)]
                    with m.If(post_ce):
                        m.next = "KVDW"
                with m.State("KVDW"):
                    m.d.comb += kv_wr.eq(1)
                    with m.If(post_valid):
                        m.d.sync += kv_dv.eq(y)
                        m.next = "KVR"
                with m.State("KVR"):
                    m.d.comb += [sfu.i.valid.eq(1), sfu.i.payload.op.eq(SfuOp.RECIP),
                                 sfu.i.payload.a.eq(Cat(kv_amax, C(0, 1))),
                                 sfu.i.payload.last.eq(1)]
                    with m.If(sfu.i.ready):
                        m.d.sync += use_sfu.eq(1)
                        m.next = "KVRW"
                with m.State("KVRW"):
                    m.d.comb += kv_wr.eq(1)
                    with m.If(post_valid):
                        # a block whose d flushed to zero is a zero block (q = 0)
                        m.d.sync += [kv_inv.eq(Mux(kv_dv[0:31] != 0, y, 0)), use_sfu.eq(0)]
                        m.next = "KVVR"
                with m.State("KVVR"):
                    ok, sets = issue(0, rda, ala, sa, misc.a + (n << 2), n << 2, C(1, 1))
                    with m.If(ok):
                        m.d.sync += sets + [sent.eq(0)]
                        m.next = "KVV"
                with m.State("KVV"):
                    go = sa.avail & kq_done
                    m.d.comb += [sa.size.eq(4), d_valid.eq(go), d_x.eq(a_word), d_s1.eq(kv_inv),
                                 d_mode.eq(1), sa.take.eq(go & post_ce), v_item.eq(1)]
                    # the K row's bytes may still be going out (the byte port is the K
                    # emitter's until kq_done: write back-pressure): they are not V items
                    with m.If(kq_done & bi_valid & bi_ready):
                        m.d.sync += kv_row.eq(kv_row + 1)
                        with m.If(kv_row + 1 == n):
                            m.next = "KVS"
                with m.State("KVS"):
                    m.d.comb += s_item.eq(1)
                    with m.If(bi_ready):
                        m.d.sync += kv_sc.eq(kv_sc + 1)
                        with m.If(kv_sc == 3):
                            m.next = "KVF"
                with m.State("KVF"):
                    m.d.comb += cl_flush.eq(1)
                    with m.If(~cl_v):
                        m.d.sync += [done_r.eq(1), from_kv.eq(0)]
                        m.next = "IDLE"
            with m.State("DRAIN"):
                with m.If(w_done):
                    m.d.sync += done_r.eq(1)
                    m.next = "IDLE"
        # a write to a line of the cached ROPE table invalidates it (after the sequencer: wins)
        with m.If(tab_snoop):
            m.d.sync += [tab_v.eq(0), tab_dirty.eq(1)]
        return m
