"""The accelerator: control, fetch, validation, dispatch, queues, tokens, engines, memories.

:class:`Accelerator` is the Vitis-style RTL kernel for one configuration:
``s_axi_control`` (AXI4-Lite, ``ap_ctrl_hs``, ``hw/control.py``), one AXI4
master ``m_axi_hbm<p>`` per HBM port, ``interrupt``. A run:

1. ``ap_start`` -> the core is reset (queues, tokens, counters) and started.
2. Validation: the program is fetched once and checked word by word
   (``hw/dispatch.py``'s :class:`~llmfab.hw.dispatch.Validator`, i.e.
   ``Golden.check``); the first fault in program order ends the run with its
   status and pc, and nothing executes.
3. Execution: the program is fetched again and dispatched in order into the
   load, compute and store queues (depth :data:`QUEUE_DEPTH`; dispatch stalls
   on a full queue); SYS waits until every queue is empty and every engine
   idle (END then finishes the run with status 0). Each queue executes in
   order under the four token counters (ld2cmp, cmp2ld, cmp2st, st2cmp):
   a wait takes a token when the instruction starts, a release gives one when
   it completes. If no queue head can start, dispatch is blocked and nothing
   is in flight for 16 cycles, the run ends with status 4 (deadlock) at the
   pc of the first blocked head (load, compute, store order).
4. The counter block (``hw/control.py``'s :data:`~llmfab.hw.control.COUNTERS`)
   is written to HBM, then ``ap_done``.

See docs/accelerator.md for the block diagram and what is integrated.
"""

from amaranth import C, Cat, Const, Module, Mux, ResetInserter, Signal
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from llmfab.compiler import isa as _isa
from llmfab.hw.axi import Axi4Signature, AxiLiteSignature, AxiReadMux, AxiWriteMux
from llmfab.hw.control import (ADDR_WIDTH, ARGS, COUNTER_MAGIC, REG_ARGS, ControlRegs,
                               CounterWriter, counter_names)
from llmfab.hw.dispatch import Fetch, Validator
from llmfab.hw.dma import HW_REGS, QEntry, LoadEngine, StoreEngine, derived_regs, reg_value
from llmfab.hw.exec_unit import ExecUnit
from llmfab.hw.execute import MAX_IN_FLIGHT
from llmfab.hw.isa import Instruction, Op, SysFunc
from llmfab.hw.onchip import OnChipMemory, is_chains, region_map

__all__ = ["QUEUE_DEPTH", "DEADLOCK_CYCLES", "ID_WIDTH", "Core", "Accelerator", "geometry",
           "onchip_line_bytes",
           "probe_names"]

QUEUE_DEPTH = 16
#: Cycles the "nothing can proceed" condition must hold before status 4.
DEADLOCK_CYCLES = 16
ID_WIDTH = 1
_CHANNELS = ("ld2cmp", "cmp2ld", "cmp2st", "st2cmp")


def probe_names(ports: int) -> list:
    """The counters on the simulation-only ``probe`` output, word 0 upwards (64 bits each).

    Every counter of the block (``hw/control.py``'s :func:`counter_names`) except
    ``magic``, ``status`` and ``pc``: their live values during a run, as they
    will be written at its end.
    """
    return [n for n in counter_names(ports) if n not in ("magic", "status", "pc")]


def onchip_line_bytes(config) -> int:
    """Bytes of an on-chip line (``AccelConfig.onchip_line_bytes``): the shared path's width."""
    return config.onchip_line_bytes


def geometry(config) -> dict:
    """The datapath geometry of a configuration: ports, beat and line bytes, on-chip layout."""
    P = config.hbm.ports
    S = config.hbm.data_width // 8
    if P & (P - 1):
        raise ValueError(f"hbm.ports must be a power of two for the striped address map, not {P}")
    regions = region_map(config)
    return {"ports": P, "beat_bytes": S, "hbm_line_bytes": P * S,
            "line_bytes": onchip_line_bytes(config), "regions": regions,
            "onchip_size": sum(r[2] for r in regions),
            "global_base": dict((r[0], r[1]) for r in regions)["global"],
            "weight_base": dict((r[0], r[1]) for r in regions)["weight"],
            "instruction_bytes": config.buffer_bytes["instruction"]}


