"""Benchmark: an attention-on-the-chains decode step on the RTL, instruction by instruction.

    .venv/bin/python benchmarks/chains_write_port.py [--pos 40] [--vcd FILE] [--all]

``tinyc`` (``tiny`` with attention on the chains and a 32 KiB KV buffer, as
tests/rtl/test_chains_top.py) runs a synthetic model (tests/tinymodel.py: Q4_1, 2 layers,
dim 128, 4 heads of 32, 2 KV heads, FFN 256) for one decode step at ``--pos`` (the golden
model's KV cache copied in) on a Verilator build with waves (``--trace``; built once, about
7 minutes, then cached). From the VCD (about 0.9 GB), for each compute instruction in
program order: when the execution unit issued it (``hw/exec_unit.py``'s ``issue``), when
its unit finished (``fin0`` / ``fin1``), how many of those cycles its unit's write request
was refused and how many the load engine wrote a line (``ld_wr``, which the on-chip memory
served first until the execution unit's writer went first: hw/onchip.py ``WRITE_CLIENTS``);
beside it ``sim.perf.estimate``'s trace (start, finish). The
instructions whose RTL run differs from the model's by more than 20 cycles are printed
(``--all``: every one) after the step's cycles on both.

This is how the model's missing wait was found (docs/benchmarks.md, "With attention on the
chains"): at position 40 the first KVROW of each layer ran 631 cycles on the RTL, 437 of
them with its writes refused while the load engine wrote the next slots' lines. With the
execution unit's writer first every KVROW runs 226 cycles, none refused (step 24,114 cycles
against 24,880); with KVROW writing no V block's d and the ROPE table kept, 152 cycles (step
23,558, the model 22,972, -2.5%; 23,261 against 22,670 once MvExec took its next word in
the cycle of the last one's done, 2026-12-05).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

#: (scope, signal) pairs read from the VCD: the execution unit's issue and finish pulses,
#: its units' write requests, the load engine's line writes
SIGNALS = [("exec", "issue"), ("exec", "tcls"), ("exec", "fin0"), ("exec", "fin1"),
           ("sfu", "wr__req__valid"), ("sfu", "wr__req__ready"),
           ("mv", "wr__req__valid"), ("mv", "wr__req__ready"),
           ("core", "ld_wr__req__valid"), ("core", "ld_wr__req__ready")]


def tinyc():
    from llmfab.boards.config import config_from_dict, load_config
    d = load_config("tiny").to_dict()
    d.update(name="tinyc", attention="chains")
    d["buffers"] = dict(d["buffers"], kv_kib=32)
    return config_from_dict(d, "tinyc (tiny with attention on the chains, 32 KiB KV buffer)")


def read_vcd(path):
    """name -> per-cycle values (sampled between rising edges) of :data:`SIGNALS`."""
    want = {f"{s}.{n}" for s, n in SIGNALS}
    ids, scope, clk = {}, [], None
    f = open(path, "rb")
    for raw in f:
        p = raw.split()
        if not p:
            continue
        if p[0] == b"$scope":
            scope.append(p[2].decode())
        elif p[0] == b"$upscope":
            scope.pop()
        elif p[0] == b"$var":
            vid, name = p[3].decode(), p[4].decode()
            key = f"{scope[-1]}.{name}" if scope else name
            # the MV unit inside the execution unit, not the MV engine's own submodules
            if key in want and (scope[-1] != "mv" or scope[-2] == "exec"):
                ids.setdefault(vid, []).append(key)
            if name == "ap_clk" and clk is None:
                clk = vid
        elif p[0] == b"$enddefinitions":
            break
    names = sorted(want)
    val = dict.fromkeys(names, 0)
    rows, c, pc = [], 0, 0
    for raw in f:
        h = raw[0:1]
        if h == b"#":
            if c == 0 and pc == 1:           # a falling edge: the values of this cycle
                rows.append([val[n] for n in names])
            pc = c
            continue
        if h not in (b"0", b"1"):
            continue
        vid, v = raw[1:].strip().decode(), int(h == b"1")
        if vid == clk:
            c = v
        for k in ids.get(vid, ()):
            val[k] = v
    f.close()
    a = np.array(rows, dtype=bool)
    return {n: a[:, i] for i, n in enumerate(names)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pos", type=int, default=40)
    ap.add_argument("--vcd", default=None, help="keep the waveform here (default: deleted)")
    ap.add_argument("--all", action="store_true", help="every compute instruction")
    args = ap.parse_args(argv)

    import tinymodel

    from llmfab.compiler import isa
    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    from llmfab.host.golden_backend import GoldenDevice
    from llmfab.host.rtl_backend import exec_factory
    from llmfab.sim.perf import estimate
    from llmfab.sim.rtl.harness import RtlAccelerator

    cfg = tinyc()
    with tempfile.TemporaryDirectory() as tmp:
        m = load_model(tinymodel.write_tiny_gguf(os.path.join(tmp, "tinyc.gguf"), "q4_1", dim=128,
                                                 n_heads=4, n_kv_heads=2, ffn_dim=256, vocab=256))
        b = compile_model(m, cfg)
        ctx = int(b.manifest["context"])
        kv0, kvn = (int(x) for x in b.manifest["memory_map"]["kv"])
        toks = [int(t) for t in np.random.default_rng(1).integers(0, 256, ctx)]
        gold = GoldenDevice(m, cfg, bundle=b)
        factory, _ = exec_factory(cfg)
        with RtlAccelerator(cfg, b, exec_factory=factory, memory="ideal", waves=True,
                            progress=lambda s: print(s, file=sys.stderr)) as acc:
            if args.pos:
                gold.forward(toks[:args.pos])
            acc.write_hbm(kv0, gold.golden.hbm[kv0:kv0 + kvn].copy())
            want = gold.forward([toks[args.pos]])[-1]
            r = acc.run(args.pos, toks[args.pos])
            exact = bool(np.array_equal(acc.logits().view(np.uint32), want.view(np.uint32)))
            vcd = os.path.join(acc.build_dir, "dump.vcd")
        if args.vcd:
            shutil.move(vcd, args.vcd)
            vcd = args.vcd
        s = read_vcd(vcd)
        if not args.vcd:
            os.remove(vcd)

    trace = []
    e = estimate(b, cfg, pos=args.pos, memory="ideal", trace=trace)
    model = [t for t in trace if t[1] not in ("LD", "ST")]
    words = [isa.decode(w) for w in isa.from_bytes(b.program)]
    pcs = [pc for pc, w in enumerate(words) if w.op in ("MV", "MM", "MISC")]
    issue = np.flatnonzero(s["exec.issue"])
    fins = {0: list(np.flatnonzero(s["exec.fin0"])), 1: list(np.flatnonzero(s["exec.fin1"]))}
    if len(issue) != len(model):
        raise SystemExit(f"{len(issue)} issues on the RTL, {len(model)} compute instructions in the model")
    off = issue[0] - model[0][3]          # the RTL's cycle count from the model's origin
    print(f"tinyc, position {args.pos}: RTL {r.cycles:,} cycles, model {e.cycles:,} "
          f"({e.cycles / r.cycles - 1:+.1%}); logits = golden: {'yes' if exact else 'NO'}")
    print("pc | op | RTL issue, run | model start, run | refused writes | load lines during the run")
    for k, (a, t) in enumerate(zip(issue, model)):
        cls = int(s["exec.tcls"][a])
        fin = fins[cls].pop(0)
        unit = "mv" if cls == 0 else "sfu"
        w = slice(a, fin)
        refused = int((s[f"{unit}.wr__req__valid"][w] & ~s[f"{unit}.wr__req__ready"][w]).sum())
        lines = int((s["core.ld_wr__req__valid"][w] & s["core.ld_wr__req__ready"][w]).sum())
        run, mrun = int(fin - a), t[5] - t[3]
        if args.all or abs(run - mrun) > 20:
            print(f"{pcs[k]} | {t[1]} | {a - off:.0f}, {run} | {t[3]:.0f}, {mrun:.0f} | {refused} | {lines}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
