"""Benchmark: prefill of SmolLM2 prompts on the simulated accelerator (Verilator).

    .venv/bin/python benchmarks/rtl_prefill.py [--config ci] [--lanes 1,2] [--prompts 8,32]
        [--attention chains] [--write-docs] [--plot docs/img/rtl_prefill.png]

For each token-lane count (``chain.tokens``; the configuration as given, with only that
field changed, so each is its own Verilator build; ``--attention`` also sets where attention
runs, as ``perf_model.py`` does for its projections: ``u280-slice`` is two slices of ``u280``,
whose attention runs on the chains) and each prompt length ``n`` (the first
``n`` tokens of a fixed text): the prompt runs through the bundle's prefill programs on the
rtl backend as ``llmfab generate`` runs it (greedy buckets; every run but the last through
its bucket's KV-only program, which skips the LM head, and the last through its
last-logits program, which runs the LM head for the last token only: ``Device.forward_last``; with
``--all-logits`` every run through the full prefill program, as ``llmfab logits`` runs a
prompt) and, for reference, through the golden backend; reported per run:

* cycles of the whole prompt (every prefill run, plus a decode run for an odd last token),
  prefill tokens/s and time to first token at the configuration's clock;
* chain MAC utilization: the MACs the prompt's MV/MM instructions do (rows x cols x tokens,
  from the programs) over the cycles times the MACs the chains can do per cycle
  (``prefill_macs_per_cycle``), over the whole prompt and over the cycles the MV/MM unit was
  busy (``busy_mv``);
* whether the prompt's logits (the last token's; every token's with ``--all-logits``) and
  the KV cache equal the golden model's, bit for bit.

One JSON line per (lanes, prompt); ``--write-docs`` puts the table in docs/benchmarks.md.

**Sharded and resumable** (long prompts: a 128-token prompt on ``ci-chains`` is ~115 M
simulated cycles, about an hour and a half on one core)::

    .venv/bin/python benchmarks/rtl_prefill.py --config ci-chains --lanes 2 --prompts 128 \
        --results pf.jsonl --shard 0/2 &      # and --shard 1/2 beside it, on another core
    .venv/bin/python benchmarks/rtl_prefill.py --config ci-chains --lanes 2 --prompts 128 \
        --results pf.jsonl                    # the table, once every run is in pf.jsonl

With ``--shard K/N`` a process simulates the distinct runs ``j`` of the prompts with ``j % N ==
K`` only (a run that several prompts share, the same start, length and kind, is simulated once
and recorded under each), each from the golden model's state before it (its KV cache copied
into the simulation's HBM, as ``perf_calibration.py`` does for decode steps; the golden
backend runs the whole prompt), and appends one line per run to ``--results`` (logits and the
KV cache after the run compared with the golden model's, bit for bit). Runs already in the file
(the same kind of program, a line's ``logits``, True, False or "last", and the same program:
its ``program``, the hash of the program's bytes) are skipped, so a shard stopped part way
resumes where it was, and a compiler that emits other programs measures them anew (the key's
configuration hash names the hardware; a change to the RTL that keeps the configuration
needs a results file of its own). If every run maps the golden state before it to the
golden state after it, bit for bit, so does the whole prompt. Without ``--shard``,
``--results`` only reads the file: the rows of the (lanes, prompt) pairs whose runs are all
there, or which runs are missing.
"""

import argparse
import hashlib
import json
import sys
import time

import numpy as np

from llmfab.boards.config import check_fits, config_from_dict, load_config
from llmfab.compiler import isa
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.compiler.tokenizer import Tokenizer
from llmfab.host.golden_backend import GoldenDevice
from llmfab.host.rtl_backend import RtlDevice

TEXT = ("Once upon a time, in a small village at the edge of a great forest, there lived an old "
        "clockmaker and his granddaughter. Every morning the two of them opened the shop, wound "
        "the clocks on the walls and listened to them tick together, and every evening they "
        "walked to the river to watch the boats come home. One autumn a stranger arrived with a "
        "broken watch that no one in the country had been able to mend, and he asked the old man "
        "whether he could make it run again before the first snow. The clockmaker turned the "
        "watch over in his hands, opened its case with a thin blade and looked for a long time at "
        "the tiny wheels inside. Then he smiled, set it on the bench beside the window, and told "
        "the stranger to come back in seven days.")


