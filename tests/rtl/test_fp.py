"""hw/fp.py under Verilator: fp_add, fp_mul and fp_cvt in one build, checked against core.numerics."""

import os
import subprocess
from pathlib import Path

from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from llmfab.hw import fp
from llmfab.sim.rtl.runner import VERILATOR_ARGS, run_cocotb, to_verilog, verilator_env

from tb import soak

#: Beyond the runner's waivers, -Wall flags two things of Amaranth's Verilog style:
#: ``reg x = init;`` assigned in ``always`` (PROCASSINIT), FSM ``case``s without default.
LINT_WAIVERS = ("-Wno-PROCASSINIT", "-Wno-CASEINCOMPLETE")


def verilator_lint(verilog: str, top: str, tmp_path) -> str:
    """Warnings of ``verilator --lint-only -Wall`` (runner's and LINT_WAIVERS waived); "" if clean."""
    root = verilator_env()
    src = Path(tmp_path) / f"{top}.v"
    src.write_text(verilog)
    waived = [a for a in VERILATOR_ARGS if a.startswith("-Wno-") and a != "-Wno-fatal"]
    r = subprocess.run([os.path.join(root, "bin", "verilator"), "--lint-only", "-Wall", *waived,
                        *LINT_WAIVERS, "--top-module", top, str(src)],
                       capture_output=True, text=True)
    return "\n".join(line for line in (r.stdout + r.stderr).splitlines() if line.startswith("%"))


class FpTop(wiring.Component):
    """The three float stream units side by side (one Verilator build for all)."""

    def __init__(self):
        super().__init__({
            "add_i": In(stream.Signature(fp.FAddOperands)), "add_o": Out(stream.Signature(32)),
            "mul_i": In(stream.Signature(fp.FMulOperands)), "mul_o": Out(stream.Signature(32)),
            "cvt_i": In(stream.Signature(fp.CvtOperands)), "cvt_o": Out(stream.Signature(32)),
        })

    def elaborate(self, platform):
        m = Module()
        for name, unit in fp.units(None).items():
            short = name.split("_")[1]
            m.submodules[name] = unit
            wiring.connect(m, wiring.flipped(getattr(self, f"{short}_i")), unit.i)
            wiring.connect(m, unit.o, wiring.flipped(getattr(self, f"{short}_o")))
        return m


@soak(12_000)
def test_fp_units(vectors):
    """``vectors`` operand pairs per unit (1,000, or 12,000 under slow), then throughput."""
    run_cocotb(to_verilog(FpTop(), "fp_top"), "fp_top", "cocotb_fp",
               module_dir=Path(__file__).parent, extra_env={"FP_N": str(vectors)})


def test_fp_lint(tmp_path):
    for name, unit in fp.units(None).items():
        assert verilator_lint(to_verilog(unit, name), name, tmp_path) == "", name
