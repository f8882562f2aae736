"""Pipeline partitioning: a model over N cards as N contiguous stages of layers.

    stages = plan_stages(model, [config] * 3)          # balanced by weight bytes
    bundles = compile_stages(model, stages)            # one bundle per stage

Stage ``i`` holds layers ``[a, b)``; the first also holds the embedding, the
last the final norm and the LM head (an embedding tied to the LM head is in
both). Each stage keeps the KV cache of its own layers. Only the residual
stream crosses between stages: ``dim`` float32 per token, the exact bits the
single-device program keeps in its activation buffer between layer ``b-1`` and
layer ``b`` (``compile_model(..., layers=(a, b))``), so a pipeline computes
the single device's logits bit for bit.

The split minimises the largest stage's weight bytes (the embedding and LM
head count on their stages); a stage whose weights, KV cache, tables and I/O
do not fit its card's memory (the one the accelerator streams from, e.g. the
U280's 8 GiB of HBM) is refused, naming the stage.

A placement file (JSON or YAML) fixes the stages by hand::

    stages:
      - {layers: [0, 12], config: u280}
      - {layers: [12, 30], config: u280}
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmfab.core.errors import CompileError, FitError, LlmfabError
from llmfab.compiler.compile import MATRICES, _row_bytes, compile_model, parse_sparsity
from llmfab.compiler import quant


@dataclass
class Stage:
    """One pipeline stage: layers ``[first_layer, end_layer)`` on a card of ``config``."""
    index: int
    layers: tuple
    config: object
    weight_bytes: int = 0
    device_bytes: int = 0

    @property
    def name(self) -> str:
        a, b = self.layers
        return f"stage {self.index} (layers {a}-{b - 1})"

    def to_dict(self) -> dict:
        return {"stage": self.index, "layers": list(self.layers), "config": self.config.name,
                "board": self.config.board_spec.name, "weight_bytes": self.weight_bytes,
                "device_bytes": self.device_bytes,
                "card_bytes": card_bytes(self.config)}


def card_bytes(config) -> int:
    """Bytes of the memory a card's accelerator streams from (its first memory: HBM on u280)."""
    return config.board_spec.main_memory.capacity_bytes


def _matrix_bytes(model, name: str, sp: str = "dense") -> int:
    t = model.tensor(name)
    fmt = t.qtype if t.qtype in quant.BLOCK_BYTES else "q8_0"
    return t.shape[0] * _row_bytes(fmt, sp, t.shape[1])


def layer_bytes(model, sparsity: str | None = None) -> tuple:
    """(embedding bytes, LM head bytes (0 when tied), [weight bytes of each layer])."""
    d = model.desc
    sp_of = parse_sparsity(sparsity)
    emb = _matrix_bytes(model, "token_embd.weight")
    head = 0 if d.tied_embeddings else _matrix_bytes(model, "output.weight")
    per = [sum(_matrix_bytes(model, f"blk.{li}.{w}.weight", sp_of[w]) for w in MATRICES)
           for li in range(d.n_layers)]
    return emb, head, per


def stage_device_bytes(model, layers: tuple, context: int, sparsity: str | None = None,
                       slices: int = 1) -> tuple:
    """(weight bytes, device bytes) a stage of ``layers`` needs (before the compiler's padding)
    on a card of ``slices`` slices: a stage with a tied LM head holds the embedding as its
    head, and on several slices also as rows when it starts the model (docs/isa.md, "Slices")."""
    d = model.desc
    a, b = layers
    emb, head, per = layer_bytes(model, sparsity)
    first, last = a == 0, b == d.n_layers
    tied_head = last and d.tied_embeddings and (not first or slices > 1)
    w = sum(per[a:b]) + (emb if first else 0) + (emb if tied_head else 0) + (head if last else 0)
    kv = (b - a) * d.n_kv_heads * 2 * context * d.head_dim * 2
    io = (d.vocab_size if last else d.dim) * 4 + d.dim * 4
    tables = (2 * (b - a) + 1) * d.dim * 4 + context * d.head_dim * 4
    return w, w + kv + io + tables


