"""A simulated Alveo card with pyxrt's interface, backed by the Verilator build of the accelerator.

The ``xrt`` backend (host/xrt_backend.py) is written against pyxrt, XRT's Python binding
(``src/python/pybind11/src/pyxrt.cpp`` in Xilinx/XRT). This module has the same names
for the subset the backend uses (:data:`PYXRT_NAMES`, checked against pyxrt's published
stub by tests/test_xrt_card.py), so the backend runs unchanged on it when no XRT is installed:

* :class:`xclbin` reads a *stand-in* (JSON, :func:`write_standin`) instead of an AXLF
  binary: it points at the project ``llmfab build`` writes (``kernel.xml``,
  ``link.cfg``) and holds the configuration whose simulation build stands in for the
  bitstream (sim/rtl/harness.py's :func:`~llmfab.sim.rtl.harness.build`, cached);
* :meth:`device.load_xclbin` starts that simulation (one simulator process per device);
* :class:`bo` keeps a host copy and a device copy (the bank behind the ``m_axi`` port
  its memory group connects to, in the simulated HBM); they move only on :meth:`bo.sync`,
  so a missing sync fails here as it does on a card;
* :class:`kernel` takes its arguments from ``kernel.xml``: ``kernel(*args)`` and
  :meth:`run.start` write every argument to its offset over AXI4-Lite (arguments not
  set are written as 0, as XRT's run objects start zeroed), then ``ap_start``;
* :meth:`run.wait` clocks the simulation until the kernel's interrupt (``ap_done``)
  or the timeout, counted in kernel-clock cycles of simulated time
  (``timeout_ms x clock_mhz x 1000``); the simulator's socket has a wall-clock bound too.

pyxrt's traps are reproduced, so the backend cannot depend on what a card would not do:
``kernel.__call__`` silently skips an integer that is not a C ``int`` (and anything that
is neither a bo nor an int); ``run.set_arg`` refuses one (TypeError, as pybind11 does);
``bo.write(data, seek)`` and ``bo.read(size, skip)`` take the offset explicitly;
``bo.read`` returns int8.
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from enum import IntEnum
from pathlib import Path

import numpy as np

from llmfab.core.errors import SimError

#: Every pyxrt name the backend or this module's users rely on (module attributes, and
#: ``Class.member``), as published in Xilinx/XRT ``src/python/pybind11/pyxrt.pyi``
#: (read 2026-12-02, commit 4901406e6e8f) and bound in ``src/python/pybind11/src/pyxrt.cpp``.
PYXRT_NAMES = (
    "enumerate_devices", "uuid", "uuid.to_string",
    "device", "device.load_xclbin", "device.get_xclbin_uuid", "device.get_info",
    "device.register_xclbin",
    "xclbin", "xclbin.get_uuid", "xclbin.get_kernels", "xclbin.get_mems", "xclbin.get_xsa_name",
    "xclbin.xclbinkernel", "xclbin.xclbinkernel.get_name", "xclbin.xclbinkernel.get_num_args",
    "xclbin.xclbinmem", "xclbin.xclbinmem.get_tag", "xclbin.xclbinmem.get_index",
    "xclbin.xclbinmem.get_size_kb", "xclbin.xclbinmem.get_base_address", "xclbin.xclbinmem.get_used",
    "kernel", "kernel.group_id", "kernel.__call__", "kernel.cu_access_mode", "kernel.shared",
    "run", "run.set_arg", "run.start", "run.wait", "run.state",
    "bo", "bo.write", "bo.read", "bo.sync", "bo.map", "bo.size", "bo.address", "bo.flags", "bo.normal",
    "xclBOSyncDirection", "xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE",
    "xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE",
    "ert_cmd_state", "ert_cmd_state.ERT_CMD_STATE_COMPLETED", "ert_cmd_state.ERT_CMD_STATE_ERROR",
    "ert_cmd_state.ERT_CMD_STATE_TIMEOUT", "ert_cmd_state.ERT_CMD_STATE_NEW",
    "ert_cmd_state.ERT_CMD_STATE_SUBMITTED", "ert_cmd_state.ERT_CMD_STATE_ABORT",
    "xrt_info_device", "xrt_info_device.name", "xrt_info_device.bdf", "xrt_info_device.platform",
)

STANDIN_FORMAT = "llmfab-simulated-xclbin-1"
#: config hash -> the simulation build a card of this process already started (generating
#: the accelerator's Verilog only to find its cached build costs about a minute)
_BUILDS = {}
#: Bus/device/function the simulated card reports.
SIM_BDF = "sim:00:00.0"
_C_INT = (-(1 << 31), (1 << 31) - 1)


# ---------------------------------------------------------------------------------------
# enums (values of XRT's xrt/detail/ert.h and xclBOSyncDirection)
# ---------------------------------------------------------------------------------------

class xclBOSyncDirection(IntEnum):
    XCL_BO_SYNC_BO_TO_DEVICE = 0
    XCL_BO_SYNC_BO_FROM_DEVICE = 1
    XCL_BO_SYNC_BO_GMIO_TO_AIE = 2
    XCL_BO_SYNC_BO_AIE_TO_GMIO = 3


class ert_cmd_state(IntEnum):
    ERT_CMD_STATE_NEW = 1
    ERT_CMD_STATE_QUEUED = 2
    ERT_CMD_STATE_COMPLETED = 4
    ERT_CMD_STATE_ERROR = 5
    ERT_CMD_STATE_ABORT = 6
    ERT_CMD_STATE_SUBMITTED = 7
    ERT_CMD_STATE_TIMEOUT = 8
    ERT_CMD_STATE_NORESPONSE = 9
    ERT_CMD_STATE_SKERROR = 10
    ERT_CMD_STATE_SKCRASHED = 11


class xrt_info_device(IntEnum):
    bdf = 0
    interface_uuid = 1
    kdma = 2
    max_clock_frequency_mhz = 3
    m2m = 4
    name = 5
    nodma = 6
    offline = 7
    electrical = 8
    thermal = 9
    mechanical = 10
    memory = 11
    platform = 12
    pcie_info = 13
    host = 14
    dynamic_regions = 15
    vmr = 16


def enumerate_devices() -> int:
    """The simulated system has one card."""
    return 1


class uuid:
    def __init__(self, text: str):
        self._s = str(text)

    def to_string(self) -> str:
        return self._s

    def __eq__(self, other):
        return isinstance(other, uuid) and other._s == self._s

    def __hash__(self):
        return hash(self._s)

    def __repr__(self):
        return f"uuid({self._s!r})"


# ---------------------------------------------------------------------------------------
# the xclbin stand-in
# ---------------------------------------------------------------------------------------

def write_standin(path, project_dir, config, *, bank_bytes: int | None = None) -> Path:
    """Write the simulated card's xclbin stand-in for the project in ``project_dir``
    (``llmfab build`` output; Verilog not needed) and ``config``; returns its path.

    ``bank_bytes``: the size of each simulated memory bank (default: the board's channel
    capacity). The uuid is the hash of kernel.xml, link.cfg and the configuration.
    """
    project_dir = Path(project_dir).resolve()
    kx, lc = (project_dir / "kernel.xml").read_text(), (project_dir / "link.cfg").read_text()
    if bank_bytes is None:
        bank_bytes = config.board_spec.main_memory.capacity_bytes_per_channel
    h = hashlib.sha256((kx + lc + config.config_hash()).encode()).hexdigest()
    u = f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    doc = {"format": STANDIN_FORMAT, "uuid": u, "kernel_xml": str(project_dir / "kernel.xml"),
           "link_cfg": str(project_dir / "link.cfg"), "config": config.to_dict(),
           "config_hash": config.config_hash(), "bank_bytes": int(bank_bytes),
           "simulation": "sim/rtl/harness.py build(config): the accelerator's default execution "
                         "unit, probe on: the build the rtl backend uses"}
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def parse_kernel_xml(text: str) -> dict:
    """``kernel.xml`` -> ``{"name", "hw_control", "ports": {name: width}, "args": [dict]}``."""
    root = ET.fromstring(text)
    k = root.find("kernel")
    if k is None:
        raise SimError("kernel.xml has no <kernel>")
    ports = {p.get("name"): int(p.get("dataWidth")) for p in k.find("ports")}
    args = []
    for a in k.find("args"):
        args.append({"name": a.get("name"), "id": int(a.get("id")), "offset": int(a.get("offset"), 16),
                     "size": int(a.get("size"), 16), "address_qualifier": int(a.get("addressQualifier")),
                     "port": a.get("port")})
    args.sort(key=lambda a: a["id"])
    if [a["id"] for a in args] != list(range(len(args))):
        raise SimError("kernel.xml: argument ids are not 0..n-1")
    return {"name": k.get("name"), "hw_control": k.get("hwControlProtocol"), "ports": ports, "args": args}


def parse_link_config(text: str) -> dict:
    """link.cfg -> ``{"nk": (kernel, count, [cu]), "sp": {(cu, port): tag}, "freq_hz": {cu: hz}}``."""
    # several sp= lines: configparser keeps one value per key, so the file is read by hand
    sp, nk, freq = {}, None, {}
    section = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            section = m.group(1)
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if section == "connectivity" and key == "sp":
            left, _, tag = value.partition(":")
            cu, _, port = left.partition(".")
            if (cu, port) in sp:
                raise SimError(f"link.cfg: two sp= lines for {cu}.{port}")
            sp[(cu, port)] = tag
        elif section == "connectivity" and key == "nk":
            parts = value.split(":")
            nk = (parts[0], int(parts[1]), parts[2].split(".") if len(parts) > 2 else [])
        elif section == "clock" and key == "freqHz":
            hz, _, cu = value.partition(":")
            freq[cu] = int(hz)
    return {"nk": nk, "sp": sp, "freq_hz": freq}


class xclbin:
    """The stand-in of an xclbin (see :func:`write_standin`)."""

    class xclbinkernel:
        def __init__(self, name="", nargs=0):
            self._name, self._n = name, nargs

        def get_name(self) -> str:
            return self._name

        def get_num_args(self) -> int:
            return self._n

    class xclbinmem:
        def __init__(self, tag="", index=0, size_kb=0, used=False):
            self._tag, self._index, self._size_kb, self._used = tag, index, size_kb, used

        def get_tag(self) -> str:
            return self._tag

        def get_index(self) -> int:
            return self._index

        def get_size_kb(self) -> int:
            return self._size_kb

        def get_base_address(self) -> int:
            return 0            # every simulated bank is its port's own memory, from 0

        def get_used(self) -> bool:
            return self._used

    def __init__(self, filename: str):
        path = Path(str(filename))
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RuntimeError(f"{filename}: not a simulated-card xclbin stand-in ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != STANDIN_FORMAT:
            raise RuntimeError(f"{filename}: not a simulated-card xclbin stand-in (format "
                               f"{doc.get('format') if isinstance(doc, dict) else None!r})")
        self.path = path
        self.doc = doc
        self.kernel_desc = parse_kernel_xml(Path(doc["kernel_xml"]).read_text())
        self.link = parse_link_config(Path(doc["link_cfg"]).read_text())
        from llmfab.boards.config import config_from_dict
        self.config = config_from_dict(doc["config"], f"{filename} (config)")
        if self.config.config_hash() != doc["config_hash"]:
            raise RuntimeError(f"{filename}: the configuration does not hash to {doc['config_hash']}")
        mem = self.config.board_spec.main_memory
        kind = {"hbm": "HBM", "ddr": "DDR"}.get(mem.kind, mem.kind.upper())
        used = set(self.link["sp"].values())
        self.bank_bytes = int(doc["bank_bytes"])
        self._mems = [xclbin.xclbinmem(f"{kind}[{i}]", i, self.bank_bytes // 1024, f"{kind}[{i}]" in used)
                      for i in range(mem.channels)]

    def get_uuid(self) -> uuid:
        return uuid(self.doc["uuid"])

    def get_kernels(self) -> list:
        return [xclbin.xclbinkernel(self.kernel_desc["name"], len(self.kernel_desc["args"]))]

    def get_mems(self) -> list:
        return list(self._mems)

    def get_xsa_name(self) -> str:
        return f"llmfab_sim_{self.config.board}"


# ---------------------------------------------------------------------------------------
# device, buffers, kernel, runs
# ---------------------------------------------------------------------------------------

class device:
    """The simulated card (index 0). ``load_xclbin`` starts the simulation of its configuration."""

    def __init__(self, index=0, *, timeout_seconds: float = 3600, progress=None):
        if not isinstance(index, int) or index != 0:
            raise RuntimeError(f"No such device '{index}' (the simulated system has card 0 only)")
        self._timeout = timeout_seconds
        self._progress = progress
        self.xclbin = None
        self.sim = None
        self._uuid = uuid("00000000-0000-0000-0000-000000000000")
        self._alloc = {}         # memory index -> next free byte
        self._busy = None        # the run in flight, if any
        self._oob = 0            # beats the kernel put outside the simulated memory so far

    def load_xclbin(self, xb) -> uuid:
        if not isinstance(xb, xclbin):
            xb = xclbin(str(xb))
        self.close()
        from llmfab.sim.rtl.harness import RtlAccelerator
        cfg = xb.config
        ports = cfg.hbm.ports
        self.sim = RtlAccelerator(cfg, None, memory_size=ports * xb.bank_bytes,
                                  timeout_seconds=self._timeout,
                                  progress=self._progress, build_dir=_BUILDS.get(cfg.config_hash()))
        self.sim.start()
        _BUILDS[cfg.config_hash()] = self.sim.build_dir
        # what XRT's driver does when it sets up an interrupt-capable ap_ctrl_hs CU
        from llmfab.hw.control import REG_GIE, REG_IER
        self.sim.write_reg(REG_GIE, 1)
        self.sim.write_reg(REG_IER, 1)
        self.xclbin = xb
        self._uuid = xb.get_uuid()
        self._alloc = {}
        self._oob = 0
        return self._uuid

    def register_xclbin(self, xb) -> uuid:
        return xb.get_uuid()

    def get_xclbin_uuid(self) -> uuid:
        return self._uuid

    def get_info(self, key) -> str:
        key = xrt_info_device(key)
        if key == xrt_info_device.name:
            return "llmfab simulated card"
        if key == xrt_info_device.bdf:
            return SIM_BDF
        if key == xrt_info_device.platform:
            return self.xclbin.get_xsa_name() if self.xclbin else "llmfab_sim"
        return "NA"

    def close(self) -> None:
        """Stop the simulation (not part of pyxrt: a real device closes when released)."""
        if self.sim is not None:
            self.sim.close()
            self.sim = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- the simulated memory
    def _port_of_group(self, group: int) -> int:
        tag = self.xclbin.get_mems()[group].get_tag()
        for (cu, port), t in self.xclbin.link["sp"].items():
            if t == tag:
                return int(re.fullmatch(r"m_axi_hbm(\d+)", port).group(1))
        raise RuntimeError(f"memory {tag} is not connected to the kernel: the simulated card "
                           f"models only the banks link.cfg connects")

    def _allocate(self, size: int, group: int) -> int:
        if self.xclbin is None:
            raise RuntimeError("no xclbin loaded")
        mems = self.xclbin.get_mems()
        if not 0 <= group < len(mems):
            raise RuntimeError(f"bad memory group {group}")
        at = self._alloc.get(group, 0)
        size4k = -(-int(size) // 4096) * 4096
        if at + size4k > self.xclbin.bank_bytes:
            raise RuntimeError(f"failed to allocate {size} bytes in {mems[group].get_tag()} "
                               f"({self.xclbin.bank_bytes - at} bytes left)")
        self._alloc[group] = at + size4k
        return at


class bo:
    """A buffer object: host copy (``write``/``read``/``map``) and device copy, moved by ``sync``."""

    class flags(IntEnum):
        normal = 0
        cacheable = 1
        device_only = 2
        host_only = 3
        p2p = 4
        svm = 5

    normal = flags.normal
    cacheable = flags.cacheable
    device_only = flags.device_only
    host_only = flags.host_only
    p2p = flags.p2p
    svm = flags.svm

    def __init__(self, dev: device, size: int, flags, group: int):
        if not isinstance(dev, device):
            raise TypeError("bo(device, size, flags, group): device must be a pyxrt.device")
        self._dev = dev
        self._size = int(size)
        self._group = int(group)
        self._port = dev._port_of_group(self._group)
        self._local = dev._allocate(self._size, self._group)
        self._host = np.zeros(self._size, np.uint8)

    def size(self) -> int:
        return self._size

    def address(self) -> int:
        """Device address: the byte of the bank (each simulated bank starts at 0)."""
        return self._local

    def write(self, data, seek) -> None:
        b = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        seek = int(seek)
        if seek < 0 or seek + b.size > self._size:
            raise RuntimeError(f"bo::write: [{seek}, +{b.size}) is outside the {self._size}-byte buffer")
        self._host[seek:seek + b.size] = b

    def read(self, size, skip) -> np.ndarray:
        size, skip = int(size), int(skip)
        if skip < 0 or size < 0 or skip + size > self._size:
            raise RuntimeError(f"bo::read: [{skip}, +{size}) is outside the {self._size}-byte buffer")
        return self._host[skip:skip + size].view(np.int8).copy()

    def map(self) -> memoryview:
        return memoryview(self._host)

    def sync(self, direction, size=None, offset=0) -> None:
        direction = xclBOSyncDirection(direction)
        size = self._size if size is None else int(size)
        offset = int(offset)
        if offset < 0 or size < 0 or offset + size > self._size:
            raise RuntimeError(f"bo::sync: [{offset}, +{size}) is outside the {self._size}-byte buffer")
        sim = self._dev.sim
        if sim is None:
            raise RuntimeError("bo::sync: the device has no xclbin loaded")
        if direction == xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE:
            sim.write_port(self._port, self._local + offset, self._host[offset:offset + size])
        elif direction == xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE:
            self._host[offset:offset + size] = sim.read_port(self._port, self._local + offset, size)
        else:
            raise RuntimeError(f"bo::sync: {direction.name} is for AIE buffers")


class kernel:
    """The compute unit of the loaded xclbin (one: ``nk=...:1``)."""

    class cu_access_mode(IntEnum):
        exclusive = 0
        shared = 1
        none = 2

    exclusive = cu_access_mode.exclusive
    shared = cu_access_mode.shared
    none = cu_access_mode.none

    def __init__(self, dev: device, xuuid: uuid, name: str, mode=None):
        if dev.xclbin is None or xuuid != dev.get_xclbin_uuid():
            raise RuntimeError(f"No xclbin with uuid {xuuid.to_string()} is loaded on the device")
        desc = dev.xclbin.kernel_desc
        if name != desc["name"]:
            raise RuntimeError(f"No kernel '{name}' in the xclbin (it has '{desc['name']}')")
        if desc["hw_control"] != "ap_ctrl_hs":
            raise RuntimeError(f"the simulated card drives ap_ctrl_hs kernels, not {desc['hw_control']}")
        self._dev = dev
        self._desc = desc
        self.args = desc["args"]

    def group_id(self, index: int) -> int:
        a = self.args[int(index)]
        if not a["address_qualifier"]:
            raise RuntimeError(f"argument {index} ({a['name']}) is a scalar: it has no memory group")
        nk = self._dev.xclbin.link["nk"]
        cu = nk[2][0] if nk and nk[2] else f"{self._desc['name']}_1"
        tag = self._dev.xclbin.link["sp"].get((cu, a["port"]))
        for m in self._dev.xclbin.get_mems():
            if m.get_tag() == tag:
                return m.get_index()
        raise RuntimeError(f"argument {a['name']} ({a['port']}) is connected to no memory in link.cfg")

    def __call__(self, *args) -> "run":
        r = run(self)
        for i, item in enumerate(args):
            if isinstance(item, bo):
                r.set_arg(i, item)
            elif isinstance(item, int) and _C_INT[0] <= item <= _C_INT[1]:
                r.set_arg(i, item)
            # anything else is silently skipped, as pyxrt does
        r.start()
        return r


class run:
    """One execution of the kernel."""

    def __init__(self, k: kernel):
        self._k = k
        self._values = [0] * len(k.args)
        self._state = ert_cmd_state.ERT_CMD_STATE_NEW
        self.cycles = 0

    def set_arg(self, index, value) -> None:
        index = int(index)
        if not 0 <= index < len(self._k.args):
            raise RuntimeError(f"set_arg: argument index {index} out of range")
        a = self._k.args[index]
        if isinstance(value, bo):
            if not a["address_qualifier"]:
                raise RuntimeError(f"set_arg: argument {a['name']} is a scalar, not a buffer")
            if value._group != self._k.group_id(index):
                raise RuntimeError(f"set_arg: the buffer is in memory group {value._group}, not "
                                   f"connected to argument {a['name']} (group {self._k.group_id(index)})")
            self._values[index] = value.address()
            return
        if not isinstance(value, int) or not _C_INT[0] <= value <= _C_INT[1]:
            raise TypeError("set_arg(): incompatible function arguments (a C int or a pyxrt.bo)")
        if a["address_qualifier"]:
            raise RuntimeError(f"set_arg: argument {a['name']} is a global buffer, not a scalar")
        self._values[index] = value & 0xFFFFFFFF

    def start(self) -> None:
        dev = self._k._dev
        if dev._busy is not None and dev._busy._state == ert_cmd_state.ERT_CMD_STATE_SUBMITTED:
            raise RuntimeError("the compute unit is busy with a run that was not waited for")
        sim = dev.sim
        for a, v in zip(self._k.args, self._values):
            sim.write_reg(a["offset"], v & 0xFFFFFFFF)
            for w in range(1, a["size"] // 4):
                sim.write_reg(a["offset"] + 4 * w, (v >> (32 * w)) & 0xFFFFFFFF)
        from llmfab.hw.control import REG_CTRL
        sim.write_reg(REG_CTRL, 1)
        self._state = ert_cmd_state.ERT_CMD_STATE_SUBMITTED
        dev._busy = self

    def wait(self, timeout_ms: int = 0) -> ert_cmd_state:
        """Until ap_done, or ``timeout_ms`` of simulated time at the kernel clock (0: no limit
        but the simulator's wall-clock bound)."""
        if self._state != ert_cmd_state.ERT_CMD_STATE_SUBMITTED:
            return self._state
        dev = self._k._dev
        cfg = dev.xclbin.config
        limit = int(timeout_ms) * int(round(cfg.clock_mhz * 1000)) if timeout_ms else 1 << 62
        r = dev.sim.wait_done(limit)
        self.cycles += int(r["cycles"])
        if not r["done"]:
            return ert_cmd_state.ERT_CMD_STATE_TIMEOUT
        dev._busy = None
        self._state = (ert_cmd_state.ERT_CMD_STATE_ERROR if r["oob"] > dev._oob
                       else ert_cmd_state.ERT_CMD_STATE_COMPLETED)
        dev._oob = r["oob"]
        return self._state

    def state(self) -> ert_cmd_state:
        return self._state
