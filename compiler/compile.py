"""The compiler: imported model + accelerator configuration -> program bundle.

One decode program serves every position: the token position (R1), the token
id (R7) and the region bases (R3..R6) are runtime registers; the KV-cache
loads scale their length by R1, the KV stores and the RoPE-table load index
by R1, the embedding load by R7. Program size does not grow with context.

Schedule (decoupled access-execute): weights stream through a ring of 2 or 4
weight-buffer slots (WB; 4 when each holds >= 1024 cycles of the ports'
bandwidth), the per-head KV cache through a double-buffered KV buffer
(KB), per-layer tables (norm weights, RoPE row) through a double-buffered
global buffer (GB). Loads for step i+1 are issued before the compute of step
i, so loads overlap compute; dependency tokens order them (see docs/isa.md).
During decode the activations never leave the chip: the only stores are the
new K/V rows and the logits.

Prefill programs, one per bucket T (powers of two whose T-token activations fit
the activation buffer), run the same schedule over T tokens at positions
R1 .. R1+T-1: MM with ntok = T streams every weight tile once per T tokens, the
token rows come from the I/O region (staged by the host), the K/V rows of the
T tokens are stored, a SYNC makes them visible, and ATTN reads every position
from the cache. Their logits and KV cache are bit-identical to T decode steps
(docs/isa.md, "Prefill programs").
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from llmfab.core.errors import CompileError, FitError
from llmfab.core import formats
from llmfab.core.formats import QBLOCK_BYTES
from llmfab.compiler import isa, quant, sparse
from llmfab.compiler.bundle import FORMAT_VERSION, Bundle
from llmfab.compiler.identity import compiler_hash, model_hash
from llmfab.compiler.model import Model

ALIGN = 4096
GB_CONSTS = 64             # constants block at the start of GB: eps, attention scale
WEIGHT_SLOTS_LARGE = 4     # weight tile slots when each holds >= SLOT_MIN_CYCLES of loads
SLOT_MIN_CYCLES = 1024     # (else 2)
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _align(x, a=ALIGN):
    return (x + a - 1) // a * a


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


# --------------------------------------------------------------------------------------
# layout helpers
# --------------------------------------------------------------------------------------

@dataclass
class Region:
    base: int
    size: int


@dataclass
class CompiledMatrix:
    name: str
    fmt: str
    sparsity: str
    rows: int
    cols: int
    row_bytes: int
    hbm_off: int          # offset from WBASE
    tiles: list = field(default_factory=list)   # (row0, nrows, hbm_off)


class OnChip:
    """Bump allocator over one region of the unified on-chip address space."""

    def __init__(self, name, base, size):
        self.name, self.base, self.size, self.top = name, base, size, 0

    def alloc(self, nbytes, what, align=64):
        self.top = _align(self.top, align)
        if self.top + nbytes > self.size:
            raise FitError(f"on-chip {self.name} buffer too small: {what} needs {nbytes} bytes, "
                           f"{self.size - self.top} of {self.size} left; use a configuration "
                           f"with a larger buffers.{self.name}_kib")
        addr = self.base + self.top
        self.top += nbytes
        return addr


def _row_bytes(fmt, sp, cols):
    return cols // 32 * formats.block_bytes(fmt, sp)


def _encode_rows(fmt, sp, raw, mask):
    if sp == "dense":
        return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    return sparse.encode_sparse_rows(fmt, raw, mask, sp).reshape(-1)


def parse_sparsity(spec: str | None) -> dict:
    """'2:4' (all projections) or 'ffn=2:4,attn=8:16' -> {matrix name: pattern}.

    Each matrix may be named once: a repeated target (``ffn=2:4,ffn=8:16``) or two
    targets that share a matrix (``2:4,ffn=8:16``) are refused, not resolved by order.
    """
    out = {m: "dense" for m in MATRICES}
    if not spec:
        return out
    set_by = {}
    groups = {"ffn": ("ffn_gate", "ffn_up", "ffn_down"),
              "attn": ("attn_q", "attn_k", "attn_v", "attn_output"),
              "all": MATRICES}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            key, pat = part.split("=", 1)
        else:
            key, pat = "all", part
        names = groups.get(key, (key,) if key in MATRICES else None)
        if names is None:
            raise CompileError(f"--sparsity: unknown target '{key}' "
                               f"(use all, ffn, attn or one of {', '.join(MATRICES)})")
        formats.pattern(pat)
        for n in names:
            if n in set_by:
                first = set_by[n]
                raise CompileError(f"--sparsity: target '{key}' is given twice" if first == key else
                                   f"--sparsity: targets '{first}' and '{key}' both set {n}; "
                                   f"give each matrix one pattern")
            set_by[n] = key
            out[n] = pat
    return out


# --------------------------------------------------------------------------------------
# the compiler
# --------------------------------------------------------------------------------------

def _device_bytes(model, ctx, sp_of):
    """(weights, kv, total) bytes a model needs in device memory (before padding)."""
    d = model.desc
    wbytes = 0
    for name, t in model.tensors.items():
        if len(t.shape) != 2:
            continue
        fmt = t.qtype if t.qtype in quant.BLOCK_BYTES else "q8_0"
        key = name.split(".")[-2] if name.startswith("blk.") else ""
        wbytes += t.shape[0] * _row_bytes(fmt, sp_of.get(key, "dense"), t.shape[1])
    kv = d.n_layers * d.n_kv_heads * 2 * ctx * d.head_dim * 2
    io = d.vocab_size * 4
    tables = (2 * d.n_layers + 1) * d.dim * 4 + ctx * d.head_dim * 4
    return wbytes, kv, wbytes + kv + io + tables


def _check_device_memory(model, config, ctx, sp_of):
    wbytes, kv, total = _device_bytes(model, ctx, sp_of)
    board = config.board_spec
    cap = board.total_memory_bytes
    if total > cap:
        raise FitError(f"model '{model.desc.name}' needs {total / 2**30:.2f} GiB of device memory "
                       f"(weights {wbytes / 2**30:.2f} GiB, KV cache {kv / 2**30:.2f} GiB "
                       f"at context {ctx}) but board '{board.name}' has {cap / 2**30:.2f} GiB")


def _llmfab_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llmfab")
    except PackageNotFoundError:
        return "unknown"


def _weight_slots(wb_sz: int, config) -> tuple:
    """(slots, bytes per slot) of a weight buffer of ``wb_sz`` bytes.

    Weight tiles rotate through the slots; the load engine runs up to (slots - 1)
    tiles ahead of the compute queue, which hides the SFU work between matrices.
    Four slots when each still holds >= SLOT_MIN_CYCLES of the ports' bandwidth
    (ci), else two (short tiles would pay the per-instruction overhead too often).
    """
    n = 2
    if wb_sz // WEIGHT_SLOTS_LARGE >= SLOT_MIN_CYCLES * config.hbm_bytes_per_cycle:
        n = WEIGHT_SLOTS_LARGE
    return n, (wb_sz // n) // 64 * 64


def _rows_per_tile(config, wslot_bytes: int, rb: int) -> int:
    """Rows of ``rb`` bytes per weight tile: whole chains when a slot holds them, else whole
    32-byte units of device memory, else as many as fit."""
    per = wslot_bytes // rb
    unit = int(np.lcm(config.chain.count, 8))    # whole chains; 32-byte aligned logits
    if per >= unit:
        return per // unit * unit
    a = int(np.lcm(8, 32 // np.gcd(rb, 32)))      # whole 32-byte units of HBM per tile
    return per // a * a if per >= a else per


def _tiling_problem(config, wslot_bytes: int, rb: int, rows: int, head: bool) -> str | None:
    """Why a matrix of ``rows`` rows of ``rb`` bytes cannot be tiled into slots of
    ``wslot_bytes`` (None: it can)."""
    if rb > wslot_bytes:
        return f"a row ({rb} bytes) does not fit a weight-buffer slot of {wslot_bytes} bytes"
    per = _rows_per_tile(config, wslot_bytes, rb)
    starts = range(per, rows, per)
    if head and any(r % 8 for r in starts):
        return (f"a weight-buffer slot of {wslot_bytes} bytes holds {per} row{'s' * (per != 1)} "
                f"({rb} bytes each), but LM-head tiles must start at multiples of 8 rows")
    if any((r * rb) % isa.HBM_ALIGN for r in starts):
        return (f"a weight-buffer slot of {wslot_bytes} bytes holds {per} row{'s' * (per != 1)} "
                f"({rb} bytes each), but tiles must start at {isa.HBM_ALIGN}-byte aligned offsets")
    return None


def _weight_matrices(model, sp_of: dict) -> set:
    """(row bytes, rows, is LM head) of every weight matrix the compiler tiles."""
    d = model.desc
    fmt_of = lambda t: "q8_0" if t.qtype in ("f32", "f16") else t.qtype   # noqa: E731
    head = model.tensor("token_embd.weight" if d.tied_embeddings else "output.weight")
    mats = {(_row_bytes(fmt_of(head), "dense", head.shape[1]), head.shape[0], True)}
    if not d.tied_embeddings:
        t = model.tensor("token_embd.weight")
        mats.add((_row_bytes(fmt_of(t), "dense", t.shape[1]), t.shape[0], False))
    for li in range(d.n_layers):
        for w in ("attn_q", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            t = model.layer(li, w)
            rows = d.n_kv_heads * (d.gqa_group + 2) * d.head_dim if w == "attn_q" else t.shape[0]
            mats.add((_row_bytes(fmt_of(t), sp_of[w], t.shape[1]), rows, False))
    return mats


def _min_weight_kib(model, config, sp_of: dict) -> int:
    """The smallest ``buffers.weight_kib`` that every weight matrix of ``model`` tiles into."""
    mats = _weight_matrices(model, sp_of)
    kib = max(1, -(-2 * max(rb for rb, _, _ in mats) // 1024))
    while any(_tiling_problem(config, _weight_slots(kib * 1024, config)[1], rb, rows, head)
              for rb, rows, head in mats):
        kib += 1
    return kib


def _config_file(config) -> str:
    """The configuration's file for messages (the path given, or boards/configs/<name>.yaml)."""
    return config.source or f"configuration '{config.name}'"


