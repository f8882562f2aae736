"""The llmfab instruction set: 128-bit words, FlightLLM-style classes with dependency tokens.

Layouts are lists of ``(field, width)`` from bit 0 upwards, so the hardware can
turn them into ``amaranth.lib.data.StructLayout``\\ s (``hw/isa.py``) without
the compiler importing the hardware. docs/isa.md is the prose version.

Every word starts with the same 16-bit header::

    op[4] wait_prev[1] wait_next[1] rel_prev[1] rel_next[1] func[8]

Queues (decoupled access-execute): LD -> load queue, MV/MM/MISC -> compute
queue, ST -> store queue, SYS -> executed by the dispatcher. Tokens flow on
four channels: ld2cmp (LD rel_next -> compute wait_prev), cmp2ld (compute
rel_prev -> LD wait_next), cmp2st (compute rel_next -> ST wait_prev), st2cmp
(ST rel_prev -> compute wait_next).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmfab.core.errors import IsaError
from llmfab.core.formats import QBLOCK_BYTES, SPARSITY_PATTERNS, WEIGHT_FORMATS, block_bytes

WORD_BITS = 128
WORD_BYTES = 16
NREGS = 16
HBM_ALIGN = 32          # hbm_off is in units of 32 bytes

# opcodes
OP_LD, OP_ST, OP_MV, OP_MM, OP_MISC, OP_SYS = 1, 2, 3, 4, 5, 6
OPNAMES = {OP_LD: "LD", OP_ST: "ST", OP_MV: "MV", OP_MM: "MM", OP_MISC: "MISC", OP_SYS: "SYS"}
OPCODES = {v: k for k, v in OPNAMES.items()}
QUEUE = {OP_LD: "ld", OP_ST: "st", OP_MV: "cmp", OP_MM: "cmp", OP_MISC: "cmp", OP_SYS: "sys"}

# LD func
LD_RAW = 0
# ST func: ST.x (2) indexes the on-chip address too (buf + R[ireg]*stride)
ST_F32, ST_F16, ST_X = 0, 1, 2
ST_NAMES = {ST_F32: "", ST_F16: ".f16", ST_X: ".x"}
# MV/MM func: fmt[2] | sparsity[3] << 2 | MV_RT | MV_BT (MV only: the tiled layouts of the
# attention operands, docs/isa.md "Attention on the chains")
MV_RT = 1 << 5          # rows in tiles of TILE_ROWS rows (the K cache: positions x head dim)
MV_BT = 1 << 6          # columns in tiles of one block (the transposed V cache: head dim x positions)
TILE_ROWS = 32
FMTS = tuple(WEIGHT_FORMATS)            # fmt codes 0, 1, 2 in the catalogue's order
SPARSITIES = tuple(SPARSITY_PATTERNS)   # sparsity codes in the catalogue's order
# MISC (SFU) funcs
MISC_FUNCS = {
    "NOP": 0, "QUANT": 1, "RMSNORM": 2, "ROPE": 3, "ADD": 4, "MUL": 5, "SILU_MUL": 6,
    "ATTN": 7, "COPY": 8, "EMBED": 9, "KVROW": 10, "SOFTMAX": 11,
}
#: MISC funcs whose length is ``n + R[reg]`` (docs/isa.md, "Attention on the chains")
MISC_DYN_LEN = ("QUANT", "MUL", "SOFTMAX")
MISC_NAMES = {v: k for k, v in MISC_FUNCS.items()}
# MISC ATTN operands: n = heads[7:0] | t[15:8]; aux = head_dim[14:0] | ATTN_CACHED (bit 15)
ATTN_T_SHIFT = 8
ATTN_HEADS_MASK = 0xFF
ATTN_CACHED = 1 << 15       # the current K/V row comes from the cache too (prefill)
ATTN_HD_MASK = ATTN_CACHED - 1
MAX_PREFILL = 128           # largest bucket: t < 256 (ATTN n[15:8]), ntok < 256; powers of two
#: Blocks of MvExec's activation buffers (hw/mv_exec.py ``DEFAULT_MAX_BLOCKS``): an MM keeps its
#: ``ntok`` vectors of ``cols/32`` blocks for the next tile of its matrix only when they all fit
#: (one pass); otherwise every tile reloads them, 40 bytes a block at 32 a cycle.
MV_ACT_BLOCKS = 2048
# SYS funcs
SYS_NOP, SYS_SYNC, SYS_END = 0, 1, 2
SYS_NAMES = {SYS_NOP: "NOP", SYS_SYNC: "SYNC", SYS_END: "END"}

# runtime registers
REG_ZERO, REG_POS, REG_SEQ, REG_WBASE, REG_KVBASE, REG_IOBASE, REG_TBASE, REG_TOKEN = range(8)
REG_PTILE, REG_PBASE = 8, 9      # pos // TILE_ROWS and pos - pos % TILE_ROWS (the KV tile of pos)
REG_NAMES = {REG_ZERO: "zero", REG_POS: "pos", REG_SEQ: "seq", REG_WBASE: "wbase",
             REG_KVBASE: "kvbase", REG_IOBASE: "iobase", REG_TBASE: "tbase", REG_TOKEN: "token",
             REG_PTILE: "ptile", REG_PBASE: "pbase"}
#: registers the host sets per run (the rest are region bases, constant for a bundle)
RUN_REGS = (REG_POS, REG_SEQ, REG_TOKEN, REG_PTILE, REG_PBASE)


def run_registers(pos: int, token: int = 0, ntok: int = 1) -> dict:
    """The per-run registers of a run at ``pos`` (docs/isa.md, "Runtime registers")."""
    pos = int(pos)
    return {REG_POS: pos, REG_SEQ: pos + int(ntok), REG_TOKEN: int(token),
            REG_PTILE: pos // TILE_ROWS, REG_PBASE: pos // TILE_ROWS * TILE_ROWS}

# status codes (golden model and RTL report the same)
STATUS_OK = 0
STATUS_ILLEGAL = 1
STATUS_HBM_RANGE = 2
STATUS_BUF_RANGE = 3
STATUS_DEADLOCK = 4
STATUS_NO_END = 5
STATUS_NAMES = {0: "ok", 1: "illegal instruction", 2: "HBM address out of range",
                3: "on-chip address out of range", 4: "deadlock", 5: "program ended without END"}

HEADER = [("op", 4), ("wait_prev", 1), ("wait_next", 1), ("rel_prev", 1), ("rel_next", 1),
          ("func", 8)]
_MEM = [("buf", 24), ("hreg", 4), ("hoff", 28), ("ireg", 4), ("stride", 16), ("len", 20),
        ("lreg", 4), ("lmul", 12)]
LAYOUTS = {
    OP_LD: HEADER + _MEM,
    OP_ST: HEADER + _MEM,
    OP_MV: HEADER + [("wb", 24), ("rows", 16), ("cols", 16), ("qsrc", 24), ("dst", 24),
                     ("rreg", 4), ("creg", 4)],
    OP_MM: HEADER + [("wb", 24), ("rows", 16), ("cols", 16), ("qsrc", 24), ("dst", 24),
                     ("ntok", 8)],
    OP_MISC: HEADER + [("dst", 24), ("a", 24), ("b", 24), ("n", 16), ("aux", 16), ("reg", 4),
                       ("rsv", 4)],
    OP_SYS: HEADER + [("rsv", 112)],
}
for _op, _lay in LAYOUTS.items():
    assert sum(w for _, w in _lay) == WORD_BITS, (_op, sum(w for _, w in _lay))


def _offsets(layout):
    off, out = 0, {}
    for name, w in layout:
        out[name] = (off, w)
        off += w
    return out


OFFSETS = {op: _offsets(lay) for op, lay in LAYOUTS.items()}


@dataclass
class Instr:
    """One instruction: its opcode name and field values."""

    op: str
    fields: dict

    def __getitem__(self, k):
        return self.fields.get(k, 0)

    def __repr__(self):
        return disassemble(self)


def make(op: str, **fields) -> Instr:
    return Instr(op, dict(fields))


def encode(ins: Instr) -> int:
    """Instruction -> 128-bit integer. Raises IsaError for a value that does not fit."""
    if ins.op not in OPCODES:
        raise IsaError(f"unknown opcode '{ins.op}'")
    op = OPCODES[ins.op]
    word = op
    offs = OFFSETS[op]
    for name, val in ins.fields.items():
        if name == "op":
            continue
        if name not in offs:
            raise IsaError(f"{ins.op} has no field '{name}'")
        off, w = offs[name]
        val = int(val)
        if val < 0 or val >= (1 << w):
            raise IsaError(f"{ins.op}.{name} = {val} does not fit in {w} bits")
        word |= val << off
    return word


def _legal(op: int, f: dict) -> str | None:
    """Why a decoded word is illegal (None if legal)."""
    q = QUEUE[op]
    if f.get("rsv", 0):
        return "reserved bits set"
    if q == "ld" and (f["wait_prev"] or f["rel_prev"]):
        return "LD has no previous queue"
    if q == "st" and (f["wait_next"] or f["rel_next"]):
        return "ST has no next queue"
    if q == "sys" and (f["wait_prev"] or f["wait_next"] or f["rel_prev"] or f["rel_next"]):
        return "SYS carries no tokens"
    if op == OP_LD and f["func"] != LD_RAW:
        return f"LD func {f['func']}"
    if op == OP_ST and f["func"] not in ST_NAMES:
        return f"ST func {f['func']}"
    if op in (OP_MV, OP_MM):
        fmt, sp = f["func"] & 3, f["func"] >> 2
        if op == OP_MV:
            sp &= ~(MV_RT | MV_BT) >> 2
        if fmt >= len(FMTS) or sp >= len(SPARSITIES):
            return f"{OPNAMES[op]} func {f['func']}"
        if op == OP_MV and f["func"] & MV_RT and f["func"] & MV_BT:
            return "MV with both tiled layouts"
        if f["cols"] == 0 or f["cols"] % 32 or f["rows"] == 0:
            return f"{OPNAMES[op]} shape {f['rows']}x{f['cols']}"
        if op == OP_MM and f["ntok"] == 0:
            return "MM ntok 0"
    if op == OP_MISC and f["func"] not in MISC_NAMES:
        return f"MISC func {f['func']}"
    if op == OP_SYS and f["func"] not in SYS_NAMES:
        return f"SYS func {f['func']}"
    return None


def mv_shape(f, regs) -> tuple:
    """(rows, cols) of an MV/MM word's fields under the registers ``regs``: an MV's
    ``rows + R[rreg]`` and ``cols + R[creg]``."""
    return f["rows"] + regs[f.get("rreg", 0)], f["cols"] + regs[f.get("creg", 0)]


def mv_layout(func) -> str:
    """The weight layout an MV/MM ``func`` names: "rows" (slice-major rows), "row_tiles"
    (MV_RT) or "block_tiles" (MV_BT)."""
    return "row_tiles" if func & MV_RT else "block_tiles" if func & MV_BT else "rows"


def func_block_bytes(func) -> int:
    """Bytes of one 32-weight block of an MV/MM ``func``'s format and sparsity."""
    return block_bytes(FMTS[func & 3], SPARSITIES[(func >> 2) & 7])


