"""The reference backend's q8_0 KV cache (``ReferenceModel(kv_cache="q8_0")``) against llama.cpp
with ``type_k = type_v = Q8_0`` and flash attention (tests/data/llamacpp_logits_kvq8.npz, see
docs/reference-data.md), and the storage format itself. The full table, f16 and q8_0 both ways:
``benchmarks/accuracy.py`` (docs/numerics.md, "Quantized KV cache")."""

import json
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from llmfab.core.errors import ModelError
from llmfab.sim.accuracy import compare, load_llamacpp_reference
from llmfab.sim.reference import ReferenceModel, q8_round

DATA = os.path.join(os.path.dirname(__file__), "data")
KVQ8 = os.path.join(DATA, "llamacpp_logits_kvq8.npz")


@pytest.fixture(scope="module")
def ref_q8(smol):
    return ReferenceModel(smol, kv_cache="q8_0")


@pytest.fixture(scope="module")
def llamacpp_q8():
    return load_llamacpp_reference(KVQ8)


@pytest.fixture(scope="module")
def logits_q8(ref_q8, llamacpp_q8):
    out = []
    for toks, _, _ in llamacpp_q8:
        ref_q8.reset()
        out.append(ref_q8.forward(toks))
    return out


@pytest.fixture(scope="module")
def agreement_q8(logits_q8, llamacpp_q8):
    return compare(logits_q8, llamacpp_q8, margin=0.5, topn=8)


# ------------------------------------------------------------- the reference data
def test_kvq8_file_is_llamacpp_q8_0_with_flash_attention():
    z = np.load(KVQ8)
    meta = json.loads(str(z["meta_json"]))
    assert (meta["type_k"], meta["type_v"], meta["flash_attn"]) == ("q8_0", "q8_0", True)
    # the same texts and tokens as the f16 file the other accuracy tests use
    f16 = np.load(os.path.join(DATA, "llamacpp_logits.npz"))
    assert list(z["texts"]) == list(f16["texts"])
    for i in range(meta["n_texts"]):
        assert np.array_equal(z[f"text_{i}_tokens"], f16[f"text_{i}_tokens"])


# ------------------------------------------------------------------ the bars
def test_q8_0_kv_top1_agreement(agreement_q8):
    """Reference q8_0 KV vs llama.cpp q8_0 KV: top-1 >= 96 % (measured: MEASURED_TOP1)."""
    assert agreement_q8.positions >= 400
    assert agreement_q8.top1_agreement >= 0.96, agreement_q8


def test_q8_0_kv_confident_positions_all_agree(agreement_q8):
    """100 % where llama.cpp's top-1 leads its second by > 0.5 (measured: MEASURED_CONF)."""
    assert agreement_q8.confident_positions >= 300
    assert agreement_q8.confident_agreement == 1.0, agreement_q8


def test_q8_0_kv_median_logit_error(agreement_q8):
    """Median |ours - llama.cpp| over llama.cpp's top-8 <= 0.35 (measured: MEASURED_MEDIAN)."""
    assert agreement_q8.median_abs_err_top8 <= 0.35, agreement_q8
    assert agreement_q8.max_abs_err_top8 < 3.0, agreement_q8


def test_mirroring_the_format_is_closer_than_not(smol, llamacpp_q8, agreement_q8):
    """Like for like matters: against llama.cpp's q8_0-KV logits, the reference with a q8_0 cache
    is closer than with its default fp16 cache (measured median: MEASURED_CROSS)."""
    r = ReferenceModel(smol)
    f16 = []
    for toks, _, _ in llamacpp_q8:
        r.reset()
        f16.append(r.forward(toks))
    cross = compare(f16, llamacpp_q8, margin=0.5, topn=8)
    assert agreement_q8.median_abs_err_top8 < cross.median_abs_err_top8, (agreement_q8, cross)


