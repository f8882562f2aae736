"""Benchmark: where one decode step's cycles go in the RTL accelerator, from its own counters.

    .venv/bin/python benchmarks/rtl_utilization.py [--config ci] [--model GGUF]
        [--prompt TEXT] [--decode-steps 1] [--sample-every 2000] [--out-dir docs/img]
        [--memory ideal|card] [--write-docs]

Runs the model (default: the bundled SmolLM2) compiled for ``--config`` on the
Verilator simulation of the accelerator (``host/rtl_backend.py``'s execution
unit): the prompt token by token, then ``--decode-steps`` greedy decode steps.
During the decode steps the accelerator's live counters (``hw/top.py``'s
``probe``) are sampled every ``--sample-every`` cycles. For the first decode
step it prints a table -- per-unit busy fractions, HBM bytes per port, HBM
utilization (weight bytes per token / (cycles x peak bytes per cycle)),
stalls by cause; the HBM timing model that ran (``--memory``: ``ideal``, the
default, or ``card``, the board's timing, boards/memory_timing.py) and the
utilization against the memory's sustainable peak too -- and writes, into
``--out-dir`` (the ``card`` model's files carry a ``-card`` suffix):

* ``rtl_busy_<config>.png``: per-unit busy fraction over the step (one lane
  per unit, each point one sampling interval), with the HBM read rate;
* ``rtl_roofline_<config>.png``: the configuration's roofline
  (``sim/perf.py``'s ``roofline_plot``) with the measured step(s) and the
  analytical model's projection for the same position;
* ``rtl_utilization_<config>.json``: every figure of the table, per decode step.

Quick check: ``--model tiny.gguf --config tiny --sample-every 200 --out-dir /tmp``
(``tests/tinymodel.py`` writes such a model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from llmfab.boards import memory_timing
from llmfab.boards.config import load_config
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.compiler.tokenizer import Tokenizer
from llmfab.hw.top import probe_names
from llmfab.sim.perf import estimate, roofline_plot
from llmfab.host.rtl_backend import RtlDevice

HERE = os.path.dirname(os.path.abspath(__file__))
IMG = os.path.join(HERE, "..", "docs", "img")
DOCS = os.path.join(HERE, "..", "docs", "benchmarks.md")
MARK = ("<!-- BEGIN rtl_utilization -->", "<!-- END rtl_utilization -->")
#: Units in the busy plot: (label, counter).
LANES = (("load engine", "busy_ld"), ("MV/MM (exec unit)", "busy_mv"),
         ("MISC (exec unit)", "busy_misc"), ("store engine", "busy_st"))
STALLS = ("stall_fetch", "stall_ld_full", "stall_cmp_full", "stall_st_full", "stall_sys_drain",
          "wait_ld", "wait_cmp", "wait_st")


def step_figures(run, *, pos, config, bundle, memory="ideal") -> dict:
    """The figures of one run (one decode step) from its counter block and the analytical model."""
    c = run.counters
    sustainable = memory_timing.sustainable_fraction(config)
    cyc = c["cycles"]
    P = config.hbm.ports
    peak = config.hbm_bytes_per_cycle
    wbytes = int(bundle.manifest["stats"]["weight_bytes_per_token"])
    est = estimate(bundle, config, pos=pos, memory=memory)   # the memory model the RTL ran
    rd = [c[f"port{p}_rd_bytes"] for p in range(P)]
    wr = [c[f"port{p}_wr_bytes"] for p in range(P)]
    return {
        "pos": pos, "cycles": cyc, "validate_cycles": c["validate_cycles"],
        "exec_cycles": c["exec_cycles"],
        "busy": {k: round(c[f"busy_{k}"] / cyc, 4) for k in ("ld", "cmp", "mv", "misc", "st")},
        "instructions": {k: c[f"instr_{k}"] for k in ("ld", "cmp", "st", "sys")},
        "ld_bytes": c["ld_bytes"], "st_bytes": c["st_bytes"],
        "port_rd_bytes": rd, "port_wr_bytes": wr,
        "weight_bytes": wbytes, "peak_bytes_per_cycle": peak,
        "memory_model": memory_timing.describe(config, memory),
        "hbm_utilization": round(wbytes / (cyc * peak), 4),
        "hbm_utilization_sustainable": round(wbytes / (cyc * peak * sustainable), 4),
        "memory_sustainable_fraction": round(sustainable, 4),
        "port_read_utilization": round(sum(rd) / (cyc * peak), 4),
        "stalls": {k: c[k] for k in STALLS},
        "macs": est.macs, "mac_per_cycle": round(est.macs / cyc, 2),
        "mac_per_byte": round(est.macs / max(c["ld_bytes"], 1), 3),
        "model": {"cycles": est.cycles, "bound": est.bound, "hbm_utilization": round(est.hbm_utilization, 4),
                  "mac_per_byte": round(est.macs / max(est.weight_bytes + est.kv_bytes, 1), 3),
                  "mac_per_cycle": round(est.macs / max(est.cycles, 1), 2)},
        "samples": len(run.samples),
        "sim_cycles_per_second": round(run.cycles_per_second, 1),
        "wall_seconds": round(run.wall_seconds, 2),
    }


def table(f: dict, config) -> str:
    cyc = f["cycles"]
    b = f["busy"]
    rows = [
        ("cycles (validation + execution)", f"{cyc:,} ({f['validate_cycles']:,} + {f['exec_cycles']:,})"),
        ("busy: load engine", f"{b['ld']:.3f}"),
        ("busy: execution unit (compute queue)", f"{b['cmp']:.3f}"),
        ("busy: - of which MV/MM", f"{b['mv']:.3f}"),
        ("busy: - of which MISC", f"{b['misc']:.3f}"),
        ("busy: store engine", f"{b['st']:.3f}"),
    ]
    for p, (r, w) in enumerate(zip(f["port_rd_bytes"], f["port_wr_bytes"])):
        rows.append((f"HBM port {p}: read / written", f"{r / 1e6:.2f} MB / {w / 1e3:.1f} kB"))
    rows += [
        ("bytes loaded by LDs (ld_bytes)", f"{f['ld_bytes'] / 1e6:.2f} MB"),
        ("weight bytes per token", f"{f['weight_bytes'] / 1e6:.2f} MB"),
        ("HBM utilization (weight bytes / (cycles x peak))",
         f"{f['hbm_utilization']:.3f} (peak {f['peak_bytes_per_cycle']} B/cycle)"),
        ("HBM utilization against the memory's sustainable peak",
         f"{f['hbm_utilization_sustainable']:.3f} (sustainable {f['memory_sustainable_fraction']:.3f} of the ports' peak)"),
        ("HBM timing model", f["memory_model"]),
        ("port read bytes / (cycles x peak)", f"{f['port_read_utilization']:.3f}"),
        ("MAC per cycle (peak)", f"{f['mac_per_cycle']:.1f} ({config.macs_per_cycle})"),
        ("analytical model: cycles, bound", f"{f['model']['cycles']:,}, {f['model']['bound']}"),
    ]
    for k, v in f["stalls"].items():
        rows.append((f"stall: {k}", f"{v:,} ({v / cyc:.3f})"))
    out = ["| measure | value |", "|---|---|"] + [f"| {a} | {v} |" for a, v in rows]
    return "\n".join(out)


def busy_series(samples, config):
    """Per-interval fractions from cumulative samples: (interval midpoints in cycles, {lane: fractions})."""
    names = probe_names(config.hbm.ports)
    a = np.array([[s[n] for n in names] for s in samples], dtype=np.float64)
    col = {n: a[:, i] for i, n in enumerate(names)}
    dc = np.diff(col["cycles"])
    keep = dc > 0
    x = (col["cycles"][1:] + col["cycles"][:-1])[keep] / 2
    out = {label: (np.diff(col[n])[keep] / dc[keep]) for label, n in LANES}
    rd = sum(col[f"port{p}_rd_bytes"] for p in range(config.hbm.ports))
    out["HBM read (of peak)"] = np.diff(rd)[keep] / (dc[keep] * config.hbm_bytes_per_cycle)
    edges = np.concatenate([col["cycles"][:-1][keep], col["cycles"][1:][keep][-1:]])
    return x, edges, out


def busy_plot(run, f, config, model_name, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, edges, lanes = busy_series(run.samples, config)
    fig, axes = plt.subplots(len(lanes), 1, figsize=(9, 1.2 * len(lanes) + 1), sharex=True)
    scale = 1e6 if edges[-1] > 2e6 else 1e3
    unit = "M" if scale == 1e6 else "k"
    for ax, (label, y), color in zip(axes, lanes.items(), ("C0", "C1", "C2", "C3", "C7")):
        ax.stairs(np.clip(y, 0, 1.05), edges / scale, fill=True, color=color, alpha=0.8)
        ax.axvspan(0, f["validate_cycles"] / scale, color="0.85", zorder=0)
        ax.set_ylim(0, 1.05)
        ax.set_yticks([0, 0.5, 1])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        tot = f["port_read_utilization"] if label.startswith("HBM") else \
            f["busy"][{"busy_ld": "ld", "busy_mv": "mv", "busy_misc": "misc", "busy_st": "st"}[
                dict(LANES)[label]]]
        ax.text(1.0, 0.5, f" {tot:.2f}", transform=ax.transAxes, fontsize=8, va="center")
        ax.grid(True, axis="x", alpha=0.3)
    every = int(np.median(np.diff(edges))) if len(edges) > 2 else 0
    axes[-1].set_xlabel(f"cycle of the decode step ({unit}cycles; grey: validation pass; "
                        f"one bar per {every:,} cycles)")
    axes[0].set_title(f"{model_name} on {config.name}: busy fraction per unit, decode step at "
                      f"position {f['pos']}\n({f['cycles']:,} cycles; right: fraction over the whole step)",
                      fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ci")
    ap.add_argument("--model", default=None, help="GGUF file or HF checkpoint (default: bundled SmolLM2)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--decode-steps", type=int, default=1)
    ap.add_argument("--sample-every", type=int, default=2000, help="cycles between counter samples")
    ap.add_argument("--out-dir", default=IMG)
    ap.add_argument("--memory", default="ideal", choices=("ideal", "card"),
                    help="HBM timing model of the simulation (boards/memory_timing.py; default %(default)s)")
    ap.add_argument("--save-samples", default=None, metavar="PATH",
                    help="also pickle the decode steps' raw samples and figures to PATH")
    ap.add_argument("--write-docs", action="store_true",
                    help="rewrite the rtl_utilization table in docs/benchmarks.md")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    model = load_model(args.model) if args.model else load_model()
    cfg = load_config(args.config)
    tok = Tokenizer.from_gguf(model.path)
    prompt = tok.encode(args.prompt)
    if not prompt:
        ap.error("the prompt encodes to no tokens")
    t0 = time.perf_counter()
    bundle = compile_model(model, cfg)
    compile_s = time.perf_counter() - t0
    print(f"compiled {model.desc.name} for {cfg.name} in {compile_s:.1f} s; building/starting the "
          f"simulation (a Verilator build takes minutes the first time)...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rtl = RtlDevice(model, cfg, bundle=bundle, memory=args.memory)
    start_s = time.perf_counter() - t0
    try:
        n = len(prompt) + args.decode_steps
        bar = tqdm(total=n, unit="step", desc=f"{cfg.name} RTL", file=sys.stderr)
        logits = None
        for t in prompt:
            logits = rtl.forward([t])
            r = rtl.runs[-1]
            bar.set_postfix(pos=rtl.pos - 1, cycles=r.cycles, kcyc_s=round(r.cycles_per_second / 1e3, 1))
            bar.update()
        rtl.sample_every = args.sample_every
        decoded = []
        for _ in range(args.decode_steps):
            nxt = int(np.argmax(logits[-1]))
            decoded.append(nxt)
            logits = rtl.forward([nxt])
            r = rtl.runs[-1]
            bar.set_postfix(pos=rtl.pos - 1, cycles=r.cycles, samples=len(r.samples),
                            kcyc_s=round(r.cycles_per_second / 1e3, 1))
            bar.update()
        bar.close()
        decode_runs = rtl.runs[len(prompt):]
        steps = [step_figures(r, pos=len(prompt) + i, config=cfg, bundle=bundle, memory=args.memory)
                 for i, r in enumerate(decode_runs)]
        prompt_runs = rtl.runs[:len(prompt)]
        out = {
            "config": cfg.name, "memory": args.memory, "model": model.desc.name, "prompt": args.prompt,
            "prompt_tokens": prompt, "decoded_tokens": decoded,
            "decoded_text": tok.decode(decoded) if decoded else "",
            "sample_every": args.sample_every, "compile_seconds": round(compile_s, 1),
            "build_and_start_seconds": round(start_s, 1),
            "sim_cycles_per_second": {
                "prompt_steps_unsampled": round(sum(r.sim_cycles for r in prompt_runs)
                                                / sum(r.wall_seconds for r in prompt_runs), 1),
                "decode_steps_sampled": round(sum(r.sim_cycles for r in decode_runs)
                                              / sum(r.wall_seconds for r in decode_runs), 1)},
            "prompt_cycles": [r.cycles for r in prompt_runs],
            "decode_steps": steps,
        }
        os.makedirs(args.out_dir, exist_ok=True)
        tag = cfg.name + ("" if args.memory == "ideal" else f"-{args.memory}")
        busy_png = os.path.join(args.out_dir, f"rtl_busy_{tag}.png")
        roof_png = os.path.join(args.out_dir, f"rtl_roofline_{tag}.png")
        js = os.path.join(args.out_dir, f"rtl_utilization_{tag}.json")
        short = model.desc.name.split()[0]
        busy_plot(decode_runs[0], steps[0], cfg, model.desc.name, busy_png)
        pts = [(f"RTL (measured), pos {s['pos']}", s["mac_per_byte"], s["mac_per_cycle"],
                (-20 - 10 * i, 8 + 11 * i)) for i, s in enumerate(steps)]
        pts.append((f"analytical model ({short}), pos {steps[0]['pos']}", steps[0]["model"]["mac_per_byte"],
                    steps[0]["model"]["mac_per_cycle"], (8, -14)))
        roofline_plot(pts, cfg, roof_png)
        with open(js, "w") as fh:
            json.dump(out, fh, indent=1)
        if args.save_samples:
            import pickle
            with open(args.save_samples, "wb") as fh:
                pickle.dump({"figures": out, "samples": [r.samples for r in decode_runs],
                             "counters": [r.counters for r in decode_runs]}, fh)
        md = table(steps[0], cfg)
        head = (f"{model.desc.name} on `{cfg.name}`, decode step at position {steps[0]['pos']} "
                f"(prompt {args.prompt!r}, {len(prompt)} tokens; decoded {decoded})")
        print(head)
        print(md)
        if len(steps) > 1:
            print("cycles per decode step:", [s["cycles"] for s in steps])
        print(f"simulation speed (cycles/s): {out['sim_cycles_per_second']}")
        print(f"wrote {busy_png}, {roof_png}, {js}")
        if args.write_docs:
            doc = open(DOCS).read()
            mark = MARK if args.memory == "ideal" else tuple(m.replace(" -->", f" {args.memory} -->")
                                                             for m in MARK)
            if mark[0] not in doc:
                raise SystemExit(f"{DOCS} lacks the {mark[0]} marker")
            i, j = doc.index(mark[0]) + len(mark[0]), doc.index(mark[1])
            doc = doc[:i] + "\n" + head + ":\n\n" + md + "\n" + doc[j:]
            with open(DOCS, "w") as fh:
                fh.write(doc)
    finally:
        rtl.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
