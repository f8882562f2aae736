"""MvExec with attention on the chains (``chains``; docs/isa.md "Attention on the chains"):
register-extended MV shapes over row tiles (the K cache) and block tiles (the transposed V
cache), bit for bit against ``sim.numerics_model.matvec`` on ``compiler.isa.untile_rows``
(tests/rtl/cocotb_mv_exec_chains.py), on one slice (tiny geometry) and two (ci geometry);
the chains build still runs plain MV/MM (tests/rtl/cocotb_mv_exec.py's random programs)."""

from pathlib import Path

import pytest

from llmfab.boards.config import load_config


def _ports(unit):
    from amaranth.hdl import Signal, Value
    return [v for v in (Value.cast(x) for _, _, x in unit.signature.flatten(unit))
            if isinstance(v, Signal)]


def _run(unit, env, module="cocotb_mv_exec_chains", testcase=None):
    from llmfab.sim.rtl.runner import run_cocotb, to_verilog
    return run_cocotb(to_verilog(unit, "mv_exec", ports=_ports(unit)), "mv_exec", module,
                      module_dir=Path(__file__).parent, extra_env=env, testcase=testcase)


def test_for_config_sets_chains():
    from llmfab.hw.mv_exec import MvExec
    for name, want in (("ci", False), ("ci-chains", True)):
        u = MvExec.for_config(load_config(name))(addr_bits=14, line_bytes=64)
        u._MustUse__silence = True
        assert u._chains is want, name


