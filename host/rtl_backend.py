"""Backend ``rtl``: the generated accelerator under Verilator runs the compiled bundle.

The model is compiled for the configuration (or a compiled bundle is given), the bundle's HBM image is loaded
into the simulated HBM (C++ memory behind DPI-C), and the bundle's programs run
cycle-accurately as on the golden backend: a chunk of tokens through the prefill programs
(greedy buckets, the token rows staged in the I/O region first), a single token through the
decode program; the logits are read back from the I/O region.
``stats()`` reports cycles per token, weight bytes per token, HBM utilization
(weight bytes moved during decode / (cycles x the configured peak bytes per
cycle), and the same against the memory's sustainable peak), the memory timing
model that ran (``memory="ideal"`` or ``"card"``, boards/memory_timing.py) and
per-queue busy fractions, from the accelerator's own counter block.

The execution unit is ``hw/exec_unit.py``'s ``ExecUnit`` (MV/MM engine, the
SFU-based MISC engine, MiscExec for NOP/COPY/ADD/MUL), the accelerator's
default; a program using an operation it does not route is refused rather
than giving wrong bytes.
"""

from __future__ import annotations

import numpy as np

from llmfab.core.errors import BackendError, SimError
from llmfab.compiler import isa
from llmfab.host.runtime import ProgramDevice, config_and_bundle


def exec_factory(config):
    """The accelerator's execution unit for ``config`` and the set of MV/MISC ops it implements.

    The unit is the accelerator's default (``ExecUnit``), so the factory is ``None``: the
    simulation build is then the default design's, whose Verilog sim/rtl/harness.py caches,
    and every backend, bench and test of one configuration shares one Verilator build."""
    from llmfab.hw.exec_unit import MISC_SIMPLE, default_routes
    implemented = {f.name for f in MISC_SIMPLE}
    for key, unit in default_routes().items():
        if unit != "misc":          # MiscExec's other operations are placeholders
            implemented.add(key.name if not isinstance(key, tuple) else key[1].name)
    return None, implemented


def program_ops(program: bytes) -> set:
    ops = set()
    for w in isa.from_bytes(program):
        ins = isa.decode(w)
        if ins.op in ("MV", "MM"):
            ops.add(ins.op)
        elif ins.op == "MISC":
            ops.add(isa.MISC_NAMES[ins["func"]])
    return ops


def counter_stats(config, bundle, cycles, counters) -> dict:
    """What the accelerator's counter block says about decode runs (the rtl and xrt backends):
    ``cycles`` of every decode run (one token each), ``counters`` of the last one."""
    from llmfab.boards import memory_timing
    peak = config.hbm_bytes_per_cycle
    wbytes = int(bundle.manifest["stats"]["weight_bytes_per_token"])
    c = counters
    busy = {q: c.get(f"busy_{q}", 0) / max(c.get("cycles", 1), 1) for q in ("ld", "cmp", "mv", "misc", "both", "st")}
    sustainable = memory_timing.sustainable_fraction(config)
    last = cycles[-1] if cycles else 0
    return {"cycles_per_token": list(cycles), "weight_bytes_per_token": wbytes,
            "hbm_utilization": round(wbytes / (last * peak), 4) if last else 0.0,
            # against what the card's memory sustains for long bursts (boards/memory_timing.py)
            "hbm_utilization_sustainable": round(wbytes / (last * peak * sustainable), 4) if last else 0.0,
            "memory_sustainable_fraction": round(sustainable, 4),
            "busy_fraction": {k: round(v, 4) for k, v in busy.items()}}


