"""Backend ``golden``: compile the model for the configuration, run the bundle on the golden model.

A chunk of tokens runs as prefill programs, greedily: the largest bucket T that
fits the tokens left (and the context) runs T tokens at once, then smaller
ones; a single token runs through the decode program (the bucket T = 1). Every
bucket gives the bits the decode program gives token by token (docs/isa.md).
"""

from __future__ import annotations

from llmfab.core.errors import SimError
from llmfab.compiler import isa
from llmfab.compiler.bundle import logits_rows
from llmfab.host.runtime import ProgramDevice, config_and_bundle


class GoldenDevice(ProgramDevice):
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
        self.prefill_runs = {}          # bucket -> runs of its prefill program
        self.prefill_kv_runs = {}       # bucket -> runs of its KV-only program (forward_last)
        self.prefill_last_runs = {}     # bucket -> runs of its last-logits program (forward_last)

    def reset(self):
        self.golden.hbm[int(self.bundle.manifest["memory_map"]["kv"][0]):] = 0
        self.pos = 0

    def _fault(self, r):
        raise SimError(f"golden model stopped with status {r.status} "
                       f"({isa.STATUS_NAMES[r.status]}) at instruction {r.pc}: {r.detail}")

    def _decode(self, pos, token):
        r = self.golden.run(pos, token)
        if r.status != isa.STATUS_OK:
            self._fault(r)
        self.steps += 1
        return self.golden.logits()[None]

    def _prefill(self, pos, tokens, logits=True):
        T = len(tokens)
        r = self.golden.prefill(pos, tokens, logits=logits)
        if r.status != isa.STATUS_OK:
            self._fault(r)
        runs = (self.prefill_last_runs if logits == "last" else self.prefill_runs if logits
                else self.prefill_kv_runs)
        runs[T] = runs.get(T, 0) + 1
        rows = logits_rows(T, logits)
        return self.golden.prefill_logits(rows) if rows else None

    def stats(self):
        c = self.golden.instruction_counts()
        return {"instructions_per_token": c, "program_bytes": len(self.bundle.program),
                "decode_steps": self.steps,
                "prefill_buckets": list(self.buckets),
                "prefill_program_bytes": {str(t): len(p) for t, p in sorted(self.bundle.prefill.items())},
                "prefill_kv_program_bytes": {str(t): len(p) for t, p in sorted(self.bundle.prefill_kv.items())},
                "prefill_last_program_bytes": {str(t): len(p) for t, p in sorted(self.bundle.prefill_last.items())},
                "prefill_runs": {str(t): n for t, n in sorted(self.prefill_runs.items())},
                "prefill_kv_runs": {str(t): n for t, n in sorted(self.prefill_kv_runs.items())},
                "prefill_last_runs": {str(t): n for t, n in sorted(self.prefill_last_runs.items())}}
