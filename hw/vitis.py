# amaranth: UnusedElaboratable=no
"""The Vitis RTL-kernel project of a configuration: ``kernel.xml``, IP-packaging Tcl, link config.

Everything here derives from two descriptions, so nothing can drift:

* the control-register block of ``hw/control.py`` (:data:`~llmfab.hw.control.ARGS`,
  :data:`~llmfab.hw.control.PORT_BASE`, the ``ap_ctrl_hs`` block at 0x00-0x0C), which
  the RTL implements and :func:`kernel_args` turns into the kernel's arguments;
* the configuration (ports, data width, clock) and its board (platform, part, the main
  memory's kind and channels, SLRs), which give the ``m_axi`` ports and their
  ``sp=`` connections.

The kernel's arguments (``kernel.xml``, what XRT writes at ``ap_start``):

* every 32-bit register of ``ARGS`` is one ``uint`` scalar at its offset;
* every 64-bit register of ``ARGS`` is two ``uint`` scalars, ``<name>_lo`` at its offset
  and ``<name>_hi`` at offset + 4. pyxrt's ``kernel.__call__`` passes an integer only if
  it fits a C ``int`` and silently skips any other (XRT ``src/python/pybind11/src/pyxrt.cpp``),
  so a host never has to pass a 64-bit scalar; it passes each half as a C int
  (:func:`c_int`);
* every HBM port ``p`` is a global pointer ``hbm<p>`` (``addressQualifier="1"``, 8 bytes at
  ``PORT_BASE + 8 p``) on ``m_axi_hbm<p>``: XRT writes the buffer object's device address
  there and the accelerator adds it to every address it puts on that port.

The kernel's top module is the thin wrapper :func:`kernel_wrapper_verilog` writes
(``llmfab``): Vitis port names (``ap_clk``, ``ap_rst_n``, ``s_axi_control_*``,
``m_axi_hbm<p>_*``, ``interrupt``) around the accelerator top ``llmfab_accel``
(Amaranth's ``clk``/``rst`` and ``__`` names).

``write_project(config, out)`` writes the whole directory (``llmfab build``); see
docs/deploy.md for the flow and for what was verified without Vivado.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from llmfab.core.errors import ConfigError, LlmfabError
from llmfab.hw.control import (ADDR_WIDTH, ARGS, PORT_BASE, REG_CTRL, REG_CYCLES, REG_GIE, REG_IER,
                               REG_ISR, REG_PC, REG_STATUS)

__all__ = ["KERNEL_NAME", "VENDOR", "LIBRARY", "KernelArg", "kernel_args", "c_int", "port_names",
           "memory_connections", "kernel_xml", "link_config", "package_kernel_tcl", "gen_xo_tcl",
           "makefile", "readme", "kernel_wrapper_verilog", "write_project", "PROJECT_FILES",
           "project_info", "verilog_blocker", "split_args", "MAX_LINE_BYTES"]

#: Kernel name = top module of the packaged IP = ``package_xo -kernel_name``.
KERNEL_NAME = "llmfab"
#: The compute-unit instance name in the link configuration (``nk=llmfab:1:llmfab_1``).
CU_NAME = f"{KERNEL_NAME}_1"
VENDOR = "llmfab"
LIBRARY = "RTLKernel"
VERSION = "1.0"
VLNV = f"{VENDOR}:{LIBRARY}:{KERNEL_NAME}:{VERSION}"
#: Accelerator top (``llmfab hw verilog``'s file, hw/cli.py's TOP_MODULE).
ACCEL_TOP = "llmfab_accel"
CONTROL_PORT = "s_axi_control"
#: Bytes of the control port's address space (``ADDR_WIDTH`` bits).
CONTROL_RANGE = 1 << ADDR_WIDTH
#: Files ``write_project`` writes besides the accelerator's Verilog, relative to the project.
PROJECT_FILES = ("kernel.xml", "package_kernel.tcl", "gen_xo.tcl", "link.cfg", "Makefile",
                 "README.md", "project.json", f"src/{KERNEL_NAME}.v")


@dataclass(frozen=True)
class KernelArg:
    """One kernel argument as ``kernel.xml`` declares it.

    Attributes
    ----------
    name : str
        ``pos``, ``program_lo``, ``hbm0`` ...
    id : int
        Argument index (``kernel(*args)`` order, ``kernel.group_id(id)``).
    offset : int
        Byte offset in the control registers.
    size : int
        Bytes: 4 for scalars, 8 for pointers.
    address_qualifier : int
        0 scalar (on ``s_axi_control``), 1 global pointer.
    port : str
        ``s_axi_control`` or the pointer's ``m_axi_hbm<p>``.
    register : str
        The ``ARGS`` name the argument writes (``program`` for ``program_lo``), or
        ``port_base`` for pointers.
    half : int
        Which 32-bit half of a 64-bit register a scalar is (0 lo, 1 hi); 0 otherwise.
    bank : int or None
        The HBM port of a pointer.
    """

    name: str
    id: int
    offset: int
    size: int
    address_qualifier: int
    port: str
    register: str
    half: int = 0
    bank: int | None = None

    @property
    def type(self) -> str:
        return "int*" if self.address_qualifier else "uint"


def port_names(ports: int) -> list:
    """The ``m_axi`` port names, port 0 first."""
    return [f"m_axi_hbm{p}" for p in range(ports)]


def kernel_args(ports: int) -> list:
    """The kernel's arguments, in id order: the scalars of ``ARGS`` by offset, then the pointers."""
    out = []
    for name, (off, bits) in sorted(ARGS.items(), key=lambda kv: kv[1][0]):
        if bits == 64:
            out += [(f"{name}_lo", off, 4, 0, CONTROL_PORT, name, 0, None),
                    (f"{name}_hi", off + 4, 4, 0, CONTROL_PORT, name, 1, None)]
        elif bits <= 32:
            out.append((name, off, 4, 0, CONTROL_PORT, name, 0, None))
        else:   # the register block only has 32- and 64-bit arguments
            raise ValueError(f"argument {name} of {bits} bits: only 32 and 64 bits are described")
    for p, port in enumerate(port_names(ports)):
        out.append((f"hbm{p}", PORT_BASE + 8 * p, 8, 1, port, "port_base", 0, p))
    return [KernelArg(n, i, o, s, q, port, reg, half, bank)
            for i, (n, o, s, q, port, reg, half, bank) in enumerate(out)]


