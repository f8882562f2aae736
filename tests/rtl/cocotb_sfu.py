"""cocotb tests of hw/sfu.py against core.numerics (exp, recip, rsqrt, silu, add, mul, rope,
reduce_sum, vdot, rms_norm, softmax), bit for bit, ops interleaved in random order."""

import os

import cocotb
import numpy as np

from llmfab.hw.sfu import SfuIn, SfuOp, SfuOut
from llmfab.core import numerics as nx

from cocotb_fp import EDGE, bits, check, flush_in, floats, make, rand_normal
from tb import TB, throughput

N_FN = int(os.environ.get("SFU_N", "12000"))       # values per special function
N_VEC = int(os.environ.get("SFU_NVEC", "250"))      # vectors per vector op
MAX_LEN = int(os.environ["SFU_MAX_LEN"])
SEED = int(os.environ.get("SFU_SEED", "7"))
F = np.float32


def edge_f(vals):
    return bits(np.array(vals, np.float32))


def exp_inputs(rng, n):
    k = n // 5
    parts = [
        bits(rng.uniform(-110, 92, k).astype(F)),
        bits((rng.standard_normal(k) * 8).astype(F)),
        rand_normal(rng, k),                                  # every exponent
        rand_normal(rng, k, 100, 134),
        bits((np.round(rng.uniform(-150, 128, k)) / F(nx.LOG2E)).astype(F)),   # y near integers
        EDGE,
        edge_f([88.72283, 88.72284, 88.7228, -87.33654, -87.3365, -103.27893, -103.97208,
                -104.0, 1e-30, -1e-30, 2.0 ** -126, -(2.0 ** -126), 89.0, -89.0, 128 * 0.6931472,
                -150 * 0.6931472, 0.5, -0.5, 1e-7, -1e-7, -2e-8]),
    ]
    return nx.ftz(floats(np.concatenate(parts))).view(np.uint32)


def recip_inputs(rng, n, positive=False):
    k = n // 4
    parts = [rand_normal(rng, k), rand_normal(rng, k, 110, 145),
             rand_normal(rng, k, 1, 8), rand_normal(rng, k, 245, 254),
             make(rng, rng.integers(0, 2, 64), rng.integers(1, 255, 64),
                  (rng.integers(0, 64, 64) << 17) | rng.choice([0, 0x1FFFF, 0x10000], 64)),
             EDGE, edge_f([1.0, 3.0, 0.75, 2.0 ** 126, 2.0 ** 127, 1.5 * 2.0 ** 126, 2.0 ** -125])]
    x = nx.ftz(floats(np.concatenate(parts))).view(np.uint32)
    if positive:       # rsqrt: mostly non-negative, keep some negatives
        x = np.where(rng.random(len(x)) < 0.9, x & np.uint32(0x7FFFFFFF), x).astype(np.uint32)
    return x


def silu_inputs(rng, n):
    k = n // 4
    parts = [bits(rng.uniform(-120, 120, k).astype(F)), bits((rng.standard_normal(k) * 4).astype(F)),
             rand_normal(rng, k), rand_normal(rng, k, 110, 134), EDGE,
             edge_f([88.0, -88.0, 87.0, -87.0, 104.0, -104.0, 1e-20, -1e-20])]
    return nx.ftz(floats(np.concatenate(parts))).view(np.uint32)


def beats_of(op, cols, lens):
    """Vectors from per-element columns (dict name -> uint32 array), lengths in ``lens``."""
    out, pos = [], 0
    for ln in lens:
        vec = []
        for i in range(pos, pos + ln):
            b = {"op": op.value, "a": 0, "b": 0, "c": 0, "d": 0, "last": int(i == pos + ln - 1)}
            for k, v in cols.items():
                b[k] = int(v[i])
            vec.append(b)
        out.append(vec)
        pos += ln
    return out


