"""The sparse DSP chain: exact int32 block dot products of weight blocks with int8 activations.

One chain consumes per cycle one *operand beat*: ``length / 32`` block lanes, each
a 32-weight block (or its N:M sparse kept weights and their indices) with the 32
int8 activations of the same block, and produces per lane the exact block sum
``isum = sum_i qw[i] * q[i]`` and ``sumq``, the sum of the activations at the
kept positions (``core.numerics.block_isum`` / ``sparse_isum`` are the spec).

Datapath (docs/hw-units.md has the pictures and numbers):

* **Routing** (sparse): kept weight ``j`` of a block goes to a fixed multiplier
  slot; a 16:1 multiplexer in front of the slot picks the activation at the
  position the 4-bit (N:16) or 2-bit (2:4) index names inside the slot's half
  block. Dense blocks use the same multiplexers with a constant select.
* **Packing** (``pack_int4``): one 27x18 multiplier (one DSP48E2) computes a
  *two-term dot product* of 4-bit weights and int8 activations::

      A = xa * 2**13 + xb          (22 bits)
      B = wb * 2**13 + wa          (18 bits: the B port)
      A * B = xa*wb * 2**26 + (xa*wa + xb*wb) * 2**13 + xb*wa

  Weights enter *unsigned* (Q4_0 ``code + 8``, Q4_1 ``q``, Q8_0 ``w + 128``), so B
  is just the two fields, and the chain subtracts ``8 * sumq`` (Q4_0) or
  ``128 * sumq`` (Q8_0) at the end (``sum (q-8)*x = sum q*x - 8 * sum x``).
  ``|xb*wa| <= 1920 < 2**12``, so bits [13, 26) of the product hold
  ``xa*wa + xb*wb`` minus a borrow that is exactly bit 12 (set iff ``xb*wa < 0``);
  the chain adds the borrows back beside its adder tree. A single row's dot product
  has no shared operand, so the classic shared-operand packing ``(a<<18 + b) * c``
  does not apply; this is its dot-product form with the same sign-borrow fix.
  Q8_0 weights (int8 x int8) use one product per DSP, through the same A/B
  formulas with ``xb = wb = 0`` (the product lands in bits [13, 29)): a dense Q8_0
  block takes two cycles on a packed chain (what ``AccelConfig.format_macs_per_cycle``
  counts; the second phase routes slots 8..15 of each half through the slot
  multiplexers); sparse Q8_0 blocks keep at most 16 weights and take one.
  The unpacked chain keeps signed weights (Q4_1 as ``q - 8``, plus ``8 * sumq``).
* **Reduction**: products are summed per 32-weight block (the break points) by a
  registered adder tree in the fabric, two adder levels per pipeline stage.
* **Back-pressure**: the pipeline never stalls; an output FIFO deep enough for
  every result in flight is reserved (credit) before a beat enters.

The operand beat carries the weight *codes as the spec gives them* (Q4_0 ``q-8``,
Q4_1 ``0..15``, Q8_0 int8), so the decoder (``hw/decoder.py``) connects straight
to the ``weights`` port.
"""


from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, fifo, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from llmfab.core.formats import BLOCK_WEIGHTS, SPARSITY_PATTERNS, WEIGHT_FORMATS, kept_weights

__all__ = [
    "WeightFormat", "Sparsity", "FORMAT_CODES", "PATTERN_CODES", "MAX_KEPT",
    "WeightLane", "ResultLane", "weight_beat_layout", "act_beat_layout",
    "result_beat_layout", "Chain", "chain_dsp_slots", "units",
]

#: Most weights a sparse block keeps (2:4 and 8:16 keep 16 of 32).
MAX_KEPT = 16
#: Position of the packed low product's borrow bit / the packed field.
PACK_SHIFT = 13
#: Exact widths of a block's sums (sign-extended to 32 bits at the output): |isum| <= 32 *
#: 128 * 128 = 2**19 (dense Q8_0, all -128), |sumq| <= 32 * 128 = 2**12.
ISUM_SHAPE = signed(21)
SUMQ_SHAPE = signed(13)


class WeightFormat(enum.Enum, shape=2):
    """Weight format of a matrix (the instruction's format field)."""
    Q4_0 = 0
    Q4_1 = 1
    Q8_0 = 2


