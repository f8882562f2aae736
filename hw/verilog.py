"""Verilog out of Amaranth, and the scratch directory generated files go to."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

__all__ = ["to_verilog", "build_root", "cached_verilog", "generator_digest"]

#: The packages whose source decides what Verilog a configuration elaborates to
#: (hw imports compiler, boards and core: the layers below it), and the board files.
_GENERATOR_DIRS = ("hw", "compiler", "boards", "core")


def _no_zero_meminit():
    """Amaranth 0.5 writes every memory's initial contents, word by word, also when they are
    all zero (``init=[]``): the u280's 8 MiB of on-chip buffers were 20 MB of the Verilog
    and most of its generation time. A memory whose contents are all zero gets no initial
    block; the FPGA's block and ultra RAMs start at zero without one, and the simulations
    build with ``--x-initial 0`` (sim/rtl/runner.py), so nothing changes but the size."""
    from amaranth.back import rtlil
    emit = rtlil.ModuleEmitter.emit_memory
    if getattr(emit, "_llmfab", False):
        return

    def emit_memory(self, cell_idx, cell):
        if any(cell.init):
            emit(self, cell_idx, cell)
    emit_memory._llmfab = True
    rtlil.ModuleEmitter.emit_memory = emit_memory


def to_verilog(component, name: str, ports=None) -> str:
    """Verilog text of an Amaranth component (amaranth[builtin-yosys], no system Yosys),
    followed by the modules of the shared units it instantiates (``hw/blackbox.py``).
    Memories that start all zero have no initial block (:func:`_no_zero_meminit`)."""
    from amaranth.back import verilog
    _no_zero_meminit()

    from llmfab.hw.blackbox import append_modules
    return append_modules(verilog.convert(component, name=name, ports=ports, emit_src=False))


def build_root() -> Path:
    root = Path(os.environ.get("LLMFAB_SIM_BUILD", Path.cwd() / "sim_build"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@functools.cache
def generator_digest() -> str:
    """A hash of everything the generated Verilog depends on besides its arguments: the
    source of :data:`_GENERATOR_DIRS` (Python and board/configuration YAML) and Amaranth's
    version. Taken once per process (the first time it is needed), so a long run whose
    sources are edited while it goes on keys what it generates by the sources it imported,
    not by the edited ones (which would file its old Verilog under the new sources)."""
    import amaranth
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(amaranth.__version__.encode())
    for d in _GENERATOR_DIRS:
        for f in sorted((root / d).rglob("*")):
            if f.suffix in (".py", ".yaml") and f.is_file():
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def cached_verilog(key, make) -> str:
    """``make()``'s Verilog text, cached on disk under :func:`build_root` by ``key`` (plain data
    naming the design: configuration, options) and :func:`generator_digest`.

    Elaborating and converting the whole accelerator takes 30-60 s; every simulation,
    benchmark and rtl-backend run of an unchanged design reuses the text instead. A change
    to any generator source gives a new digest, so a stale text is never used.
    """
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    h.update(generator_digest().encode())
    d = build_root() / "verilog"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{h.hexdigest()[:24]}.v"
    if path.is_file():
        return path.read_text()
    text = make()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text
