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

from llmfab.boards.errors import CompileError
from llmfab.compiler import quant

PATTERNS = {"dense": (32, 32), "2:4": (2, 4), "8:16": (8, 16), "4:16": (4, 16), "2:16": (2, 16)}
HEADER = {"q4_0": 2, "q4_1": 4, "q8_0": 2}


def parse_pattern(p: str):
    if p not in PATTERNS:
        raise CompileError(f"unknown sparsity pattern '{p}' (choose from {', '.join(PATTERNS)})")
    return PATTERNS[p]


def kept(p: str) -> int:
    n, m = parse_pattern(p)
    return 32 * n // m


def sparse_block_bytes(fmt: str, p: str) -> int:
    if p == "dense":
        return quant.BLOCK_BYTES[fmt]
    n, m = parse_pattern(p)
    K = kept(p)
    vbits = 8 if fmt == "q8_0" else 4
    ibits = int(np.log2(m))
    return HEADER[fmt] + (K * vbits + 7) // 8 + (K * ibits + 7) // 8


def magnitude_mask(values: np.ndarray, p: str) -> np.ndarray:
    """Keep the N largest-magnitude weights of every group of M (ties: lower position)."""
    n, m = parse_pattern(p)
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


def encode_sparse(qtype: str, raw_row: np.ndarray, mask_row: np.ndarray, p: str) -> bytes:
    """Encode one row of dense raw blocks with its keep-mask into the sparse block format."""
    n, m = parse_pattern(p)
    q, d, mm = quant.split_blocks(qtype, raw_row)
    nb = q.shape[0]
    msk = mask_row.reshape(nb, 32)
    K = kept(p)
    ibits = int(np.log2(m))
    out = bytearray()
    for b in range(nb):
        pos = np.nonzero(msk[b])[0]
        if len(pos) != K:
            raise CompileError(f"block {b} keeps {len(pos)} weights, pattern {p} needs {K}")
        out += np.float16(d[b]).tobytes()
        if qtype == "q4_1":
            out += np.float16(mm[b]).tobytes()
        v = q[b, pos].astype(np.int16)
        if qtype == "q8_0":
            out += v.astype(np.int8).tobytes()
        else:
            codes = (v + (8 if qtype == "q4_0" else 0)).astype(np.uint8)
            out += bytes((codes[0::2] & 0xF) | ((codes[1::2] & 0xF) << 4))
        idx = pos % m
        bits = 0
        for j, ix in enumerate(idx):
            bits |= int(ix) << (j * ibits)
        out += bits.to_bytes((K * ibits + 7) // 8, "little")
    return bytes(out)


def decode_sparse(qtype: str, data: bytes, p: str, nb: int):
    """Inverse of :func:`encode_sparse` for one row: (values int [nb, K], idx [nb, K], d, m)."""
    n, m = parse_pattern(p)
    K = kept(p)
    ibits = int(np.log2(m))
    bb = sparse_block_bytes(qtype, p)
    buf = np.frombuffer(bytes(data), np.uint8).reshape(nb, bb)
    d = buf[:, 0:2].copy().view(np.float16)[:, 0]
    mm = buf[:, 2:4].copy().view(np.float16)[:, 0] if qtype == "q4_1" else None
    off = HEADER[qtype]
    if qtype == "q8_0":
        vals = buf[:, off:off + K].view(np.int8).astype(np.int16)
        off += K
    else:
        nbytes = K // 2
        by = buf[:, off:off + nbytes]
        vals = np.empty((nb, K), np.int16)
        vals[:, 0::2] = by & 0xF
        vals[:, 1::2] = by >> 4
        if qtype == "q4_0":
            vals -= 8
        off += nbytes
    ib = buf[:, off:off + (K * ibits + 7) // 8]
    idx = np.zeros((nb, K), np.int64)
    for b in range(nb):
        bits = int.from_bytes(ib[b].tobytes(), "little")
        for j in range(K):
            idx[b, j] = (bits >> (j * ibits)) & (m - 1)
    return vals, idx, d, mm
