"""The weight-format catalogue: one home for every storage fact of the formats.

Compiler, golden model and hardware import these; nothing re-states them.

- :data:`WEIGHT_FORMATS`: the GGUF weight formats the chains decode, with
  their bits per weight and per-block parameter bytes; :data:`BLOCK_BYTES`
  their dense 32-weight block sizes (Q4_0 18, Q4_1 20, Q8_0 34).
- :data:`SPARSITY_PATTERNS`: the N:M patterns (N weights kept of every M;
  ``dense`` is ``(1, 1)``); :func:`kept_weights` and :func:`block_bytes` give
  the stored block of a format under a pattern.
- :data:`QBLOCK_BYTES`: the quantized-activation block (32 int8 values, an
  fp32 scale ``d`` and the int32 sum of the values), docs/numerics.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmfab.core.errors import CompileError, ConfigError

__all__ = ["BLOCK_WEIGHTS", "FormatSpec", "WEIGHT_FORMATS", "BLOCK_BYTES", "SPARSITY_PATTERNS",
           "QBLOCK_BYTES", "FormatError", "check_format", "pattern", "kept_weights",
           "index_bits", "block_bytes"]

#: Weights in one GGUF block (every supported format has one scale per block).
BLOCK_WEIGHTS = 32

#: Bytes of a quantized activation block: 32 int8 values, fp32 ``d``, int32 ``sum(q)``.
QBLOCK_BYTES = BLOCK_WEIGHTS + 4 + 4


class FormatError(ConfigError, CompileError):
    """An unknown weight format or sparsity pattern (in a configuration or a compile request)."""


@dataclass(frozen=True)
class FormatSpec:
    """Storage of one GGUF weight format.

    Attributes
    ----------
    name : str
        GGUF type name (``"q4_0"``).
    weight_bits : int
        Bits per quantized weight.
    header_bytes : int
        Bytes of per-block parameters: fp16 scale ``d`` (and fp16 minimum
        ``m`` for Q4_1).
    scale_fmuls : int
        binary32 multiplies per block result on the chains: ``d_w * d_a`` and
        that times the integer dot product; Q4_1 adds ``m_w * s_a``.
    """

    name: str
    weight_bits: int
    header_bytes: int
    scale_fmuls: int


#: Supported weight formats, in canonical order (the ISA's ``fmt`` codes follow it).
WEIGHT_FORMATS: dict[str, FormatSpec] = {
    "q4_0": FormatSpec("q4_0", 4, 2, 2),
    "q4_1": FormatSpec("q4_1", 4, 4, 3),
    "q8_0": FormatSpec("q8_0", 8, 2, 2),
}

#: Supported N:M sparsity patterns (N weights kept of every M), canonical order.
SPARSITY_PATTERNS: dict[str, tuple[int, int]] = {
    "dense": (1, 1),
    "2:4": (2, 4),
    "8:16": (8, 16),
    "4:16": (4, 16),
    "2:16": (2, 16),
}


def _show(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def check_format(fmt: str) -> FormatSpec:
    """The :class:`FormatSpec` of ``fmt``; :class:`FormatError` if it is not supported."""
    try:
        return WEIGHT_FORMATS[fmt]
    except (KeyError, TypeError):
        raise FormatError(f"unknown weight format {_show(fmt)} "
                          f"(choose from {', '.join(WEIGHT_FORMATS)})") from None


def pattern(p: str) -> tuple[int, int]:
    """``(N, M)`` of a sparsity pattern; :class:`FormatError` if it is not supported."""
    try:
        return SPARSITY_PATTERNS[p]
    except (KeyError, TypeError):
        raise FormatError(f"unknown sparsity pattern {_show(p)} "
                          f"(choose from {', '.join(SPARSITY_PATTERNS)})") from None


def kept_weights(sparsity: str = "dense") -> int:
    """Weights stored per 32-weight block under ``sparsity`` (32 for dense, 16 for 2:4)."""
    n, m = pattern(sparsity)
    return BLOCK_WEIGHTS * n // m


def index_bits(sparsity: str = "dense") -> int:
    """Bits of the in-group position stored with each kept weight (0 when dense)."""
    _, m = pattern(sparsity)
    return 0 if m == 1 else (m - 1).bit_length()


def block_bytes(fmt: str, sparsity: str = "dense") -> int:
    """Bytes of one 32-weight block of ``fmt`` stored with ``sparsity``.

    ``header + ceil(kept * weight_bits / 8) + ceil(kept * log2(M) / 8)``: a
    sparse block stores only its ``kept = 32 * N / M`` weights, each with a
    ``log2(M)``-bit index of its position inside its group of M. The pattern is
    fixed per tensor (recorded in the program), so a block carries no N byte.
    Dense: Q4_0 18, Q4_1 20, Q8_0 34 bytes.
    """
    spec = check_format(fmt)
    kept = kept_weights(sparsity)
    return (spec.header_bytes + math.ceil(kept * spec.weight_bits / 8)
            + math.ceil(kept * index_bits(sparsity) / 8))


#: Dense block bytes per format.
BLOCK_BYTES: dict[str, int] = {f: block_bytes(f) for f in WEIGHT_FORMATS}
