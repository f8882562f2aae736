"""The program builder: one program's instruction stream, stage by stage.

:class:`ProgramBuilder` writes the program over T tokens (T = 1: the decode
program; T > 1: a prefill bucket) of a compiled model (compiler/compile.py lays
out the on-chip buffers, the weight image, the tables and the memory map it
addresses). It has one method per stage, called in the model's order:

- :meth:`ProgramBuilder.constants`: the constants block (eps, attention scale, 1/dim);
- :meth:`ProgramBuilder.embedding`: the token rows into the residual ``X`` (or, for a
  pipeline stage that does not start the model, the previous stage's ``X``);
- :meth:`ProgramBuilder.attention` and :meth:`ProgramBuilder.ffn`, per layer;
- :meth:`ProgramBuilder.lm_head` (final norm and LM head, logits to the I/O region), or
  :meth:`ProgramBuilder.hidden_out` for a stage that does not end the model.

A **last-logits** prefill program (``last_only``, a stage that ends the model) is the full
program but for the final norm and LM head, which it runs for the last token only (its
logits as the decode program leaves them, ``[1][nr]`` per tile): the last run of a prompt
of which only the last token's logits are wanted (``Device.forward_last``, ``generate``).

A **KV-only** prefill program (``kv_only``, a stage that ends the model) stops once the
last layer's K/V rows are stored (:meth:`ProgramBuilder.kv_rows`): no attention, output
projection or FFN in that layer, no final norm or LM head. It leaves the KV cache the full
program leaves, bit for bit, and no logits: the backends run a prompt's runs but its last
through it (docs/isa.md, "Programs and bundles").

Each stage appends :class:`WorkItem` s: a group of loads into a buffer slot (a weight
tile, a head's K/V, a layer's tables) and the compute that consumes them.
:meth:`ProgramBuilder.emit` then writes the instructions with one item of lookahead on
the loads: the loads of item i+1 go before the compute of item i (so loads overlap
compute), unless item i+1 is a barrier (its loads read what item i stores: compute i,
SYNC, then its loads); a prefill program's loads go further ahead (:meth:`ProgramBuilder.
_ahead`). The :class:`Scheduler` orders the queues with dependency tokens (docs/isa.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from llmfab.compiler import isa
from llmfab.core.formats import QBLOCK_BYTES

F = isa.MISC_FUNCS

# --------------------------------------------------------------------------------------
# token scheduler
# --------------------------------------------------------------------------------------

# channel -> (producer queue, header bit on producer, consumer queue, header bit on consumer)
CHANNELS = {
    "ld2cmp": ("ld", "rel_next", "cmp", "wait_prev"),
    "cmp2ld": ("cmp", "rel_prev", "ld", "wait_next"),
    "cmp2st": ("cmp", "rel_next", "st", "wait_prev"),
    "st2cmp": ("st", "rel_prev", "cmp", "wait_next"),
}


def _queue(op):
    return {"LD": "ld", "ST": "st", "MV": "cmp", "MM": "cmp", "MISC": "cmp", "SYS": "sys"}[op]


class Scheduler:
    """Emits instructions in dispatch order and assigns dependency tokens.

    Tokens are counted per channel and consumed in order, so "event k has
    happened" is guaranteed once a consumer queue has completed k waits on the
    channel. ``emit(..., need={chan: k})`` adds waits (on the instruction
    itself, plus NOPs when more than one wait is needed) until that holds;
    ``release=[chan]`` returns the new event numbers.
    """

    def __init__(self):
        self.instrs: list[isa.Instr] = []
        self.released = {c: 0 for c in CHANNELS}
        self.waited = {c: 0 for c in CHANNELS}

    def _nop(self, q):
        if q == "ld":
            return isa.make("LD", func=0)
        if q == "st":
            return isa.make("ST", func=0)
        return isa.make("MISC", func=isa.MISC_FUNCS["NOP"])

    def emit(self, op: str, need=None, release=(), **fields):
        q = _queue(op)
        ins = isa.make(op, **fields)
        for ch, k in (need or {}).items():
            if k is None or k <= 0:
                continue
            prod, _, cons, bit = CHANNELS[ch]
            assert cons == q, (ch, op)
            if k > self.released[ch]:
                raise AssertionError(f"need {ch} event {k} before it was released")
            while self.waited[ch] < k - 1:
                nop = self._nop(q)
                nop.fields[bit] = 1
                self.instrs.append(nop)
                self.waited[ch] += 1
            if self.waited[ch] < k:
                ins.fields[bit] = 1
                self.waited[ch] += 1
        ev = {}
        for ch in release:
            prod, bit, _, _ = CHANNELS[ch]
            assert prod == q, (ch, op)
            ins.fields[bit] = 1
            self.released[ch] += 1
            ev[ch] = self.released[ch]
        self.instrs.append(ins)
        return ev


def _in_order(*fns):
    """Call ``fns`` one after the other."""
    for f in fns:
        f()


def hoff(x: int) -> int:
    """A device-memory offset in the LD/ST ``hoff`` field's units (HBM_ALIGN bytes)."""
    assert x % isa.HBM_ALIGN == 0, x
    return x // isa.HBM_ALIGN


# --------------------------------------------------------------------------------------
# work items
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadGroup:
    """Loads into one buffer slot: the first waits until the slot's last consumer freed it,
    the last releases the group (``gid``) to the compute queue."""
    gid: str
    slot: tuple          # ("W", i) weight tile, ("K", i) K/V of a head, ("G", i) tables, ...
    loads: list          # LD fields, one dict per LD


@dataclass(frozen=True)
class WorkItem:
    """Loads (or None) and the compute that consumes them; ``barrier``: the loads read
    what earlier compute stored (a SYNC goes before them)."""
    loads: LoadGroup | None
    compute: Callable[[], None]
    barrier: bool = False


KV_HOIST_REACH = 8      # how many items ahead a K/V group's loads may go (ProgramBuilder._next_kv)
PREFILL_LOAD_REACH = 8  # how many items ahead a prefill program's loads may go (ProgramBuilder._ahead)


# --------------------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------------------

