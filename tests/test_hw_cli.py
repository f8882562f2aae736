"""`llmfab hw verilog` / `llmfab hw estimate` (hw/cli.py, hw/estimate.py).

Synthesis of every unit takes about 5 minutes cold (the SFU alone over 2), so the
default suite synthesizes the chain and the decoder of the small `tiny` configuration
through the real CLI (under a minute cold, instant when cached under sim_build/);
the whole `ci` estimate is marked slow.
"""

import json
import re

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from llmfab.boards.config import load_config
from llmfab.host.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def test_hw_verilog_writes_the_accelerator_top(tmp_path, capsys):
    """The default output is the whole accelerator, with the real execution unit: the MV/MM
    engine and the SFU unit are modules of the top (not MiscExec's placeholder alone)."""
    out = tmp_path / "v"
    assert main(["hw", "verilog", "--config", "tiny", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(out / "llmfab_accel.v")]
    assert "top module llmfab_accel" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["llmfab_accel.v"]
    text = (out / "llmfab_accel.v").read_text()
    assert "module llmfab_accel(" in text
    modules = set(re.findall(r"^module \\?(\S+) ?\(", text, re.M))
    for unit in ("exec", "exec.mv", "exec.sfu", "exec.misc"):
        assert f"llmfab_accel.core.{unit}" in modules, unit
    # the engines inside them: the MV unit's slices (one module, hw/mv_exec.py's MvSlice,
    # instantiated per slice) with their DSP chains and GGUF decoders (modules written once)
    assert any(m.startswith("llmfab_accel.core.exec.mv.slice") for m in modules)
    for kind in ("mvslice", "chain", "decoder"):
        assert any(re.fullmatch(rf"llmfab_{kind}_[0-9a-f]{{12}}", m) for m in modules), kind


class _Stub(wiring.Component):
    o: Out(1)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.o.eq(~self.o)
        return m


def test_hw_verilog_units(tmp_path, capsys, monkeypatch, own_units):
    """``--units`` adds one file per unit, each its own top (the accelerator is stubbed here:
    the test above checks it)."""
    import llmfab.hw.top as top
    monkeypatch.setattr(top, "Accelerator", lambda config: _Stub())
    out = tmp_path / "v"
    assert main(["hw", "verilog", "--config", "tiny", "--out", str(out), "--units"]) == 0
    names = ["llmfab_accel", "chain", "decoder"]
    for name in names:
        assert f"module {name}(" in (out / f"{name}.v").read_text()
    assert capsys.readouterr().out.split() == [str(out / f"{n}.v") for n in names]


def test_hw_verilog_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "x"
    f.write_text("")
    assert main(["hw", "verilog", "--config", "tiny", "--out", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmfab: error: cannot write Verilog to") and err.count("\n") == 1


def test_hw_unknown_config(capsys):
    assert main(["hw", "estimate", "--config", "no-such-config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmfab: error:") and "no-such-config" in err and err.count("\n") == 1


@pytest.fixture
def own_units(monkeypatch):
    """Limit the registry to the chain and the decoder (the units this file checks)."""
    import llmfab.hw.units as reg
    from llmfab.hw import chain, decoder
    monkeypatch.setattr(reg, "all_units",
                        lambda config: {**chain.units(config), **decoder.units(config)})


def test_hw_estimate_json_chain_on_dsp(own_units, capsys):
    """The JSON object of `llmfab hw estimate --json` on `tiny`: the chain's multipliers are
    DSP48E2 slices (none left to LUTs) and it does two int4 x int8 MACs per DSP."""
    cfg = load_config("tiny")
    assert main(["hw", "estimate", "--config", "tiny", "--units", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert set(result) == {"chain", "decoder", "macs_per_dsp"}
    for unit in ("chain", "decoder"):
        assert {"DSP48E2", "LUT", "FF", "BRAM", "URAM"} <= set(result[unit])
    chain = result["chain"]
    assert chain["DSP48E2"] == cfg.mac_dsp_per_chain == 16
    assert chain["soft_mul"] == 0
    assert result["macs_per_dsp"] >= 1.9
    assert result["decoder"]["DSP48E2"] == 0 and result["decoder"]["soft_mul"] == 0


def test_chain_cells_have_no_fabric_multiplier(own_units):
    """The synthesized chain's cell types: DSP48E2 for every product, no $mul / soft multiplier."""
    from llmfab.hw import chain
    from llmfab.hw.estimate import estimate
    cfg = load_config("tiny")
    res = estimate(cfg, units=chain.units(cfg), progress=False, cells=True)
    cells = res["chain"]["cells"]
    assert cells["DSP48E2"] == 16
    # no generic or soft multiplier left ($mul, $__soft_mul, $__MUL27X18, ...): every product
    # is a DSP48E2; the only generic cell is flatten's $scopeinfo bookkeeping
    assert not [c for c in cells if "mul" in c.lower()], cells
    assert not [c for c in cells if c.startswith("$") and c != "$scopeinfo"], cells
    again = estimate(cfg, units=chain.units(cfg), progress=False)
    assert again["chain"]["cached"] and again["chain"]["DSP48E2"] == 16


def test_hw_estimate_table(own_units, capsys):
    assert main(["hw", "estimate", "--config", "tiny", "--units"]) == 0
    out = capsys.readouterr().out
    assert "| chain | 16 |" in out and "| chain x 2 | 32 |" in out and "macs_per_dsp" in out


def test_summarize_stat_counts():
    from llmfab.hw.estimate import summarize_stat
    stat = {"design": {"num_cells_by_type": {
        "DSP48E2": 3, "LUT2": 5, "LUT6": 7, "RAM32M16": 2, "SRL16E": 1, "FDRE": 10, "FDSE": 1,
        "RAMB36E2": 1, "RAMB18E2": 1, "URAM288": 2, "CARRY8": 4}}}
    mul = {"design": {"num_cells_by_type": {"$__soft_mul": 1, "$mul": 1}}}
    r = summarize_stat(stat, mul)
    assert (r["DSP48E2"], r["LUT"], r["FF"], r["BRAM"], r["URAM"]) == (3, 12 + 17, 11, 1.5, 2)
    assert r["LUTRAM"] == 17 and r["soft_mul"] == 2 and r["CARRY"] == 4


def test_yosys_failure_is_one_line(monkeypatch, tmp_path):
    from llmfab.core.errors import SimError
    from llmfab.hw import estimate as est
    monkeypatch.setenv("LLMFAB_SIM_BUILD", str(tmp_path))
    with pytest.raises(SimError, match=r"yosys synth_xilinx failed for unit 'broken' .*yosys.log"):
        est.synthesize("module broken(; endmodule\n", "broken")


@pytest.mark.slow
def test_hw_estimate_ci_all_units(capsys):
    """Every unit of `ci` (about 5 minutes cold)."""
    from llmfab.hw.units import all_units
    assert main(["hw", "estimate", "--config", "ci", "--units", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == set(all_units(load_config("ci"))) | {"macs_per_dsp"}
    assert result["chain"]["DSP48E2"] == 16 and result["chain"]["soft_mul"] == 0


class _Add(wiring.Component):
    """A registered adder (a replicated unit of the design below)."""

    def __init__(self, width):
        self._w = width
        super().__init__({"a": wiring.In(width), "b": wiring.In(width), "o": Out(width)})

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.o.eq(self.a + self.b)
        return m


class _Design(wiring.Component):
    """Three equal 8-bit adders, one 16-bit adder, a register: two units and a shared rest."""
    a: wiring.In(16)
    b: wiring.In(64)
    o: Out(16)

    def elaborate(self, platform):
        m = Module()
        acc = self.a
        for i, w in enumerate((8, 8, 16, 8)):
            u = _Add(w)
            m.submodules[f"add{i}"] = u
            m.d.comb += [u.a.eq(acc), u.b.eq(self.b[16 * i:16 * i + w])]
            acc = u.o
        m.d.sync += self.o.eq(acc)
        return m


def test_estimate_design_units_counts_and_fit():
    """The whole-design estimate: equal instances are one unit synthesized once and counted
    three times, the rest is shared; totals, logic levels and the board's fit check."""
    from llmfab.core.errors import FitError
    from llmfab.hw.estimate import check_design_fits, design_units, estimate_design
    from llmfab.hw.verilog import to_verilog
    v = to_verilog(_Design(), "top")
    split = design_units(v, "top")
    assert {n: u["count"] for n, u in split["units"].items()} == {"addN": 3}
    assert "module \\top.add2" in split["shared"]["text"]         # the 16-bit one is shared
    cfg = load_config("tiny")
    res = estimate_design(cfg, verilog=v, top="top", progress=False)
    unit = res["units"]["addN"]
    assert unit["count"] == 3 and unit["DSP48E2"] == 0 and unit["FF"] == 8
    assert 1 <= unit["logic_levels"] <= 4
    for k in ("LUT", "FF", "DSP48E2", "BRAM", "URAM"):
        assert res["total"][k] == res["shared"][k] + 3 * unit[k], k
    # shared: the top's register and the 16-bit adder, flattened together (only 8 bits of
    # each are ever non-zero or read); a unit is synthesized out of context, all 8 FFs kept
    assert res["shared"]["FF"] == 8 + 8 and res["fits"] and res["over"] == []
    assert res["available"]["LUT"] == cfg.board_spec.available("lut")
    check_design_fits(res)
    res["total"]["LUT"], res["over"] = 10 ** 6, ["LUT"]
    with pytest.raises(FitError, match=r"^config 'tiny' needs 1,000,000 LUT but board 'sim-tiny' "
                                       r"has [\d,]+ \(Yosys synth_xilinx estimate\); use fewer "
                                       r"or smaller slices$"):
        check_design_fits(res)


def test_u280_mv_exec_is_32_slice_instances_of_one_module():
    """u280's MV/MM unit (32 slices x 4 row pipelines): one slice module, defined once and
    instantiated 32 times, holding the slice's pipelines (seconds to generate, against
    over a minute for the whole accelerator); the estimate's split has it as a
    unit of count 32 and the pipelines' chains, decoders and scalers (written once
    as modules of their own) as units of count 128, each synthesized once."""
    from llmfab.hw.estimate import design_units
    from llmfab.hw.mv_exec import MvExec
    from llmfab.hw.top import geometry
    from llmfab.hw.verilog import to_verilog
    cfg = load_config("u280")
    g = geometry(cfg)
    D = g["line_bytes"]
    ab = (g["onchip_size"] // D - 1).bit_length()
    unit = MvExec.for_config(cfg)(addr_bits=ab, line_bytes=D)
    assert (unit.slices, unit.pipelines) == (32, 128)
    from amaranth.hdl import Signal, Value
    ports = [v for v in (Value.cast(x) for _, _, x in unit.signature.flatten(unit))
             if isinstance(v, Signal)]                  # not rsp.ready (a constant)
    text = to_verilog(unit, "mv_exec", ports=ports)
    defined = re.findall(r"^module (llmfab_mvslice_[0-9a-f]{12})\(", text, re.M)
    assert len(defined) == 1
    assert len(re.findall(rf"^  {defined[0]} unit \(", text, re.M)) == 32
    # the slice module holds four pipelines' chains (u280: one token lane each)
    body = text[text.index(f"module {defined[0]}("):]
    body = body[:body.index("endmodule")]
    assert len(re.findall(r"^  \\\S+\.chain\d+ +chain\d+ \(", body, re.M)) == 4
    # its activation buffers: a RAM copy per two chains (the copies' write port doubles as a
    # read port), so two copies each of q, d and sumq
    assert sorted(re.findall(r"^  reg \[\d+:0\] (\w+) \[", body, re.M)) == [
        "dmem0", "dmem1", "qmem0", "qmem1", "smem0", "smem1"]
    split = design_units(text, "mv_exec")
    counts = {n: u["count"] for n, u in split["units"].items()}
    assert counts["mvslice"] == 32
    assert "realign" not in counts          # the decoder starts at a row's offset
    for kind in ("chain", "decoder", "scaler", "mvslice.wrdN"):
        assert counts[kind] == 128, (kind, counts)
    # MvExec itself (loader, control, result writer) is the small shared rest
    assert len(split["shared"]["text"]) < 1_000_000
    assert "llmfab_mvslice_" in split["shared"]["lib"]
