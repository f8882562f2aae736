"""One runtime API over the backends: reference | golden | rtl | xrt.

    dev = open_device("reference", model=load_model(path), config="ci")
    logits = dev.logits(token_ids)            # teacher-forced, [T, vocab] float32
    result = dev.generate(prompt_ids, 16)     # greedy

Every backend implements :class:`Device`: ``reset()``, ``forward(tokens)``
(runs tokens at the next positions, returns their logits) and ``stats()``
(backend-specific counters); ``forward_last(tokens)`` returns only the last
token's logits (the program backends run a prompt's runs before its last
through the KV-only prefill programs, which skip the LM head). Greedy
generation and teacher-forced logits are written once, here, on top of
``forward`` and ``forward_last``. Every device has a ``context``: the
number of token positions it holds (its KV cache). Generation stops there and
returns what it made, with ``stop == "context"``; a prompt that cannot fit is
refused before any work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from llmfab.core.errors import BackendError

BACKENDS = ("reference", "golden", "rtl", "xrt")

#: why generation stopped: an end-of-turn token, ``max_tokens``, or the device's context
STOP_REASONS = ("eos", "length", "context")


@dataclass
class GenerateResult:
    tokens: list
    prompt_tokens: list
    seconds: float
    prefill_seconds: float
    stats: dict = field(default_factory=dict)
    #: one of :data:`STOP_REASONS`
    stop: str = "length"

    @property
    def tokens_per_s(self) -> float:
        decode = self.seconds - self.prefill_seconds
        n = max(len(self.tokens) - 1, 0)
        if n == 0 or decode <= 0:
            return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0
        return n / decode


def config_and_bundle(model, config=None, bundle=None, **compile_kw):
    """The configuration (default ``ci``) and the bundle a device runs: ``bundle`` checked
    against the configuration, or ``model`` compiled for it (``compile_kw`` to compile_model)."""
    from llmfab.boards.config import load_config
    from llmfab.compiler.compile import compile_model
    if config is None:
        config = load_config("ci")
    if bundle is None:
        bundle = compile_model(model, config, **compile_kw)
    else:
        bundle.check_config(config)
    return config, bundle


class Device:
    """A backend that runs a model token by token."""

    name = "?"
    #: token positions the device holds (prompt and generated tokens but the last)
    context: int = 0

    def reset(self) -> None:
        raise NotImplementedError

    def forward(self, tokens) -> np.ndarray:
        raise NotImplementedError

    def forward_last(self, tokens) -> np.ndarray:
        """``forward(tokens)`` for the logits of the last token only (``[1, vocab]``): the same
        bits, and what a device need not compute for the others it may leave out."""
        return self.forward(tokens)[-1:]

    def stats(self) -> dict:
        return {}

    def _check_fits(self, n: int, what: str) -> None:
        if n > self.context:
            raise BackendError(f"{what} is {n} tokens but backend '{self.name}' holds a context of "
                               f"{self.context} positions: shorten it")

    def logits(self, tokens, *, chunk: int | None = None) -> np.ndarray:
        """Teacher-forced logits for every position of ``tokens`` (float32 ``[T, vocab]``)."""
        tokens = list(tokens)
        self._check_fits(len(tokens), "the token sequence")
        self.reset()
        if chunk is None:
            return self.forward(tokens)
        out = [self.forward(tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)]
        return np.concatenate(out, axis=0)

    def generate(self, prompt, max_tokens: int, *, stop_ids=(), progress=None) -> GenerateResult:
        """Greedy decoding: the prompt in one forward, then one token at a time.

        Stops after a token in ``stop_ids`` (``stop == "eos"``), after ``max_tokens``
        tokens (``"length"``), or when the next token would need a position past
        :attr:`context` (``"context"``): the prompt and every generated token but the
        last fill at most ``context`` positions. A prompt longer than the context is
        refused before anything runs.
        """
        if not prompt:
            raise BackendError("the prompt is empty: give at least one token")
        if max_tokens < 1:
            raise BackendError(f"max_tokens must be at least 1, not {max_tokens}")
        prompt = list(prompt)
        self._check_fits(len(prompt), "the prompt")
        self.reset()
        t0 = time.perf_counter()
        lg = self.forward_last(prompt)
        t1 = time.perf_counter()
        out = []
        stop = "length"
        nxt = int(np.argmax(lg[-1]))
        while True:
            out.append(nxt)
            if progress:
                progress(nxt)
            if nxt in stop_ids:
                stop = "eos"
                break
            if len(out) >= max_tokens:
                break
            if len(prompt) + len(out) > self.context:     # no position left for nxt
                stop = "context"
                break
            lg = self.forward([nxt])
            nxt = int(np.argmax(lg[-1]))
        t2 = time.perf_counter()
        return GenerateResult(tokens=out, prompt_tokens=prompt, seconds=t2 - t0,
                              prefill_seconds=t1 - t0, stats=self.stats(), stop=stop)


def split_buckets(n: int, buckets, pos: int = 0, align: int = 1) -> list:
    """Greedy decomposition of ``n`` tokens from position ``pos`` into buckets (1 is always a
    bucket): each run the largest bucket ``T`` no larger than the tokens left whose start is
    a multiple of ``min(T, align)`` (``Bundle.prefill_align``: 1 but with attention on the
    chains)."""
    sizes = sorted({1, *(int(b) for b in buckets)}, reverse=True)
    out = []
    while n > 0:
        t = next(b for b in sizes if b <= n and pos % min(b, align) == 0)
        out.append(t)
        n -= t
        pos += t
    return out


def prompt_plan(n: int, buckets, pos: int = 0, align: int = 1, kv_only=(), last: bool = False,
                last_only=()) -> list:
    """The runs of ``n`` tokens from ``pos``, ``[(T, logits)]``: :func:`split_buckets`' runs, and
    which logits each leaves. With ``last`` (only the last token's logits wanted) a run
    before the last of bucket ``T`` in ``kv_only`` (the bundle's ``prefill_kv``) runs its KV-only
    program (``logits`` False), and the last, of a bucket ``T`` in ``last_only`` (the bundle's
    ``prefill_last``), its last-logits program (``"last"``); every other run, and every one
    without ``last``, has every token's logits (True)."""
    runs = split_buckets(n, buckets, pos, align)
    out = []
    for k, T in enumerate(runs):
        if not last or T == 1:
            out.append((T, True))
        elif k < len(runs) - 1:
            out.append((T, T not in kv_only))
        else:
            out.append((T, "last" if T in last_only else True))
    return out


class ProgramDevice(Device):
    """A device that runs a compiled bundle's programs: the decode program for one token,
    a prefill program for a bucket of ``T`` tokens (greedily the largest bucket that fits
    the tokens left and the context). Subclasses set ``vocab``, ``context``, ``buckets`` and
    ``pos`` and implement ``_decode(pos, token)`` -> ``[1, vocab]`` and
    ``_prefill(pos, tokens, logits=True)`` -> ``[T, vocab]`` (``logits=False``: the bucket's
    KV-only program, which leaves the same KV cache and no logits, returns ``None``;
    ``logits="last"``: its last-logits program, ``[1, vocab]``, the last token's).
    :meth:`forward_last` runs every run but the last KV-only, the last for its last token's logits."""

    vocab: int = 0
    buckets: list = []
    pos: int = 0

    @property
    def prefill_align(self) -> int:
        """Runs of T tokens start at multiples of ``min(T, prefill_align)`` (the bundle's)."""
        b = getattr(self, "bundle", None)
        return b.prefill_align if b is not None else 1

    def _decode(self, pos: int, token: int) -> np.ndarray:
        raise NotImplementedError

    def _prefill(self, pos: int, tokens: list, logits: bool | str = True) -> np.ndarray | None:
        raise NotImplementedError

    def forward(self, tokens):
        return self._forward(tokens, last=False)

    def forward_last(self, tokens):
        return self._forward(tokens, last=True)

    def _forward(self, tokens, last: bool):
        toks = [int(t) for t in tokens]
        for t in toks:
            if not 0 <= t < self.vocab:
                raise BackendError(f"token id {t} out of range (vocab size {self.vocab})")
        b = getattr(self, "bundle", None)
        fit = min(len(toks), max(self.context - self.pos, 0))      # the runs up to the context
        out = []
        i = 0
        for T, logits in prompt_plan(fit, self.buckets, self.pos, self.prefill_align,
                                     b.prefill_kv if b is not None else (), last,
                                     b.prefill_last if b is not None else ()):
            if T == 1:
                out.append(self._decode(self.pos, toks[i]))
            elif logits:
                out.append(self._prefill(self.pos, toks[i:i + T], logits=logits))
            else:
                self._prefill(self.pos, toks[i:i + T], logits=False)    # a run before the last
            self.pos += T
            i += T
        if i < len(toks):
            raise BackendError(f"context overflow: position {self.pos} >= compiled context "
                               f"{self.context}")
        if not out:
            return np.zeros((0, self.vocab), np.float32)
        return out[-1][-1:] if last else np.concatenate(out, axis=0)


class ReferenceDevice(Device):
    name = "reference"

    def __init__(self, model, config=None, *, max_context=None, kv_cache="f16"):
        from llmfab.sim.reference import ReferenceModel
        self.ref = ReferenceModel(model, max_context=max_context, kv_cache=kv_cache)

    @property
    def context(self) -> int:
        return self.ref.max_context

    def reset(self):
        self.ref.reset()

    def forward(self, tokens):
        return self.ref.forward(tokens)


def open_device(backend: str, model, config=None, **kw) -> Device:
    """Open a backend for an imported model and an accelerator configuration."""
    if backend == "reference":
        return ReferenceDevice(model, config, **kw)
    if backend == "golden":
        from llmfab.host.golden_backend import GoldenDevice
        return GoldenDevice(model, config, **kw)
    if backend == "rtl":
        from llmfab.host.rtl_backend import RtlDevice
        return RtlDevice(model, config, **kw)
    if backend == "xrt":
        from llmfab.host.xrt_backend import XrtDevice
        return XrtDevice(model, config, **kw)
    raise BackendError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
