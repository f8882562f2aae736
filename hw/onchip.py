"""The unified on-chip memory: one byte address space, one ``lib.memory.Memory`` per region.

docs/isa.md: the activation buffer at 0, then the global, KV and weight
buffers, each ``buffers.<name>_kib`` of the configuration (with attention on the chains the
KV and weight buffers are one banked region, :func:`region_map`). Every region is a
memory of *lines* of ``line_bytes`` bytes (the accelerator's datapath width,
``hbm.ports * hbm.data_width / 8``), so a line address is ``byte // line_bytes``
and every line lies in exactly one region.

Clients address lines of the whole space; the memory routes each request to
its region and arbitrates per region and port with fixed priority:

* write port: the execution unit's writer, then the load engine's writer (the
  execution unit's writes are short bursts -- KVROW's bytes into the K/V tiles of the
  banked region, results into the activation buffer -- which the in-order compute
  queue waits on; the load engine streams lines and loses a cycle per line they take);
* read port A: the store engine's reader, then the execution unit's reader 0;
* read port B: the execution unit's reader 1.

A read returns its line exactly one cycle after the request's handshake (no
back-pressure on responses: a client only asks when it can take the answer).
A write is visible to reads issued from the cycle after its handshake.

**Slice banks.** With ``slices`` = P (one per HBM port of ``stripe`` = S bytes per
beat; the HBM line is ``P * S`` bytes) the weight region is P banks of S-byte
lines: bank ``p`` holds stripe ``p`` of every HBM line (the bytes a line took from
port ``p``), which is where docs/isa.md's slice-major weight tiles put slice
``p``'s rows. The on-chip line (``line_bytes``, k beats) may be narrower than the
HBM line: on-chip line ``L`` of the weight region is then stripes ``(L % G) k ..
(L % G) k + k - 1`` (``G = P / k``) of bank line ``L // G``. Clients of the line
view read and write it like any other line. From 64-byte stripes on
(:func:`bank_halves`: H = 2) a bank is two memories, the lower and the upper
``S / 2`` bytes of its lines (the same block RAMs as one memory of whole lines),
with independent read addresses, so a bank read port returns a *half-line*; the
line view reads and writes both halves of a line at once. Each bank has ``2 H``
read ports of its own for its slice's MV pipelines (``bank[p][j]``: read port
``k = j // H`` of half ``h = j % H``, bank-line addresses from the weight region's
start), which take that port of the half's memory when the line view's port A
(``k = 0``) or B (``k = 1``) does not want it, and a write port of its own
(``bank_wr[p]``, whole S-byte lines: the load engine's per-port fast path), which
takes the bank's write port when the line view does not.
"""

from amaranth import C, Cat, Module, Mux, Signal
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

__all__ = ["REGIONS", "is_chains", "region_map", "slice_geometry", "bank_halves", "mem_read_signature",
           "mem_write_signature", "WriteReq", "OnChipMemory", "WRITE_CLIENTS"]

#: The clients of each region's line write port, first served first (sim/perf.py reads it)
WRITE_CLIENTS = ("ex_wr", "ld_wr")

#: Regions of the on-chip address space, in address order (docs/isa.md).
REGIONS = ("activation", "global", "kv", "weight")


def is_chains(config) -> bool:
    """Whether a configuration has attention on the chains (``attention: chains``,
    docs/isa.md): its KV buffer holds MV operands (K row tiles, V block tiles)."""
    return config is not None and getattr(config, "attention", "sfu") == "chains"


def region_map(config) -> list:
    """``[(name, base byte, size bytes)]`` of the on-chip memories of a configuration.

    The regions of :data:`REGIONS` in address order; with attention on the chains
    (:func:`is_chains`) the KV and weight buffers are one ``"weight"`` memory, the slice
    banks, from the KV buffer's base (the compiler's manifest: ``onchip.weight`` = the KV
    buffer and the weight buffer), so the MV slices read K/V tiles there and the load
    engine's per-port fast path writes them."""
    out, base = [], 0
    chains = is_chains(config)
    for name in REGIONS:
        size = config.buffer_bytes[name]
        if chains and name == "weight":
            kv_name, kv_base, kv_size = out.pop()
            assert kv_name == "kv"
            out.append(("weight", kv_base, kv_size + size))
        else:
            out.append((name, base, size))
        base += size
    return out


