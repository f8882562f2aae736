"""The multi-card part of the ``llmfab`` command line (docs/multi-card.md).

    llmfab compile  --cards N [--placement FILE] --out DIR     # DIR/pipeline.json + DIR/stage<i>/
    llmfab generate --cards N [--ray-address ADDR] --prompt ...  # stages as Ray actors
    llmfab generate --pipeline DIR --prompt ...                  # a compiled pipeline
    llmfab plan     --model M --config C --cards N              # placement + projection

Ray is imported only by ``generate`` with ``--cards``/``--pipeline``/``--placement``:
the other commands stay as fast as they were.
"""

from __future__ import annotations

import json
import os
import sys

from llmfab.core.errors import LlmfabError

PIPELINE_FILE = "pipeline.json"


def add_card_options(p, command: str) -> None:
    """``--cards``/``--placement`` (and for generate ``--pipeline``, ``--ray-address``, ``--stage-timeout``)."""
    g = p.add_argument_group("multi-card (docs/multi-card.md)")
    g.add_argument("--cards", type=int, metavar="N", default=None,
                   help="split the model into N pipeline stages, one per card, balanced by weight bytes")
    g.add_argument("--placement", metavar="FILE", default=None,
                   help="the stages by hand: a YAML/JSON file of {stages: [{layers: [a, b], config: NAME}]}")
    if command == "generate":
        g.add_argument("--pipeline", metavar="DIR", default=None,
                       help="run a compiled pipeline (llmfab compile --cards N --out DIR)")
        g.add_argument("--ray-address", metavar="ADDR", default=None,
                       help="join this Ray cluster (e.g. 'auto' or 'ray://head:10001') instead of starting "
                            "a local Ray instance")
        g.add_argument("--stage-timeout", type=float, metavar="S", default=None,
                       help="seconds to wait for a stage's answer before giving up (default: 300)")


def wants_cards(args) -> bool:
    return any(getattr(args, k, None) is not None for k in ("cards", "placement", "pipeline"))


def add_plan_parser(sub, add_parser, add_model, add_config) -> None:
    p = add_parser(sub, "plan", "place a model over several cards and project its tokens/s")
    p.add_argument("--model", metavar="GGUF|DIR|SHAPE",
                   help="GGUF file, Hugging Face checkpoint directory or a named shape "
                        "(llama2-7b, llama2-13b, llama2-70b: Q4_0 weights, no download) "
                        "(default: the bundled SmolLM2-135M-Instruct Q4_1)")
    add_config(p, default="u280")
    p.add_argument("--cards", type=int, metavar="N", default=None, help="number of cards (stages)")
    p.add_argument("--placement", metavar="FILE", default=None,
                   help="the stages by hand (as llmfab compile --placement)")
    p.add_argument("--streams", type=int, metavar="S", default=None,
                   help="requests in flight for the second projection (default: the number of cards)")
    p.add_argument("--context", type=int, metavar="N", default=None,
                   help="compiled context (default: the configuration's, at most the model's)")
    p.add_argument("--hop-us", type=float, metavar="US", default=None,
                   help="latency of one host DMA transfer in microseconds (default: 50, an assumption; "
                        "see docs/multi-card.md)")
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw memory and step time per card")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _check_cards(args) -> None:
    if args.cards is not None and args.cards < 1:
        raise LlmfabError(f"--cards must be at least 1, not {args.cards}")
    if args.cards is not None and args.placement is not None:
        raise LlmfabError("give --cards or --placement, not both")


def _stages(args, model, config_loader):
    """(configurations, layer ranges or None) from --cards or --placement."""
    from llmfab.compiler.partition import read_placement
    if args.placement is not None:
        ranges, cfgs = read_placement(args.placement, config_loader)
        default = config_loader(args.config)
        return [c or default for c in cfgs], ranges
    return [config_loader(args.config)] * args.cards, None


def _load_model(name):
    from llmfab.compiler.model import load_model
    from llmfab.compiler.shapes import named_shape
    if name and not os.path.exists(name):
        m = named_shape(name)
        if m is not None:
            return m
    return load_model(name)


# ---------------------------------------------------------------------------- compile --cards
def cmd_compile_cards(args) -> None:
    """`llmfab compile --cards N | --placement FILE --out DIR`: one bundle per stage."""
    import shutil
    from llmfab.boards.config import load_config
    from llmfab.compiler.bundle import write_bundle
    from llmfab.compiler.compile import parse_sparsity
    from llmfab.compiler.partition import compile_stages, plan_stages
    _check_cards(args)
    from llmfab.host.cli import _check_bundle_dest
    _check_bundle_dest(args.out, args.force, what="pipeline", marker=PIPELINE_FILE)
    parse_sparsity(args.sparsity)
    model = _load_model(args.model)
    configs, ranges = _stages(args, model, load_config)
    stages = plan_stages(model, configs, sparsity=args.sparsity, layers=ranges)
    bundles = compile_stages(model, stages, sparsity=args.sparsity, progress=True)
    out = os.path.abspath(args.out)
    tmp = f"{out}.new-{os.getpid()}"
    try:
        os.makedirs(tmp)
        for st, b in zip(stages, bundles):
            write_bundle(b, os.path.join(tmp, f"stage{st.index}"))
        doc = {"model": model.desc.name, "model_file": os.path.abspath(model.path) if model.path else "",
               "stages": [{**st.to_dict(), "bundle": f"stage{st.index}", "bundle_hash": b.hash}
                          for st, b in zip(stages, bundles)]}
        with open(os.path.join(tmp, PIPELINE_FILE), "w") as fh:
            json.dump(doc, fh, indent=1)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except OSError as e:
        raise LlmfabError(f"cannot write a pipeline to {args.out}: {e.strerror}") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"pipeline": args.out, "stages": doc["stages"]}))


