"""Backend ``reference``: a plain numpy float32 forward pass of an imported model.

This is the software oracle (not the hardware numerics): weights are
dequantized once to float32, and the LLaMA block is computed as llama.cpp
defines it -- RMSNorm, RoPE on adjacent pairs (GGUF convention), grouped-query
attention over a KV cache, SwiGLU, tied or separate output projection.

With ``llamacpp_rounding`` (the default) it also rounds where llama.cpp's CPU
path rounds: activations entering a quantized matmul become Q8 blocks
(llama.cpp's ``vec_dot_type``), and the KV cache holds fp16. Without it the
forward pass is float32 throughout.
"""

from __future__ import annotations

import numpy as np

from llmfab.boards.errors import ModelError
from llmfab.compiler.model import Model

__all__ = ["ReferenceModel", "rms_norm", "rope_tables", "apply_rope"]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))) * w


def q8_round(x: np.ndarray) -> np.ndarray:
    """Round activations to Q8 blocks as llama.cpp's CPU matmuls do before a quantized dot.

    Per 32 elements: d = amax / 127 stored as fp16, q = round-half-away(x / d);
    returns the float32 values fp16(d) * q.
    """
    shp = x.shape
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.max(np.abs(b), axis=1, keepdims=True)
    d = amax / np.float32(127.0)
    inv = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = b * inv
    q = np.trunc(v + np.copysign(np.float32(0.5), v))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(shp).astype(np.float32)


def rope_tables(head_dim: int, base: float, positions: np.ndarray):
    """cos/sin ``[len(positions), head_dim/2]`` for angles ``pos * base^(-2i/d)``."""
    inv = np.power(np.float32(base), -np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    ang = positions.astype(np.float32)[:, None] * inv[None, :].astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


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


def _dequantized(model: Model, progress: bool = False):
    """(output norm, per-layer float32 weights, output matrix) of ``model``, made once.

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
        it = tqdm(it, desc="dequantizing", unit="layer", leave=False)
    out_norm = model.tensor("output_norm.weight").dequantize()
    layers = []
    for i in it:
        L = {}
        for what in ("attn_norm", "ffn_norm"):
            L[what] = model.layer(i, what).dequantize()
        for what in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            L[what] = np.ascontiguousarray(model.layer(i, what).dequantize().T)  # [in, out]
        L["qkv"] = np.ascontiguousarray(np.concatenate([L.pop("attn_q"), L.pop("attn_k"),
                                                        L.pop("attn_v")], axis=1))
        L["gate_up"] = np.ascontiguousarray(np.concatenate([L.pop("ffn_gate"), L.pop("ffn_up")], axis=1))
        layers.append(L)
    out_w = np.ascontiguousarray(model.output.dequantize().T)  # [dim, vocab]
    cached = (out_norm, layers, out_w)
    model._reference_weights = cached
    return cached


class ReferenceModel:
    """Float32 LLaMA forward pass with a KV cache.

    Parameters
    ----------
    model : Model
        An imported model (:func:`llmfab.compiler.model.load_model`).
    max_context : int
        KV-cache length; defaults to the model's context length capped at 2048.
    """

    def __init__(self, model: Model, *, max_context: int | None = None, progress: bool = False,
                 llamacpp_rounding: bool = True):
        self.model = model
        self.llamacpp_rounding = llamacpp_rounding
        d = self.desc = model.desc
        self.max_context = int(max_context or min(d.context_length, 2048))
        self.emb = model.tensor("token_embd.weight")
        self.out_norm, self.layers, self.out_w = _dequantized(model, progress)
        self.quantized = {w: model.layer(0, w).qtype not in ("f32", "f16")
                          for w in ("attn_q", "attn_output", "ffn_gate", "ffn_down")}
        self.quantized["output"] = model.output.qtype not in ("f32", "f16")
        self.reset()

    def reset(self) -> None:
        d = self.desc
        shape = (d.n_layers, self.max_context, d.n_kv_heads, d.head_dim)
        self.k_cache = np.zeros(shape, np.float32)
        self.v_cache = np.zeros(shape, np.float32)
        self.pos = 0

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
        pos = np.arange(self.pos, self.pos + T)
        cos, sin = rope_tables(d.head_dim, d.rope_base, pos)
        nq, nkv, hd = d.n_heads, d.n_kv_heads, d.head_dim
        scale = np.float32(1.0 / np.sqrt(hd))
        S = self.pos + T
        mask = np.triu(np.full((T, S), -np.inf, np.float32), k=self.pos + 1)
        for li, L in enumerate(self.layers):
            h = self._act(rms_norm(x, L["attn_norm"], d.rms_eps), "attn_q")
            qkv = h @ L["qkv"]
            q = qkv[:, :nq * hd].reshape(T, nq, hd)
            k = qkv[:, nq * hd:(nq + nkv) * hd].reshape(T, nkv, hd)
            v = qkv[:, (nq + nkv) * hd:].reshape(T, nkv, hd)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            if self.llamacpp_rounding:   # llama.cpp keeps K and V in fp16
                k = k.astype(np.float16).astype(np.float32)
                v = v.astype(np.float16).astype(np.float32)
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
            o = np.einsum("kgts,skd->tkgd", att, V, optimize=True).reshape(T, nq * hd)
            x = x + self._act(o, "attn_output") @ L["attn_output"]
            h = self._act(rms_norm(x, L["ffn_norm"], d.rms_eps), "ffn_gate")
            gu = h @ L["gate_up"]
            gate, up = gu[:, :d.ffn_dim], gu[:, d.ffn_dim:]
            act = gate / (np.float32(1.0) + np.exp(-gate)) * up
            x = x + self._act(act, "ffn_down") @ L["ffn_down"]
        self.pos = S
        x = self._act(rms_norm(x, self.out_norm, d.rms_eps), "output")
        return (x @ self.out_w).astype(np.float32)

    def _act(self, x: np.ndarray, weight: str) -> np.ndarray:
        if self.llamacpp_rounding and self.quantized[weight]:
            return q8_round(x)
        return x
