"""The compute queue's execution-unit interface, and the unit that implements the simple MISC ops.

The interface (:func:`exec_signature`, seen from the unit)
-----------------------------------------------------------
``instr : In(stream.Signature(ExecInstr))``
    The compute queue's instructions (MV, MM, MISC) in program order, each
    presented once its wait tokens are satisfied: ``word`` (128 bits, see
    ``hw/isa.py``'s :data:`~llmfab.hw.isa.Instruction`), ``pc``, ``rval``
    = ``R[reg]`` of a MISC word (the context length ATTN reads; an MV's ``R[rreg]``, the
    same bits) and ``rval2`` = ``R[creg]`` of an MV word (docs/isa.md, "Attention on the
    chains").
``done : Out(1)``
    One pulse per accepted instruction, in acceptance order, once every
    on-chip write of that instruction has been accepted by ``wr`` (its
    results are then visible to any later reader: the compute queue releases
    the instruction's tokens on this pulse). A unit may accept the next
    instruction before the previous one is done (the queue keeps up to
    :data:`MAX_IN_FLIGHT` in flight); it then owns the data hazards between them.
``rd0, rd1 : Out(mem_read_signature)``
    Line reads anywhere in the on-chip space (``hw/onchip.py``): a line
    address on ``req``; the line arrives on ``rsp`` exactly one cycle after
    the handshake. ``rd0`` shares its memory port with the store engine (which
    has priority), ``rd1`` has a port of its own.
``wr : Out(mem_write_signature)``
    Line writes with byte enables (the load engine has priority).
``context : In(32)``
    The compiled KV context (the V rows of an ATTN cache start at
    ``b + 2*context*aux``).
``snoop : In(SnoopLayout)``
    Every on-chip line write accepted this cycle, for units that keep copies of
    on-chip data (the MV unit's activation cache): entry 0 the load engine's,
    entry 1 the execution unit's own (``valid``, line ``addr``).

Lines are ``line_bytes = hbm.ports * hbm.data_width / 8`` bytes; byte ``x``
of the on-chip space is byte ``x % line_bytes`` of line ``x // line_bytes``.
Every address range of an instruction has been checked before the run
starts (``Golden.check``), so a unit never sees an out-of-range operand.

:class:`MiscExec` (this module) executes MISC NOP, COPY (also its strided rows:
``aux`` rows of ``n`` words, destination rows ``b`` words apart), ADD and MUL
bit-exactly (binary32 RNE + FTZ from ``hw/fp.py``, ``line_bytes / 4`` lanes) at
any byte alignment (built with ``chains=True``, attention on the chains: MUL on
``n + R[reg]`` elements, ``rval``). Every other MV/MM/MISC operation completes after
:data:`PLACEHOLDER_LATENCY` cycles **without writing anything**. The
accelerator's execution unit (``hw/exec_unit.py``'s ``ExecUnit``) routes only
those four operations here; MiscExec alone is a test double that a test asks
for by name (``Accelerator(config, exec_factory=MiscExec)``).
"""

from amaranth import C, Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from llmfab.hw import fp
from llmfab.hw.dma import LineReader, Realign
from llmfab.hw.isa import Instruction, MiscFunc, Op
from llmfab.hw.onchip import mem_read_signature, mem_write_signature

__all__ = ["ExecInstr", "exec_signature", "snoop_layout", "MAX_IN_FLIGHT", "PLACEHOLDER_LATENCY", "MiscExec"]

#: One compute-queue instruction handed to the execution unit.
ExecInstr = data.StructLayout({"word": 128, "pc": 32, "rval": 32, "rval2": 32})
#: Instructions the compute queue lets a unit hold at once.
MAX_IN_FLIGHT = 8
#: Cycles an operation MiscExec does not execute (MV, MM, QUANT, RMSNORM, ROPE, SILU_MUL,
#: ATTN, EMBED) takes in :class:`MiscExec` used alone (a test double).
PLACEHOLDER_LATENCY = 16


def snoop_layout(addr_bits: int) -> data.ArrayLayout:
    """Two write observations per cycle: [0] load engine, [1] execution unit."""
    return data.ArrayLayout(data.StructLayout({"valid": 1, "addr": addr_bits}), 2)