def _weight_buffer_error(config, model, sp_of, what: str) -> FitError:
    """The weight buffer is too small: say so, naming the configuration file, and the size it needs."""
    return FitError(f"{_config_file(config)}: buffers.weight_kib {config.buffers.weight_kib} is too "
                    f"small: {what}; set buffers.weight_kib to at least "
                    f"{_min_weight_kib(model, config, sp_of)} for this model")


def compile_model(model: Model, config, *, sparsity: str | None = None, progress: bool = False,
                  context: int | None = None, emit_image: bool = True, prefill: bool = True,
                  layers: tuple | None = None) -> Bundle:
    """Compile ``model`` for ``config`` into a bundle (decode and prefill programs + HBM image + manifest).

    ``prefill=False`` compiles the decode program only.

    ``emit_image=False`` lays out the weights (sizes and addresses) without
    copying them, for program-size and compile-time studies of shape-only models.

    ``layers=(a, b)`` compiles one pipeline stage (compiler/partition.py): layers
    ``a .. b-1`` only, with the embedding when ``a == 0`` and the final norm and LM
    head when ``b`` is the last layer. A stage that does not start at layer 0 reads
    its input, the float32 residual ``X`` of its T tokens, from ``memory_map
    ["hidden_in"]``; one that does not end the model stores its ``X`` to
    ``memory_map["hidden_out"]`` instead of logits: the same bits the whole model
    carries from layer ``b-1`` to layer ``b`` in its activation buffer.
    """
    t0 = time.perf_counter()
    d = model.desc
    la, lb = (0, d.n_layers) if layers is None else (int(layers[0]), int(layers[1]))
    if not 0 <= la < lb <= d.n_layers:
        raise CompileError(f"layers [{la}, {lb}) is not a range of model '{d.name}' "
                           f"({d.n_layers} layers)")
    first, last = la == 0, lb == d.n_layers
    ctx = int(context or min(config.context, d.context_length))
    if ctx > config.context:
        raise CompileError(f"context {ctx} exceeds the configuration's context {config.context}")
    if d.dim % 32 or d.ffn_dim % 32 or (d.n_heads * d.head_dim) % 32:
        raise CompileError(f"model dimensions must be multiples of 32 (dim {d.dim}, ffn {d.ffn_dim})")
    if d.head_dim % 2 or d.head_dim > 1023:
        raise CompileError(f"head dim {d.head_dim} is not supported (even, at most 1023)")
    sp_of = parse_sparsity(sparsity)
    for m, p in sp_of.items():
        if p not in config.sparsity:
            raise CompileError(f"{_config_file(config)}: configuration '{config.name}' does not "
                               f"support sparsity {p} "
                               f"(supports {', '.join(config.sparsity)})")
    notes = []
    if layers is None:
        _check_device_memory(model, config, ctx, sp_of)

    # ---- on-chip regions ------------------------------------------------------------
    bb = config.buffer_bytes
    ab_sz, gb_sz, kb_sz, wb_sz = bb["activation"], bb["global"], bb["kv"], bb["weight"]
    KB = OnChip("kv", ab_sz + gb_sz, kb_sz)
    WB = OnChip("weight", ab_sz + gb_sz + kb_sz, wb_sz)
    onchip_total = ab_sz + gb_sz + kb_sz + wb_sz
    if onchip_total >= 1 << 24:
        raise CompileError(f"on-chip buffers total {onchip_total} bytes; the ISA addresses 16 MiB")

    dim, ffn, hd = d.dim, d.ffn_dim, d.head_dim
    nq, nkv, g = d.n_heads, d.n_kv_heads, d.gqa_group
    grp_rows = (g + 2) * hd
    qkv_rows = nkv * grp_rows

    def vector_layout(T):
        """Activation (AB) and global (GB) buffers of a program over T tokens.

        Every per-token vector is T vectors one after the other (token-major);
        the decode program is T = 1.
        """
        AB = OnChip("activation", 0, ab_sz)
        GB = OnChip("global", ab_sz, gb_sz)
        L = {"T": T, "AB": AB}
        L["X"] = AB.alloc(T * dim * 4, "residual")
        L["H"] = AB.alloc(T * max(dim, nq * hd) * 4, "normed vector")
        L["QKV"] = AB.alloc(T * qkv_rows * 4, "q/k/v")
        L["O"] = AB.alloc(T * nq * hd * 4, "attention output")
        L["G"] = AB.alloc(T * ffn * 4, "gate")
        L["U"] = AB.alloc(T * ffn * 4, "up")
        L["QH"] = AB.alloc(T * max(dim, nq * hd) // 32 * QBLOCK_BYTES, "quantized vector")
        L["QF"] = AB.alloc(T * ffn // 32 * QBLOCK_BYTES, "quantized FFN vector")
        L["vectors"] = AB.top
        L["CONSTS"] = GB.alloc(GB_CONSTS, "constants")
        tbl = (2 * dim + T * hd) * 4           # attn/ffn norm weights, T RoPE rows
        L["GSLOT"] = [GB.alloc(tbl, "layer tables"), GB.alloc(tbl, "layer tables")]
        return L

    L1 = vector_layout(1)
    kv_head_bytes = ctx * hd * 2
    KSLOT = [KB.alloc(2 * kv_head_bytes, "K/V of one head"), KB.alloc(2 * kv_head_bytes, "K/V of one head")]
    # Weight tiles rotate through the slots (see _weight_slots)
    n_wslots, wslot_bytes = _weight_slots(wb_sz, config)
    WSLOT = [WB.alloc(wslot_bytes, "weight tile") for _ in range(n_wslots)]

    # ---- weights ----------------------------------------------------------------------
    def weight(name, tname):
        t = model.tensor(tname)
        fmt = t.qtype
        raw = t.data
        if fmt in ("f32", "f16"):
            fmt = "q8_0"
            raw = quant.quantize_rows("q8_0", t.dequantize())
            msg = f"{tname}: {t.qtype.upper()} matrix quantized to Q8_0 for the chains"
            warnings.warn(msg, stacklevel=3)
            notes.append(msg)
        if fmt not in config.weight_formats:
            raise CompileError(f"{_config_file(config)}: configuration '{config.name}' does not "
                               f"support {fmt.upper()} "
                               f"weights ({tname}); it supports "
                               f"{', '.join(f.upper() for f in config.weight_formats)}")
        return fmt, np.asarray(raw, np.uint8)

    image = bytearray()
    image_len = [0]
    matrices = {}
    masks = {}
    prune_stats = {}

    def add_matrix(key, fmt, sp, raw, mask):
        rows, rb_dense = raw.shape
        cols = rb_dense // quant.BLOCK_BYTES[fmt] * 32
        rb = _row_bytes(fmt, sp, cols)
        problem = _tiling_problem(config, wslot_bytes, rb, rows, key == head_key)
        if problem:
            raise _weight_buffer_error(config, model, sp_of, f"{key}: {problem}")
        per = _rows_per_tile(config, wslot_bytes, rb)
        off0 = image_len[0]
        if emit_image:
            image.extend(_encode_rows(fmt, sp, raw, mask).tobytes())
        image_len[0] += rows * rb
        cm = CompiledMatrix(key, fmt, sp, rows, cols, rb, off0)
        r = 0
        while r < rows:
            n = min(per, rows - r)
            cm.tiles.append((r, n, off0 + r * rb))
            r += n
        pad = (-image_len[0]) % isa.HBM_ALIGN
        if emit_image:
            image.extend(b"\0" * pad)
        image_len[0] += pad
        matrices[key] = cm
        return cm

    it = range(la, lb)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="compiling", unit="layer", disable=None)   # no bar off a terminal
    # embedding / LM head first: the embedding LD indexes its rows by R7
    head_key = "token_embd" if d.tied_embeddings else "output"
    emb = head = None
    if first or (last and d.tied_embeddings):
        emb_fmt, emb_raw = weight("embedding", "token_embd.weight")
        emb = add_matrix("token_embd", emb_fmt, "dense", emb_raw, None)
    if last:
        if d.tied_embeddings:
            head = emb
        else:
            hf, hr = weight("output", "output.weight")
            head = add_matrix("output", hf, "dense", hr, None)

    layer_mats = []
    for li in it:
        mats = {}
        raws = {}
        for w in MATRICES:
            fmt, raw = weight(w, f"blk.{li}.{w}.weight")
            sp = sp_of[w]
            mask = None
            if sp != "dense" and emit_image:
                mask = sparse.prune(fmt, raw, sp)
                masks[f"blk.{li}.{w}.weight"] = mask
            raws[w] = (fmt, raw, sp, mask)
        # fused QKV in group layout: [q heads of group j, k_j, v_j] for each KV head j
        fq, rq, sq, mq = raws["attn_q"]
        fk, rk, sk, mk = raws["attn_k"]
        fv, rv, sv, mv_ = raws["attn_v"]
        if len({fq, fk, fv}) == 1 and len({sq, sk, sv}) == 1:
            parts, mparts = [], []
            for j in range(nkv):
                parts += [rq[j * g * hd:(j + 1) * g * hd], rk[j * hd:(j + 1) * hd], rv[j * hd:(j + 1) * hd]]
                if sq != "dense":
                    mparts += [mq[j * g * hd:(j + 1) * g * hd], mk[j * hd:(j + 1) * hd], mv_[j * hd:(j + 1) * hd]]
            mats["qkv"] = add_matrix(f"blk.{li}.qkv", fq, sq, np.concatenate(parts),
                                     np.concatenate(mparts) if mparts else None)
        else:
            raise CompileError(f"layer {li}: attn_q/k/v have different types "
                               f"({fq}/{fk}/{fv}, {sq}/{sk}/{sv}); the compiler fuses them")
        for w in ("attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            f, r, s, m = raws[w]
            mats[w] = add_matrix(f"blk.{li}.{w}", f, s, r, m)
        layer_mats.append(mats)
    weights_bytes = image_len[0]

    # ---- tables ----------------------------------------------------------------------
    from llmfab.core import numerics as N
    tables = bytearray()
    consts = np.zeros(GB_CONSTS // 4, np.float32)
    consts[0] = np.float32(d.rms_eps)
    consts[1] = np.float32(1.0 / np.sqrt(hd))
    consts[2] = np.float32(1.0 / dim)          # RMSNORM's 1/n (hardware has no exact divider)
    t_consts = len(tables)
    tables += consts.tobytes()
    t_norm = []
    for li in range(la, lb):
        t_norm.append(len(tables))
        tables += model.layer(li, "attn_norm").dequantize().astype(np.float32).tobytes()
        tables += model.layer(li, "ffn_norm").dequantize().astype(np.float32).tobytes()
    t_onorm = len(tables)
    tables += model.tensor("output_norm.weight").dequantize().astype(np.float32).tobytes()
    tables += b"\0" * ((-len(tables)) % isa.HBM_ALIGN)
    t_rope = len(tables)
    cos, sin = N.rope_tables(hd, d.rope_base, ctx)
    rope = np.concatenate([cos, sin], axis=1).astype(np.float32)     # [ctx, hd]
    tables += rope.tobytes()
    tables += b"\0" * ((-len(tables)) % ALIGN)

    # ---- prefill buckets ---------------------------------------------------------------
    # A prefill program runs T tokens (positions R1 .. R1+T-1) with every weight tile
    # streamed once for all of them (MM with ntok = T). Its activations are T times the
    # decode program's; buckets are the powers of two that fit (the decode program is T = 1).
    head_nr = head.tiles[0][1] if last else 0
    stage_rows = max((cm.tiles[0][1] for mats in layer_mats for cm in mats.values()
                      if len(cm.tiles) > 1), default=0)

    def finish_layout(L):
        """Add the matrix-output stage (T > 1) and the two logits slots to a vector layout."""
        T, AB = L["T"], L["AB"]
        if T > 1 and stage_rows:
            L["STAGE"] = AB.alloc(T * stage_rows * 4, "matrix output stage")
        left = (AB.size - _align(AB.top, 64)) // 2 // 64 * 64
        lt = T * head_nr * 4
        if 2 * _align(lt, 64) > left:
            raise FitError(f"activation buffer too small for the logits slots ({2 * lt} bytes needed)")
        if lt >= 1 << 20 or T * hd * 4 >= 1 << 20:
            raise FitError(f"a {T}-token logits tile or RoPE load exceeds the LD/ST length field")
        if not (first and last) and T * dim * 4 >= 1 << 20:
            raise FitError(f"a {T}-token hidden state ({T * dim * 4} bytes) exceeds the LD/ST "
                           f"length field")
        L["LOGS"] = [AB.alloc(lt, "logits slot"), AB.alloc(lt, "logits slot")]
        return L

    layouts = {1: finish_layout(L1)}
    per_token = L1["vectors"]
    buckets = []
    cap = min(int(config.max_prefill), ctx, isa.MAX_PREFILL) if prefill else 0
    if not prefill:
        prefill_note = "prefill programs not requested"
    elif hd % 16:
        prefill_note = (f"no prefill programs: head dim {hd} is not a multiple of 16 (the K/V row "
                        f"stores of token t need 32-byte aligned offsets t*head_dim*2)")
    elif g > isa.ATTN_HEADS_MASK:
        prefill_note = f"no prefill programs: {g} query heads per KV head exceed the ATTN field"
    else:
        prefill_note = None
        T = 2
        while T <= cap:
            try:
                layouts[T] = finish_layout(vector_layout(T))
            except FitError as e:
                prefill_note = f"bucket {T} does not fit: {e}"
                break
            buckets.append(T)
            T *= 2
        else:
            prefill_note = (f"buckets limited by max_prefill {config.max_prefill}, context {ctx} and "
                            f"the ISA's {isa.MAX_PREFILL}-token limit")
        if not buckets:
            prefill_note = ("no prefill programs: only T=1 fits the activation buffer "
                            f"({ab_sz} bytes; {per_token} bytes of activations per token); prompts "
                            f"run through the decode program. {prefill_note}")
    if prefill_note and not buckets and prefill:
        notes.append(prefill_note)
    max_t = max(buckets, default=1)

    # ---- HBM memory map ---------------------------------------------------------------
    WBASE = 0
    TBASE = _align(WBASE + weights_bytes)
    KVBASE = _align(TBASE + len(tables))
    kv_bytes = (lb - la) * nkv * 2 * kv_head_bytes
    IOBASE = _align(KVBASE + kv_bytes)
    # I/O region: logits (decode: [vocab]; prefill: tile-major [tile][T][tile rows]), then
    # the prefill token rows the host stages (raw embedding blocks, 32-byte row stride).
    # A pipeline stage: its output (logits, or the hidden state [T][dim] float32 when it
    # does not end the model), then its input (token rows, or the hidden state [T][dim]).
    logits_bytes = max_t * (d.vocab_size if last else dim) * 4
    tok_stride = _align(emb.row_bytes, isa.HBM_ALIGN) if first else dim * 4
    tok_off = _align(logits_bytes, isa.HBM_ALIGN)
    tok_bytes = max_t * tok_stride if buckets or not first else 0
    if first and last:
        io_bytes = _align(logits_bytes + tok_bytes + 4096) if buckets else _align(d.vocab_size * 4 + 4096)
    else:
        io_bytes = _align(tok_off + tok_bytes + 4096)
    hbm_used = IOBASE + io_bytes
    board = config.board_spec
    cap = board.total_memory_bytes
    if hbm_used > cap:
        raise FitError(f"model '{d.name}' needs {hbm_used / 2**30:.2f} GiB of device memory "
                       f"(weights {weights_bytes / 2**30:.2f} GiB, KV cache {kv_bytes / 2**30:.2f} GiB "
                       f"at context {ctx}) but board '{board.name}' has {cap / 2**30:.2f} GiB")
    if IOBASE // isa.HBM_ALIGN >= 1 << 28:
        raise CompileError("device memory map exceeds the ISA's 8 GiB offset range")
    if emb is not None and emb.row_bytes >= 1 << 16:
        raise CompileError(f"embedding row of {emb.row_bytes} bytes exceeds the LD stride field")

    def hoff(x):
        assert x % isa.HBM_ALIGN == 0, x
        return x // isa.HBM_ALIGN

    F = isa.MISC_FUNCS

    # ---- programs --------------------------------------------------------------------
    def build_program(L):
        """The instruction stream of the program over T = L["T"] tokens (T = 1: decode)."""
        T = L["T"]
        X, H, QKV, O, G, U, QH, QF = (L[k] for k in ("X", "H", "QKV", "O", "G", "U", "QH", "QF"))
        CONSTS, GSLOT, LOGS, STAGE = L["CONSTS"], L["GSLOT"], L["LOGS"], L.get("STAGE")
        S = Scheduler()
        ring_free = {}        # slot -> free event (cmp2ld) of its last consumer
        group_ready = {}      # group id -> ld2cmp event
        ev = {}               # symbolic events

        def load_group(gid, slot_key, lds):
            """Emit the LDs of a group into a slot; first waits for the slot, last releases."""
            need = {"cmp2ld": ring_free.get(slot_key)}
            for i, f in enumerate(lds):
                last = i == len(lds) - 1
                e = S.emit("LD", need=need if i == 0 else None, release=["ld2cmp"] if last else (), **f)
                if last:
                    group_ready[gid] = e["ld2cmp"]

        def consume(op, gid=None, free_slot=None, need=None, release=(), tag=None, **f):
            nd = dict(need or {})
            if gid is not None:
                nd["ld2cmp"] = max(nd.get("ld2cmp") or 0, group_ready[gid])
            rel = list(release)
            if free_slot is not None:
                rel.append("cmp2ld")
            e = S.emit(op, need=nd, release=rel, **f)
            if free_slot is not None:
                ring_free[free_slot] = e["cmp2ld"]
            if tag:
                ev[tag] = e
            return e

        # Work list: (loads or None, compute thunk, barrier). Loads of item i+1 are emitted
        # before compute i, unless item i+1 is a barrier: then compute i, SYNC, its loads.
        work = []

        def W(loads, compute, barrier=False):
            work.append((loads, compute, barrier))

        wslot_i = [0]
        kslot_i = [0]
        gslot_i = [0]

        def next_slot(counter, n=2):
            s = counter[0] % n
            counter[0] += 1
            return s

        def each_token(fn, gid=None, free_slot=None, need=None):
            """fn(t, kwargs) for t < T: the first waits for gid/need, the last frees the slot."""
            for t in range(T):
                kw = {}
                if t == 0:
                    kw.update(gid=gid, need=need)
                if t == T - 1:
                    kw["free_slot"] = free_slot
                fn(t, kw)

        def quant(dst, a, n, **kw):
            each_token(lambda t, k: consume("MISC", func=F["QUANT"], dst=dst + t * n // 32 * QBLOCK_BYTES,
                                            a=a + t * n * 4, n=n, **k), **kw)

        def norm_quant(a, w, n, gid=None, free_slot=None, need=None):
            """H = rms_norm(a) per token, QH = quant(H) per token."""
            for t in range(T):
                consume("MISC", gid=gid if t == 0 else None, need=need if t == 0 else None,
                        free_slot=free_slot if t == T - 1 else None, func=F["RMSNORM"],
                        dst=H + t * n * 4, a=a + t * n * 4, b=w, n=n)
                consume("MISC", func=F["QUANT"], dst=QH + t * n // 32 * QBLOCK_BYTES, a=H + t * n * 4, n=n)

        def elementwise(func, dst, a, b, n):
            """An elementwise op over T token-major vectors of n words (n fits 16 bits)."""
            per = max(1, 0xFFFF // n)
            t = 0
            while t < T:
                k = min(per, T - t)
                consume("MISC", func=F[func], dst=dst + t * n * 4, a=a + t * n * 4, b=b + t * n * 4, n=k * n)
                t += k

        def matrix_work(cm, qsrc, dst, logits=None):
            for ti, (r0, nr, off) in enumerate(cm.tiles):
                s = next_slot(wslot_i, n_wslots)
                gid = f"{cm.name}.{ti}"
                lds = [dict(buf=WSLOT[s], hreg=isa.REG_WBASE, hoff=hoff(off), len=nr * cm.row_bytes)]
                mf = dict(func=isa.mv_func(cm.fmt, cm.sparsity), wb=WSLOT[s], rows=nr, cols=cm.cols,
                          qsrc=qsrc)
                op = "MV" if T == 1 else "MM"
                if T > 1:
                    mf["ntok"] = T

                def comp(cm=cm, s=s, gid=gid, r0=r0, nr=nr, ti=ti, mf=mf, op=op):
                    if logits is None:
                        if T == 1:
                            consume(op, gid=gid, free_slot=("W", s), dst=dst + r0 * 4, **mf)
                        elif len(cm.tiles) == 1:
                            consume(op, gid=gid, free_slot=("W", s), dst=dst, **mf)
                        else:
                            # [T][nr] into the stage, then scattered to rows r0.. of each token
                            consume(op, gid=gid, free_slot=("W", s), dst=STAGE, **mf)
                            consume("MISC", func=F["COPY"], dst=dst + r0 * 4, a=STAGE, n=nr, aux=T,
                                    b=cm.rows)
                    else:
                        ls = ti % 2
                        lslot = logits[ls]
                        e = consume(op, gid=gid, free_slot=("W", s),
                                    need={"st2cmp": ev.get(("logit_st", ls), {}).get("st2cmp")},
                                    release=["cmp2st"], dst=lslot, **mf)
                        # logits tile-major: tile (r0, nr) is [T][nr] at T*r0*4
                        e2 = S.emit("ST", need={"cmp2st": e["cmp2st"]}, release=["st2cmp"], func=isa.ST_F32,
                                    buf=lslot, hreg=isa.REG_IOBASE, hoff=hoff(T * r0 * 4),
                                    len=T * nr * 4)
                        ev[("logit_st", ls)] = e2
                W((gid, ("W", s), lds), comp)

        # constants: loaded once
        W(("consts", ("C", 0), [dict(buf=CONSTS, hreg=isa.REG_TBASE, hoff=hoff(t_consts), len=GB_CONSTS)]),
          lambda: consume("MISC", gid="consts", func=F["NOP"]))

        if not first:
            # the previous stage's residual X of the T tokens, staged by the host
            W(("xin", ("X", 0), [dict(buf=X, hreg=isa.REG_IOBASE, hoff=hoff(tok_off), len=T * dim * 4)]),
              lambda: consume("MISC", gid="xin", func=F["NOP"]))
        elif T == 1:
            efmt = isa.FMTS.index(emb.fmt)
            # embedding row (dynamic: R7 selects the row)
            es = next_slot(wslot_i, n_wslots)
            W(("emb", ("W", es), [dict(buf=WSLOT[es], hreg=isa.REG_WBASE, hoff=hoff(emb.hbm_off),
                                       ireg=isa.REG_TOKEN, stride=emb.row_bytes,
                                       len=emb.row_bytes)]),
              lambda: consume("MISC", gid="emb", free_slot=("W", es), func=F["EMBED"], dst=X,
                              a=WSLOT[es], n=dim, aux=efmt))
        else:
            efmt = isa.FMTS.index(emb.fmt)
            # the host stages the T embedding rows in the I/O region (row stride tok_stride)
            rps = wslot_bytes // tok_stride
            for k0 in range(0, T, rps):
                es = next_slot(wslot_i, n_wslots)
                nrow = min(rps, T - k0)
                gid = f"emb.{k0}"

                def c_emb(es=es, nrow=nrow, k0=k0, gid=gid):
                    for i in range(nrow):
                        consume("MISC", gid=gid if i == 0 else None,
                                free_slot=("W", es) if i == nrow - 1 else None, func=F["EMBED"],
                                dst=X + (k0 + i) * dim * 4, a=WSLOT[es] + i * tok_stride, n=dim, aux=efmt)
                W((gid, ("W", es), [dict(buf=WSLOT[es], hreg=isa.REG_IOBASE,
                                         hoff=hoff(tok_off + k0 * tok_stride), len=nrow * tok_stride)]), c_emb)

        kv_st_events = []

        for li in range(lb - la):           # li: the stage's own layer index (KV, tables)
            mats = layer_mats[li]
            gs = next_slot(gslot_i)
            gbase = GSLOT[gs]
            rope = gbase + 2 * dim * 4
            gid = f"tables.{li}"
            lds = [dict(buf=gbase, hreg=isa.REG_TBASE, hoff=hoff(t_norm[li]),
                        len=2 * dim * 4),
                   # the RoPE rows of positions R1 .. R1+T-1 in one load
                   dict(buf=rope, hreg=isa.REG_TBASE, hoff=hoff(t_rope), ireg=isa.REG_POS,
                        stride=hd * 4, len=T * hd * 4)]

            def c_norm(gbase=gbase, gid=gid):
                # the first QKV write of this layer overwrites q/k/v that the previous layer's KV
                # stores read: RMSNORM waits for those stores (st2cmp)
                norm_quant(X, gbase, dim, gid=gid,
                           need={"st2cmp": kv_st_events[-1] if kv_st_events else None})
            W((gid, ("G", gs), lds), c_norm)
            matrix_work(mats["qkv"], QH, QKV)

            if T == 1:
                for j in range(nkv):
                    ks = next_slot(kslot_i)
                    kgid = f"kv.{li}.{j}"
                    kbase = KVBASE + ((li * nkv + j) * 2) * kv_head_bytes
                    vbase = kbase + kv_head_bytes
                    klds = [dict(buf=KSLOT[ks], hreg=isa.REG_KVBASE, hoff=hoff(kbase - KVBASE),
                                 lreg=isa.REG_POS, lmul=hd * 2),
                            dict(buf=KSLOT[ks] + kv_head_bytes, hreg=isa.REG_KVBASE,
                                 hoff=hoff(vbase - KVBASE), lreg=isa.REG_POS, lmul=hd * 2)]
                    gaddr = QKV + j * grp_rows * 4

                    def c_attn(j=j, ks=ks, kgid=kgid, gaddr=gaddr, kbase=kbase, vbase=vbase, rope=rope):
                        e = consume("MISC", func=F["ROPE"], dst=gaddr, a=gaddr, b=rope,
                                    n=g + 1, aux=hd, release=["cmp2st"])
                        # new K and V rows -> HBM (fp16), at position R1
                        S.emit("ST", need={"cmp2st": e["cmp2st"]}, func=isa.ST_F16, buf=gaddr + g * hd * 4,
                               hreg=isa.REG_KVBASE, hoff=hoff(kbase - KVBASE), ireg=isa.REG_POS,
                               stride=hd * 2, len=hd * 2)
                        e2 = S.emit("ST", func=isa.ST_F16, buf=gaddr + (g + 1) * hd * 4,
                                    hreg=isa.REG_KVBASE, hoff=hoff(vbase - KVBASE), ireg=isa.REG_POS,
                                    stride=hd * 2, len=hd * 2,
                                    release=["st2cmp"] if j == nkv - 1 else ())
                        if j == nkv - 1:
                            kv_st_events.append(e2["st2cmp"])
                        # the current row comes from q/k/v (ATTN t = 0, not cached)
                        consume("MISC", gid=kgid, free_slot=("K", ks), func=F["ATTN"], dst=O + j * g * hd * 4,
                                a=gaddr, b=KSLOT[ks], reg=isa.REG_POS, **isa.attn_fields(g, hd))
                    W((kgid, ("K", ks), klds), c_attn)
            else:
                def c_rope_store(li=li, rope=rope):
                    # rotate q and k of every token and group; K/V rows -> HBM at R1 + t
                    for t in range(T):
                        for j in range(nkv):
                            gaddr = QKV + (t * qkv_rows + j * grp_rows) * 4
                            kb = ((li * nkv + j) * 2) * kv_head_bytes
                            vb = kb + kv_head_bytes
                            e = consume("MISC", func=F["ROPE"], dst=gaddr, a=gaddr, b=rope + t * hd * 4,
                                        n=g + 1, aux=hd, release=["cmp2st"])
                            S.emit("ST", need={"cmp2st": e["cmp2st"]}, func=isa.ST_F16,
                                   buf=gaddr + g * hd * 4, hreg=isa.REG_KVBASE, hoff=hoff(kb + t * hd * 2),
                                   ireg=isa.REG_POS, stride=hd * 2, len=hd * 2)
                            last = t == T - 1 and j == nkv - 1
                            e2 = S.emit("ST", func=isa.ST_F16, buf=gaddr + (g + 1) * hd * 4,
                                        hreg=isa.REG_KVBASE, hoff=hoff(vb + t * hd * 2), ireg=isa.REG_POS,
                                        stride=hd * 2, len=hd * 2, release=["st2cmp"] if last else ())
                            if last:
                                kv_st_events.append(e2["st2cmp"])
                W(None, c_rope_store)
                for j in range(nkv):
                    ks = next_slot(kslot_i)
                    kgid = f"kv.{li}.{j}"
                    kb = ((li * nkv + j) * 2) * kv_head_bytes
                    # cache rows [0, R1 + T): the stores above must have reached HBM (SYNC)
                    klds = [dict(buf=KSLOT[ks], hreg=isa.REG_KVBASE, hoff=hoff(kb), len=T * hd * 2,
                                 lreg=isa.REG_POS, lmul=hd * 2),
                            dict(buf=KSLOT[ks] + kv_head_bytes, hreg=isa.REG_KVBASE,
                                 hoff=hoff(kb + kv_head_bytes), len=T * hd * 2, lreg=isa.REG_POS,
                                 lmul=hd * 2)]

                    def c_attn(j=j, ks=ks, kgid=kgid):
                        # token t attends to positions [0, R1 + t], all from the cache
                        each_token(lambda t, k: consume(
                            "MISC", func=F["ATTN"], dst=O + (t * nq * hd + j * g * hd) * 4,
                            a=QKV + (t * qkv_rows + j * grp_rows) * 4, b=KSLOT[ks], reg=isa.REG_POS,
                            **isa.attn_fields(g, hd, t, cached=True), **k), gid=kgid, free_slot=("K", ks))
                    W((kgid, ("K", ks), klds), c_attn, barrier=j == 0)

            W(None, lambda: quant(QH, O, nq * hd))
            matrix_work(mats["attn_output"], QH, H)

            def c_ffn_in(gbase=gbase, gs=gs):
                elementwise("ADD", X, X, H, dim)
                norm_quant(X, gbase + dim * 4, dim, free_slot=("G", gs))
            W(None, c_ffn_in)
            matrix_work(mats["ffn_gate"], QH, G)
            matrix_work(mats["ffn_up"], QH, U)

            def c_act():
                elementwise("SILU_MUL", G, G, U, ffn)
                quant(QF, G, ffn)
            W(None, c_act)
            matrix_work(mats["ffn_down"], QF, H)
            W(None, lambda: elementwise("ADD", X, X, H, dim))

        if last:
            # final norm + LM head, logits streamed out through two AB slots
            gs = next_slot(gslot_i)
            W(("onorm", ("G", gs), [dict(buf=GSLOT[gs], hreg=isa.REG_TBASE, hoff=hoff(t_onorm),
                                         len=dim * 4)]),
              lambda gs=gs: norm_quant(X, GSLOT[gs], dim, gid="onorm", free_slot=("G", gs)))
            matrix_work(head, QH, None, logits=LOGS)
        else:
            # the residual X leaves for the next stage (the compute queue is in order: the
            # NOP releases the store once the last ADD has written X)
            def c_out():
                e = consume("MISC", func=F["NOP"], release=["cmp2st"])
                S.emit("ST", need={"cmp2st": e["cmp2st"]}, func=isa.ST_F32, buf=X,
                       hreg=isa.REG_IOBASE, hoff=hoff(0), len=T * dim * 4)
            W(None, c_out)

        # emit with one item of lookahead on the loads
        def emit_loads(item):
            loads = item[0]
            if loads:
                gid, slot, lds = loads
                load_group(gid, slot, lds)

        if work:
            emit_loads(work[0])
        for i, (loads, comp, _) in enumerate(work):
            nxt = work[i + 1] if i + 1 < len(work) else None
            if nxt is not None and not nxt[2]:
                emit_loads(nxt)
            comp()
            if nxt is not None and nxt[2]:
                S.emit("SYS", func=isa.SYS_SYNC)
                emit_loads(nxt)
        S.emit("SYS", func=isa.SYS_END)
        return S.instrs

    def assemble(instrs):
        counts = {}
        for ins in instrs:
            counts[ins.op] = counts.get(ins.op, 0) + 1
        return isa.to_bytes([isa.encode(ins) for ins in instrs]), counts

    program, counts = assemble(build_program(layouts[1]))
    prefill_programs, prefill_info = {}, {}
    for T in buckets:
        prog, cnt = assemble(build_program(layouts[T]))
        prefill_programs[T] = prog
        prefill_info[str(T)] = {"file": f"prefill_{T}.bin", "tokens": T, "words": len(prog) // isa.WORD_BYTES,
                                "bytes": len(prog), "instructions": cnt,
                                "activation_bytes": layouts[T]["AB"].top}

    # ---- HBM image ---------------------------------------------------------------------
    if emit_image:
        img = np.zeros(KVBASE, np.uint8)       # weights + tables; KV and I/O start zeroed
        img[WBASE:WBASE + weights_bytes] = np.frombuffer(image, np.uint8)
        img[TBASE:TBASE + len(tables)] = np.frombuffer(bytes(tables), np.uint8)
    else:
        img = np.zeros(0, np.uint8)

    memory_map = {
        "weights": [WBASE, weights_bytes], "tables": [TBASE, len(tables)],
        "kv": [KVBASE, kv_bytes], "io": [IOBASE, io_bytes],
        "hbm_stripe_bytes": config.hbm.data_width // 8, "hbm_ports": config.hbm.ports,
    }
    if last:
        memory_map["logits"] = [IOBASE, d.vocab_size * 4]
    else:
        memory_map["hidden_out"] = [IOBASE, logits_bytes]
    if not first:
        memory_map["hidden_in"] = [IOBASE + tok_off, tok_bytes]
    if buckets and last:
        memory_map["prefill_logits"] = [IOBASE, logits_bytes]
    if buckets and first:
        memory_map["prefill_tokens"] = [IOBASE + tok_off, tok_bytes]
    manifest = {
        "format_version": FORMAT_VERSION,
        "config_name": config.name,
        "config_hash": config.config_hash(),
        "compiler": {"version": _llmfab_version(), "source_hash": compiler_hash()},
        "model": {**d.to_dict(), "source": model.source, "file": os.path.abspath(model.path) if model.path else "",
                  # a layout-only compile (emit_image=False) has no weights to identify
                  "sha256": model_hash(model) if emit_image else "0" * 64},
        "context": ctx,
        "sparsity": sp_of,
        "hbm_size": int(hbm_used),
        "memory_map": memory_map,
        "registers": {"wbase": WBASE, "tbase": TBASE, "kvbase": KVBASE, "iobase": IOBASE},
        "onchip": {
            "size": onchip_total,
            "activation": [0, ab_sz], "global": [ab_sz, gb_sz], "kv": [ab_sz + gb_sz, kb_sz],
            "weight": [ab_sz + gb_sz + kb_sz, wb_sz],
            "context": ctx,
        },
        "programs": {"decode": {"file": "program.bin", "tokens": 1, "words": len(program) // isa.WORD_BYTES,
                                "bytes": len(program)},
                     "prefill": prefill_info},
        "prefill": {
            "buckets": buckets,
            "note": prefill_note,
            "per_token_activation_bytes": per_token,
            "activation_buffer_bytes": ab_sz,
            # the host stages token t's embedding row (raw blocks) at prefill_tokens + t*row_stride
            **({"token_rows": {"row_stride": tok_stride, "row_bytes": emb.row_bytes, "format": emb.fmt,
                               "embedding_offset": emb.hbm_off}} if first else {}),
            # logits of a T-token run: tile (r0, nr) is [T][nr] float32 at prefill_logits + T*r0*4
            "lm_head_tiles": [[r0, nr] for (r0, nr, _) in head.tiles] if last else [],
        },
        "stats": {
            "instructions": counts, "weight_bytes": weights_bytes,
            # every matrix streams once per decode step, plus one embedding row
            "weight_bytes_per_token": weights_bytes + (emb.row_bytes if first else 0)
            - (emb.rows * emb.row_bytes if emb is not None and emb is not head else 0),
            "prefill_program_bytes": {str(T): len(p) for T, p in prefill_programs.items()},
            "compile_seconds": round(time.perf_counter() - t0, 3),
        },
        "notes": notes,
    }
    if layers is not None:
        manifest["stage"] = {"layers": [la, lb], "first": first, "last": last, "hidden_dim": dim}
    b = Bundle(manifest=manifest, program=program, hbm_image=img, prefill=prefill_programs)
    b.extra["masks"] = masks
    return b
