"""Benchmark: the reference backend's teacher-forced accuracy against llama.cpp, per KV-cache format.

    OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=Haswell .venv/bin/python benchmarks/accuracy.py [--json] [--golden]

Runs the reference backend (``llmfab.sim.reference``) with an fp16 KV cache
(``kv_cache="f16"``, llama.cpp's default, no flash attention), a Q8_0 KV cache
(``kv_cache="q8_0"``, llama.cpp's ``--cache-type-k/v q8_0`` with flash
attention) and a Q4_0 one (``kv_cache="q4_0"``) over the texts of
``tests/data/llamacpp_logits*.npz`` (docs/reference-data.md), and compares each with each llama.cpp file present:

* ``llamacpp_logits.npz``       llama.cpp, fp16 KV cache, flash attention off;
* ``llamacpp_logits_fa.npz``    llama.cpp, fp16 KV cache, flash attention on;
* ``llamacpp_logits_kvq8.npz``  llama.cpp, q8_0 K and V, flash attention on
  (with its default Walsh-Hadamard rotation of Q, K and V);
* ``llamacpp_logits_kvq8_norot.npz``  the same with the rotation off
  (``LLAMA_ATTN_ROT_DISABLE=1``), against the reference's ``kv_rotation=False``;
* ``llamacpp_logits_kvq4.npz``, ``llamacpp_logits_kvq4_norot.npz``  the same with a
  q4_0 cache, against the reference's ``kv_cache="q4_0"``.

It also compares each llama.cpp file with the fp16 one, and each unrotated file
with its rotated one (top-16 only: the logit error is over the second file's
top-8 ids found in the first's top-16), so the effect of the KV format and of
flash attention on llama.cpp itself shows.
Columns: top-1 agreement; agreement where llama.cpp's top-1 leads its second
by more than 0.5 and by more than 1.0 logit; median and max |logit error| over
llama.cpp's top-8 ids. Bars (docs/numerics.md): top-1 >= 96 %, 100 % where the
lead is > 0.5, median <= 0.35. Takes a few minutes (five reference passes
over 592 positions).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from llmfab.compiler.model import load_model
from llmfab.sim.accuracy import (agreement_cells, agreement_fields, compare, compare_topk,
                                 load_llamacpp_reference)
from llmfab.sim.reference import ReferenceModel

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")
#: llama.cpp runs: label -> file in tests/data
LLAMACPP = {
    "llama.cpp f16 KV": "llamacpp_logits.npz",
    "llama.cpp f16 KV, flash attn": "llamacpp_logits_fa.npz",
    "llama.cpp q8_0 KV (flash attn)": "llamacpp_logits_kvq8.npz",
    "llama.cpp q8_0 KV, no rotation": "llamacpp_logits_kvq8_norot.npz",
    "llama.cpp q4_0 KV (flash attn)": "llamacpp_logits_kvq4.npz",
    "llama.cpp q4_0 KV, no rotation": "llamacpp_logits_kvq4_norot.npz",
}
#: reference runs: label -> (kv_cache, kv_rotation)
REFERENCE = {"reference f16 KV": ("f16", True), "reference q8_0 KV": ("q8_0", True),
             "reference q8_0 KV, no rotation": ("q8_0", False), "reference q4_0 KV": ("q4_0", True),
             "reference q4_0 KV, no rotation": ("q4_0", False)}
#: golden runs (--golden): label -> the ci configuration's attention engine
GOLDEN = {"golden, fp16 KV, attention in the SFU": "sfu",
          "golden, attention on the chains (Q8_0 K, int8 V^T)": "chains"}


def reference_logits(model, kv_cache: str, texts, kv_rotation: bool = True) -> list:
    r = ReferenceModel(model, kv_cache=kv_cache, kv_rotation=kv_rotation)
    out = []
    for toks, _, _ in texts:
        r.reset()
        out.append(r.forward(toks))
    return out


def golden_logits(model, attention: str, texts) -> list:
    """The golden model's logits (the ci configuration, ``attention`` engine) over ``texts``."""
    import dataclasses

    from llmfab.boards.config import load_config
    from llmfab.host.golden_backend import GoldenDevice
    cfg = dataclasses.replace(load_config("ci"), attention=attention)
    dev = GoldenDevice(model, cfg)
    return [dev.logits(list(toks)) for toks, _, _ in texts]


def measure(data: str = DATA, golden: bool = False) -> list[dict]:
    files = {k: load_llamacpp_reference(os.path.join(data, f)) for k, f in LLAMACPP.items()
             if os.path.exists(os.path.join(data, f))}
    first = next(iter(files.values()))
    for name, f in files.items():
        if [len(t) for t, _, _ in f] != [len(t) for t, _, _ in first] or \
                not all(np.array_equal(a[0], b[0]) for a, b in zip(f, first)):
            raise SystemExit(f"{name}: tokens differ from {next(iter(files))}'s")
    model = load_model()
    rows = []

    def row(ours, vs, fn, arg):
        a5, a10 = fn(arg, files[vs], margin=0.5), fn(arg, files[vs], margin=1.0)
        rows.append({"ours": ours, "vs": vs, **agreement_fields(a5, a10)})

    for label, (kv, rot) in REFERENCE.items():
        logits = reference_logits(model, kv, first, rot)
        for vs in files:
            row(label, vs, compare, logits)
    for label, engine in (GOLDEN.items() if golden else ()):
        logits = golden_logits(model, engine, first)
        for vs in files:
            row(label, vs, compare, logits)
    base = next(iter(LLAMACPP))
    for b in files:
        for a in (base, b.replace(", no rotation", " (flash attn)")):
            if a != b and a in files:
                row(b, a, compare_topk, files[b])
    return rows


def table(rows: list[dict]) -> str:
    out = ["| ours | against | top-1 agreement | where llama.cpp leads by > 0.5 | by > 1.0 "
           "| median abs logit error, top-8 | max |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['ours']} | {r['vs']} | {agreement_cells(r)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    ap.add_argument("--data", default=DATA, help="directory of the llama.cpp files (tests/data)")
    ap.add_argument("--golden", action="store_true",
                    help="also the golden model on ci, attention in the SFU and on the chains "
                         "(several minutes)")
    args = ap.parse_args()
    rows = measure(args.data, args.golden)
    print(json.dumps(rows, indent=1) if args.json else table(rows))


if __name__ == "__main__":
    main()
