"""hw/dma.py's small stream units in Amaranth's simulator.

:class:`~llmfab.hw.dma.LineHalves` sits between a row pipeline's line reader and its decoder
on 64-byte slices (hw/mv_exec.py): per row it must pass exactly the half-lines that hold the
row's bytes, dropping a leading upper-half skip and a trailing lower-half leftover, with
random stalls on every stream and no idle cycle between rows.
"""

import numpy as np
import pytest
from amaranth.sim import Simulator

from llmfab.hw.dma import LineHalves


def _rows(rng, n_rows, half_bytes):
    """Per row: (skip, n, lines, expected halves), as MvSlice computes them from a row's byte
    offset in its first line and its length."""
    out = []
    for _ in range(n_rows):
        off = int(rng.integers(0, 2 * half_bytes))
        nbytes = int(rng.choice([1, 6, 18, 34, 324, int(rng.integers(1, 400))]))
        if rng.random() < 0.05:
            nbytes = 0
        line_b = 2 * half_bytes
        count = (off + nbytes + line_b - 1) // line_b if nbytes else 0
        skip = off // half_bytes
        n = (off + nbytes + half_bytes - 1) // half_bytes - skip if nbytes else 0
        lines = [int(rng.integers(0, 1 << 62)) << (8 * half_bytes) | int(rng.integers(0, 1 << 62))
                 for _ in range(count)]
        halves = []
        for ln in lines:
            halves += [ln & ((1 << 8 * half_bytes) - 1), ln >> (8 * half_bytes)]
        out.append((skip, n, lines, halves[skip:skip + n]))
    return out


@pytest.mark.parametrize("stall", [0.0, 0.3])
def test_line_halves_pass_each_rows_halves_only(stall):
    H = 8                                   # 8-byte halves of 16-byte lines (the logic is width-free)
    dut = LineHalves(H)
    rng = np.random.default_rng(7 + int(stall * 10))
    rows = _rows(rng, 120, H)
    cmds = [(s, n) for s, n, _, _ in rows]
    lines = [ln for _, _, ls, _ in rows for ln in ls]
    want = [h for *_, hs in rows for h in hs]
    got = []
    cycles = [0]

    async def bench(ctx):
        ci = li = 0
        pr = np.random.default_rng(99)
        while len(got) < len(want) or ci < len(cmds) or li < len(lines):
            cv = ci < len(cmds) and pr.random() >= stall
            lv = li < len(lines) and pr.random() >= stall
            rd = pr.random() >= stall
            ctx.set(dut.cmd.valid, cv)
            if cv:
                ctx.set(dut.cmd.payload.skip, cmds[ci][0])
                ctx.set(dut.cmd.payload.n, cmds[ci][1])
            ctx.set(dut.i.valid, lv)
            if lv:
                ctx.set(dut.i.payload, lines[li])
            ctx.set(dut.o.ready, rd)
            ct = cv and ctx.get(dut.cmd.ready)
            lt = lv and ctx.get(dut.i.ready)
            if rd and ctx.get(dut.o.valid):
                got.append(ctx.get(dut.o.payload))
            await ctx.tick()
            ci += bool(ct)
            li += bool(lt)
            cycles[0] += 1
            assert cycles[0] < 20 * (len(want) + len(cmds)) + 100, "LineHalves hangs"

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert got == want
    if stall == 0.0:
        # every stream always ready: one half per cycle, rows back to back (an empty row's
        # command and each row's command take no cycle of their own beyond the first)
        assert cycles[0] <= len(want) + sum(1 for _, n in cmds if n == 0) + 2, cycles[0]
