"""Accuracy against llama.cpp's teacher-forced logits (tests/data/llamacpp_logits.npz)."""

from __future__ import annotations

import json
from dataclasses import dataclass, asdict

import numpy as np


@dataclass
class Agreement:
    positions: int
    top1_agreement: float
    confident_positions: int       # llama.cpp top-1 leads top-2 by > margin
    confident_agreement: float
    median_abs_err_top8: float
    max_abs_err_top8: float

    def to_dict(self):
        return asdict(self)


def load_llamacpp_reference(path: str):
    """[(tokens, topk_ids [n,k], topk_logits [n,k])] for each text in the file."""
    z = np.load(path, allow_pickle=False)
    out = []
    i = 0
    while f"text_{i}_tokens" in z:
        out.append((z[f"text_{i}_tokens"].astype(np.int64), z[f"text_{i}_topk_ids"].astype(np.int64),
                    z[f"text_{i}_topk_logits"].astype(np.float32)))
        i += 1
    return out


def _agreement(rows, margin: float) -> Agreement:
    """``rows``: per position ``(our top-1 id, llama.cpp's top-k ids, its logits, our errors)``."""
    agree = conf = conf_ok = n = 0
    errs = []
    for a, ids, vals, err in rows:
        n += 1
        agree += a == ids[0]
        if vals[0] - vals[1] > margin:
            conf += 1
            conf_ok += a == ids[0]
        errs.extend(err)
    errs = np.asarray(errs)
    return Agreement(positions=n, top1_agreement=agree / n, confident_positions=conf,
                     confident_agreement=conf_ok / conf if conf else 1.0,
                     median_abs_err_top8=float(np.median(errs)), max_abs_err_top8=float(errs.max()))


def compare(ours: list, ref: list, *, margin: float = 1.0, topn: int = 8) -> Agreement:
    """``ours``: logits [n, vocab] per text; ``ref``: as from :func:`load_llamacpp_reference`."""
    return _agreement(((int(np.argmax(lg[p])), ids[p], vals[p],
                        np.abs(lg[p, ids[p, :topn]] - vals[p, :topn]).tolist())
                       for lg, (toks, ids, vals) in zip(ours, ref) for p in range(len(toks))),
                      margin)


def compare_topk(ours: list, ref: list, *, margin: float = 1.0, topn: int = 8) -> Agreement:
    """Like :func:`compare`, for two top-k files (e.g. llama.cpp with two KV-cache formats):
    ``ours`` and ``ref`` both as from :func:`load_llamacpp_reference`, same tokens.

    Only ``ours``' top-k logits are known, so a logit error is counted for each of ``ref``'s
    top-``topn`` ids found in ``ours``' top-k (the others, rare with k = 16, are left out).
    """
    def rows():
        for (otoks, oids, ovals), (toks, ids, vals) in zip(ours, ref):
            if not np.array_equal(otoks, toks):
                raise ValueError("the two files hold different tokens")
            for p in range(len(toks)):
                where = {int(t): j for j, t in enumerate(oids[p])}
                yield (int(oids[p, 0]), ids[p], vals[p],
                       [abs(float(ovals[p, where[int(t)]]) - float(v))
                        for t, v in zip(ids[p, :topn], vals[p, :topn]) if int(t) in where])
    return _agreement(rows(), margin)


def agreement_fields(at_half: Agreement, at_one: Agreement | None = None) -> dict:
    """One benchmark row's figures (benchmarks/accuracy.py, benchmarks/kv_formats.py): the
    agreement with a confidence margin of 0.5 (``at_half``) and, if given, of 1.0."""
    r = {"positions": at_half.positions, "top1": at_half.top1_agreement,
         "confident_0.5": at_half.confident_agreement, "n_confident_0.5": at_half.confident_positions}
    if at_one is not None:
        r.update({"confident_1.0": at_one.confident_agreement, "n_confident_1.0": at_one.confident_positions})
    r.update({"median_abs_err_top8": at_half.median_abs_err_top8, "max_abs_err_top8": at_half.max_abs_err_top8})
    return r


def agreement_cells(r: dict) -> str:
    """The Markdown cells of :func:`agreement_fields`' row: top-1, the confident positions
    (margin 0.5, then 1.0 if measured), median and max |logit error| over llama.cpp's top-8."""
    cells = [f"{100 * r['top1']:.1f} %"]
    for m in ("0.5", "1.0"):
        if f"confident_{m}" in r:
            cells.append(f"{100 * r[f'confident_{m}']:.1f} % ({r[f'n_confident_{m}']})")
    cells += [f"{r['median_abs_err_top8']:.3f}", f"{r['max_abs_err_top8']:.2f}"]
    return " | ".join(cells)
