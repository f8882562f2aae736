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


def _run_exec_unit(words, config="tiny", rvals=None, context=0):
    """Feed ``words`` to an ExecUnit on ``config`` whose MISC unit takes 60 cycles and MV
    unit 5 (``rvals``: each word's ``(rval, rval2)``, the registers it names); returns
    (issue cycle per word, done cycles)."""
    from amaranth.sim import Simulator

    from llmfab.compiler import isa
    cfg = config if not isinstance(config, str) else load_config(config)
    rvals = rvals or [(0, 0)] * len(words)
    mv, misc = [], []
    units = {"misc": _fixed_latency_unit(60, misc), "mv": _fixed_latency_unit(5, mv)}
    routes = {Op.MV: "mv", Op.MM: "mv", **{(Op.MISC, f): "misc" for f in MiscFunc}}
    dut = ExecUnit(addr_bits=16, line_bytes=16, config=cfg, units=units, routes=routes)
    issued, dones = [], []
    sim = Simulator(dut)        # elaborates: the units exist from here
    mv, misc = mv[-1], misc[-1]

    async def bench(ctx):
        ctx.set(dut.context, context)
        for w, (rv, rv2) in zip(words, rvals):
            ctx.set(dut.instr.payload.word, isa.encode(w))
            ctx.set(dut.instr.payload.rval, rv)
            ctx.set(dut.instr.payload.rval2, rv2)
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


# ---- attention on the chains ---------------------------------------------------------------

def test_chains_routes_and_units():
    """With attention on the chains KVROW and SOFTMAX go to the SFU unit, MUL (whatever its
    length register) stays MiscExec's, every other route is as without; the units get
    ``chains=True`` (the SFU unit the slices' geometry too) once they take it (the MV and SFU
    branches), and the units of a configuration without chains never get it."""
    from llmfab.hw import exec_unit as eu
    plain, chains = default_routes(), default_routes(chains=True)
    new = {(Op.MISC, MiscFunc.KVROW), (Op.MISC, MiscFunc.SOFTMAX)}
    assert all(chains[k] == "sfu" for k in new)
    assert chains[(Op.MISC, MiscFunc.MUL)] == "misc"
    assert {k: v for k, v in chains.items() if k not in new} == \
        {k: v for k, v in plain.items() if k not in new}
    assert set(default_routes(have_sfu=False, chains=True).values()) == {"mv", "misc"}

    # the units this checkout has: a unit that takes ``chains`` gets it on ci-chains only
    for name, want in (("ci-chains", True), ("ci", False)):
        cfg = load_config(name)
        units = default_units(cfg)
        for n, cls in (("misc", eu.MiscExec), ("mv", eu.MvExec), ("sfu", eu.SfuExec)):
            u = units[n](addr_bits=14, line_bytes=cfg.onchip_line_bytes)
            u._MustUse__silence = True
            if eu._takes(cls, "chains"):
                assert u._chains == want, (name, n)
            if n == "sfu" and want and eu._takes(cls, "slices"):
                assert (u._slices, u._stripe) == (cfg.slices, cfg.stripe_bytes)

    # stand-ins that take the keywords (what the merged units take)
    got = []

    class Misc:
        def __init__(self, *, addr_bits, line_bytes, chains=False):
            got.append(("misc", chains))

    class Sfu:
        def __init__(self, *, gb_base, addr_bits, line_bytes, chains=False, slices=1, stripe=64):
            got.append(("sfu", chains, slices, stripe))

    orig = eu.MiscExec, eu.SfuExec
    try:
        eu.MiscExec, eu.SfuExec = Misc, Sfu
        for name, want in (("ci-chains", True), ("ci", False)):
            got.clear()
            cfg = load_config(name)
            units = eu.default_units(cfg)
            for n in ("misc", "sfu"):
                units[n](addr_bits=8, line_bytes=16)
            geo = (cfg.slices, cfg.stripe_bytes) if want else (1, 64)
            assert got == [("misc", want), ("sfu", want, *geo)], name
    finally:
        eu.MiscExec, eu.SfuExec = orig


def _chains_case(case, far):
    """(words, rvals, context) of a 60-cycle MISC then an MV on ci-chains (two 32-byte
    slices: 1088-byte Q8_0 tiles of 32 rows), the registers ``far`` (True: the ranges meet)."""
    from llmfab.compiler import isa
    F = isa.MISC_FUNCS
    q8 = isa.mv_func("q8_0")
    wb = 0x40000                               # the KV buffer of ci-chains: MV operands
    copy = isa.make("MISC", func=F["COPY"], dst=wb + 1500, a=0x100, n=4)
    plain_mv = isa.make("MV", func=q8, wb=wb + 0x8000, rows=4, cols=32, qsrc=0x800, dst=0x8000)
    if case == "row tiles":                    # rows = 1 + R1: 41 rows are two tiles
        mv = isa.make("MV", func=q8 | isa.MV_RT, wb=wb, rows=1, cols=32, qsrc=0x800, dst=0x900,
                      rreg=1)
        return [copy, mv], [(0, 0), (40 if far else 0, 0)], 256
    if case == "block tiles":                  # cols = 32 + R9: 64 columns are two blocks
        mv = isa.make("MV", func=q8 | isa.MV_BT, wb=wb, rows=32, cols=32, qsrc=0x800, dst=0x900,
                      creg=9)
        return [copy, mv], [(0, 0), (0, 32 if far else 0)], 256
    if case == "softmax":                      # n + R1 = 41 values: 64 written; 1: 32 written
        first = isa.make("MISC", func=F["SOFTMAX"], dst=0x8000 - 200, a=0x100, n=1, reg=1)
        return [first, plain_mv], [(40 if far else 0, 0), (0, 0)], 256
    if case == "quant":                        # n + R9 = 64: two blocks, 80 bytes; 32: 40
        first = isa.make("MISC", func=F["QUANT"], dst=0x8000 - 60, a=0x100, n=32, reg=9)
        return [first, plain_mv], [(32 if far else 0, 0), (0, 0)], 256
    # KVROW: one KV head's whole region, which grows with the context
    size = isa.kv_region(32, 256, 2, 32)["size"]
    first = isa.make("MISC", func=F["KVROW"], dst=0x8000 - size + 4, a=0x100, n=32, reg=1)
    return [first, plain_mv], [(3, 0), (0, 0)], 256 if far else 32


@pytest.mark.parametrize("case", ["row tiles", "block tiles", "softmax", "quant", "kvrow"])
def test_chains_ranges_decide_the_overlap(case):
    """The execution unit's overlap check uses the chains footprint: an MV's register-extended
    shape (``rval`` = R[rreg], ``rval2`` = R[creg]) and tiled layout, SOFTMAX's rounded-up
    result, a QUANT's n + R[reg], KVROW's whole region. A 60-cycle MISC, then an MV: the MV
    runs beside it when the registers (the context) keep the ranges apart, and waits for it
    when they make them meet."""
    for far in (False, True):
        words, rvals, context = _chains_case(case, far)
        issued, dones = _run_exec_unit(words, "ci-chains", rvals, context)
        t_misc = [c for k, c in issued if k == "MISC"][0]
        t_mv = [c for k, c in issued if k == "MV"][0]
        assert (t_mv >= t_misc + 60) == far, (case, far, issued)
        assert len(dones) == 2
