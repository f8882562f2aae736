"""Model import: the bundled SmolLM2 GGUF, tiny GGUF files made here (every import
error with its exact message, K-quant re-quantization), and Hugging Face LLaMA
safetensors (Q/K permutation checked against an independent HF-style forward)."""

import json
import os
import warnings

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from llmfab.core.errors import LlmfabError, ModelError
from llmfab.compiler import model as M
from llmfab.compiler.model import load_gguf, load_hf, load_model
from llmfab.compiler.paths import default_model_path
from llmfab.sim.reference import ReferenceModel

import tinymodel as tm

SUPPORTED = ("(supported: Q4_0, Q4_1, Q8_0, F16, F32; "
             "re-quantized: BF16, Q2_K, Q3_K, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K)")


@pytest.fixture
def tiny(tmp_path):
    return tm.write_tiny_gguf(tmp_path / "tiny.gguf")


def raises(fn, *a, **kw) -> str:
    """The message of the ModelError ``fn`` raises; checks it is one line."""
    with pytest.raises(ModelError) as e:
        fn(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ------------------------------------------------------------------ SmolLM2
def test_smollm2_description(smol):
    d = smol.desc
    assert (d.arch, d.n_layers, d.dim, d.n_heads, d.n_kv_heads, d.head_dim) == ("llama", 30, 576, 9, 3, 64)
    assert (d.ffn_dim, d.vocab_size, d.rope_base, d.rope_dim) == (1536, 49152, 100000.0, 64)
    assert d.tied_embeddings is True
    assert d.kv_dim == 192 and d.gqa_group == 3
    assert d.context_length == 8192
    assert d.rms_eps == pytest.approx(1e-5)
    assert 134e6 < d.n_params() < 136e6
    assert M.ModelDesc.from_dict(d.to_dict()) == d
    assert smol.source == "gguf" and smol.path == default_model_path()
    assert smol.warnings == []


def test_smollm2_tensors_stay_in_blocks(smol):
    d = smol.desc
    assert len(smol.tensors) == 2 + 9 * d.n_layers         # no output.weight: tied
    assert "output.weight" not in smol.tensors
    emb = smol.tensor("token_embd.weight")
    assert smol.output is emb
    assert (emb.qtype, emb.shape, emb.data.dtype, emb.data.shape) == \
        ("q8_0", (49152, 576), np.uint8, (49152, 576 // 32 * 34))
    for i in range(d.n_layers):
        for what in ("attn_norm", "ffn_norm"):
            t = smol.layer(i, what)
            assert (t.qtype, t.shape, t.data.dtype) == ("f32", (576,), np.float32)
        for what, shape in (("attn_q", (576, 576)), ("attn_k", (192, 576)), ("attn_v", (192, 576)),
                            ("attn_output", (576, 576)), ("ffn_gate", (1536, 576)),
                            ("ffn_up", (1536, 576)), ("ffn_down", (576, 1536))):
            t = smol.layer(i, what)
            assert (t.qtype, t.shape) == ("q4_1", shape), t.name
            assert t.data.shape == (shape[0], shape[1] // 32 * 20)
    assert smol.tensor("output_norm.weight").qtype == "f32"
    # the blocks are the file's bytes, and about the file's size in total
    assert 0.97 < smol.weight_bytes() / os.path.getsize(smol.path) <= 1.0


def test_smollm2_rows_dequantize(smol):
    emb = smol.tensor("token_embd.weight")
    rows = emb.rows(100, 103)
    assert rows.shape == (3, 576) and rows.dtype == np.float32
    ref = quants.dequantize(emb.data[100:103], GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(rows, ref)
    q = smol.layer(0, "attn_k")
    full = q.dequantize()
    assert full.shape == (192, 576)
    np.testing.assert_array_equal(full[5:9], q.rows(5, 9))


def test_missing_tensor_accessor(smol):
    assert raises(smol.tensor, "blk.99.attn_q.weight") == \
        f"{smol.path}: missing tensor 'blk.99.attn_q.weight'"


# ------------------------------------------------------------------ tiny GGUF
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0", "f16", "f32"])
def test_tiny_gguf_types_and_values(tmp_path, qtype):
    w = tm.tiny_weights(tied=False)
    p = tm.write_tiny_gguf(tmp_path / "t.gguf", qtype, tied=False)
    m = load_gguf(p)
    d = m.desc
    assert (d.n_layers, d.dim, d.n_heads, d.n_kv_heads, d.head_dim, d.ffn_dim, d.vocab_size) == \
        (2, 64, 4, 2, 16, 128, 256)
    assert d.tied_embeddings is False and m.output is m.tensors["output.weight"]
    assert set(m.tensors) == set(w)
    for name, values in w.items():
        t = m.tensors[name]
        assert t.shape == values.shape, name
        if values.ndim == 1:
            assert t.qtype == "f32"
            np.testing.assert_array_equal(t.dequantize(), values)
        elif qtype in ("q4_0", "q4_1", "q8_0"):
            want = "q8_0" if name == "token_embd.weight" else qtype
            assert t.qtype == want
            raw = quants.quantize(values, GGMLQuantizationType[want.upper()])
            np.testing.assert_array_equal(t.data, raw)          # the very blocks that were written
        elif qtype == "f16":
            assert t.qtype == "f16"
            np.testing.assert_array_equal(t.dequantize(), values.astype(np.float16).astype(np.float32))
        else:
            assert t.qtype == "f32"
            np.testing.assert_array_equal(t.dequantize(), values)


def test_tiny_gguf_metadata(tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "t.gguf", rope_base=5e5, rms_eps=1e-6, context_length=128,
                           n_layers=3, n_heads=8, n_kv_heads=8, name="mini")
    d = load_gguf(p).desc
    assert (d.name, d.n_layers, d.n_heads, d.n_kv_heads, d.head_dim) == ("mini", 3, 8, 8, 8)
    assert (d.rope_base, d.context_length) == (5e5, 128)
    assert d.rms_eps == pytest.approx(1e-6)


def test_tiny_gguf_runs(tiny):
    r = ReferenceModel(load_gguf(tiny))
    lg = r.forward([1, 2, 3, 250])
    assert lg.shape == (4, 256) and lg.dtype == np.float32 and np.isfinite(lg).all()


def test_tiny_gguf_is_reproducible(tmp_path):
    a = tm.write_tiny_gguf(tmp_path / "a.gguf")
    b = tm.write_tiny_gguf(tmp_path / "b.gguf")
    assert open(a, "rb").read() == open(b, "rb").read()


# ------------------------------------------------------------------ GGUF errors
def test_error_not_a_gguf(tmp_path):
    p = tmp_path / "model.txt"
    p.write_text("hello world\n")
    assert raises(load_gguf, p) == f"{p}: not a GGUF file (starts with b'hell', expected b'GGUF')"
    e = tmp_path / "empty.gguf"
    e.write_bytes(b"")
    assert raises(load_gguf, e) == f"{e}: not a GGUF file (starts with b'', expected b'GGUF')"


def test_error_no_such_file_and_directory(tmp_path):
    assert raises(load_gguf, tmp_path / "nope.gguf") == f"{tmp_path / 'nope.gguf'}: no such file"
    assert raises(load_gguf, tmp_path) == f"{tmp_path}: is a directory, not a GGUF file"
    assert raises(load_model, tmp_path / "nope.gguf") == f"{tmp_path / 'nope.gguf'}: no such file"


def _cut(src, dst, n):
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[:n])
    return dst


@pytest.mark.parametrize("n", [4, 23, 30, 1000, 3000])
def test_error_truncated_header(tiny, tmp_path, n):
    p = _cut(tiny, tmp_path / "cut.gguf", n)
    assert raises(load_gguf, p) == f"{p}: truncated GGUF file: the header ends after {n} bytes"


def test_error_truncated_data(tiny, tmp_path):
    size = os.path.getsize(tiny)
    p = _cut(tiny, tmp_path / "cut.gguf", size - 1)
    assert raises(load_gguf, p) == (f"{p}: truncated GGUF file: tensor 'output_norm.weight' ends at "
                                    f"byte {size} but the file has {size - 1} bytes")
    p = _cut(tiny, tmp_path / "cut2.gguf", 20000)
    msg = raises(load_gguf, p)
    assert msg.startswith(f"{p}: truncated GGUF file: tensor '") and \
        msg.endswith("but the file has 20000 bytes")


def test_error_truncated_real_model(tmp_path):
    """The bundled model cut in its tensor data (a sparse copy of its first 60 MB)."""
    src = default_model_path()
    p = _cut(src, tmp_path / "smol-cut.gguf", 60_000_000)
    msg = raises(load_gguf, p)
    assert msg.startswith(f"{p}: truncated GGUF file: tensor '")
    assert msg.endswith("but the file has 60000000 bytes")
    p = _cut(src, tmp_path / "smol-head.gguf", 500_000)     # inside the vocabulary
    assert raises(load_gguf, p) == f"{p}: truncated GGUF file: the header ends after 500000 bytes"


def test_error_unsupported_architecture(tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
    assert raises(load_gguf, p) == f"{p}: unsupported architecture 'qwen2' (supported: llama)"


@pytest.mark.parametrize("ttype,name", [
    ("iq4_nl", "blk.1.ffn_up.weight"),
    ("f64", "blk.0.attn_norm.weight"),
    ("i8", "blk.0.attn_q.weight"),
    ("tq2_0", "blk.1.ffn_down.weight"),
])
def test_error_unsupported_tensor_type(tmp_path, ttype, name):
    kw = {"ffn_dim": 256, "dim": 256} if ttype == "tq2_0" else {}   # TQ2_0 blocks are 256 wide
    p = tm.write_tiny_gguf(tmp_path / "u.gguf", tensor_types={name: ttype}, **kw)
    assert raises(load_gguf, p) == \
        f"{p}: unsupported tensor type {ttype.upper()} for '{name}' {SUPPORTED}"


@pytest.mark.parametrize("name", ["blk.1.ffn_up.weight", "output_norm.weight", "blk.0.attn_norm.weight"])
def test_error_missing_tensor(tmp_path, name):
    p = tm.write_tiny_gguf(tmp_path / "m.gguf", drop=[name])
    assert raises(load_gguf, p) == f"{p}: missing tensor '{name}'"


def test_error_missing_token_embd(tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "m.gguf", drop=["token_embd.weight"])
    assert raises(load_gguf, p) == f"{p}: missing tensor 'token_embd.weight'"


def test_error_missing_metadata(tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "m.gguf", metadata={"{arch}.block_count": None})
    assert raises(load_gguf, p) == f"{p}: missing metadata 'llama.block_count'"


@pytest.mark.parametrize("name,shape,want", [
    ("blk.0.attn_k.weight", (64, 64), (32, 64)),
    ("blk.1.ffn_down.weight", (64, 96), (64, 128)),
    ("output_norm.weight", (32,), (64,)),
])
def test_error_inconsistent_tensor_shape(tmp_path, name, shape, want):
    p = tm.write_tiny_gguf(tmp_path / "s.gguf", shapes={name: shape})
    assert raises(load_gguf, p) == (f"{p}: inconsistent shapes: tensor '{name}' is {list(shape)}, "
                                    f"expected {list(want)} from the metadata")


def test_error_inconsistent_head_counts(tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "h.gguf", metadata={"{arch}.attention.head_count_kv": 3})
    assert raises(load_gguf, p) == \
        f"{p}: inconsistent shapes: embedding_length 64, head_count 4, head_count_kv 3"


def test_error_inconsistent_vocab(tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "v.gguf", metadata={"{arch}.vocab_size": 300})
    assert raises(load_gguf, p) == (f"{p}: inconsistent shapes: tensor 'token_embd.weight' is "
                                    "[256, 64], expected [300, 64] from the metadata")


def test_errors_are_llmfab_errors(tmp_path):
    assert issubclass(ModelError, LlmfabError)


# ------------------------------------------------------------------ K-quants
def test_kquants_requantized_with_warning(tmp_path):
    types = {"blk.0.ffn_down.weight": "q4_k", "blk.1.ffn_down.weight": "q6_k",
             "blk.1.ffn_up.weight": "q5_0"}
    p = tm.write_tiny_gguf(tmp_path / "k.gguf", ffn_dim=256, tensor_types=types)
    with pytest.warns(UserWarning) as rec:
        m = load_gguf(p)
    msgs = [str(r.message) for r in rec]
    assert msgs == [
        "blk.0.ffn_down.weight: Q4_K is re-quantized to Q4_1 (not decoded on chip)",
        "blk.1.ffn_up.weight: Q5_0 is re-quantized to Q8_0 (not decoded on chip)",
        "blk.1.ffn_down.weight: Q6_K is re-quantized to Q8_0 (not decoded on chip)",
    ]
    assert m.warnings == msgs
    from gguf import GGUFReader
    raw = {t.name: t for t in GGUFReader(p).tensors}
    for name, target, tol in (("blk.0.ffn_down.weight", "q4_1", 0.6), ("blk.1.ffn_down.weight", "q8_0", 0.02),
                              ("blk.1.ffn_up.weight", "q8_0", 0.02)):
        t = m.tensors[name]
        want_shape = (64, 256) if "down" in name else (256, 64)
        assert (t.qtype, t.shape) == (target, want_shape)
        assert t.data.dtype == np.uint8 and t.data.shape == (want_shape[0], want_shape[1] // 32 * M.QTYPE_BLOCK[target][1])
        src = quants.dequantize(raw[name].data, raw[name].tensor_type).reshape(want_shape)
        got = t.dequantize()
        # within one step of the target type's block scale
        step = np.abs(src).reshape(want_shape[0], -1, 32).max(-1, keepdims=True) / (7.5 if target == "q4_1" else 127)
        err = np.abs(got - src).reshape(want_shape[0], -1, 32)
        assert np.all(err <= step * (1 + tol) + 1e-6), name
    # the re-quantized model runs
    assert np.isfinite(ReferenceModel(m).forward([1, 2, 3])).all()


def test_kquant_vector_becomes_f32(tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "b.gguf", tensor_types={"output_norm.weight": "bf16"})
    with pytest.warns(UserWarning, match=r"^output_norm\.weight: BF16 is re-quantized to F32 "):
        m = load_gguf(p)
    t = m.tensors["output_norm.weight"]
    assert (t.qtype, t.shape) == ("f32", (64,))


def test_no_warning_for_supported_types(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_gguf(tiny).warnings == []


# ------------------------------------------------------------------ Hugging Face
def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def hf_llama_forward(sd: dict, cfg: dict, tokens) -> np.ndarray:
    """LLaMA as Hugging Face transformers computes it (rotate-half RoPE), float64, no cache."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg["hidden_size"]
    hd = D // H
    eps = cfg["rms_norm_eps"]
    T = len(tokens)
    x = sd["model.embed_tokens.weight"][tokens]
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None]
    emb = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]

    def rot_half(a):
        return np.concatenate([-a[..., hd // 2:], a[..., :hd // 2]], -1)

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).reshape(T, H, hd)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).reshape(T, KV, hd)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).reshape(T, KV, hd)
        q = q * cos + rot_half(q) * sin
        k = k * cos + rot_half(k) * sin
        k = np.repeat(k, H // KV, axis=1)
        v = np.repeat(v, H // KV, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, H * hd)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        g = h @ sd[p + "mlp.gate_proj.weight"].T
        u = h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ sd[p + "mlp.down_proj.weight"].T
    x = _rms(x, sd["model.norm.weight"], eps)
    out = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ out.T


TOKENS = [3, 17, 200, 42, 42, 9, 128, 255, 0, 77, 31, 5]


@pytest.mark.parametrize("tied", [False, True])
def test_hf_logits_match_hf_llama(tmp_path, tied):
    """Q/K rows permuted on import: our adjacent-pair RoPE reproduces HF's rotate-half model."""
    d = tm.write_tiny_hf(tmp_path / "hf", tied=tied, rope_theta=500.0)
    m = load_hf(d)
    assert m.source == "hf" and m.desc.tied_embeddings is tied
    assert {t.qtype for t in m.tensors.values()} == {"f32"}
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    sd = tm.hf_state_dict(tied=tied)
    want = hf_llama_forward(sd, cfg, TOKENS)
    got = ReferenceModel(m, llamacpp_rounding=False).forward(TOKENS)
    assert np.abs(want).max() > 1.0                      # logits of a meaningful size
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_hf_permutation_matters(tmp_path, monkeypatch):
    """Without the permutation the logits differ: the test above is not vacuous."""
    d = tm.write_tiny_hf(tmp_path / "hf", rope_theta=500.0)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    want = hf_llama_forward(tm.hf_state_dict(), cfg, TOKENS)
    monkeypatch.setattr(M, "hf_permute", lambda w, n: w)
    got = ReferenceModel(load_hf(d), llamacpp_rounding=False).forward(TOKENS)
    assert np.abs(got - want).max() > 1e-2


def test_hf_permute_is_llamacpp_order():
    """Within a head, rows [0..d/2) and [d/2..d) interleave: 0, d/2, 1, d/2+1, ..."""
    w = np.arange(2 * 8, dtype=np.float32)[:, None]          # 2 heads of dim 8
    got = M.hf_permute(w, 2)[:, 0].astype(int).tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    np.testing.assert_array_equal(tm.hf_unpermute(M.hf_permute(w, 2), 2), w)


def test_hf_same_model_as_gguf(tmp_path):
    """An HF checkpoint and the GGUF of the same weights (Q/K in GGUF order) give the same logits."""
    w = tm.tiny_weights(tied=False)
    g = load_gguf(tm.write_tiny_gguf(tmp_path / "t.gguf", "f32", tied=False))
    h = load_hf(tm.write_tiny_hf(tmp_path / "hf"))
    for name, t in g.tensors.items():
        np.testing.assert_array_equal(h.tensors[name].dequantize(), t.dequantize(), err_msg=name)
        np.testing.assert_array_equal(t.dequantize(), w[name])


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_hf_half_precision(tmp_path, dtype):
    d = tm.write_tiny_hf(tmp_path / "hf", dtype=dtype)
    m = load_hf(d)
    sd = tm.hf_state_dict()
    e = sd["model.embed_tokens.weight"]
    got = m.tensors["token_embd.weight"].dequantize()
    if dtype == "F16":
        np.testing.assert_array_equal(got, e.astype(np.float16).astype(np.float32))
    else:
        np.testing.assert_allclose(got, e, rtol=2 ** -8, atol=0)
        assert not np.array_equal(got, e)
        assert (got.view(np.uint32) & 0xFFFF).max() == 0        # bf16: low half zero


def test_hf_quantize_option(tmp_path):
    m = load_hf(tm.write_tiny_hf(tmp_path / "hf"), quantize="q8_0")
    assert m.tensors["blk.0.attn_q.weight"].qtype == "q8_0"
    assert m.tensors["blk.0.attn_norm.weight"].qtype == "f32"
    assert raises(load_hf, tm.write_tiny_hf(tmp_path / "hf2"), quantize="q5_0") == \
        "cannot quantize to 'q5_0' (choose q4_0, q4_1 or q8_0)"


def test_load_model_dispatch(tmp_path):
    assert load_model(tm.write_tiny_hf(tmp_path / "hf")).source == "hf"
    assert load_model(tm.write_tiny_gguf(tmp_path / "t.gguf")).source == "gguf"


def test_hf_error_no_config(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf")
    os.remove(os.path.join(d, "config.json"))
    assert raises(load_hf, d) == f"{d}: not a Hugging Face checkpoint (no config.json)"
    assert raises(load_model, d) == f"{d}: not a Hugging Face checkpoint (no config.json)"


def test_hf_error_malformed_config(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf")
    cfg = os.path.join(d, "config.json")
    with open(cfg, "w") as f:
        f.write("{\"hidden_size\": 64,\n")
    assert raises(load_hf, d) == f"{cfg}: malformed JSON (Expecting property name enclosed in double quotes at line 2)"


def test_hf_error_unsupported_architecture(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf", config={"architectures": ["MistralForCausalLM"],
                                                  "model_type": "mistral"})
    assert raises(load_hf, d) == \
        f"{d}: unsupported architecture 'MistralForCausalLM' (supported: LlamaForCausalLM)"


def test_hf_error_missing_field(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf", config={"intermediate_size": None})
    assert raises(load_hf, d) == f"{os.path.join(d, 'config.json')}: missing field 'intermediate_size'"


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight",
                                  "model.embed_tokens.weight"])
def test_hf_error_missing_tensor(tmp_path, name):
    d = tm.write_tiny_hf(tmp_path / "hf", drop=[name])
    assert raises(load_hf, d) == f"{d}: missing tensor '{name}'"


def test_hf_error_inconsistent_shape(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf", shapes={"model.layers.0.self_attn.k_proj.weight": (64, 64)})
    assert raises(load_hf, d) == (f"{d}: inconsistent shapes: tensor 'model.layers.0.self_attn.k_proj.weight' "
                                  "is [64, 64], expected [32, 64] from config.json")


def test_hf_error_inconsistent_heads(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf", config={"num_key_value_heads": 3})
    assert raises(load_hf, d) == \
        f"{d}: inconsistent shapes: hidden_size 64, num_attention_heads 4, num_key_value_heads 3"


def test_hf_error_no_safetensors(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf")
    os.remove(os.path.join(d, "model.safetensors"))
    assert raises(load_hf, d) == f"{d}: no .safetensors files"


def test_hf_error_unsupported_dtype(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf")
    st = os.path.join(d, "model.safetensors")
    from safetensors.numpy import save_file
    save_file({"model.embed_tokens.weight": np.zeros((256, 64), np.int8)}, st)
    assert raises(load_hf, d) == (f"{st}: unsupported tensor type I8 for 'model.embed_tokens.weight' "
                                  "(supported: F32, F16, BF16)")


def test_hf_error_truncated_safetensors(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf")
    st = os.path.join(d, "model.safetensors")
    with open(st, "rb") as f:
        data = f.read()
    with open(st, "wb") as f:
        f.write(data[:-100])
    msg = raises(load_hf, d)
    assert msg.startswith(f"{st}: truncated safetensors file: tensor '") and msg.endswith("' ends past the end")
    with open(st, "wb") as f:
        f.write(data[:4])
    assert raises(load_hf, d) == f"{st}: truncated safetensors file"


def test_hf_reads_safetensors_numpy_files(tmp_path):
    """Files written by the safetensors package itself (not only by the test helper)."""
    from safetensors.numpy import save_file
    d = tm.write_tiny_hf(tmp_path / "hf")
    sd = tm.hf_state_dict()
    save_file({k: v for k, v in sd.items()}, os.path.join(d, "model.safetensors"))
    m = load_hf(d)
    np.testing.assert_array_equal(m.tensors["blk.1.ffn_down.weight"].dequantize(),
                                  sd["model.layers.1.mlp.down_proj.weight"])


# ------------------------------------------------------------------ malformed metadata (issue 9, item 5)
@pytest.mark.parametrize("key,value,shown", [
    ("block_count", "abc", "'abc'"),
    ("block_count", 0, "0"),
    ("block_count", np.int32(-1), "-1"),
    ("block_count", 2.0, "2.0"),
    ("block_count", True, "True"),
    ("attention.head_count", 0, "0"),
    ("attention.head_count_kv", "2", "'2'"),
    ("embedding_length", [64], "[64]"),
    ("feed_forward_length", np.int32(-128), "-128"),
    ("context_length", 0, "0"),
    ("vocab_size", 0, "0"),
    ("rope.dimension_count", 0, "0"),
])
def test_error_metadata_not_a_positive_integer(tmp_path, key, value, shown):
    p = tm.write_tiny_gguf(tmp_path / "m.gguf", metadata={"{arch}." + key: value})
    assert raises(load_gguf, p) == f"{p}: llama.{key} must be a positive integer, not {shown}"


@pytest.mark.parametrize("key,value,shown", [
    ("attention.layer_norm_rms_epsilon", -1e-5, "-9.999999747378752e-06"),   # as FLOAT32
    ("attention.layer_norm_rms_epsilon", np.float64(-1e-5), "-1e-05"),
    ("attention.layer_norm_rms_epsilon", float("nan"), "nan"),
])
def test_error_metadata_not_a_positive_number(tmp_path, key, value, shown):
    p = tm.write_tiny_gguf(tmp_path / "m.gguf", metadata={"{arch}." + key: value})
    assert raises(load_gguf, p) == f"{p}: llama.{key} must be a positive finite number, not {shown}"


@pytest.mark.parametrize("value,shown", [
    (-10000.0, "-10000.0"), (0.0, "0.0"), (float("inf"), "inf"), ("1e4", "'1e4'"),
    (np.float64(1e-300), "1e-300"),      # finite, but its frequencies overflow: inf logits
])
def test_error_rope_freq_base(tmp_path, value, shown):
    p = tm.write_tiny_gguf(tmp_path / "m.gguf", metadata={"{arch}.rope.freq_base": value})
    assert raises(load_gguf, p) == \
        f"{p}: llama.rope.freq_base must be a finite number of at least 1, not {shown}"


def test_error_layer_tensors_beyond_block_count(tmp_path):
    """block_count 1 with two layers of tensors: the second layer would be ignored silently."""
    p = tm.write_tiny_gguf(tmp_path / "b.gguf", metadata={"{arch}.block_count": 1})
    assert raises(load_gguf, p) == \
        f"{p}: tensor 'blk.1.attn_norm.weight' is beyond llama.block_count 1 (layers 0 to 0)"
    p = tm.write_tiny_gguf(tmp_path / "b0.gguf", metadata={"{arch}.block_count": 0})
    assert raises(load_gguf, p) == f"{p}: llama.block_count must be a positive integer, not 0"


def test_error_metadata_name_and_rope_scaling(tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "n.gguf", metadata={"general.name": 7})
    assert raises(load_gguf, p) == f"{p}: general.name must be a string, not 7"
    p = tm.write_tiny_gguf(tmp_path / "r.gguf", metadata={"{arch}.rope.scaling.type": "linear"})
    assert raises(load_gguf, p) == f"{p}: unsupported llama.rope.scaling.type 'linear' (supported: none)"
    m = load_gguf(tm.write_tiny_gguf(tmp_path / "ok.gguf",
                                     metadata={"{arch}.rope.scaling.type": "none"}))
    assert m.desc.rope_base == 10000.0


def _poisoned(n_layers=2, bad=float("nan"), where=("blk.1.ffn_up.weight", 3, 5)):
    w = tm.tiny_weights(n_layers)
    name, r, c = where
    w[name] = w[name].copy()
    w[name][(r, c) if w[name].ndim == 2 else (r,)] = bad
    return w


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # gguf.quants quantizing NaN
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0", "f16", "f32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_error_nan_weights(tmp_path, qtype, bad):
    p = tm.write_tiny_gguf(tmp_path / "nan.gguf", qtype, weights=_poisoned(bad=bad))
    what = "values" if qtype in ("f16", "f32") else "block scales"
    assert raises(load_gguf, p) == f"{p}: tensor 'blk.1.ffn_up.weight' holds NaN or infinite {what}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_error_nan_norm_and_embedding(tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "n.gguf", weights=_poisoned(where=("blk.0.ffn_norm.weight", 7, 0)))
    assert raises(load_gguf, p) == f"{p}: tensor 'blk.0.ffn_norm.weight' holds NaN or infinite values"
    p = tm.write_tiny_gguf(tmp_path / "e.gguf", weights=_poisoned(where=("token_embd.weight", 255, 63)))
    assert raises(load_gguf, p) == f"{p}: tensor 'token_embd.weight' holds NaN or infinite block scales"


def test_error_nan_scale_in_raw_blocks(tmp_path):
    """A Q4_1 block whose min (m, the second f16) is NaN, its d still fine."""
    p = tm.write_tiny_gguf(tmp_path / "ok.gguf")
    m = load_gguf(p)
    t = m.tensors["blk.0.attn_v.weight"]
    with open(p, "rb") as f:
        data = bytearray(f.read())
    blob = t.data.tobytes()
    at = bytes(data).index(blob)
    data[at + 20 * 5 + 2:at + 20 * 5 + 4] = np.float16(np.nan).tobytes()    # block 5: m
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    assert raises(load_gguf, bad) == f"{bad}: tensor 'blk.0.attn_v.weight' holds NaN or infinite block scales"


def test_error_nan_in_kquant(tmp_path):
    from gguf import GGML_QUANT_SIZES
    p = tm.write_tiny_gguf(tmp_path / "k.gguf", tensor_types={"blk.0.ffn_gate.weight": "q6_k"},
                           dim=256, ffn_dim=256)
    data = bytearray(open(p, "rb").read())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from gguf import GGUFReader
        t = {t.name: t for t in GGUFReader(p).tensors}["blk.0.ffn_gate.weight"]
    off = int(t.data_offset)
    bb = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K][1]
    data[off + bb - 2:off + bb] = np.float16(np.inf).tobytes()       # Q6_K: d is the last field
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert raises(load_gguf, bad) == \
            f"{bad}: tensor 'blk.0.ffn_gate.weight' holds NaN or infinite values"


def test_error_not_a_regular_file(tmp_path):
    msg = "/dev/zero: not a regular file (a character device); expected a GGUF file"
    assert raises(load_gguf, "/dev/zero") == msg
    assert raises(load_model, "/dev/zero") == msg
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    assert raises(load_model, fifo) == f"{fifo}: not a regular file (a FIFO); expected a GGUF file"


def test_hf_error_not_a_regular_file(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf")
    cfg = os.path.join(d, "config.json")
    os.remove(cfg)
    os.mkfifo(cfg)
    assert raises(load_hf, d) == f"{cfg}: not a regular file (a FIFO); expected a JSON file"
    os.remove(cfg)
    os.mkdir(cfg)
    assert raises(load_hf, d) == f"{cfg}: is a directory, not a JSON file"
    d2 = tm.write_tiny_hf(tmp_path / "hf2")
    st = os.path.join(d2, "model.safetensors")
    os.remove(st)
    os.mkfifo(st)
    assert raises(load_hf, d2) == f"{st}: not a regular file (a FIFO); expected a safetensors file"


def _write_cfg(d, cfg):
    cfg_path = os.path.join(d, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return cfg_path


def test_hf_error_config_not_an_object(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf")
    cfg = _write_cfg(d, [{"hidden_size": 64}])
    assert raises(load_hf, d) == f"{cfg}: expected a JSON object of fields, not a list"
    cfg = _write_cfg(d, "llama")
    assert raises(load_hf, d) == f"{cfg}: expected a JSON object of fields, not a str"
    assert raises(load_model, d) == f"{cfg}: expected a JSON object of fields, not a str"


@pytest.mark.parametrize("key,value,shown", [
    ("num_attention_heads", 0, "0"),
    ("num_hidden_layers", -1, "-1"),
    ("num_hidden_layers", 0, "0"),
    ("hidden_size", "64", "'64'"),
    ("intermediate_size", 128.0, "128.0"),
    ("vocab_size", None, None),
    ("num_key_value_heads", 0, "0"),
    ("max_position_embeddings", -256, "-256"),
    ("head_dim", 0, "0"),
    ("num_hidden_layers", True, "True"),
])
def test_hf_error_not_a_positive_integer(tmp_path, key, value, shown):
    d = tm.write_tiny_hf(tmp_path / "hf", config={key: value})
    cfg = os.path.join(d, "config.json")
    if value is None:
        assert raises(load_hf, d) == f"{cfg}: missing field '{key}'"
    else:
        assert raises(load_hf, d) == f"{cfg}: {key} must be a positive integer, not {shown}"


@pytest.mark.parametrize("key,value,shown", [
    ("rms_norm_eps", -1e-5, "-1e-05"),
    ("rms_norm_eps", float("nan"), "nan"),
    ("rms_norm_eps", "1e-5", "'1e-5'"),
])
def test_hf_error_not_a_positive_number(tmp_path, key, value, shown):
    d = tm.write_tiny_hf(tmp_path / "hf", config={key: value})
    cfg = os.path.join(d, "config.json")
    assert raises(load_hf, d) == f"{cfg}: {key} must be a positive finite number, not {shown}"


@pytest.mark.parametrize("value,shown", [(-10000.0, "-10000.0"), (0, "0"), (1e-300, "1e-300")])
def test_hf_error_rope_theta(tmp_path, value, shown):
    d = tm.write_tiny_hf(tmp_path / "hf", config={"rope_theta": value})
    cfg = os.path.join(d, "config.json")
    assert raises(load_hf, d) == f"{cfg}: rope_theta must be a finite number of at least 1, not {shown}"


def test_hf_error_other_fields(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf", config={"tie_word_embeddings": "yes"})
    cfg = os.path.join(d, "config.json")
    assert raises(load_hf, d) == f"{cfg}: tie_word_embeddings must be true or false, not 'yes'"
    d = tm.write_tiny_hf(tmp_path / "hf2", config={"architectures": "LlamaForCausalLM"})
    cfg = os.path.join(d, "config.json")
    assert raises(load_hf, d) == \
        f"{cfg}: architectures must be a list of strings, not 'LlamaForCausalLM'"
    d = tm.write_tiny_hf(tmp_path / "hf3", config={"_name_or_path": ["x"]})
    cfg = os.path.join(d, "config.json")
    assert raises(load_hf, d) == f"{cfg}: _name_or_path must be a string, not ['x']"


def test_hf_error_layer_tensors_beyond_num_hidden_layers(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf", config={"num_hidden_layers": 1})
    assert raises(load_hf, d) == (f"{d}: tensor 'model.layers.1.input_layernorm.weight' is beyond "
                                  "num_hidden_layers 1 (layers 0 to 0)")


def test_hf_error_nan_weights(tmp_path):
    sd = tm.hf_state_dict()
    sd["model.layers.0.mlp.gate_proj.weight"][4, 2] = np.nan
    d = tm.write_tiny_hf(tmp_path / "hf", state=sd)
    st = os.path.join(d, "model.safetensors")
    assert raises(load_hf, d) == \
        f"{st}: tensor 'model.layers.0.mlp.gate_proj.weight' holds NaN or infinite values"
    sd = tm.hf_state_dict()
    sd["model.norm.weight"][0] = np.inf
    d = tm.write_tiny_hf(tmp_path / "hf2", state=sd, dtype="BF16")
    st = os.path.join(d, "model.safetensors")
    assert raises(load_hf, d) == f"{st}: tensor 'model.norm.weight' holds NaN or infinite values"


def _raw_safetensors(path, header, data=b"\0" * 64):
    import struct
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("header,want", [
    ([{"dtype": "F32"}], "not a safetensors file (header is a JSON list, expected an object)"),
    ("x", "not a safetensors file (header is a JSON str, expected an object)"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}},
     "tensor 'w': data_offsets [16, 0] are reversed (end before begin)"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},
     "tensor 'w': data_offsets [0, 8] span 8 bytes but shape [4] of F32 needs 16"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}},
     "tensor 'w': data_offsets must be two non-negative integers [begin, end], not [0]"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}},
     "tensor 'w': data_offsets must be two non-negative integers [begin, end], not [-16, 0]"),
    ({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}},
     "tensor 'w': shape must be a list of non-negative integers, not '4'"),
    ({"w": {"dtype": 5, "shape": [4], "data_offsets": [0, 16]}},
     "tensor 'w': dtype must be a string, not 5"),
    ({"w": [0, 16]}, "tensor 'w': header entry must be a JSON object, not [0, 16]"),
])
def test_hf_error_malformed_safetensors_header(tmp_path, header, want):
    d = tm.write_tiny_hf(tmp_path / "hf")
    st = os.path.join(d, "model.safetensors")
    _raw_safetensors(st, header)
    assert raises(load_hf, d) == f"{st}: {want}"


# ------------------------------------------------------------------ the CLI: one line, exit 1
@pytest.mark.parametrize("make,want", [
    (lambda tmp: "/dev/zero", "/dev/zero: not a regular file (a character device); expected a GGUF file"),
    (lambda tmp: tm.write_tiny_gguf(tmp / "s.gguf", metadata={"{arch}.block_count": "abc"}),
     "{p}: llama.block_count must be a positive integer, not 'abc'"),
    (lambda tmp: tm.write_tiny_gguf(tmp / "r.gguf", metadata={"{arch}.rope.freq_base": -1.0}),
     "{p}: llama.rope.freq_base must be a finite number of at least 1, not -1.0"),
    (lambda tmp: tm.write_tiny_hf(tmp / "hf", config={"num_attention_heads": 0}),
     "{p}/config.json: num_attention_heads must be a positive integer, not 0"),
])
def test_cli_malformed_model_is_one_line(tmp_path, capsys, make, want):
    from llmfab.host.cli import main
    p = make(tmp_path)
    rc = main(["logits", "--model", str(p), "--tokens", "1,2", "--out", str(tmp_path / "l.npy")])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err == f"llmfab: error: {want.format(p=p)}\n"
    assert not (tmp_path / "l.npy").exists()


def test_cli_tokenize_dev_zero(capsys):
    from llmfab.host.cli import main
    assert main(["tokenize", "--model", "/dev/zero", "abc"]) == 1
    assert capsys.readouterr().err == \
        "llmfab: error: /dev/zero: not a regular file (a character device); expected a GGUF file\n"


@pytest.mark.parametrize("n", [3, 4_000_000_000])
def test_error_block_count_beyond_the_layers_present(tmp_path, n):
    """A layer count above the file's layers names the count (and 4e9 fails at once)."""
    p = tm.write_tiny_gguf(tmp_path / "b.gguf", metadata={"{arch}.block_count": n})
    assert raises(load_gguf, p) == (f"{p}: missing tensor 'blk.2.attn_norm.weight' "
                                    f"(llama.block_count is {n} but the file has layers 0 to 1)")


@pytest.mark.parametrize("n", [3, 10**12])
def test_hf_error_num_hidden_layers_beyond_the_layers_present(tmp_path, n):
    d = tm.write_tiny_hf(tmp_path / "hf", config={"num_hidden_layers": n})
    assert raises(load_hf, d) == (f"{d}: missing tensor 'model.layers.2.input_layernorm.weight' "
                                  f"(num_hidden_layers is {n} but the file has layers 0 to 1)")


def test_hf_error_safetensors_overlap_and_duplicates(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf")
    st = os.path.join(d, "model.safetensors")
    _raw_safetensors(st, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                          "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})
    assert raises(load_hf, d) == f"{st}: tensor 'b': data_offsets [8, 24] overlap tensor 'a' [0, 16]"
    d = tm.write_tiny_hf(tmp_path / "hf2")
    sd = tm.hf_state_dict()
    second = tm.write_safetensors(os.path.join(d, "shard2.safetensors"),
                                  {"model.norm.weight": sd["model.norm.weight"]})
    assert raises(load_hf, d) == \
        f"{second}: tensor 'model.norm.weight' is also in {os.path.join(d, 'model.safetensors')}"


def test_error_odd_head_dim(tmp_path):
    """RoPE rotates pairs: an odd head dim was a numpy broadcast/reshape traceback."""
    p = tm.write_tiny_gguf(tmp_path / "o.gguf", "f32", dim=60, n_heads=4, n_kv_heads=2)
    assert raises(load_gguf, p) == (f"{p}: unsupported head dim 15 (llama.embedding_length 60 / "
                                    "llama.attention.head_count 4): RoPE needs an even head dim")
    d = tm.write_tiny_hf(tmp_path / "hf", config={"hidden_size": 60})   # the check comes first
    cfg = os.path.join(d, "config.json")
    assert raises(load_hf, d) == (f"{cfg}: unsupported head dim 15 (hidden_size 60 / "
                                  "num_attention_heads 4): RoPE needs an even head dim")
    d = tm.write_tiny_hf(tmp_path / "hf2", config={"head_dim": 15})
    cfg = os.path.join(d, "config.json")
    assert raises(load_hf, d) == f"{cfg}: unsupported head dim 15 (head_dim 15): RoPE needs an even head dim"


def test_hf_error_config_too_large(tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf")
    cfg = os.path.join(d, "config.json")
    with open(cfg, "r+b") as f:
        f.truncate(1 << 40)                  # sparse: 1 TiB of nothing, never read
    assert raises(load_hf, d) == f"{cfg}: {1 << 40} bytes is too large for a config.json (at most {16 << 20})"


@pytest.mark.parametrize("extra", ["blk.0.attn_q.bias", "rope_freqs.weight", "blk.1.ffn_gate_inp.weight"])
def test_error_unexpected_tensor(tmp_path, extra):
    """A tensor the importer does not read (bias, RoPE scaling factors, MoE router) would be
    dropped silently, and the model would compute something else."""
    w = tm.tiny_weights()
    w[extra] = np.ones(64 if extra != "blk.1.ffn_gate_inp.weight" else (8, 64), np.float32)
    p = tm.write_tiny_gguf(tmp_path / "x.gguf", "f32", weights=w)
    assert raises(load_gguf, p) == \
        f"{p}: unexpected tensor '{extra}' (not part of a llama model: it would be ignored)"


def test_hf_error_unexpected_tensor(tmp_path):
    sd = tm.hf_state_dict()
    sd["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    d = tm.write_tiny_hf(tmp_path / "hf", state=sd)
    st = os.path.join(d, "model.safetensors")
    assert raises(load_hf, d) == (f"{st}: unexpected tensor 'model.layers.0.self_attn.q_proj.bias' "
                                  "(not part of a LLaMA model: it would be ignored)")
    sd = tm.hf_state_dict()
    sd["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)   # old checkpoints
    m = load_hf(tm.write_tiny_hf(tmp_path / "hf2", state=sd))
    assert len(m.tensors) == 2 + 1 + 9 * 2
