"""GGUF weight blocks: field access (split/join), (de)quantization against the gguf
package, and the field semantics checked on blocks decoded by hand."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from llmfab.core.errors import ModelError
from llmfab.compiler import quant

QTYPES = ["q4_0", "q4_1", "q8_0"]


def _random_blocks(qtype, rows, nblocks, seed=0):
    """Random raw blocks with finite fp16 scales (any bit pattern for the quants)."""
    rng = np.random.default_rng(seed)
    bb = quant.BLOCK_BYTES[qtype]
    raw = rng.integers(0, 256, size=(rows, nblocks, bb), dtype=np.uint8)
    raw[..., 0:2] = np.float16(rng.uniform(-0.1, 0.1, (rows, nblocks))).view(np.uint8).reshape(rows, nblocks, 2)
    if qtype == "q4_1":
        raw[..., 2:4] = np.float16(rng.uniform(-1, 1, (rows, nblocks))).view(np.uint8).reshape(rows, nblocks, 2)
    return raw.reshape(rows, nblocks * bb)


def _by_hand(qtype, q, d, m):
    d = d.astype(np.float32)[..., None]
    v = q.astype(np.float32) * d
    if qtype == "q4_1":
        v = v + m.astype(np.float32)[..., None]
    return v.reshape(*q.shape[:-2], -1)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name,qtype", [("token_embd.weight", "q8_0"), ("blk.0.ffn_up.weight", "q4_1"),
                                        ("blk.29.attn_k.weight", "q4_1"), ("blk.7.ffn_down.weight", "q4_1")])
def test_split_join_roundtrip_smollm2(smol, name, qtype):
    t = smol.tensor(name)
    assert t.qtype == qtype
    rows = t.data[:64]
    q, d, m = quant.split_blocks(qtype, rows)
    nb = t.shape[1] // 32
    assert q.shape == (64, nb, 32) and q.dtype == np.int8
    assert d.shape == (64, nb) and d.dtype == np.float16
    assert (m is None) == (qtype != "q4_1")
    if qtype == "q4_1":
        assert m.shape == (64, nb) and m.dtype == np.float16
        assert q.min() >= 0 and q.max() <= 15
    np.testing.assert_array_equal(quant.join_blocks(qtype, q, d, m), rows)
    # the fields give the values llama.cpp's dequantization gives
    np.testing.assert_array_equal(_by_hand(qtype, q, d, m), t.rows(0, 64))


@pytest.mark.parametrize("qtype", QTYPES)
def test_split_join_roundtrip_random(qtype):
    raw = _random_blocks(qtype, 7, 5)
    q, d, m = quant.split_blocks(qtype, raw)
    np.testing.assert_array_equal(quant.join_blocks(qtype, q, d, m), raw)
    # and fields -> bytes -> fields
    rng = np.random.default_rng(1)
    lo, hi = {"q4_0": (-8, 7), "q4_1": (0, 15), "q8_0": (-128, 127)}[qtype]
    q2 = rng.integers(lo, hi + 1, size=(3, 4, 32)).astype(np.int8)
    d2 = rng.standard_normal((3, 4)).astype(np.float16)
    m2 = rng.standard_normal((3, 4)).astype(np.float16) if qtype == "q4_1" else None
    raw2 = quant.join_blocks(qtype, q2, d2, m2)
    assert raw2.shape == (3, 4 * quant.BLOCK_BYTES[qtype]) and raw2.dtype == np.uint8
    q3, d3, m3 = quant.split_blocks(qtype, raw2)
    np.testing.assert_array_equal(q3, q2)
    np.testing.assert_array_equal(d3, d2)
    if qtype == "q4_1":
        np.testing.assert_array_equal(m3, m2)


@pytest.mark.parametrize("qtype", QTYPES)
def test_split_blocks_leading_dims(qtype):
    raw = _random_blocks(qtype, 6, 3).reshape(2, 3, -1)
    q, d, m = quant.split_blocks(qtype, raw)
    assert q.shape == (2, 3, 3, 32) and d.shape == (2, 3, 3)
    np.testing.assert_array_equal(quant.join_blocks(qtype, q, d, m), raw)


# ------------------------------------------------------------------ vs gguf
@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_rows_equals_gguf(qtype):
    raw = _random_blocks(qtype, 9, 4, seed=3)
    ours = quant.dequantize_rows(qtype, raw)
    ref = quants.dequantize(raw, GGMLQuantizationType[qtype.upper()])
    assert ours.shape == (9, 128) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)
    q, d, m = quant.split_blocks(qtype, raw)
    np.testing.assert_array_equal(_by_hand(qtype, q, d, m), ours)


def test_dequantize_rows_equals_gguf_smollm2(smol):
    t = smol.tensor("blk.3.attn_output.weight")
    np.testing.assert_array_equal(quant.dequantize_rows("q4_1", t.data[:32]),
                                  quants.dequantize(t.data[:32], GGMLQuantizationType.Q4_1))


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_rows_equals_gguf(qtype):
    x = np.random.default_rng(4).standard_normal((5, 96)).astype(np.float32)
    raw = quant.quantize_rows(qtype, x)
    np.testing.assert_array_equal(raw, quants.quantize(x, GGMLQuantizationType[qtype.upper()]))
    back = quant.dequantize_rows(qtype, raw)
    step = np.abs(x).reshape(5, 3, 32).max(-1, keepdims=True) / (127 if qtype == "q8_0" else 7)
    assert np.all(np.abs(back - x).reshape(5, 3, 32) <= step * 1.01)


def test_errors():
    with pytest.raises(ModelError) as e:
        quant.dequantize_rows("q5_0", np.zeros((1, 22), np.uint8))
    assert str(e.value) == "unsupported block type 'q5_0' (supported: q4_0, q4_1, q8_0)"
    with pytest.raises(ModelError) as e:
        quant.quantize_rows("q4_k", np.zeros((1, 32), np.float32))
    assert str(e.value) == "unsupported block type 'q4_k' (supported: q4_0, q4_1, q8_0)"
    with pytest.raises(ModelError) as e:
        quant.quantize_rows("q8_0", np.zeros((2, 40), np.float32))
    assert str(e.value) == "row length 40 is not a multiple of 32"


# ------------------------------------------------------------------ hand-decoded blocks
def _block(prefix: bytes, body: bytes) -> np.ndarray:
    return np.frombuffer(prefix + body, np.uint8)[None, :]


def test_q4_0_fields_by_hand():
    """Q4_0: d = 0.5; weight j = low nibble of qs[j], weight j+16 = high nibble; value (q - 8) * d."""
    d = np.float16(0.5).tobytes()                      # 0x3800
    assert d == b"\x00\x38"
    qs = bytes([0x21] + [0x8F] * 14 + [0x0F])          # qs[0]: lo 1, hi 2; qs[1..14]: lo 15, hi 8; qs[15]: lo 15, hi 0
    raw = _block(d, qs)
    q, dd, m = quant.split_blocks("q4_0", raw)
    assert m is None and dd[0, 0] == 0.5
    want_q = [1 - 8] + [15 - 8] * 15 + [2 - 8] + [8 - 8] * 14 + [0 - 8]
    assert q[0, 0].tolist() == want_q                   # offset -8: signed -8..7
    v = quant.dequantize_rows("q4_0", raw)[0]
    assert v[0] == -3.5 and v[16] == -3.0 and v[1] == 3.5 and v[17] == 0.0 and v[31] == -4.0


def test_q4_1_fields_by_hand():
    """Q4_1: d = 0.25, m = -1; unsigned nibbles; value q * d + m."""
    d, mn = np.float16(0.25).tobytes(), np.float16(-1.0).tobytes()
    qs = bytes([0xF0] + [0x5A] * 15)                    # qs[0]: lo 0, hi 15; others: lo 10, hi 5
    raw = _block(d + mn, qs)
    q, dd, m = quant.split_blocks("q4_1", raw)
    assert dd[0, 0] == 0.25 and m[0, 0] == -1.0
    assert q[0, 0].tolist() == [0] + [10] * 15 + [15] + [5] * 15   # unsigned 0..15
    v = quant.dequantize_rows("q4_1", raw)[0]
    assert v[0] == -1.0 and v[16] == 2.75 and v[1] == 1.5 and v[17] == 0.25


def test_q8_0_fields_by_hand():
    """Q8_0: d = 0.125; qs are int8 (two's complement); value q * d."""
    d = np.float16(0.125).tobytes()
    qs = bytes([0xFF, 0x80, 0x7F, 0x01] + [0x00] * 28)  # -1, -128, 127, 1, 0...
    raw = _block(d, qs)
    q, dd, m = quant.split_blocks("q8_0", raw)
    assert m is None and dd[0, 0] == 0.125
    assert q[0, 0, :5].tolist() == [-1, -128, 127, 1, 0]
    v = quant.dequantize_rows("q8_0", raw)[0]
    assert v[:5].tolist() == [-0.125, -16.0, 15.875, 0.125, 0.0]
    # and back: the same bytes
    np.testing.assert_array_equal(quant.join_blocks("q8_0", q, dd), raw)


def test_block_sizes_match_gguf():
    from gguf import GGML_QUANT_SIZES
    for qtype, nbytes in quant.BLOCK_BYTES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[qtype.upper()]] == (32, nbytes)
