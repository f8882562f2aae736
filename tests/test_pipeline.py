"""Pipeline parallelism: partitioning in the compiler, stages as Ray actors (golden backend),
the projection (``llmfab plan``) and the multi-card command line."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from llmfab.core.errors import BackendError, CompileError, FitError
from llmfab.compiler.partition import balance, compile_stages, plan_stages
from llmfab.host.cli import main

PROMPT = [1, 504, 3458, 282, 4649]


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One small local Ray instance for the module (its files outside the repository)."""
    ray = pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("ray")
    # Ray's socket paths must stay short: a temp dir under /tmp, not pytest's deep one
    short = os.path.join("/tmp", f"llmfab-ray-{os.getpid()}")
    os.makedirs(short, exist_ok=True)
    from llmfab.host.pipeline import start_local_ray
    start_local_ray(2, temp_dir=short)
    yield tmp
    ray.shutdown()
    import shutil
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="module")
def smol_stages(smol, ci):
    return {n: compile_stages(smol, plan_stages(smol, [ci] * n)) for n in (2, 3)}


# ---------------------------------------------------------------------------- partitioning
def test_balance_minimises_the_largest_stage():
    assert balance([10] * 6, 0, 0, 3) == [(0, 2), (2, 4), (4, 6)]
    # the embedding weighs on the first stage, the LM head on the last
    assert balance([10] * 6, 25, 0, 2) == [(0, 2), (2, 6)]
    assert balance([10] * 6, 0, 25, 2) == [(0, 4), (4, 6)]
    # a tied embedding is on both ends
    assert balance([10] * 6, 20, 0, 2, tied=True) == [(0, 3), (3, 6)]
    with pytest.raises(CompileError, match=r"^cannot split 6 layers over 7 cards: give 1 to 6 cards$"):
        balance([10] * 6, 0, 0, 7)


def test_smollm2_stages_are_contiguous_and_balanced(smol, ci):
    for n in (2, 3):
        st = plan_stages(smol, [ci] * n)
        assert st[0].layers[0] == 0 and st[-1].layers[1] == smol.desc.n_layers
        assert all(a.layers[1] == b.layers[0] for a, b in zip(st, st[1:]))
        w = [s.weight_bytes for s in st]
        assert max(w) - min(w) <= max(w) * 0.25, w


def test_stage_that_does_not_fit_is_refused_by_name():
    from llmfab.boards.config import load_config
    from llmfab.compiler.shapes import named_shape
    m = named_shape("llama2-70b")
    with pytest.raises(FitError, match=r"^stage 0 \(layers 0-39\) needs 18\.\d\d GiB of device memory "
                                       r"\(weights 18\.\d\d GiB\) but board 'u280' has 8\.00 GiB of HBM: "
                                       r"use more cards$"):
        plan_stages(m, [load_config("u280")] * 2)
    st = plan_stages(m, [load_config("u280")] * 8)
    assert [s.layers[1] - s.layers[0] for s in st] == [10] * 8


def test_placement_ranges_are_checked(smol, ci):
    with pytest.raises(CompileError, match=r"^stage 1: layers \[12, 30\) do not continue from layer 10: "):
        plan_stages(smol, [ci, ci], layers=[(0, 10), (12, 30)])
    with pytest.raises(CompileError, match=r"^the stages end at layer 20, but model '.*' has 30 layers$"):
        plan_stages(smol, [ci, ci], layers=[(0, 10), (10, 20)])
    assert [s.layers for s in plan_stages(smol, [ci, ci], layers=[(0, 10), (10, 30)])] == [(0, 10), (10, 30)]