def exec_signature(addr_bits: int, line_bits: int) -> wiring.Signature:
    """The execution-unit interface, from the unit's side (see the module docstring)."""
    return wiring.Signature({
        "snoop": In(snoop_layout(addr_bits)),
        "instr": In(stream.Signature(ExecInstr)),
        "done": Out(1),
        "rd0": Out(mem_read_signature(addr_bits, line_bits)),
        "rd1": Out(mem_read_signature(addr_bits, line_bits)),
        "wr": Out(mem_write_signature(addr_bits, line_bits)),
        "context": In(32),
    })


class MiscExec(wiring.Component):
    """MISC NOP/COPY/ADD/MUL; everything else a fixed-latency placeholder (one at a time).

    COPY/ADD/MUL stream ``n`` binary32 words: line readers on ``rd0`` (``a``)
    and ``rd1`` (``b``), each realigned to line offset 0, ``line_bytes/4``
    lanes (``FAddCore``/``FMulCore``, latency 3), realigned to ``dst`` and
    written through ``wr``; a multi-row COPY does one row after the other.
    Overlapping operands read before they are written only when ``dst <= a``
    (the compiler's in-place ``X = X + H``); the golden model reads a COPY's
    whole source first.
    """

    def __init__(self, *, addr_bits: int, line_bytes: int, chains: bool = False):
        self._ab = addr_bits
        self._d = line_bytes
        self._chains = bool(chains)
        super().__init__(exec_signature(addr_bits, line_bytes * 8))

    def elaborate(self, platform):
        m = Module()
        D = self._d
        lgd = exact_log2(D)
        lanes = D // 4
        m.submodules.rda = rda = LineReader(addr_bits=self._ab, line_bytes=D)
        m.submodules.rdb = rdb = LineReader(addr_bits=self._ab, line_bytes=D)
        m.submodules.ala = ala = Realign(D)
        m.submodules.alb = alb = Realign(D)
        m.submodules.alw = alw = Realign(D)
        wiring.connect(m, rda.mem, wiring.flipped(self.rd0))
        wiring.connect(m, rdb.mem, wiring.flipped(self.rd1))
        wiring.connect(m, rda.o, ala.i)
        wiring.connect(m, rdb.o, alb.i)

        word = Signal(128)
        w = data.View(Instruction, word)
        misc = w.misc
        func = Signal(8)
        use_b = Signal()
        if self._chains:
            # attention on the chains: MUL works on n + R[reg] elements (reg 0 reads 0)
            rv = Signal(32)
            nbytes = Signal(20)
            m.d.comb += [func.eq(misc.func),
                         nbytes.eq((misc.n + Mux(func == MiscFunc.MUL, rv, 0)) << 2)]
        else:
            nbytes = Signal(18)
            m.d.comb += [func.eq(misc.func), nbytes.eq(misc.n << 2)]
        # COPY rows (docs/isa.md): aux rows (0 = 1) of n words; row r from a + 4*r*n to
        # dst + 4*r*stride, stride = b words when there are several rows
        rows_left = Signal(16)
        src = Signal(24)
        dstp = Signal(24)
        dst_step = Signal(26)
        wline = Signal(self._ab)
        sent = Signal(5)
        wait = Signal(range(PLACEHOLDER_LATENCY + 1))

        # ---- lanes: a (and b) aligned lines -> results
        valid_in = ala.o.valid & (alb.o.valid | ~use_b)
        ce, out_valid = fp.stall_control(m, valid_in, alw.i.ready, fp.FADD_LATENCY, name="lanes")
        m.d.comb += [ala.o.ready.eq(ce & (alb.o.valid | ~use_b)),
                     alb.o.ready.eq(ce & ala.o.valid & use_b)]
        p = fp.Pipe(m, ce, name="ln")
        outs = []
        for k in range(lanes):
            a = p.input(ala.o.payload.data[32 * k:32 * k + 32])
            b = p.input(alb.o.payload.data[32 * k:32 * k + 32])
            s = p.fadd(a, b)
            prod = p.fmul(a, b)
            cp = p.at(a, fp.FADD_LATENCY)
            outs.append(Mux(func == MiscFunc.ADD, s.value, Mux(func == MiscFunc.MUL, prod.value, cp)))
        m.d.comb += [alw.i.valid.eq(out_valid), alw.i.payload.eq(Cat(outs))]
        wr = self.wr.req
        m.d.comb += [wr.valid.eq(alw.o.valid), wr.payload.addr.eq(wline),
                     wr.payload.data.eq(alw.o.payload.data), wr.payload.be.eq(alw.o.payload.be),
                     alw.o.ready.eq(wr.ready)]

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.instr.ready.eq(1)
                with m.If(self.instr.valid):
                    iw = data.View(Instruction, self.instr.payload.word)
                    f = iw.misc.func
                    reps = Mux((f == MiscFunc.COPY) & (iw.misc.aux > 1), iw.misc.aux, 1)
                    m.d.sync += [word.eq(self.instr.payload.word), sent.eq(0),
                                 use_b.eq((f == MiscFunc.ADD) | (f == MiscFunc.MUL)),
                                 wait.eq(PLACEHOLDER_LATENCY - 1),
                                 rows_left.eq(reps - 1), src.eq(iw.misc.a), dstp.eq(iw.misc.dst),
                                 dst_step.eq(Mux(reps > 1, iw.misc.b, iw.misc.n) << 2)]
                    streaming = (f == MiscFunc.COPY) | (f == MiscFunc.ADD) | (f == MiscFunc.MUL)
                    n_eff = iw.misc.n
                    if self._chains:
                        m.d.sync += rv.eq(self.instr.payload.rval)
                        n_eff = iw.misc.n + Mux(f == MiscFunc.MUL, self.instr.payload.rval, 0)
                    with m.If(iw.header.op != Op.MISC):
                        m.next = "WAIT"
                    with m.Elif((f == MiscFunc.NOP) | (streaming & (n_eff == 0))):
                        m.next = "DONE"
                    with m.Elif(streaming):
                        m.next = "START"
                    with m.Else():
                        m.next = "WAIT"
            with m.State("WAIT"):
                m.d.sync += wait.eq(wait - 1)
                with m.If(wait == 0):
                    m.next = "DONE"
            with m.State("START"):
                a_off, b_off, d_off = src[0:lgd], misc.b[0:lgd], dstp[0:lgd]
                cmds = [
                    (rda.cmd, C(1, 1), [rda.cmd.payload.line.eq(src >> lgd),
                                        rda.cmd.payload.count.eq((a_off + nbytes + D - 1) >> lgd)]),
                    (ala.cmd, C(1, 1), [ala.cmd.payload.s_off.eq(a_off), ala.cmd.payload.d_off.eq(0),
                                        ala.cmd.payload.n.eq(nbytes)]),
                    (rdb.cmd, use_b, [rdb.cmd.payload.line.eq(misc.b >> lgd),
                                      rdb.cmd.payload.count.eq((b_off + nbytes + D - 1) >> lgd)]),
                    (alb.cmd, use_b, [alb.cmd.payload.s_off.eq(b_off), alb.cmd.payload.d_off.eq(0),
                                      alb.cmd.payload.n.eq(nbytes)]),
                    (alw.cmd, C(1, 1), [alw.cmd.payload.s_off.eq(0), alw.cmd.payload.d_off.eq(d_off),
                                        alw.cmd.payload.n.eq(nbytes)]),
                ]
                for k, (s, en, sets) in enumerate(cmds):
                    m.d.comb += [s.valid.eq(~sent[k] & en)] + sets
                    with m.If(s.valid & s.ready):
                        m.d.sync += sent[k].eq(1)
                m.d.sync += wline.eq(dstp >> lgd)
                with m.If(Cat(sent[k] | ~en | (s.valid & s.ready)
                              for k, (s, en, _) in enumerate(cmds)).all()):
                    m.next = "RUN"
            with m.State("RUN"):
                with m.If(wr.valid & wr.ready):
                    m.d.sync += wline.eq(wline + 1)
                    with m.If(alw.o.payload.last):
                        with m.If(rows_left != 0):
                            m.d.sync += [rows_left.eq(rows_left - 1), src.eq(src + nbytes),
                                         dstp.eq(dstp + dst_step), sent.eq(0)]
                            m.next = "START"
                        with m.Else():
                            m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.done.eq(1)
                m.next = "IDLE"
        return m
