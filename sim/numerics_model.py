"""The whole LLaMA forward pass in the hardware numerics, written directly (no ISA).

This is the functional statement of what a compiled program computes: the
golden model, executing the compiler's instruction stream, must produce the
same bits (a test checks it). It is also the quickest way to measure what the
numerics cost in accuracy against llama.cpp.
"""

from __future__ import annotations

import numpy as np

from llmfab.compiler import quant
from llmfab.compiler.model import Model
from llmfab.core import numerics as N

__all__ = ["PackedMatrix", "pack_matrix", "matvec", "NumericsModel"]


class PackedMatrix:
    """A weight matrix split into its block fields for fast golden matvecs.

    ``qf``: integer weights as float32 ``[nb, rows, 32]`` (small integers, so a
    float32 BLAS product of them is the exact integer dot product: every partial
    sum is an integer below 2**24); ``d``, ``m``: float32 ``[nb, rows]`` (fp16
    values, exact); ``mask`` for sparse matrices: float32 ``[nb, rows, 32]``,
    1 where a weight is kept.
    """

    def __init__(self, fmt, q, d, m=None, mask=None):
        self.fmt = fmt
        self.rows, self.nb = d.shape
        self.qf = np.ascontiguousarray(np.transpose(q, (1, 0, 2)).astype(np.float32))
        self.d = np.ascontiguousarray(N.from_f16(d).T)
        self.m = None if m is None else np.ascontiguousarray(N.from_f16(m).T)
        self.mask = None if mask is None else np.ascontiguousarray(
            np.transpose(mask, (1, 0, 2)).astype(np.float32))


def pack_matrix(qtype: str, raw: np.ndarray, mask=None) -> PackedMatrix:
    q, d, m = quant.split_blocks(qtype, raw)
    if mask is not None:
        mask = np.asarray(mask, bool).reshape(q.shape)
        q = np.where(mask, q, 0).astype(np.int8)
    return PackedMatrix(qtype, q, d, m, mask)


def matvec(W: PackedMatrix, x: np.ndarray, act=None) -> np.ndarray:
    """y = W x in the hardware numerics: quantize x, exact block dot products, scale, accum4.

    ``act`` may pass an already quantized activation ``(q, d, sumq)``.
    Block value ``v[b, r] = fmul(fmul(isum, d_w), d_x)`` (Q4_1 adds ``fmul(m_w, sumq)``
    before the last multiply), then ``accum4`` over b. ``fmul(isum, d_w)`` and
    ``fmul(m_w, sumq)`` cannot be subnormal (|isum|, |sumq| >= 1 or 0 and |d_w|,
    |m_w| >= 2**-24 or 0), and neither can their sum (both are multiples of
    2**-47), so those steps skip the flush; the multiply by ``d_x`` flushes.
    """
    qx, dx, sumq = act if act is not None else N.quantize_act(x)   # [nb, 32], [nb], [nb]
    qxf = qx.astype(np.float32)
    # [nb, rows], exact; einsum (one thread, no BLAS) is as fast as a batched BLAS
    # gemv here and does not collapse when the cores are shared
    isum = np.einsum("brk,bk->br", W.qf, qxf)
    t = isum * W.d
    if W.fmt == "q4_1":
        if W.mask is not None:
            sq = np.einsum("brk,bk->br", W.mask, qxf)
        else:
            sq = sumq.astype(np.float32)[:, None]
        t += W.m * sq
    vals = N.fmul(t, dx[:, None])
    return N.accum4(vals, axis=0)


