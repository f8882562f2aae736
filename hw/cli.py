"""``llmfab hw``: write the accelerator's Verilog, estimate the units' resources.

``llmfab hw verilog --config NAME|PATH --out DIR`` writes ``DIR/llmfab_accel.v``:
the whole accelerator (``hw/top.py``'s :class:`~llmfab.hw.top.Accelerator`, the
Vitis RTL kernel with its execution unit: MV/MM engine, SFU unit, MiscExec), top
module ``llmfab_accel``, every submodule in the same file. That file is what a
synthesis flow takes; it is the module sim/rtl/harness.py simulates (there with
the simulation-only ``probe`` port). ``--units`` also writes ``DIR/<unit>.v`` for
every unit of :func:`llmfab.hw.units.all_units`, each its own top (for
out-of-context synthesis, ``llmfab hw estimate``). ``llmfab hw estimate --config
NAME|PATH [--json]`` runs :func:`llmfab.hw.estimate.estimate_design` on the whole
accelerator (each distinct unit synthesized once, multiplied by its count, plus the
shared rest; against the board after its shell) and prints a table, or one JSON
object; a design over the board is then an error naming the resource. ``--units``
estimates the registry's units one by one instead (:func:`llmfab.hw.estimate.estimate`).
"""

import json
import sys
import time
from pathlib import Path

from llmfab.core.errors import LlmfabError

__all__ = ["TOP_MODULE", "hw_cli", "generate_verilog"]


#: Module (and file) name of the accelerator top, as sim/rtl/harness.py builds it.
TOP_MODULE = "llmfab_accel"


def generate_verilog(config, out_dir, *, units: bool = False, progress=None) -> list:
    """Write the accelerator top ``<TOP_MODULE>.v`` (and with ``units`` every ``<unit>.v``,
    module named after the unit) into ``out_dir``; returns the paths, the top first.

    ``progress(name)`` is called before each file is generated."""
    from llmfab.hw.top import Accelerator
    from llmfab.hw.verilog import cached_verilog, to_verilog
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LlmfabError(f"cannot write Verilog to {out_dir}: it is a file; give a directory")
    designs = {TOP_MODULE: Accelerator(config)}
    if units:
        from llmfab.hw.units import all_units
        designs.update(all_units(config))
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, comp in designs.items():
            if progress:
                progress(name)
            path = out / f"{name}.v"
            if name == TOP_MODULE:
                # the simulation's key for the same design (sim/rtl/harness.py, probe off):
                # `hw verilog`, `llmfab build` and an rtl run of one configuration elaborate once
                made = []
                text = cached_verilog(["accelerator", config.to_dict(), False],
                                      lambda: made.append(1) or to_verilog(comp, name))
                if not made:
                    comp._MustUse__silence = True      # from the cache: not elaborated
            else:
                text = to_verilog(comp, name)
            path.write_text(text)
            written.append(path)
    except OSError as e:
        raise LlmfabError(f"cannot write Verilog to {out_dir}: {e.strerror}") from None
    return written


def hw_cli(args) -> None:
    """Entry point of ``llmfab hw`` (``args.hwcmd``: ``verilog`` or ``estimate``)."""
    from llmfab.boards.config import load_config
    config = load_config(args.config)
    if args.hwcmd == "verilog":
        units = getattr(args, "units", False)

        def progress(name):
            what = "the accelerator (a minute or more)" if name == TOP_MODULE else f"unit {name}"
            print(f"generating {what} ...", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        paths = generate_verilog(config, args.out, units=units, progress=progress)
        for p in paths:
            print(p)
        print(f"wrote {paths[0]}: top module {TOP_MODULE} (config '{config.name}')"
              + (f" and {len(paths) - 1} unit files" if units else "")
              + f" in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    elif args.hwcmd == "estimate" and getattr(args, "units", False):
        from llmfab.hw.estimate import estimate, format_table
        result = estimate(config)
        if getattr(args, "json", False):
            print(json.dumps(result))
        else:
            print(f"config '{config.name}': Yosys synth_xilinx -family xcup, out of context")
            print(format_table(result, config))
    elif args.hwcmd == "estimate":
        from llmfab.hw.estimate import check_design_fits, estimate_design, format_design_table
        print("generating the accelerator ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = estimate_design(config)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if getattr(args, "json", False):
            print(json.dumps(result))
        else:
            print(f"config '{config.name}': the whole accelerator, each distinct unit synthesized "
                  f"once (Yosys synth_xilinx -family xcup, out of context) x its count")
            print(format_design_table(result))
            print(f"shell reservation: {result['shell']['source']}")
        check_design_fits(result)
    else:   # argparse only offers the two
        raise LlmfabError(f"unknown hw command {args.hwcmd!r}; use verilog or estimate")
