import os
import pathlib
import shutil
import tempfile

# Verilator builds go to one place per checkout (shared by xdist workers; keyed by design hash).
os.environ.setdefault("LLMFAB_SIM_BUILD", str(pathlib.Path(__file__).resolve().parent.parent / "sim_build"))

_CACHE = {}


def pytest_configure(config):
    """One bundle cache per test run, never the user's: the controller makes it before the
    xdist workers start, and they inherit LLMFAB_CACHE_DIR (so they share its entries)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    _CACHE["dir"] = tempfile.mkdtemp(prefix="llmfab-test-cache-")
    os.environ["LLMFAB_CACHE_DIR"] = _CACHE["dir"]


def pytest_unconfigure(config):
    if "dir" in _CACHE:
        shutil.rmtree(_CACHE.pop("dir"), ignore_errors=True)
