"""``llmfab hw``: write the units' Verilog, estimate their resources.

``llmfab hw verilog --config NAME|PATH --out DIR`` writes ``DIR/<unit>.v`` for every
unit of :func:`llmfab.hw.units.all_units` and ``DIR/llmfab_accel.v``, the whole
accelerator (``hw/top.py``'s ``Accelerator``, the module sim/rtl/harness.py builds). ``llmfab hw estimate --config NAME|PATH [--json]`` runs
:func:`llmfab.hw.estimate.estimate` and prints a table, or one JSON object.
"""

import json
import sys
from pathlib import Path

from llmfab.core.errors import LlmfabError

__all__ = ["hw_cli", "generate_verilog"]


#: Module (and file) name of the accelerator top, as sim/rtl/harness.py builds it.
TOP_MODULE = "llmfab_accel"


def _top(config):
    """The accelerator top (``hw/top.py``'s :class:`Accelerator`), or None before it exists."""
    import importlib
    try:
        topmod = importlib.import_module("llmfab.hw.top")
    except ModuleNotFoundError as e:
        if e.name == "llmfab.hw.top":
            return None
        raise
    make = getattr(topmod, "Accelerator", None)
    return make(config) if callable(make) else None


def generate_verilog(config, out_dir) -> list:
    """Write ``<unit>.v`` per unit (module named after the unit) and the top into ``out_dir``."""
    from llmfab.hw.units import all_units
    from llmfab.hw.verilog import to_verilog
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LlmfabError(f"cannot write Verilog to {out_dir}: it is a file; give a directory")
    units = dict(all_units(config))
    top = _top(config)
    if top is not None:
        units[TOP_MODULE] = top
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, comp in units.items():
            path = out / f"{name}.v"
            path.write_text(to_verilog(comp, name))
            written.append(path)
    except OSError as e:
        raise LlmfabError(f"cannot write Verilog to {out_dir}: {e.strerror}") from None
    return written


def hw_cli(args) -> None:
    """Entry point of ``llmfab hw`` (``args.hwcmd``: ``verilog`` or ``estimate``)."""
    from llmfab.boards.config import load_config
    config = load_config(args.config)
    if args.hwcmd == "verilog":
        paths = generate_verilog(config, args.out)
        for p in paths:
            print(p)
        print(f"wrote {len(paths)} Verilog files for config '{config.name}' to {args.out}",
              file=sys.stderr)
    elif args.hwcmd == "estimate":
        from llmfab.hw.estimate import estimate, format_table
        result = estimate(config)
        if getattr(args, "json", False):
            print(json.dumps(result))
        else:
            print(f"config '{config.name}': Yosys synth_xilinx -family xcup, out of context")
            print(format_table(result, config))
    else:   # argparse only offers the two
        raise LlmfabError(f"unknown hw command {args.hwcmd!r}; use verilog or estimate")