def test_stage_bundles_carry_only_their_layers(tmp_path):
    import tinymodel
    from llmfab.boards.config import load_config
    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_1", n_layers=2, seed=3))   # tied
    cfg = load_config("tiny")
    full = compile_model(m, cfg).memory_map
    b0, b1 = compile_stages(m, plan_stages(m, [cfg, cfg]))
    assert b0.manifest["stage"] == {"layers": [0, 1], "first": True, "last": False, "hidden_dim": 64,
                                    "index": 0, "stages": 2}
    assert "hidden_out" in b0.memory_map and "logits" not in b0.memory_map and "hidden_in" not in b0.memory_map
    assert "hidden_in" in b1.memory_map and "logits" in b1.memory_map and "hidden_out" not in b1.memory_map
    # the KV caches split with the layers; the tied embedding is on both ends
    assert b0.memory_map["kv"][1] + b1.memory_map["kv"][1] == full["kv"][1]
    emb = 256 * 64 // 32 * 34                                   # Q8_0 embedding rows
    assert b0.memory_map["weights"][1] + b1.memory_map["weights"][1] >= full["weights"][1] + emb
    # KV-only prefill programs only where there are logits to leave out: the last stage
    assert b0.prefill_kv == {} and b0.manifest["programs"]["prefill_kv"] == {}
    assert sorted(b1.prefill_kv) == sorted(b1.prefill) == sorted(b1.prefill_last) == [2, 4, 8]
    assert b0.prefill_last == {} and b0.manifest["programs"]["prefill_last"] == {}
    # the last stage runs a prompt's runs before its last through them (rows="last") and the
    # last through its last-logits program: the same last-token logits and KV cache as with
    # every run's logits
    from llmfab.host.pipeline import StageRunner
    x = np.random.default_rng(2).standard_normal((10, 64)).astype(np.float32)   # 8 + 2
    full, last = StageRunner(b1), StageRunner(b1)
    want = full.forward("r", x, start=True)
    got = last.forward("r", x, start=True, rows="last")
    assert want.shape == (10, 256) and got.shape == (1, 256)
    assert np.array_equal(_bits(got), _bits(want[-1:]))
    assert np.array_equal(last._read(last.kv0, last.kvn), full._read(full.kv0, full.kvn))
    assert {"prefill_kv_8", "prefill_last_2"} <= set(last.dev.golden.programs)
    assert not any(k.startswith(("prefill_kv_", "prefill_last_")) for k in full.dev.golden.programs)
    # a stage bundle is an ordinary bundle on disk
    from llmfab.compiler.bundle import read_bundle, write_bundle
    write_bundle(b1, str(tmp_path / "s1"))
    assert read_bundle(str(tmp_path / "s1")).manifest["stage"]["layers"] == [1, 2]
    with pytest.raises(CompileError, match=r"^layers \[1, 3\) is not a range of model 'tiny' \(2 layers\)$"):
        compile_model(m, cfg, layers=(1, 3))


# ---------------------------------------------------------------------------- golden stages on Ray
@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """A 3-layer tiny model (untied LM head) and the ``tiny`` configuration."""
    from llmfab.boards.config import load_config
    from llmfab.compiler.model import load_model
    import tinymodel
    path = tinymodel.write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "t3.gguf", "q4_1", n_layers=3,
                                     tied=False, seed=5)
    return load_model(path), load_config("tiny")


@pytest.fixture(scope="module")
def tiny_pipe(ray_local, tiny3):
    """The tiny model over 2 golden stages, shared by the tests that leave it running."""
    from llmfab.host.pipeline import Pipeline
    m, cfg = tiny3
    with Pipeline.from_model(m, cfg, 2, backend="golden", timeout=120) as pipe:
        yield pipe


def _one_card(m, cfg):
    from llmfab.compiler.compile import compile_model
    from llmfab.host.golden_backend import GoldenDevice
    return GoldenDevice(None, cfg, bundle=compile_model(m, cfg))


def _check_bit_exact(pipe, one, prompt, n):
    want_gen = one.generate(prompt, n)
    got = pipe.generate(prompt, n)
    assert got.tokens == want_gen.tokens
    # teacher-forced logits (prefill programs in every stage): the same float32 bits
    seq = prompt + got.tokens[:-1]
    assert np.array_equal(_bits(pipe.logits(seq)), _bits(one.logits(seq)))


def test_tiny_over_two_golden_stages_is_bit_exact(tiny_pipe, tiny3):
    _check_bit_exact(tiny_pipe, _one_card(*tiny3), [1, 7, 42, 99, 200, 3], 6)


def test_tiny_over_three_golden_stages_is_bit_exact(ray_local, tiny3):
    from llmfab.host.pipeline import Pipeline
    m, cfg = tiny3
    with Pipeline.from_model(m, cfg, 3, backend="golden", timeout=120) as pipe:
        assert len(pipe.actors) == 3
        _check_bit_exact(pipe, _one_card(m, cfg), [5, 6, 7], 5)


def test_requests_in_flight_keep_their_own_kv_cache(tiny_pipe, tiny3):
    prompts = [[1, 7, 42, 99], [1, 42, 7], [2, 3, 4, 5, 6, 7], [9]]
    one = _one_card(*tiny3)
    want = [one.generate(p, 5).tokens for p in prompts]
    got = tiny_pipe.generate_many(prompts, 5)
    assert [r.tokens for r in got] == want


def test_stage_error_names_the_stage(tiny_pipe):
    with pytest.raises(BackendError, match=r"^stage 0 \(layers 0-0\): token id out of range "
                                           r"\(vocab size 256\)$"):
        tiny_pipe.generate([256], 2)


def test_a_stage_that_does_not_answer_in_time_is_named(tiny_pipe):
    tiny_pipe.timeout = 0.01
    try:
        with pytest.raises(BackendError, match=r"^stage [01] \(layers (?:0-0|1-2)\) gave no answer within 0.01 s$"):
            tiny_pipe.generate([1, 2, 3, 4, 5, 6, 7, 8], 2)
    finally:
        tiny_pipe.timeout = 120


