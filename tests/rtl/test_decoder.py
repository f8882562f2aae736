"""The weight decoder (hw/decoder.py) against compiler.quant / compiler.sparse, and decoder -> chain.

Verilator builds: the `ci` decoder (1 block per beat from 256-bit memory beats) and
the `ci` decoder wired to the `ci` chain. The u280 geometry (4 blocks per beat from
512-bit beats) and the tiny one (128-bit beats) run in Amaranth's simulator.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from llmfab.boards.config import load_config
from llmfab.core.formats import SPARSITY_PATTERNS, block_bytes
from llmfab.compiler import quant
from llmfab.hw import chain as hwchain
from llmfab.hw import decoder as hwdec
from llmfab.sim.rtl.runner import run_cocotb, to_verilog

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import cocotb_decoder as cd  # noqa: E402
from tb import pack, soak  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _env(dec, blocks, report):
    return {"DEC_LANES": str(dec.lanes), "DEC_WIDTH": str(dec.data_width),
            "DEC_BLOCKS": str(blocks), "DEC_SEED": "1", "DEC_REPORT": str(report),
            "DEC_FORMATS": ",".join(dec.formats), "DEC_PATTERNS": ",".join(dec.patterns)}


@soak(10_000)
def test_decoder_ci_rtl(tmp_path, vectors):
    """`ci` decoder: blocks (1,000, or 10,000 under slow) in random matrices of every mode,
    random stalls on every stream, then the steady-state rate of every mode."""
    dec = hwdec.units(load_config("ci"))["decoder"]
    report = tmp_path / "report.json"
    run_cocotb(to_verilog(dec, "decoder"), "decoder", "cocotb_decoder", module_dir=HERE,
               extra_env=_env(dec, vectors, report),
               testcase=["random_traffic", "steady_state"])
    rep = json.loads(report.read_text())
    print(f"\nci decoder: {rep['random_blocks']} random blocks in {rep['random_matrices']} "
          f"matrices, {rep['random_cycles']} cycles")
    for mode, r in rep["steady_state"].items():
        print(f"  {mode:12s} {r['bytes_per_block']:2d} B/block  {r['cycles_per_beat']:.3f} "
              f"cycles/beat ({r['blocks_per_cycle']:.3f} blocks/cycle), latency {r['latency']}")
    assert rep["random_blocks"] >= vectors
    ss = rep["steady_state"]
    assert ss["q4_1 dense"]["cycles_per_beat"] == 1.0        # 20 B <= 32 B per cycle
    assert ss["q4_0 dense"]["cycles_per_beat"] == 1.0
    assert ss["q8_0 dense"]["cycles_per_beat"] == pytest.approx(34 / 32, abs=0.01)


class DecodeChain(wiring.Component):
    """decoder -> chain, the way the matrix engine wires one lane (test harness)."""

    def __init__(self, config):
        self.dec = hwdec.units(config)["decoder"]
        self.chain = hwchain.units(config)["chain"]
        lanes = self.chain.lanes
        super().__init__({
            "cmd": In(stream.Signature(hwdec.DecodeCommand)),
            "data": In(stream.Signature(config.hbm.data_width)),
            "acts": In(stream.Signature(hwchain.act_beat_layout(lanes))),
            "results": Out(stream.Signature(hwchain.result_beat_layout(lanes))),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.dec = self.dec
        m.submodules.chain = self.chain
        wiring.connect(m, wiring.flipped(self.cmd), self.dec.cmd)
        wiring.connect(m, wiring.flipped(self.data), self.dec.data)
        wiring.connect(m, self.dec.weights, self.chain.weights)
        wiring.connect(m, wiring.flipped(self.acts), self.chain.acts)
        wiring.connect(m, self.chain.results, wiring.flipped(self.results))
        return m


@soak(10_000)
def test_decoder_to_chain_rtl(tmp_path, vectors):
    """Real GGUF blocks (llama.cpp quantizer) through decoder and chain against core.numerics
    (1,000 blocks, or 10,000 under slow)."""
    cfg = load_config("ci")
    top = DecodeChain(cfg)
    report = tmp_path / "report.json"
    run_cocotb(to_verilog(top, "decode_chain"), "decode_chain", "cocotb_decoder",
               module_dir=HERE, extra_env=_env(top.dec, vectors, report),
               testcase="decode_chain")
    rep = json.loads(report.read_text())
    print(f"\ndecode -> chain: {rep['chained_blocks']} blocks in {rep['chained_cycles']} cycles")
    assert rep["chained_blocks"] >= vectors


def _pysim(dec, n_blocks, seed):
    rng = np.random.default_rng(seed)
    modes = [(f, p) for f in dec.formats for p in dec.patterns]
    cmds, beats, exp, info = cd.make_program(rng, modes, n_blocks, dec.lanes, dec.data_width,
                                             max_count=24, grain=dec.grain)
    _run_pysim(dec, cmds, beats, exp, seed)


def _run_pysim(dec, cmds, beats, exp, seed, p_cmd=0.7, p_data=0.8, p_ready=0.8):
    from amaranth.sim import Simulator
    got = []

    async def bench(ctx):
        ci = di = 0
        pr = np.random.default_rng(seed + 1)
        while len(got) < len(exp):
            cv = ci < len(cmds) and pr.random() < p_cmd
            dv = di < len(beats) and pr.random() < p_data
            ctx.set(dec.cmd.valid, cv)
            ctx.set(dec.data.valid, dv)
            if cv:
                ctx.set(dec.cmd.payload.as_value(), cmds[ci])
            if dv:
                ctx.set(dec.data.payload, beats[di])
            rd = pr.random() < p_ready
            ctx.set(dec.weights.ready, rd)
            ct = cv and ctx.get(dec.cmd.ready)
            dt = dv and ctx.get(dec.data.ready)
            if rd and ctx.get(dec.weights.valid):
                got.append(ctx.get(dec.weights.payload.as_value()))
            await ctx.tick()
            ci += bool(ct)
            di += bool(dt)

    sim = Simulator(dec)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    cd.check_beats(got, exp, dec.lanes, f"{dec.lanes} lanes x {dec.data_width} bit")


@pytest.mark.parametrize("config", ["u280", "tiny"])
def test_decoder_config_geometries_pysim(config):
    """u280 (4 blocks per beat, 512-bit beats) and tiny (128-bit beats) in Amaranth's simulator."""
    _pysim(hwdec.units(load_config(config))["decoder"], 1500, 3)


