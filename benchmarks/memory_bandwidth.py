"""Benchmark: the HBM timing models, calibrated through the accelerator with LD streams.

    .venv/bin/python benchmarks/memory_bandwidth.py [--config tiny] [--write-docs]

Runs streams of LD instructions (``llmfab.sim.rtl.membench``: sequential
bursts of 32 B .. 8 KiB, short bursts at growing strides, and the longest
bursts with every port reaching a channel other than its own through the HBM
switch) on the simulated accelerator under the ideal and the card-like memory
model (``boards/memory_timing.py``; one build, the model is switched between
runs), and prints the bandwidth the ports delivered during execution as a
fraction of their peak, beside the sustained figure the board's memory timing
cites (Shuhai's 425 of 460 GB/s for the U280's HBM2). On ``tiny`` (one port)
every stream is that port's; on several ports the sequential streams use all
ports and the one-beat streams (stride a multiple of ports x beat) port 0 only.
Writes ``docs/img/memory_bandwidth_<config>.png`` and ``.json`` beside it;
``--write-docs`` puts the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from llmfab.boards import memory_timing
from llmfab.boards.config import load_config
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.host.rtl_backend import exec_factory
from llmfab.sim.rtl.harness import RtlAccelerator
from llmfab.sim.rtl.membench import Stream, measure

HERE = os.path.dirname(os.path.abspath(__file__))
IMG = os.path.join(HERE, "..", "docs", "img")
DOCS = os.path.join(HERE, "..", "docs", "benchmarks.md")
#: Bytes each sequential stream moves (enough for ~80 refresh intervals on tiny).
STREAM_BYTES = 256 * 1024


def _model(config_name: str, path: str | None):
    if path:
        return load_model(path)
    if config_name == "tiny":
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        import tinymodel
        d = tempfile.mkdtemp(prefix="llmfab-membench-")
        return load_model(tinymodel.write_tiny_gguf(os.path.join(d, "t.gguf"), "q4_1", seed=5))
    return load_model()


def streams(config) -> list[tuple[str, Stream]]:
    """(group, stream) pairs: sequential burst sizes, then strided one-beat-pair streams."""
    S = config.hbm.data_width // 8
    P = config.hbm.ports
    onchip = config.buffer_bytes["activation"]
    out = []
    size = max(32, P * S)
    while size <= min(onchip, 8192):
        out.append(("sequential", Stream(f"seq {size} B", size, size, max(16, min(512, STREAM_BYTES // size)))))
        size *= 2
    short = max(32, S)
    for stride in (P * short, 4 * P * short, 1024, 4096, 16384):
        if stride % 32 == 0 and stride >= short:
            out.append(("strided", Stream(f"{short} B every {stride} B", short, stride, 256)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--model", default=None, help="GGUF file (default: a tiny model on tiny, SmolLM2 otherwise)")
    ap.add_argument("--out-dir", default=IMG)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    m = _model(args.config, args.model)
    bundle = compile_model(m, cfg)
    onchip = cfg.buffer_bytes["activation"]
    cited = memory_timing.measured_fraction(cfg)
    model_sus = memory_timing.sustainable_fraction(cfg, "card")
    factory, _ = exec_factory(cfg)
    rows = []
    t0 = time.perf_counter()
    with RtlAccelerator(cfg, bundle, exec_factory=factory, progress=lambda s: print(s, file=sys.stderr)) as acc:
        todo = streams(cfg)
        longest = [s for g, s in todo if g == "sequential"][-1]
        for model in memory_timing.MODELS:
            acc.set_memory(model)
            for group, s in todo:
                rows.append({"group": group, **measure(acc, s, onchip_bytes=onchip)})
                print(json.dumps(rows[-1]), file=sys.stderr)
        acc.set_memory("card", channel_offset=1)
        rows.append({"group": "switch", **measure(acc, longest, onchip_bytes=onchip)})
        acc.set_memory("ideal")
    wall = time.perf_counter() - t0
    peak_gbps = cfg.peak_hbm_gbps
    table = [f"`{cfg.name}`: {cfg.hbm.ports} port(s) x {cfg.hbm.data_width} bit at {cfg.clock_mhz:g} MHz "
             f"({peak_gbps:g} GB/s); card-like model: {memory_timing.describe(cfg, 'card')}; "
             f"cited sustained fraction {cited:.3f} (425/460 GB/s, Shuhai), the model's analytical "
             f"long-burst fraction {model_sus:.3f}.", "",
             "| stream | LD bytes | stride | memory model | fraction of ports' peak | GB/s | vs cited |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        model = r["memory"] + (" + switch" if r["channel_offset"] else "")
        vs = f"{(r['fraction'] / cited - 1) * 100:+.1f}%" if cited and r["group"] != "strided" else "-"
        table.append(f"| {r['name']} | {r['burst_bytes']} | {r['stride_bytes']} | {model} | "
                     f"{r['fraction']:.3f} | {r['gbps']:.3f} | {vs} |")
    md = "\n".join(table)
    print(md)
    print(f"({wall:.0f} s)")
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"memory_bandwidth_{cfg.name}")
    with open(stem + ".json", "w") as f:
        json.dump({"config": cfg.name, "cited_fraction": cited, "model_sustainable_fraction": model_sus,
                   "rows": rows}, f, indent=1)
    _plot(rows, cfg, cited, stem + ".png")
    if args.write_docs:
        doc = open(DOCS).read()
        a, b_ = f"<!-- BEGIN memory_bandwidth {cfg.name} -->", f"<!-- END memory_bandwidth {cfg.name} -->"
        if a not in doc:
            doc += (f"\n{a}\n{b_}\n")
        i, j = doc.index(a) + len(a), doc.index(b_)
        doc = doc[:i] + "\n" + md + "\n" + doc[j:]
        open(DOCS, "w").write(doc)
    return 0


def _plot(rows, cfg, cited, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for model, style in (("ideal", "o--"), ("card", "s-")):
        seq = [r for r in rows if r["group"] == "sequential" and r["memory"] == model]
        a1.semilogx([r["burst_bytes"] for r in seq], [r["fraction"] for r in seq], style, base=2, label=model)
        st = [r for r in rows if r["group"] == "strided" and r["memory"] == model]
        a2.semilogx([r["stride_bytes"] for r in st], [r["fraction"] for r in st], style, base=2, label=model)
    sw = [r for r in rows if r["group"] == "switch"]
    if sw:
        a1.semilogx([sw[0]["burst_bytes"]], [sw[0]["fraction"]], "rx", base=2, label="card, other channel")
    if cited:
        a1.axhline(cited, color="grey", lw=0.8, ls=":", label=f"cited {cited:.3f} (Shuhai)")
    a1.set_xlabel("bytes per LD (sequential)")
    a1.set_ylabel("fraction of the ports' peak")
    a1.set_ylim(0, 1.05)
    a1.legend(fontsize=8)
    a1.grid(True, alpha=0.3)
    a2.set_xlabel("stride in bytes (short LDs)")
    a2.set_ylim(0, 1.05)
    a2.legend(fontsize=8)
    a2.grid(True, alpha=0.3)
    fig.suptitle(f"LD streams through the accelerator: {cfg.name}, {cfg.hbm.ports} port(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
