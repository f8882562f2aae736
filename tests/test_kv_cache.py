"""The reference backend's q8_0 KV cache (``ReferenceModel(kv_cache="q8_0")``) against llama.cpp
with ``type_k = type_v = Q8_0`` and flash attention (tests/data/llamacpp_logits_kvq8.npz, and
``_norot`` without llama.cpp's Hadamard rotation; see docs/reference-data.md), and the storage
format itself. The full table, f16 and q8_0 both ways:
``benchmarks/accuracy.py`` (docs/numerics.md, "Quantized KV cache")."""

import json
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from llmfab.core.errors import ModelError
from llmfab.sim.accuracy import compare, compare_topk, load_llamacpp_reference
from llmfab.sim.reference import ReferenceModel, fwht, q4_0_round, q8_round

DATA = os.path.join(os.path.dirname(__file__), "data")
KVQ8 = os.path.join(DATA, "llamacpp_logits_kvq8.npz")


KVQ8_NOROT = os.path.join(DATA, "llamacpp_logits_kvq8_norot.npz")


def run_all(r, texts):
    out = []
    for toks, _, _ in texts:
        r.reset()
        out.append(r.forward(toks))
    return out


@pytest.fixture(scope="module")
def ref_q8(smol):
    return ReferenceModel(smol, kv_cache="q8_0")


@pytest.fixture(scope="module")
def llamacpp_q8():
    return load_llamacpp_reference(KVQ8)


@pytest.fixture(scope="module")
def llamacpp_q8_norot():
    return load_llamacpp_reference(KVQ8_NOROT)


@pytest.fixture(scope="module")
def logits_q8(ref_q8, llamacpp_q8):
    return run_all(ref_q8, llamacpp_q8)


@pytest.fixture(scope="module")
def logits_q8_norot(smol, llamacpp_q8):
    return run_all(ReferenceModel(smol, kv_cache="q8_0", kv_rotation=False), llamacpp_q8)


@pytest.fixture(scope="module")
def agreement_q8(logits_q8, llamacpp_q8):
    """Like for like: both with llama.cpp's default Hadamard rotation."""
    return compare(logits_q8, llamacpp_q8, margin=0.5, topn=8)


@pytest.fixture(scope="module")
def agreement_q8_norot(logits_q8_norot, llamacpp_q8_norot):
    """Like for like: both without the rotation (plain Q8_0 rows, the format issue 11 names)."""
    return compare(logits_q8_norot, llamacpp_q8_norot, margin=0.5, topn=8)


# ------------------------------------------------------------- the reference data
@pytest.mark.parametrize("name, kv, rot", [("llamacpp_logits_kvq8.npz", "q8_0", True),
                                           ("llamacpp_logits_kvq8_norot.npz", "q8_0", False),
                                           ("llamacpp_logits_kvq4.npz", "q4_0", True),
                                           ("llamacpp_logits_kvq4_norot.npz", "q4_0", False),
                                           ("llamacpp_logits_fa.npz", "f16", False)])
def test_llamacpp_files(name, kv, rot):
    """What each file is (meta_json), and the same texts and tokens as llamacpp_logits.npz."""
    z = np.load(os.path.join(DATA, name))
    meta = json.loads(str(z["meta_json"]))
    assert (meta["type_k"], meta["type_v"], meta["flash_attn"]) == (kv, kv, True)
    assert meta.get("attn_rot", False) == rot
    f16 = np.load(os.path.join(DATA, "llamacpp_logits.npz"))
    assert list(z["texts"]) == list(f16["texts"])
    for i in range(meta["n_texts"]):
        assert np.array_equal(z[f"text_{i}_tokens"], f16[f"text_{i}_tokens"])


def test_reference_files_are_small():
    total = sum(os.path.getsize(os.path.join(DATA, f)) for f in
                ("llamacpp_logits_kvq8.npz", "llamacpp_logits_kvq8_norot.npz", "llamacpp_logits_fa.npz",
                 "llamacpp_logits_kvq4.npz", "llamacpp_logits_kvq4_norot.npz"))
    assert total < 400_000


# ------------------------------------------------------------------ the bars
def test_q8_0_kv_top1_agreement(agreement_q8):
    """Reference q8_0 KV vs llama.cpp q8_0 KV: top-1 >= 96 % (measured: 572/592 = 96.6 %, OPENBLAS_NUM_THREADS=1; the fp16 reference against the same file: 97.3 %)."""
    assert agreement_q8.positions >= 400
    assert agreement_q8.top1_agreement >= 0.96, agreement_q8


