"""`llmfab compile`: writes a bundle; --sparsity reports the accuracy cost against the dense model."""

import json
import os

import pytest

from llmfab.compiler.bundle import read_bundle
from llmfab.host.cli import main

import tinymodel


def test_compile_cli_dense_and_sparse(tmp_path, capsys):
    model = tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_0", seed=4)
    out = tmp_path / "bundle"
    assert main(["compile", "--model", model, "--config", "tiny", "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    b = read_bundle(str(out))
    assert rep["program_bytes"] == len(b.program)
    assert "accuracy" not in rep
    out2 = tmp_path / "sparse"
    assert main(["compile", "--model", model, "--config", "tiny", "--out", str(out2),
                 "--sparsity", "ffn=2:4"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    acc = rep["accuracy"]
    assert acc["pruned_matrices"] == 2 * 3
    assert 0.0 <= acc["top1_agreement_vs_dense"] <= 1.0 and acc["mean_abs_logit_error"] > 0
    b2 = read_bundle(str(out2))
    assert b2.manifest["sparsity"]["ffn_up"] == "2:4"
    assert b2.manifest["stats"]["weight_bytes"] < b.manifest["stats"]["weight_bytes"]


def test_compile_cli_errors(tmp_path, capsys):
    model = tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_0")
    assert main(["compile", "--model", model, "--config", "tiny", "--out", str(tmp_path / "b"),
                 "--sparsity", "5:7"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llmfab: error: unknown sparsity pattern '5:7' (choose from dense, 2:4, 8:16, 4:16, 2:16)"]


# ------------------------------------------------------------------ --out checked first, --force (issue 9, case 4)
def _no_compile(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compiled although --out cannot be written")
    monkeypatch.setattr("llmfab.compiler.compile.compile_model", boom)
    monkeypatch.setattr("llmfab.compiler.model.load_model", boom)


def _error(capsys):
    out, err = capsys.readouterr()
    assert out == ""
    return err


def test_compile_out_refused_before_compiling(tmp_path, capsys, monkeypatch):
    _no_compile(monkeypatch)
    f = tmp_path / "file"
    f.write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    cases = [
        ("/dev/null", [], "cannot write a bundle to /dev/null: it exists and is not a directory"),
        (str(f), [], f"cannot write a bundle to {f}: it exists and is not a directory"),
        (str(f / "b"), [], f"cannot write a bundle to {f / 'b'}: {f} is not a directory"),
        (str(f / "x" / "b"), [], f"cannot write a bundle to {f / 'x' / 'b'}: {f} is not a directory"),
        (str(tmp_path / "full"), [], f"{tmp_path / 'full'} is not empty: give --force to replace the "
                                     f"bundle in it, or choose a new directory"),
        (str(tmp_path / "full"), ["--force"], f"{tmp_path / 'full'} is not empty and holds no bundle "
                                              f"(no manifest.json): --force replaces only a bundle; "
                                              f"choose a new directory"),
    ]
    for out, extra, msg in cases:
        assert main(["compile", "--config", "tiny", "--out", out, *extra]) == 1
        assert _error(capsys) == f"llmfab: error: {msg}\n"
    assert f.read_text() == "keep me"
    assert os.listdir(tmp_path / "full") == ["notes.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_compile_out_unwritable_directory(tmp_path, capsys, monkeypatch):
    _no_compile(monkeypatch)
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        assert main(["compile", "--config", "tiny", "--out", str(d / "b")]) == 1
        assert _error(capsys) == f"llmfab: error: cannot write a bundle to {d / 'b'}: directory {d} is not writable\n"
    finally:
        d.chmod(0o700)


def test_compile_force_replaces_the_bundle_whole(tmp_path, capsys, monkeypatch):
    model = tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_0", seed=4)
    out = tmp_path / "bundle"
    assert main(["compile", "--model", model, "--config", "tiny", "--out", str(out),
                 "--sparsity", "ffn=2:4"]) == 0
    (out / "stale.bin").write_bytes(b"from an earlier compile")
    first = read_bundle(str(out))
    capsys.readouterr()
    # a failed compile with --force loses nothing
    from llmfab.core.errors import CompileError

    def fail(*a, **k):
        raise CompileError("does not fit")
    with monkeypatch.context() as m:
        m.setattr("llmfab.compiler.compile.compile_model", fail)
        assert main(["compile", "--model", model, "--config", "tiny", "--out", str(out), "--force"]) == 1
    assert _error(capsys) == "llmfab: error: does not fit\n"
    assert (out / "stale.bin").exists() and read_bundle(str(out)).manifest == first.manifest
    # a good one replaces the directory whole: no stale file, no temporary directories left
    assert main(["compile", "--model", model, "--config", "tiny", "--out", str(out), "--force"]) == 0
    out_text, err = capsys.readouterr()
    assert err == ""                                   # no progress bar off a terminal
    assert json.loads(out_text)["bundle"] == str(out)
    assert not (out / "stale.bin").exists()
    assert read_bundle(str(out)).manifest["sparsity"]["ffn_up"] == "dense"
    assert sorted(os.listdir(tmp_path)) == ["bundle", "t.gguf"]


def test_compile_into_empty_or_new_directory(tmp_path, capsys):
    model = tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_0")
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "sub"):
        assert main(["compile", "--model", model, "--config", "tiny", "--out", str(out)]) == 0
        read_bundle(str(out))
    capsys.readouterr()


@pytest.mark.parametrize("spec,msg", [
    ("ffn=2:4,ffn=8:16", "--sparsity: target 'ffn' is given twice"),
    ("ffn_up=2:4, ffn_up=2:4", "--sparsity: target 'ffn_up' is given twice"),
    ("2:4,ffn=8:16", "--sparsity: targets 'all' and 'ffn' both set ffn_gate; give each matrix one pattern"),
    ("attn=2:4,attn_v=dense", "--sparsity: targets 'attn' and 'attn_v' both set attn_v; give each matrix one pattern"),
])
def test_compile_repeated_sparsity_target(tmp_path, capsys, monkeypatch, spec, msg):
    _no_compile(monkeypatch)
    assert main(["compile", "--config", "tiny", "--out", str(tmp_path / "b"), "--sparsity", spec]) == 1
    assert _error(capsys) == f"llmfab: error: {msg}\n"
