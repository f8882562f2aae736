"""Model import: GGUF (through the ``gguf`` package) and Hugging Face LLaMA safetensors.

The imported model keeps its weights in their quantized GGUF blocks (Q4_0,
Q4_1, Q8_0) or as F16/F32 arrays; nothing is dequantized unless asked. Shapes
are given in numpy order: a weight matrix is ``[rows (outputs), cols (inputs)]``
(ggml lists the innermost dimension first; we reverse it once, here).

One RoPE convention serves both formats: the GGUF/llama.cpp one, which rotates
adjacent pairs ``(x[2i], x[2i+1])``. Hugging Face checkpoints rotate halves
(``x[i], x[i + d/2]``); their Q and K rows are permuted on import exactly as
llama.cpp's ``convert_hf_to_gguf.py`` does, so the two are the same model.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, asdict

import numpy as np

from llmfab.core.errors import ModelError

__all__ = [
    "ModelDesc", "QTensor", "Model", "load_model", "load_gguf", "load_hf",
    "QTYPE_BLOCK", "SUPPORTED_QTYPES",
]

# Supported storage types: name -> (weights per block, bytes per block)
QTYPE_BLOCK = {
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q8_0": (32, 34),
    "f16": (1, 2),
    "f32": (1, 4),
}
SUPPORTED_QTYPES = tuple(QTYPE_BLOCK)

# K-quants and other block types that gguf can dequantize: re-quantized on import.
_REQUANT_TARGET = {
    "Q2_K": "q4_1", "Q3_K": "q4_1", "Q4_K": "q4_1", "Q5_K": "q8_0", "Q6_K": "q8_0",
    "Q5_0": "q8_0", "Q5_1": "q8_0", "BF16": "f32",
}

SUPPORTED_ARCHS = ("llama",)


@dataclass(frozen=True)
class ModelDesc:
    """Shape and hyper-parameters of a LLaMA-architecture model."""

    arch: str
    name: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_base: float
    rope_dim: int
    rms_eps: float
    tied_embeddings: bool

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def gqa_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelDesc":
        return cls(**d)

    def n_params(self) -> int:
        per_layer = (self.dim * self.dim * 2 + self.dim * self.kv_dim * 2
                     + 3 * self.dim * self.ffn_dim + 2 * self.dim)
        emb = self.vocab_size * self.dim
        return self.n_layers * per_layer + emb * (1 if self.tied_embeddings else 2) + self.dim


@dataclass
class QTensor:
    """A tensor as stored: quantized blocks (uint8 ``[rows, row_bytes]``) or a float array.

    ``shape`` is the logical numpy shape (``[rows, cols]`` for matrices, ``[n]``
    for vectors); ``data`` holds the raw blocks for q4_0/q4_1/q8_0 and the
    values for f16/f32.
    """

    name: str
    qtype: str
    shape: tuple
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> np.ndarray:
        """The float32 values, ``shape`` as given."""
        if self.qtype == "f32":
            return np.asarray(self.data, dtype=np.float32).reshape(self.shape)
        if self.qtype == "f16":
            return np.asarray(self.data, dtype=np.float16).astype(np.float32).reshape(self.shape)
        from llmfab.compiler import quant
        return quant.dequantize_rows(self.qtype, self.data).reshape(self.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Dequantized rows ``start:stop`` (float32)."""
        if self.qtype in ("f32", "f16"):
            return np.asarray(self.data[start:stop], dtype=np.float32)
        from llmfab.compiler import quant
        return quant.dequantize_rows(self.qtype, self.data[start:stop])


@dataclass
class Model:
    """An imported model: its description, its tensors and where it came from."""

    desc: ModelDesc
    tensors: dict = field(default_factory=dict)
    path: str = ""
    source: str = "gguf"
    warnings: list = field(default_factory=list)

    def tensor(self, name: str) -> QTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"{self.path}: missing tensor '{name}'") from None

    def layer(self, i: int, what: str) -> QTensor:
        return self.tensor(f"blk.{i}.{what}.weight")

    @property
    def output(self) -> QTensor:
        """The output projection (the token embedding when embeddings are tied)."""
        if "output.weight" in self.tensors:
            return self.tensors["output.weight"]
        return self.tensor("token_embd.weight")

    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# --------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------

_LAYER_TENSORS = {
    # name: (shape as a function of desc) -- numpy order [rows, cols]
    "attn_norm": lambda d: (d.dim,),
    "attn_q": lambda d: (d.n_heads * d.head_dim, d.dim),
    "attn_k": lambda d: (d.kv_dim, d.dim),
    "attn_v": lambda d: (d.kv_dim, d.dim),
    "attn_output": lambda d: (d.dim, d.n_heads * d.head_dim),
    "ffn_norm": lambda d: (d.dim,),
    "ffn_gate": lambda d: (d.ffn_dim, d.dim),
    "ffn_up": lambda d: (d.ffn_dim, d.dim),
    "ffn_down": lambda d: (d.dim, d.ffn_dim),
}


