"""cocotb drivers for Amaranth ``lib.stream`` ports (valid/ready/payload).

An Amaranth stream port ``i`` comes out in Verilog as ``i__valid``, ``i__ready``
and ``i__payload`` (a struct payload is one packed vector). Two helpers cover
every test bench:

* :class:`StreamSource` drives ``<prefix>__valid``/``__payload``: ``await
  send(x)`` transfers one payload; ``put(x)`` queues without waiting.
  ``random_stall`` is the probability that the source idles (valid low) for a
  cycle before a beat; valid never waits for ready and, once up, stays up with
  the payload held until the transfer.
* :class:`StreamSink` drives ``<prefix>__ready``: ``await recv()`` returns the
  next payload; ``backpressure`` is the probability that ready is low in a
  cycle. ``times`` records the simulation time (ns) of every transfer (for throughput).

Payloads are packed integers, or, with ``layout=`` (an Amaranth
``data.Layout``, a ``data.Struct`` class, or anything ``data.Layout.cast``
accepts), dicts (struct fields) and lists (arrays) of integers, signed where
the field shape is signed.

Sampling: right after ``RisingEdge(clk)`` cocotb reads the values that were
present at the edge (checked under Verilator), so a transfer is
``valid and ready`` read there, and new values are written in the same step.

Example::

    src = StreamSource(dut, "i", dut.clk, layout=InLayout, random_stall=0.3)
    snk = StreamSink(dut, "o", dut.clk, backpressure=0.3)
    for x in xs:
        src.put({"a": x, "b": 1})
    ys = [await snk.recv() for _ in xs]
"""

from __future__ import annotations

import random
from collections import deque

import cocotb
from cocotb.triggers import Event, RisingEdge

__all__ = ["StreamSource", "StreamSink", "pack", "unpack"]


def _layout(layout):
    """``data.Layout.cast(layout)``, or None for a plain shape (an int width, ``signed(n)``, an enum)."""
    if layout is None:
        return None
    from amaranth.lib import data
    try:
        return data.Layout.cast(layout)
    except TypeError:
        return None


def pack(layout, value) -> int:
    """The payload bits of ``value`` (dicts for structs, lists for arrays, ints, enum members)
    in ``layout``: ``data.Layout.const(value).as_bits()``. An int is taken as the bits."""
    from amaranth.hdl import Shape
    lay = _layout(layout)
    if hasattr(value, "value") and not isinstance(value, int):      # enum member
        value = value.value
    if isinstance(value, int) or hasattr(value, "__index__"):
        width = lay.size if lay is not None else Shape.cast(layout).width
        return int(value) & ((1 << width) - 1)
    return lay.const(value).as_bits()


def unpack(layout, bits: int):
    """The inverse of :func:`pack` via ``data.Layout.from_bits``: dicts for structs, lists for
    arrays, ints (sign-extended for signed fields, enum members as their values)."""
    from amaranth.hdl import Shape
    lay = _layout(layout)
    if lay is None:
        s = Shape.cast(layout)
        bits &= (1 << s.width) - 1
        return bits - (1 << s.width) if s.signed and bits >> (s.width - 1) else bits
    return _plain(lay.from_bits(bits))


def _plain(v):
    """A ``data.Const`` as nested dicts / lists of ints."""
    import enum

    from amaranth.lib import data
    if isinstance(v, data.Const):
        lay = data.Layout.cast(v.shape())
        if isinstance(lay, data.ArrayLayout):
            return [_plain(v[i]) for i in range(lay.length)]
        return {name: _plain(v[name]) for name, _ in lay}
    if isinstance(v, enum.Enum):
        return v.value
    return int(v)


