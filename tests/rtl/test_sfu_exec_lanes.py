"""hw/sfu_exec.py's SILU_MUL, EMBED, COPY and QUANT at ``lanes`` elements per cycle (4 and 8
lanes: 16- and 64-byte lines), in Amaranth's simulator, against ``sim/golden.py``'s ``Golden._misc``.

:class:`SfuExec` alone with a flat on-chip memory (tests/rtl/test_sfu_exec_chains.py's harness:
one-cycle line reads, random back-pressure on the read requests and on ``wr``); random
SILU_MUL (lengths 1 .. 300, not multiples of the lanes, unaligned operands; ±0, ±inf, NaN,
large |x| where exp overflows or flushes, binary32 subnormals in a and b), EMBED (Q4_0, Q4_1,
Q8_0, 1 .. 18 blocks at odd byte addresses; d and m binary16 subnormals, zeros, infinities
and NaNs), COPY (plain and strided) and QUANT (1 .. 33 blocks at unaligned destinations: the
d and sumq phases' chunks). The whole memory must be the golden model's, byte for
byte, except that a NaN result may differ in its payload (the hardware's NaN is canonical).
"""

import numpy as np
import pytest

from llmfab.compiler import isa

from test_sfu_exec_chains import GB, _Prog, _sim

F = isa.MISC_FUNCS


def _specials_f32(rng, n):
    """Random binary32 values with the special cases mixed in."""
    x = (rng.standard_normal(n) * 4).astype(np.float32)
    bits = x.view(np.uint32)
    r = rng.random(n)
    x[r < 0.05] = np.float32(0.0)
    x[(r >= 0.05) & (r < 0.08)] = np.float32(-0.0)
    sub = (r >= 0.08) & (r < 0.14)                      # binary32 subnormals
    bits[sub] = (rng.integers(1, 1 << 23, sub.sum()).astype(np.uint32)
                 | (rng.integers(0, 2, sub.sum()).astype(np.uint32) << 31))
    big = (r >= 0.14) & (r < 0.22)                      # exp(-x) overflows / flushes
    x[big] = (rng.choice([-1, 1], big.sum()) * rng.uniform(80, 200, big.sum())).astype(np.float32)
    x[(r >= 0.22) & (r < 0.24)] = np.float32(np.inf)
    x[(r >= 0.24) & (r < 0.25)] = np.float32(-np.inf)
    x[(r >= 0.25) & (r < 0.26)] = np.float32(np.nan)
    return x


def _f16_specials(rng, n):
    h = rng.integers(0, 1 << 16, n).astype(np.uint16)
    bad = (h & 0x7C00) == 0x7C00
    h[bad & (rng.random(n) < 0.8)] &= 0xBFFF             # mostly finite
    r = rng.random(n)
    h[r < 0.1] = rng.integers(1, 1024, (r < 0.1).sum()).astype(np.uint16)     # subnormal
    h[(r >= 0.1) & (r < 0.15)] = 0x8000
    return h


def _silu(p, n, unal=True):
    rng = p.rng
    a, b, dst = p.alloc(4 * n, unal), p.alloc(4 * n, unal), p.alloc(4 * n, unal)
    p.mem[a:a + 4 * n] = _specials_f32(rng, n).view(np.uint8)
    p.mem[b:b + 4 * n] = _specials_f32(rng, n).view(np.uint8)
    p.op("SILU_MUL", 0, ("SILU_MUL", n), dst=dst, a=a, b=b, n=n)


def _embed(p, fmt, nb, unal=True):
    rng = p.rng
    bs = {0: 18, 1: 20, 2: 34}[fmt]
    a = p.alloc(nb * bs + 3, unal) + (int(rng.integers(0, 4)) if unal else 0)
    raw = rng.integers(0, 256, (nb, bs)).astype(np.uint8)
    raw[:, 0:2] = _f16_specials(rng, nb).view(np.uint8).reshape(nb, 2)
    if fmt == 1:
        raw[:, 2:4] = _f16_specials(rng, nb).view(np.uint8).reshape(nb, 2)
    p.mem[a:a + raw.size] = raw.reshape(-1)
    dst = p.alloc(128 * nb, unal)
    p.op("EMBED", 0, ("EMBED", fmt, nb), dst=dst, a=a, n=32 * nb, aux=fmt)


