"""The combined execution unit: routes each compute-queue instruction to a sub-unit.

:class:`ExecUnit` has :func:`~llmfab.hw.execute.exec_signature` and holds
sub-units with the same signature. Each accepted instruction goes, in program
order, to the sub-unit its routing table names; the next instruction is taken
once that sub-unit has pulsed ``done`` (one instruction in flight at a time, so
there are no hazards between sub-units). The sub-unit being used owns ``rd0``,
``rd1`` and ``wr``; read responses go back to the sub-unit that made the request.

This is the accelerator's execution unit (``hw/top.py``'s :class:`Accelerator`
default). Routing (:func:`default_routes`): a dict whose keys are ``Op.MV`` /
``Op.MM`` (whole opcodes) or ``(Op.MISC, MiscFunc.X)``, values sub-unit names:

* MV, MM -> ``"mv"`` (:class:`~llmfab.hw.mv_exec.MvExec`);
* MISC NOP, COPY, ADD, MUL -> ``"misc"`` (:class:`~llmfab.hw.execute.MiscExec`,
  which executes these four bit-exactly);
* every other MISC (QUANT, RMSNORM, ROPE, SILU_MUL, ATTN, EMBED) -> ``"sfu"``
  (:class:`~llmfab.hw.sfu_exec.SfuExec`).

A word no route names goes to ``"misc"``. Extending: pass ``units`` (name ->
factory ``f(addr_bits=, line_bytes=)``) and ``routes``.

Test double: ``sfu=False`` asks, by name, for MiscExec's fixed-latency
placeholder (it writes nothing) instead of the SFU unit, for benches of the MV
engine that do not want the SFU's build time. Nothing picks it by default or on
a failed import.
"""

from amaranth import Cat, Module, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import Out

from llmfab.hw.execute import MiscExec, exec_signature
from llmfab.hw.isa import Instruction, MiscFunc, Op
from llmfab.hw.mv_exec import MvExec
from llmfab.hw.onchip import mem_read_signature, region_map, slice_geometry
from llmfab.hw.sfu_exec import SfuExec

__all__ = ["ExecUnit", "default_routes", "default_units"]

#: MISC functions MiscExec executes itself.
MISC_SIMPLE = (MiscFunc.NOP, MiscFunc.COPY, MiscFunc.ADD, MiscFunc.MUL)


def default_routes(have_sfu: bool = True) -> dict:
    """The routing table; ``have_sfu=False``: the SFU operations to MiscExec's placeholder."""
    routes = {Op.MV: "mv", Op.MM: "mv"}
    for f in MiscFunc:
        routes[(Op.MISC, f)] = "misc" if (f in MISC_SIMPLE or not have_sfu) else "sfu"
    return routes


def default_units(config, *, sfu: bool = True) -> dict:
    """name -> factory(addr_bits=, line_bytes=) for the configuration's engines.

    ``sfu=False`` leaves the SFU unit out (the test double of the module docstring).
    """
    if config is None:
        raise TypeError("default_units needs the accelerator configuration (the MV engine's "
                        "chain and the SFU unit's global-buffer base come from it)")
    units = {"misc": lambda **kw: MiscExec(**kw), "mv": MvExec.for_config(config)}
    if sfu:
        gb = dict((r[0], r[1]) for r in region_map(config))["global"]
        units["sfu"] = lambda **kw: SfuExec(gb_base=gb, **kw)
    return units


