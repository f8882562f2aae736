"""hw/control.py's CounterWriter in Amaranth's simulator.

The counter block starts on an HBM line (the low ``log2(P * S)`` bits of its address are
ignored), so beat ``i`` goes to port ``i % P`` at that port's local address ``(line +
i // P) * S``, and the writer has write channels for the first ``min(P, beats)`` ports only
(hw/top.py gives the other ports' write channels to the store engine alone).
"""

import numpy as np
import pytest
from amaranth.sim import Simulator

from llmfab.hw.control import CounterWriter


@pytest.mark.parametrize("ports,beat_bytes,n,addr", [
    (4, 16, 5, 3 * 64 + 16),      # 3 beats: ports 0..2 only; a misaligned address's line
    (2, 32, 30, 7 * 64),          # 8 beats over 2 ports, 4 each
    (32, 64, 90, 5 * 2048 + 8),   # the u280's block: 12 beats, ports 0..11
])
def test_counter_block_lands_on_the_first_ports_from_its_line(ports, beat_bytes, n, addr):
    rng = np.random.default_rng(ports * 1000 + n)
    dut = CounterWriter(ports=ports, beat_bytes=beat_bytes, n=n)
    per = beat_bytes // 8
    beats = -(-n // per)
    assert dut.ports_used == min(ports, beats) == len(dut.wr)
    values = [int(v) for v in rng.integers(0, 1 << 63, n, dtype=np.uint64)]
    line = addr // (ports * beat_bytes)
    written = {}                                      # (port, local address) -> data
    done_pulses = []

    async def bench(ctx):
        ctx.set(dut.addr, addr)
        for i, v in enumerate(values):
            ctx.set(dut.values[i], v)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        pending_b = []                                # ports owing a write response
        for cycle in range(40 * beats):
            for p, wr in enumerate(dut.wr):
                ctx.set(wr.aw.ready, int(rng.random() < 0.6))
                ctx.set(wr.w.ready, int(rng.random() < 0.6))
                ctx.set(wr.b.valid, int(p in pending_b and rng.random() < 0.7))
            aw = [(p, ctx.get(wr.aw.payload.addr)) for p, wr in enumerate(dut.wr)
                  if ctx.get(wr.aw.valid) and ctx.get(wr.aw.ready)]
            w = [(p, ctx.get(wr.w.payload.data)) for p, wr in enumerate(dut.wr)
                 if ctx.get(wr.w.valid) and ctx.get(wr.w.ready)]
            b = [p for p, wr in enumerate(dut.wr) if ctx.get(wr.b.valid) and ctx.get(wr.b.ready)]
            if ctx.get(dut.done):
                done_pulses.append(cycle)
            await ctx.tick()
            for (p, a) in aw:
                written.setdefault(p, []).append(["aw", a])
            for (p, d) in w:
                written.setdefault(p, []).append(["w", d])
                pending_b.append(p)
            for p in b:
                pending_b.remove(p)
        assert not pending_b

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()

    assert len(done_pulses) == 1
    flat = sum(v << (64 * i) for i, v in enumerate(values))
    for i in range(beats):
        p = i % ports
        local = (line + i // ports) * beat_bytes
        data = (flat >> (8 * beat_bytes * i)) & ((1 << (8 * beat_bytes)) - 1)
        ev = written[p]
        a = next(e for e in ev if e[0] == "aw")
        d = next(e for e in ev if e[0] == "w")
        assert (a[1], d[1]) == (local, data), (i, p)
        ev.remove(a)
        ev.remove(d)
    assert all(not ev for ev in written.values())
