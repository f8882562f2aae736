"""Verilog out of Amaranth, and the scratch directory generated files go to."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["to_verilog", "build_root"]


def to_verilog(component, name: str, ports=None) -> str:
    """Verilog text of an Amaranth component (amaranth[builtin-yosys], no system Yosys)."""
    from amaranth.back import verilog
    return verilog.convert(component, name=name, ports=ports, emit_src=False)


def build_root() -> Path:
    root = Path(os.environ.get("LLMFAB_SIM_BUILD", Path.cwd() / "sim_build"))
    root.mkdir(parents=True, exist_ok=True)
    return root