class Core(wiring.Component):
    """Everything that is reset at the start of a run (see the module docstring).

    Members
    -------
    start : In(1), idle : Out(1), finish : Out(1)
    args : In per :data:`~llmfab.hw.control.ARGS`, ``port_base`` x ports
    status : Out(3), pc : Out(32), cycles : Out(64)
    m_axi_hbm<p> : Out(Axi4Signature)
    probe : Out(64 * len(probe_names(ports))), only with ``probe=True``
    """

    def __init__(self, config, *, exec_factory=None, probe=False):
        g = geometry(config)
        self._g = g
        self._config = config
        self._exec_factory = exec_factory
        self._probe = probe
        P, S = g["ports"], g["beat_bytes"]
        members = {
            "start": In(1), "idle": Out(1), "finish": Out(1),
            "status": Out(3), "pc": Out(32), "cycles": Out(64),
            "port_base": In(64).array(P),
        }
        if probe:
            members["probe"] = Out(64 * len(probe_names(P)))
        for name, (_, bits) in ARGS.items():
            members[name] = In(bits)
        for p in range(P):
            members[f"m_axi_hbm{p}"] = Out(Axi4Signature(64, S * 8, ID_WIDTH))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        g = self._g
        P, S, D = g["ports"], g["beat_bytes"], g["line_bytes"]
        lgs = exact_log2(S)
        mem = OnChipMemory(regions=g["regions"], line_bytes=D, slices=P, stripe=S)
        m.submodules.onchip = mem
        ab = mem.addr_bits
        m.submodules.fetch = fetch = Fetch(ports=P, beat_bytes=S,
                                           buffer_bytes=g["instruction_bytes"])
        # attention on the chains (docs/isa.md): its words validated, ST.x, the KV buffer in
        # the slice banks (hw/onchip.py's region_map)
        chains = is_chains(self._config)
        m.submodules.validator = val = Validator(onchip_size=g["onchip_size"],
                                                 global_base=g["global_base"],
                                                 weight_base=g["weight_base"], slices=P, stripe=S,
                                                 chains=chains)
        m.submodules.ld = ld = LoadEngine(ports=P, beat_bytes=S, addr_bits=ab, line_bytes=D,
                                          weight_base=g["weight_base"],
                                          bank_addr_bits=mem.bank_addr_bits)
        m.submodules.st = st = StoreEngine(ports=P, beat_bytes=S, addr_bits=ab, line_bytes=D,
                                           chains=chains)
        make_exec = self._exec_factory or ExecUnit.factory(self._config)
        ex = make_exec(addr_bits=ab, line_bytes=D)
        m.submodules.exec = ex
        names = counter_names(P)
        m.submodules.cw = cw = CounterWriter(ports=P, beat_bytes=S, n=len(names))

        regs = [Const(0, 32)] + [getattr(self, n) for n in REG_ARGS]
        regs += derived_regs(self.pos)              # R8, R9 (docs/isa.md, "Runtime registers")
        for unit in (val, ld, st):
            for i in range(HW_REGS):
                m.d.comb += unit.regs[i].eq(regs[i])

        # ---- AXI ports: reads (fetch = ID 0, load = ID 1), writes (store, counter writer)
        cw_sel = Signal()
        port_rd, port_wr = [], []
        for p in range(P):
            rmux = AxiReadMux(2, S * 8, ID_WIDTH)
            # the counter block touches only the first cw.ports_used ports (it starts on an
            # HBM line): the other ports' write channels are the store engine's alone
            wmux = AxiWriteMux(2 if p < cw.ports_used else 1, S * 8, ID_WIDTH)
            m.submodules[f"rmux{p}"] = rmux
            m.submodules[f"wmux{p}"] = wmux
            wiring.connect(m, fetch.rd[p], rmux.clients[0])
            wiring.connect(m, ld.rd[p], rmux.clients[1])
            wiring.connect(m, st.wr[p], wmux.clients[0])
            if p < cw.ports_used:
                wiring.connect(m, cw.wr[p], wmux.clients[1])
            m.d.comb += [rmux.base.eq(self.port_base[p]), wmux.base.eq(self.port_base[p]),
                         wmux.sel.eq(cw_sel)]
            axi = getattr(self, f"m_axi_hbm{p}")
            for name, member in axi.signature.members.items():
                src = rmux.axi if name.startswith(("ar", "r")) else wmux.axi
                if member.flow == Out:
                    m.d.comb += getattr(axi, name).eq(getattr(src, name))
                else:
                    m.d.comb += getattr(src, name).eq(getattr(axi, name))
            port_rd.append(axi.rvalid & axi.rready)
            port_wr.append(axi.wvalid & axi.wready)

        # ---- on-chip memory clients
        wiring.connect(m, ld.mem, mem.ld_wr)
        if "bank_wr" in ld.signature.members:     # the weight fast path: port p -> bank p
            for p in range(P):
                wiring.connect(m, ld.bank_wr[p], mem.bank_wr[p])
        wiring.connect(m, st.mem, mem.st_rd)
        wiring.connect(m, ex.rd0, mem.ex_rd0)
        wiring.connect(m, ex.rd1, mem.ex_rd1)
        wiring.connect(m, ex.wr, mem.ex_wr)
        if "bank" in ex.signature.members:        # the MV slices' own weight-bank reads
            for p in range(P):
                for k in range(len(mem.bank[p])):
                    wiring.connect(m, ex.bank[p][k], mem.bank[p][k])
        m.d.comb += ex.context.eq(self.context)
        m.d.comb += [ex.snoop[0].valid.eq(ld.mem.req.valid & ld.mem.req.ready),
                     ex.snoop[0].addr.eq(ld.mem.req.payload.addr),
                     ex.snoop[1].valid.eq(ex.wr.req.valid & ex.wr.req.ready),
                     ex.snoop[1].addr.eq(ex.wr.req.payload.addr)]

        # ---- queues and tokens
        queues = {}
        for q in ("ld", "cmp", "st"):
            f = fifo.SyncFIFO(width=QEntry.size, depth=QUEUE_DEPTH)
            m.submodules[f"q_{q}"] = f
            queues[q] = f
        heads = {q: data.View(QEntry, f.r_data) for q, f in queues.items()}
        hw_ = {q: data.View(Instruction, heads[q].word).header for q in queues}
        tok = {c: Signal(32, name=f"tok_{c}") for c in _CHANNELS}
        inc = {c: Signal(name=f"inc_{c}") for c in _CHANNELS}
        dec = {c: Signal(name=f"dec_{c}") for c in _CHANNELS}
        for c in _CHANNELS:
            m.d.sync += tok[c].eq(tok[c] + inc[c] - dec[c])
        ok = {
            "ld": ~hw_["ld"].wait_next | (tok["cmp2ld"] != 0),
            "cmp": (~hw_["cmp"].wait_prev | (tok["ld2cmp"] != 0))
                   & (~hw_["cmp"].wait_next | (tok["st2cmp"] != 0)),
            "st": ~hw_["st"].wait_prev | (tok["cmp2st"] != 0),
        }
        # load and store queues -> engines (tokens gate valid; taken on the handshake)
        for q, eng, waits in (("ld", ld, (("wait_next", "cmp2ld"),)),
                              ("st", st, (("wait_prev", "cmp2st"),))):
            f = queues[q]
            m.d.comb += [eng.q.valid.eq(f.r_rdy & ok[q]), eng.q.payload.eq(f.r_data),
                         f.r_en.eq(eng.q.valid & eng.q.ready)]
            for bit, c in waits:
                m.d.comb += dec[c].eq(eng.q.valid & eng.q.ready & getattr(hw_[q], bit))
        m.d.comb += [inc["ld2cmp"].eq(ld.rel_next), inc["st2cmp"].eq(st.rel_prev)]
        # compute queue -> execution unit; releases kept in order until each done pulse
        # (bit 2: the instruction is an MV/MM, for the busy_mv / busy_misc counters)
        m.submodules.pend = pend = fifo.SyncFIFO(width=3, depth=MAX_IN_FLIGHT)
        fc = queues["cmp"]
        misc_reg = data.View(Instruction, heads["cmp"].word).misc.reg
        m.d.comb += [
            ex.instr.valid.eq(fc.r_rdy & ok["cmp"] & pend.w_rdy),
            ex.instr.payload.word.eq(heads["cmp"].word), ex.instr.payload.pc.eq(heads["cmp"].pc),
            ex.instr.payload.rval.eq(reg_value(regs, misc_reg)),
            # an MV's creg (bits 124..127; a MISC word's reserved bits, zero)
            ex.instr.payload.rval2.eq(reg_value(regs, heads["cmp"].word[124:128])),
        ]
        cmp_go = ex.instr.valid & ex.instr.ready
        m.d.comb += [fc.r_en.eq(cmp_go), pend.w_en.eq(cmp_go),
                     pend.w_data.eq(Cat(hw_["cmp"].rel_prev, hw_["cmp"].rel_next,
                                        (hw_["cmp"].op == Op.MV) | (hw_["cmp"].op == Op.MM))),
                     dec["ld2cmp"].eq(cmp_go & hw_["cmp"].wait_prev),
                     dec["st2cmp"].eq(cmp_go & hw_["cmp"].wait_next),
                     pend.r_en.eq(ex.done),
                     inc["cmp2ld"].eq(ex.done & pend.r_data[0]),
                     inc["cmp2st"].eq(ex.done & pend.r_data[1])]
        busy = {"ld": ld.busy, "cmp": pend.r_rdy, "st": st.busy}

        # ---- the run
        status = self.status
        pc = self.pc
        cycles = self.cycles
        running = Signal()
        state_validate = Signal()
        state_exec = Signal()
        counting = Signal()
        m.d.comb += [fetch.base.eq(self.program), fetch.nwords.eq(self.program_words),
                     val.nwords.eq(self.program_words), val.hbm_size.eq(self.hbm_size),
                     val.context.eq(self.context)]
        # fetch output: to the validator or to the dispatcher
        fw = fetch.o
        dw = data.View(Instruction, fw.payload.word).header
        target = Signal(2)       # 0 ld, 1 cmp, 2 st, 3 sys
        with m.Switch(dw.op):
            with m.Case(Op.LD):
                m.d.comb += target.eq(0)
            with m.Case(Op.ST):
                m.d.comb += target.eq(2)
            with m.Case(Op.SYS):
                m.d.comb += target.eq(3)
            with m.Default():
                m.d.comb += target.eq(1)
        qlist = [queues["ld"], queues["cmp"], queues["st"]]
        drained = Cat(~f.r_rdy for f in qlist).all() & ~Cat(busy.values()).any()
        accept = Signal()
        with m.Switch(target):
            for i, f in enumerate(qlist):
                with m.Case(i):
                    m.d.comb += accept.eq(f.w_rdy)
            with m.Case(3):
                m.d.comb += accept.eq(drained)
        sys_end = Signal()
        m_dispatch = Signal(name="dispatch")
        for i, f in enumerate(qlist):
            m.d.comb += [f.w_data.eq(fw.payload.as_value()),
                         f.w_en.eq(m_dispatch & (target == i))]
        m.d.comb += [m_dispatch.eq(state_exec & fw.valid & accept),
                     sys_end.eq(m_dispatch & (target == 3) & (dw.func == SysFunc.END))]
        # deadlock: every head blocked on tokens, dispatch blocked, nothing in flight
        blocked = Cat(~f.r_rdy | ~ok[q] for q, f in queues.items()).all()
        dl_cond = state_exec & fw.valid & ~accept & blocked & ~Cat(busy.values()).any()
        dl_count = Signal(range(DEADLOCK_CYCLES + 1))
        with m.If(dl_cond):
            m.d.sync += dl_count.eq(dl_count + 1)
        with m.Else():
            m.d.sync += dl_count.eq(0)
        deadlock = dl_count == DEADLOCK_CYCLES
        dl_pc = Mux(queues["ld"].r_rdy, heads["ld"].pc,
                    Mux(queues["cmp"].r_rdy, heads["cmp"].pc, heads["st"].pc))

        m.d.comb += [fw.ready.eq(Mux(state_validate, val.i.ready, m_dispatch)),
                     val.i.valid.eq(state_validate & fw.valid), val.i.payload.eq(fw.payload)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                m.d.comb += self.idle.eq(1)
                with m.If(self.start):
                    m.d.comb += [fetch.start.eq(1), val.start.eq(1)]
                    m.d.sync += [status.eq(0), pc.eq(0), counting.eq(1)]
                    m.next = "VALIDATE"
            with m.State("VALIDATE"):
                m.d.comb += state_validate.eq(1)
                with m.If(val.done):
                    m.d.sync += [status.eq(val.status), pc.eq(val.pc)]
                    with m.If(val.status == 0):
                        m.next = "RESTART"
                    with m.Else():
                        m.next = "DRAIN"
            with m.State("RESTART"):
                m.d.comb += fetch.stop.eq(1)
                with m.If(fetch.idle):
                    m.d.comb += fetch.start.eq(1)
                    m.next = "EXEC"
            with m.State("EXEC"):
                m.d.comb += state_exec.eq(1)
                with m.If(sys_end):
                    m.d.sync += [status.eq(_isa.STATUS_OK), pc.eq(fw.payload.pc)]
                    m.next = "DRAIN"
                with m.Elif(deadlock):
                    m.d.sync += [status.eq(_isa.STATUS_DEADLOCK), pc.eq(dl_pc)]
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                m.d.comb += fetch.stop.eq(1)
                with m.If(fetch.idle):
                    m.d.sync += counting.eq(0)
                    m.d.comb += cw.start.eq(1)
                    m.next = "COUNTERS"
            with m.State("COUNTERS"):
                m.d.comb += cw_sel.eq(1)
                with m.If(cw.done):
                    m.d.comb += self.finish.eq(1)
                    m.next = "IDLE"

        # ---- performance counters
        cnt = {}

        def counter(name, cond, amount=1):
            s = Signal(64, name=f"c_{name}")
            with m.If(counting & cond):
                m.d.sync += s.eq(s + amount)
            cnt[name] = s

        counter("cycles", 1)
        counter("validate_cycles", fsm.ongoing("VALIDATE") | fsm.ongoing("RESTART"))
        counter("exec_cycles", state_exec)
        for q in ("ld", "cmp", "st"):
            counter(f"busy_{q}", busy[q])
        # busy_cmp split by the oldest instruction in the execution unit: MV/MM or MISC
        counter("busy_mv", pend.r_rdy & pend.r_data[2])
        counter("busy_misc", pend.r_rdy & ~pend.r_data[2])
        # an MV/MM and a MISC executing at once (docs/isa.md, "Overlap"; ExecUnit's ``both``)
        counter("busy_both", ex.both if "both" in ex.signature.members else C(0, 1))
        for i, q in enumerate(("ld", "cmp", "st")):
            counter(f"instr_{q}", m_dispatch & (target == i))
        counter("instr_sys", m_dispatch & (target == 3))
        counter("ld_bytes", ld.retire, ld.retire_bytes)
        counter("st_bytes", st.retire, st.retire_bytes)
        counter("stall_fetch", state_exec & ~fw.valid)
        for i, q in enumerate(("ld", "cmp", "st")):
            counter(f"stall_{q}_full", state_exec & fw.valid & (target == i) & ~accept)
        counter("stall_sys_drain", state_exec & fw.valid & (target == 3) & ~accept)
        engine_free = {"ld": ld.q.ready, "cmp": ex.instr.ready & pend.w_rdy, "st": st.q.ready}
        for q, f in queues.items():
            counter(f"wait_{q}", f.r_rdy & ~ok[q] & engine_free[q])
        for p in range(P):
            counter(f"port{p}_rd_bytes", port_rd[p], S)
            counter(f"port{p}_wr_bytes", port_wr[p], S)
        values = {"magic": Const(COUNTER_MAGIC, 64), "status": status, "pc": pc, **cnt}
        for i, name in enumerate(names):
            m.d.comb += cw.values[i].eq(values[name])
        m.d.comb += [cw.addr.eq(self.counters), cycles.eq(cnt["cycles"])]
        if self._probe:
            m.d.comb += self.probe.eq(Cat(cnt[n] for n in probe_names(P)))
        return m


class Accelerator(wiring.Component):
    """The accelerator for one configuration (a Vitis RTL kernel).

    Parameters
    ----------
    config : AccelConfig
    exec_factory : callable, optional
        ``exec_factory(addr_bits=, line_bytes=)`` -> a component with
        :func:`~llmfab.hw.execute.exec_signature`. Default: the whole execution
        unit, :class:`~llmfab.hw.exec_unit.ExecUnit` for ``config`` (MV/MM engine,
        SFU unit, MiscExec for NOP/COPY/ADD/MUL). Tests of the control path may
        ask for a smaller double by name (e.g. ``exec_factory=MiscExec``).
    probe : bool
        Simulation only (default off, so the kernel keeps the Vitis shape): an
        extra output ``probe`` with the live performance counters of
        :func:`probe_names`, 64 bits each, word 0 in the low bits, so a
        testbench can sample them during a run (``sim/rtl/harness.py``).

    Members
    -------
    s_axi_control : In(AxiLiteSignature(12, 32))
    m_axi_hbm<p> : Out(Axi4Signature(64, data_width, 1)) for every port
    interrupt : Out(1)
    probe : Out(64 * len(probe_names(ports))), only with ``probe=True``
    """

    def __init__(self, config, *, exec_factory=None, probe=False):
        self._config = config
        self._exec_factory = exec_factory
        self._probe = probe
        g = geometry(config)
        self.geometry = g
        members = {"s_axi_control": In(AxiLiteSignature(ADDR_WIDTH, 32)), "interrupt": Out(1)}
        for p in range(g["ports"]):
            members[f"m_axi_hbm{p}"] = Out(Axi4Signature(64, g["beat_bytes"] * 8, ID_WIDTH))
        if probe:
            members["probe"] = Out(64 * len(probe_names(g["ports"])))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        P = self.geometry["ports"]
        m.submodules.ctrl = ctrl = ControlRegs(ports=P)
        core = Core(self._config, exec_factory=self._exec_factory, probe=self._probe)
        clear = Signal()
        go = Signal()
        m.submodules.core = ResetInserter(clear)(core)
        wiring.connect(m, wiring.flipped(self.s_axi_control), ctrl.bus)
        for name in ARGS:
            m.d.comb += getattr(core, name).eq(getattr(ctrl, name))
        for p in range(P):
            m.d.comb += core.port_base[p].eq(ctrl.port_base[p])
            wiring.connect(m, getattr(core, f"m_axi_hbm{p}"),
                           wiring.flipped(getattr(self, f"m_axi_hbm{p}")))
        # ap_start: one cycle of core reset, then start
        m.d.sync += [clear.eq(ctrl.start), go.eq(clear)]
        m.d.comb += [core.start.eq(go), ctrl.idle.eq(core.idle & ~clear & ~go),
                     ctrl.finish.eq(core.finish), ctrl.status.eq(core.status),
                     ctrl.pc.eq(core.pc), ctrl.cycles.eq(core.cycles),
                     self.interrupt.eq(ctrl.interrupt)]
        if self._probe:
            m.d.comb += self.probe.eq(core.probe)
        return m