def balance(per: list, emb: int, head: int, n: int, tied: bool = False) -> list:
    """Contiguous split of the layers into ``n`` stages minimising the largest stage's bytes.

    Returns ``[(a, b), ...]``; the first stage carries ``emb``, the last ``head`` (and ``emb``
    again when the embedding is tied to the LM head).
    """
    L = len(per)
    if not 1 <= n <= L:
        raise CompileError(f"cannot split {L} layers over {n} cards: give 1 to {L} cards")
    pre = [0]
    for x in per:
        pre.append(pre[-1] + x)

    def cost(a, b):
        c = pre[b] - pre[a]
        if a == 0:
            c += emb
        if b == L:
            c += head + (emb if tied else 0)
        return c

    INF = float("inf")
    # best[k][b]: the smallest max-stage cost of layers [0, b) over k stages
    best = [[INF] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for b in range(k, L + 1):
            for a in range(k - 1, b):
                v = max(best[k - 1][a], cost(a, b))
                if v < best[k][b]:
                    best[k][b], cut[k][b] = v, a
    out, b = [], L
    for k in range(n, 0, -1):
        a = cut[k][b]
        out.append((a, b))
        b = a
    return out[::-1]


def _context(model, config, context=None) -> int:
    return int(context or min(config.context, model.desc.context_length))


def plan_stages(model, configs: list, *, sparsity: str | None = None, context: int | None = None,
                layers: list | None = None) -> list:
    """The stages of ``model`` over cards of ``configs`` (one per card): balanced by weight
    bytes, or the given ``layers`` ranges. Refuses, naming the stage, one that does not fit."""
    d = model.desc
    n = len(configs)
    if layers is None:
        emb, head, per = layer_bytes(model, sparsity)
        layers = balance(per, emb, head, n, d.tied_embeddings)
    else:
        layers = [tuple(int(x) for x in r) for r in layers]
        if len(layers) != n:
            raise CompileError(f"{len(layers)} layer ranges for {n} cards")
        expect = 0
        for i, (a, b) in enumerate(layers):
            if a != expect or b <= a:
                raise CompileError(f"stage {i}: layers [{a}, {b}) do not continue from layer {expect}: "
                                   f"stages must be contiguous, non-empty and in order")
            expect = b
        if expect != d.n_layers:
            raise CompileError(f"the stages end at layer {expect}, but model '{d.name}' has "
                               f"{d.n_layers} layers")
    stages = []
    for i, (rng, cfg) in enumerate(zip(layers, configs)):
        st = Stage(i, tuple(rng), cfg)
        st.weight_bytes, st.device_bytes = stage_device_bytes(model, rng, _context(model, cfg, context),
                                                              sparsity, cfg.slices)
        mem = cfg.board_spec.main_memory
        if st.device_bytes > mem.capacity_bytes:
            raise FitError(f"{st.name} needs {st.device_bytes / 2**30:.2f} GiB of device memory "
                           f"(weights {st.weight_bytes / 2**30:.2f} GiB) but board "
                           f"'{cfg.board_spec.name}' has {mem.capacity_bytes / 2**30:.2f} GiB of "
                           f"{mem.kind.upper()}: use more cards")
        stages.append(st)
    return stages


def compile_stages(model, stages: list, *, sparsity: str | None = None, context: int | None = None,
                   progress: bool = False, emit_image: bool = True, prefill: bool = True) -> list:
    """One bundle per stage (``compile_model(..., layers=stage.layers)``), in stage order."""
    it = stages
    if progress:
        from tqdm import tqdm
        it = tqdm(stages, desc="compiling stages", unit="stage", disable=None)
    out = []
    for st in it:
        try:
            b = compile_model(model, st.config, sparsity=sparsity, context=context, emit_image=emit_image,
                              prefill=prefill, layers=st.layers)
        except LlmfabError as e:
            raise type(e)(f"{st.name}: {e}") from None
        b.manifest["stage"]["index"] = st.index
        b.manifest["stage"]["stages"] = len(stages)
        out.append(b)
    return out


def read_placement(path: str, load_config) -> tuple:
    """A placement file -> (layer ranges, configurations). ``load_config(name)`` resolves names."""
    import json
    import yaml
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError as e:
        raise CompileError(f"cannot read placement file {path}: {e.strerror}") from None
    try:
        doc = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise CompileError(f"placement file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                           f"{str(e).splitlines()[0]}") from None
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, list) or not stages:
        raise CompileError(f"placement file {path}: expected 'stages', a list of "
                           f"{{layers: [a, b], config: NAME}}")
    ranges, configs = [], []
    for i, s in enumerate(stages):
        if not isinstance(s, dict) or not isinstance(s.get("layers"), list) or len(s["layers"]) != 2 \
                or not all(isinstance(x, int) for x in s["layers"]):
            raise CompileError(f"placement file {path}: stages[{i}] needs layers: [a, b] (two integers)")
        ranges.append(tuple(s["layers"]))
        configs.append(s.get("config"))
    base = os.path.dirname(os.path.abspath(path))
    resolved = []
    for c in configs:
        if c is None:
            resolved.append(None)
        else:
            p = os.path.join(base, c)
            resolved.append(load_config(p if c.endswith((".yaml", ".yml")) and os.path.exists(p) else c))
    return ranges, resolved