def _copy(p, n, reps):
    rng = p.rng
    r = max(reps, 1)
    stride = n + int(rng.integers(0, 5)) if reps > 1 else 0
    a = p.alloc(4 * n * r)
    p.mem[a:a + 4 * n * r] = (rng.standard_normal(n * r) * 4).astype(np.float32).view(np.uint8)
    span = 4 * ((r - 1) * stride + n) if r > 1 else 4 * n
    dst = p.alloc(span)
    p.op("COPY", 0, ("COPY", n, reps), dst=dst, a=a, b=stride, n=n, aux=reps)


def _quant(p, nb, unal=True):
    """QUANT of ``nb`` blocks: its d and sumq phases write up to ``lanes`` words a cycle, as
    many as the d/sumq buffer's entry and the writer's line leave (every count of blocks mod
    the lanes and every start in the line: unaligned destinations)."""
    rng = p.rng
    n = 32 * nb
    a, dst = p.alloc(4 * n, unal), p.alloc(40 * nb, unal)
    x = (rng.standard_normal(n) * 4).astype(np.float32)
    x[rng.random(n) < 0.05] = np.float32(0.0)
    x[32 * int(rng.integers(0, nb)):][:32] = np.float32(0.0)      # an all-zero block (d 0)
    p.mem[a:a + 4 * n] = x.view(np.uint8)
    p.op("QUANT", 0, ("QUANT", nb), dst=dst, a=a, n=n)


def _check(mem, gold):
    """Byte-exact but for NaN payloads (word-aligned: every result here is 4-byte aligned)."""
    g, m = gold.view(np.uint32), mem.view(np.uint32)
    bad = np.flatnonzero(g != m)
    gf, mf = g[bad].view(np.float32), m[bad].view(np.float32)
    bad = bad[~(np.isnan(gf) & np.isnan(mf))]
    assert bad.size == 0, f"{bad.size} words differ, first at byte {4 * bad[:8]}"


