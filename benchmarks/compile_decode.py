"""Benchmark: decode-program size, compile time and golden decode speed.

    .venv/bin/python benchmarks/compile_decode.py [--tokens 32] [--write-docs]

Prints one JSON object per measurement and a Markdown table; --write-docs also
updates the table in docs/benchmarks.md (between the BEGIN/END markers).
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
from llmfab.compiler.model import Model, ModelDesc, QTensor, load_model
from llmfab.compiler import quant

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(HERE, "..", "docs", "benchmarks.md")


def shape_model(desc: ModelDesc, qtype: str = "q4_0") -> Model:
    """A model with the given shape whose weights are all-zero blocks (no memory: broadcast views)."""
    bw, bb = quant.QTYPE_BLOCK[qtype] if hasattr(quant, "QTYPE_BLOCK") else (32, quant.BLOCK_BYTES[qtype])
    from llmfab.compiler.model import expected_shapes
    m = Model(desc=desc, path="(shape only)", source="shape")
    for name, shape in expected_shapes(desc).items():
        if len(shape) == 1:
            m.tensors[name] = QTensor(name, "f32", shape, np.ones(shape, np.float32))
        else:
            rb = shape[1] // 32 * quant.BLOCK_BYTES[qtype]
            m.tensors[name] = QTensor(name, qtype, shape, np.broadcast_to(np.zeros(rb, np.uint8), (shape[0], rb)))
    return m


LLAMA2_7B = ModelDesc(arch="llama", name="LLaMA2-7B-shaped", n_layers=32, dim=4096, n_heads=32,
                      n_kv_heads=32, head_dim=128, ffn_dim=11008, vocab_size=32000,
                      context_length=4096, rope_base=10000.0, rope_dim=128, rms_eps=1e-5,
                      tied_embeddings=False)


def bench_compile(model, cfg_name, context=None, emit_image=True):
    cfg = load_config(cfg_name)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = compile_model(model, cfg, context=context, emit_image=emit_image)
    dt = time.perf_counter() - t
    st = b.manifest["stats"]
    return b, {"model": model.desc.name, "config": cfg_name, "context": b.manifest["context"],
               "decode_programs": 1, "program_bytes": len(b.program),
               "instructions": sum(st["instructions"].values()),
               "instruction_mix": st["instructions"], "weight_bytes_per_token": st["weight_bytes_per_token"],
               "compile_seconds": round(dt, 2)}


def bench_golden(bundle, model, n_tokens):
    from llmfab.sim.golden_backend import GoldenDevice
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    smol = load_model()
    b, r = bench_compile(smol, "ci")
    r.update(bench_golden(b, smol, args.tokens))
    rows.append(r)
    print(json.dumps(r))
    _, r = bench_compile(smol, "u280")
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
    if args.write_docs:
        with open(DOCS) as fh:
            doc = fh.read()
        a, b_ = "<!-- BEGIN compile_decode -->", "<!-- END compile_decode -->"
        i, j = doc.index(a) + len(a), doc.index(b_)
        doc = doc[:i] + "\n" + md + "\n" + doc[j:]
        with open(DOCS, "w") as fh:
            fh.write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
