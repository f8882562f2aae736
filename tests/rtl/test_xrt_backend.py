"""Backend xrt on the simulated card (sim/rtl/xrt_card.py, the Verilator build of the whole
accelerator): the golden model's logits, KV cache and tokens bit for bit (a 2-layer model on
``tiny`` here, SmolLM2 on ``ci`` as the slow test); one bundle on golden, rtl and xrt; a
missing sync, a wait that times out and an error status fail as they would on a card.

The simulation is the rtl backend's build (cached in sim_build/), so this module costs the
runs only once test_rtl_backend.py has built ``tiny``."""

import json

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.compiler.bundle import write_bundle
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.core.errors import BackendError, SimError
from llmfab.host.cli import main
from llmfab.host.golden_backend import GoldenDevice
from llmfab.host.xrt_backend import XrtDevice
from llmfab.sim.rtl import xrt_card

import tinymodel


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("xrt")
    m = load_model(tinymodel.write_tiny_gguf(d / "t.gguf", "q4_1", seed=3))
    cfg = load_config("tiny")
    return d, m, cfg, compile_model(m, cfg)


def test_two_layer_model_on_the_simulated_card(tiny):
    d, m, cfg, b = tiny
    dev = XrtDevice(m, cfg, bundle=b)
    try:
        assert dev.simulated and dev.stats()["device"] == "simulated"
        gold = GoldenDevice(m, cfg, bundle=b)
        toks = [1, 7, 42, 99, 200, 3]
        lx = dev.forward(toks)              # a prefill bucket for the first tokens, as golden
        lg = gold.forward(toks)
        assert np.array_equal(_bits(lx), _bits(lg))
        assert sorted(r["tokens"] for r in dev.prefill_runs) == \
            sorted(t for t, n in gold.prefill_runs.items() for _ in range(n))
        # the KV cache on the card is the golden model's
        kv0, kvn = b.manifest["memory_map"]["kv"]
        assert np.array_equal(dev.read_flat(int(kv0), int(kvn)), gold.golden.hbm[int(kv0):int(kv0) + int(kvn)])
        # decode steps, one token each (the decode program)
        for t in (5, 6):
            assert np.array_equal(_bits(dev.forward([t])), _bits(gold.forward([t])))
        st = dev.stats()
        for key in ("cycles_per_token", "weight_bytes_per_token", "hbm_utilization",
                    "hbm_utilization_sustainable", "memory_sustainable_fraction", "busy_fraction"):
            assert key in st, key
        assert len(st["cycles_per_token"]) >= 2 and all(c > 0 for c in st["cycles_per_token"])
        assert 0 < st["hbm_utilization"] < 1
        assert set(st["busy_fraction"]) == {"ld", "cmp", "mv", "misc", "both", "st"}
        # greedy generation through the device API: golden's tokens
        assert dev.generate([5, 6, 7], 4).tokens == gold.generate([5, 6, 7], 4).tokens
        # a prompt as generate runs it: 4 through the KV-only program, 2 through the
        # last-logits program (generate's [5, 6, 7] above: 2 KV-only, then decode)
        dev.reset()
        gold.reset()
        n = len(dev.prefill_runs)
        lx, lg = dev.forward_last(toks), gold.forward_last(toks)
        assert lx.shape == (1, m.desc.vocab_size) and np.array_equal(_bits(lx), _bits(lg))
        assert [(r["tokens"], r["logits"]) for r in dev.prefill_runs[n:]] == [(4, False), (2, "last")]
        assert np.array_equal(dev.read_flat(int(kv0), int(kvn)), gold.golden.hbm[int(kv0):int(kv0) + int(kvn)])
        # reset zeroes the KV cache on the card
        dev.reset()
        assert not dev.read_flat(int(kv0), int(kvn)).any()
    finally:
        dev.close()