class NumericsModel:
    """Decode-step forward pass (one token at a time) in the hardware numerics."""

    def __init__(self, model: Model, *, max_context: int = 512, masks=None, attention: str = "sfu"):
        self.model = model
        d = self.desc = model.desc
        self.max_context = max_context
        if attention not in ("sfu", "chains"):
            raise ValueError(f"attention must be sfu or chains, not {attention!r}")
        self.chains = attention == "chains"
        masks = masks or {}

        def pk(name):
            t = model.tensor(name)
            if t.qtype in ("f32", "f16"):
                raise ValueError(f"{name}: float weights must be quantized before compiling")
            return pack_matrix(t.qtype, t.data, masks.get(name))

        self.layers = []
        for i in range(d.n_layers):
            L = {w: pk(f"blk.{i}.{w}.weight") for w in
                 ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
            L["attn_norm"] = model.layer(i, "attn_norm").dequantize()
            L["ffn_norm"] = model.layer(i, "ffn_norm").dequantize()
            self.layers.append(L)
        self.out_norm = model.tensor("output_norm.weight").dequantize()
        self.out = pk("output.weight" if "output.weight" in model.tensors else "token_embd.weight")
        self.emb = model.tensor("token_embd.weight")
        self.cos, self.sin = N.rope_tables(d.head_dim, d.rope_base, max_context)
        self.reset()

    def reset(self):
        d = self.desc
        shape = (d.n_layers, self.max_context, d.n_kv_heads, d.head_dim)
        self.k = np.zeros(shape, np.float16)
        self.v = np.zeros(shape, np.float16)
        if self.chains:
            # attention on the chains: K rows as Q8_0 blocks, V rows as int8 with one scale
            self.kq = np.zeros(shape[:3] + (d.head_dim // 32, 32), np.int8)
            self.kd = np.zeros(shape[:3] + (d.head_dim // 32,), np.float16)
            self.vq = np.zeros(shape, np.int8)
            self.vd = np.zeros(shape[:3], np.float32)
        self.pos = 0

    def embed(self, t: int) -> np.ndarray:
        q, dd, m = quant.split_blocks(self.emb.qtype, self.emb.data[t])
        v = N.fmul(q.astype(np.float32), N.from_f16(dd)[:, None])
        if m is not None:
            v = N.fadd(v, N.from_f16(m)[:, None])
        return v.reshape(-1)

    def step(self, token: int) -> np.ndarray:
        d = self.desc
        p = self.pos
        x = self.embed(token)
        hd, nq, nkv = d.head_dim, d.n_heads, d.n_kv_heads
        scale = np.float32(1.0 / np.sqrt(hd))
        S = p + 1
        for li, L in enumerate(self.layers):
            h = N.rms_norm(x, L["attn_norm"], d.rms_eps)
            q = matvec(L["attn_q"], h).reshape(nq, hd)
            k = matvec(L["attn_k"], h).reshape(nkv, hd)
            v = matvec(L["attn_v"], h).reshape(nkv, hd)
            q = N.rope(q, self.cos[p], self.sin[p])
            k = N.rope(k, self.cos[p], self.sin[p])
            if self.chains:
                o = self._attention_chains(li, p, q, k, v, scale)
            else:
                self.k[li, p] = N.to_f16(k)
                self.v[li, p] = N.to_f16(v)
                o = attention(q, self.k[li, :S], self.v[li, :S], scale, d.gqa_group)
            x = N.fadd(x, matvec(L["attn_output"], o.reshape(-1)))
            h = N.rms_norm(x, L["ffn_norm"], d.rms_eps)
            g = matvec(L["ffn_gate"], h)
            u = matvec(L["ffn_up"], h)
            x = N.fadd(x, matvec(L["ffn_down"], N.fmul(N.silu(g), u)))
        self.pos += 1
        x = N.rms_norm(x, self.out_norm, d.rms_eps)
        return matvec(self.out, x)

    def _attention_chains(self, li, p, q, k, v, scale):
        """Attention on the chains (docs/numerics.md, "Attention on the chains") at position p."""
        d = self.desc
        hd, g = d.head_dim, d.gqa_group
        S = p + 1
        n = -(-S // 32) * 32                       # the probabilities' length (whole blocks)
        for j in range(d.n_kv_heads):
            self.kq[li, p, j], self.kd[li, p, j] = N.quantize_q8_0(k[j])
            self.vq[li, p, j], self.vd[li, p, j] = N.quantize_row(v[j])
        o = np.empty_like(q)
        for h in range(d.n_heads):
            j = h // g
            K = PackedMatrix("q8_0", self.kq[li, :S, j], self.kd[li, :S, j])
            s = matvec(K, q[h])                     # [S] scores: Q8_0 rows x the quantized query
            a = np.zeros(n, np.float32)
            a[:S] = N.fmul(N.softmax(N.fmul(s, scale)), self.vd[li, :S, j])
            vt = np.zeros((hd, n), np.int8)
            vt[:, :S] = self.vq[li, :S, j].T
            V = PackedMatrix("q8_0", vt.reshape(hd, n // 32, 32), np.ones((hd, n // 32), np.float16))
            o[h] = matvec(V, a)
        return o

    def forward(self, tokens) -> np.ndarray:
        return np.stack([self.step(int(t)) for t in tokens])


def attention(q, K16, V16, scale, group):
    """q [nq, hd] fp32; K16/V16 [S, nkv, hd] fp16 -> [nq, hd] fp32 (hardware order)."""
    K = N.from_f16(K16)
    V = N.from_f16(V16)
    nq, hd = q.shape
    kvh = np.arange(nq) // group
    Kh = np.transpose(K[:, kvh, :], (1, 0, 2))           # [nq, S, hd]
    Vh = np.transpose(V[:, kvh, :], (1, 0, 2))
    s = N.fmul(N.vdot(q[:, None, :], Kh), scale)         # [nq, S]
    a = N.softmax(s)
    return N.accum4(N.fmul(a[:, :, None], Vh), axis=1)   # sum over S
