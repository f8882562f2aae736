"""hw/exec_unit.py: the accelerator's execution unit is the whole one, with no silent fallback.

(Its RTL runs in test_rtl_backend.py and test_probe_samples.py, MV/MM in test_mv_exec.py,
the SFU operations in test_sfu_exec.py.)"""

import subprocess
import sys

import pytest

from llmfab.boards.config import load_config
from llmfab.hw.exec_unit import MISC_SIMPLE, ExecUnit, default_routes, default_units
from llmfab.hw.isa import MiscFunc, Op
from llmfab.hw.top import Core


def test_default_routes_reach_every_engine():
    r = default_routes()
    assert r[Op.MV] == r[Op.MM] == "mv"
    for f in MiscFunc:
        assert r[(Op.MISC, f)] == ("misc" if f in MISC_SIMPLE else "sfu"), f


def test_core_builds_exec_unit_by_default():
    """Without ``exec_factory`` the core elaborates an ExecUnit holding mv, sfu and misc."""
    from amaranth.hdl import Fragment
    frag = Fragment.get(Core(load_config("tiny")), None)
    ex = dict((name, f) for f, name, *_ in frag.subfragments)["exec"]
    assert isinstance(ex.origins[0], ExecUnit), ex.origins
    assert sorted(name for _, name, *_ in ex.subfragments) == ["accepted", "misc", "mv", "sfu"]


def test_default_units_need_the_configuration():
    with pytest.raises(TypeError, match="needs the accelerator configuration"):
        default_units(None)
    assert set(default_units(load_config("tiny"))) == {"misc", "mv", "sfu"}


def test_broken_sfu_import_is_an_error_not_a_placeholder():
    """If hw/sfu_exec.py cannot be imported, neither can the execution unit (nor the top)."""
    code = ("import sys; sys.modules['llmfab.hw.sfu_exec'] = None\n"
            "try:\n    import llmfab.hw.top\nexcept ImportError:\n    sys.exit(3)\n"
            "sys.exit(0)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3


# ---- issue and done order, with stand-in units of fixed latency ---------------------------

def _fixed_latency_unit(latency, made):
    """A unit that takes an instruction, and ``latency`` cycles later pulses done (the
    instance goes to the list ``made``)."""
    from amaranth import Module, Signal
    from amaranth.lib import wiring

    from llmfab.hw.execute import exec_signature

    class Fixed(wiring.Component):
        def __init__(self, *, addr_bits, line_bytes):
            super().__init__(exec_signature(addr_bits, line_bytes * 8))

        def elaborate(self, platform):
            m = Module()
            left = Signal(range(latency + 1))
            m.d.comb += self.instr.ready.eq(left == 0)
            with m.If(self.instr.valid & self.instr.ready):
                m.d.sync += left.eq(latency)
            with m.Elif(left != 0):
                m.d.sync += left.eq(left - 1)
                m.d.comb += self.done.eq(left == 1)
            return m

    def make(**kw):
        made.append(Fixed(**kw))
        return made[-1]
    return make


def _run_exec_unit(words):
    """Feed ``words`` to an ExecUnit on tiny whose MISC unit takes 60 cycles and MV unit 5;
    returns (issue cycle per word, done cycles)."""
    from amaranth.sim import Simulator

    from llmfab.compiler import isa
    cfg = load_config("tiny")
    mv, misc = [], []
    units = {"misc": _fixed_latency_unit(60, misc), "mv": _fixed_latency_unit(5, mv)}
    routes = {Op.MV: "mv", Op.MM: "mv", **{(Op.MISC, f): "misc" for f in MiscFunc}}
    dut = ExecUnit(addr_bits=16, line_bytes=16, config=cfg, units=units, routes=routes)
    issued, dones = [], []
    sim = Simulator(dut)        # elaborates: the units exist from here
    mv, misc = mv[-1], misc[-1]

    async def bench(ctx):
        for w in words:
            ctx.set(dut.instr.payload.word, isa.encode(w))
            ctx.set(dut.instr.valid, 1)
            await ctx.tick().until(dut.instr.ready)
        ctx.set(dut.instr.valid, 0)

    async def watch(ctx):
        cyc = 0
        async for _clk, _rst, d, mv_go, misc_go in ctx.tick().sample(
                dut.done, mv.instr.valid & mv.instr.ready, misc.instr.valid & misc.instr.ready):
            cyc += 1
            if mv_go:
                issued.append(("MV", cyc))
            if misc_go:
                issued.append(("MISC", cyc))
            if d:
                dones.append(cyc)
            if len(dones) == len(words) or cyc > 2000:
                return

    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.add_testbench(watch)
    sim.run()
    return issued, dones


def test_mvs_stream_beside_a_long_misc_and_dones_stay_in_order():
    """A 60-cycle MISC (COPY) then three 5-cycle MVs on other on-chip bytes: the MVs issue one
    after another while the COPY runs (each as the last finishes), and the four dones come in
    program order — the COPY's, then the MVs' right behind it."""
    from llmfab.compiler import isa
    copy = isa.make("MISC", func=isa.MISC_FUNCS["COPY"], dst=0x400, a=0x0, n=16)
    mvs = [isa.make("MV", func=isa.mv_func("q4_0"), dst=0x800 + 0x40 * k, qsrc=0xc00, wb=0x1000,
                    rows=4, cols=32) for k in range(3)]
    issued, dones = _run_exec_unit([copy, *mvs])
    assert [k for k, _ in issued] == ["MISC", "MV", "MV", "MV"]
    t_misc = issued[0][1]
    t_mv = [c for k, c in issued if k == "MV"]
    # each MV issues once the one before it finished (5 cycles, +1 to see the done), all
    # while the COPY still runs
    assert all(b - a == 6 for a, b in zip(t_mv, t_mv[1:])), t_mv
    assert t_mv[-1] + 5 < t_misc + 60
    # dones in program order: the COPY's first, 60 cycles after it issued; the MVs', which
    # finished long before, on the next three cycles
    assert dones[0] == t_misc + 60
    assert dones[1:] == [dones[0] + 1, dones[0] + 2, dones[0] + 3]


def test_an_mv_that_touches_the_running_miscs_bytes_waits_for_it():
    """The same, but the second MV writes where the COPY writes: it waits until the COPY
    finishes, and the third MV (behind it in program order) waits too."""
    from llmfab.compiler import isa
    copy = isa.make("MISC", func=isa.MISC_FUNCS["COPY"], dst=0x400, a=0x0, n=16)
    mvs = [isa.make("MV", func=isa.mv_func("q4_0"), dst=d, qsrc=0xc00, wb=0x1000, rows=4, cols=32)
           for d in (0x800, 0x410, 0x880)]
    issued, dones = _run_exec_unit([copy, *mvs])
    t_misc = issued[0][1]
    t_mv = [c for k, c in issued if k == "MV"]
    assert t_mv[0] < t_misc + 60 <= t_mv[1] < t_mv[2]
    assert dones == sorted(dones) and len(dones) == 4 and dones[0] == t_misc + 60
