"""Benchmark: how far prefill's chain MAC utilization can go, by the performance model.

    .venv/bin/python benchmarks/prefill_bounds.py [--prompt 128] [--write-docs]
        [--plot docs/img/prefill_bounds.png]

Issue 13 asks for chain MAC utilization >= 0.85 of peak over prefill. This prices a whole
prompt of ``--prompt`` tokens (through the prefill programs as ``generate`` runs it, as
``rtl_prefill.py`` and ``perf_model.py --prefill-only`` do) with ``sim/perf.py`` as built
and under three what-ifs, each removing one more of what stands between the chains and
their peak:

* **as built**: the model as calibrated on the RTL (docs/benchmarks.md, "The model against
  the RTL" and the prefill tables: within 1.1 % of every prompt measured);
* **SFU lanes unlimited**: every SfuExec instruction at 64 lanes, SILU_MUL too (the SFU's
  throughput no longer a bound; its fixed costs, KVROW's byte a cycle, MiscExec's ADD/MUL/COPY
  kept);
* **MISC free**: every MISC instruction one cycle (the SFU's and MiscExec's work costs
  nothing; MV/MM and the loads as built);
* **MISC free, MV/MM at their MACs**: also each MV/MM at ``rows x cols x ceil(ntok /
  token lanes)`` over the chains' MACs per cycle for its format (no fixed, set-up,
  activation-load or per-row costs, no idle row pipelines); only the loads and the order left.

Utilization: the MACs of the prompt's MV/MM instructions (``rtl_prefill.program_macs``, the
attention's MVs on the chains included) over cycles x ``prefill_macs_per_cycle``, as
``rtl_prefill.py`` measures it on the RTL. The cases: SmolLM2 on ``u280-slice`` (one token
lane, attention on the chains, as on ``u280``), ``ci-chains`` (one and two lanes) and ``ci``
(two lanes, attention in the SFU), ideal memory as on the RTL; LLaMA2-7B-shaped Q4_0 on ``u280``
(attention on the chains, two lanes), card-like memory as in its projection.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import warnings
from contextlib import ExitStack
from unittest import mock

sys.path.insert(0, os.path.dirname(__file__))

from compile_decode import LLAMA2_7B, shape_model  # noqa: E402
from rtl_prefill import GOAL, _macs_of, with_lanes  # noqa: E402

from llmfab.boards.config import load_config  # noqa: E402
from llmfab.compiler import isa  # noqa: E402
from llmfab.compiler.bundle import prefill_program  # noqa: E402
from llmfab.compiler.compile import compile_model  # noqa: E402
from llmfab.compiler.model import load_model  # noqa: E402
from llmfab.host.runtime import prompt_plan  # noqa: E402
from llmfab.hw.sfu_exec import SfuExec  # noqa: E402
from llmfab.sim import perf  # noqa: E402

IMG = os.path.join(os.path.dirname(__file__), "..", "docs", "img")

#: SfuExec lanes that stand for "unlimited" (any SmolLM2 or LLaMA vector in a handful of beats)
MANY_LANES = 64

WHAT_IFS = ("as built", "SFU lanes unlimited", "MISC free", "MISC free, MV/MM at their MACs")


def _mv_at_macs(f, ntok, config, costs=perf.COSTS, *, act_cached=False):
    """An MV/MM at its MACs: rows x cols x token groups over the chains' MACs a cycle."""
    fmt = isa.FMTS[f["func"] & 3]
    groups = -(-max(ntok, 1) // config.chain.tokens)
    return max(1, math.ceil(f["rows"] * f["cols"] * groups / config.format_macs_per_cycle(fmt)))


def patches(what_if: str) -> list:
    """The ``mock.patch`` objects that make ``sim/perf.py`` price ``what_if``."""
    i = WHAT_IFS.index(what_if)
    out = []
    if i == 1:
        out += [mock.patch.object(perf, "sfu_lanes", lambda config: MANY_LANES),
                mock.patch.object(SfuExec, "default_silu_lanes", staticmethod(lambda lanes: lanes))]
    if i >= 2:
        out.append(mock.patch.object(perf, "misc_cycles", lambda *a, **k: 1))
    if i == 3:
        # no set-up wait either (``mv_settle``: a word that arrives at an idle MvExec)
        out += [mock.patch.object(perf, "mv_cycles", _mv_at_macs),
                mock.patch.object(perf, "estimate", functools.partial(perf.estimate,
                                                                      costs=perf.with_costs(mv_settle=0)))]
    return out


def prompt_utilization(bundle, config, n: int, memory: str, what_if: str = "as built") -> dict:
    """Cycles and chain MAC utilization of an ``n``-token prompt by the model under ``what_if``."""
    macs_of = _macs_of(bundle)
    buckets = bundle.manifest["prefill"]["buckets"]
    cycles, macs, pos = 0, 0, 0
    with ExitStack() as stack:
        for p in patches(what_if):
            stack.enter_context(p)
        for T, logits in prompt_plan(n, buckets, 0, bundle.prefill_align, bundle.prefill_kv, last=True,
                                     last_only=bundle.prefill_last):
            prog = None if T == 1 else prefill_program(T, logits)
            cycles += perf.estimate(bundle, config, pos=pos, memory=memory, program=prog).cycles
            macs += macs_of[(T, logits)]
            pos += T
    return {"cycles": int(cycles), "mac_utilization": macs / (cycles * config.prefill_macs_per_cycle),
            "tokens_per_s": n / (cycles / (config.clock_mhz * 1e6))}


def cases():
    """(label, bundle, config, memory) of the cases priced."""
    smol = load_model()
    out = []
    for name, lanes, attention in (("u280-slice", 1, "chains"), ("ci-chains", 1, None), ("ci-chains", 2, None),
                                   ("ci", 2, None)):
        c = with_lanes(load_config(name), lanes, attention)
        label = f"SmolLM2 on {name} ({lanes} lane{'s' if lanes > 1 else ''}, attention {c.attention})"
        out.append((label, compile_model(smol, c, emit_image=False), c, "ideal"))
    c = with_lanes(dataclasses.replace(load_config("u280"), attention="chains"), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = compile_model(shape_model(LLAMA2_7B, "q4_0"), c, context=4096, emit_image=False)
    out.append(("LLaMA2-7B Q4_0 on u280 (2 lanes, attention chains)", b, c, "card"))
    return out


def table(rows, n: int) -> str:
    out = [f"Chain MAC utilization over a {n}-token prompt by the model, as built and with what "
           f"stands between the chains and their peak taken away one part at a time "
           f"(`benchmarks/prefill_bounds.py`; issue 13's goal {GOAL}):", "",
           "| case | " + " | ".join(WHAT_IFS) + " |", "|---|" + "---|" * len(WHAT_IFS)]
    for label in dict.fromkeys(r["case"] for r in rows):
        cells = []
        for w in WHAT_IFS:
            r = next(r for r in rows if r["case"] == label and r["what_if"] == w)
            cells.append(f"{r['mac_utilization']:.3f} ({r['tokens_per_s']:,.0f} tok/s)")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows, path, n: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r["case"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.8 / len(WHAT_IFS)
    for i, wi in enumerate(WHAT_IFS):
        ys = [next(r["mac_utilization"] for r in rows if r["case"] == lb and r["what_if"] == wi) for lb in labels]
        ax.bar([j + i * w for j in range(len(labels))], ys, w, label=wi)
    ax.axhline(GOAL, color="k", ls="--", lw=1, label=f"issue 13's goal ({GOAL})")
    ax.set_xticks([j + w * (len(WHAT_IFS) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels([lb.replace(" (", "\n(").replace(", attention", ",\nattention") for lb in labels],
                       fontsize=7)
    ax.set_ylabel("chain MAC utilization")
    ax.set_ylim(0, 1)
    ax.set_title(f"{n}-token prompt by the model: what bounds the chains")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    ap.add_argument("--write-docs", action="store_true", help="put the table in docs/benchmarks.md")
    ap.add_argument("--plot", help="write a bar chart to this PNG (default with --write-docs: "
                                   "docs/img/prefill_bounds.png)")
    args = ap.parse_args(argv)
    from tqdm import tqdm
    todo = cases()
    rows = []
    with tqdm(total=len(todo) * len(WHAT_IFS), desc="prefill bounds", file=sys.stderr) as bar:
        for label, b, c, memory in todo:
            for w in WHAT_IFS:
                r = {"case": label, "what_if": w, **prompt_utilization(b, c, args.prompt, memory, w)}
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}),
                      flush=True)
                rows.append(r)
                bar.update()
    md = table(rows, args.prompt)
    print(md)
    path = args.plot or (os.path.join(IMG, "prefill_bounds.png") if args.write_docs else None)
    if path:
        plot(rows, path, args.prompt)
    if args.write_docs:
        from perf_model import _write
        _write(md + "\n\n![prefill bounds](img/prefill_bounds.png)", "prefill-bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