def c_int(value: int) -> int:
    """``value`` (0 <= value < 2**32) as the C ``int`` with the same 32 bits, the only
    integers pyxrt's ``kernel.__call__`` passes (others are silently skipped)."""
    value = int(value)
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{value} does not fit a 32-bit register")
    return value - (1 << 32) if value >= 1 << 31 else value


def split_args(values: dict, ports: int) -> dict:
    """Register values (``ARGS`` names, 64-bit ones whole) -> argument name -> 32-bit value."""
    out = {}
    for a in kernel_args(ports):
        if a.address_qualifier:
            continue
        v = int(values.get(a.register, 0))
        bits = ARGS[a.register][1]
        if not 0 <= v < 1 << bits:
            raise ValueError(f"register {a.register} = {v} does not fit in {bits} bits")
        out[a.name] = (v >> (32 * a.half)) & 0xFFFFFFFF
    return out


# ---------------------------------------------------------------------------------------
# memory: which bank each port reaches
# ---------------------------------------------------------------------------------------

def memory_connections(config) -> list:
    """``[(m_axi port, memory tag)]``: port p to channel p of the board's main memory
    (``HBM[p]`` or ``DDR[p]``), the binding the accelerator's striped layout and the
    memory timing model assume (boards/memory_timing.py)."""
    mem = config.board_spec.main_memory
    ports = config.hbm.ports
    if ports > mem.channels:
        raise ConfigError(f"config '{config.name}' has {ports} memory ports but board "
                          f"'{config.board}' has {mem.channels} {mem.kind.upper()} channels: "
                          f"give hbm.ports <= {mem.channels}")
    kind = {"hbm": "HBM", "ddr": "DDR"}.get(mem.kind, mem.kind.upper())
    return [(port, f"{kind}[{p}]") for p, port in enumerate(port_names(ports))]


def _slr(config):
    """The SLR the kernel goes in: the one the HBM attaches to (SLR0 on UltraScale+ HBM
    cards, UG1120/UG1314), or None where the kernel's placement is left to the linker."""
    if config.board_spec.main_memory.kind == "hbm" and config.board_spec.slrs > 1:
        return "SLR0"
    return None


# ---------------------------------------------------------------------------------------
# the files
# ---------------------------------------------------------------------------------------

def _hex(v: int, digits: int = 0) -> str:
    return f"0x{v:0{digits}X}" if digits else f"0x{v:X}"