# ------------------------------------------------------------------ the format
def test_q8_round_is_ggml_q8_0():
    """The cache's rounding is ggml-cpu's x86 quantize_row_q8_0 (x * 127/amax, round half to even),
    which set_rows calls to write a q8_0 cache; gguf.quants has ggml's portable reference
    (x * (1/d), round half away from zero). They differ by one step at a near-tie only
    (measured: 1 element in 1.28 million on this data)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((20000, 64)) * rng.uniform(0.01, 10, (20000, 1))).astype(np.float32)
    ours = q8_round(x)
    ggml = quants.dequantize(quants.quantize(x, GGMLQuantizationType.Q8_0),
                             GGMLQuantizationType.Q8_0).reshape(x.shape)
    d = (np.abs(x).reshape(-1, 32).max(axis=1) / np.float32(127)).astype(np.float16).astype(np.float32)
    step = np.repeat(d, 32).reshape(x.shape)
    diff = ours != ggml
    assert diff.mean() < 1e-5
    np.testing.assert_array_equal(np.abs(ours - ggml)[diff], step[diff])
    # an exact tie: 127/amax * x = k + 0.5
    tie = np.zeros(32, np.float32)
    tie[0], tie[1] = 127.0, 2.5
    assert q8_round(tie)[1] == 2.0          # half to even (SIMD rounding)
    assert quants.dequantize(quants.quantize(tie, GGMLQuantizationType.Q8_0),
                             GGMLQuantizationType.Q8_0)[1] == 3.0     # half away (roundf)


def test_cache_holds_q8_0_blocks_along_head_dim(smol, ref_q8):
    """Every stored K and V row, per position and KV head, is head_dim/32 Q8_0 blocks: values
    q * d with d an fp16 number, |q| <= 127, and 127 reached in each nonzero block."""
    d = smol.desc
    ref_q8.reset()
    ref_q8.forward([1, 2, 3, 4, 5])
    for cache in (ref_q8.k_cache, ref_q8.v_cache):
        blocks = cache[:, :5].reshape(-1, 32)
        assert blocks.shape[0] == d.n_layers * 5 * d.n_kv_heads * d.head_dim // 32
        amax = np.abs(blocks).max(axis=1)
        assert (amax > 0).all()
        scale = amax / np.float32(127)
        np.testing.assert_array_equal(scale, scale.astype(np.float16).astype(np.float32))
        q = blocks / scale[:, None]
        np.testing.assert_array_equal(q, np.rint(q))
        assert np.abs(q).max() == 127


def test_default_cache_is_unchanged(smol):
    """kv_cache defaults to "f16", today's cache (fp16 values), bit for bit."""
    a, b = ReferenceModel(smol), ReferenceModel(smol, kv_cache="f16")
    assert a.kv_cache == "f16"
    toks = [1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(a.forward(toks), b.forward(toks))
    k = a.k_cache[:, :7]
    np.testing.assert_array_equal(k, k.astype(np.float16).astype(np.float32))


def test_q8_0_kv_cache_consistency(ref_q8):
    """Incremental decode over a q8_0 cache makes the same decisions as one batch (rows are
    quantized per position, so only summation order differs, amplified by Q8 rounding)."""
    with open(os.path.join(DATA, "llamacpp_greedy.json"), encoding="utf-8") as f:
        case = json.load(f)["cases"][0]
    toks = case["prompt_ids"] + case["generated_ids"]
    ref_q8.reset()
    full = ref_q8.forward(toks)
    ref_q8.reset()
    inc = np.concatenate([ref_q8.forward([t]) for t in toks])
    assert np.median(np.abs(inc - full)) < 0.3
    top2 = np.sort(full, axis=1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > 1.0
    assert (inc.argmax(1)[sure] == full.argmax(1)[sure]).all()


def test_kv_cache_option_checked(smol):
    with pytest.raises(ModelError, match="unknown KV cache type 'q4_0'"):
        ReferenceModel(smol, kv_cache="q4_0")
