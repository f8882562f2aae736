"""N:M sparse weight blocks (compiler/sparse.py): pruning, the on-HBM block format, and
exact sparse dot products (core.numerics.sparse_isum) against dense blocks with zeros."""

import math

import numpy as np
import pytest

from llmfab.core import formats
from llmfab.core.errors import CompileError
from llmfab.compiler import quant, sparse
from llmfab.core import numerics as N

FMTS = ["q4_0", "q4_1", "q8_0"]
PATTERNS = ["2:4", "8:16", "4:16", "2:16"]
PATTERN_LIST = "dense, 2:4, 8:16, 4:16, 2:16"


def _weights(seed, rows, cols):
    """Real-looking weight rows: normal with a few outliers, quantized by llama.cpp's rounding."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (rows, cols))
    w[:, rng.integers(0, cols, 3)] *= 8
    return w.astype(np.float32)


def _activation(seed, cols):
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 1, cols) * np.exp(rng.normal(0, 0.7, cols))).astype(np.float32)
    return N.quantize_act(x)


def _encode_by_doc(fmt, q, d, m, mask, p):
    """The sparse layout of the module docstring, written independently (bit strings)."""
    n, M = formats.SPARSITY_PATTERNS[p]
    ibits = int(math.log2(M))
    out = bytearray()
    for b in range(q.shape[0]):
        pos = [i for i in range(32) if mask[b, i]]
        out += np.float16(d[b]).tobytes()
        if fmt == "q4_1":
            out += np.float16(m[b]).tobytes()
        vals = [int(q[b, i]) for i in pos]
        if fmt == "q8_0":
            out += bytes(v & 0xFF for v in vals)
        else:
            codes = [v + 8 if fmt == "q4_0" else v for v in vals]
            out += bytes(codes[j] | (codes[j + 1] << 4) for j in range(0, len(codes), 2))
        stream = 0
        for j, i in enumerate(pos):
            stream += (i % M) << (j * ibits)
        out += stream.to_bytes(math.ceil(len(pos) * ibits / 8), "little")
    return bytes(out)


def _check_matrix(fmt, p, raw, qx, sumq_x):
    """Prune raw blocks [rows, bytes] to p and check mask, format and dot products, row by row."""
    n, M = formats.SPARSITY_PATTERNS[p]
    rows = raw.shape[0]
    q, d, m = quant.split_blocks(fmt, raw)
    nb = q.shape[1]
    K = formats.kept_weights(p)
    assert K == 32 * n // M == formats.kept_weights(p)
    w = quant.dequantize_rows(fmt, raw)
    mask = sparse.prune(fmt, raw, p)
    assert mask.dtype == bool and mask.shape == w.shape
    np.testing.assert_array_equal(mask, sparse.magnitude_mask(w, p))
    # exactly N per group of M, and the kept ones are the largest magnitudes
    g = mask.reshape(rows, -1, M)
    assert np.all(g.sum(-1) == n)
    mag = np.abs(w).reshape(rows, -1, M)
    kept_min = np.where(g, mag, np.inf).min(-1)
    dropped_max = np.where(g, -np.inf, mag).max(-1)
    assert np.all(kept_min >= dropped_max)
    bb = formats.block_bytes(fmt, p)
    for r in range(rows):
        mb = mask[r].reshape(nb, 32)
        enc = sparse.encode_sparse(fmt, raw[r], mask[r], p)
        assert len(enc) == nb * bb
        assert enc == _encode_by_doc(fmt, q[r], d[r], None if m is None else m[r], mb, p)
        vals, idx, dd, mm = sparse.decode_sparse(fmt, enc, p, nb)
        pos = np.array([np.nonzero(mb[b])[0] for b in range(nb)])           # [nb, K], ascending
        assert vals.shape == (nb, K) and idx.shape == (nb, K)
        np.testing.assert_array_equal(vals, np.take_along_axis(q[r], pos, -1))
        np.testing.assert_array_equal(idx, pos % M)
        # the j-th kept weight of a block lies in group j // (K / (32 / M))
        np.testing.assert_array_equal(pos // M, np.broadcast_to(np.arange(K) // (K // (32 // M)), (nb, K)))
        assert np.array_equal(dd.view(np.uint16), d[r].view(np.uint16))
        if fmt == "q4_1":
            assert np.array_equal(mm.view(np.uint16), m[r].view(np.uint16))
        else:
            assert mm is None
        # exact integer dot products: sparse == dense with zeros at pruned positions
        isum, sumq_kept = N.sparse_isum(vals, idx, qx, M)
        assert isum.dtype == np.int32 and sumq_kept.dtype == np.int32
        dense = np.where(mb, q[r], 0)
        np.testing.assert_array_equal(isum, N.block_isum(dense, qx))
        # Q4_1's minimum term counts the kept positions only
        np.testing.assert_array_equal(sumq_kept, np.where(mb, qx, 0).astype(np.int64).sum(-1))
        if fmt == "q4_1":
            assert np.any(sumq_kept != sumq_x)
    return mask


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("p", PATTERNS)
def test_sparse_random_blocks(fmt, p):
    seed = 10 * FMTS.index(fmt) + PATTERNS.index(p)
    raw = quant.quantize_rows(fmt, _weights(seed, 12, 512))
    qx, dx, sumq = _activation(seed + 100, 512)
    _check_matrix(fmt, p, raw, qx, sumq)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("p", PATTERNS)
def test_sparse_smollm2_rows(smol, fmt, p):
    """blk.0.attn_k rows 0..7 of the bundled SmolLM2 (Q4_1 as stored; re-quantized for the others)
    against a real activation: the normalized embedding of a token."""
    t = smol.tensor("blk.0.attn_k.weight")
    assert t.qtype == "q4_1" and t.shape[1] == 576
    raw = np.asarray(t.data[0:8]) if fmt == "q4_1" else quant.quantize_rows(fmt, t.rows(0, 8))
    emb = smol.tensor("token_embd.weight").rows(504, 505)[0]           # one token's embedding
    norm = smol.tensor("blk.0.attn_norm.weight").dequantize()
    x = N.rms_norm(emb, norm, smol.desc.rms_eps)
    qx, dx, sumq = N.quantize_act(x)
    mask = _check_matrix(fmt, p, raw, qx, sumq)
    # the sparse row value: block values over kept positions, accumulated; pruned weights give nothing
    q, d, m = quant.split_blocks(fmt, raw)
    _, M = formats.SPARSITY_PATTERNS[p]
    vals_sparse = []
    for r in range(8):
        vals, idx, dd, mm = sparse.decode_sparse(fmt, sparse.encode_sparse(fmt, raw[r], mask[r], p), p, 18)
        isum, sk = N.sparse_isum(vals, idx, qx, M)
        vals_sparse.append(N.block_values(fmt, isum, dd, mm, dx, sk))
    y = N.matvec_blocks(np.array(vals_sparse))
    wk = np.where(mask, quant.dequantize_rows(fmt, raw), 0).astype(np.float64)
    xdq = (qx.astype(np.float64) * dx.astype(np.float64)[:, None]).reshape(-1)
    ref = wk @ xdq
    assert np.all(np.abs(y - ref) <= 2 * 2.0 ** -23 * (np.abs(wk) @ np.abs(xdq)))


def test_q4_1_min_term_kept_only():
    """A Q4_1 block of constant q with m != 0: the sparse value is m * (sum of the kept activations)."""
    qb = np.full((1, 1, 32), 0, np.int8)
    raw = quant.join_blocks("q4_1", qb, np.float16([[0.5]]), np.float16([[0.25]]))[0]
    x = np.arange(1, 33, dtype=np.float32)
    qx, dx, sumq = N.quantize_act(x)
    for p in PATTERNS:
        n, M = formats.SPARSITY_PATTERNS[p]
        mask = np.zeros(32, bool)
        for gs in range(0, 32, M):
            mask[gs + M - n: gs + M] = True                      # keep the last n of every group
        enc = sparse.encode_sparse("q4_1", raw, mask, p)
        vals, idx, d, m = sparse.decode_sparse("q4_1", enc, p, 1)
        isum, sk = N.sparse_isum(vals, idx, qx, M)
        assert isum[0] == 0
        assert sk[0] == int(qx[0][mask].sum()) < int(sumq[0])
        v = N.block_values("q4_1", isum, d, m, dx, sk)
        assert v[0] == N.fmul(N.fmul(np.float32(0.25), np.float32(sk[0])), dx[0])      # 0 * d + m * sumq


def test_magnitude_mask_ties_and_shapes():
    v = np.array([[1, -3, 2, 2, 0, 0, 0, 0, -1, 1, 1, -1, 5, 4, -5, 4]], np.float32)
    m = sparse.magnitude_mask(v, "2:4")
    # largest two per group; ties go to the lower position
    np.testing.assert_array_equal(m[0].astype(int), [0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0])
    assert sparse.magnitude_mask(v, "dense").all()
    row = np.arange(32, dtype=np.float32)[::-1].copy()            # 31 .. 0
    for p in PATTERNS:
        n, M = formats.SPARSITY_PATTERNS[p]
        k = sparse.magnitude_mask(row[None], p)[0]
        # each group keeps its first n positions (largest values)
        assert np.array_equal(np.nonzero(k)[0], [g + i for g in range(0, 32, M) for i in range(n)])
    # batch shapes keep their shape
    b = np.random.default_rng(1).normal(size=(3, 2, 64)).astype(np.float32)
    assert sparse.magnitude_mask(b, "8:16").shape == (3, 2, 64)


def test_block_bytes_table():
    want = {("q4_0", "2:4"): 2 + 8 + 4, ("q4_1", "2:4"): 4 + 8 + 4, ("q8_0", "2:4"): 2 + 16 + 4,
            ("q4_0", "8:16"): 2 + 8 + 8, ("q4_0", "4:16"): 2 + 4 + 4, ("q4_0", "2:16"): 2 + 2 + 2,
            ("q8_0", "2:16"): 2 + 4 + 2, ("q4_1", "8:16"): 4 + 8 + 8,
            ("q4_0", "dense"): 18, ("q4_1", "dense"): 20, ("q8_0", "dense"): 34}
    for (fmt, p), b in want.items():
        assert formats.block_bytes(fmt, p) == b


def test_pruned_values_do_not_matter():
    """The encoding depends on kept weights only: scrambling the pruned ones changes nothing."""
    rng = np.random.default_rng(5)
    for fmt in FMTS:
        raw = quant.quantize_rows(fmt, _weights(7, 4, 256))
        q, d, m = quant.split_blocks(fmt, raw)
        lo, hi = (-8, 8) if fmt == "q4_0" else (0, 16) if fmt == "q4_1" else (-128, 128)
        for p in PATTERNS:
            mask = sparse.prune(fmt, raw, p)
            q2 = np.where(mask.reshape(q.shape), q, rng.integers(lo, hi, q.shape)).astype(np.int8)
            raw2 = quant.join_blocks(fmt, q2, d, m)
            for r in range(4):
                assert sparse.encode_sparse(fmt, raw[r], mask[r], p) == sparse.encode_sparse(fmt, raw2[r], mask[r], p)


def _raises(exc, msg, fn, *a):
    with pytest.raises(exc) as e:
        fn(*a)
    assert str(e.value) == msg


def test_errors():
    for bad in ["3:4", "1:2", "x", "2:8", ""]:
        msg = f"unknown sparsity pattern '{bad}' (choose from {PATTERN_LIST})"
        _raises(CompileError, msg, formats.pattern, bad)
        _raises(CompileError, msg, formats.kept_weights, bad)
        _raises(CompileError, msg, formats.block_bytes, "q4_0", bad)
        _raises(CompileError, msg, sparse.magnitude_mask, np.ones((2, 32)), bad)
        _raises(CompileError, msg, sparse.encode_sparse, "q4_0", np.zeros(18, np.uint8), np.ones(32, bool), bad)
        _raises(CompileError, msg, sparse.decode_sparse, "q4_0", b"", bad, 0)
    _raises(CompileError, "row length 30 is not a multiple of 4 for 2:4",
            sparse.magnitude_mask, np.ones((2, 30)), "2:4")
    _raises(CompileError, "row length 40 is not a multiple of 16 for 4:16",
            sparse.magnitude_mask, np.ones((1, 40)), "4:16")
    _raises(CompileError, "row length 8 is not a multiple of 16 for 8:16",
            sparse.magnitude_mask, np.ones(8), "8:16")
    raw = quant.quantize_rows("q4_0", _weights(3, 1, 64))
    _raises(CompileError, "row length 60 is not a multiple of 16 for 2:16",
            sparse.magnitude_mask, np.ones((3, 60)), "2:16")
    # a mask with the wrong number of kept weights in a block
    _raises(CompileError, "block 0 of row 0 does not keep 2 of every 4 weights (pattern 2:4)",
            sparse.encode_sparse, "q4_0", raw[0], np.ones(64, bool), "2:4")
    mask = sparse.prune("q4_0", raw, "2:16")[0]
    mask[40] = not mask[40]
    _raises(CompileError, "block 1 of row 0 does not keep 2 of every 16 weights (pattern 2:16)",
            sparse.encode_sparse, "q4_0", raw[0], mask, "2:16")


def test_encode_rejects_wrong_group_counts():
    raw = quant.quantize_rows("q4_0", _weights(4, 1, 256))
    bad = np.tile(np.array([1, 1, 1, 0, 1, 0, 0, 0] * 4, bool), 8)      # 16 per block, groups 3 and 1
    with pytest.raises(CompileError, match=r"^block 0 of row 0 does not keep 2 of every 4 weights \(pattern 2:4\)$"):
        sparse.encode_sparse("q4_0", raw[0], bad, "2:4")
