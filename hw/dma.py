"""Data movers: the load and store engines and the line-stream pieces they are built from.

Address maps (docs/accelerator.md):

* HBM is one flat byte space striped over the ports: byte ``A`` lives on port
  ``(A // S) % P`` (``S`` = beat bytes = ``hbm_stripe_bytes``, ``P`` ports) at
  port-local address ``(A // (P*S)) * S + A % S``. A *line* of ``D = P*S``
  bytes (flat line ``l`` = bytes ``[l*D, l*D + D)``) is local beat ``l`` of
  every port, so one beat from each port makes one line.
* On chip, a line is ``AccelConfig.onchip_line_bytes``: the HBM line up to 64
  bytes, else whole beats up to that (``hw/onchip.py``); the load and store
  engines gather and scatter it by port group, and weight tiles bypass it
  (:class:`LoadEngine`'s fast path into the slice banks).

Every transfer is a stream of lines plus one byte realignment
(:class:`Realign`): any source byte address, destination byte address and
length, one line per cycle.

Pieces
------
* :class:`Realign` -- ``n`` bytes from source offset ``s_off`` to destination
  offset ``d_off`` (both inside a line): source lines in, destination lines
  with byte enables out.
* :class:`BurstGen` -- a flat byte range -> per-port AXI bursts (port-local
  addresses, never crossing 4 KiB or 256 beats).
* :class:`LineReader` -- reads consecutive on-chip lines into a stream (in an MV row
  pipeline: a slice bank's lines, or its half-lines from 64-byte stripes on).
* :class:`F16Pack` -- binary32 lines -> binary16, two input lines per output
  line (numpy's ``astype(float16)``: RNE, subnormals kept, overflow to inf, NaN payloads).
* :class:`MemInstrDecode` -- LD/ST word + registers -> (HBM address, length, buffer).
* :class:`LoadEngine`, :class:`StoreEngine` -- the LD and ST queues' executors.
"""

from amaranth import Array, C, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from llmfab.hw import fp
from llmfab.hw.axi import BURST_BYTES, FLAT_BITS, ARReq, read_client_signature, write_client_signature
from llmfab.hw.isa import Instruction, StFunc
from llmfab.hw.onchip import mem_read_signature, mem_write_signature

__all__ = ["QEntry", "MemDesc", "RealignCmd", "OutLine", "reg_value", "Realign", "BurstGen",
           "LineReader", "F16Pack", "MemInstrDecode", "LoadEngine", "StoreEngine"]

#: A queue entry: the instruction word and its program counter.
QEntry = data.StructLayout({"word": 128, "pc": 32})
#: A decoded LD/ST: flat HBM address, length (bytes moved in HBM), on-chip address, flags.
MemDesc = data.StructLayout({"addr": 64, "len": 32, "buf": 24, "f16": 1, "rel_prev": 1,
                             "rel_next": 1, "pc": 32})
#: A realignment: offsets inside a line and the byte count (``n > 0``).
RealignCmd = data.StructLayout({"s_off": 16, "d_off": 16, "n": 32})


def OutLine(line_bytes: int) -> data.StructLayout:
    """A destination line: data, byte enables, last line of the transfer."""
    return data.StructLayout({"data": line_bytes * 8, "be": line_bytes, "last": 1})


#: Registers the hardware holds: R0..R7 (the host's) and R8, R9 derived from R1 (docs/isa.md).
HW_REGS = 10


def derived_regs(pos):
    """R8 = pos // 32 and R9 = pos - pos % 32 (``compiler.isa.run_registers``) from R1's signal."""
    return [pos >> 5, Cat(C(0, 5), pos[5:])]


def reg_value(regs, idx):
    """``R[idx]`` from a list of register signals (``regs[0]`` is R0 = 0; higher ones are 0)."""
    v = Const(0, 32)
    for i in range(1, len(regs)):
        v = Mux(idx == i, regs[i], v)
    return v


def _bytes_between(m, lo, hi, nbytes, name):
    """Byte-enable mask: bit ``i`` set for ``lo <= i < hi``."""
    be = Signal(nbytes, name=name)
    m.d.comb += be.eq(Cat(((lo <= i) & (C(i, 16) < hi)) for i in range(nbytes)))
    return be