def split_lengths(rng, n, hi=64):
    lens = []
    while n:
        ln = int(min(n, rng.integers(1, hi + 1)))
        lens.append(ln)
        n -= ln
    return lens


def elementwise_jobs(rng, n):
    """(op, list of vectors of beats, expected y0 per vector, expected y1 or None)."""
    jobs = []
    with np.errstate(all="ignore"):
        for op, x, fn in [(SfuOp.EXP, exp_inputs(rng, n), nx.exp),
                          (SfuOp.RECIP, recip_inputs(rng, n), nx.recip),
                          (SfuOp.RSQRT, recip_inputs(rng, n, positive=True), nx.rsqrt),
                          (SfuOp.SILU, silu_inputs(rng, n), nx.silu)]:
            y = bits(fn(floats(x)))
            lens = split_lengths(rng, len(x))
            vecs = beats_of(op, {"a": x}, lens)
            ys = np.split(y, np.cumsum(lens)[:-1])
            jobs += [(op, v, yy, None) for v, yy in zip(vecs, ys)]
        for op, fn in [(SfuOp.ADD, nx.fadd), (SfuOp.MUL, nx.fmul)]:
            a = flush_in(np.concatenate([rand_normal(rng, n // 4, 100, 150), rng.choice(EDGE, 200)]))
            b = flush_in(np.concatenate([rand_normal(rng, n // 4, 100, 150), rng.choice(EDGE, 200)]))
            y = bits(fn(floats(a), floats(b)))
            lens = split_lengths(rng, len(a))
            vecs = beats_of(op, {"a": a, "b": b}, lens)
            ys = np.split(y, np.cumsum(lens)[:-1])
            jobs += [(op, v, yy, None) for v, yy in zip(vecs, ys)]
        # rms_norm's scalar as a streaming op: rsqrt(fadd(fmul(ss, 1/n), eps)); sums of squares
        # from 0 through tiny (the product flushes) to huge and inf
        m = n // 8
        ss = flush_in(np.abs(np.concatenate([rand_normal(rng, m, 1, 254),
                                             np.float32([0, 1e-38, 3e38, np.inf]).view(np.uint32)]))
                      .astype(np.uint32) & np.uint32(0x7FFFFFFF))
        inv_n = bits(F(1.0) / rng.integers(1, 5000, len(ss)).astype(F))
        eps = bits(rng.choice(np.float32([1e-5, 1e-6, 0.0]), len(ss)))
        y = bits(nx.rsqrt(nx.fadd(nx.fmul(floats(ss), floats(inv_n)), floats(eps))))
        lens = split_lengths(rng, len(ss))
        vecs = beats_of(SfuOp.RMS_SCALAR, {"a": ss, "c": inv_n, "d": eps}, lens)
        jobs += [(SfuOp.RMS_SCALAR, v, yy, None)
                 for v, yy in zip(vecs, np.split(y, np.cumsum(lens)[:-1]))]
        # rope: pairs with the compiler's cos/sin tables
        cos, sin = nx.rope_tables(64, 10000.0, 512)
        m = n // 4
        pos, dim = rng.integers(0, 512, m), rng.integers(0, 32, m)
        c, s = cos[pos, dim], sin[pos, dim]
        x = (rng.standard_normal((m, 2)) * F(10.0) ** rng.uniform(-3, 3, (m, 1))).astype(F)
        y = nx.rope(x, c[:, None], s[:, None])
        lens = split_lengths(rng, m)
        vecs = beats_of(SfuOp.ROPE, {"a": bits(x[:, 0]), "b": bits(x[:, 1]), "c": bits(c),
                                     "d": bits(s)}, lens)
        y0s = np.split(bits(y[:, 0]), np.cumsum(lens)[:-1])
        y1s = np.split(bits(y[:, 1]), np.cumsum(lens)[:-1])
        jobs += [(SfuOp.ROPE, v, a0, a1) for v, a0, a1 in zip(vecs, y0s, y1s)]
    return jobs


def vec_values(rng, ln):
    kind = rng.integers(0, 6)
    if kind == 0:
        return (rng.standard_normal(ln) * F(10.0) ** rng.uniform(-5, 5)).astype(F)
    if kind == 1:
        return (rng.standard_normal(ln) * F(10.0) ** rng.uniform(-5, 5, ln)).astype(F)
    if kind == 2:                   # cancellation, -0.0 everywhere, tiny sums that flush
        v = np.full(ln, F(-0.0))
        v[rng.random(ln) < 0.2] = F(2.0 ** -126) * rng.choice([1.5, -1.75, 1.0, -1.0])
        return v
    if kind == 3:
        v = rng.integers(-4, 5, ln).astype(F)
        return np.concatenate([v, -v])[:ln].astype(F)
    if kind == 4:
        return floats(rand_normal(rng, ln, 60, 190))
    return (rng.uniform(-20, 5, ln)).astype(F)


def vector_jobs(rng, nvec):
    jobs = []
    with np.errstate(all="ignore"):
        for _ in range(nvec):
            ln = int(rng.choice([rng.integers(1, 40), rng.integers(1, 200), rng.integers(30, 100),
                                 rng.integers(1, MAX_LEN + 1)], p=[0.3, 0.3, 0.3, 0.1]))
            v = nx.ftz(vec_values(rng, ln))
            w = nx.ftz(vec_values(rng, ln))
            jobs.append((SfuOp.REDUCE_SUM, beats_of(SfuOp.REDUCE_SUM, {"a": bits(v)}, [ln])[0],
                         bits(nx.reduce_sum(v)).reshape(1), None))
            jobs.append((SfuOp.VDOT, beats_of(SfuOp.VDOT, {"a": bits(v), "b": bits(w)}, [ln])[0],
                         bits(nx.vdot(v, w)).reshape(1), None))
            # rms_norm: x of any scale, w around 1, eps 1e-5 or 1e-6
            x = nx.ftz((rng.standard_normal(ln) * F(10.0) ** rng.uniform(-4, 4)).astype(F))
            if rng.random() < 0.05:
                x[:] = 0.0
            wn = nx.ftz((1 + rng.standard_normal(ln) * F(0.2)).astype(F))
            eps = float(rng.choice([1e-5, 1e-6]))
            y = nx.rms_norm(x, wn, eps)
            cc, dd = np.full(ln, bits(F(1.0 / ln))), np.full(ln, bits(F(eps)))
            jobs.append((SfuOp.RMS_NORM, beats_of(SfuOp.RMS_NORM, {"a": bits(x), "b": bits(wn),
                                                                    "c": cc, "d": dd}, [ln])[0],
                         bits(y), None))
            # softmax: scores of different spreads, -inf masked entries, ties at the max
            s = (rng.standard_normal(ln) * F(10.0) ** rng.uniform(-2, 2)).astype(F)
            if rng.random() < 0.2:
                s[rng.random(ln) < 0.3] = -np.inf
                s[rng.integers(0, ln)] = F(1.0)
            if rng.random() < 0.1:
                s = np.round(s).astype(F)
            s = nx.ftz(s)
            jobs.append((SfuOp.SOFTMAX, beats_of(SfuOp.SOFTMAX, {"a": bits(s)}, [ln])[0],
                         bits(nx.softmax(s)), None))
    return jobs


async def run_jobs(tb, jobs, stall, bp, seed):
    pays = [b for _, vec, _, _ in jobs for b in vec]
    n_out = sum(len(y0) for _, _, y0, _ in jobs)
    outs, src, snk = await tb.run_stream("i", "o", pays, layout=SfuIn, stall=stall, bp=bp,
                                         seed=seed, out_layout=SfuOut, n_out=n_out)
    pos = 0
    per_op = {}
    for op, vec, y0, y1 in jobs:
        got = outs[pos:pos + len(y0)]
        pos += len(y0)
        g0 = np.array([o["y0"] for o in got], np.uint32)
        lasts = [o["last"] for o in got]
        assert lasts[-1] == 1 and not any(lasts[:-1]), f"{op.name}: bad last flags {lasts}"
        e = per_op.setdefault(op, [[], [], [], []])
        e[0].append(g0)
        e[1].append(y0)
        if y1 is not None:
            e[2].append(np.array([o["y1"] for o in got], np.uint32))
            e[3].append(y1)
    for op, (g, y, g1, y1) in per_op.items():
        check(f"sfu {op.name}", np.concatenate(g), np.concatenate(y), log=tb.log)
        if g1:
            check(f"sfu {op.name} y1", np.concatenate(g1), np.concatenate(y1), log=tb.log)
    return src, snk, per_op


@cocotb.test()
async def sfu_functions(dut):
    """exp, recip, rsqrt, silu (12k+ values each), add, mul, rope, interleaved."""
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED)
    jobs = elementwise_jobs(rng, N_FN)
    order = rng.permutation(len(jobs))
    jobs = [jobs[i] for i in order]
    src, snk, per_op = await run_jobs(tb, jobs, 0.3, 0.3, SEED)
    dut._log.info("sfu elementwise: %s", ", ".join(
        f"{op.name} {sum(len(y) for y in v[1])}" for op, v in per_op.items()))


@cocotb.test()
async def sfu_vectors(dut):
    """reduce_sum, vdot, rms_norm, softmax (and streaming ops between them), random order."""
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 1)
    jobs = vector_jobs(rng, N_VEC) + elementwise_jobs(rng, 400)
    order = rng.permutation(len(jobs))
    jobs = [jobs[i] for i in order]
    src, snk, per_op = await run_jobs(tb, jobs, 0.3, 0.3, SEED + 1)
    dut._log.info("sfu vectors: %s", ", ".join(
        f"{op.name} {len(v[1])} vectors" for op, v in per_op.items()))


@cocotb.test()
async def sfu_throughput(dut):
    """No stalls: streaming ops at one element per cycle; cycles of rms_norm(576), softmax(512)."""
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 2)
    x = bits(rng.uniform(-10, 10, 2000).astype(F))
    with np.errstate(all="ignore"):
        jobs = [(SfuOp.SILU, beats_of(SfuOp.SILU, {"a": x}, [2000])[0], bits(nx.silu(floats(x))),
                 None)]
    src, snk, _ = await run_jobs(tb, jobs, 0.0, 0.0, 1)
    tp = throughput(src.times)
    lat = (snk.times[0] - src.times[0]) / 10
    dut._log.info("sfu: SILU %.3f elements/cycle, latency %d cycles", tp, lat)
    assert tp == 1.0, tp
    for op, ln in [(SfuOp.RMS_NORM, 576), (SfuOp.SOFTMAX, min(512, MAX_LEN)),
                   (SfuOp.REDUCE_SUM, 576)]:
        v = (rng.standard_normal(ln)).astype(F)
        with np.errstate(all="ignore"):
            if op is SfuOp.RMS_NORM:
                cols = {"a": bits(v), "b": bits(np.ones(ln, F)), "c": np.full(ln, bits(F(1 / ln))),
                        "d": np.full(ln, bits(F(1e-5)))}
                y = bits(nx.rms_norm(v, np.ones(ln, F), 1e-5))
            elif op is SfuOp.SOFTMAX:
                cols, y = {"a": bits(v)}, bits(nx.softmax(v))
            else:
                cols, y = {"a": bits(v)}, bits(nx.reduce_sum(v)).reshape(1)
        src, snk, _ = await run_jobs(tb, [(op, beats_of(op, cols, [ln])[0], y, None)], 0.0, 0.0, 1)
        cyc = (snk.times[-1] - src.times[0]) / 10 + 1
        dut._log.info("sfu: %s of %d elements: %d cycles from first input to last output",
                      op.name, ln, cyc)
