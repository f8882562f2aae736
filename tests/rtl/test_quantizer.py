"""hw/quantizer.py under Verilator against core.numerics.quantize_act."""

from pathlib import Path

import pytest

from llmfab.hw.quantizer import Quantizer
from llmfab.sim.rtl.runner import run_cocotb, to_verilog

from tb import soak  # noqa: E402  (tests/rtl is on sys.path)
from test_fp import verilator_lint  # noqa: E402

LANES = 8


@soak(10_000)
def test_quantizer(vectors):
    """``vectors`` random blocks (1,000, or 10,000 under slow) bit-exact, then throughput."""
    run_cocotb(to_verilog(Quantizer(lanes=LANES), "quantizer"), "quantizer", "cocotb_quantizer",
               module_dir=Path(__file__).parent,
               extra_env={"Q_LANES": str(LANES), "Q_N": str(vectors)})


def test_lanes_validated():
    with pytest.raises(ValueError, match="lanes must be"):
        Quantizer(lanes=3)


@pytest.mark.parametrize("lanes", [1, 8, 32])
def test_quantizer_lint(lanes, tmp_path):
    assert verilator_lint(to_verilog(Quantizer(lanes=lanes), "quantizer"), "quantizer", tmp_path) == ""
