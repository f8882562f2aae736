"""A 2-layer model over 2 pipeline stages on the rtl backend, as Ray actors: the single device's
logits and tokens bit for bit (the stages use the same cached Verilator build of ``tiny``; the
single device is the golden backend, which test_rtl_backend.py holds the rtl backend to bit for bit)."""

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.compiler.partition import compile_stages, plan_stages
from llmfab.host.pipeline import Pipeline
from llmfab.host.golden_backend import GoldenDevice

import tinymodel


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.slow
def test_two_layer_model_over_two_rtl_stages(tmp_path):
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_1", seed=3))
    cfg = load_config("tiny")
    one = GoldenDevice(m, cfg, bundle=compile_model(m, cfg))
    toks = [1, 7, 42, 99]
    want = one.logits(toks)
    want_gen = one.generate([5, 6, 7], 3).tokens
    stages = plan_stages(m, [cfg, cfg])
    assert [s.layers for s in stages] == [(0, 1), (1, 2)]
    bundles = compile_stages(m, stages)
    with Pipeline(bundles, backend="rtl", configs=[cfg, cfg], timeout=600) as pipe:
        assert np.array_equal(_bits(pipe.logits(toks)), _bits(want))
        # the 4 tokens ran as one prefill run (bucket 4) on each rtl stage, not 4 decode steps
        assert [(st["buckets"], st["steps"]) for st in pipe.stats()] == [([2, 4, 8], 1)] * 2
        assert pipe.generate([5, 6, 7], 3).tokens == want_gen
