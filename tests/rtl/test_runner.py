"""The cocotb + Verilator harness itself: a counter built from Amaranth runs under Verilator."""

from pathlib import Path

from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from llmfab.sim.rtl.runner import run_cocotb, to_verilog


class Counter(wiring.Component):
    o: Out(8)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.o.eq(self.o + 1)
        return m


def test_counter_under_verilator():
    run_cocotb(to_verilog(Counter(), "counter"), "counter", "cocotb_counter",
               module_dir=Path(__file__).parent)