def test_q8_0_kv_confident_positions_all_agree(agreement_q8):
    """100 % where llama.cpp's top-1 leads its second by > 0.5 (measured: 444/444)."""
    assert agreement_q8.confident_positions >= 300
    assert agreement_q8.confident_agreement == 1.0, agreement_q8


def test_q8_0_kv_median_logit_error(agreement_q8):
    """Median |ours - llama.cpp| over llama.cpp's top-8 <= 0.35 (measured: 0.154, max 1.13; the fp16 reference against the same file: 0.146)."""
    assert agreement_q8.median_abs_err_top8 <= 0.35, agreement_q8
    assert agreement_q8.max_abs_err_top8 < 3.0, agreement_q8


def test_no_rotation_bars(agreement_q8_norot):
    """Without the rotation on both sides (plain Q8_0 rows): the same bars (measured: top-1 97.1 %, 439/439, median 0.159)."""
    a = agreement_q8_norot
    assert a.positions >= 400 and a.confident_positions >= 300
    assert a.top1_agreement >= 0.96, a
    assert a.confident_agreement == 1.0, a
    assert a.median_abs_err_top8 <= 0.35, a


def test_mirroring_the_rotation_matters(logits_q8_norot, llamacpp_q8, agreement_q8):
    """Against llama.cpp's default q8_0 cache (rotated), the reference without the rotation is
    further off than with it (measured: median 0.173 vs 0.154, max 1.75 vs 1.13): the rotation is part of the format."""
    cross = compare(logits_q8_norot, llamacpp_q8, margin=0.5, topn=8)
    assert agreement_q8.median_abs_err_top8 < cross.median_abs_err_top8, (agreement_q8, cross)
    assert agreement_q8.max_abs_err_top8 < cross.max_abs_err_top8, (agreement_q8, cross)


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


def test_fwht_is_the_walsh_hadamard_matrix():
    """fwht(x, n) is x times llama.cpp's Sylvester-ordered orthonormal Hadamard matrix (symmetric,
    its own inverse), per n consecutive values."""
    n = 64
    H = np.array([[(-1) ** bin(i & j).count("1") for j in range(n)] for i in range(n)], np.float64) / 8
    x = np.random.default_rng(1).standard_normal((5, 3, 128)).astype(np.float32)
    want = (x.reshape(-1, n).astype(np.float64) @ H).reshape(x.shape)
    np.testing.assert_allclose(fwht(x, n), want, atol=1e-6)
    np.testing.assert_allclose(fwht(fwht(x, n), n), x, atol=1e-6)
    assert fwht(x, n).dtype == np.float32


def test_rotation_follows_llamacpp(smol):
    """Rotation only with a quantized cache, K by the largest power of two >= 64 dividing
    head_dim (64 for SmolLM2's 64), V by 64; kv_rotation=False turns it off."""
    assert (ReferenceModel(smol).rot_k, ReferenceModel(smol).rot_v) == (0, 0)
    r = ReferenceModel(smol, kv_cache="q8_0")
    assert (r.rot_k, r.rot_v) == (64, 64)
    r = ReferenceModel(smol, kv_cache="q8_0", kv_rotation=False)
    assert (r.rot_k, r.rot_v) == (0, 0)


def test_kv_cache_option_checked(smol):
    with pytest.raises(ModelError, match=r"^unknown KV cache type 'q5_0' \(choose from f16, q8_0, q4_0\)$"):
        ReferenceModel(smol, kv_cache="q5_0")