def test_killed_stage_ends_the_request_with_one_line(ray_local, tiny3):
    import ray
    from llmfab.host.pipeline import Pipeline
    m, cfg = tiny3
    pipe = Pipeline.from_model(m, cfg, 2, backend="golden", timeout=120)
    t = {}

    def kill_after_first(tok):
        if not t:
            t["kill"] = time.perf_counter()
            ray.kill(pipe.actors[1])
    try:
        with pytest.raises(BackendError, match=r"^stage 1 \(layers 1-2\) failed: its Ray actor died$"):
            pipe.generate([1, 2, 3], 200, progress=kill_after_first)
        assert time.perf_counter() - t["kill"] < 10
    finally:
        pipe.close()


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_smollm2_golden_stages_on_ray_are_bit_exact(n, ray_local, smol_stages, smol_bundle, ci):
    """SmolLM2 over 2 and 3 golden stages: the single card's tokens and logits bit for bit,
    and four requests in flight each the single card's tokens (~2 min per case on 2 idle cores)."""
    from llmfab.host.golden_backend import GoldenDevice
    from llmfab.host.pipeline import Pipeline
    one = GoldenDevice(None, ci, bundle=smol_bundle)
    prompts = [PROMPT, [1, 42, 7], [2, 3, 4, 5, 6, 7], [9]]
    with Pipeline(smol_stages[n], backend="golden", timeout=300) as pipe:
        assert pipe.context == one.context
        _check_bit_exact(pipe, one, PROMPT, 4)
        want = [one.generate(p, 3).tokens for p in prompts]
        assert [r.tokens for r in pipe.generate_many(prompts, 3)] == want


# ---------------------------------------------------------------------------- command line
def test_cheap_commands_do_not_import_ray():
    code = ("import sys; from llmfab.host.cli import main; main(['boards', '--json']); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_compile_cards_writes_one_bundle_per_stage(tmp_path, capsys):
    import tinymodel
    from llmfab.compiler.bundle import read_bundle
    gguf = tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_1", n_layers=4, seed=3)
    (tmp_path / "place.yaml").write_text("stages:\n  - {layers: [0, 1]}\n  - {layers: [1, 4], config: tiny}\n")
    out = tmp_path / "p"
    assert main(["compile", "--model", gguf, "--config", "tiny", "--placement", str(tmp_path / "place.yaml"),
                 "--out", str(out)]) == 0
    doc = json.loads((out / "pipeline.json").read_text())
    assert [s["layers"] for s in doc["stages"]] == [[0, 1], [1, 4]]
    for s in doc["stages"]:
        b = read_bundle(str(out / s["bundle"]))
        assert b.manifest["stage"]["layers"] == s["layers"]
    capsys.readouterr()
    assert main(["compile", "--model", gguf, "--config", "tiny", "--cards", "2", "--out", str(out)]) == 1
    assert capsys.readouterr().err == (f"llmfab: error: {out} is not empty: give --force to replace the "
                                       f"pipeline in it, or choose a new directory\n")


@pytest.mark.parametrize("argv, message", [
    (["compile", "--cards", "0", "--out", "X"], "--cards must be at least 1, not 0"),
    (["plan", "--model", "llama2-70b", "--cards", "2"],
     "stage 0 (layers 0-39) needs 18.70 GiB of device memory (weights 18.07 GiB) but board 'u280' has "
     "8.00 GiB of HBM: use more cards"),
    (["plan", "--model", "llama2-7b"], "give --cards N (or --placement FILE)"),
    (["generate", "--cards", "2", "--backend", "reference", "--prompt", "hi"],
     "--cards runs on --backend golden or rtl, not reference"),
    (["generate", "--pipeline", "/nonexistent", "--prompt", "hi"],
     "/nonexistent holds no pipeline (no pipeline.json): compile one with llmfab compile --cards N "
     "--out /nonexistent"),
])
def test_card_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    assert capsys.readouterr().err == f"llmfab: error: {message}\n"


def test_plan_projects_placement_memory_and_tokens(capsys, tmp_path):
    png = tmp_path / "plan.png"
    assert main(["plan", "--model", "llama2-7b", "--config", "u280", "--cards", "2", "--json",
                 "--plot", str(png)]) == 0
    p = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in p["stages"]] == [[0, 16], [16, 32]]
    assert all(s["fits_streams"] and s["device_bytes"] <= s["card_bytes"] == 8 * 2**30 for s in p["stages"])
    assert 0 < p["tokens_per_s_1_stream"] < p["tokens_per_s_2_streams"] <= 2 * p["tokens_per_s_1_stream"]
    assert "16 GiB/s" in p["inter_card_hop_source"] and p["inter_card_hop_s"] > 1e-4
    assert png.stat().st_size > 1000


def test_generate_pipeline_from_cli_matches_one_card(tmp_path, capsys, ray_local):
    import tinymodel
    gguf = tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_1", n_layers=2, seed=3)
    out = tmp_path / "p"
    assert main(["compile", "--model", gguf, "--config", "tiny", "--cards", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    args = ["--model", gguf, "--prompt", "hello", "--max-tokens", "4", "--json"]
    assert main(["generate", "--backend", "golden", "--config", "tiny", *args]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(["generate", "--pipeline", str(out), *args]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["tokens"] == one["tokens"] and two["cards"] == 2
    assert [s["stage"] for s in two["stages"]] == ["stage 0 (layers 0-0)", "stage 1 (layers 1-1)"]
