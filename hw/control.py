"""Host control: the AXI4-Lite slave (Vitis ``ap_ctrl_hs``) and the counter-block writer.

Register map (32-bit registers, byte offsets; 64-bit arguments are lo/hi pairs)::

    0x00  ctrl     bit 0 ap_start (W1 starts; clears when the run is accepted)
                   bit 1 ap_done  (COR: set at the end of a run, cleared by reading 0x00)
                   bit 2 ap_idle  (RO)
                   bit 3 ap_ready (COR, set with ap_done)
    0x04  GIE      bit 0 global interrupt enable
    0x08  IER      bit 0 done, bit 1 ready
    0x0C  ISR      bit 0 done, bit 1 ready (toggle on write)
    0x10  program        64  flat HBM byte address of the program (multiple of 16)
    0x18  program_words  32  words in the program
    0x20  pos      R1   0x28 seq R2   0x30 wbase R3   0x38 kvbase R4
    0x40  iobase   R5   0x48 tbase R6 0x50 token R7
    0x58  counters       64  flat HBM address of the counter block (multiple of the beat size)
    0x60  hbm_size       64  bytes of HBM the program may touch (address checks)
    0x68  context        32  the compiled KV context (ATTN checks)
    0x70  status (RO)   0x74 pc (RO)   0x78/0x7C cycles (RO, 64 bits)
    0x100 + 8*p          64  port p's buffer base (added to its AXI addresses)

:data:`ARGS` is this table; the host side (``sim/rtl/harness.py``) reads it too.
"""

from amaranth import C, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from llmfab.hw.axi import AxiLiteSignature, write_client_signature

__all__ = ["ARGS", "REG_CTRL", "REG_GIE", "REG_IER", "REG_ISR", "REG_STATUS", "REG_PC",
           "REG_CYCLES", "PORT_BASE", "ADDR_WIDTH", "COUNTERS", "COUNTER_MAGIC",
           "counter_names", "ControlRegs", "CounterWriter"]

REG_CTRL, REG_GIE, REG_IER, REG_ISR = 0x00, 0x04, 0x08, 0x0C
#: Arguments: name -> (byte offset, bits).
ARGS = {
    "program": (0x10, 64), "program_words": (0x18, 32),
    "pos": (0x20, 32), "seq": (0x28, 32), "wbase": (0x30, 32), "kvbase": (0x38, 32),
    "iobase": (0x40, 32), "tbase": (0x48, 32), "token": (0x50, 32),
    "counters": (0x58, 64), "hbm_size": (0x60, 64), "context": (0x68, 32),
}
#: The runtime registers R1..R7 in order.
REG_ARGS = ("pos", "seq", "wbase", "kvbase", "iobase", "tbase", "token")
REG_STATUS, REG_PC, REG_CYCLES = 0x70, 0x74, 0x78
PORT_BASE = 0x100
ADDR_WIDTH = 12

#: The counter block the accelerator writes to HBM at the end of every run:
#: 64-bit little-endian words in this order, then ``port<p>_rd_bytes`` and
#: ``port<p>_wr_bytes`` for every port (see docs/accelerator.md).
COUNTERS = (
    "magic", "status", "pc", "cycles", "validate_cycles", "exec_cycles",
    "busy_ld", "busy_cmp", "busy_st", "busy_mv", "busy_misc",
    "instr_ld", "instr_cmp", "instr_st", "instr_sys",
    "ld_bytes", "st_bytes",
    "stall_fetch", "stall_ld_full", "stall_cmp_full", "stall_st_full", "stall_sys_drain",
    "wait_ld", "wait_cmp", "wait_st",
    "busy_both",
)
#: Word 0 of a written counter block ("llmfab01" little-endian).
COUNTER_MAGIC = int.from_bytes(b"llmfab01", "little")


def counter_names(ports: int) -> list:
    """Every word of the counter block, in order."""
    out = list(COUNTERS)
    for p in range(ports):
        out += [f"port{p}_rd_bytes", f"port{p}_wr_bytes"]
    return out