class Sparsity(enum.Enum, shape=3):
    """Sparsity pattern of a matrix, in ``boards.config.SPARSITY_PATTERNS`` order."""
    DENSE = 0
    S2_4 = 1
    S8_16 = 2
    S4_16 = 3
    S2_16 = 4


#: Configuration names -> codes.
FORMAT_CODES = {"q4_0": WeightFormat.Q4_0, "q4_1": WeightFormat.Q4_1, "q8_0": WeightFormat.Q8_0}
PATTERN_CODES = {"dense": Sparsity.DENSE, "2:4": Sparsity.S2_4, "8:16": Sparsity.S8_16,
                 "4:16": Sparsity.S4_16, "2:16": Sparsity.S2_16}


class WeightLane(data.Struct):
    """One block of a weight beat.

    ``w[j]``: dense weight ``j``, or the ``j``-th kept weight of a sparse block
    (kept order: group by group, ascending position), as the spec gives it;
    4-bit formats use bits [3:0]. ``idx[j]``: position of kept weight ``j`` inside
    its group (2:4 uses bits [1:0]). ``d``, ``m``: the fp16 block fields (raw
    bits; ``m`` is 0 except for Q4_1). ``en``: the lane holds a block.
    """
    en: 1
    w: data.ArrayLayout(signed(8), BLOCK_WEIGHTS)
    idx: data.ArrayLayout(unsigned(4), MAX_KEPT)
    d: unsigned(16)
    m: unsigned(16)


class ResultLane(data.Struct):
    """One block result: ``isum`` and ``sumq`` (exact), ``d``/``m``/``en`` passed through."""
    en: 1
    isum: signed(32)
    sumq: signed(32)
    d: unsigned(16)
    m: unsigned(16)


def weight_beat_layout(lanes: int) -> data.StructLayout:
    """The weight part of an operand beat (what the decoder emits)."""
    return data.StructLayout({
        "fmt": WeightFormat,
        "pattern": Sparsity,
        "last": 1,
        "lanes": data.ArrayLayout(WeightLane, lanes),
    })


def act_beat_layout(lanes: int) -> data.ArrayLayout:
    """The activation part of an operand beat: 32 int8 per lane."""
    return data.ArrayLayout(data.ArrayLayout(signed(8), BLOCK_WEIGHTS), lanes)


def result_beat_layout(lanes: int) -> data.StructLayout:
    """The chain's output beat: one :class:`ResultLane` per lane."""
    return data.StructLayout({
        "fmt": WeightFormat,
        "last": 1,
        "lanes": data.ArrayLayout(ResultLane, lanes),
    })


def chain_dsp_slots(length: int, pack_int4: bool) -> int:
    """Multipliers (DSP48E2 slices) of a chain: ``length / 2`` packed, else ``length``."""
    return length // 2 if pack_int4 else length


def _check_names(kind: str, names, known) -> tuple:
    names = tuple(names)
    if not names:
        raise ValueError(f"{kind} must not be empty")
    for n in names:
        if n not in known:
            raise ValueError(f"{kind} must be among {', '.join(known)}, not {n!r}")
    return tuple(k for k in known if k in names)


# Slot geometry. A 32-weight block has 32 multiplier slots; slot s lies in half
# h = s // 16 at offset o = s % 16. A sparse block keeps K/2 weights per half
# (every pattern's groups tile a half), and kept weight j = h*K/2 + o goes to
# slot (h, o), o < K/2 <= 8: only the 16 slots with o < 8 need an index mux.
def _sparse_slots():
    return [h * 16 + o for h in range(2) for o in range(8)]


def _rest_slots():
    return [h * 16 + o for h in range(2) for o in range(8, 16)]


