"""Tokenizer: ids identical to llama.cpp's (tests/data/tokenizer_ref.json), chat
template, errors. The reference data is made by scripts/make_llamacpp_reference.py
(see docs/reference-data.md)."""

import hashlib
import json
import os
import time

import numpy as np
import pytest

from llmfab.core.errors import ModelError, TokenizerError
from llmfab.compiler.paths import default_model_path
from llmfab.compiler.tokenizer import Tokenizer, read_gguf_metadata

DATA = os.path.join(os.path.dirname(__file__), "data")
with open(os.path.join(DATA, "tokenizer_ref.json"), encoding="utf-8") as _f:
    REF = json.load(_f)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def model_path():
    return default_model_path()


@pytest.fixture(scope="module")
def metadata(model_path):
    return read_gguf_metadata(model_path, prefix="tokenizer.")


@pytest.fixture(scope="module")
def tok(model_path):
    return Tokenizer.from_gguf(model_path)


# ------------------------------------------------------------- llama.cpp ids
def test_reference_is_for_the_bundled_model(model_path):
    h = hashlib.sha256()
    with open(model_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    assert REF["model_sha256"] == h.hexdigest()
    assert len(REF["cases"]) >= 40


@pytest.mark.parametrize("case", REF["cases"], ids=lambda c: repr(c["text"][:30]))
def test_ids_match_llamacpp(tok, case):
    assert tok.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", REF["cases"], ids=lambda c: repr(c["text"][:30]))
def test_decode_roundtrip(tok, case):
    assert tok.decode(tok.encode(case["text"])) == case["text"]


def test_fuzz_ids_match_llamacpp(tok):
    bad = [(c["text"], tok.encode(c["text"]), c["ids"]) for c in REF["fuzz"]
           if tok.encode(c["text"]) != c["ids"]]
    assert bad == []
    assert len(REF["fuzz"]) >= 100


def test_fuzz_decode_roundtrip(tok):
    bad = [c["text"] for c in REF["fuzz"] if tok.decode(tok.encode(c["text"])) != c["text"]]
    assert bad == []


@pytest.mark.parametrize("pre", sorted(REF["variants"]))
def test_other_pre_tokenizers_match_llamacpp(metadata, pre):
    """The same vocabulary under other tokenizer.ggml.pre values, tokenized by llama.cpp."""
    t = Tokenizer.from_gguf(dict(metadata, **{"tokenizer.ggml.pre": pre}))
    bad = [(c["text"], t.encode(c["text"], add_bos=False), c["ids"]) for c in REF["variants"][pre]
           if t.encode(c["text"], add_bos=False) != c["ids"]]
    assert bad == []


def test_variants_differ_from_smollm():
    """The variant checks are not vacuous: those pre-tokenizers split differently."""
    main = {c["text"]: c["ids"] for c in REF["cases"] + REF["fuzz"]}
    for pre in ("llama-bpe", "default", "qwen2"):
        assert sum(c["ids"] != main[c["text"]] for c in REF["variants"][pre]) > 0, pre


def test_logits_and_greedy_reference_tokens(tok):
    """The texts of the other reference files tokenize to llama.cpp's ids too."""
    z = np.load(os.path.join(DATA, "llamacpp_logits.npz"))
    for i, text in enumerate(z["texts"]):
        assert tok.encode(str(text)) == z[f"text_{i}_tokens"].tolist()
    with open(os.path.join(DATA, "llamacpp_greedy.json"), encoding="utf-8") as f:
        greedy = json.load(f)
    for case in greedy["cases"]:
        assert tok.encode(case["prompt"]) == case["prompt_ids"]
        assert tok.decode(case["generated_ids"]) == case["generated_text"]


def test_reference_files_are_small():
    total = sum(os.path.getsize(os.path.join(DATA, f))
                for f in ("tokenizer_ref.json", "llamacpp_logits.npz", "llamacpp_greedy.json"))
    assert total < 1_000_000


# ------------------------------------------------------------ API, properties
def test_properties(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_id == 1 and tok.eos_id == 2
    assert tok.eot_ids == (0, 2)  # <|endoftext|>, <|im_end|> (= eos)
    assert tok.add_bos is False
    assert tok.pre == "smollm"


def test_add_bos(tok):
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.encode("Hello world", add_bos=True) == [1, 19556, 905]
    assert tok.encode("", add_bos=True) == [1]


def test_special_tokens_in_text(tok):
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.encode("<|endoftext|>") == [0]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>\n") == [1, 4093, 198, 26843, 2, 198]


def test_token_to_piece(tok):
    assert tok.token_to_piece(905) == " world"
    assert tok.token_to_piece(1) == "<|im_start|>"
    assert tok.token_to_piece(1, special=False) == ""
    assert tok.decode([1, 4093, 198, 26843, 2], special=False) == "user\nHi"
    # a token holding part of a UTF-8 character: bytes join, pieces do not
    ids = tok.encode("😀")
    assert len(ids) > 1
    assert b"".join(tok.token_to_bytes(i) for i in ids) == "😀".encode()
    assert tok.decode(ids) == "😀"
    with pytest.raises(TokenizerError, match=r"^token id 49152 is outside the vocabulary \(0\.\.49151\)$"):
        tok.token_to_piece(49152)


def test_build_from_path_and_reader(model_path):
    # speed is a benchmark figure, not a test bar (timed tests flake on shared machines)
    print(f"from_gguf: {min(_timed(Tokenizer.from_gguf, model_path) for _ in range(2)):.2f} s")
    from gguf import GGUFReader

    t = Tokenizer.from_gguf(GGUFReader(model_path))
    for c in REF["cases"]:
        assert t.encode(c["text"]) == c["ids"]
    assert (t.bos_id, t.eos_id, t.eot_ids, t.add_bos) == (1, 2, (0, 2), False)


def _timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# -------------------------------------------------------------- chat template
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]
CHAT_TEXT = ("<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
             "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
             "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
             "<|im_start|>assistant\n")


def test_chat_template(tok):
    assert tok.apply_chat_template(CHAT) == CHAT_TEXT
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == CHAT_TEXT[:-len("<|im_start|>assistant\n")]
    # the same as rendering the GGUF's jinja template
    assert tok.render_jinja(CHAT) == CHAT_TEXT
    # and llama.cpp tokenizes it as we do (it is one of the reference strings)
    case = next(c for c in REF["cases"] if c["text"] == CHAT_TEXT)
    assert tok.encode(tok.apply_chat_template(CHAT)) == case["ids"]


def test_chat_template_with_system(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs) == want
    assert tok.render_jinja(msgs) == want
    assert tok.apply_chat_template([]) == "<|im_start|>assistant\n"


def test_chat_template_jinja_for_other_templates(metadata):
    tpl = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n"
           "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
    t = Tokenizer.from_gguf(dict(metadata, **{"tokenizer.chat_template": tpl}))
    assert t.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<|im_start|>[USER] Hi\n[ASSISTANT]"
    bad = dict(metadata, **{"tokenizer.chat_template": "{{ raise_exception('no system role') }}"})
    with pytest.raises(TokenizerError, match=r"^chat template: no system role$"):
        Tokenizer.from_gguf(bad).apply_chat_template([{"role": "user", "content": "Hi"}])


def test_chat_template_missing(metadata):
    md = {k: v for k, v in metadata.items() if k != "tokenizer.chat_template"}
    t = Tokenizer.from_gguf(md)  # ChatML tokens present: plain ChatML
    assert t.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TokenizerError, match=r"^chat message 0 is not a mapping with 'role' and 'content'$"):
        t.apply_chat_template([{"content": "Hi"}])