class Realign(wiring.Component):
    """Move ``n`` bytes between byte offsets across ``line_bytes``-byte lines.

    Source line ``j`` holds source bytes ``[j*D - s_off, (j+1)*D - s_off)`` of
    the transfer; destination line ``k`` receives transfer bytes
    ``[k*D - d_off, (k+1)*D - d_off)`` with their byte enables. Takes
    ``ceil((s_off+n)/D)`` source lines, gives ``ceil((d_off+n)/D)``
    destination lines (``last`` on the final one), one per cycle.

    Members
    -------
    cmd : In(stream.Signature(RealignCmd))
    i : In(stream.Signature(D*8))
    o : Out(stream.Signature(OutLine(D)))
    busy : Out(1)
    """

    def __init__(self, line_bytes: int):
        self._d = line_bytes
        super().__init__({
            "cmd": In(stream.Signature(RealignCmd)),
            "i": In(stream.Signature(line_bytes * 8)),
            "o": Out(stream.Signature(OutLine(line_bytes))),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        D = self._d
        lg = exact_log2(D)
        busy = Signal()
        case_a = Signal()
        sh = Signal(max(lg, 1))
        n_in = Signal(32)
        n_out = Signal(32)
        got = Signal(32)
        made = Signal(32)
        rem = Signal(34)
        d_off = Signal(max(lg, 1) + 1)
        prev = Signal(D * 8)
        m.d.comb += [self.cmd.ready.eq(~busy), self.busy.eq(busy)]
        with m.If(self.cmd.valid & self.cmd.ready):
            c = self.cmd.payload
            so, do = c.s_off[0:lg] if lg else C(0, 1), c.d_off[0:lg] if lg else C(0, 1)
            m.d.sync += [
                busy.eq(1), case_a.eq(so >= do), sh.eq((so - do)[0:max(lg, 1)]),
                n_in.eq((so + c.n + D - 1) >> lg), n_out.eq((do + c.n + D - 1) >> lg),
                got.eq(0), made.eq(0), rem.eq(do + c.n), d_off.eq(do),
            ]
        out_free = ~self.o.valid | self.o.ready
        produces = ~(case_a & (got == 0))
        m.d.comb += self.i.ready.eq(busy & (got < n_in) & (~produces | out_free))
        flush = Signal()
        m.d.comb += flush.eq(busy & (got == n_in) & (made < n_out) & out_free)
        emit = (self.i.valid & self.i.ready & produces) | flush
        cur = Mux(flush, 0, self.i.payload)
        shifted = Signal(D * 8)
        # byte funnel shift of (prev, cur) by sh bytes in two mux steps: whole 8-byte words
        # (sh // 8), then bytes (sh % 8); one 2**k:1 mux per step instead of a log shifter
        both = Cat(prev, cur)
        if lg > 3:
            coarse = Signal(D * 8 + 64)
            m.d.comb += coarse.eq(Array([both[64 * w:64 * w + D * 8 + 64]
                                         for w in range(D // 8)])[sh[3:]])
            m.d.comb += shifted.eq(Array([coarse[8 * b:8 * b + D * 8] for b in range(8)])[sh[0:3]])
        else:
            m.d.comb += shifted.eq((both >> Cat(C(0, 3), sh))[0:D * 8])
        hi = Mux(rem >= D, D, rem[0:lg + 1])
        lo = Mux(made == 0, d_off, 0)
        be = _bytes_between(m, lo, hi, D, "rl_be")
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [prev.eq(self.i.payload), got.eq(got + 1)]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(emit):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.data.eq(shifted),
                         self.o.payload.be.eq(be), self.o.payload.last.eq(made == n_out - 1),
                         made.eq(made + 1), rem.eq(rem - D)]
        with m.If(busy & (got == n_in) & (made == n_out)):
            m.d.sync += busy.eq(0)
        return m


class BurstGen(wiring.Component):
    """Split the flat byte range ``[addr, addr+len)`` (``len > 0``) into per-port bursts.

    Port ``p`` reads (or writes) local beats ``first_p .. last_p`` of the
    beats ``b`` with ``b % P == p`` that touch the range; bursts end at every
    multiple of ``min(4096 / S, 256)`` beats. All ports issue in parallel; the
    next command is taken when every port has issued its last burst.

    Members
    -------
    cmd : In(stream.Signature({addr, len}))
    ar : Out(stream.Signature(ARReq)) per port
    busy : Out(1)
    """

    def __init__(self, *, ports: int, beat_bytes: int):
        self._p = ports
        self._s = beat_bytes
        super().__init__({
            # the flat range lies below 2**FLAT_BITS (the validator's bound): the per-port
            # beat arithmetic is FLAT_BITS - log2(P * S) bits wide, not 64
            "cmd": In(stream.Signature(data.StructLayout({"addr": 64, "len": 32}))),
            "ar": Out(stream.Signature(ARReq)).array(ports),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        P, S = self._p, self._s
        lgs, lgp = exact_log2(S), exact_log2(P)
        bb = min(BURST_BYTES // S, 256)
        fb = FLAT_BITS - lgs                   # flat beat index
        lb = fb - lgp                          # a port's local beat index
        active = [Signal(name=f"act{p}") for p in range(P)]
        cur = [Signal(lb, name=f"cur{p}") for p in range(P)]
        last = [Signal(lb, name=f"last{p}") for p in range(P)]
        any_active = Cat(active).any()
        m.d.comb += [self.cmd.ready.eq(~any_active), self.busy.eq(any_active)]
        c = self.cmd.payload
        b0 = Signal(fb)
        b1 = Signal(fb)
        m.d.comb += [b0.eq(c.addr[lgs:FLAT_BITS]),
                     b1.eq((c.addr[0:FLAT_BITS] + c.len - 1)[lgs:FLAT_BITS])]
        for p in range(P):
            first_p = (b0 + (P - 1 - p)) >> lgp
            last_p = (b1 - p) >> lgp
            has = (b1 >= p) & (first_p <= last_p)
            with m.If(self.cmd.valid & self.cmd.ready):
                m.d.sync += [active[p].eq(has), cur[p].eq(first_p), last[p].eq(last_p)]
            end = Signal(lb, name=f"end{p}")
            bound = cur[p] | (bb - 1)
            m.d.comb += end.eq(Mux(bound < last[p], bound, last[p]))
            ar = self.ar[p]
            m.d.comb += [ar.valid.eq(active[p]), ar.payload.addr.eq(cur[p] << lgs),
                         ar.payload.len.eq(end - cur[p])]
            with m.If(ar.valid & ar.ready):
                m.d.sync += cur[p].eq(end + 1)
                with m.If(end == last[p]):
                    m.d.sync += active[p].eq(0)
        return m


class LineReader(wiring.Component):
    """Read ``count`` consecutive on-chip lines from ``line`` into the ``o`` stream.

    Requests are issued only while the 4-entry response buffer has room, so
    responses (which cannot be refused) always fit.

    Members
    -------
    cmd : In(stream.Signature({line, count}))
    mem : Out(mem_read_signature)
    o : Out(stream.Signature(D*8))
    busy : Out(1)
    """

    DEPTH = 4

    def __init__(self, *, addr_bits: int, line_bytes: int):
        self._ab = addr_bits
        self._lb = line_bytes * 8
        super().__init__({
            "cmd": In(stream.Signature(data.StructLayout({"line": addr_bits, "count": 32}))),
            "mem": Out(mem_read_signature(addr_bits, line_bytes * 8)),
            "o": Out(stream.Signature(line_bytes * 8)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.buf = buf = fifo.SyncFIFO(width=self._lb, depth=self.DEPTH)
        line = Signal(self._ab)
        left = Signal(32)
        m.d.comb += self.cmd.ready.eq(left == 0)
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [line.eq(self.cmd.payload.line), left.eq(self.cmd.payload.count)]
        room = buf.level + self.mem.rsp.valid < self.DEPTH
        m.d.comb += [self.mem.req.valid.eq((left != 0) & room), self.mem.req.payload.eq(line)]
        with m.If(self.mem.req.valid & self.mem.req.ready):
            m.d.sync += [line.eq(line + 1), left.eq(left - 1)]
        m.d.comb += [buf.w_en.eq(self.mem.rsp.valid), buf.w_data.eq(self.mem.rsp.payload),
                     self.o.valid.eq(buf.r_rdy), self.o.payload.eq(buf.r_data),
                     buf.r_en.eq(self.o.ready),
                     self.busy.eq((left != 0) | buf.r_rdy | self.mem.rsp.valid)]
        return m


def f32_to_f16_numpy(m, x, *, name="f2h"):
    """binary32 -> binary16 exactly as numpy's ``astype(np.float16)``.

    ``hw/fp.py``'s :func:`~llmfab.hw.fp.f32_to_f16` (RNE, subnormals kept,
    overflow to inf) for numbers; a NaN keeps its sign and the top 10 bits of
    its payload (``0x7c01`` if they are all zero), as numpy's conversion does,
    so the binary16 bytes in HBM are the golden model's bytes even for NaNs.
    """
    v = data.View(fp.F32, x)
    conv = fp.f32_to_f16(m, x, name=name)
    top = v.frac[13:23]
    nan = Cat(Mux(top == 0, 1, top), C(0x1F, 5), v.sign)
    return Mux((v.exp == 255) & (v.frac != 0), nan, conv)


class F16Pack(wiring.Component):
    """binary32 lines -> binary16 lines (or pass-through when ``f16`` is 0).

    With ``f16``, input line ``2k`` gives the low half of output line ``k`` and
    input line ``2k+1`` its high half; an odd count leaves the last high half
    undefined (beyond the transfer).

    Members
    -------
    cmd : In(stream.Signature({f16, count}))  -- count: input lines
    i : In(stream.Signature(D*8))
    o : Out(stream.Signature(D*8))
    """

    def __init__(self, line_bytes: int):
        self._d = line_bytes
        super().__init__({
            "cmd": In(stream.Signature(data.StructLayout({"f16": 1, "count": 32}))),
            "i": In(stream.Signature(line_bytes * 8)),
            "o": Out(stream.Signature(line_bytes * 8)),
        })

    def elaborate(self, platform):
        m = Module()
        D = self._d
        half_bits = D * 4
        f16 = Signal()
        left = Signal(32)
        low = Signal(half_bits)
        have_low = Signal()
        m.d.comb += self.cmd.ready.eq(left == 0)
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [f16.eq(self.cmd.payload.f16), left.eq(self.cmd.payload.count),
                         have_low.eq(0)]
        conv = Cat(f32_to_f16_numpy(m, self.i.payload[32 * k:32 * k + 32], name=f"pk{k}")
                   for k in range(D // 4))
        out_free = ~self.o.valid | self.o.ready
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        # an input either completes an output line (needs room) or fills the low half
        completes = ~f16 | have_low | (left == 1)
        m.d.comb += self.i.ready.eq((left != 0) & (~completes | out_free))
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += left.eq(left - 1)
            with m.If(~f16):
                m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(self.i.payload)]
            with m.Elif(have_low):
                m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(Cat(low, conv)),
                             have_low.eq(0)]
            with m.Elif(left == 1):
                m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(Cat(conv, C(0, half_bits)))]
            with m.Else():
                m.d.sync += [low.eq(conv), have_low.eq(1)]
        return m


class MemInstrDecode(wiring.Component):
    """LD/ST queue entries -> :data:`MemDesc` (two register stages: products, then sums).

    ``addr = R[hreg] + hoff*32 + R[ireg]*stride``,
    ``len = len + R[lreg]*lmul`` (docs/isa.md); with ``indexed_st`` (attention on the
    chains) an ``ST.x``'s on-chip address is indexed too: ``buf + R[ireg]*stride``.

    Members
    -------
    i : In(stream.Signature(QEntry))
    o : Out(stream.Signature(MemDesc))
    regs : In(32) x HW_REGS (R0..R9; R0 is ignored and read as 0)
    busy : Out(1)
    """

    def __init__(self, *, indexed_st: bool = False):
        self._indexed_st = indexed_st
        super().__init__({
            "i": In(stream.Signature(QEntry)),
            "o": Out(stream.Signature(MemDesc)),
            "regs": In(32).array(HW_REGS),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        w = data.View(Instruction, self.i.payload.word)
        ld = w.ld
        regs = list(self.regs)
        # stage 1: register values and products
        v1 = Signal()
        rh = Signal(32)
        hoff = Signal(28)
        p_str = Signal(48)
        len0 = Signal(20)
        p_len = Signal(44)
        buf = Signal(24)
        f16 = Signal()
        rp, rn = Signal(), Signal()
        pc = Signal(32)
        adv1 = ~v1 | ~self.o.valid | self.o.ready
        m.d.comb += self.i.ready.eq(adv1)
        with m.If(adv1):
            m.d.sync += v1.eq(self.i.valid)
            with m.If(self.i.valid):
                m.d.sync += [
                    rh.eq(reg_value(regs, ld.hreg)), hoff.eq(ld.hoff),
                    p_str.eq(reg_value(regs, ld.ireg) * ld.stride), len0.eq(ld.len),
                    p_len.eq(reg_value(regs, ld.lreg) * ld.lmul), buf.eq(ld.buf),
                    f16.eq((w.header.op == 2) & (ld.func == StFunc.F16)),
                    rp.eq(w.header.rel_prev), rn.eq(w.header.rel_next),
                    pc.eq(self.i.payload.pc),
                ]
        if self._indexed_st:
            stx = Signal()
            with m.If(adv1 & self.i.valid):
                m.d.sync += stx.eq((w.header.op == 2) & (ld.func == StFunc.X))
            buf_x = buf + Mux(stx, p_str, 0)
        else:
            buf_x = buf
        # stage 2: sums
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(v1 & adv1):
            o = self.o.payload
            m.d.sync += [self.o.valid.eq(1), o.addr.eq(rh + (hoff << 5) + p_str),
                         o.len.eq(len0 + p_len), o.buf.eq(buf_x), o.f16.eq(f16),
                         o.rel_prev.eq(rp), o.rel_next.eq(rn), o.pc.eq(pc)]
        m.d.comb += self.busy.eq(v1 | self.o.valid)
        return m


def retire_members():
    """Ports an engine reports completions on (one pulse per instruction, in order)."""
    return {"retire": Out(1), "rel_prev": Out(1), "rel_next": Out(1), "retire_bytes": Out(32)}


class LoadEngine(wiring.Component):
    """The LD queue's executor: HBM (striped over the ports) -> on-chip memory.

    Takes queue entries whose wait tokens are already satisfied (the caller
    gates ``q.valid``), keeps several LDs in flight (bursts of the next LD are
    requested while the previous one's data still arrives), writes the bytes
    in order and retires each LD, with its release bits, after its last
    on-chip write (a zero-length LD retires in order without moving data).

    The on-chip line (``line_bytes``, ``k`` beats) may be narrower than the HBM
    line (``P`` beats): the engine then gathers each on-chip line from the ``k``
    ports that hold it (flat line ``L`` is on ports ``(L % G) k .. + k - 1``,
    ``G = P / k``) and realigns at the on-chip width, one line per cycle. **Fast
    path** (``bank_addr_bits`` given, ``k < P``): an LD into the weight buffer whose
    HBM and on-chip addresses agree modulo the HBM line (every compiled weight
    tile) moves each port's beats straight into that port's slice bank
    (``bank_wr[p]``, hw/onchip.py), every port at its own pace, no realigner; the
    LD retires when every port has written its last beat.

    Members
    -------
    q : In(stream.Signature(QEntry))
    regs : In(32) x HW_REGS
    rd : Out(read_client_signature) per port
    mem : Out(mem_write_signature)
    bank_wr : Out(mem_write_signature) per port (fast path only)
    retire, rel_prev, rel_next : Out(1)
    retire_bytes : Out(32)
    busy : Out(1)
    """

    def __init__(self, *, ports: int, beat_bytes: int, addr_bits: int, line_bytes: int = 0,
                 weight_base: int = 0, bank_addr_bits: int | None = None):
        self._p, self._s, self._ab = ports, beat_bytes, addr_bits
        self._lb = line_bytes or ports * beat_bytes
        k = self._lb // beat_bytes
        if self._lb % beat_bytes or ports % k:
            raise ValueError(f"a {self._lb}-byte on-chip line is not a whole number of "
                             f"{beat_bytes}-byte beats dividing {ports} ports")
        self._fast = bank_addr_bits is not None and k < ports
        self._wbase = weight_base
        members = {
            "q": In(stream.Signature(QEntry)),
            "regs": In(32).array(HW_REGS),
            "rd": Out(read_client_signature(beat_bytes * 8)).array(ports),
            "mem": Out(mem_write_signature(addr_bits, self._lb * 8)),
            "busy": Out(1),
            **retire_members(),
        }
        if self._fast:
            members["bank_wr"] = Out(mem_write_signature(bank_addr_bits, beat_bytes * 8)).array(ports)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        P, S, Ds = self._p, self._s, self._lb
        D = P * S
        k = Ds // S
        G = P // k
        lgs, lgp, lgd, lgk, lgg = (exact_log2(S), exact_log2(P), exact_log2(D), exact_log2(k),
                                   exact_log2(G))
        lgl = exact_log2(Ds)
        m.submodules.dec = dec = MemInstrDecode()
        m.submodules.bursts = bursts = BurstGen(ports=P, beat_bytes=S)
        m.submodules.descq = descq = fifo.SyncFIFO(width=MemDesc.size, depth=4)
        m.submodules.cmdq = cmdq = fifo.SyncFIFO(width=96, depth=4)
        m.submodules.realign = rl = Realign(Ds)
        wiring.connect(m, wiring.flipped(self.q), dec.i)
        for i in range(HW_REGS):
            m.d.comb += dec.regs[i].eq(self.regs[i])
        # descriptors: to the mover (all), to the burst generator (non-empty ones)
        d = dec.o.payload
        need_cmd = d.len != 0
        m.d.comb += [
            dec.o.ready.eq(descq.w_rdy & cmdq.w_rdy),
            descq.w_en.eq(dec.o.valid & dec.o.ready), descq.w_data.eq(d.as_value()),
            cmdq.w_en.eq(dec.o.valid & dec.o.ready & need_cmd),
            cmdq.w_data.eq(Cat(d.addr, d.len)),
            bursts.cmd.valid.eq(cmdq.r_rdy), bursts.cmd.payload.addr.eq(cmdq.r_data[0:64]),
            bursts.cmd.payload.len.eq(cmdq.r_data[64:96]), cmdq.r_en.eq(bursts.cmd.ready),
        ]
        for p in range(P):
            wiring.connect(m, bursts.ar[p], wiring.flipped(self.rd[p].ar))
        # the mover
        desc = data.View(MemDesc, descq.r_data)
        running = Signal()
        fast = Signal()
        line = Signal(64)                      # flat on-chip-width line of HBM being gathered
        first_line = Signal(64)
        last_line = Signal(64)
        b0m = Signal(max(lgk, 1))
        b1m = Signal(max(lgk, 1))
        wline = Signal(self._ab)
        end = desc.addr + desc.len - 1
        m.d.comb += [rl.cmd.payload.s_off.eq(desc.addr[0:lgl]),
                     rl.cmd.payload.d_off.eq(desc.buf[0:lgl]),
                     rl.cmd.payload.n.eq(desc.len)]
        retire = Signal()
        fast_ok = C(0, 1)
        if self._fast:
            fast_ok = (desc.buf >= self._wbase) & (desc.addr[0:lgd] == desc.buf[0:lgd])
        # fast path: per port, its beats of the range (BurstGen's first_p .. last_p)
        f_act = [Signal(name=f"fact{p}") for p in range(P)]
        f_cur = [Signal(64, name=f"fcur{p}") for p in range(P)]
        f_last = [Signal(64, name=f"flast{p}") for p in range(P)]
        f_b0 = Signal(64)
        f_b1 = Signal(64)
        f_lo = Signal(max(lgs, 1))
        f_hi = Signal(max(lgs, 1))
        f_delta = Signal(64)                   # bank line = port-local beat + delta
        with m.If(descq.r_rdy & ~running):
            with m.If(desc.len == 0):
                m.d.comb += retire.eq(1)
            with m.Elif(fast_ok):
                b0 = desc.addr >> lgs
                b1 = end >> lgs
                m.d.sync += [running.eq(1), fast.eq(1), f_b0.eq(b0), f_b1.eq(b1),
                             f_lo.eq(desc.addr[0:lgs] if lgs else 0),
                             f_hi.eq(end[0:lgs] if lgs else 0),
                             f_delta.eq((desc.buf >> lgd) - (desc.addr >> lgd)
                                        - (self._wbase >> lgd))]
                for p in range(P):
                    first_p = (b0 + (P - 1 - p)) >> lgp
                    last_p = (b1 - p) >> lgp
                    m.d.sync += [f_act[p].eq((b1 >= p) & (first_p <= last_p)),
                                 f_cur[p].eq(first_p), f_last[p].eq(last_p)]
            with m.Else():
                m.d.comb += rl.cmd.valid.eq(1)
                with m.If(rl.cmd.ready):
                    m.d.sync += [running.eq(1), fast.eq(0), line.eq(desc.addr >> lgl),
                                 first_line.eq(desc.addr >> lgl), last_line.eq(end >> lgl),
                                 wline.eq(desc.buf >> lgl)]
                    if lgk:
                        m.d.sync += [b0m.eq((desc.addr >> lgs)[0:lgk]), b1m.eq((end >> lgs)[0:lgk])]
        # gather: on-chip line `line` is beats of ports g k .. g k + k - 1 (g = line % G);
        # every port that holds a beat of it must have it ready
        grp = line[0:lgg] if lgg else C(0, 1)
        gathering = running & ~fast & (line <= last_line)
        part = []
        for i in range(k):
            ok = Signal(name=f"part{i}")
            if lgk:
                m.d.comb += ok.eq(~((line == first_line) & (i < b0m)) & ~((line == last_line) & (i > b1m)))
            else:
                m.d.comb += ok.eq(1)
            part.append(ok)
        beats = []
        have_i = []
        for i in range(k):
            bv = Signal(name=f"have{i}")
            bd = Signal(S * 8, name=f"beat{i}")
            for g in range(G):
                with m.If(grp == g):
                    r = self.rd[g * k + i].r
                    m.d.comb += [bv.eq(r.valid), bd.eq(r.payload.data)]
            beats.append(bd)
            have_i.append(bv | ~part[i])
        have = Cat(*have_i).all()
        m.d.comb += [rl.i.valid.eq(gathering & have), rl.i.payload.eq(Cat(*beats))]
        fire = rl.i.valid & rl.i.ready
        for g in range(G):
            for i in range(k):
                m.d.comb += self.rd[g * k + i].r.ready.eq(fire & part[i] & (grp == g))
        with m.If(fire):
            m.d.sync += line.eq(line + 1)
        # write lines on chip
        mw = self.mem.req
        m.d.comb += [mw.valid.eq(rl.o.valid), mw.payload.addr.eq(wline),
                     mw.payload.data.eq(rl.o.payload.data), mw.payload.be.eq(rl.o.payload.be),
                     rl.o.ready.eq(mw.ready)]
        with m.If(mw.valid & mw.ready):
            m.d.sync += wline.eq(wline + 1)
            with m.If(rl.o.payload.last):
                m.d.comb += retire.eq(1)
                m.d.sync += running.eq(0)
        if self._fast:
            for p in range(P):
                r = self.rd[p].r
                bw = self.bank_wr[p].req
                b = (f_cur[p] << lgp) | p             # the flat beat
                lo = Mux(b == f_b0, f_lo, 0)
                hi = Mux(b == f_b1, f_hi, S - 1)
                be = _bytes_between(m, lo, hi + 1, S, f"fbe{p}")
                go = running & fast & f_act[p]
                m.d.comb += [bw.valid.eq(go & r.valid), bw.payload.addr.eq(f_cur[p] + f_delta),
                             bw.payload.data.eq(r.payload.data), bw.payload.be.eq(be)]
                with m.If(go):
                    m.d.comb += r.ready.eq(bw.ready)
                with m.If(bw.valid & bw.ready):
                    m.d.sync += f_cur[p].eq(f_cur[p] + 1)
                    with m.If(f_cur[p] == f_last[p]):
                        m.d.sync += f_act[p].eq(0)
            with m.If(running & fast & ~Cat(*f_act).any()):
                m.d.comb += retire.eq(1)
                m.d.sync += running.eq(0)
        m.d.comb += [descq.r_en.eq(retire), self.retire.eq(retire),
                     self.rel_next.eq(retire & desc.rel_next), self.rel_prev.eq(0),
                     self.retire_bytes.eq(desc.len),
                     self.busy.eq(dec.busy | descq.r_rdy | cmdq.r_rdy | bursts.busy | running)]
        return m


class StoreEngine(wiring.Component):
    """The ST queue's executor: on-chip memory -> HBM, one ST at a time.

    Reads the on-chip bytes (``2*len`` of them for ``ST.f16``; with ``chains``, an
    ``ST.x``'s from ``buf + R[ireg]*stride``), aligns them to
    line offset 0, converts binary32 -> binary16 for ``ST.f16``, aligns them to
    the HBM address and writes each port's beats (with strobes) in bursts;
    retires once every burst's write response has arrived.

    Members
    -------
    q : In(stream.Signature(QEntry))
    regs : In(32) x HW_REGS
    wr : Out(write_client_signature) per port
    mem : Out(mem_read_signature)
    retire, rel_prev, rel_next : Out(1)
    retire_bytes : Out(32)
    busy : Out(1)
    """

    def __init__(self, *, ports: int, beat_bytes: int, addr_bits: int, line_bytes: int = 0,
                 chains: bool = False):
        self._p, self._s, self._ab = ports, beat_bytes, addr_bits
        self._chains = chains
        self._lb = line_bytes or ports * beat_bytes
        if self._lb % beat_bytes or ports % (self._lb // beat_bytes):
            raise ValueError(f"a {self._lb}-byte on-chip line is not a whole number of "
                             f"{beat_bytes}-byte beats dividing {ports} ports")
        lb = self._lb * 8
        super().__init__({
            "q": In(stream.Signature(QEntry)),
            "regs": In(32).array(HW_REGS),
            "wr": Out(write_client_signature(beat_bytes * 8)).array(ports),
            "mem": Out(mem_read_signature(addr_bits, lb)),
            "busy": Out(1),
            **retire_members(),
        })

    def elaborate(self, platform):
        m = Module()
        P, S = self._p, self._s
        D = self._lb                           # the on-chip line: k beats
        nk = D // S                            # beats per on-chip line
        G = P // nk                            # on-chip lines per HBM line
        lgs, lgp, lgd, lgg = exact_log2(S), exact_log2(P), exact_log2(D), exact_log2(G)
        bb = min(BURST_BYTES // S, 256)
        m.submodules.dec = dec = MemInstrDecode(indexed_st=self._chains)
        m.submodules.bursts = bursts = BurstGen(ports=P, beat_bytes=S)
        m.submodules.reader = reader = LineReader(addr_bits=self._ab, line_bytes=D)
        m.submodules.align_in = al_in = Realign(D)
        m.submodules.pack = pack = F16Pack(D)
        m.submodules.align_out = al_out = Realign(D)
        wiring.connect(m, wiring.flipped(self.q), dec.i)
        for i in range(HW_REGS):
            m.d.comb += dec.regs[i].eq(self.regs[i])
        wiring.connect(m, reader.mem, wiring.flipped(self.mem))
        wiring.connect(m, reader.o, al_in.i)
        m.d.comb += [pack.i.valid.eq(al_in.o.valid), pack.i.payload.eq(al_in.o.payload.data),
                     al_in.o.ready.eq(pack.i.ready)]
        wiring.connect(m, pack.o, al_out.i)
        for p in range(P):
            wiring.connect(m, bursts.ar[p], wiring.flipped(self.wr[p].aw))

        d = Signal(MemDesc)
        nin = Signal(32)
        m.d.comb += nin.eq(Mux(d.f16, d.len << 1, d.len))
        aw_count = Signal(32)
        b_count = Signal(32)
        sent = Signal(5)
        lb = FLAT_BITS - lgs - lgp             # a port's local beat index (BurstGen's width)
        kline = Signal(FLAT_BITS - lgd)
        ll = [Signal(lb, name=f"ll{p}") for p in range(P)]
        retire = Signal()
        with m.FSM() as fsm:
            with m.State("IDLE"):
                m.d.comb += dec.o.ready.eq(1)
                with m.If(dec.o.valid):
                    m.d.sync += [d.eq(dec.o.payload), sent.eq(0)]
                    with m.If(dec.o.payload.len == 0):
                        m.next = "ZERO"
                    with m.Else():
                        m.next = "START"
            with m.State("ZERO"):
                m.d.comb += retire.eq(1)
                m.next = "IDLE"
            with m.State("START"):
                cmds = [
                    (bursts.cmd, [bursts.cmd.payload.addr.eq(d.addr), bursts.cmd.payload.len.eq(d.len)]),
                    (reader.cmd, [reader.cmd.payload.line.eq(d.buf >> lgd),
                                  reader.cmd.payload.count.eq(((d.buf[0:lgd]) + nin + D - 1) >> lgd)]),
                    (al_in.cmd, [al_in.cmd.payload.s_off.eq(d.buf[0:lgd]),
                                 al_in.cmd.payload.d_off.eq(0), al_in.cmd.payload.n.eq(nin)]),
                    (pack.cmd, [pack.cmd.payload.f16.eq(d.f16),
                                pack.cmd.payload.count.eq((nin + D - 1) >> lgd)]),
                    (al_out.cmd, [al_out.cmd.payload.s_off.eq(0),
                                  al_out.cmd.payload.d_off.eq(d.addr[0:lgd]),
                                  al_out.cmd.payload.n.eq(d.len)]),
                ]
                for k, (s, sets) in enumerate(cmds):
                    m.d.comb += [s.valid.eq(~sent[k])] + sets
                    with m.If(s.valid & s.ready):
                        m.d.sync += sent[k].eq(1)
                m.d.sync += kline.eq(d.addr[lgd:FLAT_BITS])
                b1 = (d.addr[0:FLAT_BITS] + d.len - 1)[lgs:FLAT_BITS]
                for p in range(P):
                    m.d.sync += ll[p].eq((b1 - p) >> lgp)
                with m.If(Cat(sent[k] | (cmds[k][0].valid & cmds[k][0].ready)
                              for k in range(len(cmds))).all()):
                    m.next = "RUN"
            with m.State("RUN"):
                # split destination lines into beats with strobes for the k ports of the
                # line's group (flat line kline is port-local beat kline // G of ports
                # (kline % G) k .. + k - 1). No per-port queue: beat i of the line is offered
                # straight to its port's W channel (the data are the line's wires), each beat
                # once (``taken``), and the line is consumed when every beat it has is taken
                o = al_out.o
                grp = kline[0:lgg] if lgg else C(0, 1)
                kb = kline >> lgg
                strbs = [o.payload.be[i * S:(i + 1) * S] for i in range(nk)]
                taken = Signal(nk)
                fire = [Signal(name=f"wfire{i}") for i in range(nk)]
                for p in range(P):
                    g, i = p // nk, p % nk
                    w = self.wr[p].w
                    last = ((kb[0:exact_log2(bb)] == bb - 1) if bb > 1 else C(1, 1)) | (kb == ll[p])
                    m.d.comb += [w.valid.eq(o.valid & (grp == g) & (strbs[i] != 0) & ~taken[i]),
                                 w.payload.data.eq(o.payload.data[i * S * 8:(i + 1) * S * 8]),
                                 w.payload.strb.eq(strbs[i]), w.payload.last.eq(last)]
                    with m.If(grp == g):
                        m.d.comb += fire[i].eq(w.valid & w.ready)
                done = Cat(taken[i] | fire[i] | (strbs[i] == 0) for i in range(nk)).all()
                m.d.comb += o.ready.eq(done)
                with m.If(o.valid & o.ready):
                    m.d.sync += [kline.eq(kline + 1), taken.eq(0)]
                    with m.If(o.payload.last):
                        m.next = "WAIT_B"
                with m.Elif(o.valid):
                    m.d.sync += taken.eq(taken | Cat(*fire))
            with m.State("WAIT_B"):
                with m.If(~bursts.busy & (aw_count == b_count)):
                    m.d.comb += retire.eq(1)
                    m.next = "IDLE"
        # count bursts and responses
        aw_fire = Cat(bursts.ar[p].valid & bursts.ar[p].ready for p in range(P))
        b_fire = Cat(self.wr[p].b.valid for p in range(P))
        for p in range(P):
            m.d.comb += self.wr[p].b.ready.eq(1)
        n_aw = sum(aw_fire[p] for p in range(P))
        n_b = sum(b_fire[p] for p in range(P))
        m.d.sync += [aw_count.eq(aw_count + n_aw), b_count.eq(b_count + n_b)]
        m.d.comb += [self.retire.eq(retire), self.rel_prev.eq(retire & d.rel_prev),
                     self.rel_next.eq(0), self.retire_bytes.eq(d.len),
                     self.busy.eq(dec.busy | ~fsm.ongoing("IDLE") | (aw_count != b_count))]
        return m
