"""Benchmark: SmolLM2 on the simulated accelerator (Verilator), against the golden model.

    .venv/bin/python benchmarks/rtl_decode.py [--config ci] [--new-tokens 3]

Prints the build time, per-token cycles, HBM utilization, per-queue busy
fractions, simulation speed, and whether tokens and logits equal the golden
backend's (bit for bit).
"""

import argparse
import json
import sys
import time

import numpy as np
from tqdm import tqdm

from llmfab.boards.config import load_config
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.compiler.tokenizer import Tokenizer
from llmfab.host.golden_backend import GoldenDevice
from llmfab.host.rtl_backend import RtlDevice


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="ci")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--new-tokens", type=int, default=3)
    args = ap.parse_args(argv)
    m = load_model()
    cfg = load_config(args.config)
    tok = Tokenizer.from_gguf(m.path)
    prompt = tok.encode(args.prompt)
    b = compile_model(m, cfg)
    t = time.perf_counter()
    rtl = RtlDevice(m, cfg, bundle=b)
    build = time.perf_counter() - t
    gold = GoldenDevice(m, cfg, bundle=b)
    gold_res = gold.generate(prompt, args.new_tokens)
    t = time.perf_counter()
    rtl.reset()
    bar = tqdm(total=len(prompt) + args.new_tokens - 1, desc="rtl decode runs", unit="token",
               file=sys.stderr)
    parts = []
    for t_ in prompt:                   # the rtl backend runs the decode program per position
        parts.append(rtl.forward([t_]))
        bar.update(1)
    lr = np.concatenate(parts)
    toks, logits_r = [], [lr]
    nxt = int(np.argmax(lr[-1]))
    for i in range(args.new_tokens):
        toks.append(nxt)
        if i == args.new_tokens - 1:
            break
        l1 = rtl.forward([nxt])
        bar.update(1)
        logits_r.append(l1)
        nxt = int(np.argmax(l1[-1]))
    bar.close()
    wall = time.perf_counter() - t
    gold.reset()
    lg = gold.forward(prompt + toks[:-1])
    lr_all = np.concatenate(logits_r)
    st = rtl.stats()
    out = {"config": args.config, "build_seconds": round(build, 1), "prompt_tokens": len(prompt),
           "tokens_rtl": toks, "tokens_golden": gold_res.tokens,
           "logits_bit_exact": bool(np.array_equal(lr_all.view(np.uint32), lg.view(np.uint32))),
           "wall_seconds": round(wall, 1), "seconds_per_token": round(wall / (len(prompt) + len(toks) - 1), 1),
           **st}
    print(json.dumps(out))
    rtl.close()
    return 0 if out["logits_bit_exact"] and toks == gold_res.tokens else 1


if __name__ == "__main__":
    sys.exit(main())
