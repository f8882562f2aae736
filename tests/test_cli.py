"""The ``llmfab`` command line: in-process through ``host.cli.main(argv)`` (with
capsys), and once through the installed entry point. Errors: one line on stderr,
no traceback, non-zero exit."""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llmfab.boards.board import board_names
from llmfab.compiler.paths import default_model_path
from llmfab.compiler.tokenizer import Tokenizer
from llmfab.host import cli
from llmfab.host.runtime import Device

import tinymodel as tm

PROMPT = "The capital of France is"


def run(capsys, *argv):
    """(exit status, stdout, stderr) of ``llmfab argv...`` run in this process."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, out, err, message=None):
    assert rc == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llmfab: error: ")
    assert "Traceback" not in err
    if message is not None:
        assert lines[0] == "llmfab: error: " + message
    return lines[0]


# ------------------------------------------------------------------ boards, configs
def test_boards_lists_every_board(capsys):
    rc, out, err = run(capsys, "boards")
    assert rc == 0 and err == ""
    names = board_names()
    assert {"u280", "u55c", "u250", "v80", "vhk158"} <= set(names)
    listed = [line.split()[0] for line in out.splitlines()[2:]]
    assert listed == sorted(names)
    assert "DSP" in out.splitlines()[0] and "GB/s" in out.splitlines()[0]


def test_boards_json(capsys):
    rc, out, _ = run(capsys, "boards", "--json")
    assert rc == 0
    assert len(json.loads(out)) == len(board_names())


def test_configs(capsys):
    rc, out, _ = run(capsys, "configs")
    assert rc == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert {"ci", "u280", "u55c", "u250", "v80", "vhk158"} <= set(names)


# ------------------------------------------------------------------ generate
def test_generate_paris(capsys):
    rc, out, err = run(capsys, "generate", "--prompt", PROMPT, "--max-tokens", 8, "--backend", "reference")
    assert rc == 0, err
    assert out.startswith(PROMPT + " Paris"), out


def test_generate_json(capsys):
    rc, out, err = run(capsys, "generate", "--prompt", PROMPT, "--max-tokens", 4, "--backend", "reference",
                       "--json")
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1
    obj = json.loads(out)
    assert {"text", "tokens", "backend", "tokens_per_s"} <= set(obj)
    assert obj["backend"] == "reference"
    assert obj["stop"] == "length"
    assert obj["text"].startswith(" Paris")
    assert len(obj["tokens"]) == 4 and all(isinstance(t, int) for t in obj["tokens"])
    assert isinstance(obj["tokens_per_s"], (int, float)) and obj["tokens_per_s"] > 0
    tok = Tokenizer.from_gguf(default_model_path())
    assert tok.decode(obj["tokens"]) == obj["text"]
    assert obj["prompt_tokens"] == tok.encode(PROMPT)


def test_generate_chat(capsys):
    rc, out, err = run(capsys, "generate", "--prompt", "What is 2 + 2?", "--chat", "--max-tokens", 24,
                       "--json")
    assert rc == 0, err
    obj = json.loads(out)
    assert "4" in obj["text"]
    # generation stops at the end-of-turn token (<|im_end|> = 2), which the text leaves out
    # (llama.cpp's reply is "The answer is 4.<|im_end|>"; its second step is a 0.1-logit
    # near-tie, so a longer reply is possible here too)
    assert "<|im_end|>" not in obj["text"]
    assert obj["tokens"][-1] == 2 or len(obj["tokens"]) == 24
    assert obj["stop"] == ("eos" if obj["tokens"][-1] == 2 else "length")
    assert 2 not in obj["tokens"][:-1]
    tok = Tokenizer.from_gguf(default_model_path())
    assert obj["prompt_tokens"] == tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}]))


class FakeDevice:
    """A device whose 'generation' is a fixed list of tokens."""

    def __init__(self, tokens):
        self.tokens = tokens

    def generate(self, prompt, max_tokens, *, stop_ids=(), progress=None):
        from llmfab.host.runtime import GenerateResult
        out = []
        for t in self.tokens[:max_tokens]:
            out.append(t)
            if progress:
                progress(t)
            if t in stop_ids:
                break
        return GenerateResult(out, list(prompt), 1.0, 0.5)


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_streaming_never_prints_replacement_characters(monkeypatch):
    """Characters split over tokens (emoji, CJK) are printed whole when their last byte arrives."""
    text = " naïve café 😀👍🏽 世界 ∑ 𝔘"
    tok = Tokenizer.from_gguf(default_model_path())
    ids = tok.encode(text)
    assert any("\ufffd" in tok.token_to_piece(i) for i in ids)      # the case that matters
    monkeypatch.setattr("llmfab.host.runtime.open_device", lambda *a, **k: FakeDevice(ids + [2, 100]))
    out = TTY()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["generate", "--prompt", "Hi", "--max-tokens", "64"]) == 0
    assert out.getvalue() == "Hi" + text + "\n"


def test_text_stream_flushes_each_character():
    tok = Tokenizer.from_gguf(default_model_path())
    buf = io.StringIO()
    s = cli.TextStream(tok, buf)
    ids = tok.encode(" 😀!")
    seen = []
    for i in ids:
        s(i)
        seen.append(buf.getvalue())
    s.close()
    assert seen[-1] == " 😀!"
    assert all("\ufffd" not in v for v in seen)
    # a generation cut inside a character ends with one replacement character
    buf = io.StringIO()
    s = cli.TextStream(tok, buf)
    s(tok.encode(" 😀")[0])
    s.close()
    assert buf.getvalue().endswith("\ufffd")


def test_generate_tiny_model(capsys, tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "tiny.gguf")
    rc, out, err = run(capsys, "generate", "--model", p, "--prompt", "the", "--max-tokens", 5, "--json")
    assert rc == 0, err
    obj = json.loads(out)
    assert 1 <= len(obj["tokens"]) <= 5 and all(0 <= t < 256 for t in obj["tokens"])


# ------------------------------------------------------------------ logits
def test_logits_writes_float32(capsys, tmp_path):
    f = tmp_path / "f.npy"
    rc, out, err = run(capsys, "logits", "--tokens", "1,2,3", "--backend", "reference", "--out", f)
    assert rc == 0, err
    a = np.load(f)
    assert a.dtype == np.float32 and a.shape == (3, 49152)
    assert np.isfinite(a).all()
    assert err.strip() == f"wrote {f}: float32 [3, 49152]"
    # teacher-forced: row j is the prediction after tokens[0..j]
    from llmfab.compiler.model import load_model
    from llmfab.sim.reference import ReferenceModel
    r = ReferenceModel(load_model())
    np.testing.assert_array_equal(a, r.forward([1, 2, 3]))


def test_logits_text(capsys, tmp_path):
    f = tmp_path / "g.npy"
    p = tm.write_tiny_gguf(tmp_path / "tiny.gguf")
    rc, _, err = run(capsys, "logits", "--model", p, "--text", "the cat", "--out", f)
    assert rc == 0, err
    assert np.load(f).shape == (len(Tokenizer.from_gguf(p).encode("the cat")), 256)


# ------------------------------------------------------------------ errors
TOKENS_MSG = "--tokens must be comma-separated non-negative integers (e.g. 1,2,3), not {!r}"


@pytest.mark.parametrize("tokens,msg", [
    ("1,two,3", TOKENS_MSG.format("1,two,3")),
    ("1.5", TOKENS_MSG.format("1.5")),
    ("1 2 3", TOKENS_MSG.format("1 2 3")),          # was token 123: spaces were stripped first
    ("1_000", TOKENS_MSG.format("1_000")),
    ("\u0661\u0662", TOKENS_MSG.format("\u0661\u0662")),   # Arabic-Indic digits: int() takes them
    ("\uff11,2", TOKENS_MSG.format("\uff11,2")),    # fullwidth 1
    ("1,,2", TOKENS_MSG.format("1,,2")),
    ("1,2,", TOKENS_MSG.format("1,2,")),
    ("-1", TOKENS_MSG.format("-1")),
    ("+1", TOKENS_MSG.format("+1")),
    ("1\t,2", TOKENS_MSG.format("1\t,2")),
    (",", "--tokens is empty: give at least one token id"),
    (" ", "--tokens is empty: give at least one token id"),
])
def test_error_bad_tokens(capsys, tmp_path, tokens, msg):
    one_line_error(*run(capsys, "logits", "--tokens", tokens, "--out", tmp_path / "x.npy"), msg)
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("tokens,bad", [("1,49152,3", 49152), ("99999999999999999999", 99999999999999999999)])
def test_error_token_out_of_range(capsys, tmp_path, tokens, bad):
    one_line_error(*run(capsys, "logits", f"--tokens={tokens}", "--out", tmp_path / "x.npy"),
                   f"token id {bad} out of range (vocab size 49152)")


def test_error_model_not_gguf(capsys, tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"\x00\x01\x02\x03 not a model")
    one_line_error(*run(capsys, "generate", "--model", p, "--prompt", "x", "--max-tokens", 2),
                   f"{p}: not a GGUF file (starts with b'\\x00\\x01\\x02\\x03', expected b'GGUF')")
    one_line_error(*run(capsys, "logits", "--model", p, "--tokens", "1", "--out", tmp_path / "x.npy"),
                   f"{p}: not a GGUF file (starts with b'\\x00\\x01\\x02\\x03', expected b'GGUF')")


def test_error_truncated_model(capsys, tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "t.gguf")
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(data[:100])
    one_line_error(*run(capsys, "generate", "--model", p, "--prompt", "x", "--max-tokens", 2),
                   f"{p}: truncated GGUF file: the header ends after 100 bytes")


def test_error_missing_model_file(capsys, tmp_path):
    p = tmp_path / "missing.gguf"
    one_line_error(*run(capsys, "generate", "--model", p, "--prompt", "x", "--max-tokens", 2),
                   f"{p}: no such file")
    one_line_error(*run(capsys, "tokenize", "--model", p, "hello"))


def test_error_unknown_config(capsys):
    one_line_error(*run(capsys, "generate", "--prompt", "x", "--max-tokens", 2, "--config", "nope"),
                   "unknown config 'nope'; known configs: ci, ci-chains, tiny, u250, u280, u280-slice, u55c, v80, vhk158")


def test_error_config_file_missing(capsys, tmp_path):
    line = one_line_error(*run(capsys, "generate", "--prompt", "x", "--max-tokens", 2,
                               "--config", tmp_path / "nope.yaml"))
    assert "nope.yaml" in line


def test_error_output_dir_missing(capsys, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "f.npy"
    one_line_error(*run(capsys, "logits", "--tokens", "1,2", "--out", out),
                   f"cannot write {out}: directory {out.parent} does not exist")


def test_error_max_tokens(capsys):
    one_line_error(*run(capsys, "generate", "--prompt", "x", "--max-tokens", 0),
                   "--max-tokens must be at least 1, not 0")


def test_error_generate_hf_model(capsys, tmp_path):
    d = tm.write_tiny_hf(tmp_path / "hf")
    one_line_error(*run(capsys, "generate", "--model", d, "--prompt", "x", "--max-tokens", 2),
                   "generate needs a tokenizer: give a GGUF model")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--max-tokens", "2"])          # --prompt missing
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prompt", "x", "--backend", "gpu"])
    assert e.value.code == 2
    capsys.readouterr()


# ------------------------------------------------------------------ installed entry point
def _entry_point():
    exe = os.path.join(os.path.dirname(sys.executable), "llmfab")
    return exe if os.path.exists(exe) else shutil.which("llmfab")


def test_entry_point_generate():
    exe = _entry_point()
    assert exe, "the llmfab entry point is not installed"
    p = subprocess.run([exe, "generate", "--prompt", PROMPT, "--max-tokens", "8", "--backend", "reference"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(PROMPT + " Paris")


def test_entry_point_error(tmp_path):
    exe = _entry_point()
    p = subprocess.run([exe, "logits", "--tokens", "1,x", "--out", str(tmp_path / "x.npy")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr == "llmfab: error: " + TOKENS_MSG.format("1,x") + "\n"


# ------------------------------------------------------------------ the context limit (issue 9, case 1)
class ScriptedDevice(Device):
    """A runtime Device whose next token at position p is ``script[p]`` (one-hot logits)."""

    name = "reference"

    def __init__(self, script, context, vocab=49152):
        self.script, self.context, self.vocab = list(script), context, vocab
        self.forwarded = 0
        self.reset()

    def reset(self):
        self.pos = 0

    def forward(self, tokens):
        assert self.pos + len(tokens) <= self.context, "ran past the context"
        lg = np.zeros((len(tokens), self.vocab), np.float32)
        for i in range(len(tokens)):
            lg[i, self.script[self.pos + i]] = 1.0
        self.pos += len(tokens)
        self.forwarded += len(tokens)
        return lg


@pytest.mark.parametrize("prompt_len,context,max_tokens,stop_ids,n,stop", [
    (3, 10, 100, (), 8, "context"),      # prompt + all generated tokens but the last fill 10 positions
    (10, 10, 100, (), 1, "context"),     # a prompt that fills the context still gives one token
    (3, 10, 8, (), 8, "length"),         # max_tokens reached exactly at the context: length first
    (3, 10, 4, (), 4, "length"),
    (3, 10, 100, (7,), 3, "eos"),        # script[p] = p + 3: 5, 6, 7
])
def test_runtime_generate_stop_reasons(prompt_len, context, max_tokens, stop_ids, n, stop):
    dev = ScriptedDevice([p + 3 for p in range(64)], context)
    res = dev.generate(list(range(prompt_len)), max_tokens, stop_ids=set(stop_ids))
    assert res.stop == stop
    assert res.tokens == [p + 3 for p in range(prompt_len - 1, prompt_len - 1 + n)]
    assert dev.forwarded == prompt_len + n - 1


def test_runtime_prompt_past_context_refused_before_work():
    from llmfab.core.errors import BackendError
    dev = ScriptedDevice(range(64), 10)
    with pytest.raises(BackendError) as e:
        dev.generate(list(range(11)), 4)
    assert str(e.value) == "the prompt is 11 tokens but backend 'reference' holds a context of 10 positions: shorten it"
    with pytest.raises(BackendError) as e:
        dev.logits(list(range(11)))
    assert str(e.value) == ("the token sequence is 11 tokens but backend 'reference' holds a context of "
                            "10 positions: shorten it")
    assert dev.forwarded == 0


def test_golden_generate_stops_at_the_compiled_context(tmp_path):
    """The golden backend's context is its program's: generation stops there, a longer prompt is refused."""
    from llmfab.boards.config import load_config
    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    from llmfab.core.errors import BackendError
    from llmfab.host.golden_backend import GoldenDevice
    m = load_model(tm.write_tiny_gguf(tmp_path / "t.gguf"))
    cfg = load_config("tiny")
    dev = GoldenDevice(m, cfg, bundle=compile_model(m, cfg, context=16))
    assert dev.context == 16
    res = dev.generate([1, 2, 3, 4], 100)
    assert res.stop == "context" and len(res.tokens) == 16 - 4 + 1
    with pytest.raises(BackendError) as e:
        dev.generate(list(range(17)), 3)
    assert str(e.value) == "the prompt is 17 tokens but backend 'golden' holds a context of 16 positions: shorten it"


def test_generate_stops_at_context_json(capsys):
    """--max-tokens far past the context: the text made so far comes back, with stop 'context'."""
    rc, out, err = run(capsys, "generate", "--prompt", PROMPT, "--max-tokens", 1000000, "--context", 12,
                       "--json")
    assert rc == 0, err
    assert err == ""
    obj = json.loads(out)
    prompt = Tokenizer.from_gguf(default_model_path()).encode(PROMPT)
    assert obj["stop"] == "context"
    assert len(obj["tokens"]) == 12 - len(prompt) + 1
    assert obj["text"].startswith(" Paris")


def test_generate_stops_at_context_on_terminal(monkeypatch, capsys):
    """On a terminal the streamed text ends with a newline, then one warning line on stderr."""
    tok = Tokenizer.from_gguf(default_model_path())
    text = " one two three four five six seven eight nine ten"
    ids = tok.encode(text)
    prompt = tok.encode("Hi")
    script = [0] * (len(prompt) - 1) + ids
    ctx = len(prompt) + 4
    monkeypatch.setattr("llmfab.host.runtime.open_device", lambda *a, **k: ScriptedDevice(script, ctx))
    out = TTY()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["generate", "--prompt", "Hi", "--max-tokens", "64"]) == 0
    assert out.getvalue() == "Hi" + tok.decode(ids[:5]) + "\n"
    assert capsys.readouterr().err == ("llmfab: warning: generation stopped at the context limit of "
                                       f"backend 'reference' ({ctx} positions) after 5 tokens\n")


def test_generate_error_on_terminal_starts_a_new_line(monkeypatch, capsys):
    """A failure part-way through a streamed generation: the text so far, a newline, then the error."""
    from llmfab.core.errors import SimError
    tok = Tokenizer.from_gguf(default_model_path())
    ids = tok.encode(" one two three")
    prompt = tok.encode("Hi")

    class Failing(ScriptedDevice):
        def forward(self, tokens):
            if self.pos >= len(prompt) + 2:
                raise SimError("golden model stopped")
            return super().forward(tokens)
    script = [0] * (len(prompt) - 1) + ids
    monkeypatch.setattr("llmfab.host.runtime.open_device", lambda *a, **k: Failing(script, 100))
    out = TTY()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["generate", "--prompt", "Hi", "--max-tokens", "64"]) == 1
    assert out.getvalue() == "Hi" + tok.decode(ids[:3]) + "\n"
    assert capsys.readouterr().err == "llmfab: error: golden model stopped\n"


def test_generate_prompt_past_context_refused(capsys):
    prompt = Tokenizer.from_gguf(default_model_path()).encode(PROMPT)
    one_line_error(*run(capsys, "generate", "--prompt", PROMPT, "--context", 3),
                   f"the prompt is {len(prompt)} tokens but backend 'reference' holds a context of 3 "
                   f"positions: shorten it")


@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_kv_cache_option(capsys, kv):
    """--kv-cache q8_0 / q4_0: the reference backend with llama.cpp's quantized KV cache; other
    backends refuse it."""
    from llmfab.sim.reference import KV_CACHE_TYPES
    rc, out, err = run(capsys, "generate", "--prompt", PROMPT, "--max-tokens", 4, "--kv-cache", kv,
                       "--context", 32, "--json")
    assert rc == 0, err
    assert json.loads(out)["text"].startswith(" Paris")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prompt", PROMPT, "--kv-cache", "q5_0"])
    assert e.value.code == 2
    assert f"(choose from {', '.join(map(repr, KV_CACHE_TYPES))})" in capsys.readouterr().err
    one_line_error(*run(capsys, "generate", "--prompt", "x", "--kv-cache", "q8_0", "--backend", "golden"),
                   "--kv-cache applies to --backend reference; backend 'golden' keeps the "
                   "compiled program's KV cache (fp16, or Q8_0 K / int8 V with attention on the chains)")


def test_context_option_checks(capsys, tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "tiny.gguf", context_length=256)
    one_line_error(*run(capsys, "generate", "--model", p, "--prompt", "the", "--context", 257),
                   "--context 257 is above the context length of model 'tiny' (256): give 256 or less")
    one_line_error(*run(capsys, "logits", "--model", p, "--tokens", "1", "--context", 0,
                        "--out", tmp_path / "x.npy"),
                   "--context must be at least 1, not 0")
    one_line_error(*run(capsys, "generate", "--prompt", "x", "--context", 64, "--backend", "golden"),
                   "--context applies to --backend reference; backend 'golden' holds the compiled "
                   "program's context")
    rc, out, err = run(capsys, "generate", "--model", p, "--prompt", "the", "--context", 256,
                       "--max-tokens", 3, "--json")
    assert rc == 0, err


def test_reference_context_defaults_to_the_model_limit(tmp_path):
    """No silent 2048 cap: SmolLM2's 8192, and the KV cache grows only as it is used."""
    from llmfab.compiler.model import load_model
    from llmfab.core.errors import ModelError
    from llmfab.host.runtime import open_device
    from llmfab.sim.reference import ReferenceModel
    m = load_model(tm.write_tiny_gguf(tmp_path / "t.gguf", context_length=4096))
    dev = open_device("reference", m)
    assert dev.context == 4096
    assert dev.ref.k_cache.shape[1] < 4096
    ref = ReferenceModel(m, max_context=300)
    a = ref.forward(list(range(200)))
    b = ref.forward(list(range(100)))        # grows past the first allocation
    assert ref.k_cache.shape[1] == 300
    fixed = ReferenceModel(m, max_context=300)
    fixed._reserve(300)                       # the whole cache from the start: the same bits
    np.testing.assert_array_equal(a, fixed.forward(list(range(200))))
    np.testing.assert_array_equal(b, fixed.forward(list(range(100))))
    with pytest.raises(ModelError) as e:
        ReferenceModel(m, max_context=4097)
    assert str(e.value) == "context 4097 is outside 1..4096, the context length of model 'tiny'"


