"""hw/sfu.py under Verilator against core.numerics (special functions and vector ops)."""

from pathlib import Path

import pytest

from llmfab.boards.config import load_config
from llmfab.hw.sfu import Sfu, units
from llmfab.sim.rtl.runner import run_cocotb, to_verilog

from tb import soak  # noqa: E402  (tests/rtl is on sys.path)
from test_fp import verilator_lint  # noqa: E402



@soak(12_000)
def test_sfu(vectors):
    """``vectors`` values per special function (1,000, or 12,000 under slow), vector ops,
    throughput."""
    unit = units(load_config("ci"))["sfu"]
    run_cocotb(to_verilog(unit, "sfu"), "sfu", "cocotb_sfu", module_dir=Path(__file__).parent,
               
               extra_env={"SFU_MAX_LEN": str(unit.max_len), "SFU_N": str(vectors)})


def test_max_len_validated():
    with pytest.raises(ValueError, match="max_len must be a power of two"):
        Sfu(max_len=1000)


def test_sfu_lint(tmp_path):
    assert verilator_lint(to_verilog(Sfu(max_len=64), "sfu"), "sfu", tmp_path) == ""