class ExecUnit(wiring.Component):
    """Execution unit routing MV/MM/MISC words to sub-units (see the module docstring).

    Parameters
    ----------
    addr_bits, line_bytes : int
    config : AccelConfig
        Passed to the sub-units' factories (chain length, formats, patterns, the
        global buffer's base); needed unless ``units`` is given.
    units : dict, optional
        name -> factory(addr_bits=, line_bytes=); default :func:`default_units`.
    sfu : bool
        With the default units: True (default) the SFU unit; False asks for
        MiscExec's placeholder for the SFU operations (a test double).
    routes : dict, optional
        ``Op`` or ``(Op.MISC, MiscFunc)`` -> unit name; default :func:`default_routes`.
    """

    def __init__(self, *, addr_bits: int, line_bytes: int, config=None, units=None, routes=None,
                 sfu: bool = True):
        self._ab = addr_bits
        self._d = line_bytes
        self._units = dict(units) if units is not None else default_units(config, sfu=sfu)
        self._routes = dict(routes) if routes is not None else default_routes("sfu" in self._units)
        for k, v in self._routes.items():
            if v not in self._units:
                raise ValueError(f"route {k!r} names unit {v!r}, which is not one of "
                                 f"{sorted(self._units)}")
        if "misc" not in self._units:
            raise ValueError("ExecUnit needs a 'misc' unit (the default route)")
        sig = dict(exec_signature(addr_bits, line_bytes * 8).members)
        if config is not None:
            # the slices' weight-bank read ports (hw/onchip.py), passed to the unit that has them
            g = slice_geometry(config)
            self._slices = g["slices"]
            sig = sig | {"bank": Out(mem_read_signature(
                g["bank_addr_bits"], g["stripe"] * 8)).array(g["slices"], 2)}
        super().__init__(sig)

    @classmethod
    def factory(cls, config, **kw):
        """``exec_factory`` for ``Accelerator(config, exec_factory=...)``."""
        return lambda *, addr_bits, line_bytes: cls(addr_bits=addr_bits, line_bytes=line_bytes,
                                                    config=config, **kw)

    @property
    def routes(self):
        return dict(self._routes)

    def elaborate(self, platform):
        m = Module()
        names = sorted(set(self._routes.values()) | {"misc"})
        subs = []
        for n in names:
            u = self._units[n](addr_bits=self._ab, line_bytes=self._d)
            m.submodules[n] = u
            subs.append(u)
        index = {n: i for i, n in enumerate(names)}

        # ---- which unit the head instruction goes to
        iw = data.View(Instruction, self.instr.payload.word)
        op, func = iw.header.op, iw.header.func
        target = Signal(range(max(len(subs), 2)))
        m.d.comb += target.eq(index["misc"])
        with m.Switch(op):
            for key, n in self._routes.items():
                if not isinstance(key, tuple):
                    with m.Case(key):
                        m.d.comb += target.eq(index[n])
            with m.Case(Op.MISC):
                with m.Switch(func):
                    for key, n in self._routes.items():
                        if isinstance(key, tuple):
                            assert key[0] == Op.MISC, key
                            with m.Case(key[1]):
                                m.d.comb += target.eq(index[n])

        busy = Signal()
        sel = Signal.like(target)
        sel_rsp0 = Signal.like(target)
        sel_rsp1 = Signal.like(target)
        m.d.sync += [sel_rsp0.eq(sel), sel_rsp1.eq(sel)]
        go = self.instr.valid & self.instr.ready
        for i, u in enumerate(subs):
            m.d.comb += [u.instr.payload.eq(self.instr.payload),
                         u.instr.valid.eq(self.instr.valid & ~busy & (target == i)),
                         u.context.eq(self.context), u.snoop.eq(self.snoop)]
            with m.If(target == i):
                m.d.comb += self.instr.ready.eq(~busy & u.instr.ready)
        with m.If(go):
            m.d.sync += [busy.eq(1), sel.eq(target)]
        done = Signal()
        m.d.comb += done.eq(Cat(u.done & (sel == i) for i, u in enumerate(subs)).any())
        m.d.comb += self.done.eq(busy & done)
        with m.If(busy & done):
            m.d.sync += busy.eq(0)

        # ---- memory ports: the selected unit's requests; responses to the requester
        if "bank" in self.signature.members:
            owners = [u for u in subs if "bank" in u.signature.members]
            if len(owners) > 1:
                raise ValueError("only one execution sub-unit may own the weight-bank ports")
            if owners:
                for p in range(self._slices):
                    for k in range(2):
                        wiring.connect(m, owners[0].bank[p][k], wiring.flipped(self.bank[p][k]))
        for port, sel_r in ((self.rd0, sel_rsp0), (self.rd1, sel_rsp1)):
            for i, u in enumerate(subs):
                p = getattr(u, port is self.rd0 and "rd0" or "rd1")
                m.d.comb += [p.req.ready.eq(port.req.ready & busy & (sel == i)),
                             p.rsp.valid.eq(port.rsp.valid & (sel_r == i)),
                             p.rsp.payload.eq(port.rsp.payload)]
                with m.If(sel == i):
                    m.d.comb += [port.req.valid.eq(busy & p.req.valid),
                                 port.req.payload.eq(p.req.payload)]
        for i, u in enumerate(subs):
            m.d.comb += u.wr.req.ready.eq(self.wr.req.ready & busy & (sel == i))
            with m.If(sel == i):
                m.d.comb += [self.wr.req.valid.eq(busy & u.wr.req.valid),
                             self.wr.req.payload.eq(u.wr.req.payload)]
        return m
