"""The simulated card (sim/rtl/xrt_card.py) has pyxrt's names and traps; the xrt backend uses
nothing else. No simulation here: the card's simulator is replaced by a recorder
(tests/rtl/test_xrt_backend.py runs the real one)."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.hw import vitis
from llmfab.sim.rtl import xrt_card
from llmfab.sim.rtl.xrt_card import PYXRT_NAMES

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {line.strip() for line in (ROOT / "tests" / "data" / "pyxrt_pyi_names.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}


def _resolve(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_our_names_are_in_pyxrts_published_interface():
    missing = [n for n in PYXRT_NAMES if n not in PUBLISHED]
    assert not missing, f"not in pyxrt.pyi: {missing}"


def test_the_simulated_card_has_every_name():
    for n in PYXRT_NAMES:
        _resolve(xrt_card, n)


def test_the_backend_uses_only_listed_names():
    """Every attribute the xrt backend takes from pyxrt objects is one of PYXRT_NAMES."""
    members = {n.split(".")[-1] for n in PYXRT_NAMES}
    tree = ast.parse((ROOT / "host" / "xrt_backend.py").read_text())
    receivers = {"px", "pyxrt", "b", "run", "xb", "k", "d"}
    self_receivers = {"pyxrt", "kernel", "_dev"}
    used = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        v = node.value
        if isinstance(v, ast.Name) and v.id in receivers:
            used.add(node.attr)
        elif isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and v.value.id == "self" \
                and v.attr in self_receivers:
            used.add(node.attr)
        elif isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and v.value.id in ("px", "pyxrt"):
            used.add(node.attr)       # px.bo.normal, px.ert_cmd_state.X
    # what the backend does with its own objects, not pyxrt's
    used -= {"append", "sim", "close", "build_dir", "name", "get"}
    assert used and used <= members, sorted(used - members)


# ---------------------------------------------------------------------------------------
# the card with a recorder in place of the simulator
# ---------------------------------------------------------------------------------------

class _Recorder:
    """Stands for RtlAccelerator: register writes recorded, port memories as arrays."""

    def __init__(self, ports, bank):
        self.writes = []
        self.mem = [np.zeros(bank, np.uint8) for _ in range(ports)]

    def write_reg(self, off, value):
        self.writes.append((off, value))

    def write_port(self, port, local, data):
        d = np.asarray(data, np.uint8)
        self.mem[port][local:local + d.size] = d

    def read_port(self, port, local, n):
        return self.mem[port][local:local + n].copy()

    def wait_done(self, timeout_cycles):
        return {"done": True, "ctrl": 0xE, "cycles": 10, "oob": 0}


@pytest.fixture()
def card(tmp_path):
    cfg = load_config("ci")
    vitis.write_project(cfg, tmp_path / "p", verilog=False)
    standin = xrt_card.write_standin(tmp_path / "x.json", tmp_path / "p", cfg, bank_bytes=1 << 20)
    dev = xrt_card.device(0)
    xb = xrt_card.xclbin(str(standin))
    dev.xclbin, dev._uuid = xb, xb.get_uuid()      # what load_xclbin does, without the simulator
    dev.sim = _Recorder(cfg.hbm.ports, 1 << 20)
    k = xrt_card.kernel(dev, dev.get_xclbin_uuid(), vitis.KERNEL_NAME)
    return cfg, dev, xb, k


def test_standin_describes_the_project(card):
    cfg, dev, xb, k = card
    assert [x.get_name() for x in xb.get_kernels()] == ["llmfab"]
    assert xb.get_kernels()[0].get_num_args() == len(vitis.kernel_args(cfg.hbm.ports))
    mems = xb.get_mems()
    assert [m.get_tag() for m in mems] == ["HBM[0]", "HBM[1]", "HBM[2]", "HBM[3]"]   # sim-small: 4 channels
    assert [m.get_used() for m in mems] == [True, True, False, False]
    ptr = [a for a in vitis.kernel_args(cfg.hbm.ports) if a.address_qualifier]
    assert [k.group_id(a.id) for a in ptr] == [0, 1]
    with pytest.raises(RuntimeError, match="is a scalar"):
        k.group_id(0)
    with pytest.raises(RuntimeError, match="not a simulated-card xclbin stand-in"):
        xrt_card.xclbin(str(Path(xb.doc["kernel_xml"])))


def test_call_skips_what_pyxrt_skips_and_writes_every_argument(card):
    """pyxrt's kernel.__call__ passes an int only if it is a C int: 2**31 is dropped (written as
    0), -1 is 0xFFFFFFFF; every argument is written at kernel.xml's offset, then ap_start."""
    cfg, dev, xb, k = card
    args = vitis.kernel_args(cfg.hbm.ports)
    b0 = xrt_card.bo(dev, 4096, xrt_card.bo.normal, k.group_id(args[-2].id))
    b1 = xrt_card.bo(dev, 8192, xrt_card.bo.normal, k.group_id(args[-1].id))
    b1b = xrt_card.bo(dev, 4096, xrt_card.bo.normal, k.group_id(args[-1].id))
    assert (b0.address(), b1.address(), b1b.address()) == (0, 0, 8192)
    vals = [2**31, -1, 2**31 - 1, "7"] + list(range(4, len(args) - 2))
    r = k(*vals, b0, b1b)
    w = dev.sim.writes
    assert w[-1] == (0x00, 1)                           # ap_start last
    got = dict(w[:-1])
    scal = [a for a in args if not a.address_qualifier]
    assert got[scal[0].offset] == 0                      # 2**31: skipped, as pyxrt does
    assert got[scal[1].offset] == 0xFFFFFFFF
    assert got[scal[2].offset] == 2**31 - 1
    assert got[scal[3].offset] == 0                      # not an int: skipped
    assert got[vitis.PORT_BASE + 8] == 8192 and got[vitis.PORT_BASE + 12] == 0
    assert r.wait(100) == xrt_card.ert_cmd_state.ERT_CMD_STATE_COMPLETED
    r2 = xrt_card.run(k)
    with pytest.raises(TypeError):
        r2.set_arg(0, 2**32)                              # pybind11 refuses what is not a C int
    with pytest.raises(RuntimeError, match="not connected to argument hbm0"):
        r2.set_arg(args[-2].id, b1)                       # a bank the port is not linked to
    with pytest.raises(RuntimeError, match="is a global buffer"):
        r2.set_arg(args[-2].id, 5)


