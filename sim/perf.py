"""Analytical performance model: cycles of a compiled program on a configuration.

Level 4 of the simulation stack. :func:`estimate` walks a bundle's instruction
stream (the decode program, or a prefill program) with the run's registers and
plays the accelerator's three queues against each other at instruction
granularity, the way ``hw/top.py`` runs them (docs/isa.md, "Queues and
dependency tokens"):

* a **validation pass** first (``hw/dispatch.py``'s Validator: one word per
  cycle), then execution;
* the dispatcher hands out one word per cycle, in program order, into queues
  ``QUEUE_DEPTH`` deep (it stalls while the target queue is full); SYS waits
  until every queue has drained;
* each queue runs its instructions in order; an instruction starts once it is
  dispatched, its queue is free and the tokens it waits for have been
  released (the k-th wait on a channel takes the k-th release); it releases
  its tokens when it completes;
* the load and store queues move ``bytes / bytes_per_cycle`` plus a fixed
  cost per instruction, data landing ``read latency`` cycles later; the
  instruction fetch shares the ports with the loads (16 bytes per word);
* with attention on the chains the execution unit and the load engine share the banked
  KV/weight region's line write port (hw/onchip.py ``WRITE_CLIENTS``): served first, the
  execution unit's writes cost the loads a cycle a line; served second, they wait while the
  load engine writes lines into it (:func:`bank_write_stretch`);
* the compute queue runs one instruction at a time (``hw/exec_unit.py``):
  MV/MM on the row pipelines of ``hw/mv_exec.py``, QUANT, RMSNORM, ROPE,
  SILU_MUL, EMBED and ATTN on ``hw/sfu_exec.py``'s ``SfuExec`` with the RTL's
  lane count, COPY/ADD/MUL/NOP on ``hw/execute.py``'s MiscExec, each with the
  cycle formula of its unit (:class:`UnitCosts`, every constant with where it
  comes from).

The result is the run's cycle count (what the RTL's counter block reports as
``cycles``), per-unit busy time and what bounds the step. The model is checked
against the RTL by ``benchmarks/perf_calibration.py`` (docs/benchmarks.md).

Bandwidth: the memory streams at most ``min(ports' peak, the board's memory
bandwidth)`` (:func:`peak_bytes_per_cycle`), times ``efficiency``; under the
``card`` memory model (the default) never more than what the memory sustains
for long bursts (``boards/memory_timing.py``: refresh and per-burst costs), and
a load's data lands after the card's read latency.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace

from llmfab.boards import memory_timing
from llmfab.compiler import isa
from llmfab.core.errors import BoardError
from llmfab.core.formats import BLOCK_BYTES, QBLOCK_BYTES, block_bytes
from llmfab.sim.golden_plan import onchip_ranges

__all__ = ["UnitCosts", "COSTS", "PerfEstimate", "estimate", "peak_bytes_per_cycle",
           "sfu_lanes", "mv_pipelines", "slice_pipelines", "misc_cycles", "quant_tail_cycles",
           "mv_cycles", "roofline_plot"]

#: Queue depth of the load, compute and store queues (docs/isa.md, hw/top.py).
QUEUE_DEPTH = 16


@dataclass(frozen=True)
class UnitCosts:
    """Per-unit cycle constants of the model, in one place, each with its source.

    The per-element and per-row terms are read off the units' state machines; the
    constants are fitted ("tiny fit") to busy cycles measured on the ``tiny``
    accelerator (``L = 4`` SFU lanes, 2 row pipelines, 16-byte lines): the SFU ones
    to tests/rtl/test_sfu_exec.py::test_sfu_exec_cycles (the figures in
    hw/sfu_exec.py's docstring and docs/hw-units.md), all of them to the
    single-kind instruction streams of ``benchmarks/perf_calibration.py --ops --mv``
    (every kind within 1% there). The whole-step check is the same script's table
    (docs/benchmarks.md, "The model against the RTL").
    """

    # ---- SfuExec (hw/sfu_exec.py). Per-element terms are structural (the FSM):
    #: QUANT: n/L beats through the quantizer, then d[nb] and sumq[nb] L words a cycle
    #: (qphase 1, 2, :func:`quant_tail_cycles`; one word a cycle before 2026-12-04); the rest
    #: fixed. tiny fit: 576 -> 229, 1536 -> 529 (both give 49); with L words a cycle 207 / 457
    #: against the RTL's 209 / 459 (the footprint stage's 2).
    quant_fixed: float = 49
    #: RMSNORM: pass 1 ceil(n/32)*32/L beats (whole 32-element reduce chunks), the
    #: rsqrt on the SFU, pass 2 ceil(n/L) beats. tiny fit: 576 -> 416 gives 128.
    rmsnorm_fixed: float = 128
    #: ROPE: the cos/sin table one entry per cycle (TABLE: hd cycles; none when SfuExec
    #: still holds it: the same b and hd as the last ROPE's, no line of it written since),
    #: then n*hd/L beats (ROPEF: L elements = L/2 pairs per cycle). tiny fit: 3 x 64 -> 129
    #: gives 17.
    rope_fixed: float = 17
    #: SILU_MUL: ``silu_lanes`` elements of a and b per beat through SfuExec's SiLU-multiply
    #: lanes (``SfuExec.default_silu_lanes``: 2), then the pipeline's latency. tiny fit:
    #: 1536 -> 845 gives 77 (one element per cycle before: 1630).
    silu_fixed: float = 77
    #: EMBED: L elements per beat (EMB: the next block collected a line window at a time
    #: meanwhile, never the longer part): nb x 32/L + this. tiny fit: 576 -> 166 gives 22
    #: (every format; bytes then elements one per cycle before: Q4_0 576 took 919).
    embed_fixed: float = 22
    #: ATTN runs its heads overlapped (hw/sfu_exec.py: head h's softmax on the SFU while
    #: head h+1 scores and head h-1 does its AV; :func:`attn_schedule` replays the
    #: sequencer's choices). Head phases, read off the FSM (pysim, 8 and 4 lanes, every
    #: figure exact): scores S = q beats ceil(hd/L) + rows x ceil(hd/32)*32/L + 32/L (the
    #: score tree's drain grows with the beats per chunk) + this (command issue, line-read
    #: latency of q and K, the tree's levels and * scale).
    attn_score_fixed: float = 36
    #: AV V = rows x ceil(hd/L) + the partial tree hd / attn_tree_lanes + this (command
    #: issue, read latency, the accumulator's drain).
    attn_av_fixed: float = 13
    #: softmax: from the end of its feed (ASM, one row per cycle) until the probabilities
    #: are all back in the score buffer: this + softmax_per_row x rows (pass 2 to exp's
    #: stage, the reducer's tree, the recip-only pipeline, pass 3, the post stage; 131
    #: until the post stage lost its adder with SILU_MUL/EMBED on lanes of their own).
    attn_softmax_fixed: float = 128
    softmax_per_row: float = 2
    #: ATTN's own per-instruction cost (IDLE -> CONST, the constants line -> START, the
    #: last decision, the writer's drain, the execution unit's): 3 heads x 64 on tiny at
    #: positions 1 / 50 / 100 measure 595 / 5339 / 10289 (tests/rtl/test_sfu_exec.py::
    #: test_sfu_exec_cycles), 3 above SfuExec alone in pysim, every one exact.
    sfu_fixed: float = 14
    #: SOFTMAX (attention on the chains): L elements per cycle through VecSoftmax's three
    #: passes (hw/softmax.py); fitted to 149 / 258 cycles at n = 100 / 400 (ci geometry,
    #: L = 8, alone): fixed + per_element * n / L.
    chains_softmax_fixed: float = 113
    chains_softmax_per_element: float = 2.91
    #: KVROW: K through the quantizer, amax/recip of V, then each V dim's q byte, a byte a
    #: cycle (and the blocks' d fields, 3 cycles per dim, until MV_BT took them as 1.0):
    #: 184 cycles at hd = 64 (321 with the d fields, 129 + 3 x 64).
    kvrow_fixed: float = 120
    kvrow_per_dim: float = 1

    # ---- MiscExec (hw/execute.py): COPY/ADD/MUL at line_bytes/4 lanes, one line per cycle
    #: per instruction (commands, the 3-cycle float pipe, realign, the last write): tiny fit,
    #: ADD of 64 words (16 lines) takes 27 busy cycles.
    misc_fixed: float = 11
    #: per row of a strided COPY after the first (one row after the other: commands and
    #: realign again). Measured 2026-12-06, each distinct MISC of SmolLM2's ``prefill_kv_2``
    #: alone on the RTL (``u280-slice`` and ``ci-chains``, attention on the chains, 64-byte
    #: lines): two-row COPYs of 64 / 144 / 160 / 176 words take 30 / 40 / 42 / 44 busy cycles
    #: a repeat, 11 + 2 x ceil(4w / 64) + this: 11 fits all four (6, unmeasured before, was 5 short).
    copy_row_fixed: float = 11
    #: NOP: taken and done.
    nop_cycles: float = 2

    # ---- MvExec (hw/mv_exec.py). Fitted to single MV instructions repeated on tiny
    # (2 pipelines, 16-byte lines; Q4_0 64 x 8..56 rows, 512 x 1..7 rows, Q4_1 64 x 16..48 and
    # 128 x 16..24, Q8_0 64 x 16..24 rows: every figure within 1 cycle of
    # ``mv_fixed + groups x per_row``, groups = ceil(rows / P); 2026-12-03, the row pipelines
    # without a realigner, benchmarks/perf_calibration.py --config tiny --mv).
    #: per MV/MM: the command, pipeline fill (reader, decoder, chain, scaler) and the last
    #: result writes (the intercept); the ExecUnit hand-off included. 2026-12-05: 42 -> 37, the
    #: next word taken in the cycle of the last one's done with its set-up already computed
    #: (MvExec's PLAN then SETTLE, no SETUP / SETUP2 / PLAN2 / DONE; per repeat 5 fewer
    #: cycles in every shape on tiny, 6 in one).
    mv_fixed: float = 35
    #: cycles a row takes through MvExec's one RowCombine and writer: a row a cycle. The last
    #: pass's rows leave one after another after the pipelines' last block (on tiny's 2
    #: pipelines 2 of the 37 cycles of the fit above, so ``mv_fixed`` is 35 beside them; on
    #: ``u280-slice``'s 8, 8); rows the pipelines make faster than a row a cycle wait for it:
    #: an MV of ``rows`` x ``ntok`` rows takes ``per_row + rows x ntok + mv_combine_fixed``
    #: after ``mv_fixed`` when that is longer (2026-12-06, ``u280-slice`` geometry: Q8_0 17,
    #: 18, 64 and 129 rows of 1 or 2 blocks, 59 / 60 / 108 / 172 cycles a repeat; the model
    #: without the combine said 49 / 49 / 61 / 105).
    mv_combine_fixed: float = 3
    #: per row and pipeline besides its lines: the command to its reader and decoder (the
    #: slope: a Q4_0 row of 64 columns, 36 bytes over 3 lines, takes 4 cycles; 512 columns,
    #: 288 bytes over 18 lines, 19; a Q8_0 row of 64, 68 bytes over 5 lines, 6; it was 3 with
    #: the realigner between reader and decoder).
    mv_row_overhead: float = 1
    #: the activation load per token besides its chunks of ``CB = min(line_bytes, 32)`` bytes,
    #: each of the vector's three parts realigned on its own (``ceil(32 nb / CB) + 2 ceil(4 nb
    #: / CB)``). Uncached MV - cached: on tiny (CB 16), 2026-12-05: 7 / 8 cycles for nb = 2, 14
    #: for nb = 4, 46 / 48 for nb = 16; on ``u280-slice`` (CB 32, 64-byte lines), 2026-12-06:
    #: 7 for nb = 1, 11 for 2, 32.5 for 18, 67.5 for 48 (3, 4, 24, 60 chunks); ``ci-chains``
    #: the same for 1, 2 and 18. 7 fits the vectors of the weight tiles (nb >= 16) within 1.5
    #: and the attention's (nb 1, 2) within 3; tiny's nb = 2 and 4 load faster (7.5, 14).
    mv_act_fixed: float = 7
    #: cycles from a word's arrival at the execution unit to MvExec's start as ``mv_fixed``
    #: counts it, for a word that did not wait for the unit: MvExec takes a word once its
    #: two set-up stages hold it, so a word that arrives when the unit is idle starts
    #: ``mv_fixed + mv_settle`` = 40 cycles of fixed cost after it arrives (42 before, of
    #: which SETUP, SETUP2 and PLAN2 were 3 and DONE 1), one that waited behind a running
    #: MV ``mv_fixed`` after the unit is free.
    mv_settle: float = 3

    # ---- ExecUnit (hw/exec_unit.py): cycles between one instruction's done and the next's
    # start. The per-op fits above already hold it (busy cycles of instruction streams: no gap).
    exec_handoff: float = 0
    #: cycles between issuing one compute-queue instruction and the next (the execution
    #: unit's footprint stage takes the next word while a unit runs)
    exec_issue: float = 1

    # ---- load / store engines (hw/dma.py) and the dispatcher
    #: per LD/ST besides its beats (address, burst split, the last write on chip):
    #: benchmarks/memory_bandwidth.py on tiny, ideal memory: seq LDs of 32 B .. 8 KiB take
    #: beats + 2.2 .. 2.6 cycles (docs/benchmarks.md "Calibration through the accelerator").
    ld_fixed: float = 2.3
    #: the validation pass (hw/dispatch.py: one word per cycle, three stages): words + 33
    #: (validate_cycles on tiny, 151 words -> 184; on ci, 4,729 words -> 4,762).
    validate_fixed: float = 33
    #: execution beyond the queues' work (fetch latency, the final drain): exec_cycles - busy
    #: cycles of single-kind instruction streams on tiny (31 for LD-only and MV-only streams).
    run_fixed: float = 31
    #: dispatcher: cycles per word.
    dispatch_cycles: float = 1

    def to_dict(self):
        return asdict(self)


#: The constants the model uses unless told otherwise.
COSTS = UnitCosts()


@dataclass
class PerfEstimate:
    cycles: int                # the whole run: validation + execution
    load_cycles: int           # load-queue occupancy (LD bytes / rate + fixed costs)
    compute_cycles: int        # compute-queue busy time (MV/MM + MISC)
    mv_cycles: int             # of which MV/MM
    sfu_cycles: int            # of which MISC (SfuExec and MiscExec)
    exposed_sfu_cycles: int    # execution time beyond max(load, MV): what the SFU work adds
    weight_bytes: int
    kv_bytes: int
    macs: int
    clock_mhz: float
    tokens_per_s: float        # tokens of the program (prefill: T) per second
    hbm_utilization: float     # weight+KV bytes / (cycles * peak bytes per cycle)
    bound: str                 # "memory" (loads), "compute" (MV chains) or "sfu" (MISC work)
    memory_model: str = "card"             # boards/memory_timing.py model the bandwidth came from
    bytes_per_cycle: float = 0.0           # the streaming rate the loads were charged at
    hbm_utilization_sustainable: float = 0.0   # the same bytes against the memory's sustainable peak
    peak_bytes_per_cycle: float = 0.0      # min(ports' peak, the board's memory bandwidth)
    validate_cycles: int = 0
    exec_cycles: int = 0
    pos: int = 0
    tokens: int = 1                        # tokens the program runs (1 decode, T prefill)
    sfu_lanes: int = 0
    misc_by_op: dict = field(default_factory=dict)   # MISC op -> cycles
    store_cycles: int = 0
    #: MV/MM shape "rows x cols format" -> [instructions, cycles, the cycles its MACs would
    #: take at the chains' full rate]: where the MV unit's time goes
    mv_by_shape: dict = field(default_factory=dict)

    def to_dict(self):
        return asdict(self)


# ---------------------------------------------------------------------------------------
# the configuration's units
# ---------------------------------------------------------------------------------------

def peak_bytes_per_cycle(config) -> float:
    """The most the memory can stream per kernel cycle: the lesser of the accelerator's
    ports' peak (``hbm_bytes_per_cycle``) and the board's memory bandwidth through those
    ports (``memory_gbps``), i.e. ``effective_hbm_gbps`` per cycle."""
    return min(float(config.hbm_bytes_per_cycle), config.memory_gbps * 1e3 / config.clock_mhz)


def line_bytes(config) -> int:
    """The on-chip line (``AccelConfig.onchip_line_bytes``), the shared path's and the
    execution units' width; LDs outside the weight fast path move one per cycle."""
    return config.onchip_line_bytes


def sfu_lanes(config) -> int:
    """SfuExec's lanes in the accelerator of ``config``: the RTL's own default
    (``SfuExec.default_lanes(line_bytes)``: ``min(8, line_bytes / 4)``, at least 2),
    which ``hw/exec_unit.py`` builds."""
    from llmfab.hw.sfu_exec import SfuExec
    return SfuExec.default_lanes(line_bytes(config))


def mv_pipelines(config) -> int:
    """MvExec's row pipelines: one per 32-weight block lane, ``count * length / 32``."""
    return config.chain.count * config.block_lanes_per_chain


def slice_pipelines(config) -> int:
    """Row pipelines of one slice (docs/isa.md, "Slices"): ``count / ports * length / 32``."""
    return mv_pipelines(config) // config.slices


def _ceil(a, b):
    return -(-int(a) // int(b))


def attn_tree_lanes(hd: int, lanes: int) -> int:
    """Elements per cycle of ATTN's final partial tree (AT): the largest power of two that
    is at most ``lanes`` and divides the head dimension."""
    k = 1
    while k * 2 <= lanes and hd % (k * 2) == 0:
        k *= 2
    return k


def attn_schedule(nh: int, score: float, av: float, feed: float, softmax: float) -> float:
    """Cycles of ATTN's head sequence in hw/sfu_exec.py (IDLE/CONST/drain excluded).

    Head 0 scores, then at each decision (ANEXT, one cycle) the sequencer starts, in this
    order of preference: the next softmax feed (``feed`` cycles; its probabilities are
    back ``softmax`` cycles after the feed ends) once that head's scores are in and the
    previous softmax is back; the next head's scores (``score``) once their score buffer
    is free (two buffers: head h's AV done before head h+2 scores); the next AV (``av``)
    once its head's softmax is back; else it waits for the softmax.
    """
    t = score
    hs, hm, hv = 1, 0, 0            # next head to score, to softmax, to AV
    back = 0.0                      # when the last softmax's probabilities are all in
    while hv < nh:
        c = t
        while True:
            m_ok = hm < hs and (hm == 0 or back <= c) and hv + 1 >= hm
            s_ok = hs < nh and hv + 1 >= hs
            v_ok = hv < hm and (hv + 1 < hm or back <= c)
            if m_ok or s_ok or v_ok:
                break
            c = back
        t = c + 1
        if m_ok:
            t += feed
            back = t + softmax - 1
            hm += 1
        elif s_ok:
            t += score
            hs += 1
        else:
            t += av
            hv += 1
    return t + 1


@functools.lru_cache(maxsize=4096)
def quant_tail_cycles(nb: int, lanes: int, line_words: int) -> int:
    """QUANT's d and sumq phases (hw/sfu_exec.py): each cycle up to ``lanes`` words of one
    entry of the d/sumq buffer (block ``b`` in word ``b % lanes``), never past the writer's
    line (``line_words`` words; the q words before them fill ``8 nb`` of it)."""
    pk, cyc = (8 * nb) % line_words, 0
    for _ in range(2):
        q = 0
        while q < nb:
            k = min(lanes - q % lanes, line_words - pk, nb - q)
            q, pk, cyc = q + k, (pk + k) % line_words, cyc + 1
    return cyc


def misc_cycles(name: str, f: dict, regs, config, costs: UnitCosts = COSTS, lanes=None,
                rope_cached: bool = False) -> float:
    """Compute-queue cycles of one MISC instruction (fields ``f``) on its RTL unit
    (``rope_cached``: a ROPE whose table SfuExec still holds, hw/sfu_exec.py)."""
    L = lanes or sfu_lanes(config)
    D = line_bytes(config)
    n = f["n"]
    c = costs
    if name == "NOP":
        return c.nop_cycles
    if name in ("ADD", "MUL"):                          # MiscExec: a line of words per cycle
        return c.misc_fixed + _ceil(4 * n, D) if n else c.nop_cycles
    if name == "COPY":
        reps, w, _ = isa.copy_operands(f)
        if not w:
            return c.nop_cycles
        return c.misc_fixed + reps * _ceil(4 * w, D) + (reps - 1) * c.copy_row_fixed
    if name == "QUANT":
        nb = n // 32
        return c.quant_fixed + _ceil(n, L) + quant_tail_cycles(nb, L, line_bytes(config) // 4)
    if name == "RMSNORM":
        return c.rmsnorm_fixed + _ceil(n, 32) * (32 // L) + _ceil(n, L)
    if name == "ROPE":                                  # n heads of aux elements
        hd = f["aux"]
        return c.rope_fixed + (0 if rope_cached else hd) + _ceil(n * hd, L)
    if name == "SILU_MUL":
        from llmfab.hw.sfu_exec import SfuExec
        return c.silu_fixed + _ceil(n, SfuExec.default_silu_lanes(L))
    if name == "EMBED":
        return c.embed_fixed + (n // 32) * (32 // L)
    if name == "ATTN":
        nh, t, hd, _cached = isa.attn_operands(f)
        rows = regs[f["reg"]] + t + 1                   # cache rows [0, S) (+ S cached or current)
        score = _ceil(hd, L) + rows * _ceil(hd, 32) * (32 // L) + 32 // L + c.attn_score_fixed
        av = rows * _ceil(hd, L) + hd // attn_tree_lanes(hd, L) + c.attn_av_fixed
        sm = c.attn_softmax_fixed + c.softmax_per_row * rows
        return c.sfu_fixed + attn_schedule(nh, score, av, rows, sm)
    # attention on the chains (docs/isa.md): SfuExec(chains=True) measured alone on the ci
    # geometry (tests/rtl/test_sfu_exec_chains.py::test_sfu_exec_chains_cycles): SOFTMAX
    # n = 100 -> 149, n = 400 -> 258 (VecSoftmax's three passes of L = 8 elements per
    # cycle); KVROW hd = 64 -> 184 (K through the quantizer, then a byte per V dim)
    if name == "SOFTMAX":
        return c.chains_softmax_fixed + c.chains_softmax_per_element * n / L
    if name == "KVROW":
        return c.kvrow_fixed + c.kvrow_per_dim * n
    return c.sfu_fixed


@functools.lru_cache(maxsize=4096)
def _straddle_fraction(rb: int, bb: int, beat: int, step: int) -> float:
    """Rows ``rb`` bytes long back to back from a beat's start, a pipeline taking every
    ``step``-th: the fraction of its rows that start with a ``bb``-byte block straddling a
    ``beat``-byte decoder beat right after a row (``step`` rows earlier) that ended with one."""
    if not rb:
        return 0.0
    period = beat // math.gcd(rb, beat)

    def straddles(off):
        return off % beat + bb > beat
    return sum(straddles(((r - step) * rb) + rb - bb) and straddles(r * rb)
               for r in range(period)) / period


def straddle_wait(rb: int, bb: int, beat: int, step: int, config) -> float:
    """Cycles a row pipeline's chain waits per row, on average, without the decoders'
    lookahead beat (``chain.decoder_lookahead`` 0): when a row's last block straddles two
    beats, both fill the decoder's two-beat window, so the next row's first beat enters it only
    as that block leaves, and if that row's first block straddles too it waits a cycle for its
    second beat (cocotb ``mv_steady_state`` on ``ci-chains``, 4 pipelines, 18-block rows: Q4_1
    0.257 cycles/block, Q4_0 0.253 without it; both 0.250 with it)."""
    if config.chain.decoder_lookahead:
        return 0.0
    return _straddle_fraction(rb, bb, beat, step)


def mv_cycles(f: dict, ntok: int, config, costs: UnitCosts = COSTS, *, act_cached: bool = False) -> float:
    """Compute-queue cycles of one MV (``ntok`` 1) or MM on MvExec's row pipelines.

    Per token: the activation load (its three parts in ``min(line_bytes, 32)``-byte chunks,
    skipped when the unit's activation cache holds the vector), then the rows: slice ``p`` of the
    ``ports`` slices (docs/isa.md, "Slices") takes rows ``p, p + ports, ...`` (slice 0 the
    most, ``ceil(rows / ports)``), spread over its own :func:`slice_pipelines`, reading
    its own bank (lines of one stripe, ``data_width / 8`` bytes): each row takes ``nb``
    cycles on its chain (twice that for 8-bit weights on packed chains; plus, without the
    decoders' lookahead beat, :func:`straddle_wait`), or what its
    reader delivers if that is slower (the row's stripes, half-stripes from 64-byte stripes
    on, and ``mv_row_overhead`` command cycles), or its read ports (the stripes of the
    slice's pipelines sharing each of its two ports; the half-stripes of a pair sharing a
    port of each half memory). MM reads each row once per group of ``chain.tokens`` tokens
    (the token lanes take a group's tokens side by side). One slice (``tiny``): the whole line and
    every pipeline, as before the slices.
    """
    fmt = isa.FMTS[f["func"] & 3]
    sp = isa.SPARSITIES[(f["func"] >> 2) & 7]
    rows, cols = f["rows"], f["cols"]
    nb = cols // 32
    D = line_bytes(config)
    S = config.stripe_bytes                         # a slice's bank: one stripe per line
    P = slice_pipelines(config)
    srows = _ceil(rows, config.slices)              # rows of the busiest slice
    per_block = config.macs_per_cycle / config.format_macs_per_cycle(fmt)   # 2 for Q8_0 packed
    rb = nb * block_bytes(fmt, sp)
    g = math.gcd(rb, S) if rb else S
    lines = (rb + S - g) / S                        # bank lines a row touches, on average
    # the reader's and decoder's beats: from 64-byte stripes on half-lines, which a pair of
    # pipelines reads from the bank's two half memories, one port of each (hw/onchip.py)
    from llmfab.hw.mv_exec import decoder_beat_bytes
    DW = decoder_beat_bytes(S)
    gw = math.gcd(rb, DW) if rb else DW
    beats = (rb + DW - gw) / DW
    share = max(1, _ceil(min(srows, P), 2))         # busy pipelines per read port (pair)
    # the slowest of: the chain (a block per cycle), the row's reader and decoder input (its
    # beats and commands), the read ports the pipelines share (whole lines, or half-lines on
    # a port of each half)
    port = lines if DW == S else beats / 2
    chain = nb * per_block
    if per_block == 1:              # (two cycles a block leave the decoder time to catch up)
        chain += straddle_wait(rb, block_bytes(fmt, sp), DW, P, config)
    per_row = max(chain, beats + costs.mv_row_overhead, share * port)
    CB = min(D, 32)
    act = 0 if act_cached else ntok * (_ceil(32 * nb, CB) + 2 * _ceil(4 * nb, CB) + costs.mv_act_fixed)
    K = config.chain.tokens
    groups = _ceil(ntok, K)
    body = groups * _ceil(srows, P) * per_row
    # the rows leave through the unit's RowCombines (``chain.combines``, one by default), a
    # row each a cycle: the last pass's rows (one per pipeline and token lane) after the
    # body, and every row of every token if the pipelines make them faster than that (short
    # rows on many pipelines: the attention's)
    PT = mv_pipelines(config)
    NC = config.chain.combines          # combines: rows a cycle (a line write of several)
    last = _ceil((rows - (_ceil(rows, PT) - 1) * PT) * (ntok - (groups - 1) * K), NC)
    tail = body + last
    flow = per_row + _ceil(rows * ntok, NC)
    return costs.mv_fixed + act + (tail if tail >= flow else flow + costs.mv_combine_fixed)


# ---------------------------------------------------------------------------------------
# the queues
# ---------------------------------------------------------------------------------------

_WAIT = {  # (queue, header bit) -> channel
    ("cmp", "wait_prev"): "ld2cmp", ("ld", "wait_next"): "cmp2ld",
    ("st", "wait_prev"): "cmp2st", ("cmp", "wait_next"): "st2cmp"}
_REL = {
    ("ld", "rel_next"): "ld2cmp", ("cmp", "rel_prev"): "cmp2ld",
    ("cmp", "rel_next"): "cmp2st", ("st", "rel_prev"): "st2cmp"}


class ActCache:
    """MvExec's activation cache (hw/mv_exec.py): the vectors of the last instructions whose
    vectors it loaded in one pass, until a line of them is written. ``ways`` 1: one entry;
    2 (attention on the chains): two, each half the buffers, the least recently used one
    replaced; vectors larger than half take the whole buffers (both entries go). Vectors
    ending past ``below`` (the banked region) are never kept."""

    def __init__(self, ways: int, max_blocks: int, line: int, below: int | None = None):
        self.ways, self.max_blocks, self.line, self.below = ways, max_blocks, line, below
        cw = min(line, 32) // 4                          # d / sumq words per entry
        self.dd_half = (-(-max_blocks // cw) + 256) // 2
        self.cw = cw
        self.slots = [None] * ways                       # ((qsrc, cols, ntok), (line, end))
        self.lru = 0
        self.big = False                                 # entry 0 holds more than half

    def use(self, qsrc: int, cols: int, ntok: int) -> bool:
        """An MV/MM of ``ntok`` vectors of ``cols`` at ``qsrc``: whether they are cached (no
        load); the cache after it."""
        vec = (qsrc, cols, ntok)
        for e, s in enumerate(self.slots):
            if s is not None and s[0] == vec:
                self.lru = 1 - e if self.ways > 1 else 0
                return True
        nb = max(cols // 32, 1)
        end = qsrc + ntok * nb * QBLOCK_BYTES
        if ntok > self.max_blocks // nb or (self.below is not None and end > self.below):
            # several passes, or vectors in the banked region: nothing stays
            self.slots = [None] * self.ways
            return False
        lines = (qsrc // self.line, _ceil(end, self.line))
        half = (self.ways > 1 and nb * ntok <= self.max_blocks // 2
                and _ceil(nb, self.cw) * ntok <= self.dd_half)
        victim = self.lru if half else 0
        if self.ways > 1:
            if not half:
                self.slots[1] = None
            if victim == 1 and self.big:
                self.slots[0] = None
            self.big, self.lru = not half, 1 - victim
        self.slots[victim] = (vec, lines)
        return False

    def written(self, start: int, nbytes: int):
        """A write of ``nbytes`` at on-chip ``start``: the entries it touches go."""
        if not nbytes:
            return
        lo, hi = start // self.line, _ceil(start + nbytes, self.line)
        for e, s in enumerate(self.slots):
            if s is not None and lo < s[1][1] and hi > s[1][0]:
                self.slots[e] = None


def _program(bundle, program):
    """(bytes, tokens) of ``program``: None / "decode" / 1, a bucket T (its prefill program)
    or a program name, "prefill_<T>", "prefill_kv_<T>" (its KV-only twin) or "prefill_last_<T>"
    (its last-logits twin)."""
    name = "decode" if program in (None, 1) else program if isinstance(program, str) else f"prefill_{program}"
    found = bundle.named_program(name)
    if found is None:
        raise KeyError(f"the bundle has no program '{name}' (it has {', '.join(bundle.program_names())})")
    return found


def _conflict(a, b) -> bool:
    """Do two lists of on-chip ranges ``(start, length)`` share a byte?"""
    return any(la and lb and sa < sb + lb and sb < sa + la for sa, la in a for sb, lb in b)


def bank_write_stretch(start: float, cycles: float, writes) -> float:
    """When an instruction of ``cycles`` cycles of its own that starts at ``start`` finishes,
    if it progresses only on the cycles the load engine leaves the banked region's write port
    free: ``writes`` are the load engine's line writes into that region, ``(first, end,
    density)`` sorted by ``first`` (``density``: lines per cycle, at most 1; a density of 1
    stops the instruction for the whole interval)."""
    import bisect
    t, left = float(start), float(cycles)
    # the intervals that may still be writing at ``start`` (their ends are not sorted: scan
    # back over a few; the load engine writes one interval at a time, so overlaps are short)
    k = max(0, bisect.bisect_right(writes, (t,)) - 4)
    while left > 0 and k < len(writes):
        a, b, d = writes[k]
        k += 1
        if b <= t:
            continue
        if a > t:
            if a - t >= left:
                return t + left
            left -= a - t
            t = a
        free = 1.0 - min(d, 1.0)
        if free > 0 and (b - t) * free >= left:
            return t + left / free
        left -= (b - t) * free
        t = b
    return t + left


def estimate(bundle, config, *, pos: int | None = None, program=None, efficiency: float = 1.0,
             memory: str = "card", costs: UnitCosts = COSTS, trace: list | None = None) -> PerfEstimate:
    """Cycles of one run of a program at position ``pos`` (default: half the compiled context).

    ``program``: ``None`` / ``"decode"`` the decode program, an int T the prefill program
    of bucket T (tokens at positions ``pos .. pos + T - 1``), ``"prefill_kv_<T>"`` its
    KV-only twin. ``memory``: ``card``
    (default) charges loads at no more than what the board's memory sustains
    (:func:`~llmfab.boards.memory_timing.sustainable_fraction`) with the card's read
    latency, ``ideal`` at the peak (the lesser of ports and memory) times ``efficiency``
    with the RTL ideal model's latency. ``costs``: the unit constants (:class:`UnitCosts`).
    ``trace``: a list to append ``(index, op, dispatch, start, done, finish)`` of every LD,
    ST and compute instruction to (a timeline, for finding what a step waits on; ``finish``:
    when a compute instruction's unit finished it, before its done waited for the older
    ones'; an LD's or ST's done).

    With attention on the chains the execution unit writes into the banked KV/weight region
    (KVROW's K/V tile bytes; before the compiler moved them to the activation buffer, also
    the queries, scores and probabilities of the attention's QUANT, MV, SOFTMAX and MUL),
    whose line write port the load engine also uses (on configurations whose on-chip line is
    the HBM line, ``ci-chains``, for every load). Which it serves first is hw/onchip.py's
    ``WRITE_CLIENTS``: the execution unit (today) -- its lines cost the next load into the
    region a cycle each, beyond the load engine's idle cycles -- or the load engine -- such
    an instruction then progresses only while the loads leave the port free
    (:func:`bank_write_stretch`, against the loads before it in program order and those
    the dispatcher reaches while it runs).
    """
    ctx = int(bundle.manifest["context"])
    pos = ctx // 2 if pos is None else int(pos)
    prog, ntok = _program(bundle, program)
    peak = peak_bytes_per_cycle(config)
    bpc = peak * efficiency
    if memory == "card":
        sustainable = memory_timing.sustainable_fraction(config, "card")
        bpc = min(bpc, config.hbm_bytes_per_cycle * sustainable)
        try:
            tp = memory_timing.timing_params(config, "card")
            rlat, wlat = tp.read_latency, tp.write_latency
        except BoardError:     # a board without a timing section: the ideal model's latencies
            rlat, wlat = memory_timing.IDEAL_READ_LATENCY, memory_timing.IDEAL_WRITE_LATENCY
    elif memory == "ideal":
        sustainable = 1.0
        rlat, wlat = memory_timing.IDEAL_READ_LATENCY, memory_timing.IDEAL_WRITE_LATENCY
    else:
        raise ValueError(f"unknown memory model '{memory}'; known: {', '.join(memory_timing.MODELS)}")
    L = sfu_lanes(config)
    c = costs
    regs = [0] * isa.NREGS
    for r, v in isa.run_registers(pos, 0, ntok).items():
        regs[r] = v
    words = isa.from_bytes(prog)

    validate = c.validate_fixed + len(words) * c.dispatch_cycles
    t_disp = 0.0
    free = {"ld": 0.0, "cmp": 0.0, "st": 0.0}       # when each queue's engine is free
    last_end = {"ld": 0.0, "cmp": 0.0, "st": 0.0}   # when each queue's last instruction completes
    pops = {"ld": [], "cmp": [], "st": []}          # start times (queue slot freed)
    rel = {ch: [] for ch in ("ld2cmp", "cmp2ld", "cmp2st", "st2cmp")}
    used = {ch: 0 for ch in rel}
    busy = {"ld": 0.0, "cmp": 0.0, "st": 0.0, "mv": 0.0, "misc": 0.0}
    misc_by_op = {}
    mv_by_shape = {}
    wbytes = kvbytes = macs = 0
    fetch_debt = 0.0                                # port cycles the instruction fetch took
    ld_idle_from = 0.0
    from llmfab.hw.mv_exec import DEFAULT_MAX_BLOCKS   # the accelerator's MvExec buffers' blocks
    D = line_bytes(config)
    hbm_line = config.hbm_bytes_per_cycle
    # the banked buffer the MV/MM unit reads (the weight buffer; with attention on the chains
    # from the KV buffer on, docs/isa.md): its loads take the per-port path
    wbase = int(bundle.manifest["onchip"]["weight"][0])
    # MvExec's activation cache: two entries with attention on the chains, else one
    act = ActCache(2 if config.attention == "chains" else 1, DEFAULT_MAX_BLOCKS, D, below=wbase)
    rope_tab = None             # SfuExec's ROPE table: (b, hd, first line, last line) it holds

    def tab_kept(tab, start, nbytes):
        """The ROPE table ``tab`` after a write of ``nbytes`` at on-chip ``start`` (None:
        a line of it was written, as SfuExec's snoop sees)."""
        if tab is None or nbytes <= 0 or start // D > tab[3] or (start + nbytes - 1) // D < tab[2]:
            return tab
        return None
    # the execution unit (hw/exec_unit.py): an MV/MM and a MISC run side by side when their
    # on-chip ranges are disjoint (docs/isa.md, "Overlap"); each unit takes its class's next
    # instruction once it finishes, dones (and the releases on them) in program order
    from llmfab.hw.execute import MAX_IN_FLIGHT     # accepted and not yet done (hw/top.py)
    man = bundle.manifest
    rng = dict(gb_base=int(man["onchip"]["global"][0]), kv_context=int(man["onchip"]["context"]),
               slices=int(man["memory_map"]["hbm_ports"]),
               stripe=int(man["memory_map"]["hbm_stripe_bytes"]))
    kv_region = None
    # the load engine's line writes into the banked region (from ``wbase`` on): they share
    # its write port with the execution unit's (hw/onchip.py, below). A load takes the
    # per-port fast path (``bank_wr``, which yields to the line view instead) only where the
    # on-chip line is narrower than the HBM line
    # (hw/dma.py: fewer stripes per line than ports; not on ``ci``/``ci-chains``, where the
    # line is the HBM line) and the load is line-aligned
    bank_fast = D // config.stripe_bytes < config.hbm.ports and config.slices > 1
    bank_writes = []            # (first, end, lines per cycle) of those loads, in start order
    # which writer the region's write port serves first (hw/onchip.py WRITE_CLIENTS): the
    # load engine's (the execution unit's writes wait: bank_wait) or the execution unit's
    # (its line writes into the banked region cost the next such load a cycle each, beyond
    # the idle cycles the load engine had: bank_debt)
    from llmfab.hw.onchip import WRITE_CLIENTS
    exec_first = WRITE_CLIENTS[0] == "ex_wr"
    bank_debt, bank_idle_from = 0.0, 0.0
    unit_free = {"mv": 0.0, "misc": 0.0}
    cmp_dones = [0.0]                               # done times of the compute instructions
    in_flight = {"mv": (0.0, []), "misc": (0.0, [])}     # (finish, on-chip ranges) of the last
    cmp_busy_to = 0.0
    end = 0.0
    decoded = [isa.decode(w) for w in words]

    def transfer(f, ld=True):
        """An LD's (``ld``) or ST's bytes and rate, and whether its lines take the banked
        region's write port. The shared path moves one on-chip line per cycle; an LD of a
        weight tile (into the weight buffer, HBM and on-chip addresses equal modulo the HBM
        line) takes the per-port fast path at the ports' rate."""
        n = f["len"] + regs[f["lreg"]] * f["lmul"]
        addr = regs[f["hreg"]] + f["hoff"] * isa.HBM_ALIGN + regs[f["ireg"]] * f["stride"]
        fast = ld and f["buf"] >= wbase and (addr - f["buf"]) % hbm_line == 0
        rate = bpc if fast else min(bpc, D)
        return n, rate, bool(ld and n and f["buf"] >= wbase and not (fast and bank_fast))

    def later_bank_writes(ix, start):
        """The banked-region line writes of the loads after word ``ix`` in program order that
        can start while the compute instruction ``ix`` (issued at ``start``) runs: the
        dispatcher goes on in order while the queues have room (the compute word after
        ``ix`` is taken at ``start``, the ones after it not before ``ix`` finishes: the
        look-ahead stops there), a load starts once its queue and its token allow (a token
        no compute instruction up to ``ix`` has released comes after ``ix``'s done)."""
        out, td, lfree, k = [], t_disp, free["ld"], used["cmp2ld"]
        # queue pops (None: not known before ``ix`` finishes)
        cpops, lpops = list(pops["cmp"][-QUEUE_DEPTH:]), list(pops["ld"][-QUEUE_DEPTH:])
        nxt = start + c.exec_issue
        for j in range(ix + 1, len(decoded)):
            g = decoded[j]
            qq = isa.QUEUE[isa.OPCODES[g.op]]
            if qq == "sys":
                break
            if qq == "cmp":
                if len(cpops) >= QUEUE_DEPTH:
                    if cpops[-QUEUE_DEPTH] is None:
                        break
                    td = max(td, cpops[-QUEUE_DEPTH])
                cpops.append(nxt)
                nxt = None
                td += c.dispatch_cycles
                continue
            if qq != "ld":
                td += c.dispatch_cycles
                continue
            if len(lpops) >= QUEUE_DEPTH:
                td = max(td, lpops[-QUEUE_DEPTH])
            gf = g.fields
            st = max(td + c.dispatch_cycles, lfree)
            td += c.dispatch_cycles
            if gf.get("wait_next"):
                if k >= len(rel["cmp2ld"]):
                    break
                st = max(st, rel["cmp2ld"][k])
                k += 1
            lpops.append(st)
            n, rate, lw = transfer(gf)
            lfree = st + (n / rate + c.ld_fixed if n else 1)
            if lw:
                out.append((st + rlat, st + rlat + n / rate, min(1.0, rate / D)))
        return out

    def bank_wait(ix, start, cyc, writing=None):
        """Cycles of compute instruction ``ix`` whose writes go to the banked region: its
        last ``writing`` cycles (default all) progress only while the loads leave the port
        (the load engine's writer served first); with the execution unit's served first,
        its own cycles."""
        if exec_first:
            return cyc
        ws = bank_writes + later_bank_writes(ix, start)
        if not ws:
            return cyc
        head = cyc - min(cyc, writing if writing is not None else cyc)
        return bank_write_stretch(start + head, cyc - head, sorted(ws)) - start

    for ix, ins in enumerate(decoded):
        f = ins.fields
        q = isa.QUEUE[isa.OPCODES[ins.op]]
        fetch_debt += isa.WORD_BYTES / bpc
        if q == "sys":
            t = max(t_disp, *last_end.values())
            t_disp = t + c.dispatch_cycles
            if f["func"] == isa.SYS_END:
                end = t
                break
            continue
        # dispatch: in order, one word per cycle, into a queue QUEUE_DEPTH deep
        t = t_disp
        if len(pops[q]) >= QUEUE_DEPTH:
            t = max(t, pops[q][-QUEUE_DEPTH])
        t_disp = t + c.dispatch_cycles
        start = max(t + c.dispatch_cycles, free[q])
        for bit in ("wait_prev", "wait_next"):
            if f.get(bit):
                ch = _WAIT[(q, bit)]
                k = used[ch]
                used[ch] += 1
                if k < len(rel[ch]):
                    start = max(start, rel[ch][k])
        pops[q].append(start)
        if q in ("ld", "st"):
            n, rate, line_writes = transfer(f, q == "ld")
            if q == "ld":
                if f["hreg"] == isa.REG_WBASE:
                    wbytes += n
                elif f["hreg"] == isa.REG_KVBASE:
                    kvbytes += n
                rope_tab = tab_kept(rope_tab, *onchip_ranges(ins, regs, **rng)[0])
                # the fetch shares the ports: what it took beyond the ports' idle time
                idle = max(0.0, start - ld_idle_from)
                occ = (n / rate + c.ld_fixed if n else 1) + max(0.0, fetch_debt - idle)
                fetch_debt = 0.0
                if line_writes and bank_debt:
                    occ += max(0.0, bank_debt - max(0.0, start - bank_idle_from))
                    bank_debt = 0.0
                done = start + occ + (rlat if n else 0)
                ld_idle_from = start + occ
                if line_writes:     # its lines land from the read latency on, rate / D a cycle
                    bank_writes.append((start + rlat, start + rlat + n / rate, min(1.0, rate / D)))
                    bank_idle_from = start + occ
            else:
                occ = n / rate + c.ld_fixed if n else 1
                done = start + occ + (wlat if n else 0)
            free[q] = start + occ
            busy[q] += occ
        else:
            cls = "mv" if ins.op in ("MV", "MM") else "misc"
            other = in_flight["misc" if cls == "mv" else "mv"]
            mine = onchip_ranges(ins, regs, **rng)
            arrive = start                          # the word reaches the execution unit
            start = max(start, unit_free[cls])
            if len(cmp_dones) > MAX_IN_FLIGHT:
                start = max(start, cmp_dones[-MAX_IN_FLIGHT])
            if other[0] > start and _conflict(mine, other[1]):
                start = other[0]
            if ins.op in ("MV", "MM"):
                # MvExec takes a word once its set-up is computed (mv_settle after it arrives)
                start = max(start, arrive + c.mv_settle)
                nt = max(f.get("ntok", 1), 1) if ins.op == "MM" else 1
                rows, cols = isa.mv_shape(f, regs)
                f = dict(f, rows=rows, cols=cols)
                cyc = mv_cycles(f, nt, config, c, act_cached=act.use(f["qsrc"], f["cols"], nt))
                macs += f["rows"] * f["cols"] * nt
                rope_tab = tab_kept(rope_tab, f["dst"], nt * f["rows"] * 4)
                if f["dst"] >= wbase:           # results into the banked region
                    cyc = bank_wait(ix, start, cyc)
                    if exec_first:
                        bank_debt += _ceil(f["rows"] * 4, D)
                busy["mv"] += cyc
                fmt = isa.FMTS[f["func"] & 3]
                sh = mv_by_shape.setdefault(f"{rows} x {cols} {fmt}" + (f" x {nt} tokens" if nt > 1 else ""),
                                            [0, 0.0, 0.0])
                sh[0] += 1
                sh[1] += cyc
                sh[2] += rows * cols * nt / (config.format_macs_per_cycle(fmt) * min(nt, config.chain.tokens))
            else:
                name = isa.MISC_NAMES[f["func"]]
                if name == "KVROW" and kv_region is None:
                    kv_region = isa.kv_region(f["n"], rng["kv_context"], rng["slices"], rng["stripe"])
                w = isa.misc_write_bytes(f, regs, kv_region)
                f = dict(f, n=isa.misc_len(f, regs))
                cached = False
                if name == "ROPE":          # SfuExec reads the table unless it still holds it
                    cached = (rope_tab is not None and rope_tab[:2] == (f["b"], f["aux"])
                              and f["b"] + 4 * f["aux"] <= wbase)
                    rope_tab = (f["b"], f["aux"], f["b"] // D, (f["b"] + 4 * f["aux"] - 1) // D)
                cyc = misc_cycles(name, f, regs, config, c, lanes=L, rope_cached=cached)
                rope_tab = tab_kept(rope_tab, f["dst"], w)
                if w and f["dst"] >= wbase:     # its writes wait for the loads'
                    # KVROW writes one byte a cycle (its K row's blocks, a q byte per V dim
                    # (c.kvrow_per_dim cycles), the scale) after reading and quantizing the
                    # K row; the others throughout
                    nbytes = (f["n"] // 32 * BLOCK_BYTES["q8_0"] + int(c.kvrow_per_dim) * f["n"]
                              + 4)
                    cyc = bank_wait(ix, start, cyc, nbytes if name == "KVROW" else None)
                    if exec_first:
                        # the lines it writes there: KVROW's K row, a line per V dim (its q
                        # byte), the scale; the others their result's lines
                        bank_debt += (_ceil(f["n"] // 32 * BLOCK_BYTES["q8_0"], D) + f["n"] + 1
                                      if name == "KVROW" else _ceil(w, D))
                # MvExec's cache stays valid unless the write touches a line of its vectors
                act.written(f["dst"], w)
                busy["misc"] += cyc
                misc_by_op[name] = misc_by_op.get(name, 0.0) + cyc
            cyc += c.exec_handoff
            # the unit is free when it finishes; its done (and releases) waits for the older
            # instructions' dones, at most MAX_IN_FLIGHT accepted and not yet done
            fin = start + cyc
            done = max(fin, cmp_dones[-1])
            unit_free[cls] = fin
            in_flight[cls] = (fin, mine)
            cmp_dones.append(done)
            free[q] = start + c.exec_issue
            busy[q] += done - max(start, cmp_busy_to)
            cmp_busy_to = done
        last_end[q] = max(last_end[q], done)
        if trace is not None:
            op = isa.MISC_NAMES[f["func"]] if ins.op == "MISC" else ins.op
            trace.append((len(trace), op, t, start, done, done if q != "cmp" else fin))
        for bit in ("rel_prev", "rel_next"):
            if f.get(bit):
                rel[_REL[(q, bit)]].append(done)
    else:
        end = max(t_disp, *last_end.values())
    exec_cycles = end + c.run_fixed
    cycles = validate + exec_cycles
    load, mv, sfu = busy["ld"], busy["mv"], busy["misc"]
    exposed = max(0.0, exec_cycles - max(load, mv))
    moved = wbytes + kvbytes
    # the load queue busier than the compute queue: memory; else the compute queue is the
    # critical path: "compute" if the MV work alone outlasts the loads and the MISC work,
    # else "sfu" (the MISC work is what puts the compute queue above the loads)
    bound = ("memory" if load >= busy["cmp"] else
             "compute" if mv >= load and mv > sfu else "sfu")
    return PerfEstimate(
        cycles=int(round(cycles)), load_cycles=int(load), compute_cycles=int(busy["cmp"]),
        mv_cycles=int(mv), sfu_cycles=int(sfu), exposed_sfu_cycles=int(exposed),
        weight_bytes=wbytes, kv_bytes=kvbytes, macs=macs, clock_mhz=config.clock_mhz,
        tokens_per_s=ntok * config.clock_mhz * 1e6 / cycles if cycles else 0.0,
        hbm_utilization=moved / (cycles * peak) if cycles else 0.0, bound=bound,
        memory_model=memory, bytes_per_cycle=bpc,
        hbm_utilization_sustainable=(moved / (cycles * config.hbm_bytes_per_cycle * sustainable)
                                     if cycles else 0.0),
        peak_bytes_per_cycle=peak, validate_cycles=int(validate), exec_cycles=int(exec_cycles),
        pos=pos, tokens=ntok, sfu_lanes=L, misc_by_op={k: int(v) for k, v in misc_by_op.items()},
        store_cycles=int(busy["st"]),
        mv_by_shape={k: [v[0], int(v[1]), int(v[2])] for k, v in mv_by_shape.items()})


def with_costs(**changes) -> UnitCosts:
    """:data:`COSTS` with some constants changed (what-if studies, calibration fits)."""
    return replace(COSTS, **changes)


def roofline_plot(points, config, path):
    """Roofline of a configuration (MAC/cycle vs MAC/byte) with decode points; writes a PNG.

    ``points``: ``(label, MAC per byte, MAC per cycle)``, optionally with a fourth
    item, the label's offset in points (default ``(5, -12)``). The memory roof is
    :func:`peak_bytes_per_cycle` (the lesser of the ports' and the memory's bandwidth).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    peak_macs = config.macs_per_cycle
    bw = peak_bytes_per_cycle(config)
    x = np.logspace(-1, 3, 200)
    y = np.minimum(peak_macs, bw * x)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(x, y, label=f"{config.name}: {peak_macs} MAC/cycle, {bw:.0f} B/cycle")
    for label, intensity, perf, *offset in points:     # optional 4th item: label offset (points)
        ax.plot([intensity], [perf], "o")
        ax.annotate(label, (intensity, perf), textcoords="offset points",
                    xytext=offset[0] if offset else (5, -12), fontsize=8)
    ax.set_xlabel("arithmetic intensity (MAC per byte from HBM)")
    ax.set_ylabel("MAC per cycle")
    ax.set_title(f"Roofline: {config.name} at {config.clock_mhz:g} MHz")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
