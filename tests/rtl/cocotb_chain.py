"""cocotb tests of the DSP chain (hw/chain.py) against core.numerics.block_isum / sparse_isum.

Parameters come from the environment (set by tests/rtl/test_chain.py):
``CHAIN_LENGTH``, ``CHAIN_PACK`` (0/1), ``CHAIN_BLOCKS`` (randomized blocks),
``CHAIN_SEED``. Also holds the helpers the decoder tests share: golden block
generation and operand beats (packed with tests/rtl/tb.py's :func:`~tb.pack`, i.e.
the hardware's own layouts).
"""

import os
import random

import numpy as np

from llmfab.core.formats import SPARSITY_PATTERNS, kept_weights
from llmfab.compiler import sparse as csparse
from llmfab.hw import chain as hwchain
from llmfab.core import numerics

from tb import TB, pack, unpack

FORMATS = ("q4_0", "q4_1", "q8_0")
PATTERNS = tuple(SPARSITY_PATTERNS)


# ---- golden operand blocks -------------------------------------------------------------

def code_range(fmt):
    return {"q4_0": (-8, 7), "q4_1": (0, 15), "q8_0": (-128, 127)}[fmt]


def random_blocks(rng: np.random.Generator, n: int, fmt: str, pattern: str):
    """n random blocks of one mode, edge cases first.

    Returns a dict: ``w`` [n, K] weight codes as the spec gives them, ``idx`` [n, K]
    (zeros if dense), ``x`` [n, 32] int8 activations, ``d``/``m`` [n] fp16 bits.
    Sparse indices are legal patterns (N distinct ascending positions per group),
    except the first M blocks, which put index value i at every kept slot (the chain
    is a selection and must not care; this reaches every index value at every slot).
    """
    K = kept_weights(pattern)
    lo, hi = code_range(fmt)
    w = rng.integers(lo, hi + 1, size=(n, K))
    x = rng.integers(-128, 128, size=(n, 32))
    N, M = SPARSITY_PATTERNS[pattern]
    idx = np.zeros((n, K), np.int64)
    if pattern != "dense":
        per = K // (32 // M)                       # kept per group
        keys = rng.random((n, 32 // M, M))
        idx = np.sort(np.argsort(keys, axis=-1)[..., :per], axis=-1).reshape(n, K)
        for i in range(min(n, M)):
            idx[i] = i
    edges = [
        ("w", lo), ("w", hi), ("w", 0),                 # all min / max / zero codes
        ("x", 127), ("x", -127), ("x", -128), ("x", 0),
        ("wx", (lo, -128)), ("wx", (hi, 127)), ("wx", (lo, 127)), ("wx", (hi, -128)),
        ("wx", (lo, -127)), ("wx", (0, 0)),
    ]
    first = M if pattern != "dense" else 0
    for k, (kind, v) in enumerate(edges * 2):
        i = first + k
        if i >= n:
            break
        if kind == "w":
            w[i] = v
        elif kind == "x":
            x[i] = v
        else:
            w[i], x[i] = v
    d = rng.integers(0, 1 << 16, size=n)
    m = rng.integers(0, 1 << 16, size=n) if fmt == "q4_1" else np.zeros(n, np.int64)
    return {"w": w.astype(np.int64), "idx": idx.astype(np.int64), "x": x.astype(np.int64),
            "d": d.astype(np.int64), "m": m.astype(np.int64)}


def golden(fmt: str, pattern: str, blk):
    """(isum, sumq) int32 [n] from core.numerics (the spec)."""
    x = blk["x"]
    if pattern == "dense":
        isum = numerics.block_isum(blk["w"], x)
        sumq = x.sum(-1)
    else:
        _, M = SPARSITY_PATTERNS[pattern]
        isum, sumq = numerics.sparse_isum(blk["w"], blk["idx"], x, M)
    return np.asarray(isum, np.int64), np.asarray(sumq, np.int64)


def lane_value(fmt, pattern, blk, i, en=1):
    K = kept_weights(pattern)
    w = [int(v) for v in blk["w"][i]] + [0] * (32 - K)
    idx = ([int(v) for v in blk["idx"][i]] + [0] * 16)[:16] if pattern != "dense" else [0] * 16
    return {"en": en, "w": w, "idx": idx, "d": int(blk["d"][i]), "m": int(blk["m"][i])}


# ---- the chain tests ----------------------------------------------------------------------

def _env():
    return {
        "length": int(os.environ.get("CHAIN_LENGTH", "32")),
        "pack": bool(int(os.environ.get("CHAIN_PACK", "1"))),
        "blocks": int(os.environ.get("CHAIN_BLOCKS", "10000")),
        "seed": int(os.environ.get("CHAIN_SEED", "1")),
        "formats": tuple(os.environ.get("CHAIN_FORMATS", ",".join(FORMATS)).split(",")),
        "patterns": tuple(os.environ.get("CHAIN_PATTERNS", ",".join(PATTERNS)).split(",")),
        "report": os.environ.get("CHAIN_REPORT"),
    }


def make_beats(rng, modes, n_blocks, lanes, shuffle=True):
    """Operand beats for n_blocks blocks spread over ``modes``; returns (w, x, expected)."""
    per_mode = -(-n_blocks // len(modes))
    per_mode = -(-per_mode // lanes) * lanes
    beats = []
    for fmt, pat in modes:
        blk = random_blocks(rng, per_mode, fmt, pat)
        isum, sumq = golden(fmt, pat, blk)
        for b in range(0, per_mode, lanes):
            beats.append((fmt, pat, blk, isum, sumq, b))
    if shuffle:   # modes change from one beat to the next
        order = rng.permutation(len(beats))
        beats = [beats[i] for i in order]
    wl, xl, exp = weight_beat_layout_cached(lanes), act_layout_cached(lanes), []
    w_items, x_items = [], []
    for k, (fmt, pat, blk, isum, sumq, b) in enumerate(beats):
        en = [int(rng.random() < 0.9) for _ in range(lanes)]
        last = int(rng.random() < 0.1)
        w_items.append(pack(wl, {
            "fmt": hwchain.FORMAT_CODES[fmt], "pattern": hwchain.PATTERN_CODES[pat], "last": last,
            "lanes": [lane_value(fmt, pat, blk, b + lane, en[lane]) for lane in range(lanes)]}))
        x_items.append(pack(act_layout_cached(lanes),
                            [[int(v) for v in blk["x"][b + lane]] for lane in range(lanes)]))
        exp.append({"fmt": hwchain.FORMAT_CODES[fmt].value, "last": last, "mode": (fmt, pat),
                    "lanes": [{"en": en[lane], "isum": int(isum[b + lane]),
                               "sumq": int(sumq[b + lane]), "d": int(blk["d"][b + lane]),
                               "m": int(blk["m"][b + lane])} for lane in range(lanes)]})
    return w_items, x_items, exp


_CACHE = {}


def weight_beat_layout_cached(lanes):
    return _CACHE.setdefault(("w", lanes), hwchain.weight_beat_layout(lanes))


def act_layout_cached(lanes):
    return _CACHE.setdefault(("x", lanes), hwchain.act_beat_layout(lanes))


def check_results(got, exp, lanes, what):
    rl = hwchain.result_beat_layout(lanes)
    assert len(got) == len(exp), f"{what}: {len(got)} results for {len(exp)} beats"
    bad = []
    for k, (g, e) in enumerate(zip(got, exp)):
        r = unpack(rl, g)
        r.pop("mode", None)
        want = {key: v for key, v in e.items() if key != "mode"}
        if r != want:
            bad.append((k, e["mode"], r, want))
    assert not bad, f"{what}: {len(bad)} of {len(exp)} beats differ, first: {bad[0]}"


def _modes(env):
    return [(f, p) for f in env["formats"] for p in env["patterns"]]


import cocotb  # noqa: E402  (the helpers above are imported without a simulator)


@cocotb.test()
async def random_traffic(dut):
    """>= CHAIN_BLOCKS random blocks over every mode, mode changing per beat,
    random gaps on both inputs and random back-pressure on the output."""
    env = _env()
    lanes = env["length"] // 32
    rng = np.random.default_rng(env["seed"])
    prng = random.Random(env["seed"])
    tb = TB(dut)
    await tb.reset(3)
    w_items, x_items, exp = make_beats(rng, _modes(env), env["blocks"], lanes)
    wsrc = tb.source("weights", seed=prng.random())
    xsrc = tb.source("acts", seed=prng.random())
    sink = tb.sink("results", seed=prng.random())
    errors = []
    mon = tb.stream_rule_monitor("results", errors)
    shaper = tb.traffic_shaper(512, prng, (wsrc, xsrc), (sink,))
    t0 = tb.now_ns()
    wsrc.extend(w_items)
    xsrc.extend(x_items)
    got = await tb.collect(sink, len(exp), 100 * len(exp) + 1000)
    cycle = tb.to_cycles(tb.now_ns() - t0)
    for task in (mon, shaper):
        task.cancel()
    assert not errors, errors[0]
    check_results(got, exp, lanes, "random traffic")
    dut._log.info("random traffic: %d blocks (%d beats) in %d cycles", len(exp) * lanes,
                  len(exp), cycle)
    _report(env, {"random_blocks": len(exp) * lanes, "random_cycles": cycle})


def _report(env, values):
    if not env["report"]:
        return
    import json
    path = env["report"]
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    old.update(values)
    with open(path, "w") as f:
        json.dump(old, f, indent=1)


@cocotb.test()
async def steady_state(dut):
    """Inputs never stall, output always ready: cycles per beat for every mode, no bubbles."""
    from llmfab.core.formats import kept_weights as kw
    env = _env()
    lanes = env["length"] // 32
    rng = np.random.default_rng(env["seed"] + 7)
    tb = TB(dut)
    await tb.reset(3)
    report = {}
    n_beats = 64
    wsrc = tb.source("weights")
    xsrc = tb.source("acts")
    sink = tb.sink("results")
    for fmt, pat in _modes(env):
        w_items, x_items, exp = make_beats(rng, [(fmt, pat)], n_beats * lanes, lanes,
                                           shuffle=False)
        n_in, n_out = wsrc.count, sink.count
        wsrc.extend(w_items)
        xsrc.extend(x_items)
        got = await tb.collect(sink, len(exp), 10_000)
        check_results(got, exp, lanes, f"steady state {fmt} {pat}")
        t_out = [tb.to_cycles(t) for t in sink.times[n_out:]]
        gaps = np.diff(t_out)
        # one operand beat (L activations) per cycle at most; fewer if the DSPs do fewer
        # products per cycle than the block has kept weights (dense Q8_0 on a packed chain)
        macs = env["length"] // 2 if env["pack"] and fmt == "q8_0" else env["length"]
        want = max(1, lanes * kw(pat) // macs)
        cpb = (t_out[-1] - t_out[0]) / (len(exp) - 1)
        assert set(gaps.tolist()) == {want}, f"{fmt} {pat}: gaps {sorted(set(gaps.tolist()))}, want {want}"
        latency = t_out[0] - tb.to_cycles(wsrc.times[n_in])
        report[f"{fmt} {pat}"] = {"cycles_per_beat": cpb, "blocks_per_cycle": lanes / cpb,
                                  "latency": latency}
        dut._log.info("steady state %s %s: %.3f cycles per beat (%d blocks per beat), "
                      "latency %d cycles", fmt, pat, cpb, lanes, latency)
    _report(env, {"steady_state": report})


# ---- Verilator lint of generated Verilog (docs/hw-units.md lists the waivers) ---------------

#: Warnings Amaranth's Verilog backend produces by construction: implicit width
#: extension/truncation of its expressions, unused bits of struct views, the
#: initial value it writes next to each register's always block, module names
#: that are not file names (submodules are named ``top.sub``).
LINT_WAIVERS = ("WIDTHEXPAND", "WIDTHTRUNC", "UNUSEDSIGNAL", "PROCASSINIT", "DECLFILENAME")


def verilator_lint(verilog_text: str, name: str, workdir) -> str:
    """``verilator --lint-only -Wall`` minus :data:`LINT_WAIVERS`; the warnings ('' if clean)."""
    import subprocess
    from pathlib import Path
    from llmfab.sim.rtl.runner import verilator_env
    root = verilator_env()
    src = Path(workdir) / f"{name}.v"
    src.write_text(verilog_text)
    cmd = [os.path.join(root, "bin", "verilator"), "--lint-only", "-Wall", "--top-module", name]
    cmd += [f"-Wno-{w}" for w in LINT_WAIVERS] + [str(src)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return "\n".join(line for line in proc.stdout.splitlines() if line.startswith("%"))
