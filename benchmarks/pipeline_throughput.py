"""Benchmark: requests in flight through golden pipeline stages on Ray.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline_throughput.py \
        [--stages 2] [--requests 4] [--tokens 16] [--plot docs/img/pipeline_throughput.png]

SmolLM2-135M (Q4_1) compiled for ``ci`` into ``--stages`` stages, each a Ray actor
on the golden backend. It measures the total decode tokens/s of one request alone,
then of ``--requests`` requests in flight (each its own prompt and KV caches), and
prints the ratio. With S stages the ratio is bounded by S (each stage runs one
request's step while the others run other requests') and, on a shared machine, by
the CPU the stage processes actually get (the load average is printed with the result).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--plot", default=None, help="PNG: tokens/s against requests in flight")
    args = ap.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    from llmfab.boards.config import load_config
    from llmfab.compiler.model import load_model
    from llmfab.host.pipeline import Pipeline
    from tqdm import tqdm

    model, cfg = load_model(None), load_config("ci")
    prompts = [[1, 504, 3458, 282, 4649], [1, 42, 7], [2, 3, 4, 5, 6, 7], [9, 10], [11, 12, 13],
               [1, 2], [5, 6, 7, 8], [100]]
    prompts = (prompts * (args.requests // len(prompts) + 1))[:max(args.requests, 1)]
    with Pipeline.from_model(model, cfg, args.stages, progress=True, timeout=600) as pipe:
        pipe.generate(prompts[0], 2)                     # warm up: workers, first-run plans
        rows = []
        for n in sorted({1, args.requests}):
            bar = tqdm(total=n * args.tokens, desc=f"{n} in flight", unit="tok", disable=None)
            t = time.perf_counter()
            res = pipe.generate_many(prompts[:n], args.tokens, progress=lambda i, tok: bar.update(1))
            dt = time.perf_counter() - t
            bar.close()
            toks = sum(len(r.tokens) for r in res)
            rows.append({"requests": n, "tokens": toks, "seconds": round(dt, 2),
                         "tokens_per_s": round(toks / dt, 3)})
        stats = pipe.stats()
    ratio = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(json.dumps({"stages": args.stages, "runs": rows, "stage_busy_s": [s["busy_s"] for s in stats],
                      "ratio": round(ratio, 3), "load_average": round(os.getloadavg()[0], 2)}))
    print(f"{args.requests} requests in flight / 1 request: {ratio:.2f}x total tokens/s "
          f"({rows[-1]['tokens_per_s']:.2f} vs {rows[0]['tokens_per_s']:.2f})")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar([str(r["requests"]) for r in rows], [r["tokens_per_s"] for r in rows])
        ax.set_xlabel("requests in flight")
        ax.set_ylabel("total decode tokens/s")
        ax.set_title(f"SmolLM2 over {args.stages} golden stages on Ray: {ratio:.2f}x", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
