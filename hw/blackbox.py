"""Units generated once and instantiated by name: linear, not per-instance, elaboration.

Amaranth elaborates and writes every instance of a unit as its own module, so a design
with 128 row pipelines (the u280's 32 slices x 4) spends most of its generation time
writing the same chain, decoder and scaler 128 times (about 3 s each). :class:`Shared`
stands in for a unit: it has the unit's signature, so the code around it does not
change, but it elaborates to one ``Instance`` of a module named after the unit's
parameters (``llmfab_<class>_<hash>``). :func:`~llmfab.hw.verilog.to_verilog` appends the
text of every such module the design instantiates, each generated once per process
(:func:`module_text`), so the output is one self-contained Verilog file as before.

The module's ports are the unit's, named as Amaranth names a component's ports (the
member path joined by ``__``) plus ``clk`` and ``rst``; the instance's ``rst`` is the
domain's reset (a ``ResetInserter`` around the design does not reach into the module),
or'ed with ``reset`` if one is given: a unit whose state must be cleared with the core's
per-run reset takes a signal that follows it (MvExec's slices: a register that the
``ResetInserter`` sets, so one cycle after the core's reset, while MvExec is idle).
Shared units instantiated inside a shared unit get that unit's ``rst``.
"""

from __future__ import annotations

import hashlib
import re

from amaranth import ClockSignal, Instance, Module, ResetSignal, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

__all__ = ["Shared", "module_text", "MODULE_RE", "append_modules"]

#: The names :class:`Shared` gives its modules.
MODULE_RE = re.compile(r"\bllmfab_[a-z0-9]+_[0-9a-f]{12}\b")

_FACTORIES: dict = {}      # module name -> factory of the unit
_TEXTS: dict = {}          # module name -> its Verilog (this process)


class Shared(wiring.Component):
    """An instance of ``make()``'s unit as a named module (see the module docstring).

    Parameters
    ----------
    key : plain data
        Everything ``make`` depends on (equal keys must make equal units).
    make : callable
        Returns the unit (an Amaranth component); called here once for the signature,
        and once more per process to write the module.
    reset : Value, optional
        An extra reset of the instance (or'ed with the domain's).
    """

    def __init__(self, key, make, *, reset=None):
        unit = make()
        unit._MustUse__silence = True                    # only its signature is used here
        kind = type(unit).__name__.lower()
        digest = hashlib.sha256(repr((kind, key)).encode()).hexdigest()[:12]
        self.module = f"llmfab_{kind}_{digest}"
        _FACTORIES.setdefault(self.module, make)
        self._reset = reset
        super().__init__(unit.signature)

    def elaborate(self, platform):
        m = Module()
        rst = ResetSignal() if self._reset is None else ResetSignal() | self._reset
        ports = {"i_clk": ClockSignal(), "i_rst": rst}
        for path, member, value in self.signature.flatten(self):
            v = Value.cast(value)
            if not isinstance(v, Signal):
                continue                                  # constant members are not ports
            name = "__".join(str(p) for p in path)
            ports[("o_" if member.flow == Out else "i_") + name] = v
        m.submodules.unit = Instance(self.module, **ports)
        return m


def module_text(name: str) -> str:
    """The Verilog of a :class:`Shared` module (generated once per process)."""
    if name not in _TEXTS:
        from amaranth.back import verilog

        from llmfab.hw.verilog import _no_zero_meminit
        _no_zero_meminit()
        unit = _FACTORIES[name]()
        ports = [v for v in (Value.cast(x) for _, _, x in unit.signature.flatten(unit))
                 if isinstance(v, Signal)]                # not the constant members
        # its own text only: append_modules adds what it instantiates in turn
        text = verilog.convert(unit, name=name, ports=ports, emit_src=False)
        head = text[text.index(f"module {name}("):]
        head = head[:head.index(";")]
        for port in ("clk", "rst"):
            if not re.search(rf"\b{port}\b", head):
                raise ValueError(f"shared unit {name} has no {port} port: it must be clocked")
        _TEXTS[name] = text
    return _TEXTS[name]


def append_modules(text: str) -> str:
    """``text`` followed by every :class:`Shared` module it (or an appended one) instantiates."""
    done = set(re.findall(r"^module (llmfab_\w+)\(", text, re.M))   # defined already
    out = [text]
    todo = [text]
    while todo:
        for name in sorted(set(MODULE_RE.findall(todo.pop())) - done):
            if name not in _FACTORIES:
                continue                                  # a name that only looks like one
            done.add(name)
            t = module_text(name)
            out.append(t)
            todo.append(t)
    return "".join(out)