def _tree_stages(n: int, levels_per_stage: int = 2) -> int:
    """Registers of :func:`_pipelined_sum` over ``n`` inputs."""
    levels = ceil_log2(n)
    return max(1, -(-levels // levels_per_stage))


def _pipelined_sum(m: Module, values: list, stage_name: str, levels_per_stage: int = 2):
    """Registered adder tree: add pairwise, register every ``levels_per_stage`` levels.

    Returns ``(sum, stages)``; ``stages`` registers lie between the inputs and the sum.
    """
    stages = 0
    level = 0
    vals = list(values)
    while len(vals) > 1:
        nxt = [vals[i] + vals[i + 1] for i in range(0, len(vals) - 1, 2)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
        level += 1
        if level % levels_per_stage == 0 or len(vals) == 1:
            regs = []
            for i, v in enumerate(vals):
                r = Signal(v.shape(), name=f"{stage_name}_s{stages}_{i}", reset_less=True)
                m.d.sync += r.eq(v)
                regs.append(r)
            vals = regs
            stages += 1
    if stages == 0:                      # a single input: still one register
        r = Signal(vals[0].shape(), name=f"{stage_name}_s0", reset_less=True)
        m.d.sync += r.eq(vals[0])
        vals, stages = [r], 1
    return vals[0], stages


def _delay(m: Module, value, n: int, name: str, reset_less: bool = True):
    for i in range(n):
        r = Signal.like(value, name=f"{name}_d{i}", reset_less=reset_less)
        m.d.sync += r.eq(value)
        value = r
    return value


class Chain(wiring.Component):
    """A DSP chain of ``length`` multiply-accumulate slots with break points every 32.

    Parameters
    ----------
    length : int
        Weights per cycle (multiple of 32); ``length / 32`` block lanes.
    pack_int4 : bool
        Two 4-bit x int8 products per multiplier (half the DSP slices).
    formats : iterable of str
        Weight formats to support (``"q4_0"``, ``"q4_1"``, ``"q8_0"``).
    patterns : iterable of str
        Sparsity patterns to support (keys of ``boards.config.SPARSITY_PATTERNS``).

    Members
    -------
    weights : In(stream.Signature(weight_beat_layout(lanes)))
        Weight codes, indices, scales and the beat's format and pattern.
    acts : In(stream.Signature(act_beat_layout(lanes)))
        32 int8 activations per lane. A beat is taken when both streams are valid.
    results : Out(stream.Signature(result_beat_layout(lanes)))
        One beat per operand beat, in order.
    """

    def __init__(self, *, length: int, pack_int4: bool = True,
                 formats=tuple(WEIGHT_FORMATS), patterns=tuple(SPARSITY_PATTERNS)):
        if not isinstance(length, int) or isinstance(length, bool):
            raise TypeError(f"Chain length must be an integer, not {length!r}")
        if length < BLOCK_WEIGHTS or length % BLOCK_WEIGHTS:
            raise ValueError(f"Chain length must be a positive multiple of {BLOCK_WEIGHTS}, "
                             f"not {length}")
        if not isinstance(pack_int4, bool):
            raise TypeError(f"pack_int4 must be a bool, not {pack_int4!r}")
        self._length = length
        self._lanes = length // BLOCK_WEIGHTS
        self._pack_int4 = pack_int4
        self._formats = _check_names("Chain formats", formats, WEIGHT_FORMATS)
        self._patterns = _check_names("Chain patterns", patterns, SPARSITY_PATTERNS)
        if "dense" not in self._patterns:
            raise ValueError(f"Chain patterns must include dense, not {self._patterns!r}")
        # pipeline registers from an issued beat to its FIFO write: S1 (routing),
        # S2 (DSP A/B), S3 (M), S4 (P), the product tree, T1 (block total)
        self._stages = 4 + _tree_stages(chain_dsp_slots(BLOCK_WEIGHTS, pack_int4)) + 1
        self._fifo_depth = self._stages + 3
        super().__init__({
            "weights": In(stream.Signature(weight_beat_layout(self._lanes))),
            "acts": In(stream.Signature(act_beat_layout(self._lanes))),
            "results": Out(stream.Signature(result_beat_layout(self._lanes))),
        })

    @property
    def length(self) -> int:
        return self._length

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def pack_int4(self) -> bool:
        return self._pack_int4

    @property
    def formats(self) -> tuple:
        return self._formats

    @property
    def patterns(self) -> tuple:
        return self._patterns

    @property
    def dsp_slots(self) -> int:
        """Multipliers of the chain (each maps to one DSP48E2)."""
        return self._lanes * chain_dsp_slots(BLOCK_WEIGHTS, self._pack_int4)

    @property
    def stages(self) -> int:
        """Pipeline registers from an issued beat to its FIFO write."""
        return self._stages

    @property
    def fifo_depth(self) -> int:
        return self._fifo_depth

    # ------------------------------------------------------------------

    def _route(self, m, lane_w, lane_x, pattern):
        """Per slot: (activation, weight code, active) after the sparse index muxes."""
        xs, ws, acts = [], [], []
        sparse = [p for p in self._patterns if p != "dense"]
        for s in range(BLOCK_WEIGHTS):
            h, o = divmod(s, 16)
            half = Cat(*(lane_x[h * 16 + k] for k in range(16)))
            x = Signal(signed(8), name=f"rx{s}")
            w = Signal(signed(8), name=f"rw{s}")
            act = Signal(name=f"ra{s}")
            if o >= 8 or not sparse:
                # only dense blocks use this slot
                is_dense = pattern == Sparsity.DENSE if sparse else Const(1)
                m.d.comb += [x.eq(lane_x[s]), w.eq(Mux(is_dense, lane_w.w[s], 0)),
                             act.eq(is_dense)]
            else:
                pos = Signal(4, name=f"rpos{s}")
                with m.Switch(pattern):
                    for p in sparse:
                        K = kept_weights(p)
                        n, mm = SPARSITY_PATTERNS[p]
                        with m.Case(PATTERN_CODES[p]):
                            if o < K // 2:
                                j = h * (K // 2) + o
                                if mm == 16:
                                    m.d.comb += pos.eq(lane_w.idx[j])
                                else:   # 2:4: 2 kept per group of 4 -> group o // 2
                                    m.d.comb += pos.eq(Cat(lane_w.idx[j][0:2], Const(o // 2, 2)))
                                m.d.comb += [w.eq(lane_w.w[j]), act.eq(1)]
                            else:
                                m.d.comb += [pos.eq(o), w.eq(0), act.eq(0)]
                    with m.Default():   # dense (and codes this chain does not support)
                        m.d.comb += [pos.eq(o), w.eq(lane_w.w[s]), act.eq(1)]
                m.d.comb += x.eq(half.word_select(pos, 8).as_signed())
            xs.append(x)
            ws.append(w)
            acts.append(act)
        return xs, ws, acts

    def _route_packed(self, m, lane_w, lane_x, flags, phase):
        """Packed chain, per DSP ``i`` (routed slot ``a``, rest slot ``b = a + 8``): the S1
        register inputs ``(xa, wa, xb, wb, act_a, on_b)``.

        ``xa``/``wa``: the routed activation and the weight code for slot ``a`` (dense Q8_0
        phase 1 routes slot ``b``'s activation and weight here instead); ``xb``/``wb``: slot
        ``b``'s activation and code (only dense 4-bit blocks use slot ``b``). ``flags``: the
        one-hot pattern flags (``dense`` is set for every code this chain does not support).
        """
        out = []
        sparse = [p for p in self._patterns if p != "dense"]
        idx_bits = {}
        for i, (sa, sb) in enumerate(zip(_sparse_slots(), _rest_slots())):
            h, o = divmod(sa, 16)
            half = Cat(*(lane_x[h * 16 + k] for k in range(16)))
            # per bit, (flag, bit) terms OR-ed (flags are one-hot); a bit that several
            # patterns take from the same place is one term with their flags OR-ed,
            # constant bits are their flags (or nothing)
            pos_bits = [[] for _ in range(4)]
            w_terms = []

            def term(terms, flag, bit):
                for t in terms:
                    if t[1] is bit or (isinstance(bit, int) and isinstance(t[1], int)
                                       and t[1] == bit):
                        t[0].append(flag)
                        return
                terms.append(([flag], bit))

            for b in range(3):
                term(pos_bits[b], flags["dense"], (o >> b) & 1)
            term(pos_bits[3], flags["dense"], phase)
            act_terms = [flags["dense"]]
            for p in sparse:
                K = kept_weights(p)
                _, mm = SPARSITY_PATTERNS[p]
                if o >= K // 2:
                    continue
                j = h * (K // 2) + o
                for b in range(4):
                    if mm == 16 or b < 2:
                        bit = idx_bits[h, j, b] if (h, j, b) in idx_bits else \
                            idx_bits.setdefault((h, j, b), lane_w.idx[j][b])
                    else:   # 2:4: 2 kept per group of 4 -> group o // 2
                        bit = ((o // 2) >> (b - 2)) & 1
                    term(pos_bits[b], flags[p], bit)
                term(w_terms, flags[p], j)
                act_terms.append(flags[p])
            pos = Signal(4, name=f"rpos{sa}")
            wraw = Signal(8, name=f"rw{sa}")
            act = Signal(name=f"ra{sa}")
            for b in range(4):
                m.d.comb += pos[b].eq(_or_all(
                    [_or_all(fl) & v if not isinstance(v, int) else _or_all(fl)
                     for fl, v in pos_bits[b] if not (isinstance(v, int) and v == 0)]))
            dense_w = Mux(phase, lane_w.w[sb], lane_w.w[sa])
            m.d.comb += wraw.eq(_and_or(
                [(flags["dense"], dense_w)] +
                [(_or_all(fl), lane_w.w[j]) for fl, j in w_terms], 8))
            m.d.comb += act.eq(_or_all(act_terms))
            xa = half.word_select(pos, 8).as_signed()
            out.append((xa, wraw, lane_x[sb], lane_w.w[sb], act))
        return out

    def elaborate(self, platform):
        m = Module()
        lanes = self._lanes
        packed = self._pack_int4
        has_q8 = "q8_0" in self._formats
        has_q40 = "q4_0" in self._formats
        has_q41 = "q4_1" in self._formats
        sparse = [p for p in self._patterns if p != "dense"]

        # ---- S0: join the two input streams into the beat register -----------------
        s0_valid = Signal()
        s0_phase = Signal()
        s0_w = Signal(weight_beat_layout(lanes), reset_less=True)
        s0_x = Signal(act_beat_layout(lanes), reset_less=True)
        # the beat's format and pattern, decoded once at load (one-hot pattern flags;
        # ``dense`` also for codes this chain does not support)
        s0_q8 = Signal(reset_less=True)
        s0_q40 = Signal(reset_less=True)
        s0_q41 = Signal(reset_less=True)
        s0_flags = {p: Signal(name=f"s0_is_{p.replace(':', '_')}", reset_less=True)
                    for p in self._patterns}
        # dense: none of the sparse flags (so the routing logic sees them as one-hot)
        m.d.comb += s0_flags["dense"].eq(~_or_all([s0_flags[p] for p in sparse]))

        two_phase = Signal()      # dense Q8_0 on a packed chain: two cycles per beat
        if packed and has_q8:
            m.d.comb += two_phase.eq(s0_q8 & s0_flags["dense"])
        final = Signal()
        m.d.comb += final.eq(~two_phase | s0_phase)

        credit_ok = Signal()
        issue = Signal()
        m.d.comb += issue.eq(s0_valid & credit_ok)
        space = Signal()
        m.d.comb += [
            space.eq(~s0_valid | (issue & final)),
            self.weights.ready.eq(self.acts.valid & space),
            self.acts.ready.eq(self.weights.valid & space),
        ]
        load = self.weights.valid & self.acts.valid & space
        with m.If(issue):
            m.d.sync += s0_phase.eq(~final)
            with m.If(final):
                m.d.sync += s0_valid.eq(0)
        in_fmt = self.weights.payload.fmt
        in_pat = self.weights.payload.pattern
        in_sparse = [in_pat == PATTERN_CODES[p] for p in sparse]
        with m.If(load):
            m.d.sync += [s0_valid.eq(1), s0_phase.eq(0),
                         s0_w.eq(self.weights.payload), s0_x.eq(self.acts.payload),
                         s0_q8.eq((in_fmt == WeightFormat.Q8_0) if has_q8 else 0),
                         s0_q40.eq((in_fmt == WeightFormat.Q4_0) if has_q40 else 0),
                         s0_q41.eq((in_fmt == WeightFormat.Q4_1) if has_q41 else 0),
                         ]
            for p, f in zip(sparse, in_sparse):
                m.d.sync += s0_flags[p].eq(f)

        # ---- pipeline tag: what travels alongside each issued micro-op -----------------
        tag_layout = data.StructLayout({
            "valid": 1, "final": 1, "two_phase": 1, "phase": 1,
            "fmt": WeightFormat, "last": 1,
            "en": lanes, "d": data.ArrayLayout(16, lanes), "m": data.ArrayLayout(16, lanes),
        })
        tag0 = Signal(tag_layout)
        m.d.comb += [
            tag0.valid.eq(issue), tag0.final.eq(final), tag0.two_phase.eq(two_phase),
            tag0.phase.eq(s0_phase), tag0.fmt.eq(s0_w.fmt), tag0.last.eq(s0_w.last),
        ]
        for lane in range(lanes):
            m.d.comb += [tag0.en[lane].eq(s0_w.lanes[lane].en),
                         tag0.d[lane].eq(s0_w.lanes[lane].d),
                         tag0.m[lane].eq(s0_w.lanes[lane].m)]
        tag1 = Signal(tag_layout)
        m.d.sync += tag1.eq(tag0)
        s1_q8 = Signal()
        s1_q40 = Signal()
        s1_q41 = Signal()
        m.d.sync += [s1_q8.eq(s0_q8), s1_q40.eq(s0_q40), s1_q41.eq(s0_q41)]

        isum_trees, sumq_trees = [], []
        if packed:
            isum_stages, sumq_stages = self._packed_lanes(m, s0_w, s0_x, s0_flags, s0_phase,
                                                          s0_q8, s0_q40, s1_q8,
                                                          isum_trees, sumq_trees)
            corr_fmt = s1_q40       # 4-bit weights enter unsigned: Q4_0 subtracts 8 * sumq
        else:
            isum_stages, sumq_stages = self._unpacked_lanes(m, s0_w, s0_x, s0_q8, s0_q41,
                                                            isum_trees, sumq_trees)
            corr_fmt = s1_q41       # 4-bit weights enter as q - 8: Q4_1 adds 8 * sumq

        # isum: S2 (A/B), S3 (M), S4 (P) then isum_stages; sumq: sumq_stages from S1.
        isum_depth = 3 + isum_stages
        sumq_trees = [_delay(m, t, isum_depth - sumq_stages, f"sumq{lane}_al")
                      for lane, t in enumerate(sumq_trees)]
        tagT = _delay(m, tag1, isum_depth, "tag", reset_less=False)
        corrT = _delay(m, corr_fmt, isum_depth, "corr")
        q8T = _delay(m, s1_q8, isum_depth, "q8c") if packed else Const(0)

        # ---- T1: block total (+ borrows, the weight offsets' correction: packed, Q4_0
        # - 8 sumq and Q8_0 - 128 sumq; unpacked, Q4_1 + 8 sumq) -------------------------
        t1_tag = Signal(tag_layout)
        m.d.sync += t1_tag.eq(tagT)
        t1_isum, t1_sumq = [], []
        for lane in range(lanes):
            tot = Signal(ISUM_SHAPE, name=f"t1_isum{lane}", reset_less=True)
            sq = Signal(SUMQ_SHAPE, name=f"t1_sumq{lane}", reset_less=True)
            if packed:
                # Q4_0 weights entered as q = code + 8, Q8_0 as w + 128
                m.d.sync += tot.eq(isum_trees[lane] - Mux(corrT, sumq_trees[lane] << 3,
                                                          Mux(q8T, sumq_trees[lane] << 7, 0)))
            else:
                m.d.sync += tot.eq(isum_trees[lane] + Mux(corrT, sumq_trees[lane] << 3, 0))
            m.d.sync += sq.eq(sumq_trees[lane])
            t1_isum.append(tot)
            t1_sumq.append(sq)
        assert self._stages == 1 + isum_depth + 1, (self._stages, isum_depth)

        # ---- output FIFO (credit reserved at issue) ------------------------------------
        entry = data.StructLayout({
            "fmt": WeightFormat, "last": 1,
            "lanes": data.ArrayLayout(data.StructLayout({
                "en": 1, "isum": ISUM_SHAPE, "sumq": SUMQ_SHAPE, "d": 16, "m": 16}), lanes),
        })
        depth = self._fifo_depth
        m.submodules.fifo = q = fifo.SyncFIFOBuffered(width=entry.size, depth=depth)
        w_entry = Signal(entry)
        # A dense Q8_0 block's first phase waits in acc (isum) and, packed, sacc (sumq: the
        # packed chain routes each phase's 16 activations through the same slots); both
        # are 0 otherwise (cleared when the final phase is written).
        acc = [Signal(ISUM_SHAPE, name=f"acc{lane}", reset_less=True) for lane in range(lanes)]
        sacc = [Signal(SUMQ_SHAPE, name=f"sacc{lane}", reset_less=True) for lane in range(lanes)]
        for lane in range(lanes):
            m.d.comb += [
                w_entry.lanes[lane].en.eq(t1_tag.en[lane]),
                w_entry.lanes[lane].isum.eq(t1_isum[lane] + acc[lane]),
                w_entry.lanes[lane].sumq.eq(t1_sumq[lane] + sacc[lane] if packed
                                            else t1_sumq[lane]),
                w_entry.lanes[lane].d.eq(t1_tag.d[lane]),
                w_entry.lanes[lane].m.eq(t1_tag.m[lane]),
            ]
            with m.If(t1_tag.valid):
                with m.If(t1_tag.final):
                    m.d.sync += [acc[lane].eq(0), sacc[lane].eq(0)]
                with m.Else():
                    m.d.sync += [acc[lane].eq(t1_isum[lane]), sacc[lane].eq(t1_sumq[lane])]
        m.d.comb += [w_entry.fmt.eq(t1_tag.fmt), w_entry.last.eq(t1_tag.last),
                     q.w_data.eq(w_entry), q.w_en.eq(t1_tag.valid & t1_tag.final)]

        inflight = Signal(range(depth + 1))
        m.d.comb += credit_ok.eq((inflight + q.level) < depth)
        inc = issue & final
        dec = q.w_en
        m.d.sync += inflight.eq(inflight + inc - dec)

        r_entry = entry(q.r_data)
        out = self.results.payload
        m.d.comb += [out.fmt.eq(r_entry.fmt), out.last.eq(r_entry.last)]
        for lane in range(lanes):
            m.d.comb += [
                out.lanes[lane].en.eq(r_entry.lanes[lane].en),
                out.lanes[lane].isum.eq(r_entry.lanes[lane].isum),
                out.lanes[lane].sumq.eq(r_entry.lanes[lane].sumq),
                out.lanes[lane].d.eq(r_entry.lanes[lane].d),
                out.lanes[lane].m.eq(r_entry.lanes[lane].m),
            ]
        m.d.comb += [self.results.valid.eq(q.r_rdy), q.r_en.eq(self.results.ready)]
        return m

    def _packed_lanes(self, m, s0_w, s0_x, flags, phase, s0_q8, s0_q40, s1_q8,
                      isum_trees, sumq_trees):
        """S1..S4 and the adder trees of a packed chain; returns the trees' stages."""
        dq4 = Signal()            # slot b in use: dense 4-bit blocks only
        m.d.comb += dq4.eq(flags["dense"] & ~s0_q8)
        single_x = _delay(m, s1_q8, 3, "single")     # S2, S3, S4
        for lane in range(self._lanes):
            routes = self._route_packed(m, s0_w.lanes[lane], s0_x[lane], flags, phase)
            prods, borrows, sx = [], [], []
            for i, (xa, wraw, xb, wbraw, act) in enumerate(routes):
                # S1: routed operands. 4-bit codes become unsigned 0..15 (Q4_0: q = code ^ 8);
                # unused slots are 0 (so the sumq tree adds the registers as they are).
                wa = Cat(wraw[0:3], wraw[3] ^ s0_q40, wraw[4:7] & s0_q8.replicate(3),
                         ~wraw[7] & s0_q8)
                wb = Cat(wbraw[0:3], wbraw[3] ^ s0_q40)
                rxa = Signal(signed(8), name=f"s1_xa{lane}_{i}", reset_less=True)
                rwa = Signal(unsigned(8), name=f"s1_wa{lane}_{i}", reset_less=True)
                rxb = Signal(signed(8), name=f"s1_xb{lane}_{i}", reset_less=True)
                rwb = Signal(unsigned(4), name=f"s1_wb{lane}_{i}", reset_less=True)
                m.d.sync += [rxa.eq(Mux(act, xa, 0)), rwa.eq(Mux(act, wa, 0)),
                             rxb.eq(Mux(dq4, xb, 0)), rwb.eq(Mux(dq4, wb, 0))]
                sx += [rxa, rxb]
                # S2: A = xa 2^13 + xb, B = wb 2^13 + wa (Q8_0: xb = wb = 0, B = wa)
                # (every weight is unsigned here, so B is just the two fields)
                a_reg = Signal(signed(8 + PACK_SHIFT + 1), name=f"dsp{lane}_{i}_a",
                               reset_less=True)
                b_reg = Signal(signed(18), name=f"dsp{lane}_{i}_b", reset_less=True)
                m.d.sync += [a_reg.eq((rxa << PACK_SHIFT) + rxb),
                             b_reg.eq(Cat(rwa, Const(0, PACK_SHIFT - 8), rwb, Const(0, 1)))]
                m_reg = Signal(signed(len(a_reg) + len(b_reg)), name=f"dsp{lane}_{i}_m",
                               reset_less=True)
                m.d.sync += m_reg.eq(a_reg * b_reg)
                # P register: the product bits the extraction reads
                p_reg = Signal(unsigned(PACK_SHIFT + 16), name=f"dsp{lane}_{i}_p",
                               reset_less=True)
                m.d.sync += p_reg.eq(m_reg[:PACK_SHIFT + 16])
                # packed: bits [13, 26) + borrow; Q8_0: xa wa exactly at bits [13, 29)
                prods.append(Mux(single_x, p_reg[PACK_SHIFT:].as_signed(),
                                 p_reg[PACK_SHIFT:2 * PACK_SHIFT].as_signed()))
                borrows.append(p_reg[PACK_SHIFT - 1])
            isum_t, isum_stages = _pipelined_sum(m, prods, f"isum{lane}")
            # the packed products' borrows, summed beside the tree and aligned with it
            bsum = Signal(range(len(borrows) + 1), name=f"bsum{lane}", reset_less=True)
            m.d.sync += bsum.eq(_popcount(borrows))
            isum_trees.append(isum_t + _delay(m, bsum, isum_stages - 1, f"bsum{lane}"))
            sumq_t, sumq_stages = _pipelined_sum(m, sx, f"sumq{lane}")
            sumq_trees.append(sumq_t)
        return isum_stages, sumq_stages

    def _unpacked_lanes(self, m, s0_w, s0_x, s0_q8, s0_q41, isum_trees, sumq_trees):
        """S1..S4 and the adder trees of an unpacked chain; returns the trees' stages."""
        for lane in range(self._lanes):
            xs, ws, acts = self._route(m, s0_w.lanes[lane], s0_x[lane], s0_w.pattern)
            X, W, A_ = [], [], []
            for s in range(BLOCK_WEIGHTS):
                w4 = Mux(s0_q41, ws[s][0:4] ^ 0b1000, ws[s][0:4]).as_signed()
                weff = Mux(acts[s], Mux(s0_q8, ws[s], w4), 0)
                rx = Signal(signed(8), name=f"s1_x{lane}_{s}", reset_less=True)
                rw = Signal(signed(8), name=f"s1_w{lane}_{s}", reset_less=True)
                ra = Signal(name=f"s1_a{lane}_{s}", reset_less=True)
                m.d.sync += [rx.eq(xs[s]), rw.eq(weff), ra.eq(acts[s])]
                X.append(rx)
                W.append(rw)
                A_.append(ra)
            prods = []
            for s in range(BLOCK_WEIGHTS):
                a_reg = Signal(signed(8), name=f"dsp{lane}_{s}_a", reset_less=True)
                b_reg = Signal(signed(8), name=f"dsp{lane}_{s}_b", reset_less=True)
                m.d.sync += [a_reg.eq(X[s]), b_reg.eq(W[s])]
                m_reg = Signal(signed(16), name=f"dsp{lane}_{s}_m", reset_less=True)
                m.d.sync += m_reg.eq(a_reg * b_reg)
                p_reg = Signal(signed(16), name=f"dsp{lane}_{s}_p", reset_less=True)
                m.d.sync += p_reg.eq(m_reg)
                prods.append(p_reg)
            isum_t, isum_stages = _pipelined_sum(m, prods, f"isum{lane}")
            isum_trees.append(isum_t)
            # sumq over the active slots, from the S1 registers
            sumq_t, sumq_stages = _pipelined_sum(
                m, [Mux(A_[s], X[s], 0) for s in range(BLOCK_WEIGHTS)], f"sumq{lane}")
            sumq_trees.append(sumq_t)
        return isum_stages, sumq_stages


def _or_all(bits):
    out = Const(0)
    for b in bits:
        out = out | b
    return out


def _and_or(cands, width):
    """``OR(flag ? value : 0)`` over ``(flag, value)`` pairs whose flags are one-hot."""
    out = Const(0, width)
    for f, v in cands:
        out = out | (f.replicate(width) & v)
    return out


def _popcount(bits):
    """Sum of 1-bit values as an unsigned value (a small adder tree)."""
    vals = [b.as_unsigned() for b in bits]
    while len(vals) > 1:
        nxt = [vals[i] + vals[i + 1] for i in range(0, len(vals) - 1, 2)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def units(config) -> dict:
    """The chain of an accelerator configuration (one of ``chain.count`` identical chains)."""
    return {"chain": Chain(length=config.chain.length, pack_int4=config.chain.pack_int4,
                           formats=config.weight_formats, patterns=config.sparsity)}
