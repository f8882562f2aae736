"""The accelerator RTL under Verilator, driven like a card: ``RtlAccelerator(config, bundle).run(pos, token)``.

One simulator process per :class:`RtlAccelerator`: the generated Verilog of
``hw/top.py``'s :class:`~llmfab.hw.top.Accelerator`, one
``sim/rtl/hbm_model.v`` AXI4 slave per HBM port with the memory in C++
(``sim/rtl/hbm_model.cpp``, DPI-C), and a small top ``sim_top`` tying them
together. The build is cached by the hash of everything that goes into it.

cocotb runs inside the simulator (``sim/rtl/harness_server.py``) and only
does control and checking: it writes the argument registers over AXI4-Lite
(cocotbext-axi), sets ``ap_start``, waits for the interrupt (or the watchdog)
and reads the counter block; the HBM image is loaded by a file read in C++
and read back through ctypes. This process talks to it over a local socket, so
a run is a plain blocking call, and many runs (other positions, other
programs) share one simulation.

Example::

    with RtlAccelerator(load_config("ci"), bundle) as acc:
        r = acc.run(pos=0, token=1)
        logits = acc.logits()
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmfab.boards.memory_timing import IDEAL_READ_LATENCY, IDEAL_WRITE_LATENCY, MODELS, timing_params
from llmfab.core.errors import LlmfabError, SimError

HERE = Path(__file__).parent
HBM_MODEL_V = HERE / "hbm_model.v"
HBM_MODEL_CPP = HERE / "hbm_model.cpp"
TOPLEVEL = "sim_top"
ACCEL_MODULE = "llmfab_accel"
SERVER_MODULE = "llmfab.sim.rtl.harness_server"
#: Read latency of the ideal HBM model (cycles from AR to the first beat) and write-response
#: latency (boards/memory_timing.py; the card-like model takes its own from the board).
READ_LATENCY = IDEAL_READ_LATENCY
WRITE_LATENCY = IDEAL_WRITE_LATENCY
#: Clock period the simulation uses (ns); only cycle counts are reported.
CLOCK_NS = 10
_ALIGN = 4096

__all__ = ["RtlAccelerator", "RtlRun", "build", "sim_top_verilog", "TOPLEVEL"]


@dataclass
class RtlRun:
    """The result of one run.

    Attributes
    ----------
    status : int or None
        The accelerator's status (0 ok, 1..5 as in docs/isa.md); None if the
        watchdog fired.
    pc : int
        Faulting pc (validation faults, deadlock), the END's pc for status 0.
    counters : dict
        The counter block the accelerator wrote (``hw/control.py``'s ``COUNTERS``).
    port_bytes : list of dict
        What the HBM model saw per port during the run: ``rd_bytes``,
        ``wr_bytes`` (strobed bytes written), ``rd_beats``, ``wr_beats``.
    sim_cycles : int
        Clock cycles simulated for the run (control register accesses included).
    wall_seconds : float
    timed_out : bool
    samples : list of dict
        With ``run(..., sample_every=N)``: the live counters (``hw/top.py``'s
        :func:`~llmfab.hw.top.probe_names`, each sample a dict name -> value)
        every ``N`` clock cycles from ``ap_start``, then one taken after the
        run ended (equal to the counter block). Empty otherwise.
    memory : str
        The memory timing model the run had (``ideal`` or ``card``).
    memory_stats : dict
        What the card-like timing model counted during the run: ``rd_bursts``,
        ``wr_bursts``, ``row_misses``, ``refreshes``, ``switch_bursts``,
        ``bus_cycles`` (channel-cycles the data buses were held, all channels).
        Zeros under the ideal model.
    """

    status: int | None
    pc: int = -1
    counters: dict = field(default_factory=dict)
    port_bytes: list = field(default_factory=list)
    sim_cycles: int = 0
    wall_seconds: float = 0.0
    timed_out: bool = False
    samples: list = field(default_factory=list)
    memory: str = "ideal"
    memory_stats: dict = field(default_factory=dict)

    @property
    def cycles(self) -> int:
        """Cycles from ``ap_start`` to the end of the run (the accelerator's own count)."""
        return int(self.counters.get("cycles", 0))

    @property
    def cycles_per_second(self) -> float:
        return self.sim_cycles / self.wall_seconds if self.wall_seconds else 0.0


# ---------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------

def _port_list(component):
    """``[(verilog name, width, 'input'|'output')]`` of an Amaranth component's ports."""
    from amaranth.hdl import Shape
    from amaranth.lib.wiring import Flow
    out = []
    for path, member in component.signature.members.flatten():
        if not member.is_port:
            continue
        name = "__".join(str(p) for p in path)
        width = Shape.cast(member.shape).width
        out.append((name, width, "output" if member.flow == Flow.Out else "input"))
    return out


def sim_top_verilog(accel, *, read_latency=READ_LATENCY, write_latency=WRITE_LATENCY) -> str:
    """The simulation top ``sim_top``: the accelerator, one HBM model per port, ``ap_clk``/``ap_rst_n``."""
    g = accel.geometry
    ports = _port_list(accel)
    lines = [f"module {TOPLEVEL}(", "    input wire ap_clk,", "    input wire ap_rst_n,"]
    ext = [(n, w, d) for n, w, d in ports if not n.startswith("m_axi_hbm")]
    decl = [f"    {d} wire [{w - 1}:0] {n}" for n, w, d in ext]
    # the reset is registered: logic that depends on a primary input is re-evaluated by
    # Verilator at every input change (every clock edge), so a combinational reset would
    # drag the whole next-state logic into that path
    lines += [",\n".join(decl), ");", "    reg rst = 1'b1;",
              "    always @(posedge ap_clk) rst <= ~ap_rst_n;"]
    conns = [".clk(ap_clk)", ".rst(rst)"] + [f".{n}({n})" for n, _, _ in ext]
    for n, w, d in ports:
        if n.startswith("m_axi_hbm"):
            lines.append(f"    wire [{w - 1}:0] {n};")
            conns.append(f".{n}({n})")
    lines.append(f"    {ACCEL_MODULE} u_accel(" + ", ".join(conns) + ");")
    sigs = ("awid", "awaddr", "awlen", "awvalid", "awready", "wdata", "wstrb", "wlast", "wvalid",
            "wready", "bid", "bresp", "bvalid", "bready", "arid", "araddr", "arlen", "arvalid",
            "arready", "rid", "rdata", "rresp", "rlast", "rvalid", "rready")
    from llmfab.hw.top import ID_WIDTH
    for p in range(g["ports"]):
        pc = ", ".join(f".{s}(m_axi_hbm{p}__{s})" for s in sigs)
        lines.append(f"    hbm_axi_port #(.PORT({p}), .DW({g['beat_bytes'] * 8}), .IDW({ID_WIDTH}), "
                     f".RLAT({read_latency}), .BLAT({write_latency})) u_hbm{p}(.clk(ap_clk), "
                     f".rst(rst), {pc});")
    lines.append("endmodule")
    return "\n".join(lines) + "\n"


def _build_dir(tag: str, text: str, args) -> Path:
    from llmfab.sim.rtl.runner import build_root
    h = hashlib.sha256()
    for part in (text, HBM_MODEL_CPP.read_text(), " ".join(args)):
        h.update(part.encode())
    return build_root() / f"{TOPLEVEL}-{tag}-{h.hexdigest()[:16]}"


def fst_available() -> bool:
    """Whether Verilator's FST writer can be compiled here (it needs ``lz4.h``)."""
    try:
        r = subprocess.run(["c++", "-x", "c++", "-E", "-o", os.devnull, "-"], input="#include <lz4.h>\n",
                           text=True, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


#: Only the simulation top's ports are visible to cocotb (VPI): every public signal
#: can change behind Verilator's back, so logic reading it is re-evaluated at every eval.
_PUBLIC_VLT = f"""`verilator_config
public_flat_rw -module "{TOPLEVEL}" -var "ap_clk"
public_flat_rw -module "{TOPLEVEL}" -var "ap_rst_n"
public_flat_rw -module "{TOPLEVEL}" -var "interrupt"
public_flat_rw -module "{TOPLEVEL}" -var "s_axi_control__*"
public_flat_rd -module "{TOPLEVEL}" -var "probe"
"""


def build(config, *, waves: bool = False, exec_factory=None, read_latency=READ_LATENCY,
          write_latency=WRITE_LATENCY, progress=None, probe: bool = True) -> Path:
    """Generate and Verilate the simulation of ``config`` (cached); returns the build directory.

    ``probe``: build the accelerator with its simulation-only ``probe`` output
    (the live counters, see :meth:`RtlAccelerator.run`'s ``sample_every``).
    """
    from llmfab.hw.top import Accelerator
    from llmfab.hw.verilog import cached_verilog
    from llmfab.sim.rtl.runner import VERILATOR_ARGS, to_verilog, clear_stale_build, verilator_env, verilator_runner

    accel = Accelerator(config, exec_factory=exec_factory, probe=probe)
    if exec_factory is None:
        # the default accelerator is named by its configuration and options: its Verilog is
        # cached (hw/verilog.py) so an unchanged design is not elaborated again (30-60 s)
        made = []
        accel_v = cached_verilog(["accelerator", config.to_dict(), probe],
                                 lambda: made.append(1) or to_verilog(accel, ACCEL_MODULE))
        if not made:
            accel._MustUse__silence = True      # its Verilog came from the cache: not elaborated
    else:
        accel_v = to_verilog(accel, ACCEL_MODULE)
    text = (accel_v + "\n" + HBM_MODEL_V.read_text() + "\n"
            + sim_top_verilog(accel, read_latency=read_latency, write_latency=write_latency))
    args = list(VERILATOR_ARGS) + [str(HBM_MODEL_CPP), "-LDFLAGS", "-rdynamic"]
    if waves:
        # FST needs the system's lz4 headers (Verilator's FST writer); without them: VCD
        args += (["--trace-fst"] if fst_available() else ["--trace"]) + ["--trace-structs"]
    bdir = _build_dir(config.name, text + _PUBLIC_VLT, args)
    bdir.mkdir(parents=True, exist_ok=True)
    exe = bdir / TOPLEVEL
    with open(bdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        clear_stale_build(bdir)
        if exe.exists():
            return bdir
        src = bdir / f"{TOPLEVEL}.v"
        src.write_text(text)
        verilator_env()
        if progress:
            progress(f"verilating {config.name} accelerator into {bdir}")
        t0 = time.perf_counter()
        vlt = bdir / "public.vlt"
        vlt.write_text(_PUBLIC_VLT)
        runner = verilator_runner(drop_public_flat_rw=str(vlt))
        try:
            runner.build(sources=[src], hdl_toplevel=TOPLEVEL, build_dir=bdir, build_args=args,
                         waves=waves, log_file=bdir / "build.log")
        except (RuntimeError, SystemExit) as e:
            raise SimError(f"Verilator build of {config.name} failed (see {bdir / 'build.log'}): "
                           f"{e}") from None
        (bdir / "build_seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return bdir


class _Captured(Exception):
    def __init__(self, cmds, env, cwd):
        super().__init__("captured")
        self.cmds, self.env, self.cwd = cmds, env, cwd


def _launch_spec(bdir: Path, extra_env: dict, waves: bool):
    """The command and environment cocotb's runner would use to run the simulation."""
    from llmfab.sim.rtl.runner import verilator_env
    verilator_env()
    from cocotb_tools.runner import Verilator

    class _Capture(Verilator):
        def _execute(self, cmds, cwd):
            raise _Captured(list(cmds), dict(self.env), cwd)

    try:
        _Capture().test(test_module=SERVER_MODULE, hdl_toplevel=TOPLEVEL, hdl_toplevel_lang="verilog",
                        build_dir=bdir, test_dir=bdir, extra_env=extra_env, waves=waves,
                        results_xml=str(bdir / f"results-{os.getpid()}-{secrets.token_hex(4)}.xml"))
    except _Captured as c:
        return c.cmds[0], c.env, c.cwd
    raise SimError("could not prepare the simulator command")


# ---------------------------------------------------------------------------------------
# messages (length-prefixed pickles over a local socket)
# ---------------------------------------------------------------------------------------

def send_msg(sock, obj):
    b = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("<Q", len(b)) + b)


def recv_msg(sock):
    head = _recv_exact(sock, 8)
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(_recv_exact(sock, n))


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


# ---------------------------------------------------------------------------------------
# the device
# ---------------------------------------------------------------------------------------

def _align(x, a=_ALIGN):
    return (x + a - 1) // a * a


class RtlAccelerator:
    """A compiled bundle on the simulated accelerator.

    Parameters
    ----------
    config : AccelConfig
    bundle : Bundle or None
        Must have been compiled for ``config``; None for a bare simulation (``memory_size``).
    waves : bool
        Record a waveform in the build directory: ``dump.fst``, or ``dump.vcd``
        where the system lacks the lz4 headers Verilator's FST writer needs.
    exec_factory : callable, optional
        Execution unit to plug in (see :class:`~llmfab.hw.top.Accelerator`); default the
        accelerator's own, ``hw/exec_unit.py``'s ``ExecUnit`` for ``config``.
    timeout_seconds : float
        Wall-clock bound on any single request to the simulator (the
        simulation is killed and :class:`SimError` raised when it is exceeded).
    probe : bool
        Build the accelerator with its ``probe`` output (default), which
        ``run(..., sample_every=N)`` samples; without it runs cannot record samples.
    memory : str
        The HBM timing model (``boards/memory_timing.py``): ``ideal`` (default:
        a beat per cycle per port, fixed latency) or ``card`` (the board's
        memory timing: latency, pages, refresh, switch). A run-time choice:
        both run on the same build, and :meth:`set_memory` switches between runs.
        Results never depend on it, only cycle counts.
    memory_size : int, optional
        With ``bundle=None``: a bare simulation of this many bytes of (flat, striped)
        memory and nothing in it; the host fills it through :meth:`write_port` /
        :meth:`write_hbm` and drives the registers itself (the simulated card,
        ``sim/rtl/xrt_card.py``). :meth:`run` needs a bundle.
    build_dir : path, optional
        A :func:`build` of this configuration and execution unit to reuse without
        generating the Verilog again to find it (about a minute for ``ci``).
    """

    def __init__(self, config, bundle, *, waves: bool = False, exec_factory=None,
                 read_latency: int = READ_LATENCY, timeout_seconds: float = 3600,
                 progress=None, probe: bool = True, memory: str = "ideal",
                 memory_size: int | None = None, build_dir=None):
        from llmfab.hw.top import geometry
        self.config = config
        #: a build of :func:`build` for this very configuration and execution unit, reused
        #: without generating the Verilog again to hash it (None: build, or find the cached one)
        self._prebuilt = Path(build_dir) if build_dir is not None else None
        self.bundle = bundle
        self.geometry = geometry(config)
        self._init_common(waves, exec_factory, read_latency, timeout_seconds, progress, probe, memory)
        if bundle is None:
            # a bare simulation (the simulated card, sim/rtl/xrt_card.py): memory, registers,
            # start and wait; the host puts everything into the memory itself
            if not memory_size or memory_size % self.geometry["hbm_line_bytes"]:
                raise SimError(f"a simulation without a bundle needs memory_size, a multiple of "
                               f"{self.geometry['hbm_line_bytes']} bytes, not {memory_size}")
            self.memory_size = int(memory_size)
            self.hbm_size, self.registers, self.context = self.memory_size, {}, 0
            self.program = b""
            return
        bundle.check_config(config)
        man = bundle.manifest
        self.hbm_size = int(man["hbm_size"])
        mm = man["memory_map"]
        if mm.get("hbm_ports", self.geometry["ports"]) != self.geometry["ports"] or \
                mm.get("hbm_stripe_bytes", self.geometry["beat_bytes"]) != self.geometry["beat_bytes"]:
            raise SimError("bundle memory map striping does not match the configuration")
        self.registers = {k: int(v) for k, v in man["registers"].items()}
        self.context = int(man["onchip"]["context"])
        # the counter block starts on an HBM line (hw/control.py CounterWriter): 4096 is a
        # multiple of every configuration's ports x beat bytes, checked here
        line = self.geometry["ports"] * self.geometry["beat_bytes"]
        if _ALIGN % line:
            raise SimError(f"the counter block alignment {_ALIGN} is not a multiple of the "
                           f"HBM line ({line} bytes)")
        self.counters_addr = _align(self.hbm_size)
        self.program_addr = self.counters_addr + _ALIGN
        self.program_capacity = _align(max(1 << 16, 4 * len(bundle.program)))
        self.memory_size = self.program_addr + self.program_capacity
        self.program = bytes(bundle.program)

    def _init_common(self, waves, exec_factory, read_latency, timeout_seconds, progress, probe, memory):
        self._waves = waves
        self._exec_factory = exec_factory
        self._read_latency = read_latency
        self._timeout = timeout_seconds
        self._progress = progress
        self.probe = probe
        if memory not in MODELS:
            raise SimError(f"unknown memory model '{memory}'; known models: {', '.join(MODELS)}")
        self.memory = memory
        self.channel_offset = 0
        #: the timing model's parameters in cycles (set by set_memory at start)
        self.timing = None
        self._proc = None
        self._sock = None
        self._tmp = None
        self.build_dir = None
        self.log_path = None

    # ---- lifecycle
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        """Build (if needed), start the simulator, load the HBM image and the program."""
        if self._proc is not None:
            return
        self._launch()
        if self.bundle is not None:
            self.reload_hbm()
            self.load_program(self.program)

    def _launch(self):
        """Build (if needed), start the simulator, size its memory, set the timing model."""
        if self._prebuilt is not None and (self._prebuilt / TOPLEVEL).is_file():
            self.build_dir = self._prebuilt
        else:
            self.build_dir = build(self.config, waves=self._waves, exec_factory=self._exec_factory,
                                   read_latency=self._read_latency, progress=self._progress,
                                   probe=self.probe)
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.settimeout(120)
        key = secrets.token_hex(16)
        env_extra = {"LLMFAB_HARNESS_ADDR": f"127.0.0.1:{srv.getsockname()[1]}",
                     "LLMFAB_HARNESS_KEY": key, "LLMFAB_CLOCK_NS": str(CLOCK_NS)}
        cmd, env, cwd = _launch_spec(self.build_dir, env_extra, self._waves)
        self.log_path = Path(self.build_dir) / f"sim-{os.getpid()}-{key[:6]}.log"
        self._log = open(self.log_path, "w")
        self._proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log,
                                      stderr=subprocess.STDOUT)
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            self._kill()
            raise SimError(f"the simulator did not connect within 120 s (log: {self.log_path})") from None
        finally:
            srv.close()
        conn.settimeout(self._timeout)
        self._sock = conn
        if self._call("hello", key) != "llmfab":
            raise SimError("unexpected simulator handshake")
        self._call("hbm_init", self.memory_size, self.geometry["ports"], self.geometry["beat_bytes"])
        self.set_memory(self.memory, channel_offset=self.channel_offset)

    def close(self):
        """Stop the simulator."""
        if self._sock is not None:
            try:
                self._call("quit")
            except Exception:
                pass
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
            self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _kill(self):
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            self._log.close()

    def _call(self, cmd, *args):
        if self._sock is None and cmd != "quit":
            raise SimError("the simulator is not running (call start())")
        try:
            send_msg(self._sock, (cmd, args))
            status, value = recv_msg(self._sock)
        except (socket.timeout, TimeoutError):
            self._kill()
            raise SimError(f"the simulator did not answer '{cmd}' within {self._timeout} s "
                           f"(killed; log: {self.log_path})") from None
        except (EOFError, ConnectionError, OSError) as e:
            rc = self._proc.poll() if self._proc else None
            raise SimError(f"the simulator went away during '{cmd}' (exit {rc}; log: "
                           f"{self.log_path}): {e}") from None
        if status != "ok":
            raise SimError(f"simulator error during '{cmd}': {value}")
        return value

    # ---- memory
    def set_memory(self, model: str, *, channel_offset: int = 0) -> None:
        """Choose the HBM timing model for the next runs (``ideal`` or ``card``).

        ``channel_offset`` (card model): port p reaches channel (p + offset)
        mod the board's channels through the HBM switch instead of its own (a
        microbenchmark knob for the switch penalty). The timing state (open
        rows, refresh) starts afresh. A board without a ``timing`` section
        runs the ideal model only (:class:`SimError` naming the fix).
        """
        try:
            params = timing_params(self.config, model, channel_offset=channel_offset)
        except LlmfabError as e:
            raise SimError(str(e)) from None
        if self._sock is not None:
            self._call("hbm_timing", params.to_array())
        self.memory = model
        self.channel_offset = int(channel_offset)
        self.timing = params

    def _hbm_file(self) -> str:
        if self.bundle.path:
            p = Path(self.bundle.path) / "hbm.bin"
            if p.is_file():
                return str(p)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="llmfab-hbm-")
            p = Path(self._tmp.name) / "hbm.bin"
            np.ascontiguousarray(self.bundle.hbm_image, dtype=np.uint8).tofile(p)
        return str(Path(self._tmp.name) / "hbm.bin")

    def reload_hbm(self):
        """Reset HBM to the bundle's image (KV cache and I/O regions zeroed)."""
        self._call("hbm_fill", 0, 0, self.program_addr)
        self._call("hbm_load", self._hbm_file(), 0)

    def load_program(self, program: bytes):
        """Put a program (16-byte words) in HBM; later runs execute it."""
        program = bytes(program)
        if len(program) % 16:
            raise SimError(f"program of {len(program)} bytes is not a whole number of 16-byte words")
        if len(program) > self.program_capacity:
            raise SimError(f"program of {len(program)} bytes exceeds the simulation's program area "
                           f"of {self.program_capacity} bytes")
        self._call("hbm_write", self.program_addr, program)
        self.program = program

    def read_hbm(self, addr: int, n: int) -> np.ndarray:
        return np.frombuffer(self._call("hbm_read", int(addr), int(n)), np.uint8).copy()

    def write_hbm(self, addr: int, data) -> None:
        self._call("hbm_write", int(addr), bytes(np.asarray(data, np.uint8).tobytes()
                                                 if not isinstance(data, (bytes, bytearray)) else data))

    def logits(self) -> np.ndarray:
        io = int(self.bundle.manifest["memory_map"]["logits"][0])
        n = int(self.bundle.manifest["model"]["vocab_size"])
        return self.read_hbm(io, 4 * n).view(np.float32)

    # ---- control registers (hw/control.py)
    def read_reg(self, offset: int) -> int:
        """Read a 32-bit control register over AXI4-Lite."""
        return int(self._call("reg_read", int(offset)))

    def write_reg(self, offset: int, value: int) -> None:
        """Write a 32-bit control register over AXI4-Lite."""
        self._call("reg_write", int(offset), int(value) & 0xFFFFFFFF)

    # ---- one port's own memory (the bank behind m_axi_hbm<port>)
    def write_port(self, port: int, local: int, data) -> None:
        """Write ``data`` at byte ``local`` of what port ``port`` addresses (its bank)."""
        data = bytes(np.asarray(data, np.uint8).tobytes() if not isinstance(data, (bytes, bytearray))
                     else data)
        self._call("port_write", int(port), int(local), data)

    def read_port(self, port: int, local: int, n: int) -> np.ndarray:
        """``n`` bytes at byte ``local`` of port ``port``'s bank."""
        return np.frombuffer(self._call("port_read", int(port), int(local), int(n)), np.uint8).copy()

    def wait_done(self, timeout_cycles: int) -> dict:
        """Clock the simulation until the kernel raises ``interrupt`` (ap_done) or
        ``timeout_cycles`` pass, as XRT waits for a compute unit: on the interrupt, read
        ctrl (clears ap_done) and toggle ISR. Returns ``done``, ``ctrl``, ``cycles``
        (simulated) and ``oob`` (beats the kernel put outside the memory)."""
        return self._call("wait_done", int(timeout_cycles))

    # ---- runs
    def run(self, pos: int, token: int, *, timeout_cycles: int = 50_000_000,
            registers: dict | None = None, ntok: int = 1,
            sample_every: int | None = None) -> RtlRun:
        """Run the loaded program for token ``token`` at position ``pos``.

        ``ntok`` is the number of tokens the program processes: 1 for the
        decode program, T for a prefill program ``prefill_T`` (R2 = ``pos +
        ntok``, as the golden model's ``Golden._regs``; the host stages the
        token rows in the I/O region first, see ``Golden.stage_tokens``).

        ``timeout_cycles`` is the watchdog: if the accelerator has not
        finished after that many cycles the run is abandoned, the accelerator
        reset, and the result has ``timed_out`` set and status None.

        ``sample_every``: record the live counters every that many clock
        cycles (a timer in the simulation, not a per-cycle callback) into
        ``RtlRun.samples``, plus one sample after the run ended.
        """
        if sample_every is not None:
            if not self.probe:
                raise SimError("sampling needs the accelerator built with probe=True")
            if int(sample_every) < 1:
                raise SimError(f"sample_every must be a positive number of cycles, not {sample_every}")
        regs = dict(self.registers)
        regs.update(registers or {})
        args = {
            "program": self.program_addr, "program_words": len(self.program) // 16,
            "pos": int(pos), "seq": int(pos) + int(ntok), "token": int(token),
            "wbase": regs["wbase"], "kvbase": regs["kvbase"], "iobase": regs["iobase"],
            "tbase": regs["tbase"], "counters": self.counters_addr, "hbm_size": self.hbm_size,
            "context": self.context,
        }
        for k in ("pos", "seq", "token", "wbase", "kvbase", "iobase", "tbase"):
            if not 0 <= args[k] < 1 << 32:
                raise SimError(f"register {k} = {args[k]} does not fit in 32 bits")
        res = self._call("run", args, int(timeout_cycles),
                         None if sample_every is None else int(sample_every))
        return RtlRun(**res, memory=self.memory)