# ------------------------------------------------------------ small fake GGUFs
def _byte_chars():
    from llmfab.compiler.tokenizer import _bytes_to_unicode

    return [_bytes_to_unicode()[b] for b in range(256)]


def write_gguf(path, *, model="gpt2", pre="gpt-2", tokens=None, merges=None, types=None,
               drop=(), extra=None):
    """A tensor-less GGUF with a tiny byte-level vocabulary."""
    import gguf

    chars = _byte_chars()
    if tokens is None:
        tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"] + chars + ["he", "ll", "hell", "hello"]
        types = [3, 3, 3, 4] + [1] * (len(tokens) - 4)
        merges = ["h e", "l l", "he ll", "hell o"]
    w = gguf.GGUFWriter(str(path), arch="llama")
    if "model" not in drop:
        w.add_tokenizer_model(model)
    if "pre" not in drop:
        w.add_tokenizer_pre(pre)
    if "tokens" not in drop:
        w.add_token_list(tokens)
    if "merges" not in drop:
        w.add_token_merges(merges)
    if types is not None and "types" not in drop:
        w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def test_fake_gguf_works(tmp_path):
    t = Tokenizer.from_gguf(write_gguf(tmp_path / "ok.gguf"))
    hello = t.encode("hello")
    assert hello == [t.tokens.index("hello")]
    ids = t.encode("<|im_start|>hello<tool>x<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 3 in ids
    assert t.decode(ids) == "<|im_start|>hello<tool>x<|im_end|>"
    # user-defined tokens are text, control tokens are not
    assert t.decode(ids, special=False) == "hello<tool>x"
    assert t.eot_ids == (0, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(model="llama"), "unsupported tokenizer.ggml.model 'llama' (only 'gpt2', byte-level BPE, is supported)"),
    (dict(model="bert"), "unsupported tokenizer.ggml.model 'bert' (only 'gpt2', byte-level BPE, is supported)"),
    (dict(drop=("model",)), "the model has no tokenizer: metadata key tokenizer.ggml.model is missing"),
    (dict(drop=("tokens",)), "metadata key tokenizer.ggml.tokens is missing (needed by tokenizer.ggml.model 'gpt2')"),
    (dict(drop=("merges",)), "metadata key tokenizer.ggml.merges is missing (needed by tokenizer.ggml.model 'gpt2')"),
])
def test_errors(tmp_path, kwargs, message):
    path = write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_gguf(path)
    assert str(e.value) == message
    from gguf import GGUFReader

    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_gguf(GGUFReader(str(path)))
    assert str(e.value) == message


