"""Backend ``golden``: compile the model for the configuration, run the bundle on the golden model.

A chunk of tokens runs as prefill programs, greedily: the largest bucket T that
fits the tokens left (and the context) runs T tokens at once, then smaller
ones; a single token runs through the decode program (the bucket T = 1). Every
bucket gives the bits the decode program gives token by token (docs/isa.md).
"""

from __future__ import annotations

import numpy as np

from llmfab.core.errors import BackendError, SimError
from llmfab.compiler import isa
from llmfab.host.runtime import Device, config_and_bundle


def split_buckets(n: int, buckets) -> list:
    """Greedy decomposition of ``n`` tokens into buckets (1 is always a bucket)."""
    sizes = sorted({1, *(int(b) for b in buckets)}, reverse=True)
    out = []
    while n > 0:
        t = next(b for b in sizes if b <= n)
        out.append(t)
        n -= t
    return out


class GoldenDevice(Device):
    name = "golden"

    def __init__(self, model, config=None, *, bundle=None, sparsity=None, progress=False,
                 prefill: bool = True, **kw):
        from llmfab.sim.golden import Golden
        config, bundle = config_and_bundle(model, config, bundle, sparsity=sparsity, progress=progress)
        self.bundle = bundle
        self.config = config
        self.golden = Golden(bundle)
        self.context = int(bundle.manifest["context"])
        self.vocab = int(bundle.manifest["model"]["vocab_size"])
        #: prefill buckets in use (``prefill=False``: every token through the decode program)
        self.buckets = self.golden.buckets if prefill else []
        self.pos = 0
        self.steps = 0
        self.prefill_runs = {}

    def reset(self):
        self.golden.hbm[int(self.bundle.manifest["memory_map"]["kv"][0]):] = 0
        self.pos = 0

    def _fault(self, r):
        raise SimError(f"golden model stopped with status {r.status} "
                       f"({isa.STATUS_NAMES[r.status]}) at instruction {r.pc}: {r.detail}")

    def forward(self, tokens):
        toks = [int(t) for t in tokens]
        for t in toks:
            if not 0 <= t < self.vocab:
                raise BackendError(f"token id {t} out of range (vocab size {self.vocab})")
        out = []
        i = 0
        while i < len(toks):
            if self.pos >= self.context:
                raise BackendError(f"context overflow: position {self.pos} >= compiled context "
                                   f"{self.context}")
            left = min(len(toks) - i, self.context - self.pos)
            T = split_buckets(left, self.buckets)[0]
            if T == 1:
                r = self.golden.run(self.pos, toks[i])
                if r.status != isa.STATUS_OK:
                    self._fault(r)
                out.append(self.golden.logits()[None])
                self.steps += 1
            else:
                r = self.golden.prefill(self.pos, toks[i:i + T])
                if r.status != isa.STATUS_OK:
                    self._fault(r)
                out.append(self.golden.prefill_logits(T))
                self.prefill_runs[T] = self.prefill_runs.get(T, 0) + 1
            self.pos += T
            i += T
        if not out:
            return np.zeros((0, self.vocab), np.float32)
        return np.concatenate(out, axis=0)

    def stats(self):
        c = self.golden.instruction_counts()
        return {"instructions_per_token": c, "program_bytes": len(self.bundle.program),
                "decode_steps": self.steps,
                "prefill_buckets": list(self.buckets),
                "prefill_program_bytes": {str(t): len(p) for t, p in sorted(self.bundle.prefill.items())},
                "prefill_runs": {str(t): n for t, n in sorted(self.prefill_runs.items())}}
