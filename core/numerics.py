"""The hardware numerics, as numpy functions (the golden unit functions).

Every function here is the bit-exact specification of a hardware unit; the
RTL tests call them. docs/numerics.md explains the choices. Rules:

* One format outside the integer products: IEEE binary32, round to nearest
  even. A result that is subnormal is flushed to a zero of the same sign (FTZ);
  inputs are never subnormal because every value was produced by FTZ ops.
  numpy float32 ops are IEEE RNE, so ``fadd``/``fmul`` mirror the hardware
  exactly when the operation order is followed. No float64 anywhere.
* Activations entering a matrix op: int8 per 32-element block with an fp32
  scale ``d = amax/127`` (computed as ``amax * fp32(1/127)``).
* Integer dot products per 32-block are exact (int32).
* Reductions have two fixed orders: ``reduce_sum`` (32 lanes, then a binary
  tree) for sums over one vector, ``accum4`` (4 interleaved partial sums,
  then ``(p0 + p1) + (p2 + p3)``) for sums over a sequence of vectors.
* exp, reciprocal, rsqrt: a 64-entry table plus fp32 polynomial / Newton
  steps, all in binary32 RNE + FTZ.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
TINY = F32(2.0 ** -126)
LANES = 32          # SFU vector width and reduction lanes
PARTIALS = 4        # interleaved partial sums for sequence accumulation
BLOCK = 32          # quantization block
TABLE_BITS = 6      # 64-entry tables

# ---- constants (fp32 bit patterns fixed here; the RTL uses the same bits) --------------
LOG2E = F32(1.4426950408889634)
EXP_C1 = F32(0.6931471805599453)      # ln 2
EXP_C2 = F32(0.2402265069591007)      # ln2^2 / 2
EXP_C3 = F32(0.05550410866482158)     # ln2^3 / 6
_k = np.arange(64, dtype=np.int64)
# Tables are data (generated once, rounded to fp32), not part of the datapath.
EXP2_TABLE = np.array([2.0 ** (k / 64.0) for k in range(64)], dtype=np.float32)
RECIP_TABLE = np.array([1.0 / (1.0 + (k + 0.5) / 64.0) for k in range(64)], dtype=np.float32)
RSQRT_TABLE_EVEN = np.array([(1.0 + (k + 0.5) / 64.0) ** -0.5 for k in range(64)], dtype=np.float32)
RSQRT_TABLE_ODD = np.array([(2.0 * (1.0 + (k + 0.5) / 64.0)) ** -0.5 for k in range(64)],
                           dtype=np.float32)
ONE = F32(1.0)
TWO = F32(2.0)
HALF = F32(0.5)
THREE_HALVES = F32(1.5)


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def ftz(x) -> np.ndarray:
    """Flush subnormal values to a zero of the same sign."""
    x = np.asarray(x, dtype=np.float32)
    tiny = np.abs(x) < TINY
    if tiny.any():                   # the method: np.any's wrapper cost half of ftz's time
        x = np.where(tiny, np.copysign(F32(0.0), x), x).astype(np.float32)
    return x


def fadd(a, b) -> np.ndarray:
    return ftz(np.add(f32(a), f32(b), dtype=np.float32))


def fsub(a, b) -> np.ndarray:
    return ftz(np.subtract(f32(a), f32(b), dtype=np.float32))


def fmul(a, b) -> np.ndarray:
    return ftz(np.multiply(f32(a), f32(b), dtype=np.float32))


def ldexp(a, e) -> np.ndarray:
    """``a * 2**e`` (exact unless it under/overflows; underflow flushes, overflow is inf)."""
    with np.errstate(over="ignore"):
        return ftz(np.ldexp(f32(a), np.asarray(e, dtype=np.int32)).astype(np.float32))


def _split(a):
    """a = m * 2**e with m in [1, 2) for positive normal a (vectorized)."""
    m, e = np.frexp(f32(a))          # m in [0.5, 1)
    return (m * TWO).astype(np.float32), (e - 1).astype(np.int32)


def _top_bits(m):
    """Index of the 64-entry table: the top 6 fraction bits of m in [1, 2)."""
    bits = f32(m).view(np.uint32)
    return ((bits >> np.uint32(23 - TABLE_BITS)) & np.uint32(63)).astype(np.int64)


# ---- reductions ---------------------------------------------------------------------------

def reduce_sum(v) -> np.ndarray:
    """Sum over the last axis: 32 lanes accumulate chunk by chunk, then a binary tree.

    The vector is padded with +0.0 to a multiple of 32. ``acc = v[0:32]``;
    ``acc = fadd(acc, v[32i:32i+32])`` for i = 1, 2, ...; then
    ``acc = fadd(acc[:h], acc[h:])`` with h = 16, 8, 4, 2, 1.
    """
    v = f32(v)
    n = v.shape[-1]
    pad = (-n) % LANES
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.float32)], axis=-1)
    chunks = v.reshape(v.shape[:-1] + (-1, LANES))
    add = np.add if _no_tiny(v) else fadd     # see accum4: same bits when nothing is tiny
    acc = chunks[..., 0, :]
    for i in range(1, chunks.shape[-2]):
        acc = add(acc, chunks[..., i, :])
    h = LANES // 2
    while h >= 1:
        acc = add(acc[..., :h], acc[..., h:2 * h])
        h //= 2
    return np.asarray(acc[..., 0], np.float32)


_SAFE = F32(2.0 ** -102)


def _no_tiny(x) -> bool:
    """True if every nonzero element of x has magnitude >= 2**-102 (and all are finite)."""
    a = np.abs(x)
    bad = (a < _SAFE) & (a != 0)
    return not bad.any() and bool(np.isfinite(a).all())


def accum4(seq, axis: int = 0) -> np.ndarray:
    """Sum a sequence along ``axis`` with 4 interleaved partials: item i goes to p[i % 4].

    Each partial starts at +0.0; the result is ``fadd(fadd(p0, p1), fadd(p2, p3))``.
    """
    seq = np.moveaxis(f32(seq), axis, 0)
    n = seq.shape[0]
    full = n // PARTIALS * PARTIALS
    groups = seq[:full].reshape((-1, PARTIALS) + seq.shape[1:])
    tail = seq[full:]
    p = np.zeros((PARTIALS,) + seq.shape[1:], np.float32)
    # Fast path, same bits: if every nonzero item is >= 2**-102 in magnitude, every
    # partial sum is a multiple of 2**-125, so no sum can be subnormal and the flush
    # never fires; plain float32 adds (RNE) then give the hardware's result.
    if _no_tiny(seq):
        for i in range(groups.shape[0]):
            p += groups[i]
        p[:len(tail)] += tail
        return (p[0] + p[1]) + (p[2] + p[3])
    for i in range(groups.shape[0]):
        p = fadd(p, groups[i])
    if len(tail):
        p[:len(tail)] = fadd(p[:len(tail)], tail)
    return fadd(fadd(p[0], p[1]), fadd(p[2], p[3]))


def vdot(a, b) -> np.ndarray:
    """Float dot product over the last axis: ``reduce_sum(fmul(a, b))``."""
    return reduce_sum(fmul(a, b))


# ---- special functions -------------------------------------------------------------------

def exp(x) -> np.ndarray:
    """e**x: y = x*log2(e); y = n + k/64 + r; 2**r by a cubic; times table[k]; times 2**n."""
    x = f32(x)
    y = fmul(x, LOG2E)
    y = np.clip(np.nan_to_num(y, nan=0.0), F32(-150.0), F32(128.0)).astype(np.float32)
    n = np.floor(y).astype(np.int32)
    f = fsub(y, n.astype(np.float32))                  # in [0, 1], 1.0 only for tiny negative y

    k = np.floor(f * F32(64.0)).astype(np.int64)       # exact scaling
    k = np.minimum(k, 63)                              # the clamp covers f == 1.0
    r = fsub(f, (k.astype(np.float32) * F32(1.0 / 64.0)))  # exact, in [0, 1/64)
    p = fadd(fmul(EXP_C3, r), EXP_C2)
    p = fadd(fmul(p, r), EXP_C1)
    p = fadd(fmul(p, r), ONE)
    v = fmul(EXP2_TABLE[k], p)
    out = ldexp(v, n)
    out = np.where(y >= F32(128.0), F32(np.inf), out)
    out = np.where(np.isnan(x), F32(np.nan), out)
    return out.astype(np.float32)


def recip(a) -> np.ndarray:
    """1/a: table of 1/m on the top 6 mantissa bits, two Newton steps, scale by 2**-e."""
    a = f32(a)
    sign = np.signbit(a)
    mag = np.abs(a)
    zero = mag == 0
    inf = np.isinf(mag)
    safe = np.where(zero | inf | np.isnan(mag), ONE, mag).astype(np.float32)
    m, e = _split(safe)
    y = RECIP_TABLE[_top_bits(m)]
    for _ in range(2):
        y = fmul(y, fsub(TWO, fmul(m, y)))
    out = ldexp(y, -e)
    out = np.where(zero, F32(np.inf), out)
    out = np.where(inf, F32(0.0), out)
    out = np.where(np.isnan(mag), F32(np.nan), out)
    return np.where(sign, -out, out).astype(np.float32)


def rsqrt(a) -> np.ndarray:
    """1/sqrt(a) for a >= 0: table per exponent parity, two Newton steps."""
    a = f32(a)
    zero = a == 0
    bad = (a < 0) | np.isnan(a)
    inf = np.isinf(a)
    safe = np.where(zero | bad | inf, ONE, a).astype(np.float32)
    m, e = _split(safe)
    odd = (e & 1).astype(bool)
    idx = _top_bits(m)
    y = np.where(odd, RSQRT_TABLE_ODD[idx], RSQRT_TABLE_EVEN[idx]).astype(np.float32)
    mm = np.where(odd, m * TWO, m).astype(np.float32)    # exact doubling, mm in [1, 4)
    half_mm = fmul(HALF, mm)
    for _ in range(2):
        y = fmul(y, fsub(THREE_HALVES, fmul(half_mm, fmul(y, y))))
    out = ldexp(y, -((e - odd.astype(np.int32)) // 2))
    out = np.where(zero, F32(np.inf), out)
    out = np.where(inf, F32(0.0), out)
    out = np.where(bad, F32(np.nan), out)
    return out.astype(np.float32)


def silu(x) -> np.ndarray:
    """x * 1/(1 + exp(-x))."""
    x = f32(x)
    return fmul(x, recip(fadd(ONE, exp(-x))))


def softmax(s, length=None) -> np.ndarray:
    """Softmax over the last axis, or over its first ``length`` entries (the result then
    has ``length`` entries).

    m = max (exact); e = exp(s - m); z = reduce_sum(e); out = e * recip(z).
    """
    s = f32(s)
    if length is not None and length < s.shape[-1]:
        s = s[..., :length]
    m = np.max(s, axis=-1, keepdims=True)
    e = exp(fsub(s, m))
    z = reduce_sum(e)
    return fmul(e, recip(z)[..., None])


def rms_norm(x, w, eps, inv_n=None) -> np.ndarray:
    """y = (x * rsqrt(reduce_sum(x*x) * inv_n + eps)) * w over the last axis.

    ``inv_n`` is the binary32 constant 1/n (the correctly rounded quotient; the
    compiler supplies its bits to the hardware); by default computed from n.
    """
    x = f32(x)
    n = x.shape[-1]
    ss = reduce_sum(fmul(x, x))
    mean = fmul(ss, F32(1.0 / n) if inv_n is None else F32(inv_n))
    r = rsqrt(fadd(mean, F32(eps)))
    return fmul(fmul(x, r[..., None]), f32(w))


def rope(x, cos, sin) -> np.ndarray:
    """Rotate adjacent pairs of x[..., d] with cos/sin[..., d/2] (GGUF/llama.cpp NORM RoPE)."""
    x = f32(x)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = fsub(fmul(x0, cos), fmul(x1, sin))
    out[..., 1::2] = fadd(fmul(x0, sin), fmul(x1, cos))
    return out


def rope_tables(head_dim: int, base: float, n_pos: int):
    """cos/sin tables [n_pos, head_dim/2] in fp32 (made by the compiler, stored in HBM)."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    inv = float(base) ** (-2.0 * i / head_dim)
    ang = np.arange(n_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def to_f16(x) -> np.ndarray:
    """binary32 -> binary16 (the KV-cache format): RNE, subnormals kept, overflow to inf."""
    with np.errstate(over="ignore"):
        return f32(x).astype(np.float16)


def from_f16(h) -> np.ndarray:
    """binary16 -> binary32 (exact)."""
    return np.asarray(h, dtype=np.float16).astype(np.float32)


# ---- activation quantizer ----------------------------------------------------------------

F127 = F32(127.0)
INV127 = F32(1.0 / 127.0)


def quantize_act(x):
    """fp32 [..., n] (n multiple of 32) -> (q int8 [..., n/32, 32], d fp32 [..., n/32], sumq int32).

    Per block: amax = max|x| (exact); d = amax * (1/127); id = 127 * recip(amax);
    q = clamp(rne(x * id), -127, 127). A block whose d flushes to zero (amax below
    127 * 2**-126, all-zero blocks included) is a zero block: d = 0, q = 0. A block
    with amax >= 2**126 is outside the quantizer's range: recip(amax) flushes, so
    q = 0 (d stays amax/127). ``sumq`` (int32) is the sum of the block's q (used by
    Q4_1's minimum term).
    """
    x = f32(x)
    q, d = _quantize_blocks(x.reshape(x.shape[:-1] + (-1, BLOCK)))
    return q, d, q.astype(np.int32).sum(axis=-1, dtype=np.int32)


def _quantize_blocks(blocks):
    """(q int8 [..., m], d fp32 [...]) of fp32 ``blocks [..., m]``: the quantizer above, one
    scale per block of ``m``."""
    amax = np.max(np.abs(blocks), axis=-1)
    d = fmul(amax, INV127)
    live = d > 0
    inv = fmul(recip(np.where(live, amax, ONE)), F127)
    inv = np.where(live, inv, F32(0.0)).astype(np.float32)
    q = np.clip(np.rint(fmul(blocks, inv[..., None])), -127, 127).astype(np.int8)
    return q, d


#: binary16 1.0 as its two little-endian bytes (the unit scale of the transposed V blocks)
F16_ONE_BYTES = np.array([1.0], np.float16).view(np.uint8)


def quantize_q8_0(x):
    """A K row as GGUF Q8_0 blocks (attention on the chains, docs/numerics.md): the activation
    quantizer per 32-element block, its scale stored as binary16 (RNE).
    Returns (q int8 [n/32, 32], d binary16 [n/32])."""
    q, d = _quantize_blocks(f32(x).reshape(-1, BLOCK))
    return q, to_f16(d)


def quantize_row(x):
    """A V row with one scale over the whole row (attention on the chains): the activation
    quantizer with one block of ``len(x)``. Returns (q int8 [n], d fp32 scalar)."""
    q, d = _quantize_blocks(f32(x).reshape(1, -1))
    return q[0], np.float32(d[0])


def dequantize_act(q, d) -> np.ndarray:
    v = fmul(np.asarray(q, np.float32), f32(d)[..., None])
    return v.reshape(v.shape[:-2] + (-1,))


def block_isum(qw, qx) -> np.ndarray:
    """Exact integer dot product per block: qw [..., nb, 32] x qx [nb, 32] -> int32 [..., nb]."""
    return np.einsum("...bk,bk->...b", np.asarray(qw, np.int32), np.asarray(qx, np.int32))


def sparse_isum(values, idx, qx, group: int) -> np.ndarray:
    """Sparse block dot product: kept ``values`` [..., nb, K] at ``idx`` (positions within
    their group of ``group``) against qx [nb, 32]. Returns (isum, sumq_kept) int32 [..., nb].

    A 32-block is 32/group groups; kept entries are listed group by group, K/(32/group)
    per group, each with its index inside the group.
    """
    values = np.asarray(values, np.int32)
    idx = np.asarray(idx, np.int64)
    nb, K = values.shape[-2], values.shape[-1]
    per = K // (BLOCK // group)
    gbase = (np.arange(K) // per) * group
    pos = gbase + idx                                      # position within the 32-block
    qxs = np.take_along_axis(np.broadcast_to(np.asarray(qx, np.int32), values.shape[:-2] + (nb, BLOCK)),
                             pos, axis=-1)
    return (values * qxs).sum(-1).astype(np.int32), qxs.sum(-1).astype(np.int32)


def block_values(fmt: str, isum, d, m, dx, sumq) -> np.ndarray:
    """Scale each block's integer sum: the value the chain's float stage emits.

    q4_0 / q8_0: ``fmul(fmul(isum, d), dx)``;
    q4_1: ``fmul(fadd(fmul(isum, d), fmul(m, sumq)), dx)``.
    ``d``, ``m`` are the fp16 block fields (exact in fp32); ``dx`` the activation
    block scales; ``sumq`` the activation sums (over kept positions if sparse).
    ``isum`` and ``sumq`` are below 2**24 in magnitude, so exact in fp32.
    """
    t = fmul(np.asarray(isum, np.float32), from_f16(d))
    if fmt == "q4_1":
        t = fadd(t, fmul(from_f16(m), np.asarray(sumq, np.float32)))
    return fmul(t, f32(dx))


def matvec_blocks(vals) -> np.ndarray:
    """Accumulate block values [rows, nb] over blocks with :func:`accum4` -> [rows]."""
    return accum4(vals, axis=-1)
