"""Benchmark: the analytical performance model's projections, with roofline plots.

    .venv/bin/python benchmarks/perf_model.py [--write-docs] [--configs ci,u280,...] [--no-projection]

For SmolLM2-135M (Q4_1, the real GGUF) and a LLaMA2-7B-shaped model (Q4_0, shape
only) on each named configuration: cycles per decode token, tokens/s, HBM
utilization against the ports' peak and against the memory's sustainable peak,
bound; once with the card-like memory model (loads charged at what the board's
memory sustains, boards/memory_timing.py) and once with the ideal one. Plots go
to docs/img/roofline_<config>.png.

Then the projection for LLaMA2-7B-shaped models (Q4_0 and Q4_1) on ``u280`` at
positions 128, 1024 and 2048 (card-like memory): cycles per token split into loads,
MV/MM and MISC work (ATTN alone), tokens/s, HBM utilization and what bounds the step;
plot docs/img/perf_projection_u280.png.

And the prefill projection (``--prefill-prompts 128,512 --prefill-lanes 1,2,4``): a
LLaMA2-7B-shaped Q4_0 prompt through the bundle's prefill programs, greedily bucketed as the
backends run it, each run costed by the model at its start position (``estimate(...,
program=T)``), for ``chain.tokens`` = each lane count (the configuration otherwise as it is,
fit-checked): prefill tokens/s, time to first token, and the MV/MM vs MISC split; plot
docs/img/prefill_projection_u280.png. The runs before a prompt's last are costed through
the KV-only programs, as ``generate`` runs them. ``--prefill-only`` makes just this part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings

from llmfab.boards.config import load_config
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.core.errors import FitError
from llmfab.sim.perf import estimate, roofline_plot

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from compile_decode import LLAMA2_7B, shape_model  # noqa: E402

IMG = os.path.join(HERE, "..", "docs", "img")
DOCS = os.path.join(HERE, "..", "docs", "benchmarks.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--configs", default="ci,u280,u55c,u250,v80")
    ap.add_argument("--no-projection", action="store_true", help="skip the LLaMA2-7B u280 projection")
    ap.add_argument("--projection-config", default="u280")
    ap.add_argument("--positions", default="128,1024,2048")
    ap.add_argument("--prefill-prompts", default="128,512",
                    help="prompt lengths of the prefill projection ('' to skip it)")
    ap.add_argument("--prefill-lanes", default="1,2,4", help="chain.tokens values of the prefill projection")
    ap.add_argument("--prefill-only", action="store_true",
                    help="only the prefill projection (its table and plot)")
    args = ap.parse_args(argv)
    os.makedirs(IMG, exist_ok=True)
    if args.prefill_only:
        _prefill_block(args)
        return 0
    smol = load_model()
    big = shape_model(LLAMA2_7B, "q4_0")
    rows = []
    for name in args.configs.split(","):
        cfg = load_config(name)
        pts = []
        for model, ctx in ((smol, None), (big, min(4096, cfg.context))):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    b = compile_model(model, cfg, context=ctx, emit_image=False, prefill=False)
            except Exception as e:  # noqa: BLE001 - a model that does not fit is a row too
                r = {"config": name, "model": model.desc.name, "error": str(e)}
                rows.append(r)
                print(json.dumps(r))
                continue
            for memory in ("card", "ideal"):
                est = estimate(b, cfg, memory=memory)
                r = {"config": name, "model": model.desc.name, "context": b.manifest["context"],
                     **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in est.to_dict().items()}}
                rows.append(r)
                print(json.dumps(r))
                if memory == "card":
                    e = est
            pts.append((model.desc.name.split()[0], e.macs / max(e.weight_bytes + e.kv_bytes, 1),
                        e.macs / e.cycles))
        roofline_plot(pts, cfg, os.path.join(IMG, f"roofline_{name}.png"))
    table = ["| config | model | position | memory model | B/cycle charged | cycles/token | tokens/s | "
             "HBM utilization (min(ports, memory) peak) | (sustainable peak) | bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['config']} | {r['model']} | - | - | - | - | does not fit: {r['error'][:80]}... "
                         f"| - | - | - |")
        else:
            table.append(f"| {r['config']} | {r['model']} | {r['pos']} | {r['memory_model']} | {r['bytes_per_cycle']:.1f} | "
                         f"{r['cycles']} | {r['tokens_per_s']:.1f} | {r['hbm_utilization']:.2f} | "
                         f"{r['hbm_utilization_sustainable']:.2f} | {r['bound']} |")
    md = "\n".join(table)
    print(md)
    if args.write_docs:
        _write(md, "perf_model")
    if not args.no_projection:
        md = projection(load_config(args.projection_config), [int(p) for p in args.positions.split(",")])
        print(md)
        if args.write_docs:
            _write(md, "perf_projection")
        if args.prefill_prompts:
            _prefill_block(args)
    return 0


def _prefill_block(args):
    """The prefill projection of the command line's prompts and lanes: printed, and with
    ``--write-docs`` put in docs/benchmarks.md."""
    md = prefill_projection(load_config(args.projection_config),
                            [int(p) for p in args.prefill_prompts.split(",")],
                            [int(x) for x in args.prefill_lanes.split(",")])
    print(md)
    if args.write_docs:
        _write(md, "prefill_projection")


def prefill_projection(cfg, prompts, lanes):
    """LLaMA2-7B-shaped Q4_0 prompts of ``prompts`` tokens through the prefill programs on
    ``cfg`` as ``generate`` runs them (the runs before the last through the KV-only programs)
    with ``chain.tokens`` = each of ``lanes``, attention in the SFU and on the chains
    (``attention: chains``; runs start at multiples of min(T, 32) there): a Markdown table and
    a plot."""
    from rtl_prefill import with_lanes

    from llmfab.compiler.bundle import prefill_program
    from llmfab.host.runtime import prompt_plan
    model = shape_model(LLAMA2_7B, "q4_0")
    rows = []
    unfit = []
    for engine in ("sfu", "chains"):
        for n_lanes in lanes:
            try:
                c = with_lanes(dataclasses.replace(cfg, attention=engine), n_lanes)
            except FitError as e:
                u = f"{n_lanes} token lanes do not fit: {str(e).split(': ', 1)[-1]}"
                if u not in unfit:
                    unfit.append(u)
                    print(u)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b = compile_model(model, c, context=min(4096, c.context), emit_image=False)
            buckets = b.manifest["prefill"]["buckets"]
            for n in prompts:
                pos, parts = 0, []
                for T, logits in prompt_plan(n, buckets, 0, b.prefill_align, b.prefill_kv, last=True,
                                             last_only=b.prefill_last):
                    prog = None if T == 1 else prefill_program(T, logits)
                    parts.append(estimate(b, c, pos=pos, memory="card", program=prog))
                    pos += T
                cycles = sum(e.cycles for e in parts)
                secs = cycles / (c.clock_mhz * 1e6)
                r = {"config": cfg.name, "attention": engine, "lanes": n_lanes, "dsp": c.dsp_total,
                     "prompt": n, "buckets": buckets, "runs": len(parts), "cycles": cycles,
                     "mv_cycles": sum(e.mv_cycles for e in parts),
                     "sfu_cycles": sum(e.sfu_cycles for e in parts),
                     "attn_cycles": sum(_attn_misc({"misc_by_op": e.misc_by_op}) for e in parts),
                     "tokens_per_s": n / secs, "ttft_s": secs}
                rows.append(r)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    table = [f"LLaMA2-7B-shaped (Q4_0) prompts on `{cfg.name}` through its prefill programs "
             f"(buckets {rows[0]['buckets']}, the runs before the last KV-only, card-like memory), "
             "per attention engine and "
             "token-lane count (`chain.tokens`):", "",
             "| attention | token lanes | DSPs | prompt | runs | cycles | MV/MM | MISC (of which attention's) | "
             "prefill tokens/s | time to first token |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['attention']} | {r['lanes']} | {r['dsp']:,} | {r['prompt']} | {r['runs']} | "
                     f"{r['cycles'] / 1e6:.1f} M | {r['mv_cycles'] / 1e6:.1f} M | {r['sfu_cycles'] / 1e6:.1f} M "
                     f"({r['attn_cycles'] / 1e6:.1f} M) | {r['tokens_per_s']:.1f} | {r['ttft_s']:.2f} s |")
    table += [""] + [f"* {u}." for u in unfit]
    _prefill_plot(rows, cfg, os.path.join(IMG, f"prefill_projection_{cfg.name}.png"))
    return "\n".join(table)


def _prefill_plot(rows, cfg, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for engine, style in (("sfu", "o--"), ("chains", "o-")):
        for n in sorted({r["prompt"] for r in rows}):
            rs = [r for r in rows if r["prompt"] == n and r["attention"] == engine]
            if rs:
                ax.plot([r["lanes"] for r in rs], [r["ttft_s"] for r in rs], style,
                        label=f"{n}-token prompt, attention {'on the chains' if engine == 'chains' else 'in the SFU'}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["lanes"] for r in rows}), [str(x) for x in sorted({r["lanes"] for r in rows})])
    ax.set_xlabel("token lanes (chain.tokens)")
    ax.set_ylabel("time to first token (s)")
    ax.set_yscale("log")
    ax.set_title(f"LLaMA2-7B-shaped Q4_0 prefill on {cfg.name} (sim/perf.py)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(md, marker):
    doc = open(DOCS).read()
    a, b_ = f"<!-- BEGIN {marker} -->", f"<!-- END {marker} -->"
    if a not in doc:
        doc += f"\n{a}\n{b_}\n"
    i, j = doc.index(a) + len(a), doc.index(b_)
    doc = doc[:i] + "\n" + md + "\n" + doc[j:]
    open(DOCS, "w").write(doc)


#: the issue-11 goal for LLaMA2-7B Q4_0-class weights on the U280 (tokens/s)
GOAL_TOKENS_PER_S = 110


def projection(cfg, positions):
    """LLaMA2-7B-shaped, Q4_0 and Q4_1, on ``cfg`` at ``positions``, with attention in the SFU
    and on the chains (``attention: chains``, docs/isa.md): a Markdown table and a plot."""
    rows = []
    for engine in ("sfu", "chains"):
        c = dataclasses.replace(cfg, attention=engine)
        for fmt in ("q4_0", "q4_1"):
            model = shape_model(LLAMA2_7B, fmt)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b = compile_model(model, c, context=min(4096, c.context), emit_image=False, prefill=False)
            for pos in positions:
                e = estimate(b, c, pos=pos, memory="card")
                # the memory-only bound: the step's bytes at the rate the loads were charged
                mem_only = (e.weight_bytes + e.kv_bytes) / e.bytes_per_cycle
                r = {"config": cfg.name, "attention": engine, "format": fmt, "pos": pos, **e.to_dict(),
                     "memory_only_tokens_per_s": cfg.clock_mhz * 1e6 / mem_only}
                rows.append(r)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    table = [f"LLaMA2-7B-shaped on `{cfg.name}` ({cfg.clock_mhz:g} MHz, {cfg.chain.count} x "
             f"{cfg.chain.length} chains, SFU {rows[0]['sfu_lanes']} lanes), card-like memory "
             f"({rows[0]['bytes_per_cycle']:.0f} B/cycle charged of {rows[0]['peak_bytes_per_cycle']:.0f}):", "",
             "| attention | weights | position | cycles/token | loads | MV/MM | MISC (of which attention) | "
             "tokens/s | HBM utilization (peak) | (sustainable) | bound | memory-only tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(
            f"| {r['attention']} | {r['format'].upper()} | {r['pos']} | {r['cycles'] / 1e6:.2f} M | "
            f"{r['load_cycles'] / 1e6:.2f} M | {r['mv_cycles'] / 1e6:.2f} M | {r['sfu_cycles'] / 1e6:.2f} M "
            f"({_attn_misc(r) / 1e6:.2f} M) | {r['tokens_per_s']:.1f} | {r['hbm_utilization']:.3f} | "
            f"{r['hbm_utilization_sustainable']:.3f} | {r['bound']} | {r['memory_only_tokens_per_s']:.0f} |")
    _projection_plot(rows, cfg, os.path.join(IMG, f"perf_projection_{cfg.name}.png"))
    first = next(r for r in rows if r["attention"] == "chains" and r["format"] == "q4_0")
    return "\n".join(table) + "\n\n" + mv_breakdown(first)


def mv_breakdown(r) -> str:
    """Where the MV unit's cycles go in one projected step (``r``: a projection row): per MV/MM
    shape, the instructions, their cycles, the cycles their MACs take at the chains' full rate
    and the ratio (the chains' efficiency on that shape), beside the step's loads."""
    out = [f"The MV unit in that step (attention on the chains, {r['format'].upper()}, position "
           f"{r['pos']}): {r['mv_cycles'] / 1e6:.2f} M cycles against {r['load_cycles'] / 1e6:.2f} M "
           f"of loads, by MV shape (`PerfEstimate.mv_by_shape`):", "",
           "| MV shape (rows x cols, weights) | instructions | cycles | at the chains' full rate | efficiency |",
           "|---|---|---|---|---|"]
    for shape, (n, cyc, ideal) in sorted(r["mv_by_shape"].items(), key=lambda kv: -kv[1][1]):
        out.append(f"| {shape} | {n:,} | {cyc:,} | {ideal:,} | {ideal / cyc:.2f} |")
    n, cyc, ideal = (sum(v[i] for v in r["mv_by_shape"].values()) for i in range(3))
    out.append(f"| all | {n:,} | {cyc:,} | {ideal:,} | {ideal / cyc:.2f} |")
    return "\n".join(out)


#: MISC operations that are attention's: the SFU's ATTN, or on the chains its SFU parts
ATTN_MISC = ("ATTN", "KVROW", "SOFTMAX")


def _attn_misc(r) -> float:
    return sum(r["misc_by_op"].get(k, 0) for k in ATTN_MISC)


def _projection_plot(rows, cfg, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {("sfu", "q4_0"): "o:", ("sfu", "q4_1"): "s:", ("chains", "q4_0"): "o-", ("chains", "q4_1"): "s-"}
    for (engine, fmt), style in styles.items():
        rs = [r for r in rows if r["format"] == fmt and r["attention"] == engine]
        a1.plot([r["pos"] for r in rs], [r["tokens_per_s"] for r in rs], style,
                label=f"{fmt.upper()}, attention {'on the chains' if engine == 'chains' else 'in the SFU'}")
    rs = [r for r in rows if r["format"] == "q4_0" and r["attention"] == "chains"]
    a1.plot([r["pos"] for r in rs], [r["memory_only_tokens_per_s"] for r in rs], "k--", alpha=0.4,
            label="Q4_0 memory-only (chains)")
    a1.axhline(GOAL_TOKENS_PER_S, color="grey", ls=":", lw=1, label=f"goal {GOAL_TOKENS_PER_S} tok/s")
    a1.set_yscale("log")
    a1.set_xlabel("position")
    a1.set_ylabel("tokens/s")
    a1.legend(fontsize=7)
    a1.grid(True, which="both", alpha=0.3)
    labels, loads, mv, attn, other = [], [], [], [], []
    for engine in ("sfu", "chains"):
        for r in (r for r in rows if r["format"] == "q4_0" and r["attention"] == engine):
            labels.append(f"{engine}\n{r['pos']}")
            loads.append(r["load_cycles"] / 1e6)
            mv.append(r["mv_cycles"] / 1e6)
            attn.append(_attn_misc(r) / 1e6)
            other.append((r["sfu_cycles"] - _attn_misc(r)) / 1e6)
    x = range(len(labels))
    a2.bar([i - 0.2 for i in x], loads, 0.4, label="loads (LD queue)")
    a2.bar([i + 0.2 for i in x], mv, 0.4, label="MV/MM (attention's included on the chains)")
    a2.bar([i + 0.2 for i in x], other, 0.4, bottom=mv, label="other MISC")
    a2.bar([i + 0.2 for i in x], attn, 0.4, bottom=[a + b for a, b in zip(mv, other)],
           label="attention's MISC (ATTN; KVROW, SOFTMAX)")
    a2.set_xticks(list(x), labels, fontsize=7)
    a2.set_xlabel("attention, position (Q4_0)")
    a2.set_ylabel("M cycles per token")
    a2.set_yscale("log")
    a2.legend(fontsize=7)
    a2.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"LLaMA2-7B-shaped on {cfg.name}: analytical model (sim/perf.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