def weight_span(func: int, rows: int, cols: int, slices: int = 1, stripe: int = 64) -> int:
    """Bytes of an MV/MM weight operand of ``rows`` x ``cols`` in the layout ``func`` names
    (docs/isa.md, "Slices" and "Attention on the chains"): ``mv_span`` of the rows; for row
    tiles one ``mv_span(TILE_ROWS, row bytes)`` per started tile of ``TILE_ROWS`` rows; for
    block tiles one ``mv_span(rows, block bytes)`` per block."""
    bb = func_block_bytes(func)
    lay = mv_layout(func)
    if lay == "rows":
        return mv_span(rows, cols // 32 * bb, slices, stripe)
    if lay == "row_tiles":
        return -(-rows // TILE_ROWS) * mv_span(TILE_ROWS, cols // 32 * bb, slices, stripe)
    return cols // 32 * mv_span(rows, bb, slices, stripe)


def untile_rows(buf, func: int, rows: int, cols: int, slices: int, stripe: int) -> np.ndarray:
    """The weight rows ``[rows, row bytes]`` of an MV operand in any layout (``buf`` holds at
    least ``weight_span`` bytes from its start)."""
    buf = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf
    bb = func_block_bytes(func)
    rb = cols // 32 * bb
    lay = mv_layout(func)
    if lay == "rows":
        return unslice_rows(buf, rows, rb, slices, stripe)
    if lay == "row_tiles":
        ts = mv_span(TILE_ROWS, rb, slices, stripe)
        nt = -(-rows // TILE_ROWS)
        parts = [unslice_rows(buf[i * ts:(i + 1) * ts], TILE_ROWS, rb, slices, stripe) for i in range(nt)]
        return np.concatenate(parts)[:rows]
    ts = mv_span(rows, bb, slices, stripe)
    nb = cols // 32
    parts = [unslice_rows(buf[j * ts:(j + 1) * ts], rows, bb, slices, stripe) for j in range(nb)]
    return np.concatenate(parts, axis=1) if nb > 1 else parts[0].copy()


def operand_rows(buf, func: int, rows: int, cols: int, slices: int, stripe: int) -> np.ndarray:
    """The weight rows ``[rows, row bytes]`` an MV computes with: :func:`untile_rows`, and with
    ``MV_BT`` (the transposed V cache) every block's ``d`` as binary16 1.0, whatever its bytes
    hold (KVROW writes only the ``q`` bytes; docs/isa.md, "Attention on the chains")."""
    raw = untile_rows(buf, func, rows, cols, slices, stripe)
    if func & MV_BT:
        bb = func_block_bytes(func)
        raw = raw.reshape(rows, cols // 32, bb)
        raw[:, :, 0:2] = np.array([1.0], np.float16).view(np.uint8)
        raw = raw.reshape(rows, -1)
    return raw


def row_address(row: int, row_bytes: int, slices: int, stripe: int) -> np.ndarray:
    """On-chip offsets of the bytes of row ``row`` of a slice-major tile of rows of
    ``row_bytes`` (docs/isa.md, "Slices"): ``[row_bytes]`` from the tile's first line
    (``row`` an array of rows: ``[len(row), row_bytes]``)."""
    row = np.asarray(row)[..., None]
    if slices == 1:
        return row * row_bytes + np.arange(row_bytes)
    p, k = row % slices, row // slices
    o = k * row_bytes + np.arange(row_bytes)            # offsets in slice p's stream
    return (o // stripe) * (slices * stripe) + p * stripe + o % stripe


def attn_fields(heads: int, head_dim: int, t: int = 0, cached: bool = False) -> dict:
    """The ``n`` and ``aux`` operands of an ATTN word (docs/isa.md)."""
    if not 0 < heads <= ATTN_HEADS_MASK or not 0 <= t <= 0xFF or not 0 < head_dim <= ATTN_HD_MASK:
        raise IsaError(f"ATTN operands out of range (heads {heads}, t {t}, head dim {head_dim})")
    return {"n": heads | t << ATTN_T_SHIFT, "aux": head_dim | (ATTN_CACHED if cached else 0)}


def attn_operands(f) -> tuple:
    """(query heads, t, head dim, cached) of an ATTN word's fields."""
    return (f["n"] & ATTN_HEADS_MASK, f["n"] >> ATTN_T_SHIFT, f["aux"] & ATTN_HD_MASK,
            bool(f["aux"] & ATTN_CACHED))


def copy_operands(f) -> tuple:
    """(rows, words per row, destination row stride in words) of a COPY word's fields."""
    reps = max(f["aux"], 1)
    return reps, f["n"], f["b"] if reps > 1 else f["n"]


def mv_span(rows: int, row_bytes: int, slices: int = 1, stripe: int = 64) -> int:
    """Bytes an MV/MM weight tile of ``rows`` rows of ``row_bytes`` occupies, on chip and in
    HBM (docs/isa.md, "Slices").

    One slice (``slices`` = 1): the rows one after the other, ``rows * row_bytes``. On ``P``
    slices the tile is ``P`` interleaved streams: byte ``x`` of the on-chip space belongs to
    slice ``(x // stripe) % P`` (``stripe`` = the HBM port's beat, ``D = P * stripe`` the
    line), and slice ``p``'s stream holds rows ``p, p + P, ...`` back to back. The tile
    starts on a line and covers every slice's stream in whole stripes:
    ``P * ceil(ceil(rows / P) * row_bytes / stripe) * stripe`` bytes.
    """
    if slices == 1:
        return rows * row_bytes
    per = -(-rows // slices)
    return -(-(per * row_bytes) // stripe) * stripe * slices


def slice_rows(raw: np.ndarray, slices: int, stripe: int) -> np.ndarray:
    """The bytes of an MV/MM weight tile (``mv_span`` of them) from its rows ``[rows, row
    bytes]``: slice ``p``'s rows ``p, p + P, ...`` in stripe ``p`` of every line (zero padded)."""
    raw = np.ascontiguousarray(raw, np.uint8)
    rows, rb = raw.shape
    if slices == 1:
        return raw.reshape(-1).copy()
    span = mv_span(rows, rb, slices, stripe)
    lines = span // (slices * stripe)
    streams = np.zeros((slices, lines * stripe), np.uint8)
    for p in range(slices):
        part = raw[p::slices].reshape(-1)
        streams[p, :part.size] = part
    return streams.reshape(slices, lines, stripe).transpose(1, 0, 2).reshape(-1)


def unslice_rows(buf, rows: int, row_bytes: int, slices: int, stripe: int) -> np.ndarray:
    """The rows ``[rows, row_bytes]`` of an MV/MM weight tile from its bytes (the inverse of
    :func:`slice_rows`; ``buf`` holds at least ``mv_span`` bytes from the tile's first line)."""
    buf = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf
    span = mv_span(rows, row_bytes, slices, stripe)
    if slices == 1:
        return buf[:span].reshape(rows, row_bytes)
    lines = span // (slices * stripe)
    streams = buf[:span].reshape(lines, slices, stripe).transpose(1, 0, 2).reshape(slices, -1)
    out = np.empty((rows, row_bytes), np.uint8)
    for p in range(min(slices, rows)):
        n = len(range(p, rows, slices))
        out[p::slices] = streams[p, :n * row_bytes].reshape(n, row_bytes)
    return out


def kv_region(head_dim: int, context: int, slices: int = 1, stripe: int = 64) -> dict:
    """The layout of one KV head's cache for attention on the chains (docs/isa.md, "Attention
    on the chains"), the same on chip and in HBM: ``k`` (offset of the K row tiles: each
    ``TILE_ROWS`` positions x ``head_dim`` as Q8_0 rows, ``k_tile`` bytes), ``v`` (the
    transposed V block tiles: ``head_dim`` rows x one 32-position block, ``v_tile`` bytes),
    ``scale`` (one binary32 per position) and ``size``."""
    if head_dim % 32:
        raise IsaError(f"head dim {head_dim} is not a multiple of 32 (Q8_0 K rows)")
    nt = -(-context // TILE_ROWS)
    q8 = mv_func("q8_0")
    k_tile = mv_span(TILE_ROWS, head_dim // 32 * func_block_bytes(q8), slices, stripe)
    v_tile = mv_span(head_dim, func_block_bytes(q8), slices, stripe)
    v = nt * k_tile
    sc = v + nt * v_tile
    return {"k": 0, "v": v, "scale": sc, "size": sc + 4 * context, "k_tile": k_tile, "v_tile": v_tile}


def misc_len(f, regs=None) -> int:
    """Elements a MISC word works on: ``n``, or ``n + R[reg]`` for the funcs of MISC_DYN_LEN
    (``regs`` None: the static ``n``)."""
    n = f["n"]
    if regs is not None and MISC_NAMES.get(f["func"]) in MISC_DYN_LEN:
        n += regs[f["reg"]]
    return n


def misc_write_bytes(f, regs=None, kv=None) -> int:
    """Bytes a MISC word's fields write at ``dst`` (0 for NOP): the one statement of each
    operation's result size, for the golden model's range checks and the performance model.
    ``regs``: the run's registers (dynamic lengths); ``kv``: :func:`kv_region` of the
    bundle (KVROW writes into one KV head's region)."""
    name = MISC_NAMES[f["func"]]
    n = misc_len(f, regs)
    if name == "QUANT":
        return n // 32 * QBLOCK_BYTES
    if name in ("ADD", "MUL", "SILU_MUL", "RMSNORM", "EMBED"):
        return 4 * n
    if name == "SOFTMAX":
        return 4 * -(-n // 32) * 32
    if name == "KVROW":
        return kv["size"] if kv else 0
    if name == "ROPE":
        return 4 * n * f["aux"]
    if name == "COPY":
        reps, w, stride = copy_operands(f)
        return 4 * ((reps - 1) * stride + w)
    if name == "ATTN":
        nh, _t, hd, _cached = attn_operands(f)
        return 4 * nh * hd
    return 0


def misc_operand_error(ins: Instr) -> str | None:
    """Why a decoded MISC word's operands are illegal (None if legal).

    These are the operand rules that need no runtime registers; the
    dispatcher's validator applies them (status 1, like an illegal encoding)
    together with the address-range checks. ``decode`` checks the fields only.
    """
    if ins.op != "MISC":
        return None
    f = ins.fields
    name = MISC_NAMES[f["func"]]
    if name in ("QUANT", "EMBED") and f["n"] % 32:
        return f"{name} n={f['n']} is not a multiple of 32"
    if name == "ROPE" and (f["aux"] == 0 or f["aux"] % 2):
        return f"ROPE head dim {f['aux']}"
    if name == "ATTN":
        heads, t, hd, cached = attn_operands(f)
        if hd == 0 or hd % 2:
            return f"ATTN head dim {hd}"
    if name == "KVROW" and (f["n"] == 0 or f["n"] % 32):
        return f"KVROW head dim {f['n']} is not a nonzero multiple of 32"
    if name == "EMBED" and f["aux"] >= 3:
        return f"EMBED format {f['aux']}"
    return None


def chains_feature(ins: Instr) -> str | None:
    """What of "attention on the chains" an instruction uses (None: nothing): an MV's tiled
    layouts or register-extended shape, KVROW, SOFTMAX, a QUANT/MUL length from a register,
    ST.x. A configuration without ``attention: chains`` refuses them (status 1), the
    dispatcher's validator as the golden model (docs/isa.md)."""
    f = ins                                         # missing fields read as 0
    if ins.op == "MV" and (f["func"] & (MV_RT | MV_BT) or f["rreg"] or f["creg"]):
        return "an MV with a tiled layout or a register-extended shape"
    if ins.op == "ST" and f["func"] == ST_X:
        return "ST.x"
    if ins.op == "MISC":
        name = MISC_NAMES[f["func"]]
        if name in ("KVROW", "SOFTMAX"):
            return name
        if name in ("QUANT", "MUL") and f["reg"]:
            return f"a {name} length from a register"
    return None


def dynamic_operand_error(ins: Instr, regs) -> str | None:
    """Why an instruction's register-dependent operands are illegal under ``regs`` (None if
    legal): a dynamic QUANT length or MV column count that is not a multiple of 32."""
    f = ins.fields
    if ins.op == "MISC" and MISC_NAMES[f["func"]] == "QUANT" and f["reg"]:
        n = misc_len(f, regs)
        if n % 32:
            return f"QUANT n={f['n']} + R{f['reg']} = {n} is not a multiple of 32"
    if ins.op == "MV" and f.get("creg", 0):
        rows, cols = mv_shape(f, regs)
        if cols % 32 or cols >= 1 << 16:
            return f"MV cols={f['cols']} + R{f['creg']} = {cols} is not a multiple of 32 below 65536"
    if ins.op == "MV" and f.get("rreg", 0):
        rows, cols = mv_shape(f, regs)
        if rows >= 1 << 16:
            return f"MV rows={f['rows']} + R{f['rreg']} = {rows} does not fit 16 bits"
    return None


def decode(word: int) -> Instr:
    """128-bit integer -> Instruction. Raises IsaError (one line) for an illegal encoding."""
    word = int(word)
    if word < 0 or word >> WORD_BITS:
        raise IsaError(f"instruction word {word:#x} is not 128 bits")
    op = word & 0xF
    if op not in OPNAMES:
        raise IsaError(f"illegal instruction {word:#034x}: opcode {op}")
    f = {}
    for name, (off, w) in OFFSETS[op].items():
        if name == "op":
            continue
        f[name] = (word >> off) & ((1 << w) - 1)
    why = _legal(op, f)
    if why:
        raise IsaError(f"illegal instruction {word:#034x}: {why}")
    f.pop("rsv", None)
    return Instr(OPNAMES[op], f)


def to_bytes(words) -> bytes:
    return b"".join(int(w).to_bytes(WORD_BYTES, "little") for w in words)


def from_bytes(data: bytes) -> list:
    if len(data) % WORD_BYTES:
        raise IsaError(f"program of {len(data)} bytes is not a whole number of 16-byte words")
    return [int.from_bytes(data[i:i + WORD_BYTES], "little") for i in range(0, len(data), WORD_BYTES)]


def assemble(instrs) -> bytes:
    return to_bytes(encode(i) for i in instrs)


def disassemble(ins: Instr) -> str:
    f = dict(ins.fields)
    toks = "".join(c for c, k in (("W", "wait_prev"), ("w", "wait_next"), ("R", "rel_prev"),
                                  ("r", "rel_next")) if f.pop(k, 0))
    func = f.pop("func", 0)
    name = ins.op
    if ins.op in ("MV", "MM"):
        name += f".{FMTS[func & 3] if (func & 3) < 3 else '?'}"
        sp = (func >> 2) & 7
        if func & MV_RT:
            name += ".rt"
        if func & MV_BT:
            name += ".bt"
        if sp:
            name += f".{SPARSITIES[sp] if sp < len(SPARSITIES) else '?'}"
    elif ins.op == "MISC":
        name = MISC_NAMES.get(func, f"MISC{func}")
    elif ins.op == "SYS":
        name = SYS_NAMES.get(func, f"SYS{func}")
    elif ins.op == "ST":
        name += ST_NAMES.get(func, f".{func}")
    body = " ".join(f"{k}={v}" for k, v in f.items() if v)
    return f"{name}{'[' + toks + ']' if toks else ''} {body}".strip()


def mv_func(fmt: str, sparsity: str = "dense") -> int:
    return FMTS.index(fmt) | (SPARSITIES.index(sparsity) << 2)


def random_instr(rng: np.random.Generator) -> Instr:
    """A random legal instruction (for round-trip tests)."""
    op = int(rng.choice(list(OPNAMES)))
    name = OPNAMES[op]
    while True:
        f = {}
        for fname, w in LAYOUTS[op]:
            if fname in ("op", "rsv"):
                continue
            f[fname] = int(rng.integers(0, 1 << min(w, 62))) if w < 63 else int(rng.integers(0, 1 << 62))
        if op == OP_LD:
            f.update(func=0, wait_prev=0, rel_prev=0)
        elif op == OP_ST:
            f.update(func=int(rng.integers(0, 2)), wait_next=0, rel_next=0)
        elif op in (OP_MV, OP_MM):
            f["func"] = mv_func(FMTS[rng.integers(0, 3)], SPARSITIES[rng.integers(0, 5)])
            f["cols"] = 32 * int(rng.integers(1, 2048))
            f["rows"] = max(1, f["rows"])
            if op == OP_MM:
                f["ntok"] = max(1, f["ntok"])
        elif op == OP_MISC:
            f["func"] = int(rng.choice(list(MISC_NAMES)))
        elif op == OP_SYS:
            f = {"func": int(rng.choice(list(SYS_NAMES))), "wait_prev": 0, "wait_next": 0,
                 "rel_prev": 0, "rel_next": 0}
        if _legal(op, {**{k: 0 for k, _ in LAYOUTS[op]}, **f}) is None:
            return Instr(name, f)
