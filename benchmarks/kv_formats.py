"""Benchmark: 4-bit KV-cache formats the DSP chains could read, against llama.cpp (issue 11).

    OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=Haswell .venv/bin/python benchmarks/kv_formats.py [--json]

The reference backend's quantized-cache path (``ReferenceModel(kv_cache="q8_0")``: llama.cpp's
flash-attention rounding, Q quantized to Q8_0) with the rounding of the stored K and V rows
replaced by each format below, teacher-forced over the texts of
``tests/data/llamacpp_logits.npz`` and compared with llama.cpp's fp16 cache there, with and
without llama.cpp's Walsh-Hadamard rotation of Q, K and V. The formats:

* ``q8``: Q8_0 per 32 (the chains' K rows today); ``i8row``: int8 with one scale per position
  and KV head (the chains' V today, ``core.numerics.quantize_row``'s rule);
* ``q4sym``: 4-bit with a symmetric scale per 32 (``d = amax/7``, ``q`` in -7..7: the
  activation quantizer with 7 for 127, readable as Q4_0 blocks); ``i4row``: the same with one
  scale per position and KV head (a transposed V of 4-bit columns);
* ``q4_0``: ggml's Q4_0 (llama.cpp's ``--cache-type-k/v q4_0``).

These are the formats' rules in numpy float32 (``q8`` is llama.cpp's x86 Q8_0 rounding), not
the accelerator's bit-exact quantizers (``core.numerics``, which divide through its ``recip``):
they differ at near-ties only, which moves these figures by noise, not by format.

Bars (issue 11): top-1 >= 96 %, 100 % where llama.cpp leads by > 0.5, median <= 0.35.
docs/numerics.md ("A 4-bit cache") has the table. Takes about a minute per row.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from tqdm import tqdm

from llmfab.compiler.model import load_model
from llmfab.sim.accuracy import agreement_cells, agreement_fields, compare, load_llamacpp_reference
from llmfab.sim.reference import ReferenceModel, q4_0_round, q8_round

HERE = os.path.dirname(os.path.abspath(__file__))
F16 = os.path.join(HERE, "..", "tests", "data", "llamacpp_logits.npz")


def symmetric(x: np.ndarray, block: int, qmax: int) -> np.ndarray:
    """Symmetric round-to-nearest-even with one scale ``amax/qmax`` per ``block`` values of the
    last axis (``block`` = head_dim: one scale per row)."""
    b = x.reshape(-1, block).astype(np.float32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    live = amax > 0
    inv = np.where(live, np.float32(qmax) / np.where(live, amax, np.float32(1)), np.float32(0))
    q = np.clip(np.rint(b * inv.astype(np.float32)), -qmax, qmax)
    return (q * (amax / np.float32(qmax))).reshape(x.shape).astype(np.float32)


def formats(head_dim: int) -> dict:
    return {"q8": q8_round, "i8row": lambda x: symmetric(x, head_dim, 127),
            "q4sym": lambda x: symmetric(x, 32, 7), "i4row": lambda x: symmetric(x, head_dim, 7),
            "q4_0": q4_0_round}


#: (K format, V format) pairs measured
PAIRS = [("q8", "i8row"), ("q4sym", "i4row"), ("q4sym", "i8row"), ("q8", "i4row"),
         ("q4sym", "q4sym"), ("q4_0", "q4_0")]


def measure() -> list[dict]:
    model = load_model()
    ref = load_llamacpp_reference(F16)
    fmt = formats(model.desc.head_dim)
    rows = []
    for rot in (False, True):
        for k, v in tqdm(PAIRS, desc=f"rotation {'on' if rot else 'off'}", unit="format"):
            r = ReferenceModel(model, kv_cache="q8_0", kv_rotation=rot)
            r.kv_round = (fmt[k], fmt[v])
            out = []
            for toks, _, _ in ref:
                r.reset()
                out.append(r.forward(toks))
            rows.append({"k": k, "v": v, "rotation": rot,
                         **agreement_fields(compare(out, ref, margin=0.5, topn=8))})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| K | V | rotation | top-1 agreement | where llama.cpp leads by > 0.5 | median abs logit error, top-8 | max |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['k']} | {r['v']} | {'yes' if r['rotation'] else 'no'} | {agreement_cells(r)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args()
    rows = measure()
    print(json.dumps(rows, indent=1) if args.json else table(rows))


if __name__ == "__main__":
    main()
