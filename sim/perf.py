"""Analytical performance model: cycles of a compiled decode program on a configuration.

Level 4 of the simulation stack: it walks the bundle's instruction stream and
charges each queue for its work, assuming what the schedule provides -- the
load queue streams weights while the compute queue works (double-buffered
slots), so a decode step costs about ``max(load cycles, compute cycles)`` plus
the stretches where the compute queue runs SFU work that no load can overlap
beyond the two prefetched tiles. It is calibrated against RTL cycle counts
where both exist (sim/rtl) and projects full-size models onto the real boards.

Costs (per instruction):

* LD / ST: ``bytes / bytes_per_cycle`` (+ a fixed latency charged once per
  stretch, not per beat), where ``bytes_per_cycle`` is the smaller of what the
  accelerator's ports move (``hbm_bytes_per_cycle * efficiency``) and what the
  memory sustains for long bursts under the chosen memory model
  (``boards/memory_timing.py``: the board's refresh and per-burst costs for
  ``card``, the default; the ports' peak for ``ideal``), so card projections
  use the sustainable bandwidth, not the nominal one.
* MV: ``blocks / chain_blocks_per_cycle`` (the chains take one 32-weight block
  per chain per cycle; sparse blocks are as fast as the pattern allows).
* MISC: vector ops at ``LANES`` elements per cycle times a pass count
  (RMSNORM 3 passes, QUANT 2, SILU_MUL 2, ROPE 2, ADD/MUL 1, EMBED 1); ATTN
  ``heads * head_dim * positions * 2 / LANES`` plus softmax passes.
"""

from __future__ import annotations

from dataclasses import dataclass, asdict

from llmfab.boards import memory_timing
from llmfab.compiler import isa

LANES = 32
PASSES = {"NOP": 0, "QUANT": 2, "RMSNORM": 3, "ROPE": 2, "ADD": 1, "MUL": 1, "SILU_MUL": 2,
          "COPY": 1, "EMBED": 1}
HBM_EFFICIENCY = 0.9          # fraction of the ports' peak the load engine keeps busy
LATENCY = 64                  # cycles to first data of a load that cannot be prefetched


@dataclass
class PerfEstimate:
    cycles: int
    load_cycles: int
    compute_cycles: int
    mv_cycles: int
    sfu_cycles: int
    exposed_sfu_cycles: int
    weight_bytes: int
    kv_bytes: int
    macs: int
    clock_mhz: float
    tokens_per_s: float
    hbm_utilization: float     # weight+KV bytes / (cycles * peak bytes per cycle)
    bound: str                 # "memory", "compute" (chains) or "sfu" (exposed SFU work)
    memory_model: str = "card"             # boards/memory_timing.py model the bandwidth came from
    bytes_per_cycle: float = 0.0           # the streaming rate the loads were charged at
    hbm_utilization_sustainable: float = 0.0   # the same bytes against the memory's sustainable peak

    def to_dict(self):
        return asdict(self)


def estimate(bundle, config, *, pos: int | None = None, efficiency: float = HBM_EFFICIENCY,
             memory: str = "card") -> PerfEstimate:
    """Cycles of one decode step at position ``pos`` (default: half the compiled context).

    ``memory``: ``card`` (default) charges loads at no more than what the
    board's memory sustains (:func:`~llmfab.boards.memory_timing.sustainable_fraction`),
    ``ideal`` at the ports' peak times ``efficiency`` alone.
    """
    ctx = int(bundle.manifest["context"])
    pos = ctx // 2 if pos is None else pos
    sustainable = memory_timing.sustainable_fraction(config, memory)
    bpc = config.hbm_bytes_per_cycle * min(efficiency, sustainable)
    prefetch = 2 * (config.buffer_bytes["weight"] // 2) / bpc     # two weight slots
    regs = {isa.REG_POS: pos, isa.REG_SEQ: pos + 1}
    load = mv = sfu = exposed = 0.0
    wbytes = kvbytes = macs = 0
    seg_sfu = 0.0
    for w in isa.from_bytes(bundle.program):
        ins = isa.decode(w)
        f = ins.fields
        if ins.op in ("LD", "ST"):
            n = f["len"] + regs.get(f["lreg"], 0) * f["lmul"]
            load += n / bpc
            if f["hreg"] == isa.REG_WBASE:
                wbytes += n
            elif f["hreg"] == isa.REG_KVBASE:
                kvbytes += n
        elif ins.op in ("MV", "MM"):
            fmt = isa.FMTS[f["func"] & 3]
            sp = isa.SPARSITIES[f["func"] >> 2]
            blocks = f["rows"] * f["cols"] // 32 * (f["ntok"] if ins.op == "MM" else 1)
            mv += blocks / config.chain_blocks_per_cycle(fmt, sp)
            macs += f["rows"] * f["cols"]
            if seg_sfu:
                # SFU work between matrix ops stalls the chains; the load queue keeps
                # streaming only until both weight slots are full
                exposed += max(0.0, seg_sfu - prefetch) + LATENCY
                seg_sfu = 0.0
        elif ins.op == "MISC":
            name = isa.MISC_NAMES[f["func"]]
            if name == "ATTN":
                S = pos + 1
                c = f["n"] * f["aux"] * S * 2 / LANES + f["n"] * S * 4 / LANES
            else:
                c = f["n"] * PASSES.get(name, 1) / LANES
            sfu += c
            seg_sfu += c
    compute = mv + sfu
    cycles = max(load, mv) + exposed
    peak = config.hbm_bytes_per_cycle
    tps = config.clock_mhz * 1e6 / cycles if cycles else 0.0
    return PerfEstimate(cycles=int(cycles), load_cycles=int(load), compute_cycles=int(compute),
                        mv_cycles=int(mv), sfu_cycles=int(sfu), exposed_sfu_cycles=int(exposed),
                        weight_bytes=wbytes, kv_bytes=kvbytes, macs=macs, clock_mhz=config.clock_mhz,
                        tokens_per_s=tps, hbm_utilization=(wbytes + kvbytes) / (cycles * peak) if cycles else 0,
                        bound=("sfu" if exposed > max(load, mv) else
                               "memory" if load >= mv else "compute"),
                        memory_model=memory, bytes_per_cycle=bpc,
                        hbm_utilization_sustainable=((wbytes + kvbytes) / (cycles * peak * sustainable)
                                                     if cycles else 0))


def roofline_plot(points, config, path):
    """Roofline of a configuration (MAC/cycle vs MAC/byte) with decode points; writes a PNG.

    ``points``: ``(label, MAC per byte, MAC per cycle)``, optionally with a fourth
    item, the label's offset in points (default ``(5, -12)``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    peak_macs = config.macs_per_cycle
    bw = config.hbm_bytes_per_cycle
    x = np.logspace(-1, 3, 200)
    y = np.minimum(peak_macs, bw * x)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(x, y, label=f"{config.name}: {peak_macs} MAC/cycle, {bw} B/cycle")
    for label, intensity, perf, *offset in points:     # optional 4th item: label offset (points)
        ax.plot([intensity], [perf], "o")
        ax.annotate(label, (intensity, perf), textcoords="offset points",
                    xytext=offset[0] if offset else (5, -12), fontsize=8)
    ax.set_xlabel("arithmetic intensity (MAC per byte from HBM)")
    ax.set_ylabel("MAC per cycle")
    ax.set_title(f"Roofline: {config.name} at {config.clock_mhz:g} MHz")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