def expected_shapes(desc: ModelDesc) -> dict:
    """Every tensor the model needs, with its numpy shape."""
    shapes = {"token_embd.weight": (desc.vocab_size, desc.dim), "output_norm.weight": (desc.dim,)}
    if not desc.tied_embeddings:
        shapes["output.weight"] = (desc.vocab_size, desc.dim)
    for i in range(desc.n_layers):
        for what, fn in _LAYER_TENSORS.items():
            shapes[f"blk.{i}.{what}.weight"] = fn(desc)
    return shapes


def _field(reader, key, path, default=None, required=True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise ModelError(f"{path}: missing metadata '{key}'")
        return default
    try:
        return f.contents()
    except Exception as e:  # noqa: BLE001 - gguf raises assorted errors on bad fields
        raise ModelError(f"{path}: unreadable metadata '{key}' ({e})") from None


def _open_gguf(path: str):
    from gguf import GGUFReader

    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not a GGUF file")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    _check_gguf_extent(path, size)
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError, TypeError) as e:
        raise ModelError(f"{path}: malformed GGUF file ({_short(e)})") from None
    return reader


# GGUF metadata value types -> fixed size in bytes (8 string and 9 array are variable)
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Truncated(Exception):
    pass


def _check_gguf_extent(path: str, size: int) -> None:
    """Walk the GGUF header and tensor table; a file that ends early is a one-line ModelError.

    GGUFReader reports a truncated file with whatever numpy error the short
    read causes; this finds where the file should end instead: inside the
    header, or at the end of the last tensor's data.
    """
    import mmap
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as fh:
        if size < 24:
            raise ModelError(f"{path}: truncated GGUF file: the header ends after {size} bytes")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        pos = 4

        def take(fmt):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise _Truncated
            v = struct.unpack_from(fmt, buf, pos)
            pos += n
            return v[0] if len(v) == 1 else v

        def skip(n):
            nonlocal pos
            if pos + n > size:
                raise _Truncated
            pos += n

        def string():
            n = take("<Q")
            if pos + n > size:
                raise _Truncated
            s = bytes(buf[pos:pos + n])
            skip(n)
            return s

        version = take("<I")
        if version not in (2, 3):     # v1 or big-endian: leave it to GGUFReader
            return
        n_tensors, n_kv = take("<Q"), take("<Q")
        alignment = 32
        try:
            for _ in range(n_kv):
                key = string()
                vtype = take("<I")
                if vtype in _GGUF_SCALAR:
                    if key == b"general.alignment" and vtype == 4:
                        alignment = take("<I") or 32
                    else:
                        skip(_GGUF_SCALAR[vtype])
                elif vtype == 8:
                    string()
                elif vtype == 9:
                    etype, count = take("<I"), take("<Q")
                    if etype in _GGUF_SCALAR:
                        skip(_GGUF_SCALAR[etype] * count)
                    elif etype == 8:
                        for _ in range(count):
                            string()
                    else:
                        return   # nested arrays: unusual, leave it to GGUFReader
                else:
                    return       # unknown type: GGUFReader will say so
            infos = []
            for _ in range(n_tensors):
                name = string().decode("utf-8", "replace")
                n_dims = take("<I")
                if n_dims > 8:
                    return
                dims = [take("<Q") for _ in range(n_dims)]
                ttype, offset = take("<I"), take("<Q")
                infos.append((name, dims, ttype, offset))
        except _Truncated:
            raise ModelError(f"{path}: truncated GGUF file: the header ends after {size} bytes") from None
        start = pos + (-pos % alignment)
        for name, dims, ttype, offset in infos:
            try:
                bw, bb = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                continue   # unknown type: reported later as unsupported
            n = 1
            for x in dims:
                n *= int(x)
            end = start + int(offset) + n // bw * bb
            if end > size:
                raise ModelError(f"{path}: truncated GGUF file: tensor '{name}' ends at byte {end} "
                                 f"but the file has {size} bytes")
    finally:
        buf.close()


def _short(e: Exception) -> str:
    s = str(e).split("\n")[0]
    return s[:160] if s else type(e).__name__


