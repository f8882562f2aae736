"""GGUF weight blocks (Q4_0, Q4_1, Q8_0): field access and (de)quantization.

Block layouts (32 weights per block, little-endian):

========  =====  ============================================================
type      bytes  layout
========  =====  ============================================================
Q4_0      18     d:f16, qs[16]: weight j = low nibble of qs[j] (j < 16),
                 weight j+16 = high nibble of qs[j]; value = (q - 8) * d
Q4_1      20     d:f16, m:f16, qs[16] as Q4_0; value = q * d + m
Q8_0      34     d:f16, qs[32]:int8; value = q * d
========  =====  ============================================================

Dequantization and quantization of whole tensors go through the ``gguf``
package (llama.cpp's own numpy implementation); :func:`split_blocks` exposes
the integer fields that the on-chip decoder and the golden model use.
"""

from __future__ import annotations

import numpy as np

from llmfab.core.errors import ModelError
from llmfab.core.formats import BLOCK_BYTES, BLOCK_WEIGHTS as BLOCK


def _ggml_type(qtype: str):
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType[qtype.upper()]


def dequantize_rows(qtype: str, data: np.ndarray) -> np.ndarray:
    """Raw blocks ``[rows, row_bytes]`` -> float32 ``[rows, row_bytes / bytes * 32]``."""
    from gguf import quants
    if qtype not in BLOCK_BYTES:
        raise ModelError(f"unsupported block type '{qtype}' (supported: q4_0, q4_1, q8_0)")
    return quants.dequantize(np.ascontiguousarray(data, dtype=np.uint8), _ggml_type(qtype)).astype(np.float32)


def quantize_rows(qtype: str, values: np.ndarray) -> np.ndarray:
    """float32 ``[rows, cols]`` -> raw blocks ``[rows, cols / 32 * bytes]`` (llama.cpp's rounding)."""
    from gguf import quants
    if qtype not in BLOCK_BYTES:
        raise ModelError(f"unsupported block type '{qtype}' (supported: q4_0, q4_1, q8_0)")
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.shape[-1] % BLOCK:
        raise ModelError(f"row length {values.shape[-1]} is not a multiple of {BLOCK}")
    return np.asarray(quants.quantize(values, _ggml_type(qtype)), dtype=np.uint8)


def split_blocks(qtype: str, data: np.ndarray):
    """Integer fields of raw blocks ``[..., nbytes]``.

    Returns ``(q, d, m)``: ``q`` the 32 integer weights per block as int8 in
    ``[..., nblocks, 32]`` (Q4_0 already offset by -8, Q4_1 unsigned 0..15,
    Q8_0 signed), ``d`` the float16 scales ``[..., nblocks]``, ``m`` the
    float16 minimums for Q4_1 (None otherwise).
    """
    bb = BLOCK_BYTES[qtype]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    lead = data.shape[:-1]
    blocks = data.reshape(*lead, data.shape[-1] // bb, bb)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = None
    if qtype == "q8_0":
        q = blocks[..., 2:].view(np.int8).copy()
    else:
        off = 4 if qtype == "q4_1" else 2
        if qtype == "q4_1":
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        qs = blocks[..., off:off + 16]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8)
        if qtype == "q4_0":
            q = q - 8
    return q, d, m


def join_blocks(qtype: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`split_blocks`: integer fields -> raw blocks ``[..., nblocks * bytes]``."""
    q = np.asarray(q)
    lead = q.shape[:-2]
    nb = q.shape[-2]
    d16 = np.asarray(d, dtype=np.float16).reshape(*lead, nb, 1).view(np.uint8)
    if qtype == "q8_0":
        body = q.astype(np.int8).view(np.uint8)
        out = np.concatenate([d16, body], axis=-1)
    else:
        u = (q.astype(np.int16) + (8 if qtype == "q4_0" else 0)).astype(np.uint8)
        packed = (u[..., :16] & 0x0F) | ((u[..., 16:] & 0x0F) << 4)
        parts = [d16]
        if qtype == "q4_1":
            parts.append(np.asarray(m, dtype=np.float16).reshape(*lead, nb, 1).view(np.uint8))
        parts.append(packed)
        out = np.concatenate(parts, axis=-1)
    return out.reshape(*lead, nb * BLOCK_BYTES[qtype])
