"""Benchmark: the analytical performance model (sim/perf.py) against the RTL, cycle for cycle.

    .venv/bin/python benchmarks/perf_calibration.py [--config tiny] [--positions 0,64,127]
                                                     [--models tiny,tiny-wide] [--ops] [--write-docs]
    .venv/bin/python benchmarks/perf_calibration.py --config ci --models smollm2 --positions 0,128,400

For each synthetic model (tests/tinymodel.py's GGUF writer; ``tiny``: 2 layers, dim 64,
4 heads of 16, FFN 128, vocab 256, Q4_1, SFU-heavy; ``tiny-wide``: FFN 512, vocab 4096,
Q4_0, weight-streaming-heavy; ``smollm2``: the bundled SmolLM2-135M) compiled for the configuration, and each position p: the
golden model runs the tokens before p (filling the KV cache), the cache is copied into
the simulated accelerator's HBM, and the RTL runs one decode step at position p; its
counter block (cycles = validation + execution, busy cycles per queue) is compared
with ``sim.perf.estimate(bundle, config, pos=p, memory="ideal")`` (the RTL's default
memory model). The RTL's logits are checked against the golden model's at every step.

``--mv``: each distinct MV of the decode program (and, with ``--prefill T``, each distinct
MV/MM of the KV-only prefill program of bucket T) alone, once and 8 times in a row:
MvExec's busy cycles against ``mv_cycles`` (2026-12-06 on ``u280-slice --attention chains
--models smollm2 --positions 16 --mv``: the one RowCombine, docs/benchmarks.md).
``--attention chains``: the configuration with attention on the chains.

``--ops``: also run, for each kind of compute instruction of the decode program (MV,
ATTN, RMSNORM, ...), that kind's instructions alone (tokens stripped, then END) and
compare the model's per-unit formula with the RTL's execution cycles: where a
whole-step error comes from.

``--from-json FILE`` prints the tables of a run saved with ``--json`` without simulating;
with ``--remodel`` the model's columns come from the current sim/perf.py (the RTL's as saved).

``--write-docs`` replaces the table between ``<!-- BEGIN perf_calibration CONFIG -->`` and
``<!-- END perf_calibration CONFIG -->`` in docs/benchmarks.md. Needs the configuration's
Verilator build (cached in sim_build/, or $LLMFAB_SIM_BUILD).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

#: The synthetic models: name -> (weight type, tinymodel.write_tiny_gguf shape)
MODELS = {
    "tiny": ("q4_1", dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab=256)),
    "tiny-wide": ("q4_0", dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab=4096)),
    "smollm2": None,            # the bundled SmolLM2-135M (Q4_1): the ci configuration's model
}


def _model(name, tmp):
    import tinymodel
    from llmfab.compiler.model import load_model
    if name == "smollm2":
        return load_model()                 # the bundled SmolLM2-135M (Q4_1)
    qtype, shape = MODELS[name]
    return load_model(tinymodel.write_tiny_gguf(os.path.join(tmp, f"{name}.gguf"), qtype, seed=7, **shape))


def op_programs(program: bytes):
    """kind -> program of the decode program's compute instructions of that kind alone
    (no token bits), then END. Kinds: MV, MM, and each MISC op."""
    from llmfab.compiler import isa
    groups = {}
    for w in isa.from_bytes(program):
        ins = isa.decode(w)
        if ins.op in ("MV", "MM"):
            kind = ins.op
        elif ins.op == "MISC":
            kind = isa.MISC_NAMES[ins.fields["func"]]
            if kind == "NOP":
                continue
        else:
            continue
        f = dict(ins.fields)
        for k in ("wait_prev", "wait_next", "rel_prev", "rel_next"):
            f[k] = 0
        f.pop("op", None)
        groups.setdefault(kind, []).append(isa.encode(isa.make(ins.op, **f)))
    end = isa.encode(isa.make("SYS", func=isa.SYS_END))
    return {k: (isa.to_bytes(v + [end]), len(v)) for k, v in groups.items()}


def _prefill_row(acc, gold, b, cfg, mname, p, T, toks, memory):
    """The prefill program of bucket T at position p (tokens p .. p+T-1) on the RTL and the model."""
    from llmfab.compiler import isa
    from llmfab.sim.perf import estimate
    man = b.manifest
    kv0, kvn = (int(x) for x in man["memory_map"]["kv"])
    gold.reset()
    if p:
        gold.forward(toks[:p])
    acc.write_hbm(kv0, gold.golden.hbm[kv0:kv0 + kvn].copy())
    g = gold.golden
    g.stage_tokens(toks[p:p + T])
    base, size = (int(x) for x in man["memory_map"]["prefill_tokens"])
    acc.write_hbm(base, g.hbm[base:base + size].copy())
    r0 = g.run(p, 0, f"prefill_{T}")
    want = g.prefill_logits(T)
    old = acc.program
    acc.load_program(b.prefill[T])
    try:
        t0 = time.perf_counter()
        r = acc.run(p, 0, ntok=T)
        wall = time.perf_counter() - t0
    finally:
        acc.load_program(old)
    if r.timed_out or r.status != isa.STATUS_OK or r0.status != isa.STATUS_OK:
        raise SystemExit(f"prefill {T} at position {p}: rtl status {r.status}, golden {r0.status}")
    got = b.prefill_logits(T, acc.read_hbm)
    e = estimate(b, cfg, pos=p, program=T, memory=memory)
    exact = bool(np.array_equal(got.view(np.uint32), want.view(np.uint32)))
    return {**_row(cfg, mname, p, r.counters, e, exact, wall), "what": f" (prefill T={T})"}


def _model_cols(e, rtl_cycles):
    """A row's model columns: the estimate ``e`` and its error against ``rtl_cycles``."""
    return {"model_cycles": e.cycles, "error": round(e.cycles / rtl_cycles - 1, 4),
            "model_validate": e.validate_cycles, "model_busy_ld": e.load_cycles,
            "model_busy_mv": e.mv_cycles, "model_busy_misc": e.sfu_cycles,
            "model_busy_cmp": e.compute_cycles, "model_bound": e.bound}