def load_gguf(path: str, *, requantize: bool = True) -> Model:
    """Import a llama-architecture GGUF file.

    Raises
    ------
    ModelError
        One line: not a GGUF, truncated file, unsupported architecture,
        unsupported tensor type, missing tensor, inconsistent shapes.
    """
    from gguf import GGMLQuantizationType, quants

    path = str(path)
    reader = _open_gguf(path)
    arch = _field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(f"{path}: unsupported architecture '{arch}' "
                         f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    p = arch + "."
    n_heads = int(_field(reader, p + "attention.head_count", path))
    n_kv = int(_field(reader, p + "attention.head_count_kv", path, default=n_heads))
    dim = int(_field(reader, p + "embedding_length", path))
    tensors_by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors_by_name:
        raise ModelError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = _field(reader, p + "vocab_size", path, required=False)
    if vocab is None:
        vocab = int(tensors_by_name["token_embd.weight"].shape[-1])
    head_dim = dim // n_heads if n_heads else 0
    if n_heads <= 0 or dim % n_heads or n_kv <= 0 or n_heads % n_kv:
        raise ModelError(f"{path}: inconsistent shapes: embedding_length {dim}, "
                         f"head_count {n_heads}, head_count_kv {n_kv}")
    desc = ModelDesc(
        arch=arch,
        name=str(_field(reader, "general.name", path, required=False) or os.path.basename(path)),
        n_layers=int(_field(reader, p + "block_count", path)),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=int(_field(reader, p + "feed_forward_length", path)),
        vocab_size=int(vocab),
        context_length=int(_field(reader, p + "context_length", path, default=2048)),
        rope_base=float(_field(reader, p + "rope.freq_base", path, required=False) or 10000.0),
        rope_dim=int(_field(reader, p + "rope.dimension_count", path, required=False) or head_dim),
        rms_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", path,
                             required=False) or 1e-5),
        tied_embeddings="output.weight" not in tensors_by_name,
    )
    if desc.rope_dim != desc.head_dim:
        raise ModelError(f"{path}: unsupported partial RoPE (rope.dimension_count {desc.rope_dim} "
                         f"!= head dim {desc.head_dim})")
    model = Model(desc=desc, path=path, source="gguf")
    for name, shape in expected_shapes(desc).items():
        t = tensors_by_name.get(name)
        if t is None:
            raise ModelError(f"{path}: missing tensor '{name}'")
        got = tuple(int(x) for x in reversed([int(s) for s in t.shape if True]))
        # ggml pads unused dims with 1; strip leading ones to compare
        while len(got) > len(shape) and got[0] == 1:
            got = got[1:]
        if got != tuple(shape):
            raise ModelError(f"{path}: inconsistent shapes: tensor '{name}' is {list(got)}, "
                             f"expected {list(shape)} from the metadata")
        qname = t.tensor_type.name
        qtype = qname.lower()
        if qtype in QTYPE_BLOCK:
            if qtype in ("f32", "f16"):
                data = np.asarray(t.data).reshape(shape)
            else:
                data = np.asarray(t.data, dtype=np.uint8).reshape(shape[0], -1)
        elif qname in _REQUANT_TARGET:
            target = _REQUANT_TARGET[qname]
            if len(shape) == 1:
                target = "f32"
            raw = np.asarray(t.data)
            values = quants.dequantize(raw, t.tensor_type).astype(np.float32).reshape(shape)
            msg = f"{name}: {qname} is re-quantized to {target.upper()} (not decoded on chip)"
            warnings.warn(msg, stacklevel=2)
            model.warnings.append(msg)
            if target == "f32":
                data = values
            else:
                data = quants.quantize(values, GGMLQuantizationType[target.upper()])
                data = np.asarray(data, dtype=np.uint8).reshape(shape[0], -1)
            qtype = target
        else:
            raise ModelError(f"{path}: unsupported tensor type {qname} for '{name}' "
                             f"(supported: Q4_0, Q4_1, Q8_0, F16, F32; "
                             f"re-quantized: {', '.join(sorted(_REQUANT_TARGET))})")
        if len(shape) == 2 and qtype not in ("f32", "f16"):
            bw, bb = QTYPE_BLOCK[qtype]
            if shape[1] % bw:
                raise ModelError(f"{path}: inconsistent shapes: '{name}' row length {shape[1]} "
                                 f"is not a multiple of the {qtype.upper()} block ({bw})")
        model.tensors[name] = QTensor(name=name, qtype=qtype, shape=tuple(shape), data=data)
    return model


# --------------------------------------------------------------------------------------
# Hugging Face safetensors
# --------------------------------------------------------------------------------------

