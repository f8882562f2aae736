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

The parts of a compile, in the order :func:`compile_model` makes them:

- :class:`OnChipPlan`: the on-chip buffers (activation, global, KV, weight), the K/V
  slots and the weight-tile ring; a :class:`VectorLayout` per program says where its
  vectors (``x``, ``qkv``, ``gate`` ...) are in the activation and global buffers;
- :class:`WeightImage`: the weights region, one :class:`CompiledMatrix` (with its
  tiles) per streamed matrix, :class:`LayerMatrices` per layer (q/k/v fused);
- :class:`Tables`: constants, norm weights and the RoPE table;
- :class:`PrefillPlan`: the prefill buckets that fit and their layouts;
- :class:`MemoryMap`: the device-memory regions, the HBM image, the registers;
- compiler/program.py's ``ProgramBuilder``: each program's instructions, one method
  per stage (embedding, attention, FFN, LM head).
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from llmfab.core.errors import CompileError, FitError
from llmfab.core import formats
from llmfab.core.formats import QBLOCK_BYTES
from llmfab.compiler import isa, quant, sparse
from llmfab.compiler.bundle import FORMAT_VERSION, Bundle
from llmfab.compiler.identity import compiler_hash, model_hash
from llmfab.compiler.model import Model
from llmfab.compiler.program import ProgramBuilder

ALIGN = 4096
GB_CONSTS = 64             # constants block at the start of GB: eps, attention scale
WEIGHT_SLOTS_LARGE = 4     # weight tile slots when each holds >= SLOT_MIN_CYCLES of loads
SLOT_MIN_CYCLES = 512      # (else 2; u280-slice: 4 x 64 KiB, 512 cycles each, measured faster than 2 x 128 KiB once MISC runs beside MV)
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _align(x, a=ALIGN):
    return (x + a - 1) // a * a


# --------------------------------------------------------------------------------------
# layout helpers
# --------------------------------------------------------------------------------------

@dataclass
class CompiledMatrix:
    """A matrix in the weight image, as the chains stream it: ``tiles`` are ``(first row,
    rows, offset from WBASE)``, each one weight-buffer slot's load.

    ``slices`` and ``stripe`` are the layout of its tiles (docs/isa.md, "Slices"): each tile
    is :func:`~llmfab.compiler.isa.slice_rows` of its rows, ``tile_bytes(rows)`` bytes at a
    line-aligned offset. ``slices`` 1: the rows back to back (a one-port configuration, and
    the embedding rows the EMBED path reads by token id).
    """
    name: str
    fmt: str
    sparsity: str
    rows: int
    cols: int
    row_bytes: int
    hbm_off: int          # offset from WBASE
    tiles: list = field(default_factory=list)   # (row0, nrows, hbm_off)
    slices: int = 1
    stripe: int = 64

    def tile_bytes(self, nrows: int) -> int:
        """Bytes of a tile of ``nrows`` rows (its LD length): ``isa.mv_span``."""
        return isa.mv_span(nrows, self.row_bytes, self.slices, self.stripe)


class OnChip:
    """Bump allocator over one region of the unified on-chip address space."""

    def __init__(self, name, base, size):
        self.name, self.base, self.size, self.top = name, base, size, 0

    def alloc(self, nbytes, what, align=64):
        """``nbytes`` at the next address (absolute) that is a multiple of ``align``."""
        self.top = _align(self.base + self.top, align) - self.base
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

def _device_bytes(model, ctx, sp_of, slices=1, chains=False, stripe=64):
    """(weights, kv, total) bytes a model needs in device memory (before padding). A tied
    embedding counts twice on ``slices`` > 1 (rows for EMBED, slice-major tiles for the LM head)."""
    d = model.desc
    wbytes = 0
    for name, t in model.tensors.items():
        if len(t.shape) != 2:
            continue
        fmt = t.qtype if t.qtype in quant.BLOCK_BYTES else "q8_0"
        key = name.split(".")[-2] if name.startswith("blk.") else ""
        n = 2 if name == "token_embd.weight" and d.tied_embeddings and slices > 1 else 1
        wbytes += n * t.shape[0] * _row_bytes(fmt, sp_of.get(key, "dense"), t.shape[1])
    kv = d.n_layers * d.n_kv_heads * 2 * ctx * d.head_dim * 2
    if chains and d.head_dim % 32 == 0:
        kv = d.n_layers * d.n_kv_heads * isa.kv_region(d.head_dim, ctx, slices, stripe)["size"]
    io = d.vocab_size * 4
    tables = (2 * d.n_layers + 1) * d.dim * 4 + ctx * d.head_dim * 4
    return wbytes, kv, wbytes + kv + io + tables


def _check_device_memory(model, config, ctx, sp_of):
    wbytes, kv, total = _device_bytes(model, ctx, sp_of, config.slices,
                                      config.attention == "chains", config.stripe_bytes)
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


def _line_align(config) -> int:
    """Alignment of weight tiles, in HBM and on chip: the line ``D = ports * stripe`` on a
    configuration of several slices (docs/isa.md, "Slices"), and ``isa.HBM_ALIGN`` (the LD's
    ``hoff`` unit) in HBM."""
    return int(np.lcm(config.hbm_bytes_per_cycle, isa.HBM_ALIGN)) if config.slices > 1 else isa.HBM_ALIGN


def _slot_align(config) -> int:
    """Alignment (and size unit) of the on-chip weight-buffer slots: 64 bytes, and on several
    slices whole lines (an MV/MM's weights must start on a line, docs/isa.md "Slices")."""
    return int(np.lcm(64, config.hbm_bytes_per_cycle)) if config.slices > 1 else 64


