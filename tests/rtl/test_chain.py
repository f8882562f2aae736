"""The DSP chain (hw/chain.py): bit-exact against core.numerics under Verilator, and its constructor.

Two Verilator builds: the `ci` configuration's chain (32 weights, int4 packing) and
a 64-weight unpacked chain (two break points per cycle, one product per DSP). The
u280 geometry (128 weights, packed) runs in Amaranth's simulator on fewer blocks.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.hw.chain import (Chain, FORMAT_CODES, PATTERN_CODES, act_beat_layout,
                             result_beat_layout, units, weight_beat_layout)
from llmfab.sim.rtl.runner import run_cocotb, to_verilog

HERE = Path(__file__).parent
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
sys.path.insert(0, str(HERE))
import cocotb_chain as cc  # noqa: E402
from tb import pack, soak, unpack  # noqa: E402


def _run(chain: Chain, name: str, blocks: int, tmp_path):
    report = tmp_path / "report.json"
    run_cocotb(to_verilog(chain, "chain"), "chain", "cocotb_chain", module_dir=HERE,
               extra_env={"CHAIN_LENGTH": str(chain.length), "CHAIN_PACK": str(int(chain.pack_int4)),
                          "CHAIN_BLOCKS": str(blocks), "CHAIN_SEED": "1",
                          "CHAIN_FORMATS": ",".join(chain.formats),
                          "CHAIN_PATTERNS": ",".join(chain.patterns),
                          "CHAIN_REPORT": str(report)})
    rep = json.loads(report.read_text())
    print(f"\n{name}: {rep['random_blocks']} random blocks in {rep['random_cycles']} cycles")
    for mode, r in rep["steady_state"].items():
        print(f"  {mode:12s} {r['cycles_per_beat']:.3f} cycles/beat "
              f"({r['blocks_per_cycle']:.2f} blocks/cycle), latency {r['latency']}")
    return rep


@soak(10_000)
def test_chain_ci_rtl(tmp_path, vectors):
    """`ci` chain: random blocks over every format x pattern (1,000, or 10,000 under slow),
    plus steady state."""
    chain = units(load_config("ci"))["chain"]
    rep = _run(chain, "ci chain", vectors, tmp_path)
    assert rep["random_blocks"] >= vectors
    ss = rep["steady_state"]
    assert ss["q4_0 dense"]["cycles_per_beat"] == 1.0
    assert ss["q8_0 dense"]["cycles_per_beat"] == 2.0      # int8 x int8: one product per DSP
    assert ss["q8_0 2:4"]["cycles_per_beat"] == 1.0


@soak(10_000)
def test_chain_unpacked_two_lanes_rtl(tmp_path, vectors):
    """64 weights, no packing: two independent block sums per cycle, every mode at 1 beat/cycle."""
    chain = Chain(length=64, pack_int4=False)
    rep = _run(chain, "64-weight unpacked chain", vectors, tmp_path)
    assert rep["random_blocks"] >= vectors
    assert all(r["cycles_per_beat"] == 1.0 for r in rep["steady_state"].values())


def test_chain_u280_geometry_pysim():
    """128 weights (4 break points), packed, in Amaranth's simulator: every mode, random stalls."""
    from amaranth.sim import Simulator
    chain = Chain(length=128, pack_int4=True)
    lanes = chain.lanes
    rng = np.random.default_rng(5)
    modes = [(f, p) for f in cc.FORMATS for p in cc.PATTERNS]
    w_items, x_items, exp = cc.make_beats(rng, modes, 60 * lanes * len(modes), lanes)
    got = []

    async def bench(ctx):
        i = 0
        prng = np.random.default_rng(6)
        while len(got) < len(exp):
            show = i < len(w_items) and prng.random() < 0.8
            ctx.set(chain.weights.valid, show)
            ctx.set(chain.acts.valid, show)
            if show:
                ctx.set(chain.weights.payload.as_value(), w_items[i])
                ctx.set(chain.acts.payload.as_value(), x_items[i])
            ready = prng.random() < 0.7
            ctx.set(chain.results.ready, ready)
            took = show and ctx.get(chain.weights.ready)
            if ready and ctx.get(chain.results.valid):
                got.append(ctx.get(chain.results.payload.as_value()))
            await ctx.tick()
            i += bool(took)

    sim = Simulator(chain)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    cc.check_results(got, exp, lanes, "u280 geometry")


