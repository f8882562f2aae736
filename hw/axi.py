"""AXI4 / AXI4-Lite signatures and the per-port plumbing of the accelerator.

Signals are flat (``awaddr``, ``rvalid`` ...) so that an Amaranth port ``m_axi_hbm0``
comes out in Verilog as ``m_axi_hbm0__araddr`` etc., the names cocotbext-axi
finds with ``bus_separator="__"`` (and a Vitis wrapper maps one to one).

Inside the accelerator the engines do not drive AXI directly; they are
*clients* of a port:

* a read client (:func:`read_client_signature`) sends ``ar`` requests
  (local byte address, ``len`` = beats - 1) and receives its ``r`` beats in
  order; :class:`AxiReadMux` shares one AXI4 read channel pair between
  several clients (``ARID`` = client index, responses routed by ``RID``);
* a write client (:func:`write_client_signature`) sends ``aw``, ``w`` and
  receives ``b``; :class:`AxiWriteMux` hands the write channels to one
  client selected by ``sel`` (the store engine, or the counter writer at the
  end of a run: they never overlap).
"""

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.utils import ceil_log2, exact_log2
from amaranth.lib.wiring import In, Out

__all__ = [
    "AxiLiteSignature", "Axi4Signature", "ARReq", "read_client_signature",
    "write_client_signature", "AxiReadMux", "AxiWriteMux", "BURST_BYTES",
]

#: AXI bursts never cross a multiple of this many bytes (the 4 KiB rule).
BURST_BYTES = 4096
#: Flat HBM byte addresses the load and store engines compute with (1 TiB, 40 bits; the
#: largest card has 32 GiB): the validator rejects an LD/ST range that ends past
#: ``min(hbm_size, 2**FLAT_BITS)`` (status 2), so the burst generators' per-port beat
#: arithmetic is ``FLAT_BITS - log2(ports * beat bytes)`` bits wide instead of 64.
FLAT_BITS = 40


