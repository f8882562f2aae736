"""N:M sparse weight blocks: pruning and the on-HBM sparse block format.

Patterns: ``2:4`` and ``N:16`` (N in 2, 4, 8; FlightLLM-style 4-bit indices),
``dense`` = all 32 weights kept. A 32-weight block is ``32/M`` groups of M
consecutive weights; each group keeps exactly N of them.

Sparse block layout (``fmt`` = q4_0 | q4_1 | q8_0, ``K = 32*N/M`` kept weights):

===========  ==================================================================
header       d:f16 (q4_0, q8_0) or d:f16, m:f16 (q4_1) -- as the dense block
values       K stored weights in group order, ascending position inside a
             group. q4_*: 4-bit codes (q4_0 stores q+8, q4_1 stores q), packed
             two per byte, weight j in the low nibble of byte j//2 when j is
             even, the high nibble when odd. q8_0: K int8 bytes.
indices      K indices (position inside the group, log2(M) bits each), packed
             little-endian into a bit stream: index j occupies bits
             [j*b, (j+1)*b) of the stream (b = 2 for M = 4, b = 4 for M = 16).
===========  ==================================================================

A pruned weight contributes nothing: not to the integer dot product and, for
Q4_1, not to the minimum term (``m * sum of the kept activations``).
"""

from __future__ import annotations

import numpy as np

from llmfab.core.errors import CompileError
from llmfab.compiler import quant
from llmfab.core import formats as F

def magnitude_mask(values: np.ndarray, p: str) -> np.ndarray:
    """Keep the N largest-magnitude weights of every group of M (ties: lower position)."""
    n, m = F.pattern(p)
    if p == "dense":
        return np.ones(values.shape, bool)
    if values.shape[-1] % m:
        raise CompileError(f"row length {values.shape[-1]} is not a multiple of {m} for {p}")
    g = np.abs(values).reshape(values.shape[:-1] + (-1, m))
    order = np.argsort(-g, axis=-1, kind="stable")[..., :n]
    mask = np.zeros(g.shape, bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask.reshape(values.shape)


def prune(qtype: str, raw: np.ndarray, p: str):
    """Prune a quantized matrix (raw blocks [rows, row_bytes]) to pattern ``p`` by magnitude.

    The magnitude is that of the dequantized weight (for Q4_1, ``q*d + m``).
    Returns the keep-mask [rows, cols] (bool); block scales are unchanged.
    """
    return magnitude_mask(quant.dequantize_rows(qtype, raw), p)


def encode_sparse_rows(qtype: str, raw: np.ndarray, mask: np.ndarray, p: str) -> np.ndarray:
    """Encode dense raw blocks ``[rows, nb*bytes]`` with keep-mask ``[rows, nb*32]``.

    Returns uint8 ``[rows, nb * sparse_block_bytes]`` in the layout above.
    """
    n, m = F.pattern(p)
    K = F.kept_weights(p)
    ibits = F.index_bits(p)
    raw = np.asarray(raw, np.uint8)
    rows = raw.shape[0]
    q, d, mm = quant.split_blocks(qtype, raw)             # q [rows, nb, 32]
    nb = q.shape[1]
    msk = np.asarray(mask, bool).reshape(rows, nb, 32)
    counts = msk.reshape(rows, nb, 32 // m, m).sum(-1)
    if not np.all(counts == n):
        r, b = np.argwhere(counts != n)[0][:2]
        raise CompileError(f"block {int(b)} of row {int(r)} does not keep {n} of every {m} weights "
                           f"(pattern {p})")
    pos = np.argsort(~msk, axis=-1, kind="stable")[..., :K]   # kept positions, ascending
    v = np.take_along_axis(q.astype(np.int16), pos, axis=-1)
    parts = [d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)]
    if qtype == "q4_1":
        parts.append(mm.astype(np.float16).view(np.uint8).reshape(rows, nb, 2))
    if qtype == "q8_0":
        parts.append(v.astype(np.int8).view(np.uint8))
    else:
        codes = (v + (8 if qtype == "q4_0" else 0)).astype(np.uint8)
        parts.append((codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4))
    if ibits:
        idx = (pos % m).astype(np.uint8)
        per = 8 // ibits
        packed = np.zeros((rows, nb, K * ibits // 8), np.uint8)
        for j in range(per):
            packed |= (idx[..., j::per] << (j * ibits)).astype(np.uint8)
        parts.append(packed)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def decode_sparse_rows(qtype: str, data: np.ndarray, p: str, nb: int):
    """Inverse of :func:`encode_sparse_rows`: (values [rows, nb, K], idx, d [rows, nb], m)."""
    n, m = F.pattern(p)
    K = F.kept_weights(p)
    ibits = F.index_bits(p)
    bb = F.block_bytes(qtype, p)
    buf = np.asarray(data, np.uint8).reshape(-1, nb, bb)
    rows = buf.shape[0]
    d = buf[..., 0:2].copy().view(np.float16)[..., 0]
    mm = buf[..., 2:4].copy().view(np.float16)[..., 0] if qtype == "q4_1" else None
    off = F.check_format(qtype).header_bytes
    if qtype == "q8_0":
        vals = buf[..., off:off + K].view(np.int8).astype(np.int16)
        off += K
    else:
        by = buf[..., off:off + K // 2]
        vals = np.empty((rows, nb, K), np.int16)
        vals[..., 0::2] = by & 0xF
        vals[..., 1::2] = by >> 4
        if qtype == "q4_0":
            vals -= 8
        off += K // 2
    if not ibits:                                   # dense: every position kept
        return vals, np.broadcast_to(np.arange(K) % m, (rows, nb, K)).copy(), d, mm
    ib = buf[..., off:off + K * ibits // 8]
    per = 8 // ibits
    idx = np.empty((rows, nb, K), np.int64)
    for j in range(per):
        idx[..., j::per] = (ib >> (j * ibits)) & (m - 1)
    return vals, idx, d, mm


def encode_sparse(qtype: str, raw_row: np.ndarray, mask_row: np.ndarray, p: str) -> bytes:
    """Encode one row of dense raw blocks with its keep-mask into the sparse block format."""
    return encode_sparse_rows(qtype, np.asarray(raw_row, np.uint8)[None], np.asarray(mask_row)[None],
                              p).tobytes()


def decode_sparse(qtype: str, data: bytes, p: str, nb: int):
    """Inverse of :func:`encode_sparse` for one row: (values int [nb, K], idx [nb, K], d, m)."""
    vals, idx, d, mm = decode_sparse_rows(qtype, np.frombuffer(bytes(data), np.uint8), p, nb)
    return vals[0], idx[0], d[0], None if mm is None else mm[0]