def kernel_xml(config) -> str:
    """``kernel.xml`` (Vitis RTL kernel metadata, format 1.6) of ``config``'s accelerator."""
    ports = config.hbm.ports
    width = config.hbm.data_width
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f"<!-- generated by llmfab build for config '{config.name}' (hash {config.config_hash()}) "
             f"from hw/control.py's register map: do not edit -->",
             '<root versionMajor="1" versionMinor="6">',
             f'  <kernel name="{KERNEL_NAME}" language="ip" vlnv="{VLNV}" attributes="" '
             f'preferredWorkGroupSizeMultiple="0" workGroupSize="1" interrupt="true" '
             f'hwControlProtocol="ap_ctrl_hs">',
             "    <ports>",
             f'      <port name="{CONTROL_PORT}" mode="slave" range="{_hex(CONTROL_RANGE)}" '
             f'dataWidth="32" portType="addressable" base="0x0"/>']
    for port in port_names(ports):
        lines.append(f'      <port name="{port}" mode="master" range="0xFFFFFFFFFFFFFFFF" '
                     f'dataWidth="{width}" portType="addressable" base="0x0"/>')
    lines += ["    </ports>", "    <args>"]
    for a in kernel_args(ports):
        lines.append(f'      <arg name="{a.name}" addressQualifier="{a.address_qualifier}" id="{a.id}" '
                     f'port="{a.port}" size="{_hex(a.size)}" offset="{_hex(a.offset, 3)}" '
                     f'type={quoteattr(a.type)} hostOffset="0x0" hostSize="{_hex(a.size)}"/>')
    lines += ["    </args>", "  </kernel>", "</root>"]
    return "\n".join(lines) + "\n"


def link_config(config) -> str:
    """The ``v++ --link --config`` file: one CU, one ``sp=`` per ``m_axi`` port, SLR, clock."""
    hz = int(round(config.clock_mhz * 1e6))
    lines = [f"# v++ --link configuration of llmfab for config '{config.name}' on board "
             f"'{config.board}' (generated by llmfab build; do not edit)",
             "[connectivity]", f"nk={KERNEL_NAME}:1:{CU_NAME}"]
    for port, tag in memory_connections(config):
        lines.append(f"sp={CU_NAME}.{port}:{tag}")
    slr = _slr(config)
    if slr:
        lines.append(f"slr={CU_NAME}:{slr}")
    lines += ["", "[clock]", f"freqHz={hz}:{CU_NAME}"]
    return "\n".join(lines) + "\n"


def _registers_tcl(ports: int) -> list:
    """``ipx::add_register`` lines of the control block and every argument."""
    regs = [("CTRL", REG_CTRL, 32, "ap_start, ap_done, ap_idle, ap_ready (ap_ctrl_hs)", None),
            ("GIER", REG_GIE, 32, "global interrupt enable", None),
            ("IP_IER", REG_IER, 32, "interrupt enable: done, ready", None),
            ("IP_ISR", REG_ISR, 32, "interrupt status: done, ready (toggle on write)", None)]
    for a in kernel_args(ports):
        if a.address_qualifier:
            regs.append((a.name, a.offset, 64, f"device address of the buffer on {a.port}", a.port))
        else:
            regs.append((a.name, a.offset, 32, f"argument {a.register}"
                         + (f" bits {32 * a.half}..{32 * a.half + 31}" if ARGS[a.register][1] == 64 else ""),
                         None))
    regs += [("status", REG_STATUS, 32, "status of the last run (read only)", None),
             ("pc", REG_PC, 32, "pc of the last run's END or fault (read only)", None),
             ("cycles", REG_CYCLES, 64, "cycles of the last run (read only)", None)]
    out = []
    for name, off, size, desc, busif in regs:
        out += [f"set reg [ipx::add_register {name} $addr_block]",
                f"set_property description {{{desc}}} $reg",
                f"set_property address_offset {_hex(off, 3)} $reg",
                f"set_property size {size} $reg"]
        if busif:
            out += ["set regparam [ipx::add_register_parameter ASSOCIATED_BUSIF $reg]",
                    f"set_property value {busif} $regparam"]
    return out