def read_pipeline(path: str) -> tuple:
    """(pipeline.json, [Bundle per stage], [config per stage]) of a compiled pipeline directory."""
    from llmfab.boards.config import load_config
    from llmfab.compiler.bundle import read_bundle
    fp = os.path.join(path, PIPELINE_FILE)
    try:
        with open(fp) as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise LlmfabError(f"{path} holds no pipeline (no {PIPELINE_FILE}): compile one with "
                          f"llmfab compile --cards N --out {path}") from None
    except (OSError, ValueError) as e:
        raise LlmfabError(f"cannot read {fp}: {e}") from None
    bundles, configs = [], []
    for s in doc.get("stages", []):
        cfg = load_config(s["config"])
        bundles.append(read_bundle(os.path.join(path, s["bundle"]), cfg))
        configs.append(cfg)
    if not bundles:
        raise LlmfabError(f"{fp} lists no stages")
    return doc, bundles, configs


# ---------------------------------------------------------------------------- generate --cards
def cmd_generate_cards(args, text_stream) -> None:
    """`llmfab generate --cards N | --placement FILE | --pipeline DIR`: the stages on Ray."""
    from llmfab.boards.config import load_config
    from llmfab.compiler.model import load_model
    from llmfab.compiler.tokenizer import Tokenizer
    from llmfab.host.pipeline import DEFAULT_TIMEOUT, Pipeline
    _check_cards(args)
    if args.max_tokens < 1:
        raise LlmfabError(f"--max-tokens must be at least 1, not {args.max_tokens}")
    if not args.prompt:
        raise LlmfabError("--prompt is empty: give some text")
    if args.bundle:
        raise LlmfabError("--bundle runs on one card: give --pipeline DIR for a compiled pipeline")
    backend = args.backend or "golden"
    if backend not in ("golden", "rtl"):
        raise LlmfabError(f"--cards runs on --backend golden or rtl, not {backend}")
    if args.context is not None:
        raise LlmfabError("--context applies to --backend reference; pipeline stages hold the compiled "
                          "program's context")
    if args.stage_timeout is not None and args.stage_timeout <= 0:
        raise LlmfabError(f"--stage-timeout must be positive, not {args.stage_timeout:g}")
    if args.pipeline is not None:
        if args.cards is not None or args.placement is not None:
            raise LlmfabError("give --pipeline or --cards/--placement, not both")
        doc, bundles, configs = read_pipeline(args.pipeline)
        model_path = args.model or doc.get("model_file") or None
    else:
        from llmfab.compiler.partition import compile_stages, plan_stages
        model = load_model(args.model)
        model_path = model.path
        cfgs, ranges = _stages(args, model, load_config)
        stages = plan_stages(model, cfgs, layers=ranges)
        bundles = compile_stages(model, stages, progress=sys.stderr.isatty())
        configs = [s.config for s in stages]
    if model_path is None:
        from llmfab.compiler.paths import default_model_path
        model_path = default_model_path()
    if os.path.isdir(model_path):
        raise LlmfabError("generate needs a tokenizer: give a GGUF model")
    tok = Tokenizer.from_gguf(model_path)
    from llmfab.host.cli import _encode_prompt, _print_completion
    prompt = _encode_prompt(tok, args)
    stop = set(tok.eot_ids)
    stream = None
    if not args.json and sys.stdout.isatty():
        if not args.chat:
            sys.stdout.write(args.prompt)
        stream = text_stream(tok, sys.stdout, skip=stop)
    with Pipeline(bundles, backend=backend, configs=configs, ray_address=args.ray_address,
                  timeout=args.stage_timeout or DEFAULT_TIMEOUT) as pipe:
        try:
            res = pipe.generate(prompt, args.max_tokens, stop_ids=stop, progress=stream)
        except BaseException:
            if stream is not None:
                stream.close()
                sys.stdout.write("\n")
                sys.stdout.flush()
            raise
        stages = pipe.stats()
    shown = res.tokens[:-1] if res.tokens and res.tokens[-1] in stop else res.tokens
    completion = tok.decode(shown)
    if args.json:
        print(json.dumps({"text": completion, "tokens": res.tokens, "stop": res.stop, "backend": backend,
                          "cards": len(bundles), "tokens_per_s": round(res.tokens_per_s, 3),
                          "prompt_tokens": res.prompt_tokens, "stages": stages}))
        return
    _print_completion(stream, args, completion)


# ---------------------------------------------------------------------------- plan
def cmd_plan(args) -> None:
    """`llmfab plan --model M --config C --cards N`: placement, memory per card, projected tokens/s."""
    from llmfab.boards.config import load_config
    from llmfab.sim.plan import HOP_LATENCY_S, plan, plan_plot
    if args.cards is None and args.placement is None:
        raise LlmfabError("give --cards N (or --placement FILE)")
    _check_cards(args)
    if args.streams is not None and args.streams < 1:
        raise LlmfabError(f"--streams must be at least 1, not {args.streams}")
    if args.hop_us is not None and args.hop_us < 0:
        raise LlmfabError(f"--hop-us must be 0 or more, not {args.hop_us:g}")
    if args.context is not None and args.context < 1:
        raise LlmfabError(f"--context must be at least 1, not {args.context}")
    model = _load_model(args.model)
    configs, ranges = _stages(args, model, load_config)
    p = plan(model, configs[0], len(configs), configs=configs, layers=ranges, streams=args.streams,
             context=args.context, progress=sys.stderr.isatty(),
             hop_latency_s=HOP_LATENCY_S if args.hop_us is None else args.hop_us * 1e-6)
    if args.plot:
        plan_plot(p, args.plot)
    if args.json:
        print(json.dumps(p.to_dict()))
    else:
        print(p.table())