def test_a_missing_sync_moves_nothing(card):
    """Host and device copies meet only on sync, as on a card."""
    cfg, dev, xb, k = card
    b = xrt_card.bo(dev, 4096, xrt_card.bo.normal, 0)
    TO, FROM = (xrt_card.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE,
                xrt_card.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE)
    b.write(np.arange(16, dtype=np.uint8), 32)
    assert not dev.sim.mem[0][32:48].any()               # written, not synced: not on the device
    b.sync(TO, 16, 32)
    assert list(dev.sim.mem[0][32:48]) == list(range(16))
    dev.sim.mem[0][100] = 77                             # the kernel writes
    assert b.read(1, 100)[0] == 0                        # not synced back: the stale host copy
    b.sync(FROM)
    r = b.read(4, 99)
    assert r.dtype == np.int8 and list(r.view(np.uint8)) == [0, 77, 0, 0]
    with pytest.raises(RuntimeError, match="outside the 4096-byte buffer"):
        b.write(b"\0" * 8, 4092)
    with pytest.raises(TypeError):
        b.read(4)                                         # the offset is not optional


def test_link_config_parse_round_trip():
    cfg = load_config("u280")
    link = xrt_card.parse_link_config(vitis.link_config(cfg))
    assert link["nk"] == ("llmfab", 1, ["llmfab_1"])
    assert link["sp"][("llmfab_1", "m_axi_hbm31")] == "HBM[31]" and len(link["sp"]) == 32
    assert link["freq_hz"] == {"llmfab_1": 225_000_000}
    kx = xrt_card.parse_kernel_xml(vitis.kernel_xml(cfg))
    assert [a["name"] for a in kx["args"]] == [a.name for a in vitis.kernel_args(32)]
    assert json.loads(json.dumps(vitis.project_info(cfg)))["connections"]["m_axi_hbm0"] == "HBM[0]"


def test_devices_without_xrt(capsys):
    from llmfab.host.cli import main
    assert main(["devices"]) == 0
    assert capsys.readouterr().out == (
        "no XRT: no XRT Python binding (pyxrt) on this machine: source /opt/xilinx/xrt/setup.sh so "
        "that PYTHONPATH has /opt/xilinx/xrt/python; --backend xrt runs on the simulated card\n")
    assert main(["devices", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["xrt"] is False and r["devices"] == []


def test_devices_and_open_with_a_pyxrt(monkeypatch, capsys, tmp_path):
    """With a pyxrt module importable (here the simulated card's, under that name) `llmfab
    devices` lists its cards; a pyxrt that is installed but broken is reported, not replaced."""
    import sys
    from llmfab.host.cli import main
    monkeypatch.setitem(sys.modules, "pyxrt", xrt_card)
    assert main(["devices"]) == 0
    assert capsys.readouterr().out == f"card 0: llmfab simulated card ({xrt_card.SIM_BDF})\n"
    monkeypatch.delitem(sys.modules, "pyxrt")
    (tmp_path / "pyxrt.py").write_text(
        "raise ImportError('libxrt_coreutil.so.2: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["devices"]) == 1
    assert capsys.readouterr().err == ("llmfab: error: pyxrt is installed but fails to import: "
                                       "libxrt_coreutil.so.2: cannot open shared object file\n")
