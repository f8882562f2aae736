"""Backend ``xrt``: a compiled bundle on an Alveo card through pyxrt, or on the simulated card.

The card runs the RTL kernel ``llmfab build`` packages (hw/vitis.py). This backend
talks to it only through pyxrt, XRT's Python binding:

1. ``pyxrt.device(i)``, ``pyxrt.xclbin(path)``, ``device.load_xclbin``,
   ``pyxrt.kernel(device, uuid, "llmfab")``;
2. one buffer object per HBM port, ``pyxrt.bo(device, size, bo.normal,
   kernel.group_id(arg))`` in the bank that port is linked to (``sp=`` of link.cfg);
3. the device image: the bundle's HBM image, then the counter block, then every program
   (decode and each prefill bucket), in one flat address space striped over the ports
   as the accelerator addresses it (beat ``i`` of the flat space is beat ``i // P`` of
   port ``i % P``); each bank's share is written and synced to the device once, bank by bank;
4. a run: the arguments in kernel.xml order (32-bit scalars as C ints, since pyxrt's
   ``kernel.__call__`` silently skips any other integer; 64-bit registers as two halves;
   the bank buffers for the pointers), ``run = kernel(*args)``, ``run.wait(timeout_ms)``
   (every wait has a timeout), then the counter block (status, pc, cycles, busy
   counters) and the logits are synced back from the device and read.

Statuses map to the errors the golden model raises (:class:`SimError` naming the status
and pc); a wait that times out, a run that ends in another state than COMPLETED and a
counter block that was not written are :class:`BackendError` naming what happened.

Without pyxrt (``import pyxrt`` finds no module) the backend runs on the simulated card,
sim/rtl/xrt_card.py: the same calls, on the Verilator build of the accelerator (the rtl
backend's build). ``stats()["device"]`` says which: ``"simulated"`` or the card's name.
A pyxrt that is installed but fails to import is reported, not replaced.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from pathlib import Path

import numpy as np

from llmfab.compiler import isa
from llmfab.core.errors import BackendError, SimError
from llmfab.host.runtime import ProgramDevice, config_and_bundle

#: Default bound of every wait on a run: 10 s of kernel time (a card runs a SmolLM2 decode
#: step on ``ci`` in ~8 ms; the simulated card counts simulated time at the kernel clock).
DEFAULT_TIMEOUT_MS = 10_000
_ALIGN = 4096


def load_pyxrt():
    """``(pyxrt module, None)``, or ``(None, why)`` when no pyxrt module exists.

    A pyxrt that exists but fails to import (XRT libraries missing, ABI mismatch) raises
    :class:`BackendError`: swapping in the simulated card would hide a broken install.
    """
    try:
        return importlib.import_module("pyxrt"), None
    except ModuleNotFoundError as e:
        if e.name != "pyxrt":
            raise BackendError(f"pyxrt is installed but cannot import {e.name}: {e}") from None
        return None, ("no XRT Python binding (pyxrt) on this machine: source /opt/xilinx/xrt/setup.sh "
                      "so that PYTHONPATH has /opt/xilinx/xrt/python")
    except ImportError as e:
        raise BackendError(f"pyxrt is installed but fails to import: {e}") from None


def list_devices() -> dict:
    """``{"xrt": bool, "devices": [{"index", "name", "bdf"}], "note": str}`` (``llmfab devices``)."""
    pyxrt, why = load_pyxrt()
    if pyxrt is None:
        return {"xrt": False, "devices": [],
                "note": f"{why}; --backend xrt runs on the simulated card"}
    n = int(pyxrt.enumerate_devices())
    out = []
    for i in range(n):
        try:
            d = pyxrt.device(i)
            out.append({"index": i, "name": d.get_info(pyxrt.xrt_info_device.name),
                        "bdf": d.get_info(pyxrt.xrt_info_device.bdf)})
        except Exception as e:      # a card the driver lists but cannot open
            out.append({"index": i, "error": " ".join(str(e).split())})
    note = (f"{n} card(s)" if n else "XRT is installed but sees no card (xbutil examine)")
    return {"xrt": True, "devices": out, "note": note}


def simulated_xclbin(config, *, progress=None) -> Path:
    """The simulated card's xclbin stand-in for ``config`` (cached under sim_build/): the
    project of ``llmfab build`` without the Verilog (the simulation has its own build)."""
    from llmfab.hw.verilog import build_root
    from llmfab.hw.vitis import kernel_xml, link_config, write_project
    from llmfab.sim.rtl.xrt_card import write_standin
    h = hashlib.sha256((kernel_xml(config) + link_config(config)).encode()).hexdigest()[:16]
    d = build_root() / f"xrt-{config.name}-{h}"
    standin = d / "llmfab.sim-xclbin.json"
    if not standin.is_file():
        write_project(config, d, verilog=False,
                      verilog_note="not written: this project backs the simulated card, whose "
                                   "Verilator build is sim/rtl/harness.py's")
        tmp = d / f".standin-{time.time_ns()}"
        write_standin(tmp, d, config)
        tmp.replace(standin)
    return standin


class XrtDevice(ProgramDevice):
    name = "xrt"

    def __init__(self, model, config=None, *, bundle=None, xclbin=None, device=None,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS, prefill: bool = True, pyxrt=None,
                 progress=None, **kw):
        """``device``: the card's index, or ``"sim"`` for the simulated card; default card 0
        when pyxrt is present, else the simulated card. ``xclbin``: the card's xclbin
        (``make`` in the ``llmfab build`` directory); the simulated card makes its own.
        ``pyxrt``: the module to use (tests pass the simulated card's)."""
        from llmfab.hw.vitis import KERNEL_NAME, kernel_args
        from llmfab.hw.top import geometry
        config, bundle = config_and_bundle(model, config, bundle)
        if int(timeout_ms) < 1:
            raise BackendError(f"timeout_ms must be at least 1, not {timeout_ms}")
        self.bundle, self.config = bundle, config
        self.timeout_ms = int(timeout_ms)
        self.simulated = False
        if pyxrt is None:
            if device == "sim":
                pyxrt = None
            else:
                pyxrt, why = load_pyxrt()
                if pyxrt is None and device is not None:
                    raise BackendError(f"cannot open card {device}: {why}")
            if pyxrt is None:
                from llmfab.sim.rtl import xrt_card as pyxrt
        self.simulated = getattr(pyxrt, "__name__", "") == "llmfab.sim.rtl.xrt_card"
        self.pyxrt = pyxrt
        if self.simulated:
            if xclbin is not None:
                raise BackendError(f"cannot load {xclbin}: the simulated card runs its own "
                                   f"stand-in (no XRT here); drop --xclbin")
            xclbin = simulated_xclbin(config)
            index = 0
        else:
            if xclbin is None:
                raise BackendError("--backend xrt on a card needs --xclbin FILE "
                                   "(make in the directory llmfab build wrote)")
            if not Path(xclbin).is_file():
                raise BackendError(f"xclbin {xclbin} does not exist")
            index = 0 if device in (None, "auto") else device
            try:
                index = int(index)
            except (TypeError, ValueError):
                raise BackendError(f"--device must be a card index or 'sim', not {device!r}") from None
        g = geometry(config)
        self.P, self.S = g["ports"], g["beat_bytes"]
        self.line = self.P * self.S
        self.args = kernel_args(self.P)
        self._dev = None
        try:
            self._open(index, str(xclbin), KERNEL_NAME)
            self._layout()
            self._upload()
        except BaseException:
            self.close()
            raise
        self.context = int(bundle.manifest["context"])
        self.vocab = int(bundle.manifest["model"]["vocab_size"])
        self.buckets = sorted(int(t) for t in bundle.prefill) if prefill else []
        self.pos = 0
        self.decode_cycles = []
        self.prefill_runs = []
        self.decode_counters = {}
        self.run_seconds = []

    # ---- opening
    def _open(self, index, xclbin_path, kernel_name):
        px = self.pyxrt
        try:
            self._dev = px.device(index)
            xb = px.xclbin(xclbin_path)
            names = [k.get_name() for k in xb.get_kernels()]
            if kernel_name not in names:
                raise BackendError(f"{xclbin_path} has no kernel '{kernel_name}' (it has "
                                   f"{', '.join(names) or 'none'}): build it with llmfab build")
            want = len(self.args)
            have = next(k.get_num_args() for k in xb.get_kernels() if k.get_name() == kernel_name)
            if have != want:
                raise BackendError(f"{xclbin_path}: kernel '{kernel_name}' has {have} arguments but "
                                   f"config '{self.config.name}' ({self.P} ports) needs {want}: it was "
                                   f"built for another configuration")
            self.uuid = self._dev.load_xclbin(xb)
            self.kernel = px.kernel(self._dev, self.uuid, kernel_name)
            self.device_name = ("simulated" if self.simulated
                                else self._dev.get_info(px.xrt_info_device.name))
        except BackendError:
            raise
        except Exception as e:           # pyxrt raises RuntimeError with XRT's message
            raise BackendError(f"xrt: cannot open card {index} with {xclbin_path}: "
                               f"{' '.join(str(e).split())}") from None

    def _layout(self):
        """The flat device image: bundle image, counter block, programs; bank size."""
        from llmfab.hw.control import counter_names
        al = max(_ALIGN, self.line)
        align = lambda x: -(-int(x) // al) * al          # noqa: E731
        man = self.bundle.manifest
        self.hbm_size = int(man["hbm_size"])
        self.counter_names = counter_names(self.P)
        self.counters_addr = align(self.hbm_size)
        at = self.counters_addr + align(8 * len(self.counter_names))
        self.programs = {}
        for name in self.bundle.program_names():
            prog = self.bundle.named_program(name)[0]
            self.programs[name] = (at, bytes(prog))
            at = align(at + len(prog))
        self.flat_size = at
        self.bank_bytes = at // self.P
        self.registers = {k: int(v) for k, v in man["registers"].items()}
        self.onchip_context = int(man["onchip"]["context"])

    def _upload(self):
        """Every bank's share of the device image, written and synced once."""
        px = self.pyxrt
        flat = np.zeros(self.flat_size, np.uint8)
        img = np.ascontiguousarray(self.bundle.hbm_image, np.uint8)
        flat[:img.size] = img
        for addr, prog in self.programs.values():
            flat[addr:addr + len(prog)] = np.frombuffer(prog, np.uint8)
        lines = flat.reshape(-1, self.P, self.S)
        self.bos = []
        try:
            for a in self.args:
                if not a.address_qualifier:
                    continue
                b = px.bo(self._dev, self.bank_bytes, px.bo.normal, self.kernel.group_id(a.id))
                share = np.ascontiguousarray(lines[:, a.bank, :]).reshape(-1)
                b.write(share, 0)
                b.sync(px.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE, self.bank_bytes, 0)
                self.bos.append(b)
        except Exception as e:
            raise BackendError(f"xrt: cannot put the {self.flat_size}-byte device image on the card "
                               f"({self.P} banks of {self.bank_bytes} bytes): "
                               f"{' '.join(str(e).split())}") from None

    # ---- the striped flat address space, through the bank buffers
    def _span(self, addr, n):
        l0, l1 = addr // self.line, -(-(addr + n) // self.line)
        return l0, l1, l0 * self.S, (l1 - l0) * self.S

    def read_flat(self, addr: int, n: int) -> np.ndarray:
        """``n`` bytes of the flat image at ``addr``, synced from the device."""
        px = self.pyxrt
        l0, l1, local, size = self._span(int(addr), int(n))
        banks = []
        for b in self.bos:
            b.sync(px.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE, size, local)
            banks.append(np.asarray(b.read(size, local)).view(np.uint8).reshape(l1 - l0, self.S))
        flat = np.stack(banks, axis=1).reshape(-1)
        a = int(addr) - l0 * self.line
        return flat[a:a + int(n)].copy()

    def write_flat(self, addr: int, data) -> None:
        """Write ``data`` at flat ``addr`` on the device (lines only partly written are
        read from the device first, so nothing else changes)."""
        px = self.pyxrt
        data = np.frombuffer(bytes(data), np.uint8) if isinstance(data, (bytes, bytearray)) \
            else np.ascontiguousarray(data, np.uint8).reshape(-1)
        addr, n = int(addr), data.size
        if n == 0:
            return
        l0, l1, local, size = self._span(addr, n)
        if addr % self.line or n % self.line:
            flat = self.read_flat(l0 * self.line, (l1 - l0) * self.line)
        else:
            flat = np.empty((l1 - l0) * self.line, np.uint8)
        a = addr - l0 * self.line
        flat[a:a + n] = data
        lines = flat.reshape(l1 - l0, self.P, self.S)
        for p, b in enumerate(self.bos):
            b.write(np.ascontiguousarray(lines[:, p, :]).reshape(-1), local)
            b.sync(px.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE, size, local)

    # ---- runs
    def _run(self, program: str, pos: int, token: int, ntok: int) -> dict:
        from llmfab.hw.vitis import c_int, split_args
        px = self.pyxrt
        addr, prog = self.programs[program]
        self.write_flat(self.counters_addr, np.zeros(8 * len(self.counter_names), np.uint8))
        regs = {"program": addr, "program_words": len(prog) // 16, "pos": pos, "seq": pos + ntok,
                "token": token, "wbase": self.registers["wbase"], "kvbase": self.registers["kvbase"],
                "iobase": self.registers["iobase"], "tbase": self.registers["tbase"],
                "counters": self.counters_addr, "hbm_size": self.hbm_size,
                "context": self.onchip_context}
        try:
            words = split_args(regs, self.P)
        except ValueError as e:
            raise BackendError(f"xrt: {e}") from None
        bos = iter(self.bos)
        args = [next(bos) if a.address_qualifier else c_int(words[a.name]) for a in self.args]
        what = f"{program} at position {pos}"
        t0 = time.perf_counter()
        try:
            run = self.kernel(*args)
            state = run.wait(self.timeout_ms)
        except Exception as e:
            raise BackendError(f"xrt: {what}: {' '.join(str(e).split())}") from None
        self.run_seconds.append(time.perf_counter() - t0)
        done = px.ert_cmd_state.ERT_CMD_STATE_COMPLETED
        if state != done:
            name = getattr(state, "name", str(state))
            if state == px.ert_cmd_state.ERT_CMD_STATE_TIMEOUT:
                raise BackendError(f"xrt: the kernel did not finish {what} within {self.timeout_ms} ms; "
                                   f"the compute unit is still busy (reset the card: xbutil reset)")
            raise BackendError(f"xrt: the kernel ended {what} in state {name}, not COMPLETED")
        raw = self.read_flat(self.counters_addr, 8 * len(self.counter_names))
        vals = raw.view("<u8")
        counters = {n: int(v) for n, v in zip(self.counter_names, vals)}
        from llmfab.hw.control import COUNTER_MAGIC
        if counters["magic"] != COUNTER_MAGIC:
            raise BackendError(f"xrt: the kernel completed {what} but its counter block at "
                               f"{self.counters_addr:#x} holds no result (magic {counters['magic']:#x})")
        if counters["status"] != isa.STATUS_OK:
            raise SimError(f"xrt: the kernel stopped with status {counters['status']} "
                           f"({isa.STATUS_NAMES.get(counters['status'], '?')}) at instruction "
                           f"{counters['pc']} ({what})")
        return counters

    def reset(self):
        kv0, kvn = self.bundle.manifest["memory_map"]["kv"]
        self.write_flat(int(kv0), np.zeros(int(kvn), np.uint8))
        self.pos = 0

    def _decode(self, pos, token):
        c = self._run("decode", pos, token, 1)
        self.decode_cycles.append(c["cycles"])
        self.decode_counters = c
        io = int(self.bundle.manifest["memory_map"]["logits"][0])
        return self.read_flat(io, 4 * self.vocab).view(np.float32)[None]

    def _prefill(self, pos, tokens, logits=True):
        from llmfab.compiler.bundle import logits_rows, prefill_program
        T = len(tokens)
        self.bundle.check_prefill_start(pos, T)
        for addr, row in self.bundle.prefill_token_rows(tokens):
            self.write_flat(addr, row)
        c = self._run(prefill_program(T, logits), pos, 0, T)
        self.prefill_runs.append({"tokens": T, "logits": logits, "cycles": c["cycles"]})
        rows = logits_rows(T, logits)
        return self.bundle.prefill_logits(rows, self.read_flat) if rows else None

    def stats(self):
        from llmfab.host.rtl_backend import counter_stats
        out = {"device": self.device_name}
        if self.simulated:
            out["simulation_build"] = str(self._dev.sim.build_dir)
        if self.decode_counters:
            out.update(counter_stats(self.config, self.bundle, self.decode_cycles, self.decode_counters))
        out["prefill_runs"] = list(self.prefill_runs)
        out["kernel_timeout_ms"] = self.timeout_ms
        if self.run_seconds:
            out["seconds_per_run"] = round(self.run_seconds[-1], 4)
        return out

    def close(self):
        self.bos = []
        d, self._dev = self._dev, None
        if d is not None and hasattr(d, "close"):
            d.close()