class ControlRegs(wiring.Component):
    """AXI4-Lite slave with the ``ap_ctrl_hs`` block and the argument registers.

    Members
    -------
    bus : In(AxiLiteSignature(12, 32))
    args : Out(...) per :data:`ARGS` name, ``port_base`` x ports
    start : Out(1)
        Pulse: ``ap_start`` accepted while idle.
    idle : In(1)
        The accelerator is idle (``ap_idle``).
    finish : In(1)
        Pulse at the end of a run (sets ``ap_done``, ``ap_ready``).
    status, pc, cycles : In
        Read-only mirrors of the last run's result.
    interrupt : Out(1)
    """

    def __init__(self, *, ports: int):
        self._ports = ports
        members = {
            "bus": In(AxiLiteSignature(ADDR_WIDTH, 32)),
            "start": Out(1), "idle": In(1), "finish": In(1),
            "status": In(3), "pc": In(32), "cycles": In(64),
            "interrupt": Out(1),
            "port_base": Out(64).array(ports),
        }
        for name, (_, bits) in ARGS.items():
            members[name] = Out(bits)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        bus = self.bus
        ap_start = Signal()
        ap_done = Signal()
        ap_ready = Signal()
        gie = Signal()
        ier = Signal(2)
        isr = Signal(2)

        # word registers: offset -> (signal, bit offset) for writable 32-bit halves
        words = {}
        for name, (off, bits) in ARGS.items():
            sig = getattr(self, name)
            words[off] = (sig, 0)
            if bits == 64:
                words[off + 4] = (sig, 32)
        for p in range(self._ports):
            words[PORT_BASE + 8 * p] = (self.port_base[p], 0)
            words[PORT_BASE + 8 * p + 4] = (self.port_base[p], 32)

        # ---- writes
        aw_full, w_full = Signal(), Signal()
        aw_addr = Signal(ADDR_WIDTH)
        w_data, w_strb = Signal(32), Signal(4)
        m.d.comb += [bus.awready.eq(~aw_full), bus.wready.eq(~w_full)]
        with m.If(bus.awvalid & bus.awready):
            m.d.sync += [aw_full.eq(1), aw_addr.eq(bus.awaddr)]
        with m.If(bus.wvalid & bus.wready):
            m.d.sync += [w_full.eq(1), w_data.eq(bus.wdata), w_strb.eq(bus.wstrb)]
        with m.If(bus.bvalid & bus.bready):
            m.d.sync += bus.bvalid.eq(0)
        do_write = aw_full & w_full & ~bus.bvalid
        wa = Cat(C(0, 2), aw_addr[2:ADDR_WIDTH])

        def merged(old):
            return Cat(Mux(w_strb[k], w_data[8 * k:8 * k + 8], old[8 * k:8 * k + 8]) for k in range(4))

        with m.If(do_write):
            m.d.sync += [aw_full.eq(0), w_full.eq(0), bus.bvalid.eq(1), bus.bresp.eq(0)]
            with m.Switch(wa):
                for off, (sig, lo) in words.items():
                    with m.Case(off):
                        width = min(32, len(sig) - lo)
                        m.d.sync += sig[lo:lo + width].eq(merged(sig[lo:lo + width])[0:width])
                with m.Case(REG_CTRL):
                    with m.If(w_strb[0] & w_data[0]):
                        m.d.sync += ap_start.eq(1)
                with m.Case(REG_GIE):
                    with m.If(w_strb[0]):
                        m.d.sync += gie.eq(w_data[0])
                with m.Case(REG_IER):
                    with m.If(w_strb[0]):
                        m.d.sync += ier.eq(w_data[0:2])

        # ---- reads
        rdata = Signal(32)
        ra = Cat(C(0, 2), bus.araddr[2:ADDR_WIDTH])
        with m.Switch(ra):
            for off, (sig, lo) in words.items():
                with m.Case(off):
                    m.d.comb += rdata.eq(sig[lo:min(lo + 32, len(sig))])
            with m.Case(REG_CTRL):
                m.d.comb += rdata.eq(Cat(ap_start, ap_done, self.idle & ~ap_start, ap_ready))
            with m.Case(REG_GIE):
                m.d.comb += rdata.eq(gie)
            with m.Case(REG_IER):
                m.d.comb += rdata.eq(ier)
            with m.Case(REG_ISR):
                m.d.comb += rdata.eq(isr)
            with m.Case(REG_STATUS):
                m.d.comb += rdata.eq(self.status)
            with m.Case(REG_PC):
                m.d.comb += rdata.eq(self.pc)
            with m.Case(REG_CYCLES):
                m.d.comb += rdata.eq(self.cycles[0:32])
            with m.Case(REG_CYCLES + 4):
                m.d.comb += rdata.eq(self.cycles[32:64])
        m.d.comb += bus.arready.eq(~bus.rvalid)
        read_ctrl = bus.arvalid & bus.arready & (ra == REG_CTRL)
        with m.If(bus.rvalid & bus.rready):
            m.d.sync += bus.rvalid.eq(0)
        with m.If(bus.arvalid & bus.arready):
            m.d.sync += [bus.rvalid.eq(1), bus.rdata.eq(rdata), bus.rresp.eq(0)]

        # ---- ap_ctrl_hs
        m.d.comb += self.start.eq(ap_start & self.idle)
        with m.If(self.start):
            m.d.sync += ap_start.eq(0)
        with m.If(read_ctrl):
            m.d.sync += [ap_done.eq(0), ap_ready.eq(0)]
        with m.If(self.finish):
            m.d.sync += [ap_done.eq(1), ap_ready.eq(1)]
        isr_next = Signal(2)
        m.d.comb += isr_next.eq(isr)
        with m.If(do_write & (wa == REG_ISR) & w_strb[0]):
            m.d.comb += isr_next.eq(isr ^ w_data[0:2])
        with m.If(self.finish):
            m.d.sync += isr.eq(isr_next | ier)
        with m.Else():
            m.d.sync += isr.eq(isr_next)
        m.d.comb += self.interrupt.eq(gie & isr.any())
        return m


