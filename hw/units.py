"""Registry of the generated hardware units (for `llmfab hw verilog` and `llmfab hw estimate`).

Each unit module exposes ``units(config) -> dict[name, wiring.Component]`` giving
the unit(s) it generates for an accelerator configuration.
"""

from __future__ import annotations

import importlib

UNIT_MODULES = [
    "llmfab.hw.fp",
    "llmfab.hw.chain",
    "llmfab.hw.decoder",
    "llmfab.hw.quantizer",
    "llmfab.hw.scaler",
    "llmfab.hw.sfu",
]


def all_units(config) -> dict:
    """Every unit of the configuration: name -> component (modules not yet written are skipped)."""
    out = {}
    for mod in UNIT_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        out.update(m.units(config))
    return out