# ------------------------------------------------------------------ non-UTF-8 arguments (case 3)
@pytest.mark.parametrize("argv,msg", [
    (["tokenize", "abc\udcff"], "TEXT is not valid UTF-8 (byte 0xff at character 3): give UTF-8 text"),
    (["generate", "--prompt", "\udcc3("], "--prompt is not valid UTF-8 (byte 0xc3 at character 0): give UTF-8 text"),
    (["logits", "--text", "ab\udce9", "--out", "x.npy"],
     "--text is not valid UTF-8 (byte 0xe9 at character 2): give UTF-8 text"),
    (["logits", "--tokens", "1,\udcff", "--out", "x.npy"],
     "--tokens is not valid UTF-8 (byte 0xff at character 2): give UTF-8 text"),
])
def test_error_non_utf8_argument(capsys, monkeypatch, tmp_path, argv, msg):
    """Python hands undecodable argv bytes over as surrogates (os.fsdecode): refused, naming the argument."""
    assert os.fsdecode(b"abc\xff") == "abc\udcff"
    monkeypatch.chdir(tmp_path)
    _no_model_load(monkeypatch)
    one_line_error(*run(capsys, *argv), msg)


# ------------------------------------------------------------------ cheap arguments first (case 7)
def _no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr("llmfab.compiler.model.load_model", boom)
    monkeypatch.setattr("llmfab.compiler.tokenizer.Tokenizer.from_gguf", boom)
    monkeypatch.setattr("llmfab.compiler.compile.compile_model", boom)


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--prompt", "x", "--max-tokens", "0"], "--max-tokens must be at least 1, not 0"),
    (["generate", "--prompt", ""], "--prompt is empty: give some text"),
    (["generate", "--prompt", "x", "--config", "nope"],
     "unknown config 'nope'; known configs: ci, ci-chains, tiny, u250, u280, u280-slice, u55c, v80, vhk158"),
    (["generate", "--prompt", "x", "--backend", "rtl", "--context", "9"],
     "--context applies to --backend reference; backend 'rtl' holds the compiled program's context"),
    (["logits", "--tokens", "1 2", "--out", "x.npy"], TOKENS_MSG.format("1 2")),
    (["logits", "--tokens", "1", "--out", "no/such/x.npy"], "cannot write no/such/x.npy: directory {cwd}/no/such does not exist"),
    (["logits", "--tokens", "1", "--out", "."], "cannot write .: it is a directory"),
    (["logits", "--tokens", "1", "--out", ""], "--out is empty: give a file name"),
    (["compile", "--out", ""], "--out is empty: give a directory name"),
    (["logits", "--tokens", "1", "--out", "x.npy", "--config", "nope"],
     "unknown config 'nope'; known configs: ci, ci-chains, tiny, u250, u280, u280-slice, u55c, v80, vhk158"),
    (["compile", "--out", "/dev/null"], "cannot write a bundle to /dev/null: it exists and is not a directory"),
    (["compile", "--out", "b", "--sparsity", "5:7"],
     "unknown sparsity pattern '5:7' (choose from dense, 2:4, 8:16, 4:16, 2:16)"),
    (["compile", "--out", "b", "--config", "nope"],
     "unknown config 'nope'; known configs: ci, ci-chains, tiny, u250, u280, u280-slice, u55c, v80, vhk158"),
])
def test_cheap_arguments_checked_before_the_model_loads(capsys, monkeypatch, tmp_path, argv, msg):
    monkeypatch.chdir(tmp_path)
    _no_model_load(monkeypatch)
    one_line_error(*run(capsys, *argv), msg.format(cwd=tmp_path))