def _golden(p, start):
    """The golden memory from ``start`` with the SILU_MUL operands' binary32 subnormals read as
    zeros of their sign (docs/hw-fp.md: the datapath reads a subnormal input as zero and never
    makes one; numpy computes with them); the flushed input words keep their bytes."""
    flushed = start.copy()
    w = flushed.view(np.uint32)
    sub = np.zeros(w.size, bool)
    for word, rv, what in p.ops:
        if what[0] == "SILU_MUL":
            f = isa.decode(word).fields
            for a in (f.get("a", 0), f.get("b", 0)):
                sl = slice(a // 4, a // 4 + what[1])
                sub[sl] |= ((w[sl] & 0x7F800000) == 0) & ((w[sl] & 0x7FFFFF) != 0)
    w[sub] &= np.uint32(0x80000000)
    gold = p.golden(flushed)
    gw, sw, fw = gold.view(np.uint32), start.view(np.uint32), flushed.view(np.uint32)
    keep = sub & (gw == fw)
    gw[keep] = sw[keep]
    return gold


def _dut(line, silu_lanes=None):
    from llmfab.hw.sfu_exec import SfuExec
    return SfuExec(addr_bits=18, line_bytes=line, gb_base=GB, max_len=512, max_hd=64,
                   silu_lanes=silu_lanes)


@pytest.mark.parametrize("line,silu_lanes", [(16, 4), (64, 8), (64, None)])
def test_sfu_exec_lanes_match_golden(line, silu_lanes):
    """EMBED, COPY and QUANT at ``lanes`` (4, 8); SILU_MUL at 4 and 8 lanes and the default
    (``SfuExec.default_silu_lanes``: 2)."""
    rng = np.random.default_rng(40 + line)
    p = _Prog(rng, 1, 64)
    for n in (1, 3, 7, 8, 9, 17, 64, 100, 300):
        _silu(p, n)
    for fmt in (0, 1, 2):
        for nb in (1, 2, 5):
            _embed(p, fmt, nb)
    _embed(p, 1, 18, unal=False)
    for n, reps in ((1, 0), (5, 1), (16, 2), (33, 3), (7, 4), (64, 0)):
        _copy(p, n, reps)
    for nb in (1, 2, 3, 5, 7, 9, 13, 18, 33):
        _quant(p, nb)
    order = rng.permutation(len(p.ops))
    p.ops = [p.ops[i] for i in order]
    dut = _dut(line, silu_lanes)
    assert dut.lanes == min(8, line // 4)
    assert dut.silu_lanes == (silu_lanes or min(2, dut.lanes))
    start = p.mem.copy()
    gold = _golden(p, start)
    mem = start.copy()
    _sim(dut, mem, [(w, rv) for w, rv, _ in p.ops], seed=line, stall=0.2)
    _check(mem, gold)


#: Cycles (accepting edge to done, SfuExec alone, no back-pressure) by line bytes and SILU_MUL
#: lanes: SILU_MUL n = 1536, EMBED Q4_1 / Q4_0 / Q8_0 of 576 elements (18 blocks), COPY
#: n = 576.
#: (One element per cycle before: SILU_MUL n = 1536 took 1630 cycles and EMBED Q4_1 576 919 in
#: the tiny accelerator, tests/rtl/test_sfu_exec.py::test_sfu_exec_cycles.)
CYCLES = {(16, 4): {"SILU_MUL": 458, "EMBED1": 163, "EMBED0": 163, "EMBED2": 164, "COPY": 154},
          (64, 8): {"SILU_MUL": 266, "EMBED1": 90, "EMBED0": 90, "EMBED2": 91, "COPY": 82},
          (16, None): {"SILU_MUL": 842, "EMBED1": 163, "EMBED0": 163, "EMBED2": 164, "COPY": 154},
          (64, None): {"SILU_MUL": 842, "EMBED1": 90, "EMBED0": 90, "EMBED2": 91, "COPY": 82}}


@pytest.mark.parametrize("line,silu_lanes", list(CYCLES))
def test_sfu_exec_lanes_cycles(line, silu_lanes, capsys):
    rng = np.random.default_rng(7)
    p = _Prog(rng, 1, 64)
    p.mem[:GB] = (rng.standard_normal(GB // 4) * 3).astype(np.float32).view(np.uint8)
    n = 1536
    a, b, dst = p.alloc(4 * n, False), p.alloc(4 * n, False), p.alloc(4 * n, False)
    p.op("SILU_MUL", 0, "SILU_MUL", dst=dst, a=a, b=b, n=n)
    for fmt in (1, 0, 2):
        _embed(p, fmt, 18, unal=False)
    a, dst = p.alloc(4 * 576, False), p.alloc(4 * 576, False)
    p.op("COPY", 0, "COPY", dst=dst, a=a, n=576)
    dut = _dut(line, silu_lanes)
    start = p.mem.copy()
    gold = _golden(p, start)
    mem = start.copy()
    cycles = _sim(dut, mem, [(w, rv) for w, rv, _ in p.ops], stall=0.0)
    _check(mem, gold)
    got = dict(zip(["SILU_MUL", "EMBED1", "EMBED0", "EMBED2", "COPY"], cycles))
    with capsys.disabled():
        print(f"\nSfuExec cycles, {line}-byte lines ({dut.lanes} lanes, SILU_MUL "
              f"{dut.silu_lanes}), alone: {got}")
    assert got == CYCLES[line, silu_lanes]