def package_kernel_tcl(config) -> str:
    """The Vivado IP-packaging script (run by gen_xo.tcl): the RTL as an ``sdx_kernel`` of type rtl."""
    ports = port_names(config.hbm.ports)
    hz = int(round(config.clock_mhz * 1e6))
    part = config.board_spec.part
    lines = [f"# Package the llmfab accelerator (config '{config.name}') as a Vitis RTL kernel IP.",
             "# Generated by llmfab build from hw/control.py's register map; do not edit.",
             "# Sourced by gen_xo.tcl inside Vivado (vivado -mode batch -source gen_xo.tcl); the steps",
             "# follow Xilinx/Vitis_Accel_Examples rtl_kernels/rtl_vadd/scripts/package_kernel.tcl.",
             "set root [file dirname [file normalize [info script]]]",
             "set src_dir [file join $root src]",
             "set ip_dir [file join $root packaged_kernel]",
             "set tmp_dir [file join $root tmp_kernel_pack]",
             "",
             # a simulation board has no real part: Vivado's default part then (v++ retargets)
             "create_project -force kernel_pack $tmp_dir" + (f" -part {part}" if config.board_spec.platform
                                                             else ""),
             f"add_files -norecurse [list [file join $src_dir {ACCEL_TOP}.v] [file join $src_dir {KERNEL_NAME}.v]]",
             f"set_property top {KERNEL_NAME} [current_fileset]",
             "update_compile_order -fileset sources_1",
             f"ipx::package_project -root_dir $ip_dir -vendor {VENDOR} -library {LIBRARY} "
             "-taxonomy /KernelIP -import_files -set_current false",
             "ipx::unload_core [file join $ip_dir component.xml]",
             "ipx::edit_ip_in_project -upgrade true -name tmp_edit_project -directory $ip_dir "
             "[file join $ip_dir component.xml]",
             "set core [ipx::current_core]",
             f"set_property version {VERSION} $core",
             "set_property core_revision 1 $core",
             "",
             "# every AXI interface runs on ap_clk",
             f"ipx::associate_bus_interfaces -busif {CONTROL_PORT} -clock ap_clk $core"]
    for port in ports:
        lines.append(f"ipx::associate_bus_interfaces -busif {port} -clock ap_clk $core")
    lines += ["",
              f"# the kernel clock ({config.clock_mhz:g} MHz, config '{config.name}')",
              "set clkif [ipx::get_bus_interfaces -of_objects $core ap_clk]",
              "set freq [ipx::add_bus_parameter -quiet FREQ_HZ $clkif]",
              f"set_property value {hz} $freq",
              "# user: v++ may link the kernel at another clock (link.cfg [clock])",
              "set_property value_resolve_type user $freq",
              "",
              "# the register map (hw/control.py): control block, arguments, read-only status",
              f"set mem_map [ipx::add_memory_map {CONTROL_PORT} $core]",
              "set addr_block [ipx::add_address_block reg0 $mem_map]",
              f"set_property range {CONTROL_RANGE} $addr_block",
              *_registers_tcl(config.hbm.ports),
              f"set_property slave_memory_map_ref {CONTROL_PORT} "
              f"[ipx::get_bus_interfaces -of_objects $core {CONTROL_PORT}]",
              "",
              "set_property sdx_kernel true $core",
              "set_property sdx_kernel_type rtl $core",
              "set_property supported_families { } $core",
              "set_property auto_family_support_level level_2 $core",
              "ipx::create_xgui_files $core",
              "ipx::update_checksums $core",
              "ipx::check_integrity -kernel $core",
              "ipx::save_core $core",
              "close_project -delete"]
    return "\n".join(lines) + "\n"


def gen_xo_tcl(config) -> str:
    """``vivado -mode batch -source gen_xo.tcl -tclargs XO``: package the IP, then ``package_xo``."""
    return "\n".join([
        f"# Make the Vitis kernel object (.xo) of llmfab (config '{config.name}'); generated by llmfab build.",
        "#   vivado -mode batch -source gen_xo.tcl -tclargs llmfab.xo",
        "if {$argc < 1} { error \"usage: vivado -mode batch -source gen_xo.tcl -tclargs XO_PATH\" }",
        "set xo_path [file normalize [lindex $argv 0]]",
        "set root [file dirname [file normalize [info script]]]",
        "source [file join $root package_kernel.tcl]",
        "if {[file exists $xo_path]} { file delete -force $xo_path }",
        f"package_xo -xo_path $xo_path -kernel_name {KERNEL_NAME} "
        "-ip_directory [file join $root packaged_kernel] -kernel_xml [file join $root kernel.xml]",
    ]) + "\n"


