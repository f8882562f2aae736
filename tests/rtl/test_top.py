"""The accelerator under Verilator: ISA decoder, corrupted programs, LD/ST byte movement.

Builds: the decoder alone (small), and the whole accelerator for the ``tiny``
configuration once (every accelerator test of this file shares one simulation
through :class:`llmfab.sim.rtl.harness.RtlAccelerator`).
"""

from pathlib import Path

from llmfab.hw.isa import InstrDecoder
from llmfab.sim.rtl.runner import run_cocotb, to_verilog

HERE = Path(__file__).parent
BUILD_ARGS = ("--output-split", "0")


def test_isa_decoder_matches_compiler():
    """>= 10,000 random words (legal, corrupted, random): legal flag and queue as compiler.isa.decode."""
    run_cocotb(to_verilog(InstrDecoder(), "instr_decoder"), "instr_decoder", "cocotb_top",
               module_dir=HERE, testcase="decoder_random", build_args=BUILD_ARGS,
               extra_env={"DEC_N": "12000"})
