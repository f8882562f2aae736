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
import math
import os
import re
import stat
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
    return dict(_iter_expected(desc))


def _iter_expected(desc: ModelDesc):
    """(name, shape) of every tensor the model needs, lazily: a file claiming 4e9 layers
    fails at its first missing tensor, not after building a table of them all."""
    yield "token_embd.weight", (desc.vocab_size, desc.dim)
    yield "output_norm.weight", (desc.dim,)
    if not desc.tied_embeddings:
        yield "output.weight", (desc.vocab_size, desc.dim)
    for i in range(desc.n_layers):
        for what, fn in _LAYER_TENSORS.items():
            yield f"blk.{i}.{what}.weight", fn(desc)


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


# --------------------------------------------------------------------------------------
# Validation shared by the GGUF and Hugging Face importers
# --------------------------------------------------------------------------------------

def _show(value) -> str:
    """A metadata value for an error message (``'abc'``, ``-1``, ``[1, 2]``), kept short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _positive_int(where: str, key: str, value) -> int:
    """``value`` as an int, or a ModelError ``<where>: <key> must be a positive integer, not ...``."""
    if not _is_int(value) or value <= 0:
        raise ModelError(f"{where}: {key} must be a positive integer, not {_show(value)}")
    return int(value)


def _positive_float(where: str, key: str, value, minimum: float | None = None) -> float:
    """``value`` as a float, or a ModelError: it must be a finite number above zero
    (or at least ``minimum``)."""
    ok = (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
          and (value > 0 if minimum is None else value >= minimum))
    if not ok:
        what = "a positive finite number" if minimum is None else f"a finite number of at least {minimum:g}"
        raise ModelError(f"{where}: {key} must be {what}, not {_show(value)}")
    return float(value)


_FILE_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path: str, expected: str, error=ModelError) -> int:
    """Fail fast unless ``path`` is a regular file; return its size.

    A device, FIFO or socket would block or never end when read (``/dev/zero``,
    a named pipe): they are refused from ``stat`` alone, before any ``open``.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory, not {expected}")
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a plain file")
        raise error(f"{path}: not a regular file ({kind}); expected {expected}")
    return st.st_size


# Byte offsets of the f16 scale fields in one block: d (and m for Q4_1)
_SCALE_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q8_0": (0,)}


