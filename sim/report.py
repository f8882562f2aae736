"""Compile reports: what pruning to N:M costs in accuracy against the dense model."""

from __future__ import annotations

import numpy as np

# A short built-in text (no download): the report runs the hardware-numerics
# model teacher-forced on its tokens, dense and sparse, and compares the logits.
REPORT_TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, "
               "and Berlin is the capital of Germany. def add(a, b):\n    return a + b\n")


def sparsity_report(model, bundle, config, *, max_tokens: int = 24, tokens=None) -> dict:
    """Top-1 agreement and logit error of the sparse model against the dense one.

    Both run the functional hardware-numerics model (sim/numerics_model.py,
    bit-exact with the golden model) on the same tokens.
    """
    from llmfab.sim.numerics_model import NumericsModel

    if tokens is None:
        try:
            from llmfab.compiler.tokenizer import Tokenizer
            tokens = Tokenizer.from_gguf(model.path).encode(REPORT_TEXT)[:max_tokens]
        except Exception:      # noqa: BLE001 - HF checkpoints have no GGUF tokenizer
            tokens = list(range(1, max_tokens + 1))
    masks = bundle.extra.get("masks", {})
    ctx = max(len(tokens), 32)
    dense = NumericsModel(model, max_context=ctx).forward(tokens)
    sp = NumericsModel(model, max_context=ctx, masks=masks).forward(tokens)
    top1 = float(np.mean(dense.argmax(-1) == sp.argmax(-1)))
    err = np.abs(dense - sp)
    # KL(dense || sparse) per position, in nats
    def logsm(x):
        x = x.astype(np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    ld, ls = logsm(dense), logsm(sp)
    kl = float(np.mean(np.sum(np.exp(ld) * (ld - ls), -1)))
    kept = {k: float(v.mean()) for k, v in list(masks.items())[:1]}
    return {"positions": len(tokens), "top1_agreement_vs_dense": round(top1, 4),
            "mean_abs_logit_error": round(float(err.mean()), 4),
            "max_abs_logit_error": round(float(err.max()), 4),
            "mean_kl_nats": round(kl, 4), "pruned_matrices": len(masks),
            "kept_fraction_example": kept}
