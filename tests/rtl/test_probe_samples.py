"""The live counters (``hw/top.py``'s ``probe``) sampled during runs on the tiny configuration:
monotone, exactly ``sample_every`` cycles apart, ending at the counter block, and
``busy_mv + busy_misc == busy_cmp`` throughout."""

import numpy as np

from llmfab.boards.config import load_config
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.hw.control import counter_names
from llmfab.hw.top import Accelerator, probe_names
from llmfab.host.rtl_backend import RtlDevice

import tinymodel

EVERY = 500
#: Counters that grow by at most one per cycle (the rest count bytes).
_PER_CYCLE = ("cycles", "validate_cycles", "exec_cycles", "busy_", "instr_", "stall_", "wait_")


def test_probe_is_off_by_default():
    cfg = load_config("tiny")
    plain, acc = Accelerator(cfg), Accelerator(cfg, probe=True)
    plain._MustUse__silence = acc._MustUse__silence = True     # signatures only, not elaborated
    assert "probe" not in plain.signature.members
    assert len(acc.probe) == 64 * len(probe_names(1))
    assert {"busy_mv", "busy_misc"} <= set(counter_names(1))
    assert set(probe_names(1)) == set(counter_names(1)) - {"magic", "status", "pc"}


def test_samples_consistent_with_counter_block(tmp_path):
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_1", seed=3))
    cfg = load_config("tiny")
    b = compile_model(m, cfg)
    rtl = RtlDevice(m, cfg, bundle=b, sample_every=EVERY)
    try:
        rtl.forward([1, 7, 42])
        names = probe_names(cfg.hbm.ports)
        for r in rtl.runs:
            c = r.counters
            assert r.status == 0 and c["busy_mv"] + c["busy_misc"] == c["busy_cmp"]
            assert c["busy_mv"] > 0 and c["busy_misc"] > 0
            # MISC work beside MV work (the SiLU of one FFN tile beside the next tile's MVs)
            assert 0 < c["busy_both"] < c["busy_cmp"]
            s = r.samples
            assert len(s) >= 2 + c["cycles"] // EVERY - 2 and all(set(x) == set(names) for x in s)
            a = np.array([[x[n] for n in names] for x in s], dtype=np.int64)
            # cumulative counters never go down
            assert (np.diff(a, axis=0) >= 0).all()
            cyc = a[:, names.index("cycles")]
            # the periodic samples are exactly EVERY cycles apart while the counters run; the
            # last one may fall after they stopped (the counter block being written): closer
            d = np.diff(cyc[:-1])
            assert (d[:-1] == EVERY).all() and 0 <= d[-1] <= EVERY
            # the last one is taken after the run: the counter block's values exactly
            assert s[-1] == {n: c[n] for n in names}
            # the last periodic one is within one interval of the end
            last = s[-2]
            assert 0 <= c["cycles"] - last["cycles"] <= EVERY
            for n in names:
                if n.startswith(_PER_CYCLE):
                    assert 0 <= c[n] - last[n] <= c["cycles"] - last["cycles"], n
            for x in s:
                assert x["busy_mv"] + x["busy_misc"] == x["busy_cmp"]
                assert max(x["busy_ld"], x["busy_cmp"], x["busy_st"]) <= x["cycles"]
        # without sample_every nothing is recorded
        rtl.sample_every = None
        rtl.forward([3])
        assert rtl.runs[-1].samples == [] and rtl.runs[-1].status == 0
    finally:
        rtl.close()