def makefile(config) -> str:
    platform = config.board_spec.platform or ""
    return "\n".join([
        f"# llmfab RTL kernel for config '{config.name}' on board '{config.board}' (generated by llmfab build)",
        "#   make            -> llmfab.xo (Vivado), then llmfab.$(TARGET).xclbin (v++ --link)",
        "#   make xo         -> only the kernel object",
        "# Needs Vivado and Vitis on PATH (source <Vitis>/settings64.sh) and the platform installed.",
        f"PLATFORM ?= {platform}",
        "TARGET ?= hw",
        "VIVADO ?= vivado",
        "VPP ?= v++",
        f"XO := {KERNEL_NAME}.xo",
        f"XCLBIN := {KERNEL_NAME}.$(TARGET).xclbin",
        f"SRC := src/{ACCEL_TOP}.v src/{KERNEL_NAME}.v",
        "",
        ".PHONY: all xo check clean",
        "all: $(XCLBIN)",
        "xo: $(XO)",
        "",
        "check:",
        f"\t@test -f src/{ACCEL_TOP}.v || {{ echo 'src/{ACCEL_TOP}.v is missing: "
        f"llmfab build could not generate it (see README.md)'; exit 1; }}",
        "\t@test -n \"$(PLATFORM)\" || { echo 'no platform: board "
        f"{config.board} has none; give PLATFORM=<name>'; exit 1; }}",
        "",
        "$(XO): check kernel.xml package_kernel.tcl gen_xo.tcl $(SRC)",
        "\t$(VIVADO) -mode batch -source gen_xo.tcl -tclargs $(XO)",
        "",
        "$(XCLBIN): $(XO) link.cfg",
        "\t$(VPP) --link -t $(TARGET) --platform $(PLATFORM) --config link.cfg -o $@ $(XO)",
        "",
        "clean:",
        "\trm -rf $(XO) *.xclbin packaged_kernel tmp_kernel_pack _x .Xil *.log *.jou *.ltx",
    ]) + "\n"


def readme(config, *, verilog_note: str | None = None) -> str:
    args = kernel_args(config.hbm.ports)
    rows = "\n".join(f"| {a.id} | `{a.name}` | {_hex(a.offset, 3)} | {a.size} | {a.port} |" for a in args)
    conns = "\n".join(f"- `{port}` -> `{tag}`" for port, tag in memory_connections(config))
    platform = config.board_spec.platform
    note = f"\n**Verilog:** {verilog_note}\n" if verilog_note else ""
    return f"""# llmfab RTL kernel: config `{config.name}` on `{config.board}`

Generated by `llmfab build --config {config.name}`; regenerate rather than edit.
{note}
| file | what |
|---|---|
| `src/{ACCEL_TOP}.v` | the accelerator (`llmfab hw verilog`) |
| `src/{KERNEL_NAME}.v` | the kernel top: Vitis port names around `{ACCEL_TOP}` |
| `kernel.xml` | kernel metadata for `package_xo` (from hw/control.py's register map) |
| `package_kernel.tcl`, `gen_xo.tcl` | Vivado IP packaging and `package_xo` |
| `link.cfg` | `v++ --link` connectivity (`sp=`, `slr=`) and kernel clock |
| `project.json` | the same facts for programs (config hash, arguments, connections) |

Build (Vivado/Vitis {'2022.2' if platform else '...'} and the platform installed):

    source /tools/Xilinx/Vitis/2022.2/settings64.sh
    make PLATFORM={platform or '<platform>'}      # -> {KERNEL_NAME}.hw.xclbin

Run: `llmfab generate --backend xrt --xclbin {KERNEL_NAME}.hw.xclbin --config {config.name} --prompt ...`
(see docs/deploy.md in llmfab).

Kernel `{KERNEL_NAME}`, `ap_ctrl_hs`, kernel clock {config.clock_mhz:g} MHz. Arguments (64-bit
registers are two 32-bit halves, since pyxrt passes only C ints):

| id | name | offset | bytes | port |
|---|---|---|---|---|
{rows}

Memory connections:
{conns}
"""


