"""hw/fp.py under Verilator: fp_add, fp_mul and fp_cvt in one build, checked against sim.numerics."""

from pathlib import Path

from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from llmfab.hw import fp
from llmfab.sim.rtl.runner import run_cocotb, to_verilog


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


def test_fp_units():
    run_cocotb(to_verilog(FpTop(), "fp_top"), "fp_top", "cocotb_fp",
               module_dir=Path(__file__).parent)