class RtlDevice(ProgramDevice):
    name = "rtl"

    def __init__(self, model, config=None, *, bundle=None, waves=False, timeout_cycles=200_000_000,
                 sample_every=None, memory="ideal", prefill: bool = True, **kw):
        from llmfab.sim.rtl.harness import RtlAccelerator
        config, bundle = config_and_bundle(model, config, bundle)
        factory, implemented = exec_factory(config)
        missing = program_ops(bundle.program) - implemented
        if missing:
            raise BackendError(f"backend 'rtl': the accelerator's execution unit does not implement "
                               f"{', '.join(sorted(missing))} yet; use --backend golden")
        self.bundle = bundle
        self.config = config
        self.acc = RtlAccelerator(config, bundle, waves=waves, exec_factory=factory, memory=memory)
        self.acc.start()
        self.timeout_cycles = timeout_cycles
        #: record the live counters every this many cycles in each run (``RtlRun.samples``)
        self.sample_every = sample_every
        self.context = int(bundle.manifest["context"])
        self.vocab = int(bundle.manifest["model"]["vocab_size"])
        self.wbase, self.wsize = bundle.manifest["memory_map"]["weights"]
        self.pos = 0
        self.runs = []
        #: prefill buckets in use (``prefill=False``: every token through the decode program)
        self.buckets = [int(t) for t in bundle.manifest["prefill"]["buckets"]] if prefill else []
        self.prefill_runs = []
        self._loaded = "decode"                 # the name of the program in the simulation

    def reset(self):
        kv0, kvn = self.bundle.manifest["memory_map"]["kv"]
        self.acc.write_hbm(int(kv0), np.zeros(int(kvn), np.uint8))
        self.pos = 0

    def use_program(self, T: int, logits: bool | str = True) -> None:
        """Have the simulation run the decode program (``T`` = 1) or the prefill program of bucket ``T``
        (``logits=False``: its KV-only program; ``"last"``: its last-logits program)."""
        from llmfab.compiler.bundle import prefill_program
        name = "decode" if T == 1 else prefill_program(T, logits)
        if self._loaded != name:
            self.acc.load_program(self.bundle.named_program(name)[0])
            self._loaded = name

    def _check(self, r, what: str):
        if r.timed_out:
            raise SimError(f"rtl: watchdog fired after {self.timeout_cycles} cycles ({what})")
        if r.status != isa.STATUS_OK:
            raise SimError(f"rtl: accelerator stopped with status {r.status} "
                           f"({isa.STATUS_NAMES.get(r.status, '?')}) at instruction {r.pc} ({what})")

    def _decode(self, pos, token):
        self.use_program(1)
        r = self.acc.run(pos, token, timeout_cycles=self.timeout_cycles,
                         sample_every=self.sample_every)
        self._check(r, f"decode at position {pos}")
        self.runs.append(r)
        return self.acc.logits().copy()[None]

    def _prefill(self, pos, tokens, logits=True):
        from llmfab.compiler.bundle import logits_rows, prefill_program
        T = len(tokens)
        self.bundle.check_prefill_start(pos, T)
        self.use_program(T, logits)
        for addr, row in self.bundle.prefill_token_rows(tokens):
            self.acc.write_hbm(addr, row)
        r = self.acc.run(pos, 0, ntok=T, timeout_cycles=self.timeout_cycles,
                         sample_every=self.sample_every)
        self._check(r, f"{prefill_program(T, logits)} at position {pos}")
        self.prefill_runs.append({"tokens": T, "logits": logits, "cycles": r.cycles,
                                  "busy_mv": int(r.counters.get("busy_mv", 0))})
        rows = logits_rows(T, logits)
        return self.bundle.prefill_logits(rows, self.acc.read_hbm) if rows else None

    def stats(self):
        out = {}
        if self.runs:
            from llmfab.boards import memory_timing
            out = counter_stats(self.config, self.bundle, [r.cycles for r in self.runs],
                                self.runs[-1].counters)
            out["memory_model"] = memory_timing.describe(self.config, self.acc.memory)
            out.update({"sim_cycles_per_second": round(self.runs[-1].cycles_per_second, 1),
                        "sim_seconds_per_token": round(self.runs[-1].wall_seconds, 2)})
        if self.prefill_runs:
            out["prefill_runs"] = list(self.prefill_runs)
        return out

    def close(self):
        self.acc.close()
