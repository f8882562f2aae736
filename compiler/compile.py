"""The compiler: imported model + accelerator configuration -> program bundle.

One decode program serves every position: the token position (R1), the token
id (R7) and the region bases (R3..R6) are runtime registers; the KV-cache
loads scale their length by R1, the KV stores and the RoPE-table load index
by R1, the embedding load by R7. Program size does not grow with context.

Schedule (decoupled access-execute): weights stream through a double-buffered
weight buffer (WB), the per-head KV cache through a double-buffered KV buffer
(KB), per-layer tables (norm weights, RoPE row) through a double-buffered
global buffer (GB). Loads for step i+1 are issued before the compute of step
i, so loads overlap compute; dependency tokens order them (see docs/isa.md).
During decode the activations never leave the chip: the only stores are the
new K/V rows and the logits.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from llmfab.boards.errors import CompileError, FitError
from llmfab.compiler import isa, quant, sparse
from llmfab.compiler.bundle import FORMAT_VERSION, Bundle
from llmfab.compiler.model import Model

ALIGN = 4096
QBLOCK_BYTES = 40          # quantized activation block in QB: 32 q + fp32 d + int32 sumq
GB_CONSTS = 64             # constants block at the start of GB: eps, attention scale
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
    return cols // 32 * sparse.sparse_block_bytes(fmt, sp)


def _encode_rows(fmt, sp, raw, mask):
    if sp == "dense":
        return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    return sparse.encode_sparse_rows(fmt, raw, mask, sp).reshape(-1)


def parse_sparsity(spec: str | None) -> dict:
    """'2:4' (all projections) or 'ffn=2:4,attn=8:16' -> {matrix name: pattern}."""
    out = {m: "dense" for m in MATRICES}
    if not spec:
        return out
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
        sparse.parse_pattern(pat)
        for n in names:
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


def compile_model(model: Model, config, *, sparsity: str | None = None, progress: bool = False,
                  context: int | None = None, emit_image: bool = True) -> Bundle:
    """Compile ``model`` for ``config`` into a bundle (decode program + HBM image + manifest).

    ``emit_image=False`` lays out the weights (sizes and addresses) without
    copying them, for program-size and compile-time studies of shape-only models.
    """
    t0 = time.perf_counter()
    d = model.desc
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
            raise CompileError(f"configuration '{config.name}' does not support sparsity {p} "
                               f"(supports {', '.join(config.sparsity)})")
    notes = []
    _check_device_memory(model, config, ctx, sp_of)

    # ---- on-chip regions ------------------------------------------------------------
    bb = config.buffer_bytes
    ab_sz, gb_sz, kb_sz, wb_sz = bb["activation"], bb["global"], bb["kv"], bb["weight"]
    AB = OnChip("activation", 0, ab_sz)
    GB = OnChip("global", ab_sz, gb_sz)
    KB = OnChip("kv", ab_sz + gb_sz, kb_sz)
    WB = OnChip("weight", ab_sz + gb_sz + kb_sz, wb_sz)
    onchip_total = ab_sz + gb_sz + kb_sz + wb_sz
    if onchip_total >= 1 << 24:
        raise CompileError(f"on-chip buffers total {onchip_total} bytes; the ISA addresses 16 MiB")

    dim, ffn, hd = d.dim, d.ffn_dim, d.head_dim
    nq, nkv, g = d.n_heads, d.n_kv_heads, d.gqa_group
    grp_rows = (g + 2) * hd
    X = AB.alloc(dim * 4, "residual")
    H = AB.alloc(max(dim, nq * hd) * 4, "normed vector")
    QKV = AB.alloc(nkv * grp_rows * 4, "q/k/v")
    O = AB.alloc(nq * hd * 4, "attention output")
    G = AB.alloc(ffn * 4, "gate")
    U = AB.alloc(ffn * 4, "up")
    QH = AB.alloc(max(dim, nq * hd) // 32 * QBLOCK_BYTES, "quantized vector")
    QF = AB.alloc(ffn // 32 * QBLOCK_BYTES, "quantized FFN vector")
    CONSTS = GB.alloc(GB_CONSTS, "constants")
    tbl_bytes = (2 * dim + hd) * 4
    GSLOT = [GB.alloc(tbl_bytes, "layer tables"), GB.alloc(tbl_bytes, "layer tables")]
    kv_head_bytes = ctx * hd * 2
    KSLOT = [KB.alloc(2 * kv_head_bytes, "K/V of one head"), KB.alloc(2 * kv_head_bytes, "K/V of one head")]
    wslot_bytes = (wb_sz // 2) // 64 * 64
    WSLOT = [WB.alloc(wslot_bytes, "weight tile"), WB.alloc(wslot_bytes, "weight tile")]
    # logits slots take what is left of AB
    left = (AB.size - _align(AB.top, 64)) // 2 // 64 * 64

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
            raise CompileError(f"configuration '{config.name}' does not support {fmt.upper()} "
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
        if rb > wslot_bytes:
            raise FitError(f"a row of {key} ({rb} bytes) does not fit a weight-buffer slot of "
                           f"{wslot_bytes} bytes; use a configuration with a larger buffers.weight_kib")
        per = wslot_bytes // rb
        unit = int(np.lcm(config.chain.count, 8))    # whole chains; 32-byte aligned logits
        if per >= unit:
            per = per // unit * unit
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

    it = range(d.n_layers)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="compiling", unit="layer")
    # embedding / LM head first: the embedding LD indexes its rows by R7
    emb_fmt, emb_raw = weight("embedding", "token_embd.weight")
    emb = add_matrix("token_embd", emb_fmt, "dense", emb_raw, None)
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
    from llmfab.sim import numerics as N
    tables = bytearray()
    consts = np.zeros(GB_CONSTS // 4, np.float32)
    consts[0] = np.float32(d.rms_eps)
    consts[1] = np.float32(1.0 / np.sqrt(hd))
    t_consts = len(tables)
    tables += consts.tobytes()
    t_norm = []
    for li in range(d.n_layers):
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

    # ---- HBM memory map ---------------------------------------------------------------
    prog_max = 0
    WBASE = 0
    TBASE = _align(WBASE + weights_bytes)
    KVBASE = _align(TBASE + len(tables))
    kv_bytes = d.n_layers * nkv * 2 * kv_head_bytes
    IOBASE = _align(KVBASE + kv_bytes)
    io_bytes = _align(d.vocab_size * 4 + 4096)
    hbm_used = IOBASE + io_bytes
    board = config.board_spec
    cap = board.total_memory_bytes
    if hbm_used > cap:
        raise FitError(f"model '{d.name}' needs {hbm_used / 2**30:.2f} GiB of device memory "
                       f"(weights {weights_bytes / 2**30:.2f} GiB, KV cache {kv_bytes / 2**30:.2f} GiB "
                       f"at context {ctx}) but board '{board.name}' has {cap / 2**30:.2f} GiB")
    if IOBASE // isa.HBM_ALIGN >= 1 << 28:
        raise CompileError("device memory map exceeds the ISA's 8 GiB offset range")

    # ---- program ---------------------------------------------------------------------
    S = Scheduler()
    jobs = []   # each: dict(slot=(ring, idx) or None, loads=[fields...], ops=[callables])

    def hoff(x):
        assert x % isa.HBM_ALIGN == 0, x
        return x // isa.HBM_ALIGN

    # ring state: slot -> free event (cmp2ld) of its last consumer
    ring_free = {}
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

    # Work list: (loads or None, compute thunk). Loads of item i+1 are emitted before compute i.
    work = []

    def W(loads, compute):
        work.append((loads, compute))

    wslot_i = [0]
    kslot_i = [0]
    gslot_i = [0]

    def next_slot(counter, n=2):
        s = counter[0] % n
        counter[0] += 1
        return s

    def matrix_work(cm, qsrc, dst, logits=None):
        for ti, (r0, nr, off) in enumerate(cm.tiles):
            s = next_slot(wslot_i)
            gid = f"{cm.name}.{ti}"
            lds = [dict(buf=WSLOT[s], hreg=isa.REG_WBASE, hoff=hoff(off), len=nr * cm.row_bytes)]

            def comp(cm=cm, s=s, gid=gid, r0=r0, nr=nr, ti=ti):
                if logits is None:
                    consume("MV", gid=gid, free_slot=("W", s), func=isa.mv_func(cm.fmt, cm.sparsity),
                            wb=WSLOT[s], rows=nr, cols=cm.cols, qsrc=qsrc, dst=dst + r0 * 4)
                else:
                    ls = ti % 2
                    lslot = logits[ls]
                    e = consume("MV", gid=gid, free_slot=("W", s),
                                need={"st2cmp": ev.get(("logit_st", ls), {}).get("st2cmp")},
                                release=["cmp2st"], func=isa.mv_func(cm.fmt, cm.sparsity),
                                wb=WSLOT[s], rows=nr, cols=cm.cols, qsrc=qsrc, dst=lslot)
                    e2 = S.emit("ST", need={"cmp2st": e["cmp2st"]}, release=["st2cmp"], func=isa.ST_F32,
                                buf=lslot, hreg=isa.REG_IOBASE, hoff=hoff(r0 * 4),
                                len=nr * 4)
                    ev[("logit_st", ls)] = e2
            W((gid, ("W", s), lds), comp)

    # constants: loaded once
    W(("consts", ("C", 0), [dict(buf=CONSTS, hreg=isa.REG_TBASE, hoff=hoff(t_consts), len=GB_CONSTS)]),
      lambda: consume("MISC", gid="consts", func=isa.MISC_FUNCS["NOP"]))

    # embedding row (dynamic: R7 selects the row)
    es = next_slot(wslot_i)
    W(("emb", ("W", es), [dict(buf=WSLOT[es], hreg=isa.REG_WBASE, hoff=hoff(emb.hbm_off),
                               ireg=isa.REG_TOKEN, stride=emb.row_bytes,
                               len=emb.row_bytes)]),
      lambda: consume("MISC", gid="emb", free_slot=("W", es), func=isa.MISC_FUNCS["EMBED"], dst=X,
                      a=WSLOT[es], n=dim, aux=isa.FMTS.index(emb.fmt)))
    if emb.row_bytes >= 1 << 16:
        raise CompileError(f"embedding row of {emb.row_bytes} bytes exceeds the LD stride field")

    F = isa.MISC_FUNCS
    kv_st_events = []

    for li in range(d.n_layers):
        mats = layer_mats[li]
        gs = next_slot(gslot_i)
        gbase = GSLOT[gs]
        gid = f"tables.{li}"
        lds = [dict(buf=gbase, hreg=isa.REG_TBASE, hoff=hoff(t_norm[li]) if t_norm[li] % 32 == 0 else None,
                    len=2 * dim * 4),
               dict(buf=gbase + 2 * dim * 4, hreg=isa.REG_TBASE, hoff=hoff(t_rope), ireg=isa.REG_POS,
                    stride=hd * 4, len=hd * 4)]
        if lds[0]["hoff"] is None:
            raise CompileError("norm table is not 32-byte aligned (dim must be a multiple of 8)")

        def c_norm(li=li, gbase=gbase, gid=gid):
            # the first QKV MV of this layer overwrites q/k/v that the previous layer's KV
            # stores read: RMSNORM waits for those stores (st2cmp)
            consume("MISC", gid=gid, need={"st2cmp": kv_st_events[-1] if kv_st_events else None},
                    func=F["RMSNORM"], dst=H, a=X, b=gbase, n=dim)
            consume("MISC", func=F["QUANT"], dst=QH, a=H, n=dim)
        W((gid, ("G", gs), lds), c_norm)
        matrix_work(mats["qkv"], QH, QKV)

        for j in range(nkv):
            ks = next_slot(kslot_i)
            kgid = f"kv.{li}.{j}"
            kbase = KVBASE + ((li * nkv + j) * 2) * kv_head_bytes
            vbase = kbase + kv_head_bytes
            klds = [dict(buf=KSLOT[ks], hreg=isa.REG_KVBASE, hoff=hoff(kbase - KVBASE), lreg=isa.REG_POS,
                         lmul=hd * 2),
                    dict(buf=KSLOT[ks] + kv_head_bytes, hreg=isa.REG_KVBASE, hoff=hoff(vbase - KVBASE),
                         lreg=isa.REG_POS, lmul=hd * 2)]
            gaddr = QKV + j * grp_rows * 4

            def c_attn(j=j, ks=ks, kgid=kgid, gaddr=gaddr, kbase=kbase, vbase=vbase, gbase=gbase,
                       li=li, gid=gid):
                last_layer_use = j == nkv - 1
                e = consume("MISC", func=F["ROPE"], dst=gaddr, a=gaddr, b=gbase + 2 * dim * 4,
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
                consume("MISC", gid=kgid, free_slot=("K", ks), func=F["ATTN"], dst=O + j * g * hd * 4,
                        a=gaddr, b=KSLOT[ks], n=g, aux=hd, reg=isa.REG_POS)
            W((kgid, ("K", ks), klds), c_attn)

        def c_o():
            consume("MISC", func=F["QUANT"], dst=QH, a=O, n=nq * hd)
        W(None, c_o)
        matrix_work(mats["attn_output"], QH, H)

        def c_ffn_in(gbase=gbase, gs=gs):
            consume("MISC", func=F["ADD"], dst=X, a=X, b=H, n=dim)
            consume("MISC", free_slot=("G", gs), func=F["RMSNORM"], dst=H, a=X, b=gbase + dim * 4, n=dim)
            consume("MISC", func=F["QUANT"], dst=QH, a=H, n=dim)
        W(None, c_ffn_in)
        matrix_work(mats["ffn_gate"], QH, G)
        matrix_work(mats["ffn_up"], QH, U)

        def c_act():
            consume("MISC", func=F["SILU_MUL"], dst=G, a=G, b=U, n=ffn)
            consume("MISC", func=F["QUANT"], dst=QF, a=G, n=ffn)
        W(None, c_act)
        matrix_work(mats["ffn_down"], QF, H)
        W(None, lambda: consume("MISC", func=F["ADD"], dst=X, a=X, b=H, n=dim))

    # final norm + LM head, logits streamed out through two AB slots
    gs = next_slot(gslot_i)
    W(("onorm", ("G", gs), [dict(buf=GSLOT[gs], hreg=isa.REG_TBASE, hoff=hoff(t_onorm), len=dim * 4)]),
      lambda gs=gs: (consume("MISC", gid="onorm", free_slot=("G", gs), func=F["RMSNORM"], dst=H, a=X,
                             b=GSLOT[gs], n=dim),
                     consume("MISC", func=F["QUANT"], dst=QH, a=H, n=dim)))
    lt = head.tiles[0][1] * 4
    if 2 * _align(lt, 64) > left:
        raise FitError(f"activation buffer too small for the logits slots ({2 * lt} bytes needed)")
    LOGS = [AB.alloc(lt, "logits slot"), AB.alloc(lt, "logits slot")]
    for (r0, nr, off) in head.tiles:
        if (r0 * 4) % isa.HBM_ALIGN:
            raise CompileError("LM-head tile rows must start at multiples of 8")
    matrix_work(head, QH, None, logits=LOGS)

    # emit with one item of lookahead on the loads
    def emit_loads(item):
        loads = item[0]
        if loads:
            gid, slot, lds = loads
            load_group(gid, slot, lds)

    if work:
        emit_loads(work[0])
    for i, (loads, comp) in enumerate(work):
        if i + 1 < len(work):
            emit_loads(work[i + 1])
        comp()
    S.emit("SYS", func=isa.SYS_END)

    words = []
    for ins in S.instrs:
        words.append(isa.encode(ins))
    program = isa.to_bytes(words)

    # ---- HBM image ---------------------------------------------------------------------
    if emit_image:
        img = np.zeros(KVBASE, np.uint8)       # weights + tables; KV and I/O start zeroed
        img[WBASE:WBASE + weights_bytes] = np.frombuffer(image, np.uint8)
        img[TBASE:TBASE + len(tables)] = np.frombuffer(bytes(tables), np.uint8)
    else:
        img = np.zeros(0, np.uint8)

    counts = {}
    for ins in S.instrs:
        counts[ins.op] = counts.get(ins.op, 0) + 1
    manifest = {
        "format_version": FORMAT_VERSION,
        "config_name": config.name,
        "config_hash": config.config_hash(),
        "model": {**d.to_dict(), "source": model.source, "file": str(model.path)},
        "context": ctx,
        "sparsity": sp_of,
        "hbm_size": int(hbm_used),
        "memory_map": {
            "weights": [WBASE, weights_bytes], "tables": [TBASE, len(tables)],
            "kv": [KVBASE, kv_bytes], "io": [IOBASE, io_bytes],
            "logits": [IOBASE, d.vocab_size * 4],
            "hbm_stripe_bytes": config.hbm.data_width // 8, "hbm_ports": config.hbm.ports,
        },
        "registers": {"wbase": WBASE, "tbase": TBASE, "kvbase": KVBASE, "iobase": IOBASE},
        "onchip": {
            "size": onchip_total,
            "activation": [0, ab_sz], "global": [ab_sz, gb_sz], "kv": [ab_sz + gb_sz, kb_sz],
            "weight": [ab_sz + gb_sz + kb_sz, wb_sz],
            "context": ctx,
        },
        "programs": {"decode": {"words": len(words), "bytes": len(program)}},
        "stats": {
            "instructions": counts, "weight_bytes": weights_bytes,
            # every matrix streams once per decode step, plus one embedding row
            "weight_bytes_per_token": weights_bytes + emb.row_bytes
            - (0 if d.tied_embeddings else emb.rows * emb.row_bytes),
            "compile_seconds": round(time.perf_counter() - t0, 3),
        },
        "notes": notes,
    }
    b = Bundle(manifest=manifest, program=program, hbm_image=img)
    b.extra["masks"] = masks
    return b


def compile_cli(args) -> None:
    """`llmfab compile [--model GGUF] [--config NAME|PATH] --out BUNDLE [--sparsity ...]`."""
    from llmfab.boards.config import load_config
    from llmfab.compiler.bundle import write_bundle
    from llmfab.compiler.model import load_model

    model = load_model(args.model)
    config = load_config(args.config)
    b = compile_model(model, config, sparsity=args.sparsity, progress=True)
    report = b.manifest["stats"]
    if args.sparsity:
        from llmfab.compiler.report import sparsity_report
        report["accuracy"] = sparsity_report(model, b, config)
        b.manifest["stats"] = report
    write_bundle(b, args.out)
    print(json.dumps({"bundle": args.out, "program_bytes": len(b.program),
                      "instructions": report["instructions"],
                      "weight_bytes": report["weight_bytes"],
                      "compile_seconds": report["compile_seconds"],
                      **({"accuracy": report["accuracy"]} if "accuracy" in report else {})}))