def with_lanes(config, lanes: int, attention: str | None = None):
    """``config`` with ``chain.tokens`` = ``lanes`` and, if given, ``attention`` (fit-checked;
    its own hash)."""
    d = config.to_dict()
    d["chain"]["tokens"] = lanes
    if attention is not None:
        d["attention"] = attention
    c = config_from_dict(d, f"{config.name} with chain.tokens {lanes}"
                         + (f" and attention {attention}" if attention is not None else ""))
    check_fits(c)
    return c


def program_macs(program: bytes) -> int:
    """MACs of a program's MV/MM instructions: rows x cols (x ntok for MM)."""
    total = 0
    for w in isa.from_bytes(program):
        i = isa.decode(w)
        if i.op in ("MV", "MM"):
            total += i["rows"] * i["cols"] * (max(i["ntok"], 1) if i.op == "MM" else 1)
    return total


def _macs_of(bundle) -> dict:
    """{(bucket T, logits): MACs of its program's MV/MM instructions}: the decode program at
    (1, True), the KV-only programs at (T, False), the last-logits ones at (T, "last")."""
    return {**{(T, True): program_macs(p) for T, p in bundle.prefill.items()},
            **{(T, False): program_macs(p) for T, p in bundle.prefill_kv.items()},
            **{(T, "last"): program_macs(p) for T, p in bundle.prefill_last.items()},
            (1, True): program_macs(bundle.program)}


def _counted(rtl, first_run: int, first_dec: int) -> tuple:
    """(cycles, busy_mv, runs) of the rtl backend's runs since ``first_run`` prefill runs and
    ``first_dec`` decode runs (an odd last token runs the decode program); ``runs``: (tokens,
    logits) of each, prefill runs first."""
    pre, dec = rtl.prefill_runs[first_run:], rtl.runs[first_dec:]
    return (sum(r["cycles"] for r in pre) + sum(r.cycles for r in dec),
            sum(r["busy_mv"] for r in pre) + sum(r.counters.get("busy_mv", 0) for r in dec),
            [(r["tokens"], r["logits"]) for r in pre] + [(1, True)] * len(dec))


def _prompt_row(config, n: int, runs, cycles: int, busy_mv: int, macs: int, **rest) -> dict:
    """One row of the table: a prompt of ``n`` tokens in ``runs``, (tokens, logits) each."""
    peak = config.prefill_macs_per_cycle
    secs = cycles / (config.clock_mhz * 1e6)
    return {"config": config.name, "attention": config.attention, "lanes": config.chain.tokens,
            "prompt_tokens": n,
            "buckets": [T for T, _ in runs], "kv_only_runs": sum(not lg for _, lg in runs),
            "last_logits_runs": sum(lg == "last" for _, lg in runs),
            "cycles": cycles, "cycles_per_token": round(cycles / n),
            "tokens_per_s": round(n / secs, 1), "ttft_ms": round(1e3 * secs, 2),
            "mac_utilization": round(macs / (cycles * peak), 3),
            "mac_utilization_mv_busy": round(macs / (busy_mv * peak), 3) if busy_mv else 0.0,
            "mv_busy_fraction": round(busy_mv / cycles, 3), **rest}


def run(config, model, prompts, tok_ids, all_logits: bool = False):
    bundle = compile_model(model, config)
    t = time.perf_counter()
    rtl = RtlDevice(model, config, bundle=bundle)
    build = time.perf_counter() - t
    gold = GoldenDevice(model, config, bundle=bundle)
    kv0, kvn = (int(v) for v in bundle.manifest["memory_map"]["kv"])
    macs_of = _macs_of(bundle)
    rows = []
    try:
        for n in prompts:
            toks = tok_ids[:n]
            rtl.reset()
            gold.reset()
            first_run = len(rtl.prefill_runs)
            first_dec = len(rtl.runs)
            t = time.perf_counter()
            lr = rtl.forward(toks) if all_logits else rtl.forward_last(toks)
            wall = time.perf_counter() - t
            lg = gold.forward(toks) if all_logits else gold.forward_last(toks)
            cycles, busy_mv, runs = _counted(rtl, first_run, first_dec)
            row = _prompt_row(
                config, n, runs, cycles, busy_mv, sum(macs_of[r] for r in runs),
                logits_bit_exact=bool(np.array_equal(lr.view(np.uint32), lg.view(np.uint32))),
                kv_bit_exact=bool(np.array_equal(rtl.acc.read_hbm(kv0, kvn), gold.golden.hbm[kv0:kv0 + kvn])),
                build_seconds=round(build, 1), wall_seconds=round(wall, 1))
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        rtl.close()
    return rows


