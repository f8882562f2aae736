"""hw/exec_unit.py: the accelerator's execution unit is the whole one, with no silent fallback.

(Its RTL runs in test_rtl_backend.py and test_probe_samples.py, MV/MM in test_mv_exec.py,
the SFU operations in test_sfu_exec.py.)"""

import subprocess
import sys

import pytest

from llmfab.boards.config import load_config
from llmfab.hw.exec_unit import MISC_SIMPLE, ExecUnit, default_routes, default_units
from llmfab.hw.isa import MiscFunc, Op
from llmfab.hw.top import Core


def test_default_routes_reach_every_engine():
    r = default_routes()
    assert r[Op.MV] == r[Op.MM] == "mv"
    for f in MiscFunc:
        assert r[(Op.MISC, f)] == ("misc" if f in MISC_SIMPLE else "sfu"), f


def test_core_builds_exec_unit_by_default():
    """Without ``exec_factory`` the core elaborates an ExecUnit holding mv, sfu and misc."""
    from amaranth.hdl import Fragment
    frag = Fragment.get(Core(load_config("tiny")), None)
    ex = dict((name, f) for f, name, *_ in frag.subfragments)["exec"]
    assert isinstance(ex.origins[0], ExecUnit), ex.origins
    assert sorted(name for _, name, *_ in ex.subfragments) == ["misc", "mv", "sfu"]


def test_default_units_need_the_configuration():
    with pytest.raises(TypeError, match="needs the accelerator configuration"):
        default_units(None)
    assert set(default_units(load_config("tiny"))) == {"misc", "mv", "sfu"}


def test_broken_sfu_import_is_an_error_not_a_placeholder():
    """If hw/sfu_exec.py cannot be imported, neither can the execution unit (nor the top)."""
    code = ("import sys; sys.modules['llmfab.hw.sfu_exec'] = None\n"
            "try:\n    import llmfab.hw.top\nexcept ImportError:\n    sys.exit(3)\n"
            "sys.exit(0)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3
