"""Benchmark: decode- and prefill-program sizes, compile time, golden decode and prefill speed.

    .venv/bin/python benchmarks/compile_decode.py [--tokens 32] [--prefill-tokens 64] [--write-docs]

Prints one JSON object per measurement and Markdown tables; --write-docs also
updates the tables in docs/benchmarks.md (between the BEGIN/END markers
``compile_decode`` and, when present, ``prefill``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from llmfab.boards.config import load_config
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.compiler.shapes import SHAPES, shape_model

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(HERE, "..", "docs", "benchmarks.md")


LLAMA2_7B = SHAPES["llama2-7b"]


def bench_compile(model, cfg_name, context=None, emit_image=True):
    cfg = load_config(cfg_name)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = compile_model(model, cfg, context=context, emit_image=emit_image)
    dt = time.perf_counter() - t
    st = b.manifest["stats"]
    pre = b.manifest["prefill"]
    return b, {"model": model.desc.name, "config": cfg_name, "context": b.manifest["context"],
               "decode_programs": 1, "program_bytes": len(b.program),
               "instructions": sum(st["instructions"].values()),
               "instruction_mix": st["instructions"], "weight_bytes_per_token": st["weight_bytes_per_token"],
               "prefill_buckets": pre["buckets"],
               "prefill_program_bytes": {str(t): len(p) for t, p in sorted(b.prefill.items())},
               "prefill_note": pre["note"],
               "per_token_activation_bytes": pre["per_token_activation_bytes"],
               "compile_seconds": round(dt, 2)}


def bench_golden(bundle, model, n_tokens):
    from llmfab.host.golden_backend import GoldenDevice
    cfg = load_config(bundle.manifest["config_name"])
    dev = GoldenDevice(model, cfg, bundle=bundle)
    t = time.perf_counter()
    dev.forward([504])                 # first step also unpacks the weights
    first = time.perf_counter() - t
    dev.reset()
    toks = [504, 3575, 282, 4649, 314]
    toks = (toks * (n_tokens // len(toks) + 1))[:n_tokens]
    t = time.perf_counter()
    dev.forward(toks)
    dt = time.perf_counter() - t
    return {"golden_tokens": n_tokens, "golden_seconds": round(dt, 2),
            "golden_tokens_per_s": round(n_tokens / dt, 2), "golden_first_step_s": round(first, 2)}


def bench_prefill(bundle, model, n_tokens):
    """Golden speed over an n-token prompt: greedy prefill buckets vs the decode program
    token by token (same logits bits, checked)."""
    from llmfab.host.golden_backend import GoldenDevice
    from llmfab.host.runtime import split_buckets
    cfg = load_config(bundle.manifest["config_name"])
    toks = [504, 3575, 282, 4649, 314, 7042, 28, 9]
    toks = (toks * (n_tokens // len(toks) + 1))[:n_tokens]
    out = {"prefill_tokens": n_tokens, "prefill_runs": split_buckets(n_tokens, bundle.manifest["prefill"]["buckets"])}
    res = {}
    for name, use in (("decode", False), ("prefill", True)):
        dev = GoldenDevice(model, cfg, bundle=bundle, prefill=use)
        dev.forward(toks[:max(dev.buckets, default=1)])      # first runs unpack weights, build plans
        dev.reset()
        t = time.perf_counter()
        res[name] = dev.forward(toks)
        dt = time.perf_counter() - t
        out[f"golden_{name}_tokens_per_s"] = round(n_tokens / dt, 2)
    out["bit_identical"] = bool(np.array_equal(res["decode"].view(np.uint32), res["prefill"].view(np.uint32)))
    out["prefill_speedup"] = round(out["golden_prefill_tokens_per_s"] / out["golden_decode_tokens_per_s"], 2)
    return out


def _kib(n):
    return f"{n / 1024:.0f} KiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=64)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    smol = load_model()
    b, r = bench_compile(smol, "ci")
    r.update(bench_golden(b, smol, args.tokens))
    r.update(bench_prefill(b, smol, args.prefill_tokens))
    rows.append(r)
    print(json.dumps(r))
    b, r = bench_compile(smol, "u280")
    r.update(bench_prefill(b, smol, args.prefill_tokens))
    del b
    rows.append(r)
    print(json.dumps(r))
    _, r = bench_compile(shape_model(LLAMA2_7B, "q4_0"), "u280", context=4096, emit_image=False)
    r["note"] = "shape only (instruction stream and layout; weights not materialized)"
    rows.append(r)
    print(json.dumps(r))
    _, r = bench_compile(shape_model(LLAMA2_7B, "q4_0"), "u280", context=4096, emit_image=True)
    r["note"] = "zero weights materialized into the HBM image"
    rows.append(r)
    print(json.dumps(r))
    table = ["| model | config | context | decode programs | program size | instructions | "
             "compile time | golden decode |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gd = f"{r['golden_tokens_per_s']} tok/s" if "golden_tokens_per_s" in r else "-"
        note = " (stream only)" if not r.get("golden_tokens_per_s") and "shape only" in r.get("note", "") else ""
        table.append(f"| {r['model']} | {r['config']} | {r['context']} | 1 | "
                     f"{r['program_bytes'] / 1024:.0f} KiB | {r['instructions']} | "
                     f"{r['compile_seconds']} s{note} | {gd} |")
    md = "\n".join(table)
    print(md)
    ptable = ["| model | config | per-token activations | prefill buckets | prefill program sizes | "
              "golden prompt speed: decode program | prefill buckets | speedup |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "zero weights" in r.get("note", ""):
            continue                     # the same program as the stream-only row above
        sizes = ", ".join(f"{t}: {_kib(n)}" for t, n in r["prefill_program_bytes"].items()) or "-"
        if "prefill_speedup" in r:
            sp = (f"{r['golden_decode_tokens_per_s']} tok/s | {r['golden_prefill_tokens_per_s']} tok/s "
                  f"({'+'.join(map(str, r['prefill_runs'][:3]))}{'...' if len(r['prefill_runs']) > 3 else ''}) | "
                  f"{r['prefill_speedup']}x{'' if r['bit_identical'] else ' NOT BIT-IDENTICAL'}")
        else:
            sp = "- | - | -"
        ptable.append(f"| {r['model']} | {r['config']} | {_kib(r['per_token_activation_bytes'])} | "
                      f"{', '.join(map(str, r['prefill_buckets'])) or 'none'} | {sizes} | {sp} |")
    pmd = "\n".join(ptable)
    print(pmd)
    if args.write_docs:
        with open(DOCS) as fh:
            doc = fh.read()
        for key, text in (("compile_decode", md), ("prefill", pmd)):
            a, b_ = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
            if a not in doc:
                print(f"docs/benchmarks.md has no {key} markers; table not written")
                continue
            i, j = doc.index(a) + len(a), doc.index(b_)
            doc = doc[:i] + "\n" + text + "\n" + doc[j:]
        with open(DOCS, "w") as fh:
            fh.write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
