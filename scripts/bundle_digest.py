"""SHA-256 digests of what the compiler emits, for refactors that must not change a byte.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python scripts/bundle_digest.py > before.txt
    ... refactor ...
    OPENBLAS_NUM_THREADS=1 .venv/bin/python scripts/bundle_digest.py > after.txt
    diff before.txt after.txt

For each case (SmolLM2 on ci, tiny and u280-slice, with sparsity and as pipeline
stages, and small synthetic models from tests/tinymodel.py) it prints one line per
artefact: the decode program, each prefill program, the HBM image, the sparsity
masks and the manifest (canonical JSON without the fields that change from run to
run or with the compiler's own source: ``stats.compile_seconds``,
``compiler.source_hash``, ``model.file``). A case the compiler refuses prints its
error message instead. With ``--golden`` the synthetic cases also run on the golden
model (decode steps and a prefill run, fast and specification paths) and print a
digest of the logits.

``--only SUBSTRING`` runs the cases whose name contains it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import sys
import tempfile
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))      # tinymodel


def sha(b) -> str:
    if isinstance(b, np.ndarray):
        b = np.ascontiguousarray(b).tobytes()
    return hashlib.sha256(bytes(b)).hexdigest()


def manifest_digest(man: dict) -> str:
    from llmfab.compiler.bundle import canonical_json
    m = copy.deepcopy(man)
    m["stats"].pop("compile_seconds", None)
    m["compiler"].pop("source_hash", None)
    m["model"]["file"] = os.path.basename(m["model"]["file"])
    return sha(canonical_json(m))


def bundle_lines(name: str, b) -> list:
    out = [f"{name} program {sha(b.program)}"]
    for t in sorted(b.prefill):
        out.append(f"{name} prefill_{t} {sha(b.prefill[t])}")
    for t in sorted(b.prefill_kv):
        out.append(f"{name} prefill_kv_{t} {sha(b.prefill_kv[t])}")
    out.append(f"{name} hbm_image {sha(b.hbm_image)} ({b.hbm_image.size} bytes)")
    masks = b.extra.get("masks") or {}
    if masks:
        h = hashlib.sha256()
        for k in sorted(masks):
            h.update(k.encode() + b"\0" + np.packbits(masks[k]).tobytes())
        out.append(f"{name} masks {h.hexdigest()} ({len(masks)})")
    out.append(f"{name} manifest {manifest_digest(b.manifest)}")
    return out


def golden_lines(name: str, b, paths=(True, False)) -> list:
    """Outputs of 5 decode steps and (when the bundle has prefill programs) one run of its
    largest bucket, on the fast path and the specification path (``fast=False``): the
    logits, or the hidden state a pipeline stage stores. A stage that does not start the
    model gets a fixed pseudo-random hidden state as its input."""
    from llmfab.sim.golden import Golden
    man = b.manifest
    mm = man["memory_map"]
    vocab = int(man["model"]["vocab_size"])
    dim = int(man["model"]["dim"])
    out_base = int(mm["logits"][0] if "logits" in mm else mm["hidden_out"][0])
    width = vocab if "logits" in mm else dim
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((64, dim)).astype(np.float32)
    toks = [(7 * i + 3) % vocab for i in range(5)]
    out = []
    for fast in paths:
        g = Golden(b, fast=fast)
        h = hashlib.sha256()

        def stage_hidden(T, k):
            if "hidden_in" in mm:
                a = int(mm["hidden_in"][0])
                g.hbm[a:a + 4 * T * dim] = hidden[k:k + T].reshape(-1).view(np.uint8)

        for pos, tok in enumerate(toks):
            stage_hidden(1, pos)
            r = g.run(pos, tok)
            h.update(str(r.status).encode())
            h.update(g.hbm[out_base:out_base + 4 * width].tobytes())
        if g.buckets:
            T = g.buckets[-1]
            stage_hidden(T, 8)
            if "prefill_tokens" in mm:
                g.stage_tokens([(5 * i + 1) % vocab for i in range(T)])
            r = g.run(len(toks), 0, f"prefill_{T}")
            h.update(str(r.status).encode())
            h.update(g.hbm[out_base:out_base + 4 * T * width].tobytes())
        out.append(f"{name} golden_{'fast' if fast else 'spec'} {h.hexdigest()}")
    return out


def cases(tmp: str):
    """(name, thunk returning a Bundle, golden: False, True (fast and spec) or (True,) (fast only))."""
    from llmfab.boards.config import load_config
    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    import tinymodel

    smol = {}

    def S():
        if "m" not in smol:
            smol["m"] = load_model()
        return smol["m"]

    cfg = {}

    def C(n):
        if n not in cfg:
            cfg[n] = load_config(n)
        return cfg[n]

    tiny = {}

    def T(key, **kw):
        if key not in tiny:
            path = os.path.join(tmp, f"{key}.gguf")
            tiny[key] = load_model(tinymodel.write_tiny_gguf(path, **kw))
        return tiny[key]

    yield "smol.ci", lambda: compile_model(S(), C("ci")), (True,)
    yield "smol.tiny", lambda: compile_model(S(), C("tiny")), False
    yield "smol.u280-slice", lambda: compile_model(S(), C("u280-slice")), False
    yield "smol.ci.2:4", lambda: compile_model(S(), C("ci"), sparsity="2:4"), False
    yield "smol.u280-slice.ffn=2:4", lambda: compile_model(S(), C("u280-slice"), sparsity="ffn=2:4"), False
    yield "smol.ci.layers0-2", lambda: compile_model(S(), C("ci"), layers=(0, 2)), False
    yield "smol.ci.layers2-4", lambda: compile_model(S(), C("ci"), layers=(2, 4)), False
    yield "smol.ci.layers28-30", lambda: compile_model(S(), C("ci"), layers=(28, 30)), False
    yield "smol.ci.ctx256.noprefill", lambda: compile_model(S(), C("ci"), context=256, prefill=False), False
    yield "smol.u280-slice.noimage", lambda: compile_model(S(), C("u280-slice"), emit_image=False), False

    q41 = lambda: T("q4_1.s5", qtype="q4_1", seed=5)      # noqa: E731
    yield "tiny_q4_1.tiny", lambda: compile_model(q41(), C("tiny")), True
    yield "tiny_q4_1.tiny.2:4", lambda: compile_model(q41(), C("tiny"), sparsity="2:4"), True
    yield "tiny_q4_1.ci.ffn=2:4,attn=8:16", lambda: compile_model(q41(), C("ci"), sparsity="ffn=2:4,attn=8:16"), True
    yield "tiny_q4_1.ci.2:16", lambda: compile_model(q41(), C("ci"), sparsity="2:16"), True
    q40u = lambda: T("q4_0.untied", qtype="q4_0", tied=False, seed=3)    # noqa: E731
    yield "tiny_q4_0_untied.ci", lambda: compile_model(q40u(), C("ci")), True
    yield "tiny_q4_0_untied.u280-slice", lambda: compile_model(q40u(), C("u280-slice")), True
    q80 = lambda: T("q8_0.l3", qtype="q8_0", n_layers=3, seed=7)     # noqa: E731
    yield "tiny_q8_0_3l.ci", lambda: compile_model(q80(), C("ci")), True
    yield "tiny_q8_0_3l.ci.layers0-1", lambda: compile_model(q80(), C("ci"), layers=(0, 1)), True
    yield "tiny_q8_0_3l.ci.layers1-2", lambda: compile_model(q80(), C("ci"), layers=(1, 2)), True
    yield "tiny_q8_0_3l.ci.layers1-3", lambda: compile_model(q80(), C("ci"), layers=(1, 3)), True
    yield "tiny_q8_0_3l.tiny.layers0-2.2:4", lambda: compile_model(q80(), C("tiny"), layers=(0, 2), sparsity="2:4"), True
    f16 = lambda: T("f16", qtype="f16", seed=2)      # noqa: E731
    yield "tiny_f16.tiny", lambda: compile_model(f16(), C("tiny")), True
    gqa = lambda: T("gqa4", qtype="q4_1", n_heads=8, n_kv_heads=2, dim=128, ffn_dim=256, seed=4)   # noqa: E731
    yield "tiny_gqa4.ci", lambda: compile_model(gqa(), C("ci")), True
    yield "tiny_gqa4.tiny.noprefill", lambda: compile_model(gqa(), C("tiny"), prefill=False), True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--golden", action="store_true", help="also digest golden-model logits")
    args = ap.parse_args(argv)
    from llmfab.core.errors import LlmfabError
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="bundle-digest-") as tmp:
        for name, make, golden in cases(tmp):
            if args.only not in name:
                continue
            try:
                b = make()
            except LlmfabError as e:
                print(f"{name} error {type(e).__name__}: {e}", flush=True)
                continue
            lines = bundle_lines(name, b)
            if args.golden and golden:
                lines += golden_lines(name, b, *([golden] if isinstance(golden, tuple) else []))
            print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
