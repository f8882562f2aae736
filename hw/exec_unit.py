"""The combined execution unit: routes each compute-queue instruction to a sub-unit.

:class:`ExecUnit` has :func:`~llmfab.hw.execute.exec_signature` and holds
sub-units with the same signature. Each accepted instruction goes, in program
order, to the sub-unit its routing table names, through two stages: the word,
then its on-chip footprint (``hw/dispatch.py``'s :class:`~llmfab.hw.dispatch.Footprint`,
the validation pass's ranges). **Overlap** (docs/isa.md): the units MV/MM go to
form one class, the others a second; each class's unit executes one instruction
at a time, and a word issues once its class's unit is free and its ranges share
no byte with those of the instruction the other class's unit executes, so an MV
and a MISC run side by side only on disjoint data and the results are the
in-order ones. A class's unit takes its next instruction as soon as it finishes the
last (the MV class's may take it in the cycle of its done: MvExec does), so MVs stream
on beside one long MISC (an ATTN); ``done`` pulses in
acceptance order (a younger instruction that finished first waits for the
older one's done; at most ``MAX_IN_FLIGHT`` issued and not yet done, the
compute queue's own bound in ``hw/top.py``); ``both`` is high while both units
are running. The running units share ``rd0``, ``rd1`` and ``wr``: the reads the MV class first (its
activation loads hold up its rows), the write the other class first (MISC results stream a
line a cycle, the MV class writes a row every few cycles from its combine), unless the MV
class's write has waited ``WR_AGE`` cycles; read responses go back to the unit whose request
was taken. Without a configuration (``units``
given, no layout to compare) every unit is one class: one instruction at a time.

This is the accelerator's execution unit (``hw/top.py``'s :class:`Accelerator`
default). Routing (:func:`default_routes`): a dict whose keys are ``Op.MV`` /
``Op.MM`` (whole opcodes) or ``(Op.MISC, MiscFunc.X)``, values sub-unit names:

* MV, MM -> ``"mv"`` (:class:`~llmfab.hw.mv_exec.MvExec`);
* MISC NOP, COPY, ADD, MUL -> ``"misc"`` (:class:`~llmfab.hw.execute.MiscExec`,
  which executes these four bit-exactly);
* every other MISC (QUANT, RMSNORM, ROPE, SILU_MUL, ATTN, EMBED; with attention on the
  chains KVROW and SOFTMAX) -> ``"sfu"`` (:class:`~llmfab.hw.sfu_exec.SfuExec`).

With attention on the chains (``attention: chains``) the footprint is the chains one (an
MV's register shape from ``rval``/``rval2`` and tiled layouts, dynamic MISC lengths, KVROW's
region: hw/dispatch.py) and the units are given ``chains=True`` (:func:`default_units`).

A word no route names goes to ``"misc"``. Extending: pass ``units`` (name ->
factory ``f(addr_bits=, line_bytes=)``) and ``routes``.

Test double: ``sfu=False`` asks, by name, for MiscExec's fixed-latency
placeholder (it writes nothing) instead of the SFU unit, for benches of the MV
engine that do not want the SFU's build time. Nothing picks it by default or on
a failed import.
"""

import inspect

from amaranth import C, Cat, Module, Mux, Signal
from amaranth.lib import data, fifo, wiring
from amaranth.lib.wiring import Out

from llmfab.hw.dispatch import Footprint
from llmfab.hw.execute import MAX_IN_FLIGHT, ExecInstr, MiscExec, exec_signature
from llmfab.hw.isa import Instruction, MiscFunc, Op
from llmfab.hw.mv_exec import MvExec
from llmfab.hw.onchip import (bank_halves, is_chains, mem_read_signature, region_map,
                              slice_geometry)
from llmfab.hw.sfu_exec import SfuExec

__all__ = ["ExecUnit", "MISC_CHAINS", "default_routes", "default_units"]

#: Cycles the MV class's write may wait behind the other class's before it goes first.
WR_AGE = 4

#: MISC functions MiscExec executes itself.
MISC_SIMPLE = (MiscFunc.NOP, MiscFunc.COPY, MiscFunc.ADD, MiscFunc.MUL)


#: MISC functions of attention on the chains the SFU unit executes (docs/isa.md).
MISC_CHAINS = (MiscFunc.KVROW, MiscFunc.SOFTMAX)


