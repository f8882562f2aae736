import os
import pathlib

# Verilator builds go to one place per checkout (shared by xdist workers; keyed by design hash).
os.environ.setdefault("LLMFAB_SIM_BUILD", str(pathlib.Path(__file__).resolve().parent.parent / "sim_build"))