def test_one_bundle_on_golden_rtl_and_xrt(tiny, capsys):
    d, m, cfg, b = tiny
    path = d / "bundle"
    write_bundle(b, str(path))
    outs = {}
    for backend in ("golden", "rtl", "xrt"):
        rc = main(["generate", "--bundle", str(path), "--backend", backend, "--prompt", "the cat",
                   "--max-tokens", "3", "--json"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        outs[backend] = json.loads(out)
    assert outs["golden"]["tokens"] == outs["rtl"]["tokens"] == outs["xrt"]["tokens"]
    x = outs["xrt"]
    assert x["device"] == "simulated" and x["backend"] == "xrt"
    # the counters the rtl backend reports
    for key in ("cycles_per_token", "weight_bytes_per_token", "hbm_utilization", "busy_fraction"):
        assert key in x and key in outs["rtl"], key
    assert x["bundle"] == outs["golden"]["bundle"] == outs["rtl"]["bundle"]


def test_options_of_the_xrt_backend(tiny, capsys):
    d, m, cfg, b = tiny
    path = d / "bundle2"
    write_bundle(b, str(path))
    base = ["generate", "--bundle", str(path), "--prompt", "a", "--max-tokens", "1"]
    assert main(base + ["--backend", "golden", "--xclbin", "x"]) == 1
    assert capsys.readouterr().err.strip() == "llmfab: error: --xclbin applies to --backend xrt, not golden"
    assert main(base + ["--backend", "xrt", "--timeout-ms", "0"]) == 1
    assert capsys.readouterr().err.strip() == "llmfab: error: --timeout-ms must be at least 1, not 0"
    assert main(base + ["--backend", "xrt", "--xclbin", str(d / "k.xclbin")]) == 1
    assert capsys.readouterr().err.strip() == (f"llmfab: error: cannot load {d / 'k.xclbin'}: the simulated "
                                               f"card runs its own stand-in (no XRT here); drop --xclbin")
    assert main(base + ["--backend", "xrt", "--device", "1"]) == 1
    assert capsys.readouterr().err.strip().startswith("llmfab: error: cannot open card 1: no XRT Python "
                                                      "binding (pyxrt) on this machine")


def test_missing_sync_fails_as_on_a_card(tiny, monkeypatch):
    """A host that forgets a sync gets what a card gives it: the kernel runs on the old device
    memory (here zeros: no program, status of an illegal word) or the host reads its stale copy
    (no counter block)."""
    d, m, cfg, b = tiny
    real = xrt_card.bo.sync
    # 1. the image is written into the buffers but never synced to the device
    monkeypatch.setattr(xrt_card.bo, "sync", lambda self, direction, *a:
                        None if direction == xrt_card.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE
                        else real(self, direction, *a))
    dev = XrtDevice(m, cfg, bundle=b, prefill=False)
    try:
        with pytest.raises(SimError) as e:
            dev.forward([1])
        assert str(e.value) == ("xrt: the kernel stopped with status 1 (illegal instruction) at "
                                "instruction 0 (decode at position 0)")
    finally:
        dev.close()
    # 2. results are never synced back: the host reads its own zeroed counter block
    monkeypatch.setattr(xrt_card.bo, "sync", lambda self, direction, *a:
                        None if direction == xrt_card.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE
                        else real(self, direction, *a))
    dev = XrtDevice(m, cfg, bundle=b, prefill=False)
    try:
        with pytest.raises(BackendError, match=r"^xrt: the kernel completed decode at position 0 but its "
                                               r"counter block at 0x[0-9a-f]+ holds no result \(magic 0x0\)$"):
            dev.forward([1])
    finally:
        dev.close()


def test_waits_time_out(tiny):
    """Every wait is bounded: a run that needs more than the timeout is reported, not waited for.
    The simulated card counts the timeout in kernel-clock cycles of simulated time; with its
    clock taken down to 1 kHz, 1 ms is one cycle."""
    import dataclasses
    d, m, cfg, b = tiny
    dev = XrtDevice(m, cfg, bundle=b, prefill=False, timeout_ms=1)
    try:
        dev.forward([1])        # 1 ms at tiny's 100 MHz = 100,000 cycles: enough for a decode step
        assert 0 < dev.stats()["cycles_per_token"][-1] < 100_000
        dev._dev.xclbin.config = dataclasses.replace(cfg, clock_mhz=0.001)
        with pytest.raises(BackendError, match=r"^xrt: the kernel did not finish decode at position 1 "
                                               r"within 1 ms; the compute unit is still busy "
                                               r"\(reset the card: xbutil reset\)$"):
            dev.forward([2])
    finally:
        dev.close()


def test_64_bit_arguments_reach_the_kernel(tiny):
    """pyxrt passes C ints only: a 64-bit register goes as its two halves (kernel.xml's
    ``<name>_lo``/``_hi``), and a half >= 2**31 as the negative C int with its bits. Here the
    hbm_size register is 2**32 + 2**31 + the image size (a looser range check): the kernel reads
    back both halves, and the run still gives golden's logits."""
    from llmfab.hw.control import ARGS
    d, m, cfg, b = tiny
    dev = XrtDevice(m, cfg, bundle=b, prefill=False)
    try:
        size = dev.hbm_size
        dev.hbm_size = (1 << 32) + (1 << 31) + size
        lx = dev.forward([3])
        off = ARGS["hbm_size"][0]
        sim = dev._dev.sim
        assert (sim.read_reg(off), sim.read_reg(off + 4)) == ((1 << 31) + size, 1)
        assert np.array_equal(_bits(lx), _bits(GoldenDevice(m, cfg, bundle=b, prefill=False).forward([3])))
    finally:
        dev.close()


@pytest.mark.slow
def test_smollm2_on_the_simulated_card(capsys):
    """The issue's command: SmolLM2 on ci, "The capital of France is" + 3 tokens: the golden
    backend's tokens, and the logits of prompt + tokens bit for bit."""
    rc = main(["generate", "--backend", "xrt", "--config", "ci", "--prompt", "The capital of France is",
               "--max-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    x = json.loads(out)
    rc = main(["generate", "--backend", "golden", "--config", "ci", "--prompt", "The capital of France is",
               "--max-tokens", "3", "--json"])
    g = json.loads(capsys.readouterr()[0])
    assert x["tokens"] == g["tokens"] and x["device"] == "simulated"
    assert all(k in x for k in ("cycles_per_token", "hbm_utilization", "busy_fraction"))
    from llmfab.compiler.tokenizer import Tokenizer
    m = load_model()
    cfg = load_config("ci")
    b = compile_model(m, cfg)
    seq = Tokenizer.from_gguf(m.path).encode("The capital of France is") + x["tokens"]
    dev = XrtDevice(m, cfg, bundle=b)
    try:
        assert np.array_equal(_bits(dev.logits(seq)), _bits(GoldenDevice(m, cfg, bundle=b).logits(seq)))
    finally:
        dev.close()
