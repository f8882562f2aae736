"""`llmfab compile`: writes a bundle; --sparsity reports the accuracy cost against the dense model."""

import json

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