class ProgramBuilder:
    """The instruction stream of one program over ``layout.tokens`` tokens.

    ``parts`` are what compiler/compile.py made (its ``CompileParts``): the model's
    dimensions, the on-chip plan, the weight image, the tables and the memory map;
    ``layout`` is the program's :class:`~llmfab.compiler.compile.VectorLayout`.
    """

    def __init__(self, parts, layout, *, kv_only: bool = False, last_only: bool = False):
        if kv_only and (layout.tokens == 1 or not parts.last):
            raise ValueError("a KV-only program is a prefill program of a stage that ends the model")
        if last_only and (layout.tokens == 1 or not parts.last or kv_only):
            raise ValueError("a last-logits program is a prefill program of a stage that ends the model")
        self.parts = parts
        self.L = layout
        self.T = layout.tokens
        self.kv_only = kv_only
        self.last_only = last_only
        self.S = Scheduler()
        self.work: list[WorkItem] = []
        self.ring_free = {}        # slot -> free event (cmp2ld) of its last consumer
        self.group_ready = {}      # group id -> ld2cmp event
        self.logits_stored = {}    # logits slot -> events of its last ST
        self.kv_stored = []        # st2cmp event of each layer's last K/V store
        self._kv_st = {}           # K slot -> st2cmp event of its region's stores (chains)
        self._busy = set()         # slots whose last user's freeing word is not yet emitted
        self._slot_counters = {"W": 0, "K": 0, "G": 0}
        self._stage_turn = 0       # the matrix output stage the next staged MM tile takes
        self._inputs_left = None   # (matrix name, per-token input work its first tile emits)
        self._outputs_left = None  # per-token work after a last tile token by token (_residual)
        self._copy_left = None     # a staged tile's COPY, for after the next MV/MM word (consume)

    # ---- the program --------------------------------------------------------------------
    def build(self) -> list:
        """The whole program: its stages in order, then the instructions."""
        parts = self.parts
        self.constants()
        self.embedding()
        for li in range(parts.n_layers):            # li: the stage's own layer index (KV, tables)
            if self.kv_only and li == parts.n_layers - 1:
                self.kv_rows(li)
                return self.emit()
            gs = self.attention(li)
            self.ffn(li, gs)
        if parts.last:
            self.lm_head()
        else:
            self.hidden_out()
        return self.emit()

    def emit(self) -> list:
        """Emit the work items with one item of lookahead on the loads (a K/V group's further:
        :meth:`_next_kv`; in a prefill program the next items' too: :meth:`_ahead`); END."""
        S, work = self.S, self.work
        loaded = set()

        def load(k):
            if k is not None and k not in loaded:
                loaded.add(k)
                self._load(work[k])

        prev_user = self._prev_slot_users()
        if work:
            load(0)
        for i, item in enumerate(work):
            nxt = work[i + 1] if i + 1 < len(work) else None
            if nxt is not None and not nxt.barrier:
                load(i + 1)
                load(self._next_kv(i, prev_user, loaded))
                if self.T > 1:
                    for k in self._ahead(i, prev_user, loaded):
                        load(k)
            item.compute()
            if nxt is not None and nxt.barrier:
                self._flush_copy()
                S.emit("SYS", func=isa.SYS_SYNC)
                load(i + 1)
        assert self._inputs_left is None, self._inputs_left
        self._flush_copy()
        self._flush_outputs()
        S.emit("SYS", func=isa.SYS_END)
        return S.instrs

    def _ahead(self, i, prev_user, loaded, reach=PREFILL_LOAD_REACH):
        """A prefill program's further lookahead on the loads, before item ``i``'s compute:
        the items after ``i + 1`` (up to ``reach``, stopping at a barrier or at the first whose
        slot's previous user is not yet emitted) whose loads are not yet out. A run's
        attention puts dozens of compute words between two weight tiles; with one item of
        lookahead the next tiles' loads come after them and wait in the dispatcher behind a
        full compute queue, so the load engine idles through the attention. Every load so
        hoisted waits only on compute words before it (its slot's previous user), so the
        in-order queues cannot deadlock."""
        out = []
        for k in range(i + 2, min(len(self.work), i + 1 + reach)):
            w = self.work[k]
            if w.barrier:
                break
            if w.loads is None or k in loaded:
                continue
            if prev_user.get(k, -1) >= i or w.loads.slot in self._busy:
                break
            out.append(k)
        return out

    def _prev_slot_users(self) -> dict:
        """Item index -> the index of the previous item loading into the same slot."""
        last, prev = {}, {}
        for k, it in enumerate(self.work):
            if it.loads is not None:
                if it.loads.slot in last:
                    prev[k] = last[it.loads.slot]
                last[it.loads.slot] = k
        return prev

    def _next_kv(self, i, prev_user, loaded, reach=KV_HOIST_REACH):
        """At a KV head's item ``i`` (its ATTN): the next head's K/V group, whose loads then go
        before this ATTN (behind the next item's) rather than one item before their own.
        The weight tiles between two ATTNs have slots freed by MVs that run beside the
        earlier ATTN, and those MVs are done only when it is (dones go in program order): a
        K/V load queued behind those tiles' loads starts only when the earlier ATTN ends,
        and the next ATTN waits out the whole K/V load (LLaMA2-7B on u280, position 2048:
        94.3 M cycles per token with, 78.3 M without that wait; SmolLM2's short positions
        change by under 0.01%). ``None``: nothing to move (not a KV item, a barrier or no
        K/V group within ``reach`` items, or the slot's previous user not yet emitted)."""
        it = self.work[i]
        if it.loads is None or it.loads.slot[0] != "K":
            return None
        for k in range(i + 1, min(len(self.work), i + 1 + reach)):
            w = self.work[k]
            if w.barrier:
                return None
            if w.loads is not None and w.loads.slot[0] == "K":
                return (k if k not in loaded and prev_user.get(k, -1) < i and w.loads.slot not in self._busy
                        else None)
        return None

    # ---- stages -------------------------------------------------------------------------
    def constants(self):
        """The constants block, loaded once."""
        lds = [dict(buf=self.L.consts, hreg=isa.REG_TBASE, hoff=hoff(self.parts.tables.consts),
                    len=self.parts.tables.consts_bytes)]
        self._add(LoadGroup("consts", ("C", 0), lds), partial(self.consume, "MISC", gid="consts", func=F["NOP"]))

    def embedding(self):
        """The residual ``X`` of the T tokens: the embedding row of R7 (decode), the rows the
        host staged in the I/O region (prefill), or the previous stage's ``X``."""
        parts, L, T = self.parts, self.L, self.T
        mm = parts.memory
        if not parts.first:
            # the previous stage's residual X of the T tokens, staged by the host
            lds = [dict(buf=L.x, hreg=isa.REG_IOBASE, hoff=hoff(mm.tok_off), len=T * parts.dims.dim * 4)]
            self._add(LoadGroup("xin", ("X", 0), lds), partial(self.consume, "MISC", gid="xin", func=F["NOP"]))
            return
        emb = parts.weights.emb
        efmt = isa.FMTS.index(emb.fmt)
        if T == 1:
            # embedding row (dynamic: R7 selects the row)
            es = self._next_slot("W")
            lds = [dict(buf=parts.onchip.wslots[es], hreg=isa.REG_WBASE, hoff=hoff(emb.hbm_off),
                        ireg=isa.REG_TOKEN, stride=emb.row_bytes, len=emb.row_bytes)]
            self._add(LoadGroup("emb", ("W", es), lds),
                      partial(self.consume, "MISC", gid="emb", free_slot=("W", es), func=F["EMBED"], dst=L.x,
                              a=parts.onchip.wslots[es], n=parts.dims.dim, aux=efmt))
            return
        # the host stages the T embedding rows in the I/O region (row stride tok_stride)
        rps = parts.onchip.wslot_bytes // mm.tok_stride
        for k0 in range(0, T, rps):
            es = self._next_slot("W")
            nrow = min(rps, T - k0)
            gid = f"emb.{k0}"
            lds = [dict(buf=parts.onchip.wslots[es], hreg=isa.REG_IOBASE,
                        hoff=hoff(mm.tok_off + k0 * mm.tok_stride), len=nrow * mm.tok_stride)]
            self._add(LoadGroup(gid, ("W", es), lds), partial(self._embed_rows, es, nrow, k0, gid, efmt))

    def attention(self, li: int) -> int:
        """Layer ``li``'s attention block: its tables (norm weights, RoPE rows) into a GB slot,
        the attention norm, QKV, RoPE and the K/V stores, attention per KV head, the output
        projection. Returns the GB slot (the FFN norm reads it)."""
        parts, L, T = self.parts, self.L, self.T
        d = parts.dims
        mats = parts.weights.layers[li]
        gs, rope = self._layer_tables(li)
        if T == 1 and parts.onchip.chains:
            # a KV head's attention in two parts (:meth:`_attend_chains`): its first part (RoPE,
            # KVROW, the queries and their scores MVs) once its rows of q/k/v are written,
            # after the next QKV tile; its softmax chains after the tile after that, so they
            # run beside that tile's MV (docs/isa.md, "Overlap"); one head in flight
            j, pend = 0, None
            for ti, (r0, _nr, _off) in enumerate(mats.qkv.tiles):
                self.matrix(mats.qkv, L.qh, L.qkv, only=(ti,))
                if pend is not None:
                    self._add(None, pend)
                    pend = None
                while j < d.nkv and (j + 1) * d.grp_rows <= r0:
                    if pend is not None:
                        self._add(None, pend)
                    pend = self._attention_chains(li, rope, j)
                    j += 1
            for j in range(j, d.nkv):
                if pend is not None:
                    self._add(None, pend)
                pend = self._attention_chains(li, rope, j)
            self._add(None, pend)
        elif T == 1:
            # a KV head's attention once its rows of q/k/v are written: after the next QKV tile
            # (it runs beside that tile's MV: docs/isa.md, "Overlap")
            j = 0
            for ti, (r0, _nr, _off) in enumerate(mats.qkv.tiles):
                self.matrix(mats.qkv, L.qh, L.qkv, only=(ti,))
                while j < d.nkv and (j + 1) * d.grp_rows <= r0:
                    self._attention_decode(li, rope, j)
                    j += 1
            for j in range(j, d.nkv):
                self._attention_decode(li, rope, j)
        elif parts.onchip.chains:
            self._qkv_prefill_chains(li, rope)
        else:
            self.matrix(mats.qkv, L.qh, L.qkv)
            self._attention_prefill(li, rope)
        n = d.nq * d.hd
        self._add(None, partial(self._inputs, mats.attn_output, [
            partial(self._quant_token, t, L.qh, L.o, n) for t in range(T)]))
        self.matrix(mats.attn_output, L.qh, L.h, token_last=True)
        return gs

    def _qkv_prefill_chains(self, li: int, rope: int, kv_only: bool = False):
        """A prefill program's QKV tiles on the chains, and per KV head its RoPE (token by
        token), K/V rows and attention (or, ``kv_only``, just the K/V rows): a head whose q/k/v
        rows the tiles before tile ``ti`` completed goes between tile ``ti``'s MM and its COPY
        (docs/isa.md, "Overlap": its RoPE, KVROW and query quantization run beside that MM);
        the heads the last tile completes follow it."""
        d, L = self.parts.dims, self.L
        qkv = self.parts.weights.layers[li].qkv
        # The heads' MVs between QKV tiles evict the tiles' vectors from MvExec's activation
        # cache (two entries: a head's queries and probabilities), so the next tile reloads
        # the T tokens' vectors (40 bytes a block, 32 bytes a cycle), and each head's RoPEs
        # read the table once per token. Worth it only while the reload is small beside a
        # tile's MM (SmolLM2 on ci-chains, 2 tokens: 45 cycles against ~830); LLaMA2-7B on
        # u280, buckets of 4: 640 against ~512, so there every head follows the last tile,
        # after every token's RoPE token by token (SfuExec keeps the last ROPE's table, so
        # each token's row is read once, not once per KV head).
        if len(qkv.tiles) == 1 or not self._reload_small(qkv, qkv.tiles[0][1], share=8):
            self.matrix(qkv, L.qh, L.qkv)
            self._add(None, partial(self._rope_tokens, rope))
            for j in range(d.nkv):
                self._attention_chains(li, rope, j, kv_only=kv_only)
            return
        j = 0
        # A head's attention in two parts (not KV-only): its first part (RoPE, KVROW and the
        # stores, the first buffer sets' queries and scores MVs) beside tile ti's MM, its
        # second (those rows' softmax chains first, then the other rows) right after the next
        # tile's MM, so the SFU works through them beside that MM instead of idling there
        # while the MV unit waits on it; one head in flight (its K slot stays busy till then)
        pend = []

        def flush():
            while pend:
                pend.pop(0)()

        def heads(upto, split=True):
            nonlocal j
            while j < upto:
                if pend:
                    self._add(None, flush)
                self._add(None, partial(self._rope_group, j, rope))
                self._attention_chains(li, rope, j, kv_only=kv_only,
                                       split=pend if split and not kv_only else None)
                j += 1

        for ti, (r0, _nr, _off) in enumerate(qkv.tiles):
            ready = min(d.nkv, r0 // d.grp_rows)       # heads complete before this tile
            if ready > j:
                copies = []
                self.matrix(qkv, L.qh, L.qkv, only=(ti,), copies=copies, after_mm=flush)
                heads(ready)
                self._add(None, lambda c=copies: [f() for f in c])
            else:
                self.matrix(qkv, L.qh, L.qkv, only=(ti,), after_mm=flush)
        heads(d.nkv, split=False)
        self._add(None, flush)

    def _rope_tokens(self, rope):
        """Every token's RoPE, token by token over the KV heads' groups (a prefill program on
        the chains)."""
        for t in range(self.T):
            for j in range(self.parts.dims.nkv):
                self._rope(t, j, rope)

    def _rope_group(self, j: int, rope: int):
        """Every token's RoPE of KV head ``j``'s q heads and k (a prefill program): the tokens
        in turn, backwards for odd ``j``, so a head's first ROPE uses the RoPE row the last
        head's last one left in SfuExec (it keeps the last table it read)."""
        for t in (range(self.T) if j % 2 == 0 else reversed(range(self.T))):
            self._rope(t, j, rope)

    def _layer_tables(self, li: int) -> tuple:
        """Layer ``li``'s tables (both norm vectors, the RoPE rows of positions R1 .. R1+T-1)
        into the next GB slot, then the attention norm; (the slot, its RoPE rows' address)."""
        parts, L, T = self.parts, self.L, self.T
        d = parts.dims
        gs = self._next_slot("G")
        gbase = L.gslots[gs]
        rope = gbase + 2 * d.dim * 4
        gid = f"tables.{li}"
        lds = [dict(buf=gbase, hreg=isa.REG_TBASE, hoff=hoff(parts.tables.norms[li]), len=2 * d.dim * 4),
               dict(buf=rope, hreg=isa.REG_TBASE, hoff=hoff(parts.tables.rope), ireg=isa.REG_POS,
                    stride=d.hd * 4, len=T * d.hd * 4)]
        self._add(LoadGroup(gid, ("G", gs), lds),
                  partial(self._attn_norm, gbase, gid, parts.weights.layers[li].qkv))
        return gs, rope

    def kv_rows(self, li: int):
        """A KV-only program's last layer: its tables, the attention norm, QKV and RoPE, and
        the K/V rows of the T tokens stored, as :meth:`attention` stores them; nothing that
        reads them. A final NOP waits for the last store (with attention on the chains, each
        KV head's slot is freed once its tiles are stored)."""
        parts, L = self.parts, self.L
        gs, rope = self._layer_tables(li)
        if parts.onchip.chains:
            self._qkv_prefill_chains(li, rope, kv_only=True)
        else:
            self.matrix(parts.weights.layers[li].qkv, L.qh, L.qkv)
            self._add(None, partial(self._rope_store, li, rope))
            self._add(None, lambda: self.consume("MISC", func=F["NOP"], free_slot=("G", gs),
                                                 need={"st2cmp": self.kv_stored[-1]}))

    def ffn(self, li: int, gs: int):
        """Layer ``li``'s feed-forward block: residual add, FFN norm (the tables in GB slot
        ``gs``), gate and up, SiLU-multiply, down, residual add."""
        L = self.L
        mats = self.parts.weights.layers[li]
        self._add(None, partial(self._ffn_in, L.gslots[gs], gs, mats.ffn_gate))
        gt = mats.ffn_gate.tiles
        if [t[:2] for t in gt] == [t[:2] for t in mats.ffn_up.tiles]:
            # gate and up tile by tile; each tile's SiLU-multiply beside the next tile's MVs
            # (docs/isa.md, "Overlap"); the quantization (planar: q, d, sumq) after the last.
            # Prefill (T > 1): the SiLU-multiplies of the tile before, token by token, go
            # between the gate tile's MM and its COPY (the first half of the tokens) and
            # between the up tile's MM and its COPY (the rest), so each half issues beside an
            # MM and the next MM follows the COPY without waiting for the SFU
            h = -(-self.T // 2)
            for ti in range(len(gt)):
                if self.T == 1:
                    self.matrix(mats.ffn_gate, L.qh, L.gate, only=(ti,))
                    if ti:
                        self._add(None, partial(self._silu_rows, *gt[ti - 1][:2]))
                    self.matrix(mats.ffn_up, L.qh, L.up, only=(ti,))
                    continue
                first = partial(self._silu_rows, *gt[ti - 1][:2], range(h)) if ti else None
                rest = partial(self._silu_rows, *gt[ti - 1][:2], range(h, self.T)) if ti else None
                self.matrix(mats.ffn_gate, L.qh, L.gate, only=(ti,), after_mm=first)
                self.matrix(mats.ffn_up, L.qh, L.up, only=(ti,), after_mm=rest, token_last=True)
            self._add(None, partial(self._inputs, mats.ffn_down, [
                partial(self._down_input, t, *gt[-1][:2]) for t in range(self.T)]))
        else:
            self.matrix(mats.ffn_gate, L.qh, L.gate)
            self.matrix(mats.ffn_up, L.qh, L.up)
            self._add(None, self._ffn_act)
        self.matrix(mats.ffn_down, L.qf, L.h, token_last=True)
        self._add(None, self._residual)

    def lm_head(self):
        """Final norm + LM head, the logits streamed out through two activation-buffer slots
        (a last-logits program: the last token's only, its MVs as the decode program's)."""
        parts, L = self.parts, self.L
        gs = self._next_slot("G")
        lds = [dict(buf=L.gslots[gs], hreg=isa.REG_TBASE, hoff=hoff(parts.tables.output_norm),
                    len=parts.dims.dim * 4)]
        if self.last_only:
            t, dim = self.T - 1, parts.dims.dim
            self._add(LoadGroup("onorm", ("G", gs), lds),
                      partial(self._norm_quant_token, t, L.x, L.gslots[gs], dim, gid="onorm",
                              free_slot=("G", gs)))
            self.matrix(parts.weights.head, L.qh + t * dim // 32 * QBLOCK_BYTES, None, logits=True)
            return
        self._add(LoadGroup("onorm", ("G", gs), lds),
                  partial(self.norm_quant, L.x, L.gslots[gs], parts.dims.dim, gid="onorm", free_slot=("G", gs)))
        self.matrix(parts.weights.head, L.qh, None, logits=True)

    def hidden_out(self):
        """The residual ``X`` leaves for the next stage (the compute queue is in order: the
        NOP releases the store once the last ADD has written ``X``)."""
        self._add(None, self._store_x)

    # ---- stage parts (compute, run by emit) ---------------------------------------------------
    def _embed_rows(self, es, nrow, k0, gid, efmt):
        parts, L = self.parts, self.L
        dim = parts.dims.dim
        for i in range(nrow):
            self.consume("MISC", gid=gid if i == 0 else None,
                         free_slot=("W", es) if i == nrow - 1 else None, func=F["EMBED"],
                         dst=L.x + (k0 + i) * dim * 4, a=parts.onchip.wslots[es] + i * parts.memory.tok_stride,
                         n=dim, aux=efmt)

    def _attn_norm(self, gbase, gid, cm):
        """The attention norm token by token into ``cm`` (the QKV matrix: :meth:`_inputs`)."""
        # the first QKV write of this layer overwrites q/k/v that the previous layer's KV
        # stores read: RMSNORM waits for those stores (st2cmp)
        need = {"st2cmp": self.kv_stored[-1] if self.kv_stored else None}
        self._inputs(cm, [partial(self._norm_quant_token, t, self.L.x, gbase, self.parts.dims.dim,
                                  gid=gid if t == 0 else None, need=need if t == 0 else None)
                          for t in range(self.T)])

    def _kv_offsets(self, li, j):
        """Offsets from KVBASE of the K and V cache of KV head ``j`` of stage layer ``li``
        (attention on the chains: of the head's region, twice)."""
        oc = self.parts.onchip
        if oc.chains:
            r = (li * self.parts.dims.nkv + j) * oc.kv_slot_bytes
            return r, r
        kvh = oc.kv_head_bytes
        kb = ((li * self.parts.dims.nkv + j) * 2) * kvh
        return kb, kb + kvh

    def _attention_decode(self, li, rope, j):
        """KV head ``j``: its K/V cache rows [0, R1) into a KV slot; RoPE, the new K/V rows
        stored at R1, ATTN (the current row from q/k/v)."""
        if self.parts.onchip.chains:
            return self._attention_chains(li, rope, j)
        parts = self.parts
        d = parts.dims
        kslots, kvh = parts.onchip.kslots, parts.onchip.kv_head_bytes
        ks = self._next_slot("K")
        kgid = f"kv.{li}.{j}"
        kb, vb = self._kv_offsets(li, j)
        klds = [dict(buf=kslots[ks], hreg=isa.REG_KVBASE, hoff=hoff(kb), lreg=isa.REG_POS, lmul=d.hd * 2),
                dict(buf=kslots[ks] + kvh, hreg=isa.REG_KVBASE, hoff=hoff(vb), lreg=isa.REG_POS,
                     lmul=d.hd * 2)]
        gaddr = self._group(0, j)
        self._add(LoadGroup(kgid, ("K", ks), klds),
                  partial(self._attend_decode, j, ks, kgid, gaddr, kb, vb, rope))

    def _attend_decode(self, j, ks, kgid, gaddr, kb, vb, rope):
        d = self.parts.dims
        g, hd = d.g, d.hd
        last = j == d.nkv - 1
        e = self.consume("MISC", func=F["ROPE"], dst=gaddr, a=gaddr, b=rope, n=g + 1, aux=hd, release=["cmp2st"])
        # new K and V rows -> HBM (fp16), at position R1
        self.S.emit("ST", need={"cmp2st": e["cmp2st"]}, func=isa.ST_F16, buf=gaddr + g * hd * 4,
                    hreg=isa.REG_KVBASE, hoff=hoff(kb), ireg=isa.REG_POS, stride=hd * 2, len=hd * 2)
        e2 = self.S.emit("ST", func=isa.ST_F16, buf=gaddr + (g + 1) * hd * 4, hreg=isa.REG_KVBASE,
                         hoff=hoff(vb), ireg=isa.REG_POS, stride=hd * 2, len=hd * 2,
                         release=["st2cmp"] if last else ())
        if last:
            self.kv_stored.append(e2["st2cmp"])
        # the current row comes from q/k/v (ATTN t = 0, not cached)
        self.consume("MISC", gid=kgid, free_slot=("K", ks), func=F["ATTN"], dst=self.L.o + j * g * hd * 4,
                     a=gaddr, b=self.parts.onchip.kslots[ks], reg=isa.REG_POS, **isa.attn_fields(g, hd))

    def _attention_chains(self, li, rope, j, kv_only=False, split=None):
        """KV head ``j`` with attention on the chains (docs/isa.md, "Attention on the chains"):
        its region's K row tiles and V block tiles from the tile of R1 on (``ceil(T/32)``
        tiles: a run of T tokens starts at a multiple of ``min(T, 32)``, so its positions
        fill whole tiles from R9) and V scales [0, R1) into a K slot; then
        :meth:`_attend_chains`."""
        ch = self.parts.onchip.chains
        reg = ch.region
        nt = -(-self.T // isa.TILE_ROWS)
        ks = self._next_slot("K")
        slot = ch.slots[ks]
        r0, _ = self._kv_offsets(li, j)
        lds = [dict(buf=slot + reg[k], hreg=isa.REG_KVBASE, hoff=hoff(r0 + reg[k]), len=nt * reg[t],
                    lreg=isa.REG_PBASE, lmul=reg[t] // isa.TILE_ROWS)
               for k, t in (("k", "k_tile"), ("v", "v_tile"))]
        lds.append(dict(buf=slot + reg["scale"], hreg=isa.REG_KVBASE, hoff=hoff(r0 + reg["scale"]),
                        lreg=isa.REG_POS, lmul=4))
        kgid = f"kv.{li}.{j}"
        if self.T == 1:
            self._add(LoadGroup(kgid, ("K", ks), lds),
                      partial(self._attend_chains_scores, j, ks, kgid, r0, rope))
            return partial(self._attend_chains_outputs, j, ks)
        self._add(LoadGroup(kgid, ("K", ks), lds),
                  partial(self._kv_only_chains, j, ks, kgid, r0) if kv_only
                  else partial(self._attend_chains, j, ks, kgid, r0, split=split))
        return None

    def _kv_only_chains(self, j, ks, kgid, r0):
        """A KV-only program's last layer on the chains: KV head ``j``'s rows of the T tokens
        into its tiles and to HBM (:meth:`_kvrow_store`); a NOP frees the slot once stored."""
        self._kvrow_store(j, ks, kgid, r0, self.T)
        self.consume("MISC", func=F["NOP"], need={"st2cmp": self._kv_st[ks]}, free_slot=("K", ks))

    def _attend_chains_scores(self, j, ks, kgid, r0, rope):
        """Decode, first part: RoPE, KVROW and the stores, each query head's QUANT and scores
        MV (the MVs back to back, so the softmax chains that follow need not wait on them)."""
        d = self.parts.dims
        ch = self.parts.onchip.chains
        g, hd = d.g, d.hd
        gaddr = self._group(0, j)
        slot = ch.slots[ks]
        self._rope(0, j, rope)
        self._kvrow_store(j, ks, kgid, r0)
        q8 = isa.mv_func("q8_0")
        for i in range(g):
            self.consume("MISC", func=F["QUANT"], dst=ch.qq[i], a=gaddr + i * hd * 4, n=hd)
        for i in range(g):
            self.consume("MV", func=q8 | isa.MV_RT, wb=slot + ch.region["k"], rows=1, rreg=isa.REG_POS,
                         cols=hd, qsrc=ch.qq[i], dst=ch.scores[i])

    def _attend_chains_outputs(self, j, ks):
        """Decode, second part: every query head's softmax, V scales and quantization (MISC
        work that runs beside the MV before it), then the output MVs."""
        d = self.parts.dims
        ch = self.parts.onchip.chains
        reg = ch.region
        g, hd = d.g, d.hd
        slot = ch.slots[ks]
        for i in range(g):
            sc = ch.scores[i]
            self.consume("MISC", func=F["SOFTMAX"], dst=sc, a=sc, n=1, reg=isa.REG_POS)
            self.consume("MISC", func=F["MUL"], dst=sc, a=sc, b=slot + reg["scale"], n=1, reg=isa.REG_POS)
            self.consume("MISC", func=F["QUANT"], dst=ch.pq[i], a=sc, n=isa.TILE_ROWS, reg=isa.REG_PBASE)
        q8 = isa.mv_func("q8_0")
        for i in range(g):
            last = i == g - 1
            self.consume("MV", func=q8 | isa.MV_BT, wb=slot + reg["v"], rows=hd, cols=isa.TILE_ROWS,
                         creg=isa.REG_PBASE, qsrc=ch.pq[i], dst=self.L.o + (j * g + i) * hd * 4,
                         need={"st2cmp": self._kv_st[ks]} if last else None,
                         free_slot=("K", ks) if last else None)

    def _group(self, t: int, j: int) -> int:
        """On-chip address of token ``t``'s rows of KV head ``j``'s group in the QKV output:
        its query heads, then k, then v (binary32)."""
        d = self.parts.dims
        return self.L.qkv + (t * d.qkv_rows + j * d.grp_rows) * 4

    def _rope(self, t: int, j: int, rope: int):
        """ROPE of token ``t``'s query heads and k of group ``j`` in place (RoPE row ``t`` at
        ``rope + t * hd * 4``)."""
        d = self.parts.dims
        a = self._group(t, j)
        return self.consume("MISC", func=F["ROPE"], dst=a, a=a, b=rope + t * d.hd * 4, n=d.g + 1,
                            aux=d.hd)

    def _kvrow_store(self, j, ks, kgid, r0, T=1):
        """KVROW of each token's k and v of group ``j`` (already rotated) at R1 + t, the ST.x
        of the touched K/V tiles and the V scales; the stores' st2cmp event is kept for the
        slot's last reader (``_kv_st``)."""
        d = self.parts.dims
        ch = self.parts.onchip.chains
        reg = ch.region
        g, hd = d.g, d.hd
        nt = -(-T // isa.TILE_ROWS)
        slot = ch.slots[ks]
        for t in range(T):
            e = self.consume("MISC", gid=kgid if t == 0 else None, func=F["KVROW"], dst=slot,
                             a=self._group(t, j) + g * hd * 4, n=hd, reg=isa.REG_POS, aux=t,
                             release=["cmp2st"] if t == T - 1 else ())
        st = [dict(buf=slot + reg[k], hoff=hoff(r0 + reg[k]), ireg=isa.REG_PTILE, stride=reg[t],
                   len=nt * reg[t])
              for k, t in (("k", "k_tile"), ("v", "v_tile"))]
        st.append(dict(buf=slot + reg["scale"], hoff=hoff(r0 + reg["scale"]), ireg=isa.REG_POS, stride=4,
                       len=4 * T))
        for i, f in enumerate(st):
            last = i == len(st) - 1
            ev = self.S.emit("ST", need={"cmp2st": e["cmp2st"]} if i == 0 else None, func=isa.ST_X,
                             hreg=isa.REG_KVBASE, release=["st2cmp"] if last else (), **f)
        self._kv_st[ks] = ev["st2cmp"]

    def _attend_chains(self, j, ks, kgid, r0, split=None):
        """A prefill program's attention of KV head ``j`` over its T tokens (docs/isa.md,
        "Prefill programs on the chains"): every token's K/V rows first, then the attention
        rows (token t, query head i) software-pipelined over the buffer sets. ``split``: a
        list to append the second part to (a callable; see :meth:`_qkv_prefill_chains`)
        instead of emitting it: the first part ends with the first buffer sets' scores MVs,
        the second starts with their softmax chains, so it can go right after an MM."""
        d, L, T = self.parts.dims, self.L, self.T
        ch = self.parts.onchip.chains
        reg = ch.region
        g, hd = d.g, d.hd
        slot = ch.slots[ks]

        def gaddr(t):           # token t's q heads, k and v of this group
            return self._group(t, j)

        # every token's q heads and k rotated (before, :meth:`_rope_group`); its K and V
        # rows into the slot's tiles at R1 + t; those tiles and the V scales to HBM
        self._kvrow_store(j, ks, kgid, r0, T)
        stored = self._kv_st[ks]
        q8 = isa.mv_func("q8_0")
        # the attention rows: token t's query head i; row k uses buffer set k % nb
        rows = [(t, i) for t in range(T) for i in range(g)]
        nb = len(ch.qq)

        def quant_q(k):
            t, i = rows[k]
            self.consume("MISC", func=F["QUANT"], dst=ch.qq[k % nb], a=gaddr(t) + i * hd * 4, n=hd)

        def scores(k):
            # positions [0, R1 + t]: the K row tiles times the quantized query
            t, _ = rows[k]
            self.consume("MV", func=q8 | isa.MV_RT, wb=slot + reg["k"], rows=1 + t, rreg=isa.REG_POS,
                         cols=hd, qsrc=ch.qq[k % nb], dst=ch.scores[k % nb])

        def softmax(k):
            t, _ = rows[k]
            sc = ch.scores[k % nb]
            self.consume("MISC", func=F["SOFTMAX"], dst=sc, a=sc, n=1 + t, reg=isa.REG_POS)

        def scale_quant(k):
            # the V scales, then the probabilities quantized from R9 on (whole 32-position
            # tiles)
            t, _ = rows[k]
            sc = ch.scores[k % nb]
            self.consume("MISC", func=F["MUL"], dst=sc, a=sc, b=slot + reg["scale"], n=1 + t, reg=isa.REG_POS)
            self.consume("MISC", func=F["QUANT"], dst=ch.pq[k % nb], a=sc,
                         n=(t // isa.TILE_ROWS + 1) * isa.TILE_ROWS, reg=isa.REG_PBASE)

        def output(k):
            # the transposed V block tiles times the quantized scaled probabilities
            t, i = rows[k]
            last = k == len(rows) - 1
            self.consume("MV", func=q8 | isa.MV_BT, wb=slot + reg["v"], rows=hd,
                         cols=(t // isa.TILE_ROWS + 1) * isa.TILE_ROWS,
                         creg=isa.REG_PBASE, qsrc=ch.pq[k % nb], dst=L.o + (t * d.nq * hd + (j * g + i) * hd) * 4,
                         need={"st2cmp": stored} if last else None,
                         free_slot=("K", ks) if last else None)

        # software-pipelined over the rows (docs/isa.md, "Overlap"). Depth 1 (two buffer
        # sets): row k's SFU work (softmax, V scales, quantization) beside row k+1's scores
        # MV. Depth 2 (three or more sets): the MV unit runs row k+2's scores and row k's
        # output back to back while the SFU does row k+1's softmax (issued between them, so
        # row k's output does not wait behind it in the in-order issue), then its scales and
        # quantization
        depth = 2 if nb >= 3 else 1

        def pipeline(quanted, scored, chained):
            # every row's output MV, each beside the later rows' work; the rows below
            # ``quanted`` / ``scored`` / ``chained`` already have their query QUANT / scores
            # MV / softmax chain (SOFTMAX, MUL, QUANT) emitted
            for k in range(len(rows)):
                n = k + depth
                if scored <= n < len(rows):
                    if n >= quanted:
                        quant_q(n)
                    scores(n)
                if depth == 1 and k >= chained:
                    softmax(k)
                    scale_quant(k)
                if depth == 2 and chained <= k + 1 < len(rows):
                    softmax(k + 1)
                if k == len(rows) - 1:      # the slot is freed by this output MV
                    self._busy.discard(("K", ks))
                output(k)
                if depth == 2 and chained <= k + 1 < len(rows):
                    scale_quant(k + 1)

        if split is not None:
            # the first part: the first buffer sets' query QUANTs and scores MVs; the second
            # (``rest``): their softmax chains (beside the MM before), then the pipeline
            first = min(nb, len(rows))
            for k in range(first):
                quant_q(k)
            for k in range(first):
                scores(k)
            self._busy.add(("K", ks))

            def rest():
                for k in range(first):
                    softmax(k)
                    scale_quant(k)
                pipeline(first, first, first)
            split.append(rest)
            return
        for k in range(min(nb, len(rows))):
            quant_q(k)
        for k in range(min(depth, len(rows))):
            scores(k)
        if depth == 2:
            softmax(0)
            scale_quant(0)
        pipeline(min(nb, len(rows)), min(depth, len(rows)), 1 if depth == 2 else 0)

    def _attention_prefill(self, li, rope):
        """RoPE and the K/V stores of every token; then per KV head (after a SYNC: the cache
        rows [0, R1 + T) must have reached HBM) its cache into a KV slot and ATTN per token."""
        parts = self.parts
        d = parts.dims
        kslots, kvh = parts.onchip.kslots, parts.onchip.kv_head_bytes
        T = self.T
        self._add(None, partial(self._rope_store, li, rope))
        for j in range(d.nkv):
            ks = self._next_slot("K")
            kgid = f"kv.{li}.{j}"
            kb, vb = self._kv_offsets(li, j)
            klds = [dict(buf=kslots[ks], hreg=isa.REG_KVBASE, hoff=hoff(kb), len=T * d.hd * 2,
                         lreg=isa.REG_POS, lmul=d.hd * 2),
                    dict(buf=kslots[ks] + kvh, hreg=isa.REG_KVBASE, hoff=hoff(vb), len=T * d.hd * 2,
                         lreg=isa.REG_POS, lmul=d.hd * 2)]
            self._add(LoadGroup(kgid, ("K", ks), klds), partial(self._attend_prefill, j, ks, kgid),
                      barrier=j == 0)

    def _rope_store(self, li, rope):
        # rotate q and k of every token and group; K/V rows -> HBM at R1 + t
        d = self.parts.dims
        g, hd, T = d.g, d.hd, self.T
        for t in range(T):
            for j in range(d.nkv):
                gaddr = self._group(t, j)
                kb, vb = self._kv_offsets(li, j)
                e = self.consume("MISC", func=F["ROPE"], dst=gaddr, a=gaddr, b=rope + t * hd * 4,
                                 n=g + 1, aux=hd, release=["cmp2st"])
                self.S.emit("ST", need={"cmp2st": e["cmp2st"]}, func=isa.ST_F16,
                            buf=gaddr + g * hd * 4, hreg=isa.REG_KVBASE, hoff=hoff(kb + t * hd * 2),
                            ireg=isa.REG_POS, stride=hd * 2, len=hd * 2)
                last = t == T - 1 and j == d.nkv - 1
                e2 = self.S.emit("ST", func=isa.ST_F16, buf=gaddr + (g + 1) * hd * 4, hreg=isa.REG_KVBASE,
                                 hoff=hoff(vb + t * hd * 2), ireg=isa.REG_POS, stride=hd * 2, len=hd * 2,
                                 release=["st2cmp"] if last else ())
                if last:
                    self.kv_stored.append(e2["st2cmp"])

    def _attend_prefill(self, j, ks, kgid):
        # token t attends to positions [0, R1 + t], all from the cache
        d, L = self.parts.dims, self.L
        g, hd = d.g, d.hd
        kslot = self.parts.onchip.kslots[ks]
        self.each_token(lambda t, k: self.consume(
            "MISC", func=F["ATTN"], dst=L.o + (t * d.nq * hd + j * g * hd) * 4,
            a=self._group(t, j), b=kslot, reg=isa.REG_POS,
            **isa.attn_fields(g, hd, t, cached=True), **k), gid=kgid, free_slot=("K", ks))

    def _ffn_in(self, gbase, gs, cm):
        """The residual add, then the FFN norm token by token into ``cm`` (the gate matrix:
        :meth:`_inputs`)."""
        L, dim = self.L, self.parts.dims.dim
        self._residual()
        self._inputs(cm, [partial(self._norm_quant_token, t, L.x, gbase + dim * 4, dim,
                                  free_slot=("G", gs) if t == self.T - 1 else None)
                          for t in range(self.T)])

    def _silu_rows(self, r0, nr, tokens=None):
        """SiLU-multiply of rows [r0, r0 + nr) of gate and up, token by token (``tokens``:
        these only)."""
        L, ffn = self.L, self.parts.dims.ffn
        for t in (range(self.T) if tokens is None else tokens):
            o = (t * ffn + r0) * 4
            self.consume("MISC", func=F["SILU_MUL"], dst=L.gate + o, a=L.gate + o, b=L.up + o, n=nr)

    def _down_input(self, t, r0, nr):
        """Token ``t``'s SiLU-multiply of the last gate/up tile's rows, then its quantized FFN
        activation (the down projection's input)."""
        self._silu_rows(r0, nr, (t,))
        self._quant_token(t, self.L.qf, self.L.gate, self.parts.dims.ffn)

    def _ffn_act(self):
        L, ffn = self.L, self.parts.dims.ffn
        self.elementwise("SILU_MUL", L.gate, L.gate, L.up, ffn)
        self.quant(L.qf, L.gate, ffn)

    def _store_x(self):
        e = self.consume("MISC", func=F["NOP"], release=["cmp2st"])
        self.S.emit("ST", need={"cmp2st": e["cmp2st"]}, func=isa.ST_F32, buf=self.L.x,
                    hreg=isa.REG_IOBASE, hoff=hoff(0), len=self.T * self.parts.dims.dim * 4)

    # ---- matrices -----------------------------------------------------------------------------
    def matrix(self, cm, qsrc, dst, logits=False, only=None, after_mm=None, copies=None, token_last=False):
        """A weight matrix, tile by tile through the weight slots, times the quantized vectors
        at ``qsrc``: rows to ``dst`` (token-major), or (``logits``) to the I/O region.
        ``only``: just these tiles (by index). ``after_mm``: emits work to go right after a
        staged tile's MM, before its COPY (prefill). ``copies``: a list the staged tiles'
        COPYs are put in (as callables, when the tile is emitted) instead of being emitted,
        for a later work item to emit. ``token_last``: with one token lane, the last tile token by
        token, its outputs' work left to the residual add (:meth:`_residual`)."""
        for ti, (r0, nr, off) in enumerate(cm.tiles):
            if only is not None and ti not in only:
                continue
            s = self._next_slot("W")
            gid = f"{cm.name}.{ti}"
            # the tile's bytes, slice-major (docs/isa.md, "Slices"): isa.mv_span of them
            lds = [dict(buf=self.parts.onchip.wslots[s], hreg=isa.REG_WBASE, hoff=hoff(off),
                        len=cm.tile_bytes(nr))]
            self._add(LoadGroup(gid, ("W", s), lds),
                      partial(self._matrix_tile, cm, s, gid, ti, r0, nr, qsrc, dst, logits, after_mm,
                              copies, token_last and ti == len(cm.tiles) - 1 and self._reload_small(cm, nr)))

    def _matrix_tile(self, cm, s, gid, ti, r0, nr, qsrc, dst, logits, after_mm=None, copies=None,
                     token_last=False):
        T, L = self.T, self.L
        if logits and self.last_only:
            T = 1                   # the last token's logits: its MVs (qsrc: its vector)
        mf = dict(func=isa.mv_func(cm.fmt, cm.sparsity), wb=self.parts.onchip.wslots[s], rows=nr, cols=cm.cols,
                  qsrc=qsrc)
        op = "MV" if T == 1 else "MM"
        if T > 1:
            mf["ntok"] = T
        if not logits:
            if T == 1:
                self.consume(op, gid=gid, free_slot=("W", s), dst=dst + r0 * 4, **mf)
            elif self._token_by_token(token_last):
                # the last tile token by token; each token's scatter (a staged tile), then its
                # residual add and the next matrix's inputs, beside the next token's MV
                st = dst
                if len(cm.tiles) > 1:
                    st = L.stage[self._stage_turn % len(L.stage)]
                    self._stage_turn += 1
                self._mm(cm, gid, s, st, mf, by_token=True)
                if after_mm:
                    after_mm()
                self._outputs_left = [
                    [partial(self.consume, "MISC", func=F["COPY"], dst=dst + (t * cm.rows + r0) * 4,
                             a=st + t * nr * 4, n=nr, aux=1, b=cm.rows)] if st != dst else []
                    for t in range(T)]
            elif len(cm.tiles) == 1:
                self._mm(cm, gid, s, dst, mf)
            else:
                # [T][nr] into a stage, then scattered to rows r0.. of each token; the stages
                # alternate, so the COPY runs beside the next tile's MM
                st = L.stage[self._stage_turn % len(L.stage)]
                self._stage_turn += 1
                self._mm(cm, gid, s, st, mf)
                if after_mm:
                    after_mm()
                copy = partial(self.consume, "MISC", func=F["COPY"], dst=dst + r0 * 4, a=st, n=nr, aux=T,
                               b=cm.rows)
                if copies is not None:
                    copies.append(copy)
                elif len(L.stage) > 1:
                    # after the next MV/MM word, or before the next other one (consume): the
                    # next tile's MM then waits in MvExec behind this one, set up, instead of
                    # arriving only once this COPY has issued (after this MM's done)
                    self._copy_left = copy
                else:
                    copy()
            return
        ls = ti % 2
        e = self.consume(op, gid=gid, free_slot=("W", s),
                         need={"st2cmp": self.logits_stored.get(ls, {}).get("st2cmp")},
                         release=["cmp2st"], dst=L.logits[ls], **mf)
        # logits tile-major: tile (r0, nr) is [T][nr] at T*r0*4
        self.logits_stored[ls] = self.S.emit(
            "ST", need={"cmp2st": e["cmp2st"]}, release=["st2cmp"], func=isa.ST_F32, buf=L.logits[ls],
            hreg=isa.REG_IOBASE, hoff=hoff(T * r0 * 4), len=T * nr * 4)

    def _mm(self, cm, gid, s, dst, mf, by_token=False):
        """A tile's MM of the T tokens into ``dst`` ([T][rows]); if :meth:`_inputs` left the
        inputs of the tokens after the first to this matrix (or ``by_token``), token by token
        instead: each token's inputs, then its MV into its rows of ``dst``, the first waiting
        for the tile, the last freeing its slot."""
        left = self._inputs_left
        if left is None or left[0] != cm.name:
            if not by_token:
                self.consume("MM", gid=gid, free_slot=("W", s), dst=dst, **mf)
                return
            left = (cm.name, [lambda: None] * (self.T - 1))
        self._inputs_left = None
        T, nb = self.T, cm.cols // 32
        f = {k: v for k, v in mf.items() if k != "ntok"}
        for t in range(T):
            if t:
                left[1][t - 1]()
            self.consume("MV", gid=gid if t == 0 else None, free_slot=("W", s) if t == T - 1 else None,
                         **dict(f, qsrc=f["qsrc"] + t * nb * QBLOCK_BYTES, dst=dst + t * mf["rows"] * 4))

    # ---- vector operations over the T tokens ----------------------------------------------------
    def each_token(self, fn, gid=None, free_slot=None, need=None):
        """fn(t, kwargs) for t < T: the first waits for gid/need, the last frees the slot."""
        T = self.T
        for t in range(T):
            kw = {}
            if t == 0:
                kw.update(gid=gid, need=need)
            if t == T - 1:
                kw["free_slot"] = free_slot
            fn(t, kw)

    def quant(self, dst, a, n, **kw):
        """The T vectors of n words at ``a`` quantized to ``dst``."""
        self.each_token(lambda t, k: self.consume("MISC", func=F["QUANT"], dst=dst + t * n // 32 * QBLOCK_BYTES,
                                                  a=a + t * n * 4, n=n, **k), **kw)

    def norm_quant(self, a, w, n, gid=None, free_slot=None, need=None):
        """H = rms_norm(a) per token, QH = quant(H) per token."""
        T = self.T
        for t in range(T):
            self._norm_quant_token(t, a, w, n, gid=gid if t == 0 else None, need=need if t == 0 else None,
                                   free_slot=free_slot if t == T - 1 else None)

    def _norm_quant_token(self, t, a, w, n, gid=None, free_slot=None, need=None):
        """Token ``t``'s H = rms_norm(a), QH = quant(H)."""
        L = self.L
        self.consume("MISC", gid=gid, need=need, free_slot=free_slot, func=F["RMSNORM"],
                     dst=L.h + t * n * 4, a=a + t * n * 4, b=w, n=n)
        self._quant_token(t, L.qh, L.h, n)

    def _quant_token(self, t, dst, a, n):
        """Token ``t``'s vector of n words at ``a`` (token-major) quantized into ``dst``."""
        self.consume("MISC", func=F["QUANT"], dst=dst + t * n // 32 * QBLOCK_BYTES, a=a + t * n * 4, n=n)

    def _token_by_token(self, wanted=True) -> bool:
        """Whether this program runs a matrix's first (or, ``wanted``, last) tile token by
        token: a prefill program with one token lane."""
        return bool(wanted) and self.T > 1 and self.parts.token_lanes == 1

    def _reload_small(self, cm, rows: int, share: int = 2) -> bool:
        """Whether reloading the T tokens' vectors of matrix ``cm`` (40 bytes a block, 32 bytes a
        cycle) costs at most ``1 / share`` of an MM of a ``rows``-row tile of it. A last tile
        token by token reloads each token's vector (MvExec's activation cache holds one MV's
        vector, not the MM's T): ``share`` 2; SmolLM2's tiles pass (u280-slice's 8 pipelines,
        the up projection's last tile: a 23-cycle reload beside 144 cycles a token), LLaMA2-7B's
        4096-column up projection's 64-row last tile on u280's 128 pipelines does not (160
        beside 128: by the model, one token lane, 128 tokens, 0.6 % more cycles token by
        token). The heads' MVs between QKV tiles make the next tile reload: ``share`` 8
        (:meth:`_qkv_prefill_chains`)."""
        nb = cm.cols // 32
        reload = self.T * nb * QBLOCK_BYTES / 32
        tile = -(-rows // self.parts.pipelines) * nb * -(-self.T // self.parts.token_lanes)
        return share * reload <= tile

    def _residual(self):
        """X += H over the T tokens; after a last tile token by token (``_outputs_left``), each
        token's add joins that token's work after it (its scatter), for the next matrix's
        inputs (:meth:`_inputs`) to follow."""
        L, dim = self.L, self.parts.dims.dim
        if self._outputs_left is None:
            self.elementwise("ADD", L.x, L.x, L.h, dim)
            return
        for t, work in enumerate(self._outputs_left):
            work.append(partial(self.consume, "MISC", func=F["ADD"], dst=L.x + t * dim * 4,
                                a=L.x + t * dim * 4, b=L.h + t * dim * 4, n=dim))

    def _flush_outputs(self):
        """Emit the per-token work a last tile token by token left, token by token."""
        left, self._outputs_left = self._outputs_left, None
        for work in left or ():
            for f in work:
                f()

    def _inputs(self, cm, fns):
        """The per-token work (``fns[t]``) that makes matrix ``cm``'s input vectors. With more
        tokens than token lanes (a prefill program) and one token lane, only the first
        token's is emitted here; ``cm``'s first tile emits the rest token by token, each
        token's after the MV of the token before, so it runs beside that MV (docs/isa.md,
        "Overlap"): the first tile's MVs start after one token's norm and quantization, not
        all T tokens'. Not with several token lanes: the lane groups' MMs reload the tokens'
        vectors for the tile and the next tiles reload them all (LLaMA2-7B on ``u280``, two
        lanes, bucket 4, by the model: 7.80 -> 7.82 M cycles a run, where one lane gains
        11.92 -> 11.84 M)."""
        left, self._outputs_left = self._outputs_left, None
        if left is not None:        # the tokens' work after the last tile before, then this
            fns = [partial(_in_order, *w, f) for w, f in zip(left, fns)]
        if not self._token_by_token():
            for f in fns:
                f()
            return
        fns[0]()
        assert self._inputs_left is None, self._inputs_left
        self._inputs_left = (cm.name, fns[1:])

    def elementwise(self, func, dst, a, b, n):
        """An elementwise op over T token-major vectors of n words (n fits 16 bits)."""
        T = self.T
        per = max(1, 0xFFFF // n)
        t = 0
        while t < T:
            k = min(per, T - t)
            self.consume("MISC", func=F[func], dst=dst + t * n * 4, a=a + t * n * 4, b=b + t * n * 4, n=k * n)
            t += k

    # ---- queues, slots and tokens ---------------------------------------------------------------
    def _add(self, loads, compute, barrier=False):
        self.work.append(WorkItem(loads, compute, barrier))

    def _next_slot(self, kind):
        """The next slot of the ring ``kind``: weight tiles ("W"), K/V ("K"), tables ("G")."""
        n = self.parts.onchip.n_wslots if kind == "W" else 2
        s = self._slot_counters[kind] % n
        self._slot_counters[kind] += 1
        return s

    def _load(self, item):
        """Emit the LDs of an item's group into its slot; the first waits for the slot, the
        last releases the group."""
        grp = item.loads
        if grp is None:
            return
        assert grp.slot not in self._busy, f"a load into {grp.slot} before its last user frees it"
        need = {"cmp2ld": self.ring_free.get(grp.slot)}
        for i, f in enumerate(grp.loads):
            last = i == len(grp.loads) - 1
            e = self.S.emit("LD", need=need if i == 0 else None, release=["ld2cmp"] if last else (), **f)
            if last:
                self.group_ready[grp.gid] = e["ld2cmp"]

    def consume(self, op, gid=None, free_slot=None, need=None, release=(), **f):
        """Emit a compute instruction: it waits for load group ``gid`` (and ``need``) and,
        with ``free_slot``, frees that slot for the next loads. Work a last tile token by token
        left goes first (whatever comes next may read its rows)."""
        mv = op in ("MV", "MM")
        left = self._copy_left
        if left is not None and not mv:
            self._flush_copy()
        if self._outputs_left is not None:
            self._flush_outputs()
        nd = dict(need or {})
        if gid is not None:
            nd["ld2cmp"] = max(nd.get("ld2cmp") or 0, self.group_ready[gid])
        rel = list(release)
        if free_slot is not None:
            rel.append("cmp2ld")
        e = self.S.emit(op, need=nd, release=rel, **f)
        if free_slot is not None:
            self.ring_free[free_slot] = e["cmp2ld"]
        if mv and left is not None and self._copy_left is left:
            self._flush_copy()
        return e

    def _flush_copy(self):
        """Emit the COPY a staged tile left (``_copy_left``)."""
        left, self._copy_left = self._copy_left, None
        if left is not None:
            left()
