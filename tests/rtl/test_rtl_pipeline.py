"""A 2-layer model over 2 pipeline stages on the rtl backend, as Ray actors: the single device's
logits and tokens bit for bit (the stages use the same cached Verilator build of ``tiny``)."""

import numpy as np

from llmfab.boards.config import load_config
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.compiler.partition import compile_stages, plan_stages
from llmfab.host.pipeline import Pipeline
from llmfab.host.rtl_backend import RtlDevice

import tinymodel


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def test_two_layer_model_over_two_rtl_stages(tmp_path):
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_1", seed=3))
    cfg = load_config("tiny")
    one = RtlDevice(m, cfg, bundle=compile_model(m, cfg))     # builds (or reuses) the tiny accelerator
    try:
        toks = [1, 7, 42, 99, 200, 3]
        want = one.logits(toks)
        want_gen = one.generate([5, 6, 7], 4).tokens
    finally:
        one.close()
    stages = plan_stages(m, [cfg, cfg])
    assert [s.layers for s in stages] == [(0, 1), (1, 2)]
    bundles = compile_stages(m, stages)
    with Pipeline(bundles, backend="rtl", configs=[cfg, cfg], timeout=600) as pipe:
        assert np.array_equal(_bits(pipe.logits(toks)), _bits(want))
        assert pipe.generate([5, 6, 7], 4).tokens == want_gen
