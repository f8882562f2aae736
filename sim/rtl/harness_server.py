"""The simulator side of :mod:`llmfab.sim.rtl.harness` (a cocotb test module).

Runs inside the Verilator process: connects back to the host over the socket
named by ``LLMFAB_HARNESS_ADDR`` and serves requests until ``quit``. Only
control and checking happen here: AXI4-Lite register accesses
(cocotbext-axi), waiting for the interrupt or the watchdog, and the HBM
memory through the C functions of ``sim/rtl/hbm_model.cpp`` (ctypes on the
simulator executable itself, linked with ``-rdynamic``).
"""

import ctypes
import os
import socket
import time
import traceback

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, First, ReadOnly, RisingEdge, Timer
from cocotb.utils import get_sim_time

from llmfab.hw.control import (ARGS, COUNTER_MAGIC, REG_CTRL, REG_GIE, REG_IER, REG_ISR,
                               counter_names)
from llmfab.hw.top import probe_names
from llmfab.sim.rtl.harness import recv_msg, send_msg

CLOCK_NS = int(os.environ.get("LLMFAB_CLOCK_NS", "10"))


def _lib():
    lib = ctypes.CDLL(None)
    u64, i64, p = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
    lib.hbm_init.argtypes = [u64, ctypes.c_int, u64]
    lib.hbm_load_file.argtypes = [ctypes.c_char_p, u64]
    lib.hbm_load_file.restype = i64
    lib.hbm_write_bytes.argtypes = [u64, ctypes.c_char_p, u64]
    lib.hbm_read_bytes.argtypes = [u64, p, u64]
    lib.hbm_fill.argtypes = [u64, ctypes.c_uint8, u64]
    lib.hbm_port_counters.argtypes = [p]
    lib.hbm_out_of_range.restype = u64
    lib.hbm_timing.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    lib.hbm_timing_stats.argtypes = [p]
    return lib