class StreamSource:
    """Drive the stream ``<prefix>__valid/__payload`` of ``dut``, reading ``__ready``.

    Parameters
    ----------
    dut, prefix, clk :
        The cocotb handle, the Amaranth port name (``"i"``), the clock handle.
    layout : optional
        Payload layout for dict/list payloads.
    random_stall : float
        Probability of an idle cycle (valid low) before each beat.
    seed : int, optional
        Seed of this source's own random generator.
    """

    def __init__(self, dut, prefix, clk, *, layout=None, random_stall=0.0, seed=None):
        self._valid = getattr(dut, f"{prefix}__valid")
        self._ready = getattr(dut, f"{prefix}__ready", None)   # None: always_ready port
        self._payload = getattr(dut, f"{prefix}__payload", None)
        self._clk = clk
        self._layout = _layout(layout)
        self._rng = random.Random(seed)
        self.random_stall = random_stall
        self.count = 0              #: beats transferred
        self.times = []             #: simulation time (ns) of each transfer
        self._queue = deque()
        self._wake = Event()
        self._idle = Event()
        self._idle.set()
        self._valid.value = 0
        self._task = cocotb.start_soon(self._run())

    def put(self, payload):
        """Queue one payload (returns at once); returns an Event set at its transfer."""
        done = Event()
        self._queue.append((payload, done))
        self._idle.clear()
        self._wake.set()
        return done

    def extend(self, payloads):
        """Queue many payloads."""
        for p in payloads:
            self.put(p)

    async def send(self, payload):
        """Transfer one payload; returns after the handshake."""
        await self.put(payload).wait()

    async def idle(self):
        """Wait until every queued payload has been transferred."""
        await self._idle.wait()

    def stop(self):
        """Stop driving (valid low); queued payloads are dropped."""
        self._task.cancel()
        self._valid.value = 0

    def _bits(self, payload):
        if self._layout is not None and not isinstance(payload, int):
            return pack(self._layout, payload)
        return int(payload)

    async def _run(self):
        current = None
        while True:
            if current is None and not self._queue:
                self._valid.value = 0
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            if current is None:
                if self.random_stall and self._rng.random() < self.random_stall:
                    self._valid.value = 0
                else:
                    current = self._queue.popleft()
                    if self._payload is not None:
                        self._payload.value = self._bits(current[0])
                    self._valid.value = 1
            await RisingEdge(self._clk)
            cycle = _now()
            if current is not None and (self._ready is None or self._ready.value):
                self.count += 1
                self.times.append(cycle)
                current[1].set()
                current = None


class StreamSink:
    """Drive ``<prefix>__ready`` of ``dut`` and collect the payloads of ``<prefix>``.

    Parameters
    ----------
    backpressure : float
        Probability that ready is low in a cycle (0: always ready).
    layout : optional
        Payload layout: payloads come back as dicts/lists instead of integers.
    """

    def __init__(self, dut, prefix, clk, *, backpressure=0.0, layout=None, seed=None):
        self._valid = getattr(dut, f"{prefix}__valid")
        self._ready = getattr(dut, f"{prefix}__ready", None)
        self._payload = getattr(dut, f"{prefix}__payload", None)
        self._clk = clk
        self._layout = _layout(layout)
        self._rng = random.Random(seed)
        self.backpressure = backpressure
        self.count = 0
        self.times = []
        self._queue = deque()
        self._got = Event()
        if self._ready is not None:
            self._ready.value = 0
        self._task = cocotb.start_soon(self._run())

    @property
    def random_stall(self):
        return self.backpressure

    @random_stall.setter
    def random_stall(self, p):
        self.backpressure = p

    def empty(self) -> bool:
        return not self._queue

    def stop(self):
        """Stop driving ready (left low)."""
        self._task.cancel()
        if self._ready is not None:
            self._ready.value = 0

    async def recv(self):
        """The next payload (waits for it)."""
        while not self._queue:
            self._got.clear()
            await self._got.wait()
        return self._queue.popleft()

    async def _run(self):
        ready = False
        while True:
            if self._ready is not None:
                ready = not (self.backpressure and self._rng.random() < self.backpressure)
                self._ready.value = int(ready)
            else:
                ready = True
            await RisingEdge(self._clk)
            cycle = _now()
            if ready and self._valid.value:
                bits = int(self._payload.value) if self._payload is not None else 0
                self._queue.append(unpack(self._layout, bits) if self._layout is not None
                                   else bits)
                self.count += 1
                self.times.append(cycle)
                self._got.set()



def _now():
    from cocotb.utils import get_sim_time
    return get_sim_time(unit="ns")
