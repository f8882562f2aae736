"""Memory timing: how a card's HBM or DDR behaves, for the RTL's memory model and the perf model.

A board's memory entry may carry a ``timing`` section (``boards/u280.yaml``;
every figure with its source in a YAML comment), or name another board whose
main-memory timing it borrows (``timing: u280`` in the simulation boards).
:class:`MemoryTiming` holds those figures in nanoseconds and bytes; for one
accelerator configuration :func:`timing_params` turns them into the clock
cycles of ``sim/rtl/hbm_model.cpp``'s timing model, and
:func:`sustainable_fraction` gives what that model sustains for long
sequential bursts, the figure the performance model and the utilization
reports use as the memory's sustainable peak.

Two models, chosen at run time (the simulation is the same build):

``ideal``
    Every port returns a beat every cycle, ``READ_LATENCY`` cycles after the
    address; no refresh, pages or switch. The default: bit-exactness tests
    run on it and their cycle counts never change.
``card``
    The board's ``timing`` figures: latency of a page hit and of a miss, tRC
    per bank, refresh (tREFI/tRFC), a per-burst overhead and a minimum burst
    size, and the HBM switch's cost for a port reaching another channel.
"""

from __future__ import annotations

from dataclasses import dataclass, asdict

from llmfab.core.errors import BoardError

__all__ = ["MODELS", "MemoryTiming", "TimingParams", "timing_from_fields", "timing_params",
           "sustainable_fraction", "max_burst_beats"]

#: The memory models a simulation can run, default first.
MODELS = ("ideal", "card")
#: The ideal model's read latency (cycles from AR to the first beat) and write-response latency.
IDEAL_READ_LATENCY = 24
IDEAL_WRITE_LATENCY = 8
#: AXI bursts never cross this many bytes (hw/axi.py's BURST_BYTES) and hold at most 256 beats.
_BURST_BYTES = 4096

_REQUIRED = ("standard", "read_latency_ns", "page_miss_ns", "trc_ns", "page_bytes", "banks",
             "refresh_interval_ns", "refresh_ns", "burst_overhead_ns", "min_burst_bytes",
             "cross_channel_ns", "cross_channel_slowdown")
_OPTIONAL = ("measured_sustained_gbps", "source")


@dataclass(frozen=True)
class MemoryTiming:
    """Timing figures of one kind of off-chip memory (ns, bytes).

    Attributes
    ----------
    standard : str
        ``HBM2``, ``HBM2e``, ``DDR4``.
    read_latency_ns : float
        Idle read latency of a page hit, address to first data.
    page_miss_ns : float
        What a page miss (another row open in the bank) adds to it.
    trc_ns : float
        Activate to activate in one bank (a strided stream hitting one bank
        waits this long per row).
    page_bytes, banks : int
        Row size per bank and banks per channel (row-bank-column mapping).
    refresh_interval_ns, refresh_ns : float
        tREFI and tRFC: every ``refresh_interval_ns`` the channel is busy for
        ``refresh_ns``.
    burst_overhead_ns : float
        Channel time each burst costs beyond its data (command, turnaround).
    min_burst_bytes : int
        A shorter burst holds the channel as long as this many bytes.
    cross_channel_ns : float
        Extra latency of a port reaching a channel other than its own (HBM switch).
    cross_channel_slowdown : float
        How many times slower such a port's beats move (>= 1).
    measured_sustained_gbps : float or None
        The published sustained bandwidth of the whole memory for long
        sequential bursts, the figure the calibration is checked against.
    source : str
        Where the figures come from (one line).
    """

    standard: str
    read_latency_ns: float
    page_miss_ns: float
    trc_ns: float
    page_bytes: int
    banks: int
    refresh_interval_ns: float
    refresh_ns: float
    burst_overhead_ns: float
    min_burst_bytes: int
    cross_channel_ns: float
    cross_channel_slowdown: float
    measured_sustained_gbps: float | None = None
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def timing_from_fields(t) -> MemoryTiming:
    """Validate a ``timing`` mapping (a :class:`~llmfab.boards.board.Fields`)."""
    t.check_keys(_REQUIRED, _OPTIONAL)
    standard = t.string("standard")
    ns = {k: t.number(k, allow_zero=True) for k in
          ("page_miss_ns", "trc_ns", "refresh_ns", "burst_overhead_ns", "cross_channel_ns")}
    timing = MemoryTiming(
        standard=standard, read_latency_ns=t.number("read_latency_ns"),
        page_bytes=t.integer("page_bytes"), banks=t.integer("banks"),
        refresh_interval_ns=t.number("refresh_interval_ns"),
        min_burst_bytes=t.integer("min_burst_bytes", 0),
        cross_channel_slowdown=t.number("cross_channel_slowdown"),
        measured_sustained_gbps=t.number("measured_sustained_gbps") if t.has("measured_sustained_gbps") else None,
        source=t.string("source") if t.has("source") else "", **ns)
    if timing.cross_channel_slowdown < 1:
        raise t.fail("cross_channel_slowdown", f"must be at least 1, not {timing.cross_channel_slowdown}")
    if timing.refresh_ns >= timing.refresh_interval_ns:
        raise t.fail("refresh_ns", f"must be shorter than refresh_interval_ns "
                                   f"({timing.refresh_interval_ns}), not {timing.refresh_ns}")
    return timing