class Device:
    """The accelerator in the simulation: clock, reset, control bus, HBM model."""

    def __init__(self, dut):
        from cocotbext.axi import AxiLiteBus, AxiLiteMaster
        self.dut = dut
        self.lib = _lib()
        self.ports = 1
        self.lib_stripe = 32
        cocotb.start_soon(Clock(dut.ap_clk, CLOCK_NS, unit="ns").start())
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control", bus_separator="__"),
                                  dut.ap_clk, dut.ap_rst_n, reset_active_level=False)

    async def reset(self):
        self.dut.ap_rst_n.value = 0
        await ClockCycles(self.dut.ap_clk, 8)
        self.dut.ap_rst_n.value = 1
        await ClockCycles(self.dut.ap_clk, 4)

    def cycle(self) -> int:
        return int(get_sim_time(unit="ns")) // CLOCK_NS

    # ---- memory
    def hbm_init(self, size, ports, stripe):
        if self.lib.hbm_init(size, ports, stripe) != 0:
            raise RuntimeError(f"hbm_init({size}, {ports}, {stripe}) failed")
        self.ports = ports
        self.lib_stripe = stripe

    def hbm_load(self, path, addr):
        n = self.lib.hbm_load_file(str(path).encode(), addr)
        if n < 0:
            raise RuntimeError(f"cannot load {path} at {addr:#x} (error {n})")
        return n

    def hbm_write(self, addr, data):
        if self.lib.hbm_write_bytes(addr, bytes(data), len(data)) != 0:
            raise RuntimeError(f"HBM write [{addr:#x}, +{len(data)}) out of range")

    def hbm_read(self, addr, n):
        buf = ctypes.create_string_buffer(n)
        if self.lib.hbm_read_bytes(addr, buf, n) != 0:
            raise RuntimeError(f"HBM read [{addr:#x}, +{n}) out of range")
        return buf.raw

    def hbm_fill(self, addr, value, n):
        if self.lib.hbm_fill(addr, value, n) != 0:
            raise RuntimeError(f"HBM fill [{addr:#x}, +{n}) out of range")

    def hbm_timing(self, params):
        arr = (ctypes.c_double * len(params))(*params)
        if self.lib.hbm_timing(arr, len(params)) != 0:
            raise RuntimeError(f"hbm_timing({list(params)}) refused the parameters")

    def timing_stats(self):
        arr = (ctypes.c_uint64 * 6)()
        self.lib.hbm_timing_stats(arr)
        return dict(zip(("rd_bursts", "wr_bursts", "row_misses", "refreshes", "switch_bursts",
                         "bus_cycles"), arr))

    def port_counters(self):
        arr = (ctypes.c_uint64 * (4 * self.ports))()
        self.lib.hbm_port_counters(arr)
        return [dict(rd_bytes=arr[4 * p], wr_bytes=arr[4 * p + 1], rd_beats=arr[4 * p + 2],
                     wr_beats=arr[4 * p + 3]) for p in range(self.ports)]

    # ---- the probe (hw/top.py's live counters)
    def probe(self) -> dict:
        """The live counters now: name -> value (``probe_names``)."""
        names = probe_names(self.ports)
        v = self.dut.probe.value.to_unsigned()
        mask = (1 << 64) - 1
        return {n: (v >> (64 * i)) & mask for i, n in enumerate(names)}

    async def _sampler(self, every, out):
        """Append a sample every ``every`` cycles (one timer per sample, read after the edge settles)."""
        while True:
            await Timer(every * CLOCK_NS, unit="ns")
            await ReadOnly()
            out.append(self.probe())

    # ---- runs
    async def write_args(self, args):
        for name, value in args.items():
            off, bits = ARGS[name]
            await self.axil.write_dword(off, value & 0xFFFFFFFF)
            if bits == 64:
                await self.axil.write_dword(off + 4, (value >> 32) & 0xFFFFFFFF)

    async def run(self, args, timeout_cycles, sample_every=None):
        names = counter_names(self.ports)
        block = 8 * len(names)
        t_wall = time.perf_counter()
        self.hbm_fill(args["counters"], 0, block)
        await self.write_args(args)
        await self.axil.write_dword(REG_GIE, 1)
        await self.axil.write_dword(REG_IER, 1)
        before = self.port_counters()
        tbefore = self.timing_stats()
        c0 = self.cycle()
        await self.axil.write_dword(REG_CTRL, 1)
        samples, sampler = [], None
        if sample_every:
            sampler = cocotb.start_soon(self._sampler(int(sample_every), samples))
        irq = RisingEdge(self.dut.interrupt)
        await First(irq, Timer(timeout_cycles * CLOCK_NS, unit="ns"))
        c1 = self.cycle()
        if sampler is not None:
            sampler.cancel()
        if not int(self.dut.interrupt.value):
            await self.reset()
            return dict(status=None, pc=-1, timed_out=True, sim_cycles=c1 - c0,
                        wall_seconds=time.perf_counter() - t_wall, samples=samples)
        after = self.port_counters()
        ctrl = (await self.axil.read_dword(REG_CTRL))
        if sampler is not None:
            samples.append(self.probe())                      # the counters hold until the next start
        await self.axil.write_dword(REG_ISR, 1)              # toggle: clears the done bit
        raw = self.hbm_read(args["counters"], block)
        vals = [int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(len(names))]
        counters = dict(zip(names, vals))
        if counters["magic"] != COUNTER_MAGIC:
            raise RuntimeError(f"the counter block at {args['counters']:#x} was not written "
                               f"(ctrl {ctrl:#x})")
        if not ctrl & 2:
            raise RuntimeError(f"interrupt without ap_done (ctrl {ctrl:#x})")
        ports = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)]
        tafter = self.timing_stats()
        memory_stats = {k: tafter[k] - tbefore[k] for k in tafter}
        oob = self.lib.hbm_out_of_range()
        if oob:
            raise RuntimeError(f"the accelerator accessed HBM outside the model ({oob} beats)")
        return dict(status=counters["status"], pc=counters["pc"], counters=counters,
                    port_bytes=ports, sim_cycles=c1 - c0, timed_out=False,
                    wall_seconds=time.perf_counter() - t_wall, samples=samples,
                    memory_stats=memory_stats)


    # ---- a port's own memory (sim/rtl/hbm_model.cpp stripes the flat image over the ports)
    def _port_span(self, port, local, n):
        S, P = int(self.lib_stripe), self.ports
        if not 0 <= port < P or local < 0 or n < 0:
            raise RuntimeError(f"port {port} [{local:#x}, +{n}) is not a port's memory")
        l0, l1 = local // S, -(-(local + n) // S)
        return S, P, l0, l1

    def port_write(self, port, local, data):
        """Write ``data`` at ``local`` of port ``port``: read-modify-write of the flat lines."""
        import numpy as np
        n = len(data)
        if n == 0:
            return
        S, P, l0, l1 = self._port_span(port, local, n)
        flat = np.frombuffer(self.hbm_read(l0 * P * S, (l1 - l0) * P * S), np.uint8).copy()
        lines = flat.reshape(l1 - l0, P, S)
        mine = lines[:, port, :].reshape(-1)
        a = local - l0 * S
        mine[a:a + n] = np.frombuffer(bytes(data), np.uint8)
        lines[:, port, :] = mine.reshape(l1 - l0, S)
        self.hbm_write(l0 * P * S, lines.tobytes())

    def port_read(self, port, local, n):
        import numpy as np
        if n == 0:
            return b""
        S, P, l0, l1 = self._port_span(port, local, n)
        flat = np.frombuffer(self.hbm_read(l0 * P * S, (l1 - l0) * P * S), np.uint8)
        mine = flat.reshape(l1 - l0, P, S)[:, port, :].reshape(-1)
        a = local - l0 * S
        return mine[a:a + n].tobytes()

    async def wait_done(self, timeout_cycles):
        """Clock until ``interrupt`` or ``timeout_cycles``; then ctrl is read (clearing
        ap_done) and ISR toggled, as XRT's interrupt handling does."""
        c0 = self.cycle()
        if not int(self.dut.interrupt.value):
            await First(RisingEdge(self.dut.interrupt), Timer(int(timeout_cycles) * CLOCK_NS, unit="ns"))
        c1 = self.cycle()
        if not int(self.dut.interrupt.value):
            return dict(done=False, ctrl=None, cycles=c1 - c0, oob=int(self.lib.hbm_out_of_range()))
        ctrl = await self.axil.read_dword(REG_CTRL)
        await self.axil.write_dword(REG_ISR, 1)
        return dict(done=bool(ctrl & 2), ctrl=int(ctrl), cycles=c1 - c0,
                    oob=int(self.lib.hbm_out_of_range()))