def _key(config, n: int, all_logits: bool) -> str:
    """The results file's key of a (configuration with its lanes, prompt length, logits) triple."""
    return (f"{config.name}/{config.config_hash()}/lanes{config.chain.tokens}/prompt{n}"
            + ("" if all_logits else "/last"))


def _read_results(paths) -> dict:
    """{(key, run index): line} of results files (``paths``: comma-separated; later lines
    win; a torn last line is skipped)."""
    out = {}
    for path in paths.split(","):
        try:
            with open(path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    out[(r["key"], r["run"])] = r
        except FileNotFoundError:
            pass
    return out


def _plan(bundle, n: int, all_logits: bool) -> list:
    """The prompt's runs as the backends split it: (index, start position, tokens, logits):
    every run but the last KV-only (``Device.forward_last``) unless ``all_logits``."""
    from llmfab.host.runtime import prompt_plan
    buckets = [int(t) for t in bundle.manifest["prefill"]["buckets"]]
    out, pos = [], 0
    for i, (T, logits) in enumerate(prompt_plan(n, buckets, 0, bundle.prefill_align, bundle.prefill_kv,
                                                last=not all_logits, last_only=bundle.prefill_last)):
        out.append((i, pos, T, logits))
        pos += T
    return out


def _program_id(bundle, T: int, logits) -> str:
    """The identity of the program a run of ``T`` tokens of kind ``logits`` runs (the decode
    program for one token): the first 16 hex digits of its bytes' sha256. A results line holds
    it, and stands for a run only while the compiler emits the same program (the configuration
    hash in the key names the hardware)."""
    from llmfab.compiler.bundle import prefill_program
    name = "decode" if T == 1 else prefill_program(T, logits)
    return hashlib.sha256(bytes(bundle.named_program(name)[0])).hexdigest()[:16]


def _same_run(line, logits, program: str) -> bool:
    """Whether a results line stands for a run of kind ``logits`` through ``program``."""
    return line is not None and line["logits"] == logits and line.get("program") == program


def _one_run(dev, pos: int, toks: list, logits: bool):
    """Run one of a prompt's runs on a program device at ``pos`` (its logits, or None)."""
    dev.pos = pos
    if len(toks) == 1:
        out = dev._decode(pos, toks[0])
    else:
        out = dev._prefill(pos, toks, logits=logits)
    dev.pos = pos + len(toks)
    return out


def _distinct_runs(plans: dict) -> dict:
    """{(start position, tokens, logits): [(prompt length, run index), ...]} over ``plans``
    ({prompt length: its runs}), in first-seen order: the prompts are prefixes of one text, so
    a run of the same start, length and kind is the same simulation in every prompt that has
    it (the 8-token prompt's first three runs are the 32-token prompt's and the 128-token
    prompt's)."""
    out = {}
    for n, plan in plans.items():
        for i, pos, T, logits in plan:
            out.setdefault((pos, T, logits), []).append((n, i))
    return out


def run_shard(config, model, prompts, tok_ids, results: str, k: int, n_shards: int,
              all_logits: bool = False):
    """Simulate the distinct runs ``j % n_shards == k`` of the prompts (:func:`_distinct_runs`:
    a run the prompts share is simulated once and recorded under each of them), each from the
    golden state before it, appending one line per prompt run to ``results`` (runs already
    there are skipped; a distinct run one of whose prompt runs is there is copied, not run)."""
    bundle = compile_model(model, config)
    done = _read_results(results)
    plans = {n: _plan(bundle, n, all_logits) for n in prompts}
    todo = {}                       # the first prompt that has it -> {its run index: members}
    for j, ((_, T, logits), members) in enumerate(_distinct_runs(plans).items()):
        keyed = [(_key(config, n, all_logits), i) for n, i in members]
        # a line of another program (a last run recorded before the last-logits programs, or
        # any run through what an older compiler emitted) is not this run
        prog = _program_id(bundle, T, logits)
        ok = {m for m in keyed if _same_run(done.get(m), logits, prog)}
        missing = [m for m in keyed if m not in ok]
        if j % n_shards != k or not missing:
            continue
        have = next((done[m] for m in keyed if m in ok), None)
        if have is not None:        # measured under another prompt (an earlier, undeduplicated run)
            for key, i in missing:
                _record(results, key, dict(have, run=i))
            continue
        n0, i0 = members[0]
        todo.setdefault(n0, {})[i0] = missing
    if not todo:
        return
    rtl = RtlDevice(model, config, bundle=bundle)
    gold = GoldenDevice(model, config, bundle=bundle)
    kv0, kvn = (int(v) for v in bundle.manifest["memory_map"]["kv"])
    try:
        for n, mine in todo.items():
            gold.reset()
            for i, pos, T, logits in plans[n]:
                if i > max(mine):
                    break
                toks = tok_ids[pos:pos + T]
                if i not in mine:
                    _one_run(gold, pos, toks, logits)
                    continue
                rtl.acc.write_hbm(kv0, gold.golden.hbm[kv0:kv0 + kvn].copy())
                first_run, first_dec = len(rtl.prefill_runs), len(rtl.runs)
                t = time.perf_counter()
                lr = _one_run(rtl, pos, toks, logits)
                wall = time.perf_counter() - t
                lg = _one_run(gold, pos, toks, logits)
                cycles, busy_mv, _ = _counted(rtl, first_run, first_dec)
                line = {"run": i, "pos": pos, "tokens": T,
                        "logits": logits, "program": _program_id(bundle, T, logits),
                        "cycles": cycles, "busy_mv": busy_mv,
                        "logits_bit_exact": lr is None and lg is None or
                        bool(np.array_equal(lr.view(np.uint32), lg.view(np.uint32))),
                        "kv_bit_exact": bool(np.array_equal(rtl.acc.read_hbm(kv0, kvn),
                                                            gold.golden.hbm[kv0:kv0 + kvn])),
                        "wall_seconds": round(wall, 1)}
                for key, ri in mine[i]:
                    _record(results, key, dict(line, run=ri))
    finally:
        rtl.close()


def _record(results: str, key: str, fields: dict):
    """Append one run's line, ``key`` then ``fields``, to the results file (and print it)."""
    line = {"key": key, **{k: v for k, v in fields.items() if k != "key"}}
    with open(results, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)


def merge(config, model, prompts, results: str, all_logits: bool = False) -> list:
    """The rows of the (lanes, prompt) pairs whose runs are all in ``results``."""
    bundle = compile_model(model, config, emit_image=False)
    done = _read_results(results)
    macs_of = _macs_of(bundle)
    rows = []
    for n in prompts:
        plan = _plan(bundle, n, all_logits)
        key = _key(config, n, all_logits)
        got = [done.get((key, i)) for i, *_ in plan]
        got = [g if _same_run(g, p[3], _program_id(bundle, p[2], p[3])) else None for p, g in zip(plan, got)]
        missing = [p[0] for p, g in zip(plan, got) if g is None]
        if missing:
            print(f"{key}: {len(missing)} of {len(plan)} runs missing "
                  f"({', '.join(map(str, missing[:12]))}{' ...' if len(missing) > 12 else ''})",
                  file=sys.stderr)
            continue
        runs = [(T, logits) for _, _, T, logits in plan]
        row = _prompt_row(
            config, n, runs, sum(g["cycles"] for g in got),
            sum(g["busy_mv"] for g in got), sum(macs_of[r] for r in runs),
            logits_bit_exact=all(g["logits_bit_exact"] for g in got),
            kv_bit_exact=all(g["kv_bit_exact"] for g in got),
            sharded=True, wall_seconds=round(sum(g["wall_seconds"] for g in got), 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows) -> str:
    out = ["| config | attention | token lanes | prompt | runs (bucket sizes) | cycles | cycles/token | "
           "tokens/s | time to first token | MAC util. (whole prompt / MV busy) | RTL == golden |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["buckets"]
        runs = f"{len(b)} x {b[0]}" if len(set(b)) == 1 else " + ".join(map(str, b))
        kinds = [f"{r[k]} {name}" for k, name in (("kv_only_runs", "KV-only"), ("last_logits_runs", "last-logits"))
                 if r.get(k)]
        if kinds:
            runs += f" ({', '.join(kinds)})"
        out.append(f"| {r['config']} | {r.get('attention', 'sfu')} | {r['lanes']} | {r['prompt_tokens']} | {runs} | {r['cycles']:,} | "
                   f"{r['cycles_per_token']:,} | {r['tokens_per_s']:,} | {r['ttft_ms']} ms | "
                   f"{r['mac_utilization']:.3f} / {r['mac_utilization_mv_busy']:.3f} | "
                   f"{'yes' if r['logits_bit_exact'] and r['kv_bit_exact'] else 'NO'} |")
    return "\n".join(out)


#: issue 13's goal: chain MAC utilization over prefill (``prefill_bounds.py`` uses it too)
GOAL = 0.85


def plot(rows, path):
    """Tokens/s, time to first token and MAC utilization (against :data:`GOAL`) by prompt
    length, one bar per (configuration, attention, token lanes) of ``rows``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = sorted({(r["config"], r["attention"], r["lanes"]) for r in rows})
    prompts = sorted({r["prompt_tokens"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    w = 0.8 / len(cases)
    for i, case in enumerate(cases):
        def val(n, k):
            return next((r[k] for r in rows if (r["config"], r["attention"], r["lanes"]) == case
                         and r["prompt_tokens"] == n), 0)
        xs = [j + i * w for j in range(len(prompts))]
        label = f"{case[0]} ({case[1]}, {case[2]} lane{'s' if case[2] > 1 else ''})"
        for ax, key in zip(axes, ("tokens_per_s", "ttft_ms", "mac_utilization")):
            ax.bar(xs, [val(n, key) for n in prompts], w, label=label)
    titles = ("prefill tokens/s (at the clock)", "time to first token (ms)",
              "chain MAC utilization, whole prompt")
    for ax, title in zip(axes, titles):
        ax.set_xticks([j + w * (len(cases) - 1) / 2 for j in range(len(prompts))])
        ax.set_xticklabels([f"{n} tokens" for n in prompts])
        ax.set_title(title, fontsize=10)
    axes[1].set_yscale("log")
    axes[2].axhline(GOAL, color="k", linestyle="--", linewidth=1, label=f"goal {GOAL}")
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=8, loc="lower right")
    fig.suptitle("SmolLM2 prompts on the RTL (Verilator), every run bit-exact against the golden model"
                 if all(r["logits_bit_exact"] and r["kv_bit_exact"] for r in rows)
                 else "SmolLM2 prompts on the RTL (Verilator): SOME RUNS DIFFER FROM THE GOLDEN MODEL",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="ci",
                    help="configuration(s), comma-separated (each with --lanes and --attention)")
    ap.add_argument("--lanes", default="1,2", help="token-lane counts (chain.tokens), comma-separated")
    ap.add_argument("--prompts", default="8,32", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--attention", choices=("sfu", "chains"),
                    help="where attention runs (default: the configuration's own)")
    ap.add_argument("--write-docs", action="store_true", help="put the table in docs/benchmarks.md")
    ap.add_argument("--plot", help="write bar charts of tokens/s, time to first token and MAC "
                                   "utilization to this PNG")
    ap.add_argument("--results", help="a JSONL file of runs: with --shard, append to it; without, "
                                      "the table of the prompts whose runs are all in it (several "
                                      "files, comma-separated)")
    ap.add_argument("--shard", help="K/N: simulate the runs i with i %% N == K (needs --results)")
    ap.add_argument("--all-logits", action="store_true",
                    help="every run through its full prefill program (every token's logits, as "
                         "llmfab logits runs a prompt), not the runs before the last KV-only")
    args = ap.parse_args(argv)
    shard = None
    if args.shard:
        try:
            k, n_shards = (int(x) for x in args.shard.split("/"))
            if not 0 <= k < n_shards:
                raise ValueError
        except ValueError:
            ap.error(f"--shard must be K/N with 0 <= K < N, not {args.shard!r}")
        if not args.results or "," in args.results:
            ap.error("--shard needs --results (the one file the runs go to)")
        shard = (k, n_shards)
    bases = [load_config(name) for name in args.config.split(",")]
    model = load_model()
    tok_ids = Tokenizer.from_gguf(model.path).encode(TEXT)
    prompts = [int(x) for x in args.prompts.split(",")]
    if max(prompts) > len(tok_ids):
        ap.error(f"the longest prompt is {len(tok_ids)} tokens")
    rows = []
    for base, lanes in ((b, int(x)) for b in bases for x in args.lanes.split(",")):
        cfg = with_lanes(base, lanes, args.attention)
        if shard:
            run_shard(cfg, model, prompts, tok_ids, args.results, *shard, all_logits=args.all_logits)
        elif args.results:
            rows += merge(cfg, model, prompts, args.results, args.all_logits)
        else:
            rows += run(cfg, model, prompts, tok_ids, args.all_logits)
    if shard:
        return 0
    if not rows:
        return 1
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    if args.write_docs:
        from perf_model import _write
        _write(f"```sh\n.venv/bin/python benchmarks/rtl_prefill.py --config {args.config} "
               f"--lanes {args.lanes} --prompts {args.prompts}"
               f"{f' --attention {args.attention}' if args.attention else ''}"
               f"{' --all-logits' if args.all_logits else ''}"
               f"\n```\n\n{table(rows)}", "rtl-prefill")
    ok = all(r["logits_bit_exact"] and r["kv_bit_exact"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
