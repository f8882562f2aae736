"""cocotb tests of the weight decoder (hw/decoder.py) against compiler.quant.split_blocks
and compiler.sparse.decode_sparse, and of decoder -> chain on real GGUF blocks.

Parameters from the environment (tests/rtl/test_decoder.py): ``DEC_LANES``,
``DEC_WIDTH`` (bits per input beat), ``DEC_BLOCKS``, ``DEC_SEED``, ``DEC_REPORT``.
"""

import math
import os
import random

import numpy as np

from llmfab.core import formats
from llmfab.core.formats import SPARSITY_PATTERNS, kept_weights
from llmfab.compiler import quant
from llmfab.compiler import sparse as csparse
from llmfab.hw import chain as hwchain

import cocotb_chain as cc
from tb import TB, pack, unpack

FORMATS = cc.FORMATS
PATTERNS = cc.PATTERNS


def _random_mask(rng, nb, pattern):
    """A legal keep-mask [nb*32] for pattern (N distinct positions per group of M)."""
    if pattern == "dense":
        return np.ones(nb * 32, bool)
    N, M = SPARSITY_PATTERNS[pattern]
    per = kept_weights(pattern) // (32 // M)
    keys = rng.random((nb * 32 // M, M))
    keep = np.argsort(keys, axis=-1)[:, :per]
    mask = np.zeros((nb * 32 // M, M), bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    return mask.reshape(-1)


def random_raw_blocks(rng, fmt, nb, real=False):
    """Raw GGUF blocks of ``fmt``: random bytes (every code and fp16 bit pattern), edge
    blocks first (all-zero, all min codes, all max codes), or ``real``: llama.cpp's own
    quantization (gguf package) of random rows."""
    bb = quant.BLOCK_BYTES[fmt]
    if real:
        vals = rng.standard_normal((1, nb * 32)).astype(np.float32)
        vals[0, :32] = 0.0
        return quant.quantize_rows(fmt, vals).reshape(-1)
    raw = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
    hdr = 4 if fmt == "q4_1" else 2
    for i, byte in enumerate((0x00, 0x00, 0xFF, 0x88, 0x80, 0x7F)):
        if i < nb:
            raw[i, hdr:] = byte          # zero / min / max codes (q8: 0x80 = -128, 0x7F = 127)
            if i == 0:
                raw[i, :] = 0            # an all-zero block
    return raw.reshape(-1)


def make_matrix(rng, fmt, pattern, nb, real=False):
    """One matrix of nb blocks: (its bytes, golden per-block lane dicts).

    Golden fields come from compiler.quant.split_blocks (dense) and
    compiler.sparse.decode_sparse (sparse) -- the spec of the byte formats.
    """
    raw = random_raw_blocks(rng, fmt, nb, real=real)
    if pattern == "dense":
        data = raw.tobytes()
        q, d, m = quant.split_blocks(fmt, raw)
        vals = q.astype(np.int64)
        idx = np.zeros((nb, 16), np.int64)
    else:
        mask = _random_mask(rng, nb, pattern)
        if nb:
            mask[:32] = _random_mask(rng, 1, pattern)
        data = csparse.encode_sparse(fmt, raw, mask, pattern)
        vals, idx, d, m = csparse.decode_sparse(fmt, data, pattern, nb)
        vals = np.asarray(vals, np.int64)
    d_bits = np.asarray(d, np.float16).view(np.uint16).astype(np.int64)
    m_bits = (np.asarray(m, np.float16).view(np.uint16).astype(np.int64) if m is not None
              else np.zeros(nb, np.int64))
    lanes = []
    for b in range(nb):
        w = [int(v) for v in vals[b]] + [0] * (32 - vals.shape[1])
        ix = ([int(v) for v in idx[b]] + [0] * 16)[:16]
        lanes.append({"en": 1, "w": w, "idx": ix, "d": int(d_bits[b]), "m": int(m_bits[b])})
    return data, lanes, (vals, idx, d_bits, m_bits)


def beats_of(data: bytes, width_bits: int, rng=None, offset=0):
    """Split a matrix's bytes, starting ``offset`` bytes into the first beat, into beats (ints,
    little-endian); the bytes before it and the tail of the final beat are random garbage the
    decoder must drop."""
    nbyte = width_bits // 8

    def garbage(n):
        return bytes(rng.integers(0, 256, size=n, dtype=np.uint8)) if rng is not None else bytes(n)
    data = garbage(offset) + bytes(data)
    pad = (-len(data)) % nbyte
    data = data + garbage(pad)
    return [int.from_bytes(data[i:i + nbyte], "little") for i in range(0, len(data), nbyte)]


def row_groups(count: int, row_blocks: int, lanes: int):
    """The decoder's output beats for a command: ``(first block, blocks, last)`` each.

    Rows of ``row_blocks`` (0: one row) are cut into beats of ``lanes`` blocks; a beat never
    holds two rows; ``last`` marks a row's final beat (a short final row ends the command)."""
    row = row_blocks or count
    out = []
    for r0 in range(0, count, row):
        rn = min(row, count - r0)
        for b in range(0, rn, lanes):
            n = min(lanes, rn - b)
            out.append((r0 + b, n, int(b + n == rn)))
    return out


def expected_beats(fmt, pattern, lanes_golden, lanes, row_blocks=0):
    """Golden output beats of one matrix (tail lanes of a row's final beat zero, en = 0)."""
    out = []
    zero = {"en": 0, "w": [0] * 32, "idx": [0] * 16, "d": 0, "m": 0}
    for b0, n, last in row_groups(len(lanes_golden), row_blocks, lanes):
        grp = lanes_golden[b0:b0 + n]
        out.append({"fmt": hwchain.FORMAT_CODES[fmt].value,
                    "pattern": hwchain.PATTERN_CODES[pattern].value,
                    "last": last, "lanes": grp + [zero] * (lanes - n)})
    return out


def _row_blocks(rng, count, lanes):
    """A row length for a random command: whole command, one block, lanes, or random."""
    return int(rng.choice([0, 1, lanes, lanes + 1, int(rng.integers(1, max(count, 1) + 1))]))


def make_program(rng, modes, n_blocks, lanes, width, max_count=64, real=False, grain=None):
    """Commands, data beats and golden output beats for >= n_blocks blocks in random matrices."""
    cmds, beats, exp, info = [], [], [], []
    total = 0
    # the decoder's offsets are multiples of its grain (every block size and the beat)
    grain = grain or math.gcd(width // 8, *(formats.block_bytes(f, p) for f, p in modes))
    while total < n_blocks:
        fmt, pat = modes[int(rng.integers(len(modes)))]
        count = int(rng.integers(1, max_count + 1))
        if rng.random() < 0.05:
            count = 0                      # an empty command: nothing to decode
        rows = _row_blocks(rng, count, lanes)
        offset = 0 if rng.random() < 0.4 else grain * int(rng.integers(width // 8 // grain))
        if count:
            data, golden_lanes, fields = make_matrix(rng, fmt, pat, count, real=real)
        cmds.append(pack(_cmd_layout(), {"fmt": hwchain.FORMAT_CODES[fmt],
                                            "pattern": hwchain.PATTERN_CODES[pat], "count": count,
                                            "row_blocks": rows, "offset": offset}))
        if count:
            beats += beats_of(data, width, rng, offset)
            exp += expected_beats(fmt, pat, golden_lanes, lanes, rows)
            info.append((fmt, pat, count, rows, fields))
        total += count
    return cmds, beats, exp, info


def _cmd_layout():
    from llmfab.hw.decoder import DecodeCommand
    return DecodeCommand


def check_beats(got, exp, lanes, what):
    lay = hwchain.weight_beat_layout(lanes)
    assert len(got) == len(exp), f"{what}: {len(got)} beats for {len(exp)} expected"
    for k, (g, e) in enumerate(zip(got, exp)):
        r = unpack(lay, g)
        assert r == e, f"{what}: beat {k} differs: got {r}, want {e}"


def _env():
    return {
        "lanes": int(os.environ.get("DEC_LANES", "1")),
        "width": int(os.environ.get("DEC_WIDTH", "256")),
        "blocks": int(os.environ.get("DEC_BLOCKS", "10000")),
        "seed": int(os.environ.get("DEC_SEED", "1")),
        "formats": tuple(os.environ.get("DEC_FORMATS", ",".join(FORMATS)).split(",")),
        "patterns": tuple(os.environ.get("DEC_PATTERNS", ",".join(PATTERNS)).split(",")),
        "report": os.environ.get("DEC_REPORT"),
    }


import cocotb  # noqa: E402


@cocotb.test()
async def random_traffic(dut):
    """>= DEC_BLOCKS blocks in random matrices of every mode; random gaps on cmd and data,
    random back-pressure on the output; fields against split_blocks / decode_sparse."""
    env = _env()
    rng = np.random.default_rng(env["seed"])
    prng = random.Random(env["seed"])
    tb = TB(dut)
    await tb.reset(3)
    modes = [(f, p) for f in env["formats"] for p in env["patterns"]]
    cmds, beats, exp, info = make_program(rng, modes, env["blocks"], env["lanes"], env["width"])
    csrc = tb.source("cmd", seed=prng.random())
    dsrc = tb.source("data", seed=prng.random())
    sink = tb.sink("weights", seed=prng.random())
    errors = []
    mon = tb.stream_rule_monitor("weights", errors)
    shaper = tb.traffic_shaper(400, prng, (csrc, dsrc), (sink,))
    t0 = tb.now_ns()
    csrc.extend(cmds)
    dsrc.extend(beats)
    got = await tb.collect(sink, len(exp), 100 * len(exp) + 1000)
    cycle = tb.to_cycles(tb.now_ns() - t0)
    for task in (mon, shaper):
        task.cancel()
    assert not errors, errors[0]
    check_beats(got, exp, env["lanes"], "random traffic")
    nblocks = sum(i[2] for i in info)
    dut._log.info("random traffic: %d blocks in %d matrices, %d beats in, %d out, %d cycles",
                  nblocks, len(cmds), len(beats), len(exp), cycle)
    cc._report({"report": env["report"]}, {"random_blocks": nblocks, "random_matrices": len(cmds),
                                           "random_cycles": cycle})


@cocotb.test()
async def steady_state(dut):
    """Data never stalls, output always ready: output beats per cycle for every mode."""
    from llmfab.core.formats import block_bytes
    env = _env()
    lanes, width = env["lanes"], env["width"]
    rng = np.random.default_rng(env["seed"] + 3)
    tb = TB(dut)
    await tb.reset(3)
    report = {}
    csrc = tb.source("cmd")
    dsrc = tb.source("data")
    sink = tb.sink("weights")
    for fmt in env["formats"]:
        for pat in env["patterns"]:
            count = 256 * lanes
            data, golden_lanes, _ = make_matrix(rng, fmt, pat, count)
            exp = expected_beats(fmt, pat, golden_lanes, lanes, 32 * lanes)
            n_in, n_out = dsrc.count, sink.count
            csrc.put(pack(_cmd_layout(), {"fmt": hwchain.FORMAT_CODES[fmt],
                                             "pattern": hwchain.PATTERN_CODES[pat],
                                             "count": count, "row_blocks": 32 * lanes}))
            dsrc.extend(beats_of(data, width))
            got = await tb.collect(sink, len(exp), 100_000)
            check_beats(got, exp, lanes, f"steady state {fmt} {pat}")
            t_out = [tb.to_cycles(t) for t in sink.times[n_out:]]
            cpb = (t_out[-1] - t_out[0]) / (len(exp) - 1)
            bb = block_bytes(fmt, pat)
            # the decoder emits one beat per cycle unless the byte stream is slower
            want = max(1.0, lanes * bb / (width // 8))
            gaps = np.diff(t_out)
            if want == 1.0:
                assert set(gaps.tolist()) == {1}, f"{fmt} {pat}: bubbles {sorted(set(gaps.tolist()))}"
            else:
                assert abs(cpb - want) < 0.05, f"{fmt} {pat}: {cpb:.3f} cycles/beat, want {want:.3f}"
            latency = t_out[0] - tb.to_cycles(dsrc.times[n_in])
            report[f"{fmt} {pat}"] = {"cycles_per_beat": cpb, "blocks_per_cycle": lanes / cpb,
                                      "bytes_per_block": bb, "latency": latency}
            dut._log.info("steady state %s %s (%d B/block): %.3f cycles per beat, latency %d",
                          fmt, pat, bb, cpb, latency)
    cc._report({"report": env["report"]}, {"steady_state": report})


@cocotb.test()
async def decode_chain(dut):
    """decoder -> chain: bytes of real GGUF blocks (llama.cpp's quantizer) and real int8
    activations (core.numerics.quantize_act) in, isums out, against block_isum / sparse_isum."""
    from llmfab.core import numerics
    env = _env()
    lanes, width = env["lanes"], env["width"]
    rng = np.random.default_rng(env["seed"] + 11)
    prng = random.Random(env["seed"] + 11)
    tb = TB(dut)
    await tb.reset(3)
    modes = [(f, p) for f in env["formats"] for p in env["patterns"]]
    cmds, beats, _, info = make_program(rng, modes, env["blocks"], lanes, width, real=True)
    act_items, exp = [], []
    rl = hwchain.result_beat_layout(lanes)
    for fmt, pat, count, rows, (vals, idx, d_bits, m_bits) in info:
        x = rng.standard_normal((count, 32)).astype(np.float32) * rng.uniform(0.01, 10.0)
        qx, _, _ = numerics.quantize_act(x.reshape(-1))
        qx = qx.astype(np.int64)
        if count > 2:
            qx[0] = 127
            qx[1] = -127
        if pat == "dense":
            isum = numerics.block_isum(vals, qx)
            sumq = qx.sum(-1)
        else:
            isum, sumq = numerics.sparse_isum(vals, idx, qx, SPARSITY_PATTERNS[pat][1])
        for b0, n, last in row_groups(count, rows, lanes):
            act_items.append(pack(hwchain.act_beat_layout(lanes),
                                     [[int(v) for v in qx[b0 + i]] if i < n else [0] * 32
                                      for i in range(lanes)]))
            exp.append({"fmt": hwchain.FORMAT_CODES[fmt].value, "last": last,
                        "lanes": [{"en": 1, "isum": int(isum[b0 + i]), "sumq": int(sumq[b0 + i]),
                                   "d": int(d_bits[b0 + i]), "m": int(m_bits[b0 + i])}
                                  if i < n else {"en": 0, "isum": 0, "sumq": 0, "d": 0, "m": 0}
                                  for i in range(lanes)]})
    csrc = tb.source("cmd", seed=prng.random())
    dsrc = tb.source("data", seed=prng.random())
    asrc = tb.source("acts", seed=prng.random())
    sink = tb.sink("results", seed=prng.random())
    errors = []
    mon = tb.stream_rule_monitor("results", errors)
    shaper = tb.traffic_shaper(300, prng, (dsrc, asrc), (sink,), stalls=(0.0, 0.5),
                               pressures=(0.0, 0.1, 0.7))
    t0 = tb.now_ns()
    csrc.extend(cmds)
    dsrc.extend(beats)
    asrc.extend(act_items)
    got = await tb.collect(sink, len(exp), 100 * len(exp) + 1000)
    cycle = tb.to_cycles(tb.now_ns() - t0)
    for task in (mon, shaper):
        task.cancel()
    assert not errors, errors[0]
    assert len(got) == len(exp)
    for k, (g, e) in enumerate(zip(got, exp)):
        r = unpack(rl, g)
        assert r == e, f"decode -> chain: beat {k} differs: got {r}, want {e}"
    nblocks = sum(i[2] for i in info)
    dut._log.info("decode -> chain: %d real GGUF blocks in %d matrices, %d cycles",
                  nblocks, len(info), cycle)
    cc._report({"report": env["report"]}, {"chained_blocks": nblocks, "chained_cycles": cycle})