def _check_finite(path: str, name: str, qtype: str, data) -> None:
    """Refuse NaN or infinite weights: float values, or the f16 scales of quantized blocks.

    Quantized blocks are checked through their scales alone (the integer
    quants cannot be NaN): a strided look at 2 or 4 bytes of each block.
    """
    if qtype in ("f32", "f16"):
        if not np.isfinite(data).all():
            raise ModelError(f"{path}: tensor '{name}' holds NaN or infinite values")
        return
    bb = QTYPE_BLOCK[qtype][1]
    u16 = np.asarray(data).reshape(-1).view(np.uint16).reshape(-1, bb // 2)
    for off in _SCALE_FIELDS[qtype]:
        if ((u16[:, off // 2] & 0x7C00) == 0x7C00).any():     # f16 exponent all ones
            raise ModelError(f"{path}: tensor '{name}' holds NaN or infinite block scales")


_LAYER_RE = re.compile(r"blk\.(\d+)\.")
_LAYER_NAME_RE = re.compile(r"blk\.\d+\.(\w+)\.weight")
_TOP_TENSORS = ("token_embd.weight", "output_norm.weight", "output.weight")
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def _layers_hint(missing: str, names, layer_re, key: str, n_layers: int) -> str:
    """When a whole layer is missing, the layer count is the likely culprit: say what it
    claims and which layers the file has."""
    m = layer_re.match(missing)
    if not m:
        return ""
    layers = {int(x.group(1)) for x in map(layer_re.match, names) if x}
    if int(m.group(1)) in layers:
        return ""
    have = f"layers 0 to {max(layers)}" if layers else "no layers"
    return f" ({key} is {n_layers} but the file has {have})"


def _open_gguf(path: str):
    from gguf import GGUFReader

    size = check_regular_file(path, "a GGUF file")
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

    def integer(key, default=None, required=True):
        v = _field(reader, p + key, path, default=default, required=required)
        return None if v is None else _positive_int(path, p + key, v)

    def number(key, default, minimum=None):
        return _positive_float(path, p + key, _field(reader, p + key, path, default=default), minimum)

    n_layers = integer("block_count")
    n_heads = integer("attention.head_count")
    n_kv = integer("attention.head_count_kv", default=n_heads)
    dim = integer("embedding_length")
    ffn_dim = integer("feed_forward_length")
    context_length = integer("context_length", default=2048)
    rope_base = number("rope.freq_base", 10000.0, minimum=1.0)   # below 1 the frequencies blow up
    rms_eps = number("attention.layer_norm_rms_epsilon", 1e-5)
    name = _field(reader, "general.name", path, required=False)
    if name is not None and not isinstance(name, str):
        raise ModelError(f"{path}: general.name must be a string, not {_show(name)}")
    scaling = _field(reader, p + "rope.scaling.type", path, required=False)
    if scaling not in (None, "none"):
        raise ModelError(f"{path}: unsupported {p}rope.scaling.type {_show(scaling)} "
                         "(supported: none)")
    tensors_by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors_by_name:
        raise ModelError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = integer("vocab_size", required=False)
    if vocab is None:
        vocab = int(tensors_by_name["token_embd.weight"].shape[-1])
    if dim % n_heads or n_heads % n_kv:
        raise ModelError(f"{path}: inconsistent shapes: embedding_length {dim}, "
                         f"head_count {n_heads}, head_count_kv {n_kv}")
    head_dim = dim // n_heads
    rope_dim = integer("rope.dimension_count", default=head_dim)
    if head_dim % 2:
        raise ModelError(f"{path}: unsupported head dim {head_dim} ({p}embedding_length {dim} / "
                         f"{p}attention.head_count {n_heads}): RoPE needs an even head dim")
    for tname in tensors_by_name:
        m = _LAYER_RE.match(tname)
        if m and int(m.group(1)) >= n_layers:
            raise ModelError(f"{path}: tensor '{tname}' is beyond {p}block_count {n_layers} "
                             f"(layers 0 to {n_layers - 1})")
        m = _LAYER_NAME_RE.fullmatch(tname)
        if not (tname in _TOP_TENSORS or (m and m.group(1) in _LAYER_TENSORS)):
            raise ModelError(f"{path}: unexpected tensor '{tname}' (not part of a {arch} model: "
                             "it would be ignored)")
    desc = ModelDesc(
        arch=arch,
        name=name or os.path.basename(path),
        n_layers=n_layers,
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=ffn_dim,
        vocab_size=vocab,
        context_length=context_length,
        rope_base=rope_base,
        rope_dim=rope_dim,
        rms_eps=rms_eps,
        tied_embeddings="output.weight" not in tensors_by_name,
    )
    if desc.rope_dim != desc.head_dim:
        raise ModelError(f"{path}: unsupported partial RoPE (rope.dimension_count {desc.rope_dim} "
                         f"!= head dim {desc.head_dim})")
    model = Model(desc=desc, path=path, source="gguf")
    for name, shape in _iter_expected(desc):
        t = tensors_by_name.get(name)
        if t is None:
            raise ModelError(f"{path}: missing tensor '{name}'"
                             f"{_layers_hint(name, tensors_by_name, _LAYER_RE, p + 'block_count', n_layers)}")
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
            _check_finite(path, name, "f32", values)
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
        if qname not in _REQUANT_TARGET:
            _check_finite(path, name, qtype, data)
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


_MAX_CONFIG_JSON = 16 << 20             # HF config.json files are a few KiB
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
_ST_MAX_HEADER = 100 * 1024 * 1024      # the safetensors format's own limit


def _read_safetensors(path: str) -> dict:
    """Read every tensor of a .safetensors file as float32 (F32, F16 and BF16).

    The header is checked whole before any data is read: a JSON object of
    entries, each with a known dtype, a shape of non-negative integers and
    ``data_offsets`` ``[begin, end]`` that lie inside the data, in order, and
    span exactly the bytes the shape needs.
    """
    import struct

    size = check_regular_file(path, "a safetensors file")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelError(f"{path}: not a safetensors file (header length {n} > file size)")
        if n > _ST_MAX_HEADER:
            raise ModelError(f"{path}: not a safetensors file (header length {n} exceeds "
                             f"the format's {_ST_MAX_HEADER} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (header is a JSON "
                         f"{type(header).__name__}, expected an object)")
    data_size = size - 8 - n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor '{name}'"
        if not isinstance(info, dict):
            raise ModelError(f"{where}: header entry must be a JSON object, not {_show(info)}")
        dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dt, str):
            raise ModelError(f"{where}: dtype must be a string, not {_show(dt)}")
        if not isinstance(shape, list) or not all(_is_int(x) and x >= 0 for x in shape):
            raise ModelError(f"{where}: shape must be a list of non-negative integers, "
                             f"not {_show(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(x) and x >= 0 for x in offsets)):
            raise ModelError(f"{where}: data_offsets must be two non-negative integers "
                             f"[begin, end], not {_show(offsets)}")
        a, b = offsets
        if b < a:
            raise ModelError(f"{where}: data_offsets {offsets} are reversed (end before begin)")
        if b > data_size:
            raise ModelError(f"{path}: truncated safetensors file: tensor '{name}' ends past the end")
        if dt not in _ST_ITEMSIZE:
            raise ModelError(f"{path}: unsupported tensor type {dt} for '{name}' "
                             "(supported: F32, F16, BF16)")
        need = math.prod(shape) * _ST_ITEMSIZE[dt]
        if b - a != need:
            raise ModelError(f"{where}: data_offsets {offsets} span {b - a} bytes but shape "
                             f"{shape} of {dt} needs {need}")
        entries.append((name, dt, shape, a, b))
    ordered = sorted(entries, key=lambda e: (e[3], e[4]))
    for (n0, _, _, a0, b0), (n1, _, _, a1, b1) in zip(ordered, ordered[1:]):
        if a1 < b0:
            raise ModelError(f"{path}: tensor '{n1}': data_offsets [{a1}, {b1}] overlap "
                             f"tensor '{n0}' [{a0}, {b0}]")
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if data_size else np.zeros(0, np.uint8)
    out = {}
    for name, dt, shape, a, b in entries:
        buf = raw[a:b]
        if dt == "F32":
            arr = buf.view(np.float32)
        elif dt == "F16":
            arr = buf.view(np.float16).astype(np.float32)
        else:
            arr = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        out[name] = np.asarray(arr, dtype=np.float32).reshape(shape)
        _check_finite(path, name, "f32", out[name])
    return out


def load_hf(path: str, *, quantize: str | None = None) -> Model:
    """Import a Hugging Face LLaMA checkpoint directory (config.json + *.safetensors).

    ``quantize`` (``q4_0``, ``q4_1``, ``q8_0``) packs the matrices into GGUF
    blocks with the gguf package; otherwise they stay float32.
    """
    from gguf import GGMLQuantizationType, quants

    path = str(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.lexists(cfg_path):
        raise ModelError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    size = check_regular_file(cfg_path, "a JSON file")
    if size > _MAX_CONFIG_JSON:
        raise ModelError(f"{cfg_path}: {size} bytes is too large for a config.json "
                         f"(at most {_MAX_CONFIG_JSON})")
    try:
        with open(cfg_path, "rb") as fh:
            cfg = json.loads(fh.read())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{cfg_path}: malformed JSON (not UTF-8 text)") from None
    except OSError as e:
        raise ModelError(f"{cfg_path}: cannot read ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path}: expected a JSON object of fields, not a "
                         f"{type(cfg).__name__}")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list)
                              or not all(isinstance(x, str) for x in archs)):
        raise ModelError(f"{cfg_path}: architectures must be a list of strings, not {_show(archs)}")
    archs = archs or [cfg.get("model_type", "?")]
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ModelError(f"{path}: unsupported architecture '{archs[0]}' (supported: LlamaForCausalLM)")

    def integer(key, default=None):
        if key not in cfg and default is not None:
            return default
        if key not in cfg:
            raise ModelError(f"{cfg_path}: missing field {key!r}")
        return _positive_int(cfg_path, key, cfg[key])

    def number(key, default, minimum=None):
        return _positive_float(cfg_path, key, cfg.get(key, default), minimum)

    dim = integer("hidden_size")
    n_heads = integer("num_attention_heads")
    n_layers = integer("num_hidden_layers")
    ffn_dim = integer("intermediate_size")
    vocab = integer("vocab_size")
    n_kv = integer("num_key_value_heads", n_heads)
    context_length = integer("max_position_embeddings", 2048)
    rope_base = number("rope_theta", 10000.0, minimum=1.0)
    rms_eps = number("rms_norm_eps", 1e-5)
    tied = cfg.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ModelError(f"{cfg_path}: tie_word_embeddings must be true or false, not {_show(tied)}")
    name = cfg.get("_name_or_path")
    if name is not None and not isinstance(name, str):
        raise ModelError(f"{cfg_path}: _name_or_path must be a string, not {_show(name)}")
    if dim % n_heads or n_heads % n_kv:
        raise ModelError(f"{path}: inconsistent shapes: hidden_size {dim}, num_attention_heads "
                         f"{n_heads}, num_key_value_heads {n_kv}")
    head_dim = dim // n_heads if cfg.get("head_dim") is None else integer("head_dim")
    if head_dim % 2:
        why = (f"head_dim {head_dim}" if cfg.get("head_dim") is not None else
               f"hidden_size {dim} / num_attention_heads {n_heads}")
        raise ModelError(f"{cfg_path}: unsupported head dim {head_dim} ({why}): "
                         "RoPE needs an even head dim")
    desc = ModelDesc(
        arch="llama", name=name or os.path.basename(path.rstrip("/")),
        n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        ffn_dim=ffn_dim, vocab_size=vocab, context_length=context_length,
        rope_base=rope_base, rope_dim=head_dim, rms_eps=rms_eps, tied_embeddings=tied,
    )
    if cfg.get("rope_scaling"):
        raise ModelError(f"{cfg_path}: unsupported rope_scaling {cfg['rope_scaling']!r}")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ModelError(f"{path}: no .safetensors files")
    raw, source = {}, {}
    for f in files:
        fp = os.path.join(path, f)
        for k, v in _read_safetensors(fp).items():
            if k in raw:
                raise ModelError(f"{fp}: tensor '{k}' is also in {source[k]}")
            raw[k], source[k] = v, fp
    if "lm_head.weight" not in raw:
        desc = ModelDesc(**{**desc.to_dict(), "tied_embeddings": True})
    model = Model(desc=desc, path=path, source="hf")
    names = {}
    for k, v in raw.items():
        if k in _HF_NAMES:
            names[_HF_NAMES[k]] = v
            continue
        parts = k.split(".")
        if (len(parts) >= 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
                and int(parts[2]) >= desc.n_layers):
            raise ModelError(f"{path}: tensor '{k}' is beyond num_hidden_layers {desc.n_layers} "
                             f"(layers 0 to {desc.n_layers - 1})")
        sub = ".".join(parts[3:-1])
        if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight" \
                and sub in _HF_LAYER:
            names[f"blk.{int(parts[2])}.{_HF_LAYER[sub]}.weight"] = v
        elif not k.endswith("rotary_emb.inv_freq"):      # a buffer of old checkpoints: rope_theta's
            raise ModelError(f"{source[k]}: unexpected tensor '{k}' (not part of a LLaMA model: "
                             "it would be ignored)")
    for name, shape in _iter_expected(desc):
        hf = _hf_name(name)
        if name not in names:
            raise ModelError(f"{path}: missing tensor '{hf}'"
                             f"{_layers_hint(hf, raw, _HF_LAYER_RE, 'num_hidden_layers', desc.n_layers)}")
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
