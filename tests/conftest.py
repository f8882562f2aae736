"""Fixtures shared by the test modules.

- ``smol``: the bundled SmolLM2-135M-Instruct Q4_1 (loaded once per worker);
- ``ci``: the ``ci`` accelerator configuration;
- ``smol_bundle``: SmolLM2 compiled for ``ci`` (compiled once per worker; read-only:
  a test that changes a bundle compiles its own).
"""

import os
import pathlib

import pytest

# Verilator builds go to one place per checkout (shared by xdist workers; keyed by design hash).
os.environ.setdefault("LLMFAB_SIM_BUILD", str(pathlib.Path(__file__).resolve().parent.parent / "sim_build"))


@pytest.fixture(scope="session")
def smol():
    from llmfab.compiler.model import load_model
    return load_model()


@pytest.fixture(scope="session")
def ci():
    from llmfab.boards.config import load_config
    return load_config("ci")


@pytest.fixture(scope="session")
def smol_bundle(smol, ci):
    from llmfab.compiler.compile import compile_model
    return compile_model(smol, ci)
