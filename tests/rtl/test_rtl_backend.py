"""Backend rtl: compiled programs run cycle-accurately on the generated accelerator and give
the golden model's bytes (a 2-layer model, inside make test; SmolLM2 is the slow test)."""

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.compiler import compile as compile_mod
from llmfab.compiler.bundle import write_bundle
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.host.golden_backend import GoldenDevice
from llmfab.host.cli import main
from llmfab.host.rtl_backend import RtlDevice

import tinymodel


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", ["q4_1"])
def test_two_layer_model_bit_exact(tmp_path, qtype, monkeypatch):
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", qtype, seed=3))
    cfg = load_config("tiny")
    b = compile_model(m, cfg)
    rtl = RtlDevice(m, cfg, bundle=b, prefill=False)        # every token through decode
    try:
        gold = GoldenDevice(m, cfg, bundle=b, prefill=False)
        toks = [1, 7, 42, 99, 200, 3]
        lr = rtl.forward(toks)
        lg = gold.forward(toks)
        assert np.array_equal(_bits(lr), _bits(lg))
        # the KV cache in HBM is the golden model's too
        kv0, kvn = b.manifest["memory_map"]["kv"]
        assert np.array_equal(rtl.acc.read_hbm(int(kv0), int(kvn)), gold.golden.hbm[int(kv0):int(kv0) + int(kvn)])
        st = rtl.stats()
        assert len(st["cycles_per_token"]) == len(toks) and all(c > 0 for c in st["cycles_per_token"])
        assert 0 < st["hbm_utilization"] < 1
        assert set(st["busy_fraction"]) == {"ld", "cmp", "mv", "misc", "both", "st"}
        # greedy generation through the device API agrees too
        rg = rtl.generate([5, 6, 7], 4)
        gg = gold.generate([5, 6, 7], 4)
        assert rg.tokens == gg.tokens
    finally:
        rtl.close()
    # the CLI runs a written bundle on rtl without compiling (the Verilator build is cached)
    write_bundle(b, str(tmp_path / "b"))
    monkeypatch.setattr(compile_mod, "compile_model", lambda *a, **k: pytest.fail("compiled"))
    out = tmp_path / "l.npy"
    assert main(["logits", "--backend", "rtl", "--bundle", str(tmp_path / "b"), "--tokens", "1,7,42",
                 "--out", str(out)]) == 0
    assert np.array_equal(_bits(np.load(out)), _bits(lg[:3]))


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_prompts_through_prefill_programs(tmp_path, qtype):
    """Prompts run as prefill programs on the RTL (tiny: buckets 2, 4, 8; MM on two token
    lanes): every bucket, prompts that are not a bucket size and one longer than the largest
    bucket give the golden model's logits and KV cache bit for bit, then decode goes on."""
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", qtype, seed=11))
    cfg = load_config("tiny")
    b = compile_model(m, cfg)
    assert b.manifest["prefill"]["buckets"] == [2, 4, 8] and cfg.chain.tokens == 2
    rtl = RtlDevice(m, cfg, bundle=b)
    try:
        gold = GoldenDevice(m, cfg, bundle=b)
        kv0, kvn = (int(v) for v in b.manifest["memory_map"]["kv"])
        rng = np.random.default_rng(7)
        for n in (2, 3, 4, 8, 15):                   # 2 | 2+1 | 4 | 8 | 8+4+2+1
            toks = [int(t) for t in rng.integers(0, m.desc.vocab_size, n)]
            rtl.reset()
            gold.reset()
            lr, lg = rtl.forward(toks), gold.forward(toks)
            assert np.array_equal(_bits(lr), _bits(lg)), n
            assert np.array_equal(rtl.acc.read_hbm(kv0, kvn), gold.golden.hbm[kv0:kv0 + kvn]), n
            # the next token decodes from the cache the prefill programs left
            nxt = int(np.argmax(lr[-1]))
            assert np.array_equal(_bits(rtl.forward([nxt])), _bits(gold.forward([nxt]))), n
        assert [r["tokens"] for r in rtl.prefill_runs] == [2, 2, 4, 8, 8, 4, 2]
        assert rtl.stats()["prefill_runs"][-1]["cycles"] > 0
        # as generate runs a prompt: 8 + 4 + 2 through the KV-only programs, the last token
        # through the decode program; the last token's logits and the KV cache bit for bit
        toks = [int(t) for t in rng.integers(0, m.desc.vocab_size, 15)]
        rtl.reset()
        gold.reset()
        lr, lg = rtl.forward_last(toks), gold.forward_last(toks)
        assert lr.shape == (1, m.desc.vocab_size) and np.array_equal(_bits(lr), _bits(lg))
        assert np.array_equal(rtl.acc.read_hbm(kv0, kvn), gold.golden.hbm[kv0:kv0 + kvn])
        assert [(r["tokens"], r["logits"]) for r in rtl.prefill_runs[-3:]] == [(8, False), (4, False), (2, False)]
        assert gold.prefill_kv_runs == {8: 1, 4: 1, 2: 1}
    finally:
        rtl.close()


def test_two_layer_model_bit_exact_u280_slice(tmp_path):
    """Two slices of the U280's per-channel datapath (512-bit ports at 225 MHz, 128-weight
    chains, a 64-byte on-chip line: weight tiles through the per-port fast path into the
    slice banks, each slice's four row pipelines reading only its bank): the golden model's
    logits, KV cache and greedy tokens bit for bit (one Verilator build, shared with the
    slow SmolLM2 run below; about 4 minutes with the build)."""
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_0", seed=5))
    cfg = load_config("u280-slice")
    assert (cfg.chain.length, cfg.hbm.ports, cfg.hbm.data_width) == (128, 2, 512)
    b = compile_model(m, cfg)
    rtl = RtlDevice(m, cfg, bundle=b)
    try:
        gold = GoldenDevice(m, cfg, bundle=b)
        toks = [1, 7, 42, 99, 200]
        lg = gold.forward(toks)
        assert np.array_equal(_bits(rtl.forward(toks)), _bits(lg))
        kv0, kvn = b.manifest["memory_map"]["kv"]
        assert np.array_equal(rtl.acc.read_hbm(int(kv0), int(kvn)),
                              gold.golden.hbm[int(kv0):int(kv0) + int(kvn)])
        assert rtl.generate([5, 6, 7], 3).tokens == gold.generate([5, 6, 7], 3).tokens
    finally:
        rtl.close()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ci", "ci-chains", "u280-slice"])
def test_smollm2_prompt_and_three_tokens(config):
    """SmolLM2 on ci, on ci with attention on the chains and on two U280 slices: a short prompt
    (through the prefill programs) plus 3 generated tokens give the golden backend's tokens and
    logits bit for bit (about 10 minutes each: build + ~1.5 M cycles per token on ci)."""
    from llmfab.compiler.tokenizer import Tokenizer
    m = load_model()
    cfg = load_config(config)
    b = compile_model(m, cfg)
    prompt = Tokenizer.from_gguf(m.path).encode("The capital of France is")
    rtl = RtlDevice(m, cfg, bundle=b)
    try:
        gold = GoldenDevice(m, cfg, bundle=b)
        r = rtl.generate(prompt, 3)
        g = gold.generate(prompt, 3)
        assert r.tokens == g.tokens
        rtl.reset()
        gold.reset()
        seq = prompt + r.tokens
        assert np.array_equal(_bits(rtl.forward(seq)), _bits(gold.forward(seq)))
    finally:
        rtl.close()
