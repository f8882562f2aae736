"""The ``llmfab`` command line: in-process through ``host.cli.main(argv)`` (with
capsys), and once through the installed entry point. Errors: one line on stderr,
no traceback, non-zero exit."""

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
@pytest.mark.parametrize("tokens,msg", [
    ("1,two,3", "--tokens must be comma-separated integers, not '1,two,3'"),
    ("1.5", "--tokens must be comma-separated integers, not '1.5'"),
    (",", "--tokens is empty: give at least one token id"),
])
def test_error_bad_tokens(capsys, tmp_path, tokens, msg):
    one_line_error(*run(capsys, "logits", "--tokens", tokens, "--out", tmp_path / "x.npy"), msg)
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("tokens,bad", [("1,49152,3", 49152), ("-1", -1)])
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
                   "unknown config 'nope'; known configs: ci, tiny, u250, u280, u55c, v80, vhk158")


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
    assert p.stderr == "llmfab: error: --tokens must be comma-separated integers, not '1,x'\n"
