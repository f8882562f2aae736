"""Memory microbenchmarks through the accelerator: streams of LD instructions on the RTL.

A stream is a program of ``count`` LDs of ``burst_bytes`` each, the i-th at
HBM address ``base + i * stride_bytes`` (wrapped inside the bundle's HBM
image), all into on-chip address 0, then END; built with compiler/isa.py's
encoder. The load engine splits each LD into per-port AXI bursts (beats
striped over the ports), so on a one-port configuration an LD is one port's
burst; on several ports, an LD of one beat with a stride of ``ports`` beats
keeps to port 0. :func:`measure` runs a stream on an :class:`RtlAccelerator`
and gives the bandwidth the ports delivered during execution, as a fraction
of the ports' peak (one beat per port per cycle) and in GB/s at the
configuration's clock.

Used by ``benchmarks/memory_bandwidth.py`` (the table and plot) and
``tests/rtl/test_rtl_memory_timing.py`` (the calibration check).
"""

from __future__ import annotations

from dataclasses import dataclass, asdict

from llmfab.compiler import isa
from llmfab.core.errors import SimError

__all__ = ["Stream", "stream_program", "measure"]

_HOFF_UNIT = 32            # LD.hoff counts 32-byte units


@dataclass(frozen=True)
class Stream:
    """One LD stream: ``count`` LDs of ``burst_bytes`` at ``stride_bytes`` apart."""

    name: str
    burst_bytes: int
    stride_bytes: int
    count: int

    def to_dict(self):
        return asdict(self)


def stream_program(stream: Stream, *, hbm_size: int, onchip_bytes: int, base: int = 0) -> bytes:
    """The LD program of ``stream`` (addresses wrap inside ``[base, hbm_size)``)."""
    if stream.burst_bytes % _HOFF_UNIT or stream.stride_bytes % _HOFF_UNIT:
        raise SimError(f"stream '{stream.name}': burst and stride must be multiples of "
                       f"{_HOFF_UNIT} bytes, not {stream.burst_bytes} and {stream.stride_bytes}")
    if stream.burst_bytes > onchip_bytes:
        raise SimError(f"stream '{stream.name}': LDs of {stream.burst_bytes} bytes exceed the "
                       f"{onchip_bytes}-byte on-chip buffer at address 0")
    unit = max(stream.stride_bytes, 4096)       # wrap whole strides: the bank pattern repeats
    span = (hbm_size - base - stream.burst_bytes) // unit * unit
    if span <= 0:
        raise SimError(f"stream '{stream.name}': HBM image of {hbm_size} bytes is too small")
    words = []
    for i in range(stream.count):
        addr = base + (i * stream.stride_bytes) % span
        words.append(isa.encode(isa.make("LD", buf=0, hreg=isa.REG_ZERO, hoff=addr // _HOFF_UNIT,
                                         len=stream.burst_bytes)))
    words.append(isa.encode(isa.make("SYS", func=isa.SYS_END)))
    return isa.to_bytes(words)


def measure(acc, stream: Stream, *, onchip_bytes: int, base: int = 0) -> dict:
    """Run ``stream`` on ``acc`` (a started RtlAccelerator) with its current memory model.

    Returns the stream's fields plus ``memory``, ``bytes`` (read by the
    ports), ``exec_cycles``, ``fraction`` (of the ports' peak), ``gbps``, the
    ports that served reads, and the timing model's counters.
    """
    prog = stream_program(stream, hbm_size=acc.hbm_size, onchip_bytes=onchip_bytes, base=base)
    old = acc.program
    acc.load_program(prog)
    try:
        r = acc.run(0, 0)
    finally:
        acc.load_program(old)
    if r.timed_out or r.status != isa.STATUS_OK:
        raise SimError(f"stream '{stream.name}' stopped with status {r.status} at {r.pc}")
    g = acc.geometry
    cycles = int(r.counters["exec_cycles"])
    nbytes = sum(int(p["rd_bytes"]) for p in r.port_bytes)
    peak = g["ports"] * g["beat_bytes"]
    return {**stream.to_dict(), "memory": r.memory, "channel_offset": acc.channel_offset,
            "bytes": nbytes, "exec_cycles": cycles,
            "fraction": round(nbytes / (cycles * peak), 4) if cycles else 0.0,
            "gbps": round(nbytes / cycles * acc.config.clock_mhz / 1e3, 3) if cycles else 0.0,
            "ports_used": sum(1 for p in r.port_bytes if p["rd_bytes"]),
            **{f"mem_{k}": v for k, v in r.memory_stats.items()}}