@cocotb.test()
async def serve(dut):
    """Serve the host's requests until it says quit."""
    host, port = os.environ["LLMFAB_HARNESS_ADDR"].split(":")
    key = os.environ["LLMFAB_HARNESS_KEY"]
    sock = socket.create_connection((host, int(port)))
    dev = Device(dut)
    await dev.reset()
    while True:
        try:
            cmd, args = recv_msg(sock)
        except EOFError:
            return
        try:
            if cmd == "quit":
                send_msg(sock, ("ok", None))
                return
            if cmd == "hello":
                value = "llmfab" if args[0] == key else "?"
            elif cmd == "run":
                value = await dev.run(*args)
            elif cmd == "reg_read":
                value = await dev.axil.read_dword(args[0])
            elif cmd == "reg_write":
                value = await dev.axil.write_dword(args[0], args[1])
            elif cmd == "hbm_timing":
                value = dev.hbm_timing(*args)
            elif cmd == "hbm_init":
                value = dev.hbm_init(*args)
            elif cmd == "hbm_load":
                value = dev.hbm_load(*args)
            elif cmd == "hbm_write":
                value = dev.hbm_write(*args)
            elif cmd == "hbm_read":
                value = dev.hbm_read(*args)
            elif cmd == "hbm_fill":
                value = dev.hbm_fill(*args)
            elif cmd == "port_write":
                value = dev.port_write(*args)
            elif cmd == "port_read":
                value = dev.port_read(*args)
            elif cmd == "wait_done":
                value = await dev.wait_done(*args)
            else:
                raise ValueError(f"unknown request {cmd!r}")
            send_msg(sock, ("ok", value))
        except Exception:
            send_msg(sock, ("error", traceback.format_exc(limit=4)))
