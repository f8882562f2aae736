"""cocotb tests of hw/quantizer.py against core.numerics.quantize_act, bit for bit."""

import os

import cocotb
import numpy as np

from amaranth.lib import data

from llmfab.hw.quantizer import QBlock
from llmfab.core import numerics as nx

from cocotb_fp import bits, check, floats
from tb import TB, throughput

N = int(os.environ.get("Q_N", "10000"))
LANES = int(os.environ["Q_LANES"])
SEED = int(os.environ.get("Q_SEED", "3"))
IN = data.ArrayLayout(32, LANES)


def blocks(rng, n):
    """n blocks of 32: wide scale range, zeros, -0, ties, extreme and tiny amax."""
    scale = np.float32(10.0) ** rng.uniform(-30, 30, (n, 1)).astype(np.float32)
    x = (rng.standard_normal((n, 32)).astype(np.float32) * scale).astype(np.float32)
    k = n // 10
    # heavy tails / one outlier per block
    x[:k, 0] *= np.float32(1000.0)
    # small integers times a power of two: many exact x*id, RNE ties
    x[k:2 * k] = (rng.integers(-127, 128, (k, 32)) * np.float32(2.0 ** -3)).astype(np.float32)
    x[2 * k:3 * k] = (rng.integers(-4, 5, (k, 32)) * np.float32(0.5)).astype(np.float32)
    # zeros and signed zeros sprinkled, a few all-zero blocks
    z = rng.random((n, 32)) < 0.05
    x[z] = np.float32(0.0) * np.sign(rng.standard_normal(np.count_nonzero(z))).astype(np.float32)
    x[3 * k:3 * k + 8] = 0.0
    x[3 * k + 8:3 * k + 12] = -0.0
    # extreme exponents: near max finite, near min normal (recip overflow -> id inf / 0)
    x[3 * k + 12:3 * k + 40] = (rng.standard_normal((28, 32)) * np.float32(1e38)).astype(np.float32)
    tiny = (rng.standard_normal((40, 32)) * np.float32(1e-36)).astype(np.float32)
    x[3 * k + 40:3 * k + 80] = nx.ftz(tiny)
    # maxima around 127 * 2**-126, where d flushes (a zero block) or not, and id overflows
    amax = np.float32(2.0) ** rng.uniform(-126, -116, (80, 1)).astype(np.float32)
    x[3 * k + 80:3 * k + 160] = nx.ftz((rng.uniform(-1, 1, (80, 32)) * amax).astype(np.float32))
    x = nx.ftz(x)
    return x


@cocotb.test()
async def quantize(dut):
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED)
    x = blocks(rng, N)
    with np.errstate(all="ignore"):
        q, d, sumq = nx.quantize_act(x.reshape(-1))
    xb = bits(x).reshape(-1, LANES)
    pays = [[int(v) for v in row] for row in xb]
    outs, src, snk = await tb.run_stream("i", "o", pays, layout=IN, stall=0.3, bp=0.3,
                                         seed=SEED, out_layout=QBlock, n_out=N)
    got_q = np.array([o["q"] for o in outs], dtype=np.int64)
    got_d = np.array([o["d"] for o in outs], dtype=np.uint32)
    got_s = np.array([o["sumq"] for o in outs], dtype=np.int64)
    bad = np.nonzero((got_q != q).any(axis=1))[0]
    assert not len(bad), (f"q mismatch in {len(bad)} blocks; first block {bad[0]}: "
                          f"x={bits(x[bad[0]])} got {got_q[bad[0]]} expected {q[bad[0]]}")
    check("quantizer d_x", got_d, bits(d), log=dut._log)
    assert (got_s == sumq).all(), f"sumq mismatch at {np.nonzero(got_s != sumq)[0][:8]}"
    dut._log.info("quantizer: %d blocks bit-exact (q, d_x, sumq), lanes %d", N, LANES)


@cocotb.test()
async def quantize_throughput(dut):
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(SEED + 1)
    n = 400
    x = blocks(rng, n)
    with np.errstate(all="ignore"):
        q, d, sumq = nx.quantize_act(x.reshape(-1))
    pays = [[int(v) for v in row] for row in bits(x).reshape(-1, LANES)]
    outs, src, snk = await tb.run_stream("i", "o", pays, layout=IN, stall=0.0, bp=0.0,
                                         seed=SEED, out_layout=QBlock, n_out=n)
    assert (np.array([o["q"] for o in outs]) == q).all()
    tin = throughput(src.times)
    tout = throughput(snk.times)
    lat = (snk.times[0] - src.times[0]) / 10
    dut._log.info("quantizer: input %.3f beats/cycle (%d elements/cycle), output %.3f "
                  "blocks/cycle, first block out %d cycles after its first beat",
                  tin, LANES, tout, lat)
    assert tin == 1.0, tin
