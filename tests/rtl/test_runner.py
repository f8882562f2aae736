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


def test_stale_shared_build_is_cleared(tmp_path):
    """A build directory naming a removed checkout's Verilator (makefile) or headers (dependency
    file) is emptied, lock kept; one whose files all exist is left alone."""
    from llmfab.sim.rtl.runner import clear_stale_build
    here = str(tmp_path)
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / ".lock").write_text("")
    (ok / "Vtop.mk").write_text(f"VERILATOR_ROOT = {here}\n")
    (ok / "Vtop__ALL.d").write_text(f"Vtop__ALL.o: {ok / 'Vtop.mk'} \\\n  {here}\n")
    assert not clear_stale_build(ok)
    assert sorted(p.name for p in ok.iterdir()) == [".lock", "Vtop.mk", "Vtop__ALL.d"]
    for name, mk, dep in (("root", f"VERILATOR_ROOT = {here}/gone\n", ""),
                          ("dep", f"VERILATOR_ROOT = {here}\n", f"x.o: {here}/gone/verilated.h\n")):
        d = tmp_path / name
        d.mkdir()
        (d / ".lock").write_text("")
        (d / "Vtop.mk").write_text(mk)
        (d / "Vtop__ALL.d").write_text(dep)
        (d / "obj").mkdir()
        assert clear_stale_build(d)
        assert [p.name for p in d.iterdir()] == [".lock"]
