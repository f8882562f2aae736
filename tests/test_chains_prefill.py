"""Prefill programs with attention on the chains (docs/isa.md, "Attention on the chains"): a
run of T tokens at R1 attends token t over positions [0, R1 + t] on the chains (KVROW at
R1 + aux), and every run gives the bits the decode program gives token by token -- logits
and the KV cache it leaves. Runs start at multiples of min(T, 32) (Bundle.prefill_align):
the backends choose their buckets so, and refuse a run that does not."""

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.compiler import isa
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.core.errors import SimError
from llmfab.host.golden_backend import GoldenDevice
from llmfab.host.runtime import split_buckets
from llmfab.sim.golden import Golden

import tinymodel


def _chains(name, kv_kib=64, **kw):
    from llmfab.boards.config import config_from_dict
    d = load_config(name).to_dict()
    d.update(name=f"{name}-chains", attention="chains", **kw)
    d["buffers"] = dict(d["buffers"], kv_kib=max(kv_kib, d["buffers"]["kv_kib"]))
    return config_from_dict(d, f"{name} with attention on the chains")


def _model(tmp_path, **kw):
    shape = dict(dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256)       # head dim 32, groups of 2
    shape.update(kw)
    return load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_1", seed=5, **shape))


def _kv(dev):
    kv0, kvn = (int(v) for v in dev.bundle.manifest["memory_map"]["kv"])
    return dev.golden.hbm[kv0:kv0 + kvn]


def test_split_buckets_aligns_runs():
    assert split_buckets(13, [2, 4, 8]) == [8, 4, 1]
    assert split_buckets(20, [2, 4, 8], pos=3) == [8, 8, 4]              # no alignment asked
    assert split_buckets(20, [2, 4, 8], pos=3, align=32) == [1, 4, 8, 4, 2, 1]
    assert split_buckets(100, [2, 64], pos=30, align=32) == [2] + [64] + [2] * 17
    assert split_buckets(70, [8, 64], pos=32, align=32) == [64, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("config,shape,ctx", [
    ("tiny", {}, 128),                                            # one slice, head dim 32
    ("ci", {"n_heads": 2, "n_kv_heads": 1}, 128),                 # two slices, head dim 64, group 2
    ("ci", {"n_heads": 2, "n_kv_heads": 2}, 256),                 # groups of 1 (two buffer sets)
    ("u280-slice", {"n_heads": 4, "n_kv_heads": 1}, 128),         # two 64-byte stripes, group 4
    ("tiny/1", {}, 128),          # one token lane: QKV tiles the heads' attention goes between
])
def test_prefill_equals_decode(tmp_path, config, shape, ctx):
    """Prompts through the prefill buckets (misaligned starts, runs crossing the 32-position
    tiles, prompts longer than the largest bucket) against the same tokens one by one.
    ``name/1``: with one token lane, where a KV head's attention goes in two parts, the
    second after the next QKV tile's MM (``ProgramBuilder._qkv_prefill_chains``)."""
    m = _model(tmp_path, **shape)
    config, _, lanes = config.partition("/")
    kw = {"chain": dict(load_config(config).to_dict()["chain"], tokens=int(lanes))} if lanes else {}
    cfg = _chains(config, max_prefill=64, **kw)
    b = compile_model(m, cfg, context=ctx)
    assert b.prefill, b.manifest["prefill"]
    assert b.prefill_align == 32
    pre, dec = GoldenDevice(None, cfg, bundle=b), GoldenDevice(None, cfg, bundle=b, prefill=False)
    rng = np.random.default_rng(1)
    for n in (3, 45, 7, 70):                       # positions 0..124
        toks = [int(t) for t in rng.integers(0, 256, n)]
        a, d = pre.forward(toks), dec.forward(toks)
        assert np.array_equal(a.view(np.uint32), d.view(np.uint32)), n
        assert np.array_equal(_kv(pre), _kv(dec)), n
    used = {int(t) for t in pre.prefill_runs}
    assert max(b.prefill) in used and len(used) >= 2, (used, sorted(b.prefill))
    assert dec.prefill_runs == {}


def test_misaligned_run_refused(tmp_path):
    m = _model(tmp_path)
    b = compile_model(m, _chains("tiny"), context=64)
    g = Golden(b)
    with pytest.raises(SimError) as e:
        g.prefill(3, [1, 2])
    assert str(e.value) == ("a 2-token prefill run of the bundle (attention on the chains) must "
                            "start at a multiple of 2, not position 3")
    assert g.prefill(2, [1, 2]).status == isa.STATUS_OK


def test_smollm2_prefill_equals_decode(smol):
    """SmolLM2 on ci-chains: its prefill bucket gives the decode program's bits."""
    cfg = load_config("ci-chains")
    b = compile_model(smol, cfg)
    assert sorted(b.prefill) == [2]
    pre, dec = GoldenDevice(None, cfg, bundle=b), GoldenDevice(None, cfg, bundle=b, prefill=False)
    toks = [1, 9690, 314, 260, 3575, 282, 4649]
    a, d = pre.forward(toks), dec.forward(toks)
    assert np.array_equal(a.view(np.uint32), d.view(np.uint32))
    assert pre.prefill_runs == {2: 3}
