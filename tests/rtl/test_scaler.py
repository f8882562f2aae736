"""hw/scaler.py under Verilator against core.numerics.block_values + accum4."""

from pathlib import Path

import pytest

from llmfab.boards.config import load_config
from llmfab.hw.scaler import Scaler, units
from llmfab.sim.rtl.runner import run_cocotb, to_verilog

from tb import soak  # noqa: E402  (tests/rtl is on sys.path)
from test_fp import verilator_lint  # noqa: E402



@soak(12_000)
def test_scaler(vectors):
    """``vectors`` random blocks in rows (1,000, or 12,000 under slow), single blocks, throughput."""
    cfg = load_config("ci")
    unit = units(cfg)["scaler"]
    run_cocotb(to_verilog(unit, "scaler"), "scaler", "cocotb_scaler",
               module_dir=Path(__file__).parent,
               extra_env={"S_FORMATS": ",".join(unit.formats), "S_N": str(vectors)})


def test_formats_validated():
    with pytest.raises(ValueError, match="weight format must be"):
        Scaler(formats=("q4_k",))


@pytest.mark.parametrize("formats", [("q4_0", "q4_1", "q8_0"), ("q4_0", "q8_0")])
def test_scaler_lint(formats, tmp_path):
    assert verilator_lint(to_verilog(Scaler(formats=formats), "scaler"), "scaler", tmp_path) == ""