def test_unsupported_pre(tmp_path):
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_gguf(write_gguf(tmp_path / "pre.gguf", pre="kimi-k2"))
    msg = str(e.value)
    assert msg.startswith("unsupported tokenizer.ggml.pre 'kimi-k2' (supported: ")
    assert "smollm" in msg and "llama-bpe" in msg and "gpt-2" in msg and "default" in msg
    assert "\n" not in msg


def test_missing_pre_is_default(tmp_path):
    """llama.cpp treats a missing tokenizer.ggml.pre as 'default' (with a warning)."""
    t = Tokenizer.from_gguf(write_gguf(tmp_path / "nopre.gguf", drop=("pre",)))
    assert t.pre == "" and t.family == "default"


def test_bad_merge_and_types(tmp_path):
    chars = _byte_chars()
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_gguf(write_gguf(tmp_path / "m.gguf", tokens=chars, merges=["ab"]))
    assert str(e.value) == "tokenizer.ggml.merges[0] 'ab' is not two tokens separated by a space"
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", tokens=chars, merges=["a b"], types=[1, 1]))
    assert str(e.value) == "tokenizer.ggml.token_type has 2 entries, tokenizer.ggml.tokens 256"


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ModelError) as e:
        Tokenizer.from_gguf(p)
    assert str(e.value) == f"{p} is not a GGUF file (bad magic b'NOPE')"
    with pytest.raises(ModelError) as e:
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    assert str(e.value) == f"{tmp_path / 'missing.gguf'}: no such file"
    with pytest.raises(ModelError) as e:
        Tokenizer.from_gguf("/dev/zero")
    assert str(e.value) == "/dev/zero: not a regular file (a character device); expected a GGUF file"
    good = write_gguf(tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:200])
    with pytest.raises(ModelError) as e:
        Tokenizer.from_gguf(tmp_path / "cut.gguf")
    assert str(e.value) == f"{tmp_path / 'cut.gguf'}: GGUF header is truncated or corrupt"