def test_mv_exec_chains_ci_cocotb():
    """Two slices (ci-chains: 2 ports x 256 bit, stripe 32, 64-byte lines, 4 chains x 32):
    K row tiles (rows 1 + 0, 1, 31, 32, 70, 200 of 64 columns), V block tiles (64 rows, cols
    32 + 0, 32, 96, 224), random tiled/plain MVs in every mode and MMs, the two-entry
    activation cache, then the attention MVs' cycles; the same build's plain random MV/MM
    (tests/rtl/cocotb_mv_exec.py) and steady-state cycles per block (its decoders' lookahead
    beat: no idle cycle between rows)."""
    from llmfab.hw.mv_exec import MvExec
    from llmfab.hw.onchip import slice_geometry
    from llmfab.hw.top import geometry
    config = load_config("ci-chains")
    g = geometry(config)
    D = g["line_bytes"]
    ab = (g["onchip_size"] // D - 1).bit_length()
    unit = MvExec.for_config(config, max_blocks=64)(addr_bits=ab, line_bytes=D)
    assert unit._chains and unit.slices == 2
    env = {"MV_D": str(D), "MV_AB": str(ab), "MV_N": "24", "MV_L": str(unit.pipelines),
           "MV_P": str(unit.slices), "MV_WB": str(g["weight_base"]), "MV_NB": "64",
           "MV_BAB": str(slice_geometry(config)["bank_addr_bits"]), "MV_REPORT": "mv_chains.txt"}
    bdir = _run(unit, env)
    print((bdir / "mv_chains.txt").read_text())
    _run(unit, env | {"MV_N": "15"}, module="cocotb_mv_exec", testcase="mv_random")
    # ci-chains' decoders hold a lookahead beat: 18-block rows at a block per pipeline per
    # cycle, no idle cycle between rows (Q4_1 0.257 cycles/block without it)
    assert unit._lookahead == 1
    bdir = _run(unit, env | {"MV_LOOKAHEAD": "1", "MV_REPORT": "mv_steady.txt"},
                module="cocotb_mv_exec", testcase="mv_steady_state")
    print((bdir / "mv_steady.txt").read_text())


def test_mv_exec_chains_one_slice_cocotb():
    """One slice (tiny geometry: 1 port x 128 bit, 16-byte lines, 2 chains x 32, 2 token
    lanes), the weights at any byte: the same K/V/random programs."""
    from llmfab.hw.mv_exec import MvExec
    config = load_config("tiny")
    D, ab, bab, wb = 16, 15, 14, 1 << 18
    unit = MvExec(addr_bits=ab, line_bytes=D, chain_length=config.chain.length,
                  count=config.chain.count, tokens=config.chain.tokens, max_blocks=64,
                  slices=1, stripe=16, weight_base=wb, bank_addr_bits=bab, chains=True)
    env = {"MV_D": str(D), "MV_AB": str(ab), "MV_N": "24", "MV_L": str(unit.pipelines),
           "MV_P": "1", "MV_S": "16", "MV_WB": str(wb), "MV_BAB": str(bab), "MV_NB": "64",
           "MV_REPORT": "mv_chains.txt"}
    bdir = _run(unit, env)
    print((bdir / "mv_chains.txt").read_text())


@pytest.mark.parametrize("name, combines", [("ci-chains", 1), ("u280-slice", 8)])
def test_mv_exec_chains_lint(name, combines, tmp_path):
    """``verilator --lint-only -Wall`` (the shared waivers) is clean for the chains build, and
    for one with 8 row combines (``_combine_many``)."""
    import dataclasses

    from test_fp import verilator_lint

    from llmfab.hw.mv_exec import MvExec
    from llmfab.hw.top import geometry
    from llmfab.sim.rtl.runner import to_verilog
    config = load_config(name)
    config = dataclasses.replace(config, attention="chains",
                                 chain=dataclasses.replace(config.chain, combines=combines))
    g = geometry(config)
    D = g["line_bytes"]
    ab = (g["onchip_size"] // D - 1).bit_length()
    unit = MvExec.for_config(config)(addr_bits=ab, line_bytes=D)
    assert verilator_lint(to_verilog(unit, "mv_exec", ports=_ports(unit)), "mv_exec", tmp_path) == ""


def test_mv_exec_chains_wide_stripes_cocotb():
    """Two slices of 64-byte stripes (128-byte lines, half-line bank reads, 4 chains x 32): a
    row tile's 16 rows per slice of an odd number of blocks end mid-line (16 x 34 bytes = 8.5
    stripes), so its stream is padded, which the row-tile steps skip; the same programs."""
    from llmfab.hw.mv_exec import MvExec
    D, ab, bab, wb = 128, 13, 10, 1 << 18
    unit = MvExec(addr_bits=ab, line_bytes=D, chain_length=32, count=4, max_blocks=64,
                  slices=2, stripe=64, weight_base=wb, bank_addr_bits=bab, chains=True)
    env = {"MV_D": str(D), "MV_AB": str(ab), "MV_N": "24", "MV_L": str(unit.pipelines),
           "MV_P": "2", "MV_S": "64", "MV_WB": str(wb), "MV_BAB": str(bab),
           "MV_REPORT": "mv_chains.txt"}
    bdir = _run(unit, env)
    print((bdir / "mv_chains.txt").read_text())


def test_mv_exec_combines_cocotb():
    """``chain.combines: 8`` on u280-slice's geometry (two slices of 64-byte stripes, 8 row
    pipelines, 64-byte lines): 8 RowCombines, their rows written together when they share a
    line (``MvExec._combine_many``). The K/V tile programs, random tiled and plain MVs and MMs
    and the two-entry cache of tests/rtl/cocotb_mv_exec_chains.py, and 40 random MV/MM of
    tests/rtl/cocotb_mv_exec.py (destinations at any byte: words straddling two lines), bit
    for bit; the attention's short rows no longer wait for one combine: 129 scores rows in
    fewer than 129 + 35 cycles (178 with one combine, 2026-12-06)."""
    import dataclasses
    import re

    from llmfab.hw.mv_exec import MvExec
    from llmfab.hw.onchip import slice_geometry
    from llmfab.hw.top import geometry
    base = load_config("u280-slice")
    config = dataclasses.replace(base, attention="chains",
                                 chain=dataclasses.replace(base.chain, combines=8))
    g = geometry(config)
    D = g["line_bytes"]
    ab = (g["onchip_size"] // D - 1).bit_length()
    unit = MvExec.for_config(config, max_blocks=64)(addr_bits=ab, line_bytes=D)
    assert unit.combines == 8 and unit.pipelines == 8 and unit.slices == 2
    sg = slice_geometry(config)
    env = {"MV_D": str(D), "MV_AB": str(ab), "MV_N": "24", "MV_L": str(unit.pipelines),
           "MV_P": str(unit.slices), "MV_S": str(sg["stripe"]), "MV_WB": str(g["weight_base"]),
           "MV_NB": "64", "MV_BAB": str(sg["bank_addr_bits"]), "MV_REPORT": "mv_combines.txt"}
    bdir = _run(unit, env)
    report = (bdir / "mv_combines.txt").read_text()
    print(report)
    k129 = int(re.search(r"129 rows x 64 cols: (\d+) cycles", report).group(1))
    assert k129 < 129 + 35, report
    _run(unit, env | {"MV_N": "40"}, module="cocotb_mv_exec", testcase="mv_random")


def test_mv_exec_combines_refused():
    """More combines than output lanes, or than a line's words: a one-line error."""
    import gc
    import warnings

    from llmfab.hw.mv_exec import MvExec
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # the refused units are never elaborated
        with pytest.raises(ValueError, match=r"^MvExec row combines must be a power of two, at "
                                             r"most the 4 output lanes and 16 words of a line, "
                                             r"not 8$"):
            MvExec(addr_bits=14, line_bytes=64, count=4, combines=8)
        with pytest.raises(ValueError, match=r"^MvExec row combines must be a power of two, at "
                                             r"most the 8 output lanes and 4 words of a line, "
                                             r"not 8$"):
            MvExec(addr_bits=14, line_bytes=16, count=8, combines=8)
        gc.collect()