_HF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor name (for error messages)."""
    for k, v in _HF_NAMES.items():
        if v == name:
            return k
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk":
        for k, v in _HF_LAYER.items():
            if v == parts[2]:
                return f"model.layers.{parts[1]}.{k}.weight"
    return name


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from HF's rotate-half RoPE to GGUF's adjacent-pair RoPE.

    Within each head the rows ``[0..d/2) , [d/2..d)`` become interleaved
    ``0, d/2, 1, d/2+1, ...`` (llama.cpp ``convert_hf_to_gguf.py`` does the same).
    """
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def _read_safetensors(path: str) -> dict:
    """Read every tensor of a .safetensors file as float32 (F32, F16 and BF16)."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelError(f"{path}: not a safetensors file (header length {n} > file size)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError(f"{path}: not a safetensors file (header is not JSON)") from None
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        if b > raw.shape[0]:
            raise ModelError(f"{path}: truncated safetensors file: tensor '{name}' ends past the end")
        buf = raw[a:b]
        dt = info["dtype"]
        if dt == "F32":
            arr = buf.view(np.float32)
        elif dt == "F16":
            arr = buf.view(np.float16).astype(np.float32)
        elif dt == "BF16":
            arr = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            raise ModelError(f"{path}: unsupported tensor type {dt} for '{name}' "
                             "(supported: F32, F16, BF16)")
        out[name] = np.asarray(arr, dtype=np.float32).reshape(info["shape"])
    return out


def load_hf(path: str, *, quantize: str | None = None) -> Model:
    """Import a Hugging Face LLaMA checkpoint directory (config.json + *.safetensors).

    ``quantize`` (``q4_0``, ``q4_1``, ``q8_0``) packs the matrices into GGUF
    blocks with the gguf package; otherwise they stay float32.
    """
    from gguf import GGMLQuantizationType, quants

    path = str(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ModelError(f"{path}: unsupported architecture '{archs[0]}' (supported: LlamaForCausalLM)")
    try:
        dim = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads", n_heads))
        desc = ModelDesc(
            arch="llama", name=str(cfg.get("_name_or_path") or os.path.basename(path.rstrip("/"))),
            n_layers=int(cfg["num_hidden_layers"]), dim=dim, n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=int(cfg.get("head_dim", dim // n_heads)),
            ffn_dim=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
            context_length=int(cfg.get("max_position_embeddings", 2048)),
            rope_base=float(cfg.get("rope_theta", 10000.0)),
            rope_dim=int(cfg.get("head_dim", dim // n_heads)),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ModelError(f"{cfg_path}: missing field {e.args[0]!r}") from None
    if n_heads <= 0 or dim % n_heads or n_kv <= 0 or n_heads % n_kv:
        raise ModelError(f"{path}: inconsistent shapes: hidden_size {dim}, num_attention_heads "
                         f"{n_heads}, num_key_value_heads {n_kv}")
    if cfg.get("rope_scaling"):
        raise ModelError(f"{cfg_path}: unsupported rope_scaling {cfg['rope_scaling']!r}")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ModelError(f"{path}: no .safetensors files")
    raw = {}
    for f in files:
        raw.update(_read_safetensors(os.path.join(path, f)))
    if "lm_head.weight" not in raw:
        desc = ModelDesc(**{**desc.to_dict(), "tied_embeddings": True})
    model = Model(desc=desc, path=path, source="hf")
    names = {}
    for k, v in raw.items():
        if k in _HF_NAMES:
            names[_HF_NAMES[k]] = v
            continue
        parts = k.split(".")
        if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
            sub = ".".join(parts[3:-1])
            if sub in _HF_LAYER:
                names[f"blk.{parts[2]}.{_HF_LAYER[sub]}.weight"] = v
    for name, shape in expected_shapes(desc).items():
        hf = _hf_name(name)
        if name not in names:
            raise ModelError(f"{path}: missing tensor '{hf}'")
        w = names[name]
        if tuple(w.shape) != tuple(shape):
            raise ModelError(f"{path}: inconsistent shapes: tensor '{hf}' is {list(w.shape)}, "
                             f"expected {list(shape)} from config.json")
        if name.endswith("attn_q.weight"):
            w = hf_permute(w, desc.n_heads)
        elif name.endswith("attn_k.weight"):
            w = hf_permute(w, desc.n_kv_heads)
        if quantize and w.ndim == 2:
            if quantize not in ("q4_0", "q4_1", "q8_0"):
                raise ModelError(f"cannot quantize to '{quantize}' (choose q4_0, q4_1 or q8_0)")
            data = quants.quantize(np.ascontiguousarray(w), GGMLQuantizationType[quantize.upper()])
            model.tensors[name] = QTensor(name, quantize, tuple(shape),
                                          np.asarray(data, np.uint8).reshape(shape[0], -1))
        else:
            model.tensors[name] = QTensor(name, "f32", tuple(shape), np.ascontiguousarray(w))
    return model


def load_model(path: str | None = None, **kw) -> Model:
    """Import a model: a GGUF file, or a Hugging Face checkpoint directory; None = bundled SmolLM2."""
    if path is None:
        from llmfab.compiler.paths import default_model_path
        path = default_model_path()
    path = str(path)
    if os.path.isdir(path):
        return load_hf(path, **kw)
    return load_gguf(path, **kw)