def kernel_wrapper_verilog(config) -> str:
    """The kernel top ``llmfab``: Vitis names around ``llmfab_accel`` (active-low registered reset)."""
    from amaranth.hdl import Shape
    from amaranth.lib.wiring import Flow
    from llmfab.hw.top import Accelerator
    accel = Accelerator(config)
    ports = []
    for path, member in accel.signature.members.flatten():
        if not member.is_port:
            continue
        inner = "__".join(str(p) for p in path)
        outer = "_".join(str(p) for p in path)
        ports.append((outer, inner, Shape.cast(member.shape).width,
                      "output" if member.flow == Flow.Out else "input"))
    decl = ["    input  wire ap_clk", "    input  wire ap_rst_n"]
    decl += [f"    {d:6s} wire {f'[{w - 1}:0] ' if w > 1 else ''}{o}" for o, _, w, d in ports]
    conns = ["        .clk(ap_clk)", "        .rst(rst)"]
    conns += [f"        .{i}({o})" for o, i, _, _ in ports]
    return "\n".join([
        f"// Vitis RTL kernel top of llmfab (config '{config.name}'), generated by llmfab build.",
        f"// Port names follow the Vitis conventions; the accelerator is {ACCEL_TOP} (llmfab hw verilog).",
        "`default_nettype none",
        f"module {KERNEL_NAME} (",
        ",\n".join(decl),
        ");",
        "    // ap_rst_n is active low and synchronous; the accelerator's reset is active high",
        "    reg rst = 1'b1;",
        "    always @(posedge ap_clk) rst <= ~ap_rst_n;",
        f"    {ACCEL_TOP} u_accel (",
        ",\n".join(conns),
        "    );",
        "endmodule",
        "`default_nettype wire",
    ]) + "\n"


#: Widest datapath line (ports x data_width / 8 bytes) whose Verilog generates in bounded time:
#: elaborating one full-line realigner measured 2.5 s at 256 B and 45 s at 1024 B (roughly
#: quadratic, issue 10), and the accelerator has about 39 of them.
MAX_LINE_BYTES = 256


def verilog_blocker(config) -> str | None:
    """Why the accelerator's Verilog cannot be generated for ``config`` yet, or None.

    Cheap (constructors only, no elaboration): the units refuse parameters they do not
    implement, and an on-chip line wider than :data:`MAX_LINE_BYTES` does not finish
    generating (the on-chip line is at most ``boards/config.py``'s ``SHARED_LINE_BYTES`` unless a
    configuration's ``hbm.line_bytes`` asks for more; the weights go through per-port slices).
    """
    from llmfab.hw.exec_unit import default_units
    from llmfab.hw.top import geometry
    try:
        g = geometry(config)
        for make in default_units(config).values():
            make(addr_bits=32, line_bytes=g["line_bytes"])
    except ValueError as e:
        return str(e)
    if g["line_bytes"] > MAX_LINE_BYTES:
        return (f"its on-chip line is {g['line_bytes']} bytes, and generation does not finish "
                f"in bounded time above {MAX_LINE_BYTES} bytes")
    return None


def project_info(config) -> dict:
    """What ``project.json`` holds: the facts a host (or the simulated card) needs."""
    return {"format": "llmfab-rtl-kernel-1", "kernel": KERNEL_NAME, "cu": CU_NAME,
            "config": config.name, "config_hash": config.config_hash(), "board": config.board,
            "platform": config.board_spec.platform, "clock_mhz": config.clock_mhz,
            "ports": config.hbm.ports, "data_width": config.hbm.data_width,
            "connections": dict(memory_connections(config)),
            "args": [{"name": a.name, "id": a.id, "offset": a.offset, "size": a.size,
                      "address_qualifier": a.address_qualifier, "port": a.port} for a in
                     kernel_args(config.hbm.ports)]}


def write_project(config, out, *, verilog: bool = True, verilog_note: str | None = None,
                  progress=None) -> list:
    """Write the RTL-kernel project of ``config`` into ``out``; returns the paths written.

    ``verilog=False`` writes everything but ``src/llmfab_accel.v`` (``verilog_note``
    then says why, in README.md). The accelerator's Verilog is written last, so a
    failure there leaves the rest of the project in place.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LlmfabError(f"cannot write the project to {out}: it is a file; give a directory")
    memory_connections(config)          # refuse an unconnectable configuration before writing
    files = {"kernel.xml": kernel_xml(config), "package_kernel.tcl": package_kernel_tcl(config),
             "gen_xo.tcl": gen_xo_tcl(config), "link.cfg": link_config(config),
             "Makefile": makefile(config), "README.md": readme(config, verilog_note=verilog_note),
             "project.json": json.dumps(project_info(config), indent=1) + "\n",
             f"src/{KERNEL_NAME}.v": kernel_wrapper_verilog(config)}
    written = []
    try:
        (out / "src").mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = out / name
            path.write_text(text)
            written.append(path)
        if verilog:
            from llmfab.hw.cli import generate_verilog
            written += generate_verilog(config, out / "src", progress=progress)
    except OSError as e:
        raise LlmfabError(f"cannot write the project to {out}: {e.strerror}") from None
    return written
