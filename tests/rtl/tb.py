"""The testbench helper every cocotb bench in tests/rtl shares.

In the shape of cocotbext-axi's ``TB`` class: ``TB(dut)`` starts the clock and
builds the stream models (``sim/rtl/streams.py``'s :class:`StreamSource` /
:class:`StreamSink`) for the ports a scenario uses; ``await tb.reset()`` resets
the design. Scenarios are small coroutines taking their variations (stalls,
back-pressure, widths) as parameters (``@cocotb.parametrize``).

Payload bits come from the hardware's own layouts (Amaranth
``data.Layout.const(...).as_bits()`` and ``Layout.from_bits``), see :func:`pack`
and :func:`unpack`.

The pytest side: :func:`soak` gives a soak's vector count as a parameter, about
1,000 in ``make test`` and the full count under ``@pytest.mark.slow``.

Example::

    @cocotb.test()
    @cocotb.parametrize(stall=[0.0, 0.3])
    async def add(dut, stall):
        tb = TB(dut)
        await tb.reset()
        outs, src, snk = await tb.run_stream("i", "o", payloads, layout=Operands,
                                             stall=stall, bp=stall, seed=1)
"""

from __future__ import annotations

from llmfab.sim.rtl.streams import pack, unpack

__all__ = ["TB", "pack", "unpack", "soak", "SOAK_DEFAULT", "throughput"]

#: Vectors of a soak in ``make test`` (the full count runs under ``-m slow``).
SOAK_DEFAULT = 1_000


def soak(full: int, default: int = SOAK_DEFAULT):
    """``@pytest.mark.parametrize("vectors", ...)``: ``default`` vectors in the default run,
    ``full`` under ``@pytest.mark.slow`` (``make test-slow``)."""
    import pytest
    return pytest.mark.parametrize("vectors", [
        pytest.param(default, id=f"{default}"),
        pytest.param(full, id=f"{full}", marks=pytest.mark.slow),
    ])


def throughput(times, period_ns=10):
    """Items per cycle between the first and the last transfer (``times`` in ns).

    The span is rounded to whole cycles: cocotb's times in ns are floats, inexact far
    into a simulation, and a rate of one per cycle must compare equal to 1.0."""
    if len(times) < 2:
        return 1.0
    return (len(times) - 1) / round((times[-1] - times[0]) / period_ns)


class TB:
    """Clock, reset and stream models of one design under test.

    Parameters
    ----------
    dut : cocotb handle
    period_ns : int
        Clock period (the clock starts at construction).
    clk, rst : str
        Names of the clock and the (active-high, synchronous) reset.
    """

    def __init__(self, dut, *, period_ns: int = 10, clk: str = "clk", rst: str = "rst"):
        import cocotb
        from cocotb.clock import Clock
        self.dut = dut
        self.log = dut._log
        self.clk = getattr(dut, clk)
        self.rst = getattr(dut, rst)
        self.period_ns = period_ns
        cocotb.start_soon(Clock(self.clk, period_ns, unit="ns").start())

    async def reset(self, cycles: int = 2):
        """Hold reset for ``cycles`` rising edges, then one more edge with it released."""
        from cocotb.triggers import RisingEdge
        self.rst.value = 1
        for _ in range(cycles):
            await RisingEdge(self.clk)
        self.rst.value = 0
        await RisingEdge(self.clk)

    async def cycles(self, n: int = 1):
        from cocotb.triggers import ClockCycles
        await ClockCycles(self.clk, n)

    def to_cycles(self, ns) -> int:
        return int(round(ns / self.period_ns))

    def now_ns(self) -> float:
        from cocotb.utils import get_sim_time
        return get_sim_time(unit="ns")

    # ---- stream models ---------------------------------------------------------------------

    def source(self, prefix: str, *, layout=None, stall: float = 0.0, seed=None):
        """A :class:`StreamSource` on ``<prefix>__valid/ready/payload``."""
        from llmfab.sim.rtl.streams import StreamSource
        return StreamSource(self.dut, prefix, self.clk, layout=layout, random_stall=stall,
                            seed=seed)

    def sink(self, prefix: str, *, layout=None, backpressure: float = 0.0, seed=None):
        """A :class:`StreamSink` on ``<prefix>__valid/ready/payload``."""
        from llmfab.sim.rtl.streams import StreamSink
        return StreamSink(self.dut, prefix, self.clk, layout=layout, backpressure=backpressure,
                          seed=seed)

    async def run_stream(self, prefix_in, prefix_out, payloads, *, layout=None, stall=0.0,
                         bp=0.0, seed=0, out_layout=None, n_out=None):
        """Send ``payloads`` into one stream, collect as many outputs (or ``n_out``) from
        another; returns (outputs, source, sink)."""
        src = self.source(prefix_in, layout=layout, stall=stall, seed=seed)
        snk = self.sink(prefix_out, layout=out_layout, backpressure=bp, seed=seed + 1)
        src.extend(payloads)
        n_out = len(payloads) if n_out is None else n_out
        outs = [await snk.recv() for _ in range(n_out)]
        await src.idle()
        src.stop()
        snk.stop()
        return outs, src, snk

    async def collect(self, sink, n: int, limit_cycles: int):
        """``n`` payloads from ``sink`` (fails after ``limit_cycles``)."""
        from cocotb.triggers import with_timeout

        async def take():
            return [await sink.recv() for _ in range(n)]

        return await with_timeout(take(), limit_cycles * self.period_ns, "ns")

    def stream_rule_monitor(self, prefix: str, errors: list):
        """Start a coroutine asserting the stream rule on an output: once valid, valid and
        payload hold until ready. Violations are appended to ``errors``."""
        import cocotb
        from cocotb.triggers import RisingEdge
        dut = self.dut
        valid = getattr(dut, f"{prefix}__valid")
        ready = getattr(dut, f"{prefix}__ready")
        payload = getattr(dut, f"{prefix}__payload")

        async def run():
            held = None
            while True:
                await RisingEdge(self.clk)
                v = int(valid.value)
                p = int(payload.value) if v else None
                if held is not None and (not v or p != held):
                    errors.append(f"{prefix}: valid dropped or payload changed before ready")
                held = p if (v and not int(ready.value)) else None

        return cocotb.start_soon(run())

    def traffic_shaper(self, period: int, rng, sources=(), sinks=(), stalls=(0.0, 0.4, 0.8),
                       pressures=(0.0, 0.1, 0.5, 0.9)):
        """Start a coroutine re-drawing every source's random_stall and every sink's
        backpressure every ``period`` cycles (traffic changes shape during a run)."""
        import cocotb

        async def run():
            while True:
                for s in sources:
                    s.random_stall = rng.choice(stalls)
                for s in sinks:
                    s.backpressure = rng.choice(pressures)
                await self.cycles(period)

        return cocotb.start_soon(run())