# ------------------------------------------------------------------ the q4_0 cache
def test_q4_0_round_is_ggml_q4_0():
    """q4_0_round is ggml's quantize_row_q4_0_ref written out by hand in float32 (d = the
    largest-magnitude element / -8, q = min(15, trunc(x/d + 8.5)), values fp16(d) * (q - 8)),
    outlier channels and all-zero blocks included."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4096, 64)) * rng.uniform(1e-3, 30, (4096, 1))).astype(np.float32)
    x[::97, 5] *= 40
    x[3] = 0.0
    b = x.reshape(-1, 32)
    m = b[np.arange(len(b)), np.argmax(np.abs(b), axis=1)][:, None]
    d = m / np.float32(-8)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0))
    q = np.minimum(np.float32(15), np.trunc(b * inv.astype(np.float32) + np.float32(8.5)))
    want = ((q - 8) * d.astype(np.float16).astype(np.float32)).reshape(x.shape)
    np.testing.assert_array_equal(q4_0_round(x), want)
    assert q4_0_round(x).dtype == np.float32 and not q4_0_round(x[3]).any()


def test_cache_holds_q4_0_blocks(smol):
    """A q4_0 cache stores every K and V row, per position and KV head, as Q4_0 blocks: values
    (q - 8) * d with d an fp16 number and q - 8 in -8..7, -8 reached in each nonzero block (the
    largest-magnitude element maps to -8), rotated first as llama.cpp does."""
    r = ReferenceModel(smol, kv_cache="q4_0")
    assert (r.rot_k, r.rot_v) == (64, 64)
    r.forward([1, 2, 3, 4, 5])
    for cache in (r.k_cache, r.v_cache):
        blocks = cache[:, :5].reshape(-1, 32).astype(np.float64)
        i = np.argmax(np.abs(blocks), axis=1)
        d = -blocks[np.arange(len(blocks)), i] / 8
        assert (d != 0).all()
        np.testing.assert_array_equal(d, d.astype(np.float16).astype(np.float64))
        q = blocks / d[:, None]
        np.testing.assert_array_equal(q, np.rint(q))
        assert q.min() == -8 and q.max() <= 7


# ------------------------------------------------- why the cache is not 4-bit (issue 11)
KVQ4 = os.path.join(DATA, "llamacpp_logits_kvq4.npz")
KVQ4_NOROT = os.path.join(DATA, "llamacpp_logits_kvq4_norot.npz")
F16 = os.path.join(DATA, "llamacpp_logits.npz")


def test_q4_0_cache_misses_the_bars_in_llamacpp_itself():
    """llama.cpp's own q4_0 KV cache against its fp16 cache (same texts, teacher-forced) misses
    issue 11's accuracy bars on SmolLM2 (measured: top-1 88.7 % rotated / 79.2 % without the
    rotation, median |logit error| 0.535 / 1.016, bars 96 % and 0.35), where its q8_0 cache
    meets them (97.1 %, 0.146): a 4-bit cache is the format's loss, not a mirror's."""
    f16 = load_llamacpp_reference(F16)
    q8 = compare_topk(load_llamacpp_reference(KVQ8), f16, margin=0.5, topn=8)
    assert q8.top1_agreement >= 0.96 and q8.median_abs_err_top8 <= 0.35, q8
    for path, top1, med in ((KVQ4, 0.90, 0.45), (KVQ4_NOROT, 0.82, 0.9)):
        a = compare_topk(load_llamacpp_reference(path), f16, margin=0.5, topn=8)
        assert a.positions >= 400
        assert a.top1_agreement < top1 and a.median_abs_err_top8 > med, (path, a)
        assert a.confident_agreement < 1.0, (path, a)


@pytest.mark.parametrize("rot", [True, False])
def test_q4_0_mirror_follows_llamacpp(smol, rot):
    """The reference's q4_0 cache tracks llama.cpp's like for like: against the file made with
    the same rotation choice its logits are much closer than against the other (measured:
    median 0.536 vs 1.272 rotated, 0.763 vs 1.031 without), though no mirror of a 4-bit cache
    meets the bars (top-1 90.5 % / 81.4 %: the 4-bit rounding amplifies summation order)."""
    same, other = (KVQ4, KVQ4_NOROT) if rot else (KVQ4_NOROT, KVQ4)
    ref_same = load_llamacpp_reference(same)
    logits = run_all(ReferenceModel(smol, kv_cache="q4_0", kv_rotation=rot), ref_same)
    a = compare(logits, ref_same, margin=0.5, topn=8)
    b = compare(logits, load_llamacpp_reference(other), margin=0.5, topn=8)
    assert a.median_abs_err_top8 + 0.2 < b.median_abs_err_top8, (a, b)
    assert a.top1_agreement > b.top1_agreement, (a, b)


def test_benchmark_row_cells():
    """agreement_fields / agreement_cells (benchmarks/accuracy.py, benchmarks/kv_formats.py):
    one row's figures and its Markdown cells, with and without the 1.0 margin."""
    from llmfab.sim.accuracy import Agreement, agreement_cells, agreement_fields
    a5 = Agreement(positions=592, top1_agreement=0.905, confident_positions=438,
                   confident_agreement=0.97, median_abs_err_top8=0.5361, max_abs_err_top8=8.904)
    a10 = Agreement(592, 0.905, 321, 0.991, 0.5361, 8.904)
    r = agreement_fields(a5, a10)
    assert list(r) == ["positions", "top1", "confident_0.5", "n_confident_0.5", "confident_1.0",
                       "n_confident_1.0", "median_abs_err_top8", "max_abs_err_top8"]
    assert agreement_cells(r) == "90.5 % | 97.0 % (438) | 99.1 % (321) | 0.536 | 8.90"
    assert agreement_cells(agreement_fields(a5)) == "90.5 % | 97.0 % (438) | 0.536 | 8.90"
