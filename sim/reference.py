"""Backend ``reference``: a plain numpy float32 forward pass of an imported model.

This is the software oracle (not the hardware numerics): weights are
dequantized once to float32, and the LLaMA block is computed as llama.cpp
defines it -- RMSNorm, RoPE on adjacent pairs (GGUF convention), grouped-query
attention over a KV cache, SwiGLU, tied or separate output projection.

With ``llamacpp_rounding`` (the default) it also rounds where llama.cpp's CPU
path (no flash attention) rounds:

* activations entering a Q4_0/Q8_0 matrix become Q8_0 blocks, and those
  entering a Q4_1 matrix Q8_1 blocks (llama.cpp's ``vec_dot_type``): per 32
  values ``d = amax/127`` kept as fp16, ``q = round-half-even(x * 127/amax)``;
  Q8_1 also carries ``s = fp16(d * sum(q))``, which multiplies the Q4_1
  minimums (``sum_b m_b * s_b``), so the dot is ``sum(q_w d_w * q_a d_a) + sum(m s)``;
* activations entering an F16 matrix become fp16;
* the KV cache holds fp16, Q is rounded to fp16 for ``K Q``, and the softmax
  to fp16 for ``V softmax``.

``kv_cache="q8_0"`` mirrors llama.cpp's quantized KV cache (``--cache-type-k
q8_0 --cache-type-v q8_0``, which needs flash attention). First, as llama.cpp
does for a quantized cache when head_dim is a multiple of 64, Q and K (after
RoPE) and V are rotated by an orthonormal Walsh-Hadamard matrix (``fwht``; the
attention output is rotated back), which leaves ``q.k`` and the output
unchanged in exact arithmetic but spreads outliers before quantizing
(``kv_rotation=False`` mirrors ``LLAMA_ATTN_ROT_DISABLE=1``). K and V are stored
as Q8_0 blocks of 32 along head_dim (per position and KV head, ``d = amax/127``
as fp16, ``q = round-half-even(x * 127/amax)``: the x86 ``quantize_row_q8_0``
that ggml-cpu's ``set_rows`` calls when it writes the cache) and read back
dequantized. ``kv_cache="q4_0"`` mirrors ``--cache-type-k/v q4_0`` the same way,
with Q4_0 blocks (:func:`q4_0_round`, ggml's ``quantize_row_q4_0_ref``). With
``llamacpp_rounding`` the attention then rounds as ggml-cpu's flash-attention
kernel (``ggml_compute_forward_flash_attn_ext_f16_one_chunk``) does for a Q8_0
(or Q4_0) K and V: Q is quantized to Q8_0 too (K's ``vec_dot_type``) for ``K Q``,
and the softmax and ``V softmax`` stay float32 (V is dequantized to float32 and
accumulated in float32). The default ``kv_cache="f16"`` is the
behaviour above, unchanged.

Each operation then agrees with llama.cpp's to the last bits of float32
(checked against tensors dumped from llama.cpp); what remains is summation
order, which the Q8 rounding amplifies. Without it the forward pass is float32
throughout.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants

from llmfab.core.errors import ModelError
from llmfab.compiler.model import Model

__all__ = ["ReferenceModel", "KV_CACHE_TYPES", "fwht", "rms_norm", "rope_tables", "apply_rope", "q8_round", "q8_1_round",
           "q4_0_round"]


KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``x * (1 / sqrt(mean(x^2) + eps)) * w`` as ggml computes it (squares summed in float64)."""
    x = x.astype(np.float32)
    ms = (np.sum((x * x).astype(np.float64), axis=-1, keepdims=True) / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(ms + np.float32(eps))
    return (x * scale) * w


def _q8(x: np.ndarray):
    """Q8 blocks of ``x [..., n]``: (q float32 [-1, 32], d float32 [-1, 1]) as llama.cpp's AVX2 code."""
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.max(np.abs(b), axis=1, keepdims=True)
    d = amax / np.float32(127.0)
    nz = amax > 0
    inv = np.where(nz, np.float32(127.0) / np.where(nz, amax, np.float32(1.0)), np.float32(0.0))
    q = np.rint(b * inv.astype(np.float32))
    return q, d


def q8_round(x: np.ndarray) -> np.ndarray:
    """Round activations to Q8_0 blocks as llama.cpp's CPU matmuls do before a quantized dot.

    Per 32 elements: d = amax / 127 stored as fp16, q = round-half-even(x * 127 / amax);
    returns the float32 values fp16(d) * q.
    """
    q, d = _q8(x)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def q4_0_round(x: np.ndarray) -> np.ndarray:
    """Q4_0 blocks of 32 along the last axis, as ggml's ``quantize_row_q4_0_ref`` (which
    ggml-cpu's ``set_rows`` calls to write a q4_0 KV cache), through ``gguf.quants``: per
    block, ``m`` the element of largest magnitude, ``d = m / -8``, ``q = min(15, trunc(x / d
    + 8.5))`` in float32; returns the float32 values ``fp16(d) * (q - 8)``."""
    q4 = GGMLQuantizationType.Q4_0
    return quants.dequantize(quants.quantize(np.asarray(x, np.float32), q4), q4).reshape(np.shape(x))


def q8_1_round(x: np.ndarray):
    """Q8_1 blocks: (values as :func:`q8_round`, ``s = fp16(d * sum(q))`` per block ``[..., n/32]``)."""
    q, d = _q8(x)
    vals = (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)
    s = (d[:, 0] * q.sum(axis=1)).astype(np.float16).astype(np.float32)
    return vals, s.reshape(*x.shape[:-1], -1)


def fwht(x: np.ndarray, n: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard rotation of each ``n`` consecutive values of ``x``'s last axis,
    computed as ggml-cpu's ``ggml_compute_forward_fwht`` (the CPU kernel of llama.cpp's
    ``llama_mul_mat_hadamard``): scale by ``1/sqrt(n)`` first, then butterflies ``(u+v, u-v)``
    at strides 1, 2, 4, ... in float32. The matrix is symmetric and its own inverse."""
    shape = x.shape
    y = x.astype(np.float32).reshape(-1, n) * np.float32(1.0 / np.sqrt(np.float32(n)))
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        u, v = y[:, :, 0, :], y[:, :, 1, :]
        y = np.stack([u + v, u - v], axis=2)
        h *= 2
    return y.reshape(shape)


def rope_tables(head_dim: int, base: float, positions: np.ndarray):
    """cos/sin ``[len(positions), head_dim/2]`` for angles ``pos * base^(-2i/d)``.

    The angles are made as ggml makes them: ``theta_scale = powf(base, -2/d)``,
    then ``theta *= theta_scale`` pair after pair, in float32.
    """
    e = np.float32(-2.0) / np.float32(head_dim)
    ts = np.float32(np.float64(np.float32(base)) ** np.float64(e))
    th = np.empty((len(positions), head_dim // 2), np.float32)
    th[:, 0] = np.asarray(positions, dtype=np.float32)
    for i in range(1, head_dim // 2):
        th[:, i] = th[:, i - 1] * ts
    t64 = th.astype(np.float64)
    return np.cos(t64).astype(np.float32), np.sin(t64).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs of ``x [T, heads, head_dim]`` (llama.cpp's NORM RoPE)."""
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    c = cos[:, None, :]
    s = sin[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


# activation rounding per weight type (llama.cpp's vec_dot_type)
_ACT = {"q4_0": "q8_0", "q8_0": "q8_0", "q4_1": "q8_1", "f16": "f16", "f32": "f32"}


class _Proj:
    """One or more weight matrices sharing an input (Q, K, V; gate, up), float32 ``[in, out]``.

    Q4_1 matrices keep their two parts apart, ``W = q * d`` and the per-block
    minimums ``M [in/32, out]``, so that ``x @ W + s @ M`` can use Q8_1's ``s``
    as llama.cpp does. Consecutive matrices of one activation type are fused.
    """

    def __init__(self, tensors):
        from llmfab.compiler import quant
        groups = []
        for t in tensors:
            act = _ACT[t.qtype]
            if t.qtype == "q4_1":
                q, d, m = quant.split_blocks("q4_1", t.data)
                w = (q.astype(np.float32) * d.astype(np.float32)[..., None]).reshape(t.shape).T
                mins = m.astype(np.float32).T                              # [in/32, out]
            else:
                w, mins = t.dequantize().T, None
            if groups and groups[-1][0] == act:
                _, ws, ms = groups[-1]
                ws.append(w)
                ms.append(mins)
            else:
                groups.append((act, [w], [mins]))
        self.parts = []
        for act, ws, ms in groups:
            W = np.ascontiguousarray(np.concatenate(ws, axis=1), dtype=np.float32)
            M = None
            if any(m is not None for m in ms):
                M = np.ascontiguousarray(np.concatenate(
                    [m if m is not None else np.zeros((W.shape[0] // 32, w.shape[1]), np.float32)
                     for m, w in zip(ms, ws)], axis=1))
            self.parts.append((act, W, M))
        self.quantized = any(act in ("q8_0", "q8_1") for act, _, _ in self.parts)

    def __call__(self, x: np.ndarray, rounding: bool) -> np.ndarray:
        outs = []
        for act, W, M in self.parts:
            if not rounding or act == "f32":
                y = x @ W
                if M is not None:
                    y += x.reshape(*x.shape[:-1], -1, 32).sum(axis=-1) @ M
            elif act == "q8_0":
                y = q8_round(x) @ W
            elif act == "q8_1":
                xq, s = q8_1_round(x)
                y = xq @ W + s @ M
            else:  # f16
                y = x.astype(np.float16).astype(np.float32) @ W
            outs.append(y)
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=-1)


def _dequantized(model: Model, progress: bool = False):
    """(output norm, per-layer weights, output projection) of ``model``, made once.

    Kept on the Model object, so several ReferenceModels (devices, KV-cache
    lengths, rounding modes) of one imported model share one float32 copy.
    """
    cached = getattr(model, "_reference_weights", None)
    if cached is not None:
        return cached
    d = model.desc
    it = range(d.n_layers)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="dequantizing", unit="layer", leave=False, disable=None)
    out_norm = model.tensor("output_norm.weight").dequantize()
    layers = []
    for i in it:
        def t(what):
            return model.layer(i, what)
        layers.append({
            "attn_norm": t("attn_norm").dequantize(),
            "ffn_norm": t("ffn_norm").dequantize(),
            "qkv": _Proj([t("attn_q"), t("attn_k"), t("attn_v")]),
            "attn_output": _Proj([t("attn_output")]),
            "gate_up": _Proj([t("ffn_gate"), t("ffn_up")]),
            "ffn_down": _Proj([t("ffn_down")]),
        })
    output = _Proj([model.output])
    cached = (out_norm, layers, output)
    model._reference_weights = cached
    return cached


class ReferenceModel:
    """Float32 LLaMA forward pass with a KV cache.

    Parameters
    ----------
    model : Model
        An imported model (:func:`llmfab.compiler.model.load_model`).
    max_context : int
        Token positions the KV cache holds; defaults to the model's context length,
        which is also its ceiling. The cache grows as positions are used, so a long
        context costs memory only when it is filled.
    llamacpp_rounding : bool
        Round where llama.cpp's CPU path rounds (see the module docstring).
    kv_cache : {"f16", "q8_0", "q4_0"}
        ``"f16"`` (default): llama.cpp's default fp16 cache without flash attention
        (float32 when ``llamacpp_rounding`` is off). ``"q8_0"`` / ``"q4_0"``: K and V
        stored as Q8_0 / Q4_0 blocks along head_dim, attention as llama.cpp's CPU
        flash-attention kernel computes it over such a cache (Q quantized to Q8_0, K's
        ``vec_dot_type`` for both). The arrays hold the dequantized values (in the
        rotated basis when ``kv_rotation``).
    kv_rotation : bool
        With a quantized cache: rotate Q, K and V by a Walsh-Hadamard matrix first, as
        llama.cpp does by default (False: as with ``LLAMA_ATTN_ROT_DISABLE=1``).
    """

    def __init__(self, model: Model, *, max_context: int | None = None, progress: bool = False,
                 llamacpp_rounding: bool = True, kv_cache: str = "f16", kv_rotation: bool = True):
        self.model = model
        self.llamacpp_rounding = llamacpp_rounding
        d = self.desc = model.desc
        if kv_cache not in KV_CACHE_TYPES:
            raise ModelError(f"unknown KV cache type '{kv_cache}' (choose from {', '.join(KV_CACHE_TYPES)})")
        if kv_cache != "f16" and d.head_dim % 32:
            raise ModelError(f"a {kv_cache} KV cache needs head_dim a multiple of 32; model '{d.name}' "
                             f"has {d.head_dim}")
        self.kv_cache = kv_cache
        #: how a quantized cache rounds the K and V rows it stores (float32 in, float32 out);
        #: benchmarks/kv_formats.py swaps in other formats to measure them
        rnd = q4_0_round if kv_cache == "q4_0" else q8_round
        self.kv_round = (rnd, rnd)
        # llama.cpp rotates Q, K (and V, and back the attention output) by a Walsh-Hadamard
        # matrix when the cache is quantized and head_dim is a multiple of 64: K and Q by the
        # largest power of two >= 64 dividing head_dim, V by 64 (llama_kv_cache::build_input_k_rot,
        # build_input_v_rot; LLAMA_ATTN_ROT_DISABLE=1 turns it off, kv_rotation=False here)
        self.rot_k = self.rot_v = 0
        if kv_cache != "f16" and kv_rotation and d.head_dim % 64 == 0:
            self.rot_k = 64
            while d.head_dim % (2 * self.rot_k) == 0:
                self.rot_k *= 2
            self.rot_v = 64
        if max_context is None:
            max_context = d.context_length
        max_context = int(max_context)
        if not 1 <= max_context <= d.context_length:
            raise ModelError(f"context {max_context} is outside 1..{d.context_length}, the context "
                             f"length of model '{d.name}'")
        self.max_context = max_context
        self.emb = model.tensor("token_embd.weight")
        self.out_norm, self.layers, self.output = _dequantized(model, progress)
        self.reset()

    def reset(self) -> None:
        self.k_cache = self.v_cache = None
        self._reserve(min(self.max_context, 256))
        self.pos = 0

    def _reserve(self, n: int) -> None:
        """Make the KV cache hold at least ``n`` positions (doubling, up to ``max_context``)."""
        have = 0 if self.k_cache is None else self.k_cache.shape[1]
        if n <= have:
            return
        n = min(max(n, 2 * have), self.max_context)
        d = self.desc
        shape = (d.n_layers, n, d.n_kv_heads, d.head_dim)
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        if have:
            k[:, :have] = self.k_cache
            v[:, :have] = self.v_cache
        self.k_cache, self.v_cache = k, v

    def embed(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.desc.vocab_size):
            bad = int(tokens[(tokens < 0) | (tokens >= self.desc.vocab_size)][0])
            raise ModelError(f"token id {bad} out of range (vocab size {self.desc.vocab_size})")
        if tokens.size == 0:
            return np.zeros((0, self.desc.dim), np.float32)
        return np.stack([self.emb.rows(int(t), int(t) + 1)[0] for t in tokens]).astype(np.float32)

    def forward(self, tokens) -> np.ndarray:
        """Run ``tokens`` at the next positions; returns logits ``[len(tokens), vocab]``."""
        d = self.desc
        tokens = list(tokens)
        T = len(tokens)
        if self.pos + T > self.max_context:
            raise ModelError(f"context overflow: {self.pos + T} tokens > max context {self.max_context}")
        x = self.embed(tokens)
        self._reserve(self.pos + T)
        pos = np.arange(self.pos, self.pos + T)
        cos, sin = rope_tables(d.head_dim, d.rope_base, pos)
        nq, nkv, hd = d.n_heads, d.n_kv_heads, d.head_dim
        scale = np.float32(1.0 / np.sqrt(hd))
        S = self.pos + T
        mask = np.triu(np.full((T, S), -np.inf, np.float32), k=self.pos + 1)
        rnd = self.llamacpp_rounding
        quant_kv = self.kv_cache != "f16"      # a quantized cache (q8_0 or q4_0)
        round_k, round_v = self.kv_round
        for li, L in enumerate(self.layers):
            qkv = L["qkv"](rms_norm(x, L["attn_norm"], d.rms_eps), rnd)
            q = qkv[:, :nq * hd].reshape(T, nq, hd)
            k = qkv[:, nq * hd:(nq + nkv) * hd].reshape(T, nkv, hd)
            v = qkv[:, (nq + nkv) * hd:].reshape(T, nkv, hd)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            if quant_kv:  # Q8_0 / Q4_0 blocks along head_dim, as set_rows writes the cache
                if self.rot_k:
                    q, k = fwht(q, self.rot_k), fwht(k, self.rot_k)
                if self.rot_v:
                    v = fwht(v, self.rot_v)
                k = round_k(k)
                v = round_v(v)
                if rnd:   # the flash-attention kernel quantizes Q to K's vec_dot_type, Q8_0
                    q = q8_round(q)
            elif rnd:   # llama.cpp keeps K and V in fp16, and multiplies Q by K in fp16
                k = k.astype(np.float16).astype(np.float32)
                v = v.astype(np.float16).astype(np.float32)
                q = q.astype(np.float16).astype(np.float32)
            self.k_cache[li, self.pos:S] = k
            self.v_cache[li, self.pos:S] = v
            K = self.k_cache[li, :S]  # [S, nkv, hd]
            V = self.v_cache[li, :S]
            g = d.gqa_group
            qg = q.reshape(T, nkv, g, hd)
            att = np.einsum("tkgd,skd->kgts", qg, K, optimize=True) * scale + mask
            att = att - att.max(axis=-1, keepdims=True)
            np.exp(att, out=att)
            att /= att.sum(axis=-1, keepdims=True)
            if rnd and not quant_kv:   # and the softmax by V in fp16 (flash attention: float32)
                att = att.astype(np.float16).astype(np.float32)
            o = np.einsum("kgts,skd->tkgd", att, V, optimize=True).reshape(T, nq * hd)
            if self.rot_v:   # rotate back (the matrix is its own inverse)
                o = fwht(o, self.rot_v)
            x = x + L["attn_output"](o, rnd)
            gu = L["gate_up"](rms_norm(x, L["ffn_norm"], d.rms_eps), rnd)
            gate, up = gu[:, :d.ffn_dim], gu[:, d.ffn_dim:]
            act = gate / (np.float32(1.0) + np.exp(-gate)) * up
            x = x + L["ffn_down"](act, rnd)
        self.pos = S
        return self.output(rms_norm(x, self.out_norm, d.rms_eps), rnd).astype(np.float32)