def default_routes(have_sfu: bool = True, chains: bool = False) -> dict:
    """The routing table; ``have_sfu=False``: the SFU operations to MiscExec's placeholder.

    ``chains`` (attention on the chains): KVROW and SOFTMAX go to the SFU unit (they do
    without it too: a configuration without chains never executes them, its validator
    refuses them); MUL, whatever its length register, stays MiscExec's."""
    routes = {Op.MV: "mv", Op.MM: "mv"}
    for f in MiscFunc:
        routes[(Op.MISC, f)] = "misc" if (f in MISC_SIMPLE or not have_sfu) else "sfu"
    if chains and have_sfu:
        for f in MISC_CHAINS:
            routes[(Op.MISC, f)] = "sfu"
    return routes


def _takes(cls, kwarg: str) -> bool:
    """Whether ``cls(...)`` takes keyword ``kwarg``."""
    return kwarg in inspect.signature(cls.__init__).parameters


def default_units(config, *, sfu: bool = True) -> dict:
    """name -> factory(addr_bits=, line_bytes=) for the configuration's engines.

    ``sfu=False`` leaves the SFU unit out (the test double of the module docstring).
    With attention on the chains (``config.attention == "chains"``) the units get
    ``chains=True`` (MvExec: tiled layouts and register shapes, through
    ``MvExec.for_config``; SfuExec: SOFTMAX, KVROW, QUANT lengths, with the slices'
    geometry; MiscExec: MUL lengths) once they take it.
    """
    if config is None:
        raise TypeError("default_units needs the accelerator configuration (the MV engine's "
                        "chain and the SFU unit's global-buffer base come from it)")
    chains = is_chains(config)
    # attention on the chains: MiscExec (MUL n + R[reg]) and SfuExec (SOFTMAX, KVROW on the
    # slices' KV-head layout, QUANT n + R[reg]) take ``chains`` from the SFU branch, MvExec
    # (tiled layouts, register shapes) from the MV branch, where ``MvExec.for_config`` reads
    # it from the configuration itself. Until those are merged the units do not take it and
    # a chains configuration gets units that do not execute the chains words (its validator
    # accepts them: hw/dispatch.py's Footprint); test_exec_unit.py checks that a unit that
    # takes ``chains`` gets it.
    misc_kw = {"chains": True} if chains and _takes(MiscExec, "chains") else {}
    sfu_kw = {}
    if chains and _takes(SfuExec, "chains"):
        sfu_kw["chains"] = True
        if _takes(SfuExec, "slices"):
            sfu_kw.update(slices=config.slices, stripe=config.stripe_bytes)
    units = {"misc": lambda **kw: MiscExec(**misc_kw, **kw), "mv": MvExec.for_config(config)}
    if sfu:
        regions = dict((r[0], r[1]) for r in region_map(config))
        gb = regions["global"]
        if _takes(SfuExec, "cache_below"):   # the banked region (weights; with chains KV too)
            sfu_kw["cache_below"] = regions["weight"]
        units["sfu"] = lambda **kw: SfuExec(gb_base=gb, **sfu_kw, **kw)
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
        self._routes = dict(routes) if routes is not None else default_routes(
            "sfu" in self._units, chains=is_chains(config))
        for k, v in self._routes.items():
            if v not in self._units:
                raise ValueError(f"route {k!r} names unit {v!r}, which is not one of "
                                 f"{sorted(self._units)}")
        if "misc" not in self._units:
            raise ValueError("ExecUnit needs a 'misc' unit (the default route)")
        sig = dict(exec_signature(addr_bits, line_bytes * 8).members)
        # the on-chip footprint of each word (overlap check): the configuration's layout; no
        # configuration, no overlap
        self._gb, self._nslices, self._stripe = None, 1, 64
        self._chains = is_chains(config)
        if config is not None:
            self._gb = dict((r[0], r[1]) for r in region_map(config))["global"]
            self._nslices, self._stripe = config.slices, config.stripe_bytes
            # the slices' weight-bank read ports (hw/onchip.py), passed to the unit that has them
            g = slice_geometry(config)
            self._slices = g["slices"]
            H = bank_halves(g["stripe"])
            sig = sig | {"bank": Out(mem_read_signature(
                g["bank_addr_bits"], g["stripe"] * 8 // H)).array(g["slices"], 2 * H)}
        # high while an MV/MM and a MISC both execute (the busy_both counter)
        sig["both"] = Out(1)
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

        # ---- overlap classes: the units MV/MM go to, and the rest (docs/isa.md, "Overlap")
        mv_units = {index[n] for k, n in self._routes.items()
                    if k in (Op.MV, Op.MM) and self._gb is not None}
        cls_of = [0 if i in mv_units else 1 for i in range(len(subs))]
        classes = sorted(set(cls_of))
        NC = 2

        # ---- stage 1: the accepted word; stage 2: its on-chip footprint, then issue
        v1, v2 = Signal(), Signal()
        p1 = Signal(ExecInstr)
        p2 = Signal(ExecInstr)
        issue = Signal()
        adv = Signal()
        m.d.comb += [adv.eq(v1 & (~v2 | issue)),
                     self.instr.ready.eq(~v1 | adv)]
        with m.If(self.instr.valid & self.instr.ready):
            m.d.sync += [v1.eq(1), p1.eq(self.instr.payload)]
        with m.Elif(adv):
            m.d.sync += v1.eq(0)
        with m.If(adv):
            m.d.sync += [v2.eq(1), p2.eq(p1)]
        with m.Elif(issue):
            m.d.sync += v2.eq(0)
        if self._chains:
            # attention on the chains: register-extended MV shapes (R[creg] = rval2), tiled
            # layouts, dynamic MISC lengths, KVROW and SOFTMAX ranges (docs/isa.md)
            fp = Footprint(m, p1.word, p1.rval, self.context, global_base=self._gb or 0,
                           slices=self._nslices, stripe=self._stripe, chains=True,
                           rval2=p1.rval2)
        else:
            fp = Footprint(m, p1.word, p1.rval, self.context, global_base=self._gb or 0,
                           slices=self._nslices, stripe=self._stripe)
        # Footprint registers its products every cycle: hold them while the word waits
        hold = [Signal(64, name=f"fp2_s{k}") for k in range(Footprint.SLOTS)] + \
               [Signal(64, name=f"fp2_l{k}") for k in range(Footprint.SLOTS)]
        fresh = Signal()
        m.d.sync += fresh.eq(adv)
        with m.If(fresh):
            m.d.sync += [h.eq(x) for h, x in zip(hold, fp.starts + fp.lens)]
        cur = [Mux(fresh, x, h) for h, x in zip(hold, fp.starts + fp.lens)]
        c_starts, c_lens = cur[:Footprint.SLOTS], cur[Footprint.SLOTS:]

        # ---- which unit the word in stage 2 goes to
        iw = data.View(Instruction, p2.word)
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
        tcls = Signal()
        for i in range(len(subs)):
            with m.If(target == i):
                m.d.comb += tcls.eq(cls_of[i])

        # ---- per class: running (its unit has an unfinished instruction), the unit, its
        # ranges, how many of its instructions finished and wait for their done; the classes
        # of the instructions issued and not yet reported, in acceptance order
        run = [Signal(name=f"run{c}") for c in range(NC)]
        csel = [Signal.like(target, name=f"csel{c}") for c in range(NC)]
        nfin = [Signal(range(MAX_IN_FLIGHT + 1), name=f"nfin{c}") for c in range(NC)]
        cfp = [[Signal(64, name=f"cfp{c}_{k}") for k in range(2 * Footprint.SLOTS)]
               for c in range(NC)]
        m.submodules.accepted = accepted = fifo.SyncFIFO(width=1, depth=MAX_IN_FLIGHT)

        def conflict(c):
            st, ln = cfp[c][:Footprint.SLOTS], cfp[c][Footprint.SLOTS:]
            return Cat(*[(c_lens[a] != 0) & (ln[b] != 0) & (c_starts[a] < st[b] + ln[b])
                         & (st[b] < c_starts[a] + c_lens[a])
                         for a in range(Footprint.SLOTS) for b in range(Footprint.SLOTS)]).any()

        # a unit takes its class's next instruction once it finishes; dones go in acceptance
        # order (a younger instruction that finished first waits for the older one's done).
        # The MV class's unit may take it in the cycle of its done (MvExec: the next word goes
        # straight to its PLAN); its done does not wait for a valid word
        pulses = [Signal(name=f"fin{c}") for c in range(NC)]
        for c in range(NC):
            if c in classes:
                m.d.comb += pulses[c].eq(run[c] & Cat(u.done & (csel[c] == i)
                                                      for i, u in enumerate(subs) if cls_of[i] == c).any())
        free_cls = Signal()
        blocked = Signal()
        m.d.comb += [free_cls.eq(Mux(tcls, ~run[1], ~run[0] | pulses[0]) & accepted.w_rdy),
                     blocked.eq(Mux(tcls, run[0] & conflict(0), run[1] & conflict(1)))]
        for i, u in enumerate(subs):
            m.d.comb += [u.instr.payload.eq(p2),
                         u.instr.valid.eq(v2 & free_cls & ~blocked & (target == i)),
                         u.context.eq(self.context), u.snoop.eq(self.snoop)]
            with m.If(u.instr.valid & u.instr.ready):
                m.d.comb += issue.eq(1)
        m.d.comb += [accepted.w_en.eq(issue), accepted.w_data.eq(tcls)]
        for c in range(NC):
            with m.If(pulses[c]):
                m.d.sync += run[c].eq(0)
            with m.If(issue & (tcls == c)):          # after the done: it wins in the same cycle
                m.d.sync += [run[c].eq(1), csel[c].eq(target)]
                m.d.sync += [h.eq(x) for h, x in zip(cfp[c], c_starts + c_lens)]
        report = Signal()
        m.d.comb += self.done.eq(report)
        head = accepted.r_data[0]
        for c in range(NC):
            pulse = pulses[c]
            mine = Signal(name=f"rep{c}")
            m.d.comb += mine.eq(report & (head == c))
            with m.If(accepted.r_rdy & (head == c) & ((nfin[c] != 0) | pulse)):
                m.d.comb += report.eq(1)
            m.d.sync += nfin[c].eq(nfin[c] + pulse - mine)
        m.d.comb += [accepted.r_en.eq(report), self.both.eq(run[0] & run[1])]

        # ---- memory ports: reads the MV class first, then the other; responses to the requester
        if "bank" in self.signature.members:
            owners = [u for u in subs if "bank" in u.signature.members]
            if len(owners) > 1:
                raise ValueError("only one execution sub-unit may own the weight-bank ports")
            if owners:
                for p in range(self._slices):
                    for k in range(len(self.bank[p])):
                        wiring.connect(m, owners[0].bank[p][k], wiring.flipped(self.bank[p][k]))
        active = [run[cls_of[i]] & (csel[cls_of[i]] == i) for i in range(len(subs))]
        order = sorted(range(len(subs)), key=lambda i: (cls_of[i], i))
        worder = sorted(range(len(subs)), key=lambda i: (1 - cls_of[i], i))

        def arbitrate(port, reqs, name, order=order, other=None, urgent=C(0, 1)):
            """Grant ``port`` to the first active requester in ``order`` (in ``other`` while
            ``urgent``); returns the grants."""
            grants = []
            first = {}
            for o, tag in ((order, "a"), (other or order, "b")):
                taken = C(0, 1)
                for i in o:
                    g = Signal(name=f"{name}_{tag}{i}")
                    m.d.comb += g.eq(active[i] & reqs[i].valid & ~taken)
                    taken = taken | g
                    first.setdefault(i, []).append(g)
            for i in order:
                g = Signal(name=f"{name}_g{i}")
                m.d.comb += g.eq(Mux(urgent, first[i][1], first[i][0]))
                grants.append((i, g))
            for i, g in grants:
                with m.If(g):
                    m.d.comb += [port.valid.eq(1), port.payload.eq(reqs[i].payload)]
                m.d.comb += reqs[i].ready.eq(port.ready & g)
            return dict(grants)

        for pname in ("rd0", "rd1"):
            port = getattr(self, pname)
            reqs = [getattr(u, pname).req for u in subs]
            grants = arbitrate(port.req, reqs, pname)
            got = [Signal(name=f"{pname}_rsp{i}") for i in range(len(subs))]
            for i, u in enumerate(subs):
                m.d.sync += got[i].eq(grants[i] & port.req.ready)
                p = getattr(u, pname)
                m.d.comb += [p.rsp.valid.eq(port.rsp.valid & got[i]), p.rsp.payload.eq(port.rsp.payload)]
        # wr: the other class first (its MISC/SFU results stream a line a cycle; the MV class
        # writes a row every few cycles and its rows wait in the combine), the MV class first
        # once its write has waited WR_AGE cycles
        wreqs = [u.wr.req for u in subs]
        mv_wait = Signal(range(WR_AGE + 1))
        mv_req = Cat(active[i] & wreqs[i].valid for i in range(len(subs)) if cls_of[i] == 0).any()
        wg = arbitrate(self.wr.req, wreqs, "wr", worder, order, mv_wait == WR_AGE)
        mv_got = Cat(wg[i] for i in range(len(subs)) if cls_of[i] == 0).any()
        with m.If(mv_req & ~(mv_got & self.wr.req.ready)):
            with m.If(mv_wait != WR_AGE):
                m.d.sync += mv_wait.eq(mv_wait + 1)
        with m.Else():
            m.d.sync += mv_wait.eq(0)
        return m