class CounterWriter(wiring.Component):
    """Write ``values`` (64-bit words) to flat HBM address ``addr``, one single-beat burst per beat.

    The block starts on an HBM line (``P * S`` bytes, one beat from every port): the low
    ``log2(P * S)`` bits of ``addr`` are ignored. Beat ``i`` then goes to port ``i % P`` like
    any striped byte, so the block only touches the first :attr:`ports_used` ports
    (``min(P, beats)``) and only those need a write channel from this unit: on the u280 12 of
    32 (90 counters, 8 per 64-byte beat), and the other ports' write channels belong to the
    store engine alone (no multiplexer).

    Members
    -------
    start : In(1), addr : In(64), values : In(64) x n
    done : Out(1)  (pulse)
    wr : Out(write_client_signature) per used port (ports ``0 .. ports_used - 1``)
    """

    def __init__(self, *, ports: int, beat_bytes: int, n: int):
        self._p, self._s = ports, beat_bytes
        per = beat_bytes // 8 if beat_bytes >= 8 else 1
        self._beats = -(-n // per)
        self._n = n
        self.ports_used = min(ports, self._beats)
        super().__init__({
            "start": In(1), "addr": In(64), "values": In(64).array(n), "done": Out(1),
            "wr": Out(write_client_signature(beat_bytes * 8)).array(self.ports_used),
        })

    def elaborate(self, platform):
        m = Module()
        P, S = self._p, self._s
        lgs, lgp = exact_log2(S), exact_log2(P)
        per = S // 8
        pad = self._beats * per - self._n
        flat = Cat(*self.values, C(0, 64 * pad)) if pad else Cat(*self.values)
        beat = Signal(range(self._beats + 1))
        b = Signal(64)                  # the beat's flat beat index; the block starts on a line
        m.d.comb += b.eq(((self.addr >> (lgs + lgp)) << lgp) + beat)
        port = b[0:lgp] if lgp else C(0, 1)
        local = (b >> lgp) << lgs
        used = self.ports_used           # beats reach only ports 0 .. used - 1
        aw_done, w_done = Signal(), Signal()
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [beat.eq(0), aw_done.eq(0), w_done.eq(0)]
                    m.next = "SEND"
            with m.State("SEND"):
                for p in range(used):
                    wr = self.wr[p]
                    sel = port == p
                    m.d.comb += [
                        wr.aw.valid.eq(sel & ~aw_done), wr.aw.payload.addr.eq(local),
                        wr.aw.payload.len.eq(0),
                        wr.w.valid.eq(sel & ~w_done), wr.w.payload.data.eq(flat.word_select(beat, S * 8)),
                        wr.w.payload.strb.eq((1 << S) - 1), wr.w.payload.last.eq(1),
                    ]
                    with m.If(sel & wr.aw.valid & wr.aw.ready):
                        m.d.sync += aw_done.eq(1)
                    with m.If(sel & wr.w.valid & wr.w.ready):
                        m.d.sync += w_done.eq(1)
                aw_ok = aw_done | Cat(self.wr[p].aw.valid & self.wr[p].aw.ready for p in range(used)).any()
                w_ok = w_done | Cat(self.wr[p].w.valid & self.wr[p].w.ready for p in range(used)).any()
                with m.If(aw_ok & w_ok):
                    m.next = "RESP"
            with m.State("RESP"):
                for p in range(used):
                    m.d.comb += self.wr[p].b.ready.eq(port == p)
                with m.If(Cat(self.wr[p].b.valid & (port == p) for p in range(used)).any()):
                    m.d.sync += [beat.eq(beat + 1), aw_done.eq(0), w_done.eq(0)]
                    with m.If(beat == self._beats - 1):
                        m.d.comb += self.done.eq(1)
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "SEND"
        return m