def slice_geometry(config) -> dict:
    """The slice banks of a configuration (module docstring): ``slices`` (one per HBM port),
    ``stripe`` (bytes per beat), ``weight_base`` (the weight region's first byte) and ``bank_addr_bits`` (bank-line
    addresses: the weight region's lines)."""
    P = config.hbm.ports
    S = config.hbm.data_width // 8
    base, size = [(r[1], r[2]) for r in region_map(config) if r[0] == "weight"][0]
    return {"slices": P, "stripe": S, "weight_base": base,
            "bank_addr_bits": max(1, ceil_log2(size // (P * S)))}


def bank_halves(stripe: int) -> int:
    """Memories a slice bank of ``stripe``-byte lines is split into (module docstring): 2 from
    64-byte stripes on (a row pipeline needs at most 34 bytes a cycle, so it reads half-lines),
    else 1. A bank has ``2 * bank_halves`` read ports of ``stripe / bank_halves`` bytes."""
    return 2 if stripe >= 64 else 1


def WriteReq(addr_bits: int, line_bits: int) -> data.StructLayout:
    """A line write: line address, data, byte enables."""
    return data.StructLayout({"addr": addr_bits, "data": line_bits, "be": line_bits // 8})


#: Lines of a region from which it is UltraRAM (``ram_style``), the depth of one URAM288.
URAM_DEPTH = 4096


def mem_read_signature(addr_bits: int, line_bits: int) -> wiring.Signature:
    """A read client (client side): ``req`` line addresses out, ``rsp`` lines in one cycle later."""
    return wiring.Signature({
        "req": Out(stream.Signature(addr_bits)),
        "rsp": In(stream.Signature(line_bits, always_ready=True)),
    })


def mem_write_signature(addr_bits: int, line_bits: int) -> wiring.Signature:
    """A write client (client side): ``req`` (line address, data, byte enables) out."""
    return wiring.Signature({"req": Out(stream.Signature(WriteReq(addr_bits, line_bits)))})


class OnChipMemory(wiring.Component):
    """The on-chip buffers as one line-addressed space with arbitrated client ports.

    Parameters
    ----------
    regions : list of (name, base, size)
        Byte bases and sizes (multiples of ``line_bytes``), contiguous from 0.
    line_bytes : int

    Members
    -------
    ld_wr, ex_wr : In(mem_write_signature)
        Write clients, in priority order.
    st_rd, ex_rd0 : In(mem_read_signature)
        Clients of read port A, in priority order.
    ex_rd1 : In(mem_read_signature)
        The client of read port B.
    bank : In(mem_read_signature) x slices x 2 H
        The slices' own weight-bank read ports (module docstring): ``bank[p][j]`` is read
        port ``j // H`` of half ``j % H`` of bank ``p`` (``H = bank_halves(stripe)``).
    bank_wr : In(mem_write_signature) x slices
        The load engine's per-port writes of whole bank lines.
    """

    def __init__(self, *, regions, line_bytes: int, slices: int = 1, stripe: int | None = None):
        base = 0
        for name, b, size in regions:
            if b != base:
                raise ValueError(f"Region {name} must start at {base}, not {b}")
            if size <= 0 or size % line_bytes:
                raise ValueError(f"Region {name} of {size} bytes is not a whole number of "
                                 f"{line_bytes}-byte lines")
            base += size
        stripe = stripe or line_bytes // slices
        if slices & (slices - 1) or line_bytes % stripe or slices % (line_bytes // stripe):
            raise ValueError(f"a {line_bytes}-byte line is not a whole number of {stripe}-byte "
                             f"stripes dividing {slices} slices")
        wbase, wsize = [(r[1], r[2]) for r in regions if r[0] == "weight"][0]
        if wbase % (slices * stripe) or wsize % (slices * stripe):
            raise ValueError(f"the weight region [{wbase}, +{wsize}) is not whole "
                             f"{slices * stripe}-byte HBM lines")
        self._regions = list(regions)
        self._line = line_bytes
        self._lines = base // line_bytes
        self._slices = slices
        self.addr_bits = max(1, ceil_log2(self._lines))
        self.bank_lines = wsize // (slices * stripe)
        self.bank_addr_bits = max(1, ceil_log2(self.bank_lines))
        self.stripe = stripe
        lb = line_bytes * 8
        rd = mem_read_signature(self.addr_bits, lb)
        wr = mem_write_signature(self.addr_bits, lb)
        self.halves = H = bank_halves(stripe)
        brd = mem_read_signature(self.bank_addr_bits, self.stripe * 8 // H)
        bwr = mem_write_signature(self.bank_addr_bits, self.stripe * 8)
        super().__init__({"ld_wr": In(wr), "ex_wr": In(wr), "st_rd": In(rd), "ex_rd0": In(rd),
                          "ex_rd1": In(rd), "bank": In(brd).array(slices, 2 * H),
                          "bank_wr": In(bwr).array(slices)})

    @property
    def lines(self) -> int:
        return self._lines

    def elaborate(self, platform):
        m = Module()
        lb = self._line * 8
        bounds = []
        for name, base, size in self._regions:
            lo, hi = base // self._line, (base + size) // self._line
            if name == "weight":
                mem = _Banks(self, hi - lo)
            else:
                # a region of a URAM288's depth or more is UltraRAM: the u280's 8.75 MiB of
                # buffers (two copies, one per read port) are four times its block RAM
                big = hi - lo >= URAM_DEPTH
                mem = memory.Memory(shape=lb, depth=hi - lo, init=[],
                                    attrs={"ram_style": "ultra"} if big else None)
            m.submodules[f"mem_{name}"] = mem
            bounds.append((name, lo, hi, mem))

        def in_region(addr, lo, hi):
            if len(bounds) == 1:
                return Signal(init=1)
            conds = []
            if lo > 0:
                conds.append(addr >= lo)
            if hi < self._lines:
                conds.append(addr < hi)
            return Cat(*conds).all() if conds else Signal(init=1)

        # ---- write port: WRITE_CLIENTS' order (ex_wr, then ld_wr)
        wclients = [getattr(self, n).req for n in WRITE_CLIENTS]
        w_ready = [Signal(name=f"w_ready{i}") for i in range(len(wclients))]
        for name, lo, hi, mem in bounds:
            wp = mem.write_port(granularity=8)
            taken = Signal(name=f"wtaken_{name}")
            for i, c in enumerate(wclients):
                hit = c.valid & in_region(c.payload.addr, lo, hi)
                with m.If(hit & ~taken):
                    m.d.comb += [wp.addr.eq(c.payload.addr - lo), wp.data.eq(c.payload.data),
                                 wp.en.eq(c.payload.be), w_ready[i].eq(1)]
                t2 = Signal(name=f"wtaken_{name}_{i}")
                m.d.comb += t2.eq(taken | hit)
                taken = t2
        for c, r in zip(wclients, w_ready):
            m.d.comb += c.ready.eq(r)

        # ---- read ports: A (st_rd, ex_rd0), B (ex_rd1)
        def read_port(clients, tag):
            granted = [Signal(name=f"r{tag}_grant{i}") for i in range(len(clients))]
            sel_q = [Signal(range(max(len(bounds), 2)), name=f"r{tag}_region{i}")
                     for i in range(len(clients))]
            ports = []
            for ri, (name, lo, hi, mem) in enumerate(bounds):
                rp = mem.read_port()
                ports.append(rp)
                taken = Signal(name=f"r{tag}taken_{name}")
                m.d.comb += rp.en.eq(0)
                for i, c in enumerate(clients):
                    hit = c.req.valid & in_region(c.req.payload, lo, hi)
                    with m.If(hit & ~taken):
                        m.d.comb += [rp.addr.eq(c.req.payload - lo), rp.en.eq(1),
                                     granted[i].eq(1)]
                        m.d.sync += sel_q[i].eq(ri)
                    t2 = Signal(name=f"r{tag}taken_{name}_{i}")
                    m.d.comb += t2.eq(taken | hit)
                    taken = t2
            for i, c in enumerate(clients):
                m.d.comb += c.req.ready.eq(granted[i])
                m.d.sync += c.rsp.valid.eq(granted[i])
                out = ports[0].data
                for ri in range(1, len(ports)):
                    out = Mux(sel_q[i] == ri, ports[ri].data, out)
                m.d.comb += c.rsp.payload.eq(out)

        read_port([self.st_rd, self.ex_rd0], "a")
        read_port([self.ex_rd1], "b")
        return m


class _Banks(wiring.Component):
    """The weight region as ``slices`` banks of stripe-byte lines (module docstring), each
    ``halves`` memories of ``stripe / halves``-byte lines.

    Looks like a ``memory.Memory`` of whole lines to :class:`OnChipMemory`
    (``write_port(granularity=8)``, two ``read_port()``: A then B) and serves the
    slices' own read ports (``owner.bank``) on the cycles the line view leaves a bank
    port free: the line view takes port ``k`` (A or B) of every half memory of a bank at
    once, a slice's port ``bank[p][j]`` port ``j // H`` of half ``j % H``.
    """

    def __init__(self, owner, depth):
        self._owner = owner
        self._depth = depth                    # on-chip lines of the region
        self.bank_depth = owner.bank_lines
        self._views = []
        ab = max(1, ceil_log2(depth))
        lb = owner._line * 8
        self._wp = _Port(ab, lb, lb // 8)
        super().__init__({})

    def write_port(self, granularity=8):
        assert granularity == 8
        return self._wp

    def read_port(self):
        o = self._owner
        rp = _Port(max(1, ceil_log2(self._depth)), o._line * 8, 1)
        self._views.append(rp)
        return rp

    def elaborate(self, platform):
        m = Module()
        o = self._owner
        P, S, H = o._slices, o.stripe, o.halves
        k = o._line // S                       # stripes per on-chip line
        G = P // k                             # on-chip lines per HBM line
        HS = S // H                            # bytes per half memory's line
        lgg = exact_log2(G)
        wp_grp = self._wp.addr[0:lgg] if G > 1 else C(0, 1)
        rd_grp = []
        for v, view in enumerate(self._views):
            g = Signal(max(lgg, 1), name=f"rgrp{v}")
            if G > 1:
                m.d.sync += g.eq(view.addr[0:lgg])
            rd_grp.append(g)
        for p in range(P):
            i, grp = p % k, p // k
            view_en = self._wp.en[i * S:(i + 1) * S]
            view_hit = Signal(name=f"b{p}_wview")
            m.d.comb += view_hit.eq((view_en != 0) & (wp_grp == grp))
            bw = o.bank_wr[p].req
            m.d.comb += bw.ready.eq(~view_hit)
            for h in range(H):
                mem = memory.Memory(shape=HS * 8, depth=self.bank_depth, init=[])
                m.submodules[f"bank{p}" if H == 1 else f"bank{p}_{h}"] = mem
                wp = mem.write_port(granularity=8)
                lo = i * S + h * HS                # the half's first byte in the on-chip line
                with m.If(view_hit):
                    m.d.comb += [wp.addr.eq(self._wp.addr >> lgg),
                                 wp.data.eq(self._wp.data[lo * 8:(lo + HS) * 8]),
                                 wp.en.eq(self._wp.en[lo:lo + HS])]
                with m.Else():
                    m.d.comb += [wp.addr.eq(bw.payload.addr),
                                 wp.data.eq(bw.payload.data[h * HS * 8:(h + 1) * HS * 8]),
                                 wp.en.eq(Mux(bw.valid, bw.payload.be[h * HS:(h + 1) * HS], 0))]
                for v, view in enumerate(self._views):
                    rp = mem.read_port()
                    c = o.bank[p][v * H + h]
                    granted = Signal(name=f"b{p}_{v * H + h}_grant")
                    with m.If(rd_grp[v] == grp):
                        m.d.comb += view.data[lo * 8:(lo + HS) * 8].eq(rp.data)
                    m.d.comb += c.rsp.payload.eq(rp.data)
                    with m.If(view.en):
                        m.d.comb += [rp.addr.eq(view.addr >> lgg), rp.en.eq(1)]
                    with m.Elif(c.req.valid):
                        m.d.comb += [rp.addr.eq(c.req.payload), rp.en.eq(1), granted.eq(1)]
                    m.d.comb += c.req.ready.eq(granted)
                    m.d.sync += c.rsp.valid.eq(granted)
        return m


class _Port:
    """The signals of a memory port, for :class:`_Banks`' line view."""

    def __init__(self, ab, bits, en_bits):
        self.addr = Signal(ab)
        self.data = Signal(bits)
        self.en = Signal(en_bits)
