"""Tiny llama-architecture models made on the fly, for tests that need a model file.

    from tinymodel import write_tiny_gguf, write_tiny_hf
    path = write_tiny_gguf(tmp_path / "tiny.gguf")                 # Q4_1, 2 layers, dim 64
    path = write_tiny_gguf(tmp_path / "t.gguf", "q8_0", n_layers=1, tied=False)

Tests import this module by name: pytest puts ``tests/`` on ``sys.path`` (the
default ``prepend`` import mode, with or without ``-n``). Everything is seeded,
so two calls with the same arguments write byte-identical files.

GGUF models (:func:`write_tiny_gguf`) are written with ``gguf.GGUFWriter`` and
llama metadata as llama.cpp's converter writes it; weights are random
(``N(0, 0.02)``-ish, norms near 1), quantized by ``gguf.quants``. A byte-level
tokenizer comes along (256 byte tokens, then ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>`` and a few merges when the vocabulary is large enough), so the
file also works with ``Tokenizer.from_gguf`` and ``llmfab generate``.

Hugging Face checkpoints (:func:`write_tiny_hf`) are a directory with
``config.json`` and ``model.safetensors`` in HF's own layout (rotate-half RoPE,
``model.layers.N.self_attn.q_proj.weight`` ...).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

__all__ = ["TINY", "tiny_weights", "write_tiny_gguf", "write_tiny_hf", "kquant_bytes",
           "write_safetensors"]

#: Default shape of the tiny model.
TINY = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab=256)

_LAYER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")

_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"))


def tiny_weights(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab=256,
                 tied=True, seed=0, scale=0.02, head_dim=None) -> dict:
    """Random float32 weights by GGUF name, numpy shapes ``[rows (out), cols (in)]``.

    Q and K rows are already in GGUF order (adjacent-pair RoPE).
    """
    rng = np.random.default_rng(seed)
    hd = head_dim or dim // n_heads

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": (rng.standard_normal((vocab, dim)) * 0.5).astype(np.float32)}
    for i in range(n_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(dim)
        w[p + "attn_q.weight"] = mat(n_heads * hd, dim) * 8
        w[p + "attn_k.weight"] = mat(n_kv_heads * hd, dim) * 8
        w[p + "attn_v.weight"] = mat(n_kv_heads * hd, dim) * 8
        w[p + "attn_output.weight"] = mat(dim, n_heads * hd) * 8
        w[p + "ffn_norm.weight"] = norm(dim)
        w[p + "ffn_gate.weight"] = mat(ffn_dim, dim) * 8
        w[p + "ffn_up.weight"] = mat(ffn_dim, dim) * 8
        w[p + "ffn_down.weight"] = mat(dim, ffn_dim) * 8
    w["output_norm.weight"] = norm(dim)
    if not tied:
        w["output.weight"] = mat(vocab, dim) * 8
    return w


def _byte_tokens() -> list:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, (chr(c) for c in cs)))
    return [table[b] for b in range(256)]


def _tokenizer(vocab: int):
    """(tokens, token_types, merges) of a byte-level BPE vocabulary of ``vocab`` (>= 256) entries.

    The 13 bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF) give their
    slots to the special tokens and the merges, so even 256 entries make a
    complete tokenizer for any text.
    """
    tokens = _byte_tokens()
    free = [0xC0, 0xC1] + list(range(0xF5, 0x100)) + list(range(256, vocab))
    merges = []

    def put(text):
        i = free.pop(0)
        if i < 256:
            tokens[i] = text
        else:
            tokens.append(text)

    for s in _SPECIALS:
        put(s)
    for a, b in _MERGES:
        if free and a in tokens and b in tokens:
            put(a + b)
            merges.append(f"{a} {b}")
    types = [3 if t in _SPECIALS else 1 for t in tokens]
    k = 0
    while len(tokens) < vocab:      # fill the rest with unused placeholders
        tokens.append(f"<unused{k}>")
        types.append(5)
        k += 1
    return tokens, types, merges


def kquant_bytes(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw K-quant blocks ``[rows, cols / 256 * block_bytes]`` with sane fp16 scales.

    Only the block layout is realistic (the values are noise): enough to test
    that a K-quant tensor is dequantized and re-quantized on import.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    t = GGMLQuantizationType[qtype.upper()]
    bw, bb = GGML_QUANT_SIZES[t]
    if cols % bw:
        raise ValueError(f"{qtype}: row length {cols} is not a multiple of {bw}")
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // bw, bb), dtype=np.uint8)
    d = np.full((rows, cols // bw), 1e-3, np.float16).view(np.uint8).reshape(rows, cols // bw, 2)
    dmin = np.full((rows, cols // bw), 2e-4, np.float16).view(np.uint8).reshape(rows, cols // bw, 2)
    if t.name in ("Q2_K", "Q4_K", "Q5_K"):        # d, dmin first
        blocks[..., 0:2] = d
        blocks[..., 2:4] = dmin
    elif t.name == "Q6_K":                         # ql, qh, scales, d last
        blocks[..., -2:] = d
    elif t.name == "Q3_K":                         # hmask, qs, scales, d last
        blocks[..., -2:] = d
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path, qtype: str = "q4_1", *, n_layers: int = 2, dim: int = 64,
                    n_heads: int = 4, n_kv_heads: int = 2, ffn_dim: int = 128, vocab: int = 256,
                    tied: bool = True, seed: int = 0, arch: str = "llama",
                    embd_type: str | None = None, norm_type: str = "f32",
                    tensor_types: dict | None = None, drop=(), shapes: dict | None = None,
                    metadata: dict | None = None, tokenizer: bool = True,
                    weights: dict | None = None, rope_base: float = 10000.0,
                    rms_eps: float = 1e-5, context_length: int = 256, name: str = "tiny"):
    """Write a tiny llama GGUF and return its path (a ``str``).

    ``qtype`` is the type of the 2-D projections (``q4_0``, ``q4_1``, ``q8_0``,
    ``f16``, ``f32``); ``embd_type`` that of ``token_embd`` (default: ``q8_0``
    for quantized ``qtype`` -- as SmolLM2 -- else ``qtype``); ``norm_type`` that
    of the norm vectors.

    Overrides for broken files: ``tensor_types`` {name: type} (also raw types
    such as ``"q4_k"``, ``"iq4_nl"``, ``"f64"``: random blocks / values of that
    type), ``drop`` names to leave out, ``shapes`` {name: numpy shape} to
    write a tensor of another shape (random values), ``metadata`` {key: value}
    to add or replace (``None`` removes the key; ``{arch}`` in a key is
    replaced by the architecture), ``arch`` the ``general.architecture``.
    ``weights`` replaces the random float weights (GGUF names, numpy shapes).
    """
    import gguf
    from gguf import GGMLQuantizationType as T

    path = str(path)
    w = weights if weights is not None else tiny_weights(
        n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab, tied=tied, seed=seed)
    quantized = qtype.lower() in ("q4_0", "q4_1", "q8_0")
    embd_type = (embd_type or ("q8_0" if quantized else qtype)).lower()
    tensor_types = {k: v.lower() for k, v in (tensor_types or {}).items()}
    shapes = dict(shapes or {})
    rng = np.random.default_rng(seed + 1)

    md = {
        "general.name": name,
        "{arch}.context_length": context_length,
        "{arch}.embedding_length": dim,
        "{arch}.block_count": n_layers,
        "{arch}.feed_forward_length": ffn_dim,
        "{arch}.attention.head_count": n_heads,
        "{arch}.attention.head_count_kv": n_kv_heads,
        "{arch}.rope.freq_base": float(rope_base),
        "{arch}.attention.layer_norm_rms_epsilon": float(rms_eps),
        "{arch}.rope.dimension_count": dim // n_heads,
        "{arch}.vocab_size": vocab,
    }
    if tokenizer and vocab >= 256:
        toks, types, merges = _tokenizer(vocab)
        md.update({
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": toks,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": False,
        })
        if "<|im_end|>" in toks:
            md["tokenizer.ggml.eos_token_id"] = toks.index("<|im_end|>")
        if "<|endoftext|>" in toks:
            md["tokenizer.ggml.bos_token_id"] = toks.index("<|endoftext|>")
    for k, v in (metadata or {}).items():
        md[k] = v
    md = {k.replace("{arch}", arch): v for k, v in md.items() if v is not None}

    writer = gguf.GGUFWriter(path, arch)
    for k, v in md.items():
        if k == "general.architecture":
            continue
        if isinstance(v, np.int32):          # typed values for malformed files
            writer.add_int32(k, int(v))
        elif isinstance(v, np.float64):
            writer.add_float64(k, float(v))
        elif isinstance(v, bool):
            writer.add_bool(k, v)
        elif isinstance(v, int):
            writer.add_uint32(k, v)
        elif isinstance(v, float):
            writer.add_float32(k, v)
        elif isinstance(v, str):
            writer.add_string(k, v)
        elif isinstance(v, (list, tuple)):
            writer.add_array(k, list(v))
        else:
            raise TypeError(f"metadata {k}: {type(v).__name__}")

    for tname, values in w.items():
        if tname in drop:
            continue
        if tname in shapes:
            values = (rng.standard_normal(shapes[tname]) * 0.02).astype(np.float32)
        if tname in tensor_types:
            ty = tensor_types[tname]
        elif values.ndim == 1:
            ty = norm_type
        elif tname == "token_embd.weight":
            ty = embd_type
        else:
            ty = qtype.lower()
        _add_tensor(writer, tname, values, ty, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tensor(writer, name, values, ty, rng):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants

    if ty == "f32":
        writer.add_tensor(name, np.ascontiguousarray(values, np.float32))
    elif ty == "f16":
        writer.add_tensor(name, np.ascontiguousarray(values, np.float16))
    elif ty == "f64":
        writer.add_tensor(name, np.ascontiguousarray(values, np.float64))
    elif ty in ("i8", "i16", "i32"):
        writer.add_tensor(name, np.zeros(values.shape, {"i8": np.int8, "i16": np.int16,
                                                        "i32": np.int32}[ty]))
    elif ty in ("q4_0", "q4_1", "q8_0"):
        raw = quants.quantize(np.ascontiguousarray(values, np.float32), T[ty.upper()])
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=T[ty.upper()])
    else:  # any other ggml type: random blocks of the right size
        t = T[ty.upper()]
        shape = values.shape if values.ndim == 2 else (1,) + values.shape
        if ty.endswith("_k"):
            raw = kquant_bytes(ty, shape[0], shape[1], seed=int(rng.integers(1 << 30)))
        else:
            bw, bb = GGML_QUANT_SIZES[t]
            raw = rng.integers(0, 256, size=(shape[0], shape[1] // bw * bb), dtype=np.uint8)
            raw.reshape(shape[0], -1, bb)[..., 0:2] = np.array([0x00, 0x14], np.uint8)  # d ~ 1e-3
        if values.ndim == 1:
            raw = raw.reshape(-1)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=t)


# ------------------------------------------------------------------ Hugging Face
_HF_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF (adjacent-pair) Q/K rows -> HF (rotate-half) rows; inverse of the import permutation."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def hf_state_dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab=256,
                  tied=False, seed=0) -> dict:
    """The weights of :func:`tiny_weights` under HF LLaMA names, Q/K rows in HF's rotate-half order.

    Imported with the Q/K permutation, they are the same model as
    ``write_tiny_gguf(..., "f32")`` with the same arguments.
    """
    w = tiny_weights(n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab, tied=tied, seed=seed)
    out = {"model.embed_tokens.weight": w["token_embd.weight"],
           "model.norm.weight": w["output_norm.weight"]}
    if not tied:
        out["lm_head.weight"] = w["output.weight"]
    for i in range(n_layers):
        for g, h in _HF_LAYER.items():
            v = w[f"blk.{i}.{g}.weight"]
            if g in ("attn_q", "attn_k"):
                v = hf_unpermute(v, n_heads if g == "attn_q" else n_kv_heads)
            out[f"model.layers.{i}.{h}.weight"] = v
    return out


def write_safetensors(path, tensors: dict, dtype: str = "F32") -> str:
    """Write a .safetensors file by hand (so BF16 works without torch).

    ``dtype``: ``F32``, ``F16`` or ``BF16`` (float32 values are converted;
    BF16 by truncation after rounding to nearest even).
    """
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, np.float32)
        if dtype == "F32":
            b = a.tobytes()
        elif dtype == "F16":
            b = a.astype(np.float16).tobytes()
        elif dtype == "BF16":
            u = a.view(np.uint32).astype(np.uint64)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            b = u.tobytes()
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    return str(path)


def write_tiny_hf(directory, *, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128,
                  vocab=256, tied=False, seed=0, dtype="F32", rope_theta=10000.0,
                  rms_norm_eps=1e-5, config: dict | None = None, drop=(),
                  shapes: dict | None = None, state: dict | None = None) -> str:
    """Write a tiny HF LLaMA checkpoint (``config.json`` + ``model.safetensors``); returns the dir.

    ``config`` adds or replaces config.json fields (``None`` removes one);
    ``drop`` / ``shapes`` remove tensors or change their shapes (HF names);
    ``state`` replaces the weights (HF names).
    """
    os.makedirs(directory, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "intermediate_size": ffn_dim, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
        "vocab_size": vocab, "max_position_embeddings": 256, "rope_theta": rope_theta,
        "rms_norm_eps": rms_norm_eps, "tie_word_embeddings": tied, "hidden_act": "silu",
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
    }
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    sd = state if state is not None else hf_state_dict(n_layers, dim, n_heads, n_kv_heads,
                                                        ffn_dim, vocab, tied=tied, seed=seed)
    rng = np.random.default_rng(seed + 7)
    sd = {k: ((rng.standard_normal((shapes or {})[k]) * 0.02).astype(np.float32)
              if k in (shapes or {}) else v) for k, v in sd.items() if k not in drop}
    write_safetensors(os.path.join(directory, "model.safetensors"), sd, dtype)
    return str(directory)
