"""hw/dma.py's small stream units in Amaranth's simulator.

On 64-byte slices a row pipeline's :class:`~llmfab.hw.dma.LineReader` reads half-lines of its
slice's bank (hw/onchip.py's half memories): the pipelines of a pair share read port ``k`` of
both half memories through hw/mv_exec.py's ``_arbitrate_halves`` (half-line ``a`` is line
``a // 2`` of half ``a % 2``). Each reader must get exactly its run's half-lines in order, with
random stalls on the ports and the outputs, and two readers asking for different halves must
both be served in a cycle (no stall: a pair reads two half-lines a cycle).
"""

import numpy as np
import pytest
from amaranth import Module
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from llmfab.hw.dma import LineReader
from llmfab.hw.mv_exec import _arbitrate_halves
from llmfab.hw.onchip import mem_read_signature

AB = 8                 # half-line address bits (bank lines: AB - 1)
HB = 4                 # bytes per half-line (the logic is width-free)


class _Pair(wiring.Component):
    """``n`` line readers of half-lines sharing one read port of each half memory."""

    def __init__(self, n):
        self._n = n
        cmd = data.StructLayout({"line": AB, "count": 32})
        super().__init__({"cmd": In(stream.Signature(cmd)).array(n),
                          "o": Out(stream.Signature(HB * 8)).array(n),
                          "port": Out(mem_read_signature(AB - 1, HB * 8)).array(2)})

    def elaborate(self, platform):
        m = Module()
        readers = []
        for i in range(self._n):
            r = LineReader(addr_bits=AB, line_bytes=HB)
            m.submodules[f"r{i}"] = r
            wiring.connect(m, wiring.flipped(self.cmd[i]), r.cmd)
            wiring.connect(m, r.o, wiring.flipped(self.o[i]))
            readers.append(r)
        _arbitrate_halves(m, self.port, [r.mem for r in readers], "t")
        return m


def _half(a):
    return (a * 0x9E3779B1 + 12345) & ((1 << HB * 8) - 1)


def _run(n, runs, stall, seed):
    dut = _Pair(n)
    want = [[_half(a) for line, count in rs for a in range(line, line + count)] for rs in runs]
    got = [[] for _ in range(n)]
    cycles = [0]

    async def bench(ctx):
        pr = np.random.default_rng(seed)
        ci = [0] * n
        pending = [None, None]               # the address each port answers this cycle
        while any(len(g) < len(w) for g, w in zip(got, want)) or any(
                c < len(r) for c, r in zip(ci, runs)):
            for h in range(2):
                ctx.set(dut.port[h].rsp.valid, pending[h] is not None)
                if pending[h] is not None:
                    ctx.set(dut.port[h].rsp.payload, _half(2 * pending[h] + h))
                ctx.set(dut.port[h].req.ready, pr.random() >= stall)
            took = []
            for i in range(n):
                cv = ci[i] < len(runs[i])
                ctx.set(dut.cmd[i].valid, cv)
                if cv:
                    ctx.set(dut.cmd[i].payload.line, runs[i][ci[i]][0])
                    ctx.set(dut.cmd[i].payload.count, runs[i][ci[i]][1])
                rd = pr.random() >= stall
                ctx.set(dut.o[i].ready, rd)
                took.append(cv and ctx.get(dut.cmd[i].ready))
                if rd and ctx.get(dut.o[i].valid):
                    got[i].append(ctx.get(dut.o[i].payload))
            for h in range(2):
                req = dut.port[h].req
                pending[h] = (ctx.get(req.payload) if ctx.get(req.valid) and ctx.get(req.ready)
                              else None)
            await ctx.tick()
            for i in range(n):
                ci[i] += bool(took[i])
            cycles[0] += 1
            assert cycles[0] < 20 * sum(len(w) for w in want) + 200, "the readers hang"

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert got == want
    return cycles[0]


@pytest.mark.parametrize("stall", [0.0, 0.3])
def test_half_line_readers_share_a_port_of_each_half(stall):
    rng = np.random.default_rng(5 + int(stall * 10))
    runs = [[(int(rng.integers(0, 200)), int(rng.integers(1, 24))) for _ in range(40)]
            for _ in range(2)]
    _run(2, runs, stall, 11)


def test_half_line_pair_reads_two_half_lines_a_cycle():
    """Two long runs starting on the same half: after one conflict the readers fall out of
    step and each gets a half-line per cycle."""
    n = 120
    cycles = _run(2, [[(0, n)], [(40, n)]], 0.0, 1)
    assert cycles <= n + 6, cycles
