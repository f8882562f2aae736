"""Projection of a model pipelined over several cards (``llmfab plan``).

The model is split as ``llmfab compile --cards N`` splits it (compiler/partition.py),
each stage is laid out by the compiler (``emit_image=False``: no weights are
copied) and its decode step is costed by the performance model (sim/perf.py)
at half the compiled context. Between two stages the hidden state
(``dim`` float32 per token) crosses through the host:

* **inter-card hop** = 2 DMA transfers (card -> host, host -> card), each
  ``HOP_LATENCY_S`` plus ``bytes / PCIE_BYTES_PER_S``.
  ``PCIE_BYTES_PER_S``: ~16 GiB/s "between the Alveo card and the host at
  Gen3x16" (AMD, Vitis Tutorials XD099, "Alveo Overview"). ``HOP_LATENCY_S``
  = 50 us per transfer is an *assumption* (XRT buffer sync + kernel start for a
  small buffer; order of magnitude of the PCIe/driver overheads characterised
  by Cooke and Fahmy, FPL 2020): measure it on the target host with
  ``xbutil validate`` and pass ``--hop-us``.

Projection, with ``t_i`` the decode step of stage ``i`` and ``h`` the hop:

* one stream: ``1 / (sum t_i + (N - 1) h)`` tokens/s (the stages take turns);
* ``S`` streams in flight: ``min(S / (sum t_i + (N - 1) h), 1 / max_i t_i)``
  (each card runs one stream's step while the others run other streams'; the
  slowest stage bounds the pipeline; hops overlap other stages' work).

Each stream in flight needs its own KV cache on every card; ``memory`` lists a
card's bytes for one stream and for ``S``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmfab.sim import perf

PCIE_BYTES_PER_S = 16 * 2**30          # Gen3 x16, AMD Vitis Tutorials XD099 ("Alveo Overview")
HOP_LATENCY_S = 50e-6                  # assumed per DMA transfer; measure with xbutil validate
HOP_SOURCE = ("2 DMA transfers per hop (card -> host -> card), each {lat:g} us (assumed: XRT sync + "
              "start of a small buffer) + bytes / 16 GiB/s (PCIe Gen3 x16, AMD Vitis Tutorials XD099)")


@dataclass
class StagePlan:
    stage: int
    layers: list
    config: str
    board: str
    weight_bytes: int
    kv_bytes: int
    device_bytes: int
    device_bytes_streams: int
    card_bytes: int
    step_s: float
    bound: str

    @property
    def fits_streams(self) -> bool:
        return self.device_bytes_streams <= self.card_bytes


@dataclass
class PipelinePlan:
    model: str
    cards: int
    streams: int
    context: int
    hop_s: float
    hop_source: str
    stages: list = field(default_factory=list)

    @property
    def loop_s(self) -> float:
        """One token of one stream through every stage."""
        return sum(s.step_s for s in self.stages) + (self.cards - 1) * self.hop_s

    @property
    def tokens_per_s_1(self) -> float:
        return 1.0 / self.loop_s

    @property
    def tokens_per_s_streams(self) -> float:
        return min(self.streams / self.loop_s, 1.0 / max(s.step_s for s in self.stages))

    def to_dict(self) -> dict:
        return {"model": self.model, "cards": self.cards, "streams": self.streams, "context": self.context,
                "inter_card_hop_s": self.hop_s, "inter_card_hop_source": self.hop_source,
                "stages": [{**s.__dict__, "fits_streams": s.fits_streams} for s in self.stages],
                "tokens_per_s_1_stream": round(self.tokens_per_s_1, 3),
                f"tokens_per_s_{self.streams}_streams": round(self.tokens_per_s_streams, 3)}

    def table(self) -> str:
        gib = 2**30
        lines = [f"{self.model} over {self.cards} cards (context {self.context}; "
                 f"{self.streams} streams in flight)",
                 f"{'stage':>5} {'layers':>9} {'board':>6} {'weights':>9} {'KV/stream':>9} "
                 f"{'1 stream':>9} {f'{self.streams} streams':>10} {'card':>7}  {'step':>8}  bound"]
        for s in self.stages:
            a, b = s.layers
            lines.append(f"{s.stage:>5} {f'{a}-{b - 1}':>9} {s.board:>6} {s.weight_bytes / gib:>7.2f}Gi "
                         f"{s.kv_bytes / gib:>7.2f}Gi {s.device_bytes / gib:>7.2f}Gi "
                         f"{s.device_bytes_streams / gib:>8.2f}Gi{'' if s.fits_streams else '!'} "
                         f"{s.card_bytes / gib:>5.2f}Gi  {s.step_s * 1e3:>6.2f}ms  {s.bound}")
        lines.append(f"inter-card hop: {self.hop_s * 1e6:.1f} us per token ({self.hop_source})")
        lines.append(f"projected: {self.tokens_per_s_1:.2f} tokens/s for 1 stream, "
                     f"{self.tokens_per_s_streams:.2f} tokens/s for {self.streams} streams in flight")
        if not all(s.fits_streams for s in self.stages):
            lines.append(f"!: {self.streams} streams' KV caches do not fit that card: fewer streams, "
                         f"a shorter --context or more cards")
        return "\n".join(lines)


def plan(model, config, cards: int, *, streams: int | None = None, context: int | None = None,
         hop_latency_s: float = HOP_LATENCY_S, sparsity: str | None = None, configs=None,
         layers=None, progress: bool = False) -> PipelinePlan:
    """Place ``model`` over ``cards`` cards of ``config`` and project its decode throughput."""
    import warnings
    from llmfab.compiler.partition import card_bytes, compile_stages, plan_stages
    streams = cards if streams is None else int(streams)
    configs = configs or [config] * cards
    stages = plan_stages(model, configs, sparsity=sparsity, context=context, layers=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundles = compile_stages(model, stages, sparsity=sparsity, context=context, emit_image=False,
                                 prefill=False, progress=progress)
    d = model.desc
    hop_bytes = d.dim * 4
    hop = 2 * (hop_latency_s + hop_bytes / PCIE_BYTES_PER_S)
    ctx = int(bundles[0].manifest["context"])
    out = PipelinePlan(model=d.name, cards=cards, streams=streams, context=ctx, hop_s=hop,
                       hop_source=HOP_SOURCE.format(lat=hop_latency_s * 1e6))
    for st, b in zip(stages, bundles):
        est = perf.estimate(b, st.config)
        kv = int(b.manifest["memory_map"]["kv"][1])
        used = int(b.manifest["hbm_size"])
        out.stages.append(StagePlan(
            stage=st.index, layers=list(st.layers), config=st.config.name, board=st.config.board_spec.name,
            weight_bytes=int(b.manifest["memory_map"]["weights"][1]), kv_bytes=kv, device_bytes=used,
            device_bytes_streams=used + (streams - 1) * kv, card_bytes=card_bytes(st.config),
            step_s=est.cycles / (st.config.clock_mhz * 1e6), bound=est.bound))
    return out


def plan_plot(p: PipelinePlan, path: str) -> str:
    """Per-card memory (weights, KV for the streams) and step time of a plan; writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gib = 2**30
    x = [s.stage for s in p.stages]
    w = [s.weight_bytes / gib for s in p.stages]
    kv = [(s.device_bytes_streams - s.weight_bytes) / gib for s in p.stages]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.bar(x, w, label="weights")
    a1.bar(x, kv, bottom=w, label=f"KV ({p.streams} streams), tables, I/O")
    a1.axhline(p.stages[0].card_bytes / gib, color="k", ls="--", lw=1, label="card memory")
    a1.set_xlabel("stage (card)")
    a1.set_ylabel("GiB")
    a1.legend(fontsize=7)
    a2.bar(x, [s.step_s * 1e3 for s in p.stages])
    a2.set_xlabel("stage (card)")
    a2.set_ylabel("decode step (ms)")
    fig.suptitle(f"{p.model} on {p.cards} cards: {p.tokens_per_s_1:.1f} tok/s (1 stream), "
                 f"{p.tokens_per_s_streams:.1f} tok/s ({p.streams} streams)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