def _row(cfg, mname, p, c, e, exact, wall):
    """One calibration row: the RTL's counters ``c`` beside the model's estimate ``e``."""
    return {"config": cfg.name, "model": mname, "pos": p, "rtl_cycles": int(c["cycles"]),
            "rtl_validate": int(c["validate_cycles"]), "rtl_busy_ld": int(c["busy_ld"]),
            "rtl_busy_mv": int(c["busy_mv"]), "rtl_busy_misc": int(c["busy_misc"]),
            "rtl_busy_cmp": int(c["busy_cmp"]), **_model_cols(e, int(c["cycles"])),
            "logits_bit_exact": exact, "wall_seconds": round(wall, 1)}


def _mv_rows(acc, b, cfg, mname, pos, T=0):
    """Each distinct MV (and, with a prefill bucket ``T``, each distinct MV/MM of its KV-only
    program) alone, once and 8 times in a row at position ``pos``: MvExec's busy cycles
    against ``sim.perf.mv_cycles`` of the word's shape under the run's registers."""
    from llmfab.compiler import isa
    from llmfab.sim.perf import mv_cycles
    end = isa.encode(isa.make("SYS", func=isa.SYS_END))
    progs = [("decode", b.program, 1)]
    kv = b.named_program(f"prefill_kv_{T}") if T else None
    if kv is not None:
        progs.append((f"prefill_kv_{T}", kv[0], T))
    seen, out = {}, []
    for name, prog, ntok in progs:
        for w in isa.from_bytes(bytes(prog)):
            ins = isa.decode(w)
            if ins.op in ("MV", "MM"):
                f = ins.fields
                seen.setdefault((ins.op, f["rows"], f["cols"], f["func"], f.get("rreg", 0),
                                 f.get("creg", 0), f.get("ntok", 1)), (name, ntok, ins))
    old = acc.program

    def busy(words, ntok):
        acc.load_program(isa.to_bytes(words + [end]))
        return int(acc.run(pos, 0, ntok=ntok).counters["busy_mv"])
    try:
        for (op, *_), (name, ntok, ins) in seen.items():
            f = dict(ins.fields)
            f.pop("op", None)
            for k in ("wait_prev", "wait_next", "rel_prev", "rel_next"):
                f[k] = 0
            w = isa.encode(isa.make(op, **f))
            one, eight = busy([w], ntok), busy([w] * 8, ntok)
            rows, cols = isa.mv_shape(ins.fields, {0: 0, **isa.run_registers(pos, 0, ntok)})
            shaped = dict(ins.fields, rows=rows, cols=cols)
            nt = max(ins.fields.get("ntok", 1), 1) if op == "MM" else 1
            out.append({"model": mname, "program": name, "op": op, "rows": rows, "cols": cols,
                        "ntok": nt, "format": isa.FMTS[ins.fields["func"] & 3],
                        "layout": isa.mv_layout(ins.fields["func"]),
                        "rtl_1x": one, "model_1x": mv_cycles(shaped, nt, cfg),
                        "rtl_repeat": (eight - one) / 7,
                        "model_repeat": mv_cycles(shaped, nt, cfg, act_cached=True)})
            print(json.dumps(out[-1]), flush=True)
    finally:
        acc.load_program(old)
    return out


