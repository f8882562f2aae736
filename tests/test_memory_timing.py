"""Memory timing figures of the boards (boards/memory_timing.py): parsing, borrowing, the
analytical sustainable bandwidth against the figure each board cites, and the perf model's use."""

import pytest

from llmfab.boards import memory_timing as mt
from llmfab.boards.board import board_from_dict, load_board
from llmfab.boards.config import load_config
from llmfab.core.errors import BoardError


def test_u280_hbm2_timing_and_borrowers():
    u280 = load_board("u280")
    t = u280.main_memory.timing
    assert t.standard == "HBM2" and t.measured_sustained_gbps == 425
    assert u280.memory[1].timing.standard == "DDR4"
    for name in ("u55c", "sim-small", "sim-tiny"):
        mem = load_board(name).main_memory
        assert mem.timing == t and mem.timing_board == "u280"


@pytest.mark.parametrize("config", ["u280", "ci", "tiny"])
def test_sustainable_fraction_within_5_percent_of_shuhai(config):
    cfg = load_config(config)
    cited = mt.measured_fraction(cfg)
    assert cited == pytest.approx(425 / 460)
    assert abs(mt.sustainable_fraction(cfg) - cited) <= 0.05 * cited
    assert mt.sustainable_fraction(cfg, "ideal") == 1.0
    assert cfg.sustainable_hbm_gbps < cfg.peak_hbm_gbps


def test_timing_params_in_cycles():
    ci = load_config("ci")                       # 200 MHz, 32-byte beats, 6.4 GB/s channels
    p = mt.timing_params(ci, "card")
    assert p.beat_cycles == pytest.approx(1.0)
    assert p.read_latency == pytest.approx(106.7 * 0.2)
    assert p.refresh_interval == pytest.approx(780) and p.channels == 4
    ideal = mt.timing_params(ci, "ideal").to_array()
    assert ideal[0] == 0 and ideal[2] == mt.IDEAL_READ_LATENCY
    assert len(p.to_array()) == len(ideal) == 16
    with pytest.raises(BoardError, match="unknown memory model 'fast'"):
        mt.timing_params(ci, "fast")


def _board(timing):
    d = dict(name="x", part="p", family="ultrascale_plus", description="d",
             resources=dict(dsp=1, lut=1, ff=1, bram36=1, uram=1), dsp_type="DSP48E2",
             memory=[dict(kind="hbm", channels=2, capacity_mib_per_channel=64,
                          bandwidth_gbps_per_channel=1.6, timing=timing)],
             kernel_clock_mhz=100, max_kernel_clock_mhz=100, slrs=1, platform=None)
    return board_from_dict(d, "x.yaml")


def test_bad_timing_sections_are_one_line_errors():
    with pytest.raises(BoardError, match=r"x.yaml: field 'memory\[0\].timing' must be a mapping .* not 'nope'"):
        _board("nope")
    good = load_board("u280").main_memory.timing.to_dict()
    bad = dict(good, refresh_ns=5000)
    with pytest.raises(BoardError, match=r"'memory\[0\].timing.refresh_ns' must be shorter"):
        _board(bad)
    with pytest.raises(BoardError, match="did you mean 'memory\\[0\\].timing.trc_ns'"):
        _board({**{k: v for k, v in good.items() if k != "trc_ns"}, "trc": 45})
    assert _board("u280").main_memory.timing_board == "u280"
    assert _board(good).main_memory.timing == load_board("u280").main_memory.timing


def test_board_without_timing_runs_ideal_only():
    b = load_board("v80")
    assert b.memory[1].timing is None