def _weight_slots(wb_sz: int, config, base: int = 0) -> tuple:
    """(slots, bytes per slot) of a weight buffer of ``wb_sz`` bytes at on-chip ``base``.

    Weight tiles rotate through the slots; the load engine runs up to (slots - 1)
    tiles ahead of the compute queue, which hides the SFU work between matrices.
    Four slots when each still holds >= SLOT_MIN_CYCLES of the ports' bandwidth
    (ci), else two (short tiles would pay the per-instruction overhead too often), unless the
    configuration sets ``buffers.weight_slots``. Slots are multiples of :func:`_slot_align`
    and start on one.
    """
    n = 2
    if wb_sz // WEIGHT_SLOTS_LARGE >= SLOT_MIN_CYCLES * config.hbm_bytes_per_cycle:
        n = WEIGHT_SLOTS_LARGE
    n = config.buffers.weight_slots or n       # the configuration's own count (buffers.weight_slots)
    a = _slot_align(config)
    usable = max(0, wb_sz - (-base) % a)
    return n, (usable // n) // a * a


def _rows_per_tile(config, wslot_bytes: int, rb: int) -> int:
    """Rows of ``rb`` bytes per weight tile (its span, ``isa.mv_span``, fits a slot): whole
    chains when a slot holds them, else (one slice) whole 32-byte units of device memory or
    (several slices) a multiple of 8 rows and of the slices, else as many as fit.

    On ``P`` slices a tile of ``k * P`` rows spans ``P`` streams of ``k`` rows each rounded up
    to whole stripes: a slot of ``W`` bytes holds ``k = (W // D) * stripe // rb`` rows per slice.
    """
    return _tile_grain(config, wslot_bytes, rb)[0]


def _tile_grain(config, wslot_bytes: int, rb: int) -> tuple:
    """(:func:`_rows_per_tile`, the granularity it keeps: a tile of any multiple of it up to
    that many rows is as good a tile)."""
    P, S = config.slices, config.stripe_bytes
    per = wslot_bytes // rb if P == 1 else (wslot_bytes // (P * S)) * S // rb * P
    unit = int(np.lcm(config.chain.count, 8))    # whole chains (a multiple of P); 32-byte aligned logits
    if per >= unit:
        return per // unit * unit, unit
    if P == 1:
        a = int(np.lcm(8, 32 // np.gcd(rb, 32)))  # whole 32-byte units of HBM per tile
    else:
        a = int(np.lcm(8, P))                     # every tile starts on its own line
    return (per // a * a, a) if per >= a else (per, max(per, 1))


def _tile_rows(config, wslot_bytes: int, rb: int, rows: int) -> list:
    """The rows of each tile of a matrix of ``rows`` rows of ``rb`` bytes: as few tiles as
    :func:`_rows_per_tile` allows, their sizes as even as its granularity (whole chains,
    32-byte units or lines) lets them be, larger first (rows past whole units go to the
    last). A prefill program's first and last tiles of a matrix run token by token beside
    the next tokens' and the next matrix's per-token work (docs/isa.md, "Tiles token by
    token"): a short remainder tile there hid less of it (SmolLM2's 576 rows on
    ``u280-slice`` were 3 x 176 + 48, now 4 x 144). Not where the even tiles would take more
    passes of MvExec's row pipelines than the plain ones."""
    per, g = _tile_grain(config, wslot_bytes, rb)
    if per <= 0:
        return []
    n = -(-rows // per)
    units, tail = divmod(rows, g)
    plain = [per] * (rows // per) + ([rows % per] if rows % per else [])
    if units < n:
        return plain
    q, r = divmod(units, n)
    sizes = [(q + 1) * g] * r + [q * g] * (n - r)
    sizes[-1] += tail
    # not where even sizes take more passes of MvExec's row pipelines (u280's 128 pipelines:
    # 18 x 224 + 64 rows is 37 passes, 19 tiles of 192..224 rows 38)
    pl = config.chain.count * config.block_lanes_per_chain
    passes = lambda sz: sum(-(-t // pl) for t in sz)      # noqa: E731
    return sizes if max(sizes) <= per and passes(sizes) <= passes(plain) else plain


def _tiling_problem(config, wslot_bytes: int, rb: int, rows: int, head: bool) -> str | None:
    """Why a matrix of ``rows`` rows of ``rb`` bytes cannot be tiled into slots of
    ``wslot_bytes`` (None: it can)."""
    P = config.slices
    per = _rows_per_tile(config, wslot_bytes, rb)
    if per == 0:
        if P == 1:
            return _row_problem(wslot_bytes, rb)
        span = isa.mv_span(1, rb, P, config.stripe_bytes)
        return (f"a row ({rb} bytes, a tile of {span} bytes on {P} slices of "
                f"{config.stripe_bytes}-byte stripes) does not fit a weight-buffer slot of "
                f"{wslot_bytes} bytes")
    starts = list(itertools.accumulate(_tile_rows(config, wslot_bytes, rb, rows)[:-1]))
    each = f"{rb} bytes each" + (f", on {P} slices of {config.stripe_bytes}-byte stripes" if P > 1 else "")
    if head and any(r % 8 for r in starts):
        return (f"a weight-buffer slot of {wslot_bytes} bytes holds {per} row{'s' * (per != 1)} "
                f"({each}), but LM-head tiles must start at multiples of 8 rows")
    if P == 1 and any((r * rb) % isa.HBM_ALIGN for r in starts):
        return (f"a weight-buffer slot of {wslot_bytes} bytes holds {per} row{'s' * (per != 1)} "
                f"({rb} bytes each), but tiles must start at {isa.HBM_ALIGN}-byte aligned offsets")
    return None


def _row_problem(wslot_bytes: int, rb: int) -> str | None:
    """Why embedding rows of ``rb`` bytes cannot be read (the decode program's EMBED loads
    one row by token id into a weight-buffer slot; None: they can)."""
    if rb > wslot_bytes:
        return f"a row ({rb} bytes) does not fit a weight-buffer slot of {wslot_bytes} bytes"
    return None


def _weight_matrices(model, config, sp_of: dict) -> set:
    """(row bytes, rows, kind) of every weight matrix the compiler lays out: kind "head" (the
    LM head), "matrix" (the layers' matrices) or "embedding" (rows EMBED reads by token id,
    untiled: an untied embedding, or a tied one's row copy on several slices)."""
    d = model.desc
    fmt_of = lambda t: "q8_0" if t.qtype in ("f32", "f16") else t.qtype   # noqa: E731
    head = model.tensor("token_embd.weight" if d.tied_embeddings else "output.weight")
    mats = {(_row_bytes(fmt_of(head), "dense", head.shape[1]), head.shape[0], "head")}
    if not d.tied_embeddings or config.slices > 1:
        t = model.tensor("token_embd.weight")
        mats.add((_row_bytes(fmt_of(t), "dense", t.shape[1]), t.shape[0], "embedding"))
    for li in range(d.n_layers):
        for w in ("attn_q", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            t = model.layer(li, w)
            rows = d.n_kv_heads * (d.gqa_group + 2) * d.head_dim if w == "attn_q" else t.shape[0]
            mats.add((_row_bytes(fmt_of(t), sp_of[w], t.shape[1]), rows, "matrix"))
    return mats


def _matrix_problem(config, wslot_bytes: int, rb: int, rows: int, kind: str) -> str | None:
    if kind == "embedding":
        return _row_problem(wslot_bytes, rb)
    return _tiling_problem(config, wslot_bytes, rb, rows, kind == "head")


def _min_weight_kib(model, config, sp_of: dict) -> int:
    """The smallest ``buffers.weight_kib`` that every weight matrix of ``model`` tiles into
    (tiles of ``isa.mv_span`` bytes in line-aligned slots)."""
    mats = _weight_matrices(model, config, sp_of)
    bb = config.buffer_bytes
    base = bb["activation"] + bb["global"] + bb["kv"]
    kib = max(1, -(-2 * max(rb for rb, _, _ in mats) // 1024))
    while any(_matrix_problem(config, _weight_slots(kib * 1024, config, base)[1], rb, rows, kind)
              for rb, rows, kind in mats):
        kib += 1
    return kib


def _config_file(config) -> str:
    """The configuration's file for messages (the path given, or boards/configs/<name>.yaml)."""
    return config.source or f"configuration '{config.name}'"


def _weight_buffer_error(config, model, sp_of, what: str) -> FitError:
    """The weight buffer is too small: say so, naming the configuration file, and the size it needs."""
    ns = config.buffers.weight_slots
    slots = f" for buffers.weight_slots {ns}" if ns else ""
    return FitError(f"{_config_file(config)}: buffers.weight_kib {config.buffers.weight_kib} is too "
                    f"small{slots}: {what}; set buffers.weight_kib to at least "
                    f"{_min_weight_kib(model, config, sp_of)} for this model")


# --------------------------------------------------------------------------------------
# the parts of a compile
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dims:
    """The model shapes the compiler lays out."""
    dim: int
    ffn: int
    hd: int              # head dim
    nq: int              # query heads
    nkv: int             # KV heads
    g: int               # query heads per KV head

    @classmethod
    def of(cls, d) -> "Dims":
        return cls(d.dim, d.ffn_dim, d.head_dim, d.n_heads, d.n_kv_heads, d.gqa_group)

    @property
    def grp_rows(self) -> int:
        """Rows of one KV head's group in the fused QKV matrix: its g query heads, k, v."""
        return (self.g + 2) * self.hd

    @property
    def qkv_rows(self) -> int:
        return self.nkv * self.grp_rows


@dataclass
class VectorLayout:
    """Activation (AB) and global (GB) buffer addresses of a program over ``tokens`` tokens.

    Every per-token vector is ``tokens`` vectors one after the other (token-major); the
    decode program is ``tokens = 1``. ``stage`` and ``logits`` come last
    (:meth:`OnChipPlan.finish`).
    """
    tokens: int
    ab: OnChip           # the activation buffer's allocator (``ab.top``: the bytes used)
    x: int               # residual
    h: int               # normed vector (also the output of attn_output and ffn_down)
    qkv: int             # q/k/v in group layout
    o: int               # attention output
    gate: int
    up: int
    qh: int              # quantized vector (of h or o)
    qf: int              # quantized FFN vector
    vectors: int         # activation bytes of the vectors above
    consts: int          # GB: the constants block
    gslots: tuple        # GB: two slots of layer tables (norm weights, RoPE rows)
    stage: tuple = ()            # matrix output stages (T > 1, multi-tile matrices): one or two
    logits: tuple = ()           # two logits slots

    @classmethod
    def allocate(cls, T: int, dims: Dims, ab_sz: int, gb_sz: int, ab_used: int = 0) -> "VectorLayout":
        """``ab_used``: bytes at the top of the activation buffer that are not the layout's
        (attention on the chains: its scratch)."""
        ab = OnChip("activation", 0, ab_sz - ab_used)
        gb = OnChip("global", ab_sz, gb_sz)
        dim, ffn, nqhd = dims.dim, dims.ffn, dims.nq * dims.hd
        x = ab.alloc(T * dim * 4, "residual")
        h = ab.alloc(T * max(dim, nqhd) * 4, "normed vector")
        qkv = ab.alloc(T * dims.qkv_rows * 4, "q/k/v")
        o = ab.alloc(T * nqhd * 4, "attention output")
        gate = ab.alloc(T * ffn * 4, "gate")
        up = ab.alloc(T * ffn * 4, "up")
        qh = ab.alloc(T * max(dim, nqhd) // 32 * QBLOCK_BYTES, "quantized vector")
        qf = ab.alloc(T * ffn // 32 * QBLOCK_BYTES, "quantized FFN vector")
        vectors = ab.top
        consts = gb.alloc(GB_CONSTS, "constants")
        tbl = (2 * dim + T * dims.hd) * 4           # attn/ffn norm weights, T RoPE rows
        gslots = (gb.alloc(tbl, "layer tables"), gb.alloc(tbl, "layer tables"))
        return cls(T, ab, x, h, qkv, o, gate, up, qh, qf, vectors, consts, gslots)


@dataclass
class OnChipPlan:
    """The on-chip address space: activation, global, KV and weight buffers, in that order;
    two K/V slots (one KV head's cache each) and the weight-tile ring."""
    activation: int      # buffer sizes in bytes
    glob: int
    kv: int
    weight: int
    decode: VectorLayout          # the decode program's vectors (finished by finish())
    kv_head_bytes: int            # one KV head's K (or V) cache: context rows of fp16
    kslots: tuple
    n_wslots: int
    wslot_bytes: int
    wslots: tuple
    chains: "ChainsAttention | None" = None    # attention on the chains: the KV head layout

    @property
    def kv_slot_bytes(self) -> int:
        """Bytes of one KV head's cache, on chip (a K slot) and in HBM."""
        return self.chains.region_bytes if self.chains else 2 * self.kv_head_bytes

    @property
    def total(self) -> int:
        return self.activation + self.glob + self.kv + self.weight

    @classmethod
    def plan(cls, config, dims: Dims, ctx: int) -> "OnChipPlan":
        bb = config.buffer_bytes
        ab_sz, gb_sz, kb_sz, wb_sz = bb["activation"], bb["global"], bb["kv"], bb["weight"]
        kb = OnChip("kv", ab_sz + gb_sz, kb_sz)
        wb = OnChip("weight", ab_sz + gb_sz + kb_sz, wb_sz)
        total = ab_sz + gb_sz + kb_sz + wb_sz
        if total >= 1 << 24:
            raise CompileError(f"on-chip buffers total {total} bytes; the ISA addresses 16 MiB")
        kv_head_bytes = ctx * dims.hd * 2
        chains = None
        if config.attention == "chains":
            chains = ChainsAttention.plan(config, dims, ctx, kb, ab_sz)
            kslots = chains.slots
        else:
            kslots = (kb.alloc(2 * kv_head_bytes, "K/V of one head"), kb.alloc(2 * kv_head_bytes, "K/V of one head"))
        decode = VectorLayout.allocate(1, dims, ab_sz, gb_sz, chains.scratch_bytes if chains else 0)
        # Weight tiles rotate through the slots (see _weight_slots)
        n_wslots, wslot_bytes = _weight_slots(wb_sz, config, wb.base)
        wslots = tuple(wb.alloc(wslot_bytes, "weight tile", _slot_align(config)) for _ in range(n_wslots))
        return cls(ab_sz, gb_sz, kb_sz, wb_sz, decode, kv_head_bytes, kslots, n_wslots, wslot_bytes, wslots,
                   chains)

    def finish(self, L: VectorLayout, *, stage_rows: int, head_rows: int, dims: Dims,
               whole_model: bool) -> VectorLayout:
        """Add the matrix-output stage (T > 1) and the two logits slots to a vector layout."""
        T, ab = L.tokens, L.ab
        lt = T * head_rows * 4

        def logits_fit():
            return _align(ab.top, 64) + 2 * _align(lt, 64) <= ab.size
        stage = ()
        if T > 1 and stage_rows:
            # two stages where they fit beside the logits slots (an MM tile writes one while
            # the COPY of the tile before scatters the other: docs/isa.md, "Prefill
            # programs"), else one: the second never costs a bucket
            sb, top = T * stage_rows * 4, ab.top
            try:
                stage = (ab.alloc(sb, "matrix output stage"), ab.alloc(sb, "matrix output stage"))
            except FitError:
                pass
            if len(stage) < 2 or not logits_fit():
                ab.top = top
                stage = (ab.alloc(sb, "matrix output stage"),)
        if not logits_fit():
            raise FitError(f"activation buffer too small for the logits slots ({2 * lt} bytes needed)")
        if lt >= 1 << 20 or T * dims.hd * 4 >= 1 << 20:
            raise FitError(f"a {T}-token logits tile or RoPE load exceeds the LD/ST length field")
        if not whole_model and T * dims.dim * 4 >= 1 << 20:
            raise FitError(f"a {T}-token hidden state ({T * dims.dim * 4} bytes) exceeds the LD/ST "
                           f"length field")
        L.stage = stage
        L.logits = (ab.alloc(lt, "logits slot"), ab.alloc(lt, "logits slot"))
        return L

    def manifest(self, ctx: int) -> dict:
        ab, gb, kv = self.activation, self.glob, self.kv
        out = {"size": self.total,
               "activation": [0, ab], "global": [ab, gb], "kv": [ab + gb, kv],
               "weight": [ab + gb + kv, self.weight],
               "context": ctx}
        if self.chains:
            # the K/V slots are MV operands: the buffer MVs may read starts at the KV buffer
            out["weight"] = [ab + gb, kv + self.weight]
            out["attention"] = "chains"
        return out


@dataclass
class ChainsAttention:
    """Attention on the chains (docs/isa.md, "Attention on the chains"): one KV head's cache
    region (``isa.kv_region``: K row tiles, transposed V block tiles, V scales; the same
    layout on chip and in HBM), two K slots holding one region each, and per query head of a
    group the quantized query, the scores (then probabilities) and their quantized vector."""
    region: dict
    region_bytes: int
    slots: tuple
    qq: tuple            # per query head of a group: its quantized query (hd/32 blocks)
    scores: tuple        # per query head: ctx binary32 scores / probabilities
    pq: tuple            # per query head: the quantized probabilities (ctx/32 blocks)
    scratch_bytes: int   # qq, scores and pq: at the top of the activation buffer

    @classmethod
    def plan(cls, config, dims: Dims, ctx: int, kb: OnChip, ab_sz: int) -> "ChainsAttention":
        P, S = config.slices, config.stripe_bytes
        if dims.hd % 32:
            raise CompileError(f"attention on the chains needs a head dim that is a multiple of 32 "
                               f"(Q8_0 K rows), not {dims.hd}; use attention: sfu")
        region = isa.kv_region(dims.hd, ctx, P, S)
        for t in ("k_tile", "v_tile"):
            if region[t] % 32 or region[t] // 32 >= 1 << 12:
                raise CompileError(f"attention on the chains: a {t.replace('_', ' ')} of {region[t]} "
                                   f"bytes cannot be loaded by position (LD lmul = bytes/32 < 4096)")
        line = _slot_align(config)
        rb = _align(region["size"], line)
        slots = (kb.alloc(rb, "K/V of one head", line), kb.alloc(rb, "K/V of one head", line))
        # one set per query head of a group, at least two (a prefill program's attention rows
        # -- token t, head i -- are software-pipelined over them: row k+1's scores MV beside
        # row k's softmax, so consecutive rows never share a set)
        # They live at the top of the activation buffer, not in the KV buffer: the KV and weight
        # buffers are one banked region whose line write port the weight stream keeps busy
        # (hw/onchip.py; with the load engine's writer served first the attention's writes
        # there waited out whole weight tiles; now the loads would lose the cycles instead).
        g = max(dims.g, 2)
        sizes = (dims.hd // 32 * QBLOCK_BYTES, ctx * 4, ctx // 32 * QBLOCK_BYTES)
        scratch = g * sum(_align(n, 64) for n in sizes)
        if scratch > ab_sz // 2:
            raise FitError(f"on-chip activation buffer too small: attention on the chains needs "
                           f"{scratch} bytes of scratch (queries, scores, probabilities of {g} heads "
                           f"over {ctx} positions), more than half of its {ab_sz}; use a configuration "
                           f"with a larger buffers.activation_kib")
        sb = OnChip("activation", ab_sz - scratch, scratch)
        qq = tuple(sb.alloc(sizes[0], "quantized query") for _ in range(g))
        scores = tuple(sb.alloc(sizes[1], "attention scores") for _ in range(g))
        pq = tuple(sb.alloc(sizes[2], "quantized probabilities") for _ in range(g))
        return cls(region, rb, slots, qq, scores, pq, scratch)


@dataclass
class LayerMatrices:
    """One layer's matrices as the compiler streams them (q, k, v fused)."""
    qkv: CompiledMatrix
    attn_output: CompiledMatrix
    ffn_gate: CompiledMatrix
    ffn_up: CompiledMatrix
    ffn_down: CompiledMatrix

    def all(self) -> tuple:
        return (self.qkv, self.attn_output, self.ffn_gate, self.ffn_up, self.ffn_down)


class WeightImage:
    """The weights region of device memory: every matrix's rows (sparse-encoded where
    pruned), cut into weight-slot tiles, each tile's bytes in the slice-major layout of
    docs/isa.md ("Slices": :func:`~llmfab.compiler.isa.slice_rows`) at an offset that is a
    multiple of the line (several slices) and of ``isa.HBM_ALIGN``; each matrix padded to
    ``isa.HBM_ALIGN``. On one slice that is every matrix's rows back to back.

    The embedding (and LM head) come first: the embedding LD indexes its rows by R7, so the
    embedding's rows stay back to back (untiled). A tied embedding on several slices is
    there twice: its rows (EMBED, the host's prefill token rows) and its slice-major tiles
    (the LM head's MVs); on one slice the two are the same bytes.
    ``emit_image=False`` lays the matrices out without copying them.
    """

    def __init__(self, model, config, sp_of: dict, wslot_bytes: int, *, emit_image: bool):
        self.model, self.config, self.sp_of = model, config, sp_of
        self.wslot_bytes, self.emit_image = wslot_bytes, emit_image
        self.head_key = "token_embd" if model.desc.tied_embeddings else "output"
        self.data = bytearray()
        self.size = 0
        self.matrices: dict[str, CompiledMatrix] = {}
        self.masks: dict[str, np.ndarray] = {}      # sparsity masks by tensor name
        self.notes: list[str] = []
        self.emb: CompiledMatrix | None = None
        self.head: CompiledMatrix | None = None
        self.layers: list[LayerMatrices] = []
        self._sources: dict = {}

    @classmethod
    def build(cls, model, config, sp_of: dict, wslot_bytes: int, la: int, lb: int, *,
              emit_image: bool, progress: bool) -> "WeightImage":
        """The weights of layers ``la .. lb-1``, with the embedding when ``la == 0`` and the
        LM head when ``lb`` is the last layer."""
        w = cls(model, config, sp_of, wslot_bytes, emit_image=emit_image)
        d = model.desc
        first, last = la == 0, lb == d.n_layers
        it = range(la, lb)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="compiling", unit="layer", disable=None)   # no bar off a terminal
        w.embedding_and_head(first, last)
        for li in it:
            w.layers.append(w.layer(li))
        return w

    def embedding_and_head(self, first: bool, last: bool):
        """The embedding (a stage that starts the model) and the LM head (a stage that ends
        it). On one slice a tied LM head is the embedding itself; on several it is a second,
        slice-major copy (the embedding's rows stay back to back for EMBED)."""
        tied = self.model.desc.tied_embeddings
        one = self.config.slices == 1
        if first or (last and tied and one):
            self.emb = self.add("token_embd", *self.source("token_embd.weight"), "dense", None,
                                sliced=last and tied and one)
        if last:
            if tied and one:
                self.head = self.emb
            else:
                self.head = self.add("token_embd.head" if tied else "output",
                                     *self.source("token_embd.weight" if tied else "output.weight"),
                                     "dense", None, head=True)

    def source(self, tname: str) -> tuple:
        """(format, raw blocks) of a matrix as the chains take it: F32/F16 quantized to Q8_0
        (once: a tied embedding's two copies share it)."""
        if tname in self._sources:
            return self._sources[tname]
        out = self._source(tname)
        if tname == "token_embd.weight":
            self._sources[tname] = out
        return out

    def _source(self, tname: str) -> tuple:
        config = self.config
        t = self.model.tensor(tname)
        fmt = t.qtype
        raw = t.data
        if fmt in ("f32", "f16"):
            fmt = "q8_0"
            raw = quant.quantize_rows("q8_0", t.dequantize())
            msg = f"{tname}: {t.qtype.upper()} matrix quantized to Q8_0 for the chains"
            warnings.warn(msg, stacklevel=6)          # compile_model's caller
            self.notes.append(msg)
        if fmt not in config.weight_formats:
            raise CompileError(f"{_config_file(config)}: configuration '{config.name}' does not "
                               f"support {fmt.upper()} "
                               f"weights ({tname}); it supports "
                               f"{', '.join(f.upper() for f in config.weight_formats)}")
        return fmt, np.asarray(raw, np.uint8)

    def _pad_to(self, align: int):
        pad = (-self.size) % align
        if self.emit_image:
            self.data.extend(b"\0" * pad)
        self.size += pad

    def add(self, key, fmt, raw, sp, mask, *, head: bool = False, sliced: bool = True) -> CompiledMatrix:
        """Append a matrix (raw dense blocks ``[rows, row bytes]``, encoded as ``sp``): its
        tiles (``sliced``, MV/MM operands; ``head``: the LM head's), or (``sliced=False``,
        the embedding) its rows back to back for EMBED, untiled."""
        config = self.config
        rows, rb_dense = raw.shape
        cols = rb_dense // quant.BLOCK_BYTES[fmt] * 32
        rb = _row_bytes(fmt, sp, cols)
        head = head or (sliced and key == self.head_key)
        problem = (_tiling_problem(config, self.wslot_bytes, rb, rows, head) if sliced
                   else _row_problem(self.wslot_bytes, rb))
        if problem:
            raise _weight_buffer_error(config, self.model, self.sp_of, f"{key}: {problem}")
        P, S = (config.slices, config.stripe_bytes) if sliced else (1, config.stripe_bytes)
        align = _line_align(config) if P > 1 else isa.HBM_ALIGN
        self._pad_to(align)
        off0 = self.size
        enc = _encode_rows(fmt, sp, raw, mask).reshape(rows, rb) if self.emit_image else None
        cm = CompiledMatrix(key, fmt, sp, rows, cols, rb, off0, slices=P, stripe=S)
        sizes = _tile_rows(config, self.wslot_bytes, rb, rows) if sliced else [rows]
        r = 0
        for n in sizes:
            # one slice: tiles follow each other (their starts are 32-byte aligned, _tiling_problem);
            # several: each starts on a line
            self._pad_to(align if P > 1 else 1)
            cm.tiles.append((r, n, self.size))
            if self.emit_image:
                self.data.extend(isa.slice_rows(enc[r:r + n], P, S).tobytes())
            self.size += cm.tile_bytes(n)
            r += n
        self._pad_to(isa.HBM_ALIGN)
        self.matrices[key] = cm
        return cm

    def layer(self, li: int) -> LayerMatrices:
        """Layer ``li``'s matrices, pruned where ``sp_of`` says; q, k and v fused in group
        layout: [q heads of group j, k_j, v_j] for each KV head j."""
        d = self.model.desc
        nkv, g, hd = d.n_kv_heads, d.gqa_group, d.head_dim
        raws = {}
        for w in MATRICES:
            fmt, raw = self.source(f"blk.{li}.{w}.weight")
            sp = self.sp_of[w]
            mask = None
            if sp != "dense" and self.emit_image:
                mask = sparse.prune(fmt, raw, sp)
                self.masks[f"blk.{li}.{w}.weight"] = mask
            raws[w] = (fmt, raw, sp, mask)
        fq, rq, sq, mq = raws["attn_q"]
        fk, rk, sk, mk = raws["attn_k"]
        fv, rv, sv, mv_ = raws["attn_v"]
        if not (len({fq, fk, fv}) == 1 and len({sq, sk, sv}) == 1):
            raise CompileError(f"layer {li}: attn_q/k/v have different types "
                               f"({fq}/{fk}/{fv}, {sq}/{sk}/{sv}); the compiler fuses them")
        parts, mparts = [], []
        for j in range(nkv):
            parts += [rq[j * g * hd:(j + 1) * g * hd], rk[j * hd:(j + 1) * hd], rv[j * hd:(j + 1) * hd]]
            if sq != "dense":
                mparts += [mq[j * g * hd:(j + 1) * g * hd], mk[j * hd:(j + 1) * hd], mv_[j * hd:(j + 1) * hd]]
        qkv = self.add(f"blk.{li}.qkv", fq, np.concatenate(parts), sq,
                       np.concatenate(mparts) if mparts else None)
        rest = {}
        for w in ("attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            f, r, s, m = raws[w]
            rest[w] = self.add(f"blk.{li}.{w}", f, r, s, m)
        return LayerMatrices(qkv, **rest)


@dataclass
class Tables:
    """The tables region of device memory (float32): the constants block (eps, attention
    scale, 1/dim), each stage layer's attention and FFN norm weights, the output norm, the
    RoPE table [ctx][head_dim] (cos, sin). Offsets are from TBASE."""
    data: bytes
    consts: int
    norms: list          # per stage layer: attn norm, then ffn norm
    output_norm: int
    rope: int
    consts_bytes: int = GB_CONSTS

    @classmethod
    def build(cls, model, dims: Dims, la: int, lb: int, ctx: int) -> "Tables":
        from llmfab.core import numerics as N
        d = model.desc
        tables = bytearray()
        consts = np.zeros(GB_CONSTS // 4, np.float32)
        consts[0] = np.float32(d.rms_eps)
        consts[1] = np.float32(1.0 / np.sqrt(dims.hd))
        consts[2] = np.float32(1.0 / dims.dim)     # RMSNORM's 1/n (hardware has no exact divider)
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
        cos, sin = N.rope_tables(dims.hd, d.rope_base, ctx)
        rope = np.concatenate([cos, sin], axis=1).astype(np.float32)     # [ctx, hd]
        tables += rope.tobytes()
        tables += b"\0" * ((-len(tables)) % ALIGN)
        return cls(bytes(tables), t_consts, t_norm, t_onorm, t_rope)


@dataclass
class PrefillPlan:
    """The programs to build: their vector layouts by token count (1: decode), the prefill
    buckets, and why there are not more (``note``)."""
    layouts: dict
    buckets: list
    note: str | None

    @classmethod
    def plan(cls, config, onchip: OnChipPlan, dims: Dims, weights: WeightImage, ctx: int, *,
             prefill: bool, first: bool, last: bool) -> "PrefillPlan":
        """A prefill program runs T tokens (positions R1 .. R1+T-1) with every weight tile
        streamed once for all of them (MM with ntok = T). Its activations are T times the
        decode program's; buckets are the powers of two that fit."""
        head_nr = weights.head.tiles[0][1] if last else 0
        stage_rows = max((cm.tiles[0][1] for mats in weights.layers for cm in mats.all()
                          if len(cm.tiles) > 1), default=0)
        finish = partial(onchip.finish, stage_rows=stage_rows, head_rows=head_nr, dims=dims,
                         whole_model=first and last)
        layouts = {1: finish(onchip.decode)}
        per_token = onchip.decode.vectors
        buckets = []
        cap = min(int(config.max_prefill), ctx, isa.MAX_PREFILL) if prefill else 0
        if not prefill:
            note = "prefill programs not requested"
        elif not onchip.chains and dims.hd % 16:
            note = (f"no prefill programs: head dim {dims.hd} is not a multiple of 16 (the K/V row "
                    f"stores of token t need 32-byte aligned offsets t*head_dim*2)")
        elif not onchip.chains and dims.g > isa.ATTN_HEADS_MASK:
            note = f"no prefill programs: {dims.g} query heads per KV head exceed the ATTN field"
        else:
            note = None
            # the widest matrix streamed in more than one tile: an MM of T tokens keeps their
            # vectors in MvExec's activation buffers from one tile to the next only if T of
            # them fit (isa.MV_ACT_BLOCKS); past that every tile reloads them on the MV unit,
            # T x nb x 40 bytes at 32 a cycle, more than the tile's MACs take (LLaMA2-7B's down
            # projection on u280 at T = 8: 3,440 cycles a 64-row tile against 1,376), while a
            # smaller bucket costs only weight loads, which run beside the MV unit
            multi = [cm for mats in weights.layers for cm in mats.all() if len(cm.tiles) > 1]
            if last and weights.head is not None and len(weights.head.tiles) > 1:
                multi.append(weights.head)
            widest = max(multi, key=lambda cm: cm.cols, default=None)
            T = 2
            while T <= cap:
                try:
                    layouts[T] = finish(VectorLayout.allocate(T, dims, onchip.activation, onchip.glob,
                                                              onchip.chains.scratch_bytes if onchip.chains else 0))
                except FitError as e:
                    note = f"bucket {T} does not fit: {e}"
                    break
                if widest is not None and T * (widest.cols // 32) > isa.MV_ACT_BLOCKS:
                    del layouts[T]
                    note = (f"bucket {T} not built: {T} tokens of {widest.name} ({widest.cols} "
                            f"columns, {len(widest.tiles)} tiles) exceed MvExec's activation "
                            f"buffers ({isa.MV_ACT_BLOCKS} blocks), so each tile would reload them")
                    break
                buckets.append(T)
                T *= 2
            else:
                note = (f"buckets limited by max_prefill {config.max_prefill}, context {ctx} and "
                        f"the ISA's {isa.MAX_PREFILL}-token limit")
            if not buckets:
                note = ("no prefill programs: only T=1 fits the activation buffer "
                        f"({onchip.activation} bytes; {per_token} bytes of activations per token); prompts "
                        f"run through the decode program. {note}")
        return cls(layouts, buckets, note)

    @property
    def max_tokens(self) -> int:
        return max(self.buckets, default=1)


@dataclass
class MemoryMap:
    """Device memory: weights, tables, KV cache, I/O, each at a 4 KiB-aligned base.

    The I/O region holds the output first (logits: decode ``[vocab]``, prefill tile-major
    ``[tile][T][tile rows]``; a stage that does not end the model: the hidden state
    ``[T][dim]`` float32), then at ``tok_off`` the input (the prefill token rows the host
    stages, raw embedding blocks at ``tok_stride``; a stage that does not start the model:
    the hidden state ``[T][dim]``).
    """
    wbase: int
    tbase: int
    kvbase: int
    iobase: int
    weights_bytes: int
    tables_bytes: int
    kv_bytes: int
    io_bytes: int
    out_bytes: int       # the I/O region's output part
    tok_stride: int
    tok_off: int
    tok_bytes: int

    @property
    def hbm_used(self) -> int:
        return self.iobase + self.io_bytes

    @classmethod
    def plan(cls, config, d, onchip: OnChipPlan, weights: WeightImage, tables: Tables,
             buckets: list, max_t: int, *, n_layers: int, ctx: int, first: bool, last: bool) -> "MemoryMap":
        wbase = 0
        tbase = _align(wbase + weights.size)
        kvbase = _align(tbase + len(tables.data))
        kv_bytes = n_layers * d.n_kv_heads * onchip.kv_slot_bytes
        iobase = _align(kvbase + kv_bytes)
        out_bytes = max_t * (d.vocab_size if last else d.dim) * 4
        tok_stride = _align(weights.emb.row_bytes, isa.HBM_ALIGN) if first else d.dim * 4
        tok_off = _align(out_bytes, isa.HBM_ALIGN)
        tok_bytes = max_t * tok_stride if buckets or not first else 0
        if first and last:
            io_bytes = _align(out_bytes + tok_bytes + 4096) if buckets else _align(d.vocab_size * 4 + 4096)
        else:
            io_bytes = _align(tok_off + tok_bytes + 4096)
        m = cls(wbase, tbase, kvbase, iobase, weights.size, len(tables.data), kv_bytes, io_bytes,
                out_bytes, tok_stride, tok_off, tok_bytes)
        board = config.board_spec
        cap = board.total_memory_bytes
        if m.hbm_used > cap:
            raise FitError(f"model '{d.name}' needs {m.hbm_used / 2**30:.2f} GiB of device memory "
                           f"(weights {weights.size / 2**30:.2f} GiB, KV cache {kv_bytes / 2**30:.2f} GiB "
                           f"at context {ctx}) but board '{board.name}' has {cap / 2**30:.2f} GiB")
        if iobase // isa.HBM_ALIGN >= 1 << 28:
            raise CompileError("device memory map exceeds the ISA's 8 GiB offset range")
        if weights.emb is not None and weights.emb.row_bytes >= 1 << 16:
            raise CompileError(f"embedding row of {weights.emb.row_bytes} bytes exceeds the LD stride field")
        return m

    def image(self, weights: WeightImage, tables: Tables) -> np.ndarray:
        """The HBM image: weights and tables (the KV cache and I/O start zeroed)."""
        img = np.zeros(self.kvbase, np.uint8)
        img[self.wbase:self.wbase + self.weights_bytes] = np.frombuffer(weights.data, np.uint8)
        img[self.tbase:self.tbase + self.tables_bytes] = np.frombuffer(tables.data, np.uint8)
        return img

    def manifest(self, config, d, *, buckets: list, first: bool, last: bool) -> dict:
        mm = {
            "weights": [self.wbase, self.weights_bytes], "tables": [self.tbase, self.tables_bytes],
            "kv": [self.kvbase, self.kv_bytes], "io": [self.iobase, self.io_bytes],
            "hbm_stripe_bytes": config.hbm.data_width // 8, "hbm_ports": config.hbm.ports,
        }
        if last:
            mm["logits"] = [self.iobase, d.vocab_size * 4]
        else:
            mm["hidden_out"] = [self.iobase, self.out_bytes]
        if not first:
            mm["hidden_in"] = [self.iobase + self.tok_off, self.tok_bytes]
        if buckets and last:
            mm["prefill_logits"] = [self.iobase, self.out_bytes]
        if buckets and first:
            mm["prefill_tokens"] = [self.iobase + self.tok_off, self.tok_bytes]
        return mm

    def registers(self) -> dict:
        return {"wbase": self.wbase, "tbase": self.tbase, "kvbase": self.kvbase, "iobase": self.iobase}


@dataclass
class CompileParts:
    """What the program builder addresses (compiler/program.py)."""
    dims: Dims
    onchip: OnChipPlan
    weights: WeightImage
    tables: Tables
    memory: MemoryMap
    n_layers: int        # layers of the stage
    first: bool          # the stage starts the model (embedding)
    last: bool           # the stage ends the model (final norm, LM head)
    #: MvExec's row pipelines (``chain.count`` x 32-weight block lanes) and token lanes
    #: (``chain.tokens``): what an MM tile costs, for the prefill schedule's choices
    pipelines: int = 1
    token_lanes: int = 1


def _assemble(instrs) -> tuple:
    """(program bytes, instruction counts by opcode)."""
    counts = {}
    for ins in instrs:
        counts[ins.op] = counts.get(ins.op, 0) + 1
    return isa.to_bytes([isa.encode(ins) for ins in instrs]), counts


# --------------------------------------------------------------------------------------
# the compiler
# --------------------------------------------------------------------------------------

def _check_request(model, config, layers, context, sparsity) -> tuple:
    """Check what is asked of the compiler: ((la, lb), context, sparsity by matrix)."""
    d = model.desc
    la, lb = (0, d.n_layers) if layers is None else (int(layers[0]), int(layers[1]))
    if not 0 <= la < lb <= d.n_layers:
        raise CompileError(f"layers [{la}, {lb}) is not a range of model '{d.name}' "
                           f"({d.n_layers} layers)")
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
    return (la, lb), ctx, sp_of


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
    (la, lb), ctx, sp_of = _check_request(model, config, layers, context, sparsity)
    first, last = la == 0, lb == d.n_layers
    if layers is None:
        _check_device_memory(model, config, ctx, sp_of)

    dims = Dims.of(d)
    onchip = OnChipPlan.plan(config, dims, ctx)
    weights = WeightImage.build(model, config, sp_of, onchip.wslot_bytes, la, lb,
                                emit_image=emit_image, progress=progress)
    tables = Tables.build(model, dims, la, lb, ctx)
    pf = PrefillPlan.plan(config, onchip, dims, weights, ctx, prefill=prefill, first=first, last=last)
    notes = list(weights.notes)
    if pf.note and not pf.buckets and prefill:
        notes.append(pf.note)
    mem = MemoryMap.plan(config, d, onchip, weights, tables, pf.buckets, pf.max_tokens,
                         n_layers=lb - la, ctx=ctx, first=first, last=last)
    parts = CompileParts(dims, onchip, weights, tables, mem, lb - la, first, last,
                         pipelines=config.chain.count * config.block_lanes_per_chain,
                         token_lanes=config.chain.tokens)

    program, counts = _assemble(ProgramBuilder(parts, pf.layouts[1]).build())
    prefill_programs, prefill_info = {}, {}
    kv_programs, kv_info = {}, {}
    last_programs, last_info = {}, {}
    for T in pf.buckets:
        prog, cnt = _assemble(ProgramBuilder(parts, pf.layouts[T]).build())
        prefill_programs[T] = prog
        prefill_info[str(T)] = {"file": f"prefill_{T}.bin", "tokens": T, "words": len(prog) // isa.WORD_BYTES,
                                "bytes": len(prog), "instructions": cnt,
                                "activation_bytes": pf.layouts[T].ab.top}
        if last:
            # the same run without logits: the prompt's runs before its last (docs/isa.md)
            prog, cnt = _assemble(ProgramBuilder(parts, pf.layouts[T], kv_only=True).build())
            kv_programs[T] = prog
            kv_info[str(T)] = {"file": f"prefill_kv_{T}.bin", "tokens": T,
                               "words": len(prog) // isa.WORD_BYTES, "bytes": len(prog), "instructions": cnt}
            # the same run with the last token's logits only: a prompt's last run (forward_last)
            prog, cnt = _assemble(ProgramBuilder(parts, pf.layouts[T], last_only=True).build())
            last_programs[T] = prog
            last_info[str(T)] = {"file": f"prefill_last_{T}.bin", "tokens": T,
                                 "words": len(prog) // isa.WORD_BYTES, "bytes": len(prog), "instructions": cnt}

    img = mem.image(weights, tables) if emit_image else np.zeros(0, np.uint8)
    emb, head = weights.emb, weights.head
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
        "hbm_size": int(mem.hbm_used),
        "memory_map": mem.manifest(config, d, buckets=pf.buckets, first=first, last=last),
        "registers": mem.registers(),
        "onchip": onchip.manifest(ctx),
        "programs": {"decode": {"file": "program.bin", "tokens": 1, "words": len(program) // isa.WORD_BYTES,
                                "bytes": len(program)},
                     "prefill": prefill_info, "prefill_kv": kv_info, "prefill_last": last_info},
        "prefill": {
            "buckets": pf.buckets,
            "note": pf.note,
            "per_token_activation_bytes": onchip.decode.vectors,
            "activation_buffer_bytes": onchip.activation,
            # the host stages token t's embedding row (raw blocks) at prefill_tokens + t*row_stride
            **({"token_rows": {"row_stride": mem.tok_stride, "row_bytes": emb.row_bytes, "format": emb.fmt,
                               "embedding_offset": emb.hbm_off}} if first else {}),
            # logits of a T-token run: tile (r0, nr) is [T][nr] float32 at prefill_logits + T*r0*4
            "lm_head_tiles": [[r0, nr] for (r0, nr, _) in head.tiles] if last else [],
        },
        "stats": {
            "instructions": counts, "weight_bytes": weights.size,
            # every matrix streams once per decode step (its tiles, slice-major), plus one
            # embedding row; an embedding only EMBED reads (untied, or a tied one's row copy
            # on several slices) is not streamed
            "weight_bytes_per_token": weights.size + (emb.row_bytes if first else 0)
            - (emb.rows * emb.row_bytes if emb is not None and emb is not head else 0),
            "prefill_program_bytes": {str(T): len(p) for T, p in prefill_programs.items()},
            "prefill_kv_program_bytes": {str(T): len(p) for T, p in kv_programs.items()},
            "prefill_last_program_bytes": {str(T): len(p) for T, p in last_programs.items()},
            "compile_seconds": round(time.perf_counter() - t0, 3),
        },
        "notes": notes,
    }
    if layers is not None:
        manifest["stage"] = {"layers": [la, lb], "first": first, "last": last, "hidden_dim": dims.dim}
    b = Bundle(manifest=manifest, program=program, hbm_image=img, prefill=prefill_programs,
               prefill_kv=kv_programs, prefill_last=last_programs)
    b.extra["masks"] = weights.masks
    return b