def _remodel(rows, cfg, memory):
    """Saved rows with the model's columns from the current sim/perf.py (the RTL's kept)."""
    import re

    from llmfab.compiler.compile import compile_model
    from llmfab.sim.perf import estimate
    bundles, out = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            if r["model"] not in bundles:
                bundles[r["model"]] = compile_model(_model(r["model"], tmp), cfg, emit_image=False)
            m = re.search(r"T=(\d+)", r.get("what", ""))
            e = estimate(bundles[r["model"]], cfg, pos=r["pos"], program=int(m.group(1)) if m else None,
                         memory=memory)
            out.append({**r, **_model_cols(e, r["rtl_cycles"])})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--attention", default=None, choices=("sfu", "chains"),
                    help="the configuration's attention engine instead of its own")
    ap.add_argument("--models", default="tiny,tiny-wide")
    ap.add_argument("--positions", default=None, help="comma-separated (default: 0, context/2, context-1)")
    ap.add_argument("--memory", default="ideal", help="RTL and model memory timing: ideal or card")
    ap.add_argument("--ops", action="store_true", help="per-kind instruction streams too")
    ap.add_argument("--mv", action="store_true",
                    help="also each distinct MV of the decode program alone and 8 times in a row "
                         "(the activation cache hit after the first): MvExec's fixed and per-row costs")
    ap.add_argument("--prefill", type=int, default=2,
                    help="also run this prefill bucket at each position where it fits (0: none)")
    ap.add_argument("--build-dir", default=None,
                    help="a Verilator build of the configuration's accelerator to reuse as is")
    ap.add_argument("--json", default=None, help="write every row to this file")
    ap.add_argument("--from-json", default=None,
                    help="no simulation: print (and --write-docs) the tables of a run saved with --json")
    ap.add_argument("--remodel", action="store_true",
                    help="with --from-json: the model's columns again from the current sim/perf.py "
                         "(the RTL's as saved)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)

    from llmfab.boards.config import load_config
    from llmfab.compiler import isa
    from llmfab.compiler.compile import compile_model
    from llmfab.host.golden_backend import GoldenDevice
    from llmfab.host.rtl_backend import exec_factory
    from llmfab.sim.perf import estimate, sfu_lanes
    from llmfab.sim.rtl.harness import RtlAccelerator

    cfg = load_config(args.config)
    if args.attention:
        from rtl_prefill import with_lanes
        cfg = with_lanes(cfg, cfg.chain.tokens, args.attention)
    rows, oprows, mvrows = [], [], []
    t_all = time.perf_counter()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows, oprows, mvrows = saved["rows"], saved.get("ops", []), saved.get("mv", [])
        args.memory = saved.get("memory", args.memory)
        cfg = load_config(saved.get("config") or rows[0]["config"])
        if args.remodel:
            rows = _remodel(rows, cfg, args.memory)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for mname in args.models.split(","):
                m = _model(mname, tmp)
                b = compile_model(m, cfg)
                ctx = int(b.manifest["context"])
                positions = ([int(p) for p in args.positions.split(",")] if args.positions
                             else [0, ctx // 2, ctx - 1])
                kv0, kvn = (int(x) for x in b.manifest["memory_map"]["kv"])
                vocab = int(b.manifest["model"]["vocab_size"])
                rng = np.random.default_rng(1)
                toks = [int(t) for t in rng.integers(0, vocab, ctx)]
                factory, _ = exec_factory(cfg)
                gold = GoldenDevice(m, cfg, bundle=b)
                with RtlAccelerator(cfg, b, exec_factory=factory, memory=args.memory, build_dir=args.build_dir,
                                    progress=lambda s: print(s, file=sys.stderr)) as acc:
                    for p in positions:
                        gold.reset()
                        if p:
                            gold.forward(toks[:p])
                        acc.write_hbm(kv0, gold.golden.hbm[kv0:kv0 + kvn].copy())
                        lg = gold.forward([toks[p]])[-1]
                        t0 = time.perf_counter()
                        r = acc.run(p, toks[p])
                        wall = time.perf_counter() - t0
                        if r.timed_out or r.status != isa.STATUS_OK:
                            raise SystemExit(f"rtl run at position {p} ended with status {r.status} at {r.pc}")
                        exact = bool(np.array_equal(acc.logits().view(np.uint32), lg.view(np.uint32)))
                        e = estimate(b, cfg, pos=p, memory=args.memory)
                        row = _row(cfg, mname, p, r.counters, e, exact, wall)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        T = args.prefill
                        if T in b.prefill and p + T <= ctx:
                            rows.append(_prefill_row(acc, gold, b, cfg, mname, p, T, toks, args.memory))
                            print(json.dumps(rows[-1]), flush=True)
                    if args.ops:
                        old = acc.program
                        pos = positions[-1]
                        for kind, (prog, count) in sorted(op_programs(b.program).items()):
                            acc.load_program(prog)
                            r = acc.run(pos, toks[pos])
                            if r.timed_out or r.status != isa.STATUS_OK:
                                print(f"{kind}: status {r.status} at {r.pc}", file=sys.stderr)
                                continue
                            e = estimate(dataclasses.replace(b, program=prog, prefill={}), cfg, pos=pos,
                                         memory=args.memory)
                            orow = {"model": mname, "kind": kind, "count": count, "pos": pos,
                                    "rtl_busy_cmp": int(r.counters["busy_cmp"]),
                                    "model_busy_cmp": e.compute_cycles,
                                    "rtl_exec": int(r.counters["exec_cycles"]), "model_exec": e.exec_cycles,
                                    "error": round(e.compute_cycles / max(int(r.counters["busy_cmp"]), 1) - 1, 4)}
                            oprows.append(orow)
                            print(json.dumps(orow), flush=True)
                        acc.load_program(old)
                    if args.mv:
                        mvrows += _mv_rows(acc, b, cfg, mname, positions[-1], args.prefill)
    wall = time.perf_counter() - t_all
    lanes = sfu_lanes(cfg)
    table = [f"`{cfg.name}` ({cfg.hbm.ports} x {cfg.hbm.data_width}-bit port(s), {cfg.chain.count} x "
             f"{cfg.chain.length} chains, SFU {lanes} lanes), {args.memory} memory; cycles of one "
             f"decode step (validation + execution):", "",
             "| model | position | RTL cycles | model cycles | error | RTL busy LD / MV / MISC | "
             "model LD / MV / MISC | logits = golden |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['model']} | {r['pos']}{r.get('what', '')} | {r['rtl_cycles']:,} | {r['model_cycles']:,} | "
                     f"{r['error'] * 100:+.1f}% | {r['rtl_busy_ld']:,} / {r['rtl_busy_mv']:,} / "
                     f"{r['rtl_busy_misc']:,} | {r['model_busy_ld']:,} / {r['model_busy_mv']:,} / "
                     f"{r['model_busy_misc']:,} | {'yes' if r['logits_bit_exact'] else 'NO'} |")
    if oprows:
        table += ["", "Each kind of compute instruction alone (the decode program's, at position "
                  f"{oprows[0]['pos']}; compute-queue busy cycles):", "",
                  "| model | kind | instructions | RTL | model | error |", "|---|---|---|---|---|---|"]
        for r in oprows:
            table.append(f"| {r['model']} | {r['kind']} | {r['count']} | {r['rtl_busy_cmp']:,} | "
                         f"{r['model_busy_cmp']:,} | {r['error'] * 100:+.1f}% |")
    if mvrows:
        table += ["", "Each distinct MV alone, once and 8 times in a row (MvExec busy cycles; "
                  "per repeat = (8x - 1x) / 7, the activation cache hit):", "",
                  "| model | program | rows x cols | format | RTL 1x | model 1x | RTL per repeat | model per repeat |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mvrows:
            what = f"{r.get('op', 'MV')}" + (f" x {r['ntok']} tokens" if r.get("ntok", 1) > 1 else "")
            lay = r.get("layout", "rows")
            shape = f"{r['rows']} x {r['cols']}" + (f" ({lay})" if lay != "rows" else "")
            table.append(f"| {r['model']} | {r.get('program', 'decode')} {what} | {shape} | {r['format']} | "
                         f"{r['rtl_1x']} | {r['model_1x']:.0f} | {r['rtl_repeat']:.1f} | {r['model_repeat']:.0f} |")
    md = "\n".join(table)
    print(md)
    print(f"({wall:.0f} s)", file=sys.stderr)
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg.name, "memory": args.memory, "rows": rows, "ops": oprows,
                       "mv": mvrows}, f, indent=1)
    if args.write_docs:
        from perf_model import _write        # benchmarks/: the docs block writer, one home
        _write(md, f"perf_calibration {cfg.name}")
    bad = [r for r in rows if abs(r["error"]) > 0.10 or not r["logits_bit_exact"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