@pytest.mark.parametrize("config", ["ci", "u280"])
def test_chain_verilog_lint_clean(config, tmp_path):
    """Verilator -Wall on the generated chain is clean apart from the documented waivers."""
    chain = units(load_config(config))["chain"]
    assert cc.verilator_lint(to_verilog(chain, "chain"), "chain", tmp_path) == ""


def test_chain_u280_steady_state_pysim():
    """u280 geometry, inputs never stalling, output always ready: result gaps per mode."""
    from amaranth.sim import Simulator
    chain = units(load_config("u280"))["chain"]
    lanes = chain.lanes
    rng = np.random.default_rng(8)
    modes = [("q4_0", "dense"), ("q4_1", "2:4"), ("q4_0", "2:16"), ("q8_0", "dense"),
             ("q8_0", "2:4")]
    beats = {mode: cc.make_beats(rng, [mode], 24 * lanes, lanes, shuffle=False) for mode in modes}
    seen = {}

    async def bench(ctx):
        ctx.set(chain.results.ready, 1)
        cycle = 0
        for mode in modes:
            w_items, x_items, exp = beats[mode]
            i, got, times = 0, [], []
            while len(got) < len(exp):
                show = i < len(w_items)
                ctx.set(chain.weights.valid, show)
                ctx.set(chain.acts.valid, show)
                if show:
                    ctx.set(chain.weights.payload.as_value(), w_items[i])
                    ctx.set(chain.acts.payload.as_value(), x_items[i])
                took = show and ctx.get(chain.weights.ready)
                if ctx.get(chain.results.valid):
                    got.append(ctx.get(chain.results.payload.as_value()))
                    times.append(cycle)
                await ctx.tick()
                cycle += 1
                i += bool(took)
            cc.check_results(got, exp, lanes, f"u280 steady state {mode}")
            seen[mode] = sorted(set(np.diff(times).tolist()))

    sim = Simulator(chain)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    print("\nu280 chain steady state (result gaps in cycles):", seen)
    for mode, gaps in seen.items():
        assert gaps == ([2] if mode == ("q8_0", "dense") else [1]), (mode, gaps)


def test_units_follow_config():
    for name in ("tiny", "ci", "u280"):
        cfg = load_config(name)
        chain = units(cfg)["chain"]
        chain._MustUse__silence = True
        assert chain.length == cfg.chain.length
        assert chain.lanes == cfg.block_lanes_per_chain
        assert chain.pack_int4 == cfg.chain.pack_int4
        assert chain.dsp_slots == cfg.mac_dsp_per_chain


def test_layouts_roundtrip():
    rng = np.random.default_rng(0)
    blk = cc.random_blocks(rng, 3, "q4_1", "2:4")
    lane = cc.lane_value("q4_1", "2:4", blk, 0)
    beat = {"fmt": FORMAT_CODES["q4_1"].value, "pattern": PATTERN_CODES["2:4"].value, "last": 1,
            "lanes": [lane, lane]}
    assert unpack(weight_beat_layout(2), pack(weight_beat_layout(2), beat)) == beat
    acts = [list(range(-16, 16)), list(range(16))]
    assert unpack(act_beat_layout(2), pack(act_beat_layout(2), acts))[1][:16] == acts[1]
    assert result_beat_layout(1).size == 2 + 1 + 1 + 32 + 32 + 16 + 16


@pytest.mark.parametrize("kwargs, message", [
    ({"length": 48}, "Chain length must be a positive multiple of 32, not 48"),
    ({"length": 0}, "Chain length must be a positive multiple of 32, not 0"),
    ({"length": 32, "formats": ("q5_0",)}, "Chain formats must be among q4_0, q4_1, q8_0, not 'q5_0'"),
    ({"length": 32, "patterns": ("2:4",)}, "Chain patterns must include dense"),
])
def test_chain_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Chain(**kwargs)


def test_chain_rejects_non_integer_length():
    with pytest.raises(TypeError, match="Chain length must be an integer"):
        Chain(length="32")
