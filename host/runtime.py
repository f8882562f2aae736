"""One runtime API over the backends: reference | golden | rtl | xrt.

    dev = open_device("reference", model=load_model(path), config="ci")
    logits = dev.logits(token_ids)            # teacher-forced, [T, vocab] float32
    result = dev.generate(prompt_ids, 16)     # greedy

Every backend implements :class:`Device`: ``reset()``, ``forward(tokens)``
(runs tokens at the next positions, returns their logits) and ``stats()``
(backend-specific counters). Greedy generation and teacher-forced logits are
written once, here, on top of ``forward``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from llmfab.core.errors import BackendError

BACKENDS = ("reference", "golden", "rtl", "xrt")


@dataclass
class GenerateResult:
    tokens: list
    prompt_tokens: list
    seconds: float
    prefill_seconds: float
    stats: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        decode = self.seconds - self.prefill_seconds
        n = max(len(self.tokens) - 1, 0)
        if n == 0 or decode <= 0:
            return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0
        return n / decode


class Device:
    """A backend that runs a model token by token."""

    name = "?"

    def reset(self) -> None:
        raise NotImplementedError

    def forward(self, tokens) -> np.ndarray:
        raise NotImplementedError

    def stats(self) -> dict:
        return {}

    def logits(self, tokens, *, chunk: int | None = None) -> np.ndarray:
        """Teacher-forced logits for every position of ``tokens`` (float32 ``[T, vocab]``)."""
        self.reset()
        tokens = list(tokens)
        if chunk is None:
            return self.forward(tokens)
        out = [self.forward(tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)]
        return np.concatenate(out, axis=0)

    def generate(self, prompt, max_tokens: int, *, stop_ids=(), progress=None) -> GenerateResult:
        """Greedy decoding: the prompt in one forward, then one token at a time."""
        if not prompt:
            raise BackendError("the prompt is empty: give at least one token")
        self.reset()
        t0 = time.perf_counter()
        lg = self.forward(list(prompt))
        t1 = time.perf_counter()
        out = []
        nxt = int(np.argmax(lg[-1]))
        for i in range(max_tokens):
            out.append(nxt)
            if progress:
                progress(nxt)
            if nxt in stop_ids or i == max_tokens - 1:
                break
            lg = self.forward([nxt])
            nxt = int(np.argmax(lg[-1]))
        t2 = time.perf_counter()
        return GenerateResult(tokens=out, prompt_tokens=list(prompt), seconds=t2 - t0,
                              prefill_seconds=t1 - t0, stats=self.stats())


class ReferenceDevice(Device):
    name = "reference"

    def __init__(self, model, config=None, *, max_context=None):
        from llmfab.sim.reference import ReferenceModel
        self.ref = ReferenceModel(model, max_context=max_context)

    def reset(self):
        self.ref.reset()

    def forward(self, tokens):
        return self.ref.forward(tokens)


def open_device(backend: str, model, config=None, **kw) -> Device:
    """Open a backend for an imported model and an accelerator configuration."""
    if backend == "reference":
        return ReferenceDevice(model, config, **kw)
    if backend == "golden":
        try:
            from llmfab.host.golden_backend import GoldenDevice
        except ImportError:
            raise BackendError("backend 'golden' is not available in this build") from None
        return GoldenDevice(model, config, **kw)
    if backend == "rtl":
        try:
            from llmfab.host.rtl_backend import RtlDevice
        except ImportError:
            raise BackendError("backend 'rtl' is not available in this build") from None
        return RtlDevice(model, config, **kw)
    if backend == "xrt":
        try:
            from llmfab.host.xrt_backend import XrtDevice
        except ImportError:
            raise BackendError("backend 'xrt' is not available in this build") from None
        return XrtDevice(model, config, **kw)
    raise BackendError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
