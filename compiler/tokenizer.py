"""The model's tokenizer, rebuilt from a GGUF file's ``tokenizer.*`` metadata.

:meth:`Tokenizer.from_gguf` builds a HuggingFace ``tokenizers.Tokenizer`` (a
byte-level BPE model from ``tokenizer.ggml.tokens`` / ``tokenizer.ggml.merges``
and a pre-tokenizer chosen by ``tokenizer.ggml.pre``) whose ids are the ones
llama.cpp produces for the same text with ``parse_special=True``: control,
unknown and user-defined tokens written literally in the text (``<|im_start|>``)
become their own ids. ``tests/test_tokenizer.py`` checks this against ids
recorded from llama.cpp (``tests/data/tokenizer_ref.json``).

Pre-tokenizers: llama.cpp splits the text with a list of regexes applied in
turn (each one splits every piece the previous ones produced; matches and the
text between them both become pieces). The same is expressed here as a
``Sequence`` of ``Split(..., "isolated")`` pre-tokenizers followed by a
``ByteLevel`` one. The families supported (each checked against llama.cpp,
see ``docs/reference-data.md``) are listed in :data:`PRE_TOKENIZERS`.

Only ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE) is supported; anything
else raises :class:`~llmfab.core.errors.TokenizerError`.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np

from llmfab.core.errors import ModelError, TokenizerError

# --------------------------------------------------------------------------
# pre-tokenizer families (regexes as in llama.cpp src/llama-vocab.cpp)
# --------------------------------------------------------------------------

#: GPT-2's regex. llama.cpp implements it by hand (unicode.cpp,
#: ``unicode_regex_split_custom_gpt2``) without writing the final ``|\s+``
#: alternative, which its code nevertheless applies; here it is spelled out.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

#: Llama 3's regex with llama.cpp's case-insensitivity rewrite (``'[sS]``
#: rather than ``(?i:'s)``, which in Oniguruma would also match U+017F).
LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

#: Qwen2's regex: Llama 3's with single digits.
QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
               r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

#: family -> (regexes applied in turn, ignore_merges, add_bos default)
_FAMILIES: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False),
    "gpt2": ((GPT2_REGEX,), False, False),
    "smollm": ((r"\p{N}", GPT2_REGEX), False, False),
    "llama3": ((LLAMA3_REGEX,), True, True),
    "llama3-merges": ((LLAMA3_REGEX,), False, False),
    "qwen2": ((QWEN2_REGEX,), False, False),
}

#: ``tokenizer.ggml.pre`` value -> pre-tokenizer family (the names llama.cpp
#: maps to the same regexes and flags; "" is a missing key, which llama.cpp
#: treats as "default").
PRE_TOKENIZERS: dict[str, str] = {
    "": "default",
    "default": "default",
    # LLAMA_VOCAB_PRE_TYPE_GPT2 / MPT / OLMO / JAIS: the GPT-2 regex alone
    "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    # LLAMA_VOCAB_PRE_TYPE_SMOLLM and the pre-types sharing its regexes
    "smollm": "smollm", "starcoder": "smollm", "refact": "smollm", "command-r": "smollm",
    "codeshell": "smollm", "exaone": "smollm", "minerva-7b": "smollm",
    # LLAMA_VOCAB_PRE_TYPE_LLAMA3 (ignore_merges, add_bos)
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3",
    # DBRX / SMAUG: the Llama 3 regex without ignore_merges
    "dbrx": "llama3-merges", "smaug-bpe": "llama3-merges",
    # LLAMA_VOCAB_PRE_TYPE_QWEN2 / STABLELM2
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2",
}

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

#: Token texts llama.cpp treats as "end of generation" (and forces to control
#: type) whatever their type in the file (llama-vocab.cpp, special_eog_ids).
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})

# ChatML as written in SmolLM2's GGUF (with its default system message)
# and plain ChatML without one: rendered without jinja2.
_CHATML_DEFAULT_SYSTEM_RE = re.compile(
    r"\{% for message in messages %\}"
    r"\{% if loop\.first and messages\[0\]\['role'\] != 'system' %\}"
    r"\{\{ '<\|im_start\|>system\n(?P<system>[^'\\<]*)<\|im_end\|>\n' \}\}\{% endif %\}"
    r"\{\{'<\|im_start\|>' \+ message\['role'\] \+ '\n' \+ message\['content'\] \+ '<\|im_end\|>' \+ '\n'\}\}"
    r"\{% endfor %\}"
    r"\{% if add_generation_prompt %\}\{\{ '<\|im_start\|>assistant\n' \}\}\{% endif %\}\s*\Z")
_CHATML_PLAIN = ("{% for message in messages %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_TOKEN_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# --------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------

_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
               10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike, prefix: str = "") -> dict:
    """Key/value metadata of a GGUF file (keys starting with ``prefix``).

    Reads only the header (not the tensor index), so it is fast even for the
    49152-entry token arrays: strings become ``str``, numeric arrays numpy
    arrays, string arrays lists of ``str``.
    """
    path = os.fspath(path)
    from llmfab.compiler.model import check_regular_file
    check_regular_file(path, "a GGUF file")     # a device or FIFO would block or never end
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelError(f"cannot open {path}: {e.strerror}") from None
    with f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ModelError(f"{path} is not a GGUF file (it is empty)") from None
        try:
            return _parse_kv(mm, path, prefix)
        except (struct.error, IndexError, ValueError, UnicodeDecodeError):
            raise ModelError(f"{path}: GGUF header is truncated or corrupt") from None
        finally:
            mm.close()


def _parse_kv(mm, path: str, prefix: str) -> dict:
    if mm[:4] != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file (bad magic {bytes(mm[:4])!r})")
    e = "<"
    (version,) = struct.unpack_from("<I", mm, 4)
    if version & 0xFFFF == 0:  # written big-endian
        e = ">"
        (version,) = struct.unpack_from(">I", mm, 4)
    if version not in (2, 3):
        raise ModelError(f"{path}: GGUF version {version} is not supported (2 or 3 expected)")
    _n_tensors, n_kv = struct.unpack_from(e + "QQ", mm, 8)
    pos = 24
    u64 = struct.Struct(e + "Q")
    u32 = struct.Struct(e + "I")

    def string(pos):
        (n,) = u64.unpack_from(mm, pos)
        pos += 8
        if pos + n > len(mm):
            raise ValueError("string past end of file")
        return mm[pos:pos + n].decode("utf-8", errors="replace"), pos + n

    out = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = u32.unpack_from(mm, pos)
        pos += 4
        want = key.startswith(prefix)
        if vtype == _GGUF_STRING:
            value, pos = string(pos)
        elif vtype in _SCALAR_FMT:
            fmt = e + _SCALAR_FMT[vtype]
            (value,) = struct.unpack_from(fmt, mm, pos)
            pos += struct.calcsize(fmt)
        elif vtype == _GGUF_ARRAY:
            (atype,) = u32.unpack_from(mm, pos)
            (count,) = u64.unpack_from(mm, pos + 4)
            pos += 12
            if atype == _GGUF_STRING:
                if want:
                    value = []
                    append = value.append
                    for _ in range(count):
                        (n,) = u64.unpack_from(mm, pos)
                        pos += 8
                        append(mm[pos:pos + n].decode("utf-8", errors="replace"))
                        pos += n
                    if pos > len(mm):
                        raise ValueError("array past end of file")
                else:
                    value = None
                    for _ in range(count):
                        (n,) = u64.unpack_from(mm, pos)
                        pos += 8 + n
            elif atype in _SCALAR_FMT:
                dt = np.dtype(_SCALAR_FMT[atype]).newbyteorder(e)
                nbytes = dt.itemsize * count
                if pos + nbytes > len(mm):
                    raise ValueError("array past end of file")
                value = np.frombuffer(mm, dt, count, pos).copy() if want else None
                pos += nbytes
            else:
                raise ModelError(f"{path}: metadata key {key} is an array of unsupported type {atype}")
        else:
            raise ModelError(f"{path}: metadata key {key} has unknown value type {vtype}")
        if want:
            out[key] = value
    return out


def _metadata_from_reader(reader) -> dict:
    """``tokenizer.*`` metadata from a ``gguf.GGUFReader`` (or look-alike)."""
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if hasattr(field, "contents"):
            out[key] = field.contents()
        else:  # older gguf: decode the parts by hand
            vals = [field.parts[i] for i in field.data]
            if field.types and field.types[-1] == _GGUF_STRING:
                vals = [bytes(v).decode("utf-8", errors="replace") for v in vals]
            else:
                vals = [v.tolist()[0] for v in vals]
            out[key] = vals if field.types[0] == _GGUF_ARRAY else vals[0]
    return out


# --------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------

class Tokenizer:
    """Byte-level BPE tokenizer equivalent to llama.cpp's for a GGUF model.

    Build with :meth:`from_gguf`. ``encode`` maps text to ids (special tokens
    written in the text are recognised), ``decode`` maps ids back to text.
    The underlying HuggingFace tokenizer is :attr:`hf`.
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], *,
                 token_types: Sequence[int] | None = None, pre: str = "",
                 bos_id: int | None = None, eos_id: int | None = None,
                 add_bos: bool | None = None, chat_template: str | None = None,
                 extra_eog_ids: Sequence[int] = ()):
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"unsupported tokenizer.ggml.pre '{pre}' (supported: "
                                 f"{', '.join(sorted(p for p in PRE_TOKENIZERS if p))})")
        self.pre = pre
        self.family = PRE_TOKENIZERS[pre]
        regexes, ignore_merges, add_bos_default = _FAMILIES[self.family]

        tokens = list(tokens)
        n = len(tokens)
        if n == 0:
            raise TokenizerError("tokenizer.ggml.tokens is empty")
        if token_types is None:
            types = np.full(n, TOKEN_NORMAL, dtype=np.int32)
        else:
            types = np.asarray(token_types, dtype=np.int32)
            if types.shape != (n,):
                raise TokenizerError(f"tokenizer.ggml.token_type has {types.size} entries, "
                                     f"tokenizer.ggml.tokens {n}")
        types = types.copy()
        for i, t in enumerate(tokens):  # llama.cpp forces these to control type
            if t in EOG_TEXTS and types[i] != TOKEN_CONTROL:
                types[i] = TOKEN_CONTROL
        self._tokens = tokens
        self._types = types

        for name, v in (("bos", bos_id), ("eos", eos_id)):
            if v is not None and not 0 <= int(v) < n:
                raise TokenizerError(f"tokenizer.ggml.{name}_token_id {v} is outside the "
                                     f"vocabulary (0..{n - 1})")
        self._bos_id = None if bos_id is None else int(bos_id)
        self._eos_id = None if eos_id is None else int(eos_id)
        self.add_bos = bool(add_bos_default if add_bos is None else add_bos)
        self.chat_template = chat_template

        # vocabulary: on duplicate texts the last id wins, as in llama.cpp
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for k, m in enumerate(merges):
            p = m.find(" ", 1)
            if p < 0:
                raise TokenizerError(f"tokenizer.ggml.merges[{k}] '{m}' is not two tokens "
                                     "separated by a space")
            pairs.append((m[:p], m[p + 1:]))
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges,
                           fuse_unk=False, byte_fallback=False)
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
        # special tokens: matched in the text before pre-tokenization, like
        # llama.cpp's tokenizer_st_partition with parse_special=True
        special = np.flatnonzero((types == TOKEN_CONTROL) | (types == TOKEN_UNKNOWN)
                                 | (types == TOKEN_USER_DEFINED))
        added = []
        for i in special:
            t = tokens[i]
            if t and vocab.get(t) == i:
                added.append(AddedToken(t, special=bool(types[i] != TOKEN_USER_DEFINED),
                                        normalized=False, lstrip=False, rstrip=False,
                                        single_word=False))
        if added:
            hf.add_special_tokens(added)
        self.hf = hf

        eog = {i for i, t in enumerate(tokens) if t in EOG_TEXTS and vocab.get(t) == i}
        eog.update(int(i) for i in extra_eog_ids if 0 <= int(i) < n)
        if self._eos_id is not None:
            eog.add(self._eos_id)
        self._eot_ids = tuple(sorted(eog))
        self._piece_cache: dict[int, bytes] = {}

    # ---------------------------------------------------------- construction
    @classmethod
    def from_gguf(cls, source) -> "Tokenizer":
        """Build the tokenizer of a GGUF model.

        ``source`` is a path to a ``.gguf`` file, a ``gguf.GGUFReader`` (anything
        with a ``fields`` mapping of ``ReaderField``), or a mapping of metadata
        keys to values.
        """
        if isinstance(source, (str, os.PathLike)):
            md = read_gguf_metadata(source, prefix="tokenizer.")
        elif hasattr(source, "fields"):
            md = _metadata_from_reader(source)
        elif isinstance(source, Mapping):
            md = dict(source)
        else:
            raise TypeError(f"from_gguf() takes a path, a GGUFReader or a mapping, "
                            f"not {type(source).__name__}")
        return cls._from_metadata(md)

    @classmethod
    def _from_metadata(cls, md: Mapping) -> "Tokenizer":
        def get(key, kind=None):
            v = md.get(key)
            if v is None:
                return None
            if kind is str and not isinstance(v, str):
                raise TokenizerError(f"{key} is not a string")
            return v

        model = get("tokenizer.ggml.model", str)
        if model is None:
            raise TokenizerError("the model has no tokenizer: metadata key tokenizer.ggml.model "
                                 "is missing")
        if model != "gpt2":
            raise TokenizerError(f"unsupported tokenizer.ggml.model '{model}' (only 'gpt2', "
                                 "byte-level BPE, is supported)")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if get(key) is None:
                raise TokenizerError(f"metadata key {key} is missing (needed by "
                                     "tokenizer.ggml.model 'gpt2')")
        tokens = get("tokenizer.ggml.tokens")
        merges = get("tokenizer.ggml.merges")
        if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens[:1]):
            raise TokenizerError("tokenizer.ggml.tokens is not an array of strings")
        if isinstance(merges, str) or not all(isinstance(m, str) for m in merges[:1]):
            raise TokenizerError("tokenizer.ggml.merges is not an array of strings")
        pre = get("tokenizer.ggml.pre", str) or ""

        def tid(key):
            v = get(key)
            return None if v is None else int(v)

        extra = [v for v in (tid("tokenizer.ggml.eot_token_id"), tid("tokenizer.ggml.eom_token_id"))
                 if v is not None]
        add_bos = get("tokenizer.ggml.add_bos_token")
        return cls(tokens, merges, token_types=get("tokenizer.ggml.token_type"), pre=pre,
                   bos_id=tid("tokenizer.ggml.bos_token_id"),
                   eos_id=tid("tokenizer.ggml.eos_token_id"),
                   add_bos=None if add_bos is None else bool(add_bos),
                   chat_template=get("tokenizer.chat_template", str), extra_eog_ids=extra)

    # ------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of tokens (``len(tokenizer.ggml.tokens)``)."""
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id (``tokenizer.ggml.bos_token_id``), or None."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id (``tokenizer.ggml.eos_token_id``), or None."""
        return self._eos_id

    @property
    def eot_ids(self) -> tuple[int, ...]:
        """Ids that end generation: eos, ``<|im_end|>``, ``<|endoftext|>``, ... (sorted)."""
        return self._eot_ids

    @property
    def tokens(self) -> list[str]:
        """The vocabulary texts as stored in the GGUF (byte-level encoded)."""
        return self._tokens

    def token_type(self, token_id: int) -> int:
        """llama.cpp token type of ``token_id`` (1 normal, 3 control, 4 user-defined, ...)."""
        return int(self._types[self._check_id(token_id)])

    def is_special(self, token_id: int) -> bool:
        """True for control and unknown tokens (not rendered by ``decode(..., special=False)``)."""
        return self.token_type(token_id) in (TOKEN_CONTROL, TOKEN_UNKNOWN)

    # -------------------------------------------------------------- encoding
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in it map to their ids.

        ``add_bos`` defaults to the model's ``tokenizer.ggml.add_bos_token``.
        """
        if add_bos is None:
            add_bos = self.add_bos
        ids = self.hf.encode(text, add_special_tokens=False).ids if text else []
        if add_bos:
            if self._bos_id is None:
                raise TokenizerError("cannot add BOS: the model has no tokenizer.ggml.bos_token_id")
            ids = [self._bos_id] + ids
        return ids

    # -------------------------------------------------------------- decoding
    def _check_id(self, token_id) -> int:
        i = int(token_id)
        if not 0 <= i < len(self._tokens):
            raise TokenizerError(f"token id {i} is outside the vocabulary (0..{len(self._tokens) - 1})")
        return i

    def token_to_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes token ``token_id`` stands for (as llama.cpp's ``token_to_piece``).

        Control and unknown tokens give their text if ``special`` else ``b""``.
        A token may hold part of a UTF-8 character; join bytes before decoding.
        """
        i = self._check_id(token_id)
        t = int(self._types[i])
        if t in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            return self._tokens[i].encode("utf-8") if special else b""
        b = self._piece_cache.get(i)
        if b is None:
            text = self._tokens[i]
            if t == TOKEN_USER_DEFINED:
                b = text.encode("utf-8")
            elif t == TOKEN_NORMAL:
                b = b"".join(bytes((_BYTE_DECODER[c],)) if c in _BYTE_DECODER else c.encode("utf-8")
                             for c in text)
            elif t == TOKEN_BYTE:
                m = _BYTE_TOKEN_RE.fullmatch(text)
                b = bytes((int(m.group(1), 16),)) if m else \
                    bytes(_BYTE_DECODER.get(c, 0) for c in text[:1])
            else:  # unused / undefined: rendered as nothing by llama.cpp
                b = b""
            self._piece_cache[i] = b
        return b

    def token_to_piece(self, token_id: int, special: bool = True) -> str:
        """Text of one token (invalid UTF-8, e.g. part of a character, becomes U+FFFD)."""
        return self.token_to_bytes(token_id, special).decode("utf-8", errors="replace")

    def decode(self, ids: Sequence[int], special: bool = True) -> str:
        """Text of a sequence of ids; control tokens are rendered unless ``special`` is False."""
        return b"".join(self.token_to_bytes(i, special) for i in ids).decode("utf-8", errors="replace")

    # --------------------------------------------------------- chat template
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) as the model expects.

        ChatML templates (SmolLM2's, with its default system message, and plain
        ChatML) are rendered directly; any other ``tokenizer.chat_template`` is
        rendered with jinja2 as HuggingFace transformers does. Without a template,
        models that have ``<|im_start|>``/``<|im_end|>`` tokens use plain ChatML.
        """
        messages = list(messages)
        for k, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise TokenizerError(f"chat message {k} is not a mapping with 'role' and 'content'")
        tpl = self.chat_template
        if tpl is None:
            if "<|im_start|>" in self.hf.get_vocab() and "<|im_end|>" in self.hf.get_vocab():
                return _render_chatml(messages, None, add_generation_prompt)
            raise TokenizerError("the model has no tokenizer.chat_template and no ChatML tokens")
        m = _CHATML_DEFAULT_SYSTEM_RE.match(tpl)
        if m:
            return _render_chatml(messages, m.group("system"), add_generation_prompt)
        if tpl.strip() == _CHATML_PLAIN:
            return _render_chatml(messages, None, add_generation_prompt)
        return self.render_jinja(messages, add_generation_prompt)

    def render_jinja(self, messages: Sequence[Mapping[str, str]],
                     add_generation_prompt: bool = True) -> str:
        """Render ``tokenizer.chat_template`` with jinja2 (HF transformers' settings)."""
        if self.chat_template is None:
            raise TokenizerError("the model has no tokenizer.chat_template")
        try:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise TokenizerError("rendering this model's chat template needs jinja2: "
                                 "pip install jinja2") from None

        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            tpl = env.from_string(self.chat_template)
            return tpl.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token="" if self._bos_id is None else self._tokens[self._bos_id],
                eos_token="" if self._eos_id is None else self._tokens[self._eos_id])
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template cannot be rendered: {e}") from None

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pre={self.pre!r}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")


def _render_chatml(messages, default_system: str | None, add_generation_prompt: bool) -> str:
    parts = []
    if default_system is not None and messages and messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