def AxiLiteSignature(addr_width: int, data_width: int = 32) -> wiring.Signature:
    """AXI4-Lite, from the master's side (``In(...)`` on a slave)."""
    return wiring.Signature({
        "awaddr": Out(addr_width), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
        "wdata": Out(data_width), "wstrb": Out(data_width // 8), "wvalid": Out(1),
        "wready": In(1),
        "bresp": In(2), "bvalid": In(1), "bready": Out(1),
        "araddr": Out(addr_width), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
        "rdata": In(data_width), "rresp": In(2), "rvalid": In(1), "rready": Out(1),
    })


def Axi4Signature(addr_width: int, data_width: int, id_width: int) -> wiring.Signature:
    """AXI4 (full), from the master's side."""
    return wiring.Signature({
        "awid": Out(id_width), "awaddr": Out(addr_width), "awlen": Out(8), "awsize": Out(3),
        "awburst": Out(2), "awlock": Out(1), "awcache": Out(4), "awprot": Out(3),
        "awvalid": Out(1), "awready": In(1),
        "wdata": Out(data_width), "wstrb": Out(data_width // 8), "wlast": Out(1),
        "wvalid": Out(1), "wready": In(1),
        "bid": In(id_width), "bresp": In(2), "bvalid": In(1), "bready": Out(1),
        "arid": Out(id_width), "araddr": Out(addr_width), "arlen": Out(8), "arsize": Out(3),
        "arburst": Out(2), "arlock": Out(1), "arcache": Out(4), "arprot": Out(3),
        "arvalid": Out(1), "arready": In(1),
        "rid": In(id_width), "rdata": In(data_width), "rresp": In(2), "rlast": In(1),
        "rvalid": In(1), "rready": Out(1),
    })


#: A burst request of a client: port-local byte address and beats - 1.
ARReq = data.StructLayout({"addr": 64, "len": 8})


def read_client_signature(data_width: int) -> wiring.Signature:
    """A read client of one port: ``ar`` requests out, ``r`` beats in (in request order)."""
    return wiring.Signature({
        "ar": Out(stream.Signature(ARReq)),
        "r": In(stream.Signature(data.StructLayout({"data": data_width, "last": 1}))),
    })


def write_client_signature(data_width: int) -> wiring.Signature:
    """A write client of one port: ``aw`` and ``w`` out, ``b`` in."""
    return wiring.Signature({
        "aw": Out(stream.Signature(ARReq)),
        "w": Out(stream.Signature(data.StructLayout({
            "data": data_width, "strb": data_width // 8, "last": 1}))),
        "b": In(stream.Signature(2)),
    })


class AxiReadMux(wiring.Component):
    """Share one AXI4 read channel pair between ``n`` read clients.

    AR: fixed priority (client 0 first); a request shown on ``arvalid`` stays
    until it is accepted (the grant is locked). ``ARID`` is the client index;
    each R beat goes to client ``RID``. ``base`` is added to every address
    (the port's buffer base).

    Members
    -------
    clients : list of In(read_client_signature)
    axi : Out(Axi4Signature) read channels (the write channels are left alone)
    base : In(64)
    """

    def __init__(self, n: int, data_width: int, id_width: int):
        if n < 1 or n > 1 << id_width:
            raise ValueError(f"Read clients must be between 1 and {1 << id_width}, not {n}")
        self._n = n
        self._dw = data_width
        super().__init__({
            "clients": In(read_client_signature(data_width)).array(n),
            "axi": Out(Axi4Signature(64, data_width, id_width)),
            "base": In(64),
        })

    def elaborate(self, platform):
        m = Module()
        axi = self.axi
        n = self._n
        lock = Signal()
        held = Signal(range(max(n, 2)))
        pick = Signal(range(max(n, 2)))
        for i in reversed(range(n)):
            with m.If(self.clients[i].ar.valid):
                m.d.comb += pick.eq(i)
        grant = Mux(lock, held, pick)
        any_valid = Cat(c.ar.valid for c in self.clients).any()
        m.d.comb += [axi.arvalid.eq(Mux(lock, 1, any_valid)), axi.arid.eq(grant)]
        for i, c in enumerate(self.clients):
            with m.If(grant == i):
                m.d.comb += [axi.araddr.eq(c.ar.payload.addr + self.base),
                             axi.arlen.eq(c.ar.payload.len)]
            m.d.comb += c.ar.ready.eq(axi.arready & (grant == i) & axi.arvalid)
        m.d.sync += [lock.eq(axi.arvalid & ~axi.arready), held.eq(grant)]
        m.d.comb += [axi.arsize.eq(exact_log2(self._dw // 8)), axi.arburst.eq(1),
                     axi.arcache.eq(0b0011)]
        for i, c in enumerate(self.clients):
            m.d.comb += [c.r.valid.eq(axi.rvalid & (axi.rid == i)),
                         c.r.payload.data.eq(axi.rdata), c.r.payload.last.eq(axi.rlast)]
            with m.If(axi.rid == i):
                m.d.comb += axi.rready.eq(c.r.ready)
        return m


class AxiWriteMux(wiring.Component):
    """Give one AXI4 write channel set to client ``sel`` (``AWID`` 0).

    Members
    -------
    clients : list of In(write_client_signature)
    axi : Out(Axi4Signature) write channels
    sel : In(range(n))
    base : In(64)
    """

    def __init__(self, n: int, data_width: int, id_width: int):
        self._n = n
        self._dw = data_width
        super().__init__({
            "clients": In(write_client_signature(data_width)).array(n),
            "axi": Out(Axi4Signature(64, data_width, id_width)),
            "sel": In(range(max(n, 2))),
            "base": In(64),
        })

    def elaborate(self, platform):
        m = Module()
        axi = self.axi
        for i, c in enumerate(self.clients):
            connect = [
                axi.awvalid.eq(c.aw.valid), axi.awaddr.eq(c.aw.payload.addr + self.base),
                axi.awlen.eq(c.aw.payload.len), c.aw.ready.eq(axi.awready),
                axi.wvalid.eq(c.w.valid), axi.wdata.eq(c.w.payload.data),
                axi.wstrb.eq(c.w.payload.strb), axi.wlast.eq(c.w.payload.last),
                c.w.ready.eq(axi.wready),
                c.b.valid.eq(axi.bvalid), c.b.payload.eq(axi.bresp), axi.bready.eq(c.b.ready),
            ]
            if self._n == 1:                # one client: wires (and the base adder), no mux
                m.d.comb += connect
            else:
                with m.If(self.sel == i):
                    m.d.comb += connect
        m.d.comb += [axi.awsize.eq(exact_log2(self._dw // 8)), axi.awburst.eq(1),
                     axi.awcache.eq(0b0011)]
        return m