# ------------------------------------------------------------------ rough edges (case 8)
def test_version(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"llmfab {version('llmfab')}\n"


def _all_parsers(p):
    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                yield from _all_parsers(sp)


def test_every_option_has_help_and_shown_default():
    for p in _all_parsers(cli._parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            assert a.help, f"{p.prog} {a.dest}: no help text"
        text = p.format_help()
        assert "default: None" not in text and "default: False" not in text, p.prog
    gen = cli._parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "--model GGUF|DIR" in gen
    assert "(default: 32)" in gen and "(default: reference, golden with --bundle)" in gen and "(default: ci)" in gen


def test_backends_offered_are_the_ones_that_exist(capsys):
    from llmfab.host.runtime import BACKENDS
    assert cli.BACKEND_CHOICES == BACKENDS == ("reference", "golden", "rtl", "xrt")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prompt", "x", "--backend", "card"])
    assert e.value.code == 2
    assert "invalid choice: 'card' (choose from 'reference', 'golden', 'rtl', 'xrt')" in capsys.readouterr().err


def test_logits_out_writes_exactly_the_named_path(capsys, tmp_path):
    p = tm.write_tiny_gguf(tmp_path / "tiny.gguf")
    f = tmp_path / "foo"
    rc, _, err = run(capsys, "logits", "--model", p, "--tokens", "1, 2 ,3", "--out", f)
    assert rc == 0, err
    assert err == f"wrote {f}: float32 [3, 256]\n"
    assert not (tmp_path / "foo.npy").exists()
    assert np.load(f).shape == (3, 256)


def test_python_warnings_are_one_line(capsys, monkeypatch):
    import warnings

    def cmd(args):
        warnings.warn("something odd\nin two lines", UserWarning)
        np.float32(1e38) * np.float32(10)          # numpy's RuntimeWarning: overflow
    monkeypatch.setitem(cli.COMMANDS, "boards", cmd)
    rc, out, err = run(capsys, "boards")
    assert rc == 0
    assert err.splitlines() == ["llmfab: warning: something odd in two lines",
                                "llmfab: warning: overflow encountered in scalar multiply"]