def test_decoder_u280_steady_state_pysim():
    """u280 geometry (4 lanes x 512 bit), data never stalling, output always ready."""
    from amaranth.sim import Simulator
    dec = hwdec.units(load_config("u280"))["decoder"]
    lanes, width = dec.lanes, dec.data_width
    rng = np.random.default_rng(12)
    modes = [("q4_0", "dense"), ("q4_1", "dense"), ("q4_0", "2:16"), ("q8_0", "dense"),
             ("q8_0", "2:4")]
    count = 64 * lanes
    runs = {}
    for fmt, pat in modes:
        data, golden, _ = cd.make_matrix(rng, fmt, pat, count)
        cmd = pack(hwdec.DecodeCommand, {"fmt": hwchain.FORMAT_CODES[fmt],
                                               "pattern": hwchain.PATTERN_CODES[pat],
                                               "count": count, "row_blocks": 32 * lanes})
        runs[(fmt, pat)] = (cmd, cd.beats_of(data, width),
                            cd.expected_beats(fmt, pat, golden, lanes, 32 * lanes))
    rate = {}

    async def bench(ctx):
        ctx.set(dec.weights.ready, 1)
        cycle = 0
        for mode, (cmd, beats, exp) in runs.items():
            ci = di = 0
            got, times = [], []
            while len(got) < len(exp):
                ctx.set(dec.cmd.valid, ci < 1)
                ctx.set(dec.cmd.payload.as_value(), cmd)
                ctx.set(dec.data.valid, di < len(beats))
                if di < len(beats):
                    ctx.set(dec.data.payload, beats[di])
                ct = ci < 1 and ctx.get(dec.cmd.ready)
                dt = di < len(beats) and ctx.get(dec.data.ready)
                if ctx.get(dec.weights.valid):
                    got.append(ctx.get(dec.weights.payload.as_value()))
                    times.append(cycle)
                await ctx.tick()
                cycle += 1
                ci += bool(ct)
                di += bool(dt)
            ctx.set(dec.cmd.valid, 0)
            ctx.set(dec.data.valid, 0)
            await ctx.tick()
            cycle += 1
            cd.check_beats(got, exp, lanes, f"u280 steady state {mode}")
            rate[mode] = (times[-1] - times[0]) / (len(times) - 1)

    sim = Simulator(dec)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    print("\nu280 decoder steady state (cycles per beat of 4 blocks):",
          {f"{f} {p}": round(r, 3) for (f, p), r in rate.items()})
    for (fmt, pat), r in rate.items():
        want = max(1.0, lanes * block_bytes(fmt, pat) / (width // 8))
        assert abs(r - want) < 0.05, (fmt, pat, r, want)


@pytest.mark.parametrize("p_ready", [1.0, 0.3])
def test_decoder_every_offset_and_mode_switch_pysim(p_ready):
    """The row pipelines' decoder (32-byte beats, even offsets): every mode at every even
    first-block offset (both steps of the two-step shift, every coarse word and fine step),
    one-row commands back to back so the format and pattern switch between rows, data always
    offered (the window stays full) and the output ready always, or 30% of cycles (the window
    full under back-pressure)."""
    dec = hwdec.Decoder(lanes=1, data_width=256)
    rng = np.random.default_rng(21)
    modes = [(f, p) for f in dec.formats for p in dec.patterns]
    cmds, beats, exp = [], [], []
    for offset in range(0, 32, dec.grain):
        for k in range(len(modes)):
            fmt, pat = modes[(k + offset) % len(modes)]
            count = 1 + (k + offset) % 3
            data, golden, _ = cd.make_matrix(rng, fmt, pat, count)
            cmds.append(pack(hwdec.DecodeCommand, {
                "fmt": hwchain.FORMAT_CODES[fmt], "pattern": hwchain.PATTERN_CODES[pat],
                "count": count, "row_blocks": 0, "offset": offset}))
            beats += cd.beats_of(data, dec.data_width, rng, offset)
            exp += cd.expected_beats(fmt, pat, golden, dec.lanes, 0)
    _run_pysim(dec, cmds, beats, exp, 22, p_cmd=1.0, p_data=1.0, p_ready=p_ready)


def test_decoder_any_byte_offset_pysim():
    """The one-slice MV unit's decoder (tiles start on any byte): odd first-block offsets."""
    dec = hwdec.Decoder(lanes=1, data_width=128, any_offset=True)
    assert dec.grain == 1
    _pysim(dec, 1000, 5)


def test_decoder_narrow_multi_lane_pysim():
    """Two blocks per beat from 64-bit beats: every block straddles several beats."""
    _pysim(hwdec.Decoder(lanes=2, data_width=64), 600, 4)


@pytest.mark.parametrize("config", ["ci", "u280"])
def test_decoder_verilog_lint_clean(config, tmp_path):
    """Verilator -Wall on the generated decoder is clean apart from the documented waivers."""
    import cocotb_chain as cc
    dec = hwdec.units(load_config(config))["decoder"]
    assert cc.verilator_lint(to_verilog(dec, "decoder"), "decoder", tmp_path) == ""


def test_block_layouts_match_the_byte_formats():
    """The decoder's Structs are as long as the catalogue's blocks (core/formats.py)."""
    for fmt in quant.BLOCK_BYTES:
        for p in SPARSITY_PATTERNS:
            lay = hwdec.block_layout(fmt, p)
            assert lay.size == 8 * block_bytes(fmt, p)


def test_decoder_window_sizes():
    d = hwdec.units(load_config("ci"))["decoder"]
    u = hwdec.units(load_config("u280"))["decoder"]
    d._MustUse__silence = u._MustUse__silence = True
    assert d.window_beats == 2 and d.block_bytes[("q8_0", "dense")] == 34
    assert u.window_beats == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"lanes": 0, "data_width": 256}, "Decoder lanes must be a positive integer, not 0"),
    ({"lanes": 1, "data_width": 96}, "Decoder data width must be a power of two from 64 to 2048 "
                                     "(the command's 8-bit offset), not 96"),
    ({"lanes": 1, "data_width": 32}, "Decoder data width must be a power of two from 64 to 2048 "
                                     "(the command's 8-bit offset), not 32"),
    ({"lanes": 1, "data_width": 4096}, "Decoder data width must be a power of two from 64 to 2048 "
                                       "(the command's 8-bit offset), not 4096"),
    ({"lanes": 1, "data_width": 256, "formats": ("q2_k",)},
     "Decoder formats must be among q4_0, q4_1, q8_0, not 'q2_k'"),
    ({"lanes": 1, "data_width": 256, "patterns": ("1:8",)},
     "Decoder patterns must be among dense, 2:4, 8:16, 4:16, 2:16, not '1:8'"),
])
def test_decoder_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        hwdec.Decoder(**kwargs)
