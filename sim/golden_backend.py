"""Backend ``golden``: compile the model for the configuration, run the bundle on the golden model.

Prompt tokens run through the decode program one position at a time (the
prefill programs are not written yet; see docs/isa.md).
"""

from __future__ import annotations

import numpy as np

from llmfab.boards.errors import BackendError, SimError
from llmfab.compiler import isa
from llmfab.host.runtime import Device


class GoldenDevice(Device):
    name = "golden"

    def __init__(self, model, config=None, *, bundle=None, sparsity=None, progress=False, **kw):
        from llmfab.boards.config import load_config
        from llmfab.compiler.compile import compile_model
        from llmfab.sim.golden import Golden
        if config is None:
            config = load_config("ci")
        if bundle is None:
            bundle = compile_model(model, config, sparsity=sparsity, progress=progress)
        else:
            bundle.check_config(config)
        self.bundle = bundle
        self.config = config
        self.golden = Golden(bundle)
        self.context = int(bundle.manifest["context"])
        self.vocab = int(bundle.manifest["model"]["vocab_size"])
        self.pos = 0
        self.steps = 0

    def reset(self):
        self.golden.hbm[int(self.bundle.manifest["memory_map"]["kv"][0]):] = 0
        self.pos = 0

    def forward(self, tokens):
        out = []
        for t in tokens:
            t = int(t)
            if not 0 <= t < self.vocab:
                raise BackendError(f"token id {t} out of range (vocab size {self.vocab})")
            if self.pos >= self.context:
                raise BackendError(f"context overflow: position {self.pos} >= compiled context "
                                   f"{self.context}")
            r = self.golden.run(self.pos, t)
            if r.status != isa.STATUS_OK:
                raise SimError(f"golden model stopped with status {r.status} "
                               f"({isa.STATUS_NAMES[r.status]}) at instruction {r.pc}: {r.detail}")
            out.append(self.golden.logits())
            self.pos += 1
            self.steps += 1
        return np.stack(out)

    def stats(self):
        c = self.golden.instruction_counts()
        return {"instructions_per_token": c, "program_bytes": len(self.bundle.program),
                "decode_steps": self.steps}