@dataclass(frozen=True)
class TimingParams:
    """The timing model of ``sim/rtl/hbm_model.cpp`` in clock cycles of one configuration.

    ``to_array()`` is the parameter list ``hbm_timing()`` takes (its ``T_*`` order).
    """

    model: str
    beat_cycles: float = 1.0
    read_latency: float = IDEAL_READ_LATENCY
    write_latency: float = IDEAL_WRITE_LATENCY
    page_miss: float = 0.0
    trc: float = 0.0
    page_bytes: int = 1024
    banks: int = 16
    refresh_interval: float = 0.0
    refresh: float = 0.0
    burst_overhead: float = 0.0
    cross_latency: float = 0.0
    cross_factor: float = 1.0
    channel_offset: int = 0
    min_burst_bytes: int = 0
    channels: int = 1

    def to_array(self) -> list[float]:
        return [0.0 if self.model == "ideal" else 1.0, self.beat_cycles, self.read_latency,
                self.write_latency, self.page_miss, self.trc, float(self.page_bytes),
                float(self.banks), self.refresh_interval, self.refresh, self.burst_overhead,
                self.cross_latency, self.cross_factor, float(self.channel_offset),
                float(self.min_burst_bytes), float(self.channels)]

    def to_dict(self) -> dict:
        return asdict(self)


def _memory(config):
    return config.board_spec.main_memory


def beat_bytes(config) -> int:
    return config.hbm.data_width // 8


def max_burst_beats(config) -> int:
    """Beats of the longest burst the accelerator issues (4 KiB rule, 256-beat AXI limit)."""
    return min(_BURST_BYTES // beat_bytes(config), 256)


def channel_bytes_per_cycle(config) -> float:
    """Bytes one memory channel moves per accelerator clock cycle (its nominal rate)."""
    return _memory(config).bandwidth_gbps_per_channel * 1e3 / config.clock_mhz


def timing_params(config, model: str = "ideal", *, channel_offset: int = 0) -> TimingParams:
    """The cycle-level parameters of ``model`` (``ideal`` or ``card``) for ``config``.

    ``channel_offset``: route port p to channel (p + offset) mod the board's
    channels, so every port reaches a channel other than its own through the
    switch (a microbenchmark knob; the accelerator's own layout binds port p
    to channel p).
    """
    if model not in MODELS:
        raise BoardError(f"unknown memory model '{model}'; known models: {', '.join(MODELS)}")
    if model == "ideal":
        return TimingParams("ideal")
    mem = _memory(config)
    t = mem.timing
    if t is None:
        raise BoardError(f"board '{config.board}' has no timing section for its "
                         f"{mem.standard or mem.kind} memory; add one (see boards/u280.yaml) "
                         f"or run the ideal memory model")
    cyc = config.clock_mhz / 1e3            # cycles per ns
    S = beat_bytes(config)
    return TimingParams(
        "card", beat_cycles=S / channel_bytes_per_cycle(config),
        read_latency=t.read_latency_ns * cyc, write_latency=IDEAL_WRITE_LATENCY,
        page_miss=t.page_miss_ns * cyc, trc=t.trc_ns * cyc, page_bytes=t.page_bytes,
        banks=t.banks, refresh_interval=t.refresh_interval_ns * cyc, refresh=t.refresh_ns * cyc,
        burst_overhead=t.burst_overhead_ns * cyc, cross_latency=t.cross_channel_ns * cyc,
        cross_factor=t.cross_channel_slowdown, channel_offset=int(channel_offset),
        min_burst_bytes=t.min_burst_bytes, channels=min(mem.channels, 64))


def burst_efficiency(p: TimingParams, beats: int, S: int) -> float:
    """Fraction of the channel's nominal rate a stream of ``beats``-beat bursts gets (no refresh)."""
    data = beats * p.beat_cycles
    held = max(beats * S, p.min_burst_bytes) / S * p.beat_cycles + p.burst_overhead
    return data / held


def sustainable_fraction(config, model: str = "card") -> float:
    """What the timing model sustains for long sequential bursts, as a fraction of the ports' peak.

    The channel's share left by refresh and per-burst costs, times the
    channel's nominal rate, capped by the port (one beat per cycle). 1.0 for
    the ideal model; for a board without timing, the nominal memory rate
    against the ports' (``effective_hbm_gbps / peak_hbm_gbps``).
    """
    S = beat_bytes(config)
    chan = channel_bytes_per_cycle(config)
    if model == "ideal":
        return 1.0
    if _memory(config).timing is None:
        return min(1.0, chan / S)
    p = timing_params(config, model)
    eff = burst_efficiency(p, max_burst_beats(config), S) * (1 - p.refresh / p.refresh_interval)
    return min(1.0, chan * eff / S)


def measured_fraction(config) -> float | None:
    """The published sustained bandwidth as a fraction of the nominal one of the memory it was
    measured on (the lending board's, for borrowed timing); None if no figure is cited."""
    mem = _memory(config)
    if mem.timing is None or mem.timing.measured_sustained_gbps is None:
        return None
    if mem.timing_board:
        from llmfab.boards.board import load_board
        mem = load_board(mem.timing_board).main_memory
    return mem.timing.measured_sustained_gbps / mem.bandwidth_gbps


def describe(config, model: str) -> str:
    """One line naming the memory model that ran: ``card (HBM2, boards/u280.yaml timing)``."""
    if model == "ideal":
        return f"ideal ({IDEAL_READ_LATENCY}-cycle latency, a beat per cycle per port)"
    mem = _memory(config)
    return f"card ({mem.timing.standard} timing of {mem.timing_board or config.board_spec.name})"

