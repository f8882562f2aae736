"""hw/softmax.py's VecSoftmax (Amaranth pysim) against core.numerics.softmax, bit for bit."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from llmfab.core import numerics as nx
from llmfab.hw.softmax import VecSoftmax

F = np.float32
LENGTHS = (1, 2, 7, 8, 9, 31, 32, 33, 100, 257, 512)


def _bits(x):
    return np.asarray(x, F).view(np.uint32)


def scores(kind, n, rng):
    """Scores of one kind (already scaled, as SOFTMAX's ``fmul(a, scale)``)."""
    if kind == "normal":
        s = rng.standard_normal(n) * 3
    elif kind == "peaked":                 # one large score, the others far below
        s = rng.standard_normal(n)
        s[rng.integers(n)] = 40.0
    elif kind == "equal":
        s = np.full(n, rng.standard_normal() * 10)
    elif kind == "large":                  # large magnitudes (s - m overflows to -inf too)
        s = rng.standard_normal(n) * 1e4
        if n > 3:
            s[rng.integers(n)] = 3e38
            s[rng.integers(n)] = -3e38
    elif kind == "underflow":              # exp(s - m) near and below the normal range
        s = rng.uniform(-110, -80, n)
        s[rng.integers(n)] = 0.0
    elif kind == "masked":                 # -inf entries (a causal mask), ties at the max
        s = rng.standard_normal(n) * 2
        s[rng.random(n) < 0.3] = -np.inf
        s[rng.integers(n)] = 5.0
        s[rng.integers(n)] = 5.0
    else:
        raise ValueError(kind)
    return nx.ftz(np.asarray(s, F))


def run(unit, vectors, *, backpressure=0.0, gaps=0.0, seed=0, limit=None):
    """Send ``vectors`` through ``unit``; return the outputs (uint32 per vector, ``count``-trimmed
    and, with pad32, the padding checked) and the cycles from a vector's first input beat
    accepted to its last output beat taken."""
    L = unit.lanes
    rng = np.random.default_rng(seed)
    beats = []
    for v in vectors:
        b = _bits(v)
        nbeats = -(-len(b) // L)
        vb = []
        for i in range(nbeats):
            chunk = b[i * L:(i + 1) * L]
            raw = 0
            for k, w in enumerate(chunk):
                raw |= int(w) << (32 * k)
            for k in range(len(chunk), L):        # junk in the lanes past count
                raw |= int(rng.integers(0, 2 ** 32)) << (32 * k)
            last = i == nbeats - 1
            raw |= len(chunk) << (32 * L)
            raw |= int(last) << (32 * L + (L + 1).bit_length())
            vb.append((raw, len(chunk), last))
        beats.append(vb)
    cw = (L + 1).bit_length()
    if limit is None:
        slow = 1 + 3 * max(backpressure, gaps) / (1 - max(backpressure, gaps))
        limit = int(sum(slow * 3 * len(b) + 200 for b in beats))
    start, end = [None] * len(vectors), [None] * len(vectors)
    outs = [[] for _ in vectors]
    cycle = [0]

    async def clock_count(ctx):
        async for _ in ctx.tick():
            cycle[0] += 1

    async def producer(ctx):
        for vi, vb in enumerate(beats):
            for raw, _, _ in vb:
                while gaps and rng.random() < gaps:
                    ctx.set(unit.i.valid, 0)
                    await ctx.tick()
                ctx.set(unit.i.payload.as_value(), raw)
                ctx.set(unit.i.valid, 1)
                await ctx.tick().until(unit.i.ready)
                if start[vi] is None:
                    start[vi] = cycle[0]
            ctx.set(unit.i.valid, 0)

    async def consumer(ctx):
        vi = 0
        prng = np.random.default_rng(seed + 1)
        while vi < len(vectors):
            assert cycle[0] < limit, f"timeout at {cycle[0]}: {vi} of {len(vectors)} vectors out"
            ready = not (backpressure and prng.random() < backpressure)
            ctx.set(unit.o.ready, int(ready))
            _, _, valid, raw = await ctx.tick().sample(unit.o.valid, unit.o.payload.as_value())
            if valid and ready:
                data = [(raw >> (32 * k)) & 0xFFFFFFFF for k in range(L)]
                count = (raw >> (32 * L)) & ((1 << cw) - 1)
                last = (raw >> (32 * L + cw)) & 1
                outs[vi].append((data, count, last))
                if last:
                    end[vi] = cycle[0]
                    vi += 1

    sim = Simulator(unit)
    sim.add_clock(1e-8)
    sim.add_process(clock_count)
    sim.add_testbench(producer, background=True)
    sim.add_testbench(consumer)
    sim.run()

    results = []
    for v, ob in zip(vectors, outs):
        n = len(v)
        nbeats = -(-n // L)
        want = nbeats if not unit.pad32 else -(-n // 32) * 32 // L
        assert len(ob) == want, (n, len(ob), want)
        flat = []
        for i, (data, count, last) in enumerate(ob):
            full = L if i < nbeats - 1 else (n - (nbeats - 1) * L if i == nbeats - 1 else 0)
            assert count == full, (n, i, count, full)
            assert last == (i == want - 1)
            assert all(d == 0 for d in data[count:]), (n, i, data, count)
            flat += data[:count]
        results.append(np.array(flat, np.uint32))
    cycles = [e - s for s, e in zip(start, end)]
    return results, cycles


def check(vectors, got):
    for v, g in zip(vectors, got):
        want = _bits(nx.softmax(v))
        nan = np.isnan(want.view(F))
        assert (np.isnan(g.view(F)) == nan).all(), len(v)
        bad = np.nonzero((g != want) & ~nan)[0]
        assert not len(bad), (len(v), bad[:5], g[bad[:5]], want[bad[:5]])


KINDS = ("normal", "peaked", "equal", "large", "underflow", "masked")


@pytest.mark.parametrize("lanes", [4, 8])
def test_softmax_bit_exact(lanes):
    """Every length and kind, random input gaps and output back-pressure, vectors back to back."""
    rng = np.random.default_rng(lanes)
    unit = VecSoftmax(lanes=lanes, max_len=512)
    vectors = [scores(kind, n, rng) for n in LENGTHS for kind in KINDS]
    got, _ = run(unit, vectors, backpressure=0.4, gaps=0.2, seed=lanes)
    check(vectors, got)


def test_softmax_pad32():
    """pad32: +0.0 beats (count 0) up to a multiple of 32 elements, ``last`` on the final one."""
    rng = np.random.default_rng(3)
    unit = VecSoftmax(lanes=8, max_len=64, pad32=True)
    vectors = [scores("normal", n, rng) for n in (1, 8, 9, 31, 32, 33, 64)]
    got, _ = run(unit, vectors, backpressure=0.3, seed=3)
    check(vectors, got)


def test_softmax_nan_inf():
    """NaN (either sign) or +inf among the scores: every output NaN, as numpy's max propagates."""
    rng = np.random.default_rng(9)
    unit = VecSoftmax(lanes=4, max_len=64)
    vectors = []
    for n, bad in ((1, np.nan), (5, np.nan), (9, -np.nan), (33, np.inf), (12, np.inf)):
        s = scores("normal", n, rng)
        s[rng.integers(n)] = bad
        vectors.append(s)
    got, _ = run(unit, vectors, backpressure=0.3, seed=9)
    check(vectors, got)
    assert all(np.isnan(g.view(F)).all() for g in got)


def test_softmax_cycles(capsys):
    """Cycles at L = 8 (first input beat to last output beat, no stalls): about 3n/L + 90."""
    rng = np.random.default_rng(5)
    unit = VecSoftmax(lanes=8, max_len=2048)
    ns = (128, 512, 2048)
    vectors = [scores("normal", n, rng) for n in ns]
    got, cycles = run(unit, vectors)
    check(vectors, got)
    with capsys.disabled():
        print("\nVecSoftmax L=8 cycles:", dict(zip(ns, cycles)))
    for n, c in zip(ns, cycles):
        assert c <= 3 * n // 8 + 100, (n, c)


def test_softmax_validated():
    with pytest.raises(ValueError, match="lanes"):
        VecSoftmax(lanes=16)
    with pytest.raises(ValueError, match="max_len"):
        VecSoftmax(lanes=8, max_len=1000)


def test_softmax_lint(tmp_path):
    from llmfab.sim.rtl.runner import to_verilog
    from test_fp import verilator_lint  # noqa: E402  (tests/rtl is on sys.path)
    unit = VecSoftmax(lanes=4, max_len=64)
    assert verilator_lint(to_verilog(unit, "vec_softmax"), "vec_softmax", tmp_path) == ""
