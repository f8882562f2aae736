"""Benchmark: the analytical performance model's projections, with roofline plots.

    .venv/bin/python benchmarks/perf_model.py [--write-docs]

For SmolLM2-135M (Q4_1, the real GGUF) and a LLaMA2-7B-shaped model (Q4_0, shape
only) on each named configuration: cycles per decode token, tokens/s, HBM
utilization against the ports' peak and against the memory's sustainable peak,
bound; once with the card-like memory model (loads charged at what the board's
memory sustains, boards/memory_timing.py) and once with the ideal one. Plots go
to docs/img/roofline_<config>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from llmfab.boards.config import load_config
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
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
    args = ap.parse_args(argv)
    os.makedirs(IMG, exist_ok=True)
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
                    b = compile_model(model, cfg, context=ctx, emit_image=False)
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
    table = ["| config | model | memory model | B/cycle charged | cycles/token | tokens/s | "
             "HBM utilization (ports' peak) | (sustainable peak) | bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['config']} | {r['model']} | - | - | - | does not fit: {r['error'][:80]}... "
                         f"| - | - | - |")
        else:
            table.append(f"| {r['config']} | {r['model']} | {r['memory_model']} | {r['bytes_per_cycle']:.1f} | "
                         f"{r['cycles']} | {r['tokens_per_s']:.1f} | {r['hbm_utilization']:.2f} | "
                         f"{r['hbm_utilization_sustainable']:.2f} | {r['bound']} |")
    md = "\n".join(table)
    print(md)
    if args.write_docs:
        doc = open(DOCS).read()
        a, b_ = "<!-- BEGIN perf_model -->", "<!-- END perf_model -->"
        if a not in doc:
            doc += f"\n## Performance model (analytical)\n\n`.venv/bin/python benchmarks/perf_model.py --write-docs`\n\n{a}\n{b_}\n"
        i, j = doc.index(a) + len(a), doc.index(b_)
        doc = doc[:i] + "\n" + md + "\n" + doc[j:]
        open(DOCS, "w").write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
