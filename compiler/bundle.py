"""Program bundles: the compiler's output, read by every backend.

A bundle is a directory::

    manifest.json   format version, bundle hash, configuration hash, model identity and
                    description, memory map, registers, program list, statistics
    program.bin     the decode program (128-bit little-endian words)
    prefill_<T>.bin the prefill program of bucket T (manifest "programs" -> "prefill")
    prefill_kv_<T>.bin  its KV-only twin: the same run without the logits (a bundle that
                    ends the model; manifest "programs" -> "prefill_kv")
    prefill_last_<T>.bin  its last-logits twin: the same run with the last token's logits
                    only (a bundle that ends the model; manifest "programs" -> "prefill_last")
    hbm.bin         the initial HBM image from byte 0: weights (the embedding's rows, then
                    every matrix's MV/MM tiles, slice-major: docs/isa.md "Slices"), tables
                    (norms, constants, RoPE cos/sin), zeroed KV cache and I/O regions
                    are not stored (they start as zeros); see manifest "hbm_size"

Loading verifies the bundle whole before anything reads it:

1. ``manifest.json`` is a regular file (not a symbolic link) holding one JSON object
   without duplicate keys or NaN/Infinity; ``format_version`` is :data:`FORMAT_VERSION`;
2. every field a reader uses has the type and range :data:`MANIFEST_SCHEMA` gives, and
   the fields agree with each other (:func:`_check_consistency`): ranges inside HBM and
   on-chip memory, registers at their regions, prefill map keys = buckets = files;
3. ``bundle_hash`` is the SHA-256 of the canonical manifest without ``bundle_hash``
   (:func:`bundle_hash`); the manifest holds each file's SHA-256, so this one hash names
   the bundle's whole content;
4. ``files`` names plain files of the bundle directory (no ``/``, no ``..``, not
   absolute), each a regular file (not a symbolic link) of the listed size and SHA-256.

Every failure is a :class:`~llmfab.core.errors.BundleError` naming the field or file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass, field

import numpy as np

from llmfab.core.errors import BundleError, SimError

#: 3: ``bundle_hash``, ``model.sha256``, ``compiler``; fields validated on load.
#: 4: MV/MM weight tiles are slice-major (docs/isa.md, "Slices"): on ``memory_map.hbm_ports``
#: > 1 a tile's bytes in ``hbm.bin`` are P interleaved streams of rows, not rows back to back,
#: so a version-3 bundle's image would be misread.
#: 5: ``programs.prefill_kv``, the KV-only prefill programs (``prefill_kv_<T>.bin``), which a
#: bundle that ends the model has for every bucket.
#: 6: ``programs.prefill_last``, the last-logits prefill programs (``prefill_last_<T>.bin``),
#: which a bundle that ends the model has for every bucket.
FORMAT_VERSION = 6

_WORD_BYTES = 16          # compiler/isa.py WORD_BYTES (bundle.py stays import-free of the ISA)
_TILE_ROWS = 32           # compiler/isa.py TILE_ROWS (positions per KV tile, attention on the chains)


@dataclass
class Bundle:
    manifest: dict
    program: bytes
    hbm_image: np.ndarray                 # uint8, the initialized prefix of HBM
    path: str = ""
    extra: dict = field(default_factory=dict)
    prefill: dict = field(default_factory=dict)     # bucket T -> program bytes
    #: bucket T -> the KV-only program bytes (the run without logits; a bundle ending the model)
    prefill_kv: dict = field(default_factory=dict)
    #: bucket T -> the last-logits program bytes (the run with the last token's logits only)
    prefill_last: dict = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        return self.manifest["config_hash"]

    @property
    def model_hash(self) -> str:
        return self.manifest["model"]["sha256"]

    @property
    def hash(self) -> str:
        """The bundle hash (the manifest's when written or read, else computed now)."""
        return self.manifest.get("bundle_hash") or bundle_hash(self.manifest)

    @property
    def memory_map(self) -> dict:
        return self.manifest["memory_map"]

    @property
    def onchip(self) -> dict:
        return self.manifest["onchip"]

    def _where(self) -> str:
        return f"bundle {self.path}" if self.path else "the bundle"

    def check_config(self, config) -> None:
        h = config.config_hash()
        if h != self.config_hash:
            raise BundleError(f"{self._where()} was compiled for configuration "
                              f"{self.manifest.get('config_name')!r} (hash {self.config_hash}), not "
                              f"{config.name!r} (hash {h}); recompile with --config {config.name}")

    @property
    def prefill_align(self) -> int:
        """A prefill run of T tokens starts at a multiple of ``min(T, prefill_align)``: with
        attention on the chains, ``TILE_ROWS`` (its tokens' K/V rows fill whole tiles from
        R9: docs/isa.md, "Attention on the chains"), else 1 (any position)."""
        return _TILE_ROWS if self.onchip.get("attention") == "chains" else 1

    def named_program(self, name: str) -> tuple | None:
        """``(bytes, tokens)`` of program ``name``: "decode", "prefill_<T>", "prefill_kv_<T>" or
        "prefill_last_<T>" (:func:`prefill_program`); ``None`` if the bundle has no such program."""
        if name == "decode":
            return self.program, 1
        for prefix, progs in (("prefill_kv_", self.prefill_kv), ("prefill_last_", self.prefill_last),
                              ("prefill_", self.prefill)):
            tail = name[len(prefix):]
            if name.startswith(prefix) and tail.isascii() and tail.isdigit() and int(tail) in progs:
                return progs[int(tail)], int(tail)
        return None

    def program_names(self) -> list:
        """Every program's name: "decode", the prefill programs, the KV-only ones, then the
        last-logits ones."""
        return (["decode"] + [prefill_program(T) for T in sorted(self.prefill)]
                + [prefill_program(T, False) for T in sorted(self.prefill_kv)]
                + [prefill_program(T, "last") for T in sorted(self.prefill_last)])

    def check_prefill_start(self, pos: int, ntok: int) -> None:
        """Refuse a prefill run of ``ntok`` tokens at ``pos`` that the programs cannot serve."""
        a = min(int(ntok), self.prefill_align)
        if int(pos) % a:
            raise SimError(f"a {ntok}-token prefill run of {self._where()} (attention on the chains) "
                           f"must start at a multiple of {a}, not position {pos}")

    def prefill_token_rows(self, tokens) -> list:
        """What the host writes before a prefill run of ``tokens``: ``[(hbm address, bytes)]``,
        each token's raw embedding row (GGUF blocks, from the weight image) at its row of the
        I/O region's staging area (``prefill.token_rows``); the bytes between rows are left
        alone. Token ids must already be checked against the vocabulary."""
        man = self.manifest
        tr = man["prefill"]["token_rows"]
        base, size = (int(v) for v in man["memory_map"]["prefill_tokens"])
        stride, rb = int(tr["row_stride"]), int(tr["row_bytes"])
        if len(tokens) * stride > size:
            raise SimError(f"{len(tokens)} prefill tokens exceed the staging region of "
                           f"{self._where()} ({size} bytes)")
        emb = int(man["registers"]["wbase"]) + int(tr["embedding_offset"])
        img = self.hbm_image
        return [(base + t * stride, img[emb + int(tok) * rb:emb + (int(tok) + 1) * rb])
                for t, tok in enumerate(tokens)]

    def prefill_logits(self, ntok: int, read) -> np.ndarray:
        """The logits an ``ntok``-token prefill run left in the I/O region, ``[ntok, vocab]`` in
        token order: ``read(address, nbytes)`` gives the device's bytes (uint8), un-tiled from
        the LM head's tile-major layout (``prefill.lm_head_tiles``)."""
        man = self.manifest
        io = int(man["memory_map"]["prefill_logits"][0])
        vocab = int(man["model"]["vocab_size"])
        flat = np.asarray(read(io, 4 * ntok * vocab), np.uint8).view(np.float32)
        return untile_logits(flat, ntok, man["prefill"]["lm_head_tiles"], vocab)

    def check_model(self, sha256: str, path: str) -> None:
        """Refuse a model whose identity (:func:`~llmfab.compiler.identity.file_hash`) is not the bundle's."""
        if sha256 != self.model_hash:
            raise BundleError(f"{self._where()} was compiled for model {self.manifest['model']['file']} "
                              f"(sha256 {self.model_hash}), not {path} (sha256 {sha256}); "
                              f"recompile with --model {path}")


def prefill_program(T: int, logits: bool | str = True) -> str:
    """The name of bucket ``T``'s prefill program: ``prefill_<T>`` (every token's logits), with
    ``logits=False`` its KV-only twin ``prefill_kv_<T>``, with ``logits="last"`` its
    last-logits twin ``prefill_last_<T>`` (the backends' and the golden model's program names)."""
    if logits == "last":
        return f"prefill_last_{T}"
    return f"prefill_{T}" if logits else f"prefill_kv_{T}"


def logits_rows(T: int, logits: bool | str) -> int:
    """Rows of logits a run of bucket ``T``'s program leaves: ``T`` (``logits`` True), 1 (its
    last-logits twin, ``"last"``), 0 (its KV-only twin, False)."""
    if logits == "last":
        return 1
    return T if logits else 0


def untile_logits(flat: np.ndarray, ntok: int, tiles, vocab: int) -> np.ndarray:
    """Tile-major logits (tile (r0, nr) is ``[ntok][nr]`` at ``ntok*r0``) -> ``[ntok, vocab]``."""
    out = np.empty((ntok, vocab), np.float32)
    i = 0
    while i < len(tiles):
        r0, nr = tiles[i]
        j = i
        while j + 1 < len(tiles) and tiles[j + 1][1] == nr and tiles[j + 1][0] == tiles[j][0] + nr:
            j += 1
        k = j - i + 1                      # k equal tiles in a row: one reshape
        blk = flat[ntok * r0:ntok * (r0 + k * nr)].reshape(k, ntok, nr)
        out[:, r0:r0 + k * nr] = blk.transpose(1, 0, 2).reshape(ntok, k * nr)
        i = j + 1
    return out


def _sha(b) -> str:
    return hashlib.sha256(b).hexdigest()


def canonical_json(obj) -> bytes:
    """The bytes the bundle hash is taken over: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def bundle_hash(manifest: dict) -> str:
    """SHA-256 of the canonical manifest without its ``bundle_hash`` field."""
    return _sha(canonical_json({k: v for k, v in manifest.items() if k != "bundle_hash"}))


def write_bundle(bundle: Bundle, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    img = np.ascontiguousarray(bundle.hbm_image, dtype=np.uint8)
    man = dict(bundle.manifest)
    man["format_version"] = FORMAT_VERSION
    progs = {man["programs"]["decode"]["file"]: bundle.program}
    for T, prog in sorted(bundle.prefill.items()):
        progs[man["programs"]["prefill"][str(int(T))]["file"]] = prog
    for T, prog in sorted(bundle.prefill_kv.items()):
        progs[man["programs"]["prefill_kv"][str(int(T))]["file"]] = prog
    for T, prog in sorted(bundle.prefill_last.items()):
        progs[man["programs"]["prefill_last"][str(int(T))]["file"]] = prog
    man["files"] = {name: {"bytes": len(p), "sha256": _sha(p)} for name, p in progs.items()}
    man["files"]["hbm.bin"] = {"bytes": int(img.nbytes), "sha256": _sha(img)}
    man.pop("bundle_hash", None)
    man["bundle_hash"] = bundle_hash(man)
    for name, prog in progs.items():
        with open(os.path.join(path, name), "wb") as fh:
            fh.write(prog)
    img.tofile(os.path.join(path, "hbm.bin"))
    tmp = os.path.join(path, "manifest.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(man, fh, indent=1, sort_keys=True, allow_nan=False)
    os.replace(tmp, os.path.join(path, "manifest.json"))
    bundle.manifest = man
    bundle.path = path


# ---- the manifest schema ---------------------------------------------------------------------
# A validator is called with (value, field path) and raises _Bad(problem) or returns None.

class _Bad(Exception):
    def __init__(self, where: str, problem: str):
        super().__init__(f"manifest field '{where}' {problem}")


def _show(v) -> str:
    s = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def Int(lo: int = 0, hi: int | None = None):
    def check(v, where):
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            rng = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
            raise _Bad(where, f"must be {rng}, not {_show(v)}")
    return check


def Num(positive: bool = True):
    def check(v, where):
        if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise _Bad(where, f"must be a {'positive ' if positive else ''}finite number, not {_show(v)}")
    return check


def Str():
    def check(v, where):
        if not isinstance(v, str):
            raise _Bad(where, f"must be a string, not {_show(v)}")
    return check


def Bool():
    def check(v, where):
        if not isinstance(v, bool):
            raise _Bad(where, f"must be true or false, not {_show(v)}")
    return check


def Hex(n: int):
    def check(v, where):
        if not (isinstance(v, str) and len(v) == n and all(c in "0123456789abcdef" for c in v)):
            raise _Bad(where, f"must be {n} lowercase hex digits, not {_show(v)}")
    return check


def FileName():
    def check(v, where):
        if not isinstance(v, str):
            raise _Bad(where, f"must be a file name, not {_show(v)}")
        if (v in ("", ".", "..") or "/" in v or "\\" in v or "\0" in v or os.path.isabs(v)
                or v == "manifest.json" or v.startswith(".")):
            raise _Bad(where, f"names {_show(v)}: a bundle names only plain files inside its own directory")
    return check


def Pair():
    """``[offset, bytes]``, two non-negative integers."""
    def check(v, where):
        if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v)):
            raise _Bad(where, f"must be [offset, bytes] with non-negative integers, not {_show(v)}")
    return check


def List(elem):
    def check(v, where):
        if not isinstance(v, list):
            raise _Bad(where, f"must be a list, not {_show(v)}")
        for i, x in enumerate(v):
            elem(x, f"{where}[{i}]")
    return check


def Map(val, key=None):
    """An object with any keys (each checked by ``key``, a predicate with a description)."""
    def check(v, where):
        if not isinstance(v, dict):
            raise _Bad(where, f"must be an object, not {_show(v)}")
        for k, x in v.items():
            if key is not None and not key[0](k):
                raise _Bad(f"{where}.{k}", f"is not a valid key ({key[1]})")
            val(x, f"{where}.{k}")
    return check


def Obj(fields: dict, optional: dict | None = None):
    """An object with these fields (more are allowed and ignored)."""
    optional = optional or {}

    def check(v, where):
        if not isinstance(v, dict):
            raise _Bad(where, f"must be an object, not {_show(v)}")
        for k, spec in fields.items():
            w = f"{where}.{k}" if where else k
            if k not in v:
                raise _Bad(w, "is missing")
            spec(v[k], w)
        for k, spec in optional.items():
            if k in v:
                spec(v[k], f"{where}.{k}" if where else k)
    return check


_BUCKET_KEY = (lambda k: k.isascii() and k.isdigit() and k == str(int(k)) and 2 <= int(k) <= 128,
               "a bucket size 2..128 in decimal")

#: Every field a reader of the bundle uses, with its type and range (written once; load checks it).
MANIFEST_SCHEMA = Obj({
    "format_version": Int(),
    "bundle_hash": Hex(64),
    "config_name": Str(),
    "config_hash": Hex(16),
    "compiler": Obj({"version": Str(), "source_hash": Hex(64)}),
    "model": Obj({
        "arch": Str(), "name": Str(), "source": Str(), "file": Str(), "sha256": Hex(64),
        "n_layers": Int(1), "dim": Int(1), "n_heads": Int(1), "n_kv_heads": Int(1),
        "head_dim": Int(1), "ffn_dim": Int(1), "vocab_size": Int(1), "context_length": Int(1),
        "rope_base": Num(), "rope_dim": Int(0), "rms_eps": Num(), "tied_embeddings": Bool(),
    }),
    "context": Int(1),
    "sparsity": Map(Str()),
    "hbm_size": Int(0),
    "memory_map": Obj({"weights": Pair(), "tables": Pair(), "kv": Pair(), "io": Pair(),
                       "hbm_stripe_bytes": Int(1), "hbm_ports": Int(1)},
                      {"logits": Pair(), "prefill_logits": Pair(), "prefill_tokens": Pair(),
                       "hidden_in": Pair(), "hidden_out": Pair()}),
    "registers": Obj({"wbase": Int(0), "tbase": Int(0), "kvbase": Int(0), "iobase": Int(0)}),
    "onchip": Obj({"size": Int(1, (1 << 24) - 1), "activation": Pair(), "global": Pair(),
                   "kv": Pair(), "weight": Pair(), "context": Int(1)}),
    "programs": Obj({
        "decode": Obj({"file": FileName(), "tokens": Int(1, 1), "words": Int(1), "bytes": Int(1)}),
        "prefill": Map(Obj({"file": FileName(), "tokens": Int(2, 128), "words": Int(1),
                            "bytes": Int(1)}), key=_BUCKET_KEY),
        "prefill_kv": Map(Obj({"file": FileName(), "tokens": Int(2, 128), "words": Int(1),
                               "bytes": Int(1)}), key=_BUCKET_KEY),
        "prefill_last": Map(Obj({"file": FileName(), "tokens": Int(2, 128), "words": Int(1),
                                 "bytes": Int(1)}), key=_BUCKET_KEY),
    }),
    "prefill": Obj({
        "buckets": List(Int(2, 128)),
        "lm_head_tiles": List(Pair()),
    }, {"token_rows": Obj({"row_stride": Int(0), "row_bytes": Int(0), "format": Str(),
                           "embedding_offset": Int(0)})}),
    "stats": Obj({"weight_bytes_per_token": Int(0)}),
    "files": Map(Obj({"bytes": Int(0), "sha256": Hex(64)})),
}, {
    # a pipeline stage (compiler/partition.py): layers [a, b) of the model
    "stage": Obj({"layers": Pair(), "first": Bool(), "last": Bool(), "hidden_dim": Int(1)}),
})


def _check_consistency(m: dict) -> None:
    """The fields agree with each other (raises :class:`_Bad`)."""
    hbm = m["hbm_size"]
    mm = m["memory_map"]
    st = m.get("stage") or {"first": True, "last": True}
    for k, need in (("logits", st["last"]), ("hidden_out", not st["last"]),
                    ("hidden_in", not st["first"])):
        if need and k not in mm:
            raise _Bad(f"memory_map.{k}", "is missing")
    for k in ("weights", "tables", "kv", "io", "logits", "prefill_logits", "prefill_tokens",
              "hidden_in", "hidden_out"):
        if k in mm and mm[k][0] + mm[k][1] > hbm:
            raise _Bad(f"memory_map.{k}", f"{_show(mm[k])} ends past hbm_size {hbm}")
    for reg, region in (("wbase", "weights"), ("tbase", "tables"), ("kvbase", "kv"), ("iobase", "io")):
        if m["registers"][reg] != mm[region][0]:
            raise _Bad(f"registers.{reg}", f"is {m['registers'][reg]}, not memory_map.{region}'s "
                                           f"offset {mm[region][0]}")
    oc = m["onchip"]
    for k in ("activation", "global", "kv", "weight"):
        if oc[k][0] + oc[k][1] > oc["size"]:
            raise _Bad(f"onchip.{k}", f"{_show(oc[k])} ends past onchip.size {oc['size']}")
    if oc["context"] != m["context"]:
        raise _Bad("onchip.context", f"is {oc['context']}, not context {m['context']}")
    files = m["files"]
    for k in files:
        FileName()(k, "files")
    progs = m["programs"]
    used = {"hbm.bin": "the HBM image"}
    listed = [("programs.decode", progs["decode"])]
    for kind in ("prefill", "prefill_kv", "prefill_last"):
        for key, p in progs[kind].items():
            if p["tokens"] != int(key):
                raise _Bad(f"programs.{kind}.{key}.tokens", f"is {p['tokens']}, not {key}")
            listed.append((f"programs.{kind}.{key}", p))
    for where, p in listed:
        if p["file"] in used:
            raise _Bad(f"{where}.file", f"names {_show(p['file'])}, which {used[p['file']]} uses")
        used[p["file"]] = where
        if p["file"] not in files:
            raise _Bad(f"{where}.file", f"names {_show(p['file'])}, which is not in 'files'")
        if p["bytes"] != p["words"] * _WORD_BYTES or files[p["file"]]["bytes"] != p["bytes"]:
            raise _Bad(f"{where}.bytes", f"is {p['bytes']}: not {_WORD_BYTES} x words ({p['words']}) "
                                         f"and files.{p['file']}.bytes ({files[p['file']]['bytes']})")
    for k in files:
        if k not in used:
            raise _Bad(f"files.{k}", "is a file no program or image uses")
    if "hbm.bin" not in files:
        raise _Bad("files.hbm.bin", "is missing")
    if files["hbm.bin"]["bytes"] > hbm:
        raise _Bad("files.hbm.bin.bytes", f"is {files['hbm.bin']['bytes']}, more than hbm_size {hbm}")
    buckets = m["prefill"]["buckets"]
    if buckets != sorted(int(k) for k in progs["prefill"]):
        raise _Bad("prefill.buckets", f"is {_show(buckets)}, not the prefill programs' sizes "
                                      f"{sorted(int(k) for k in progs['prefill'])}")
    for kind in ("prefill_kv", "prefill_last"):
        kv = sorted(int(k) for k in progs[kind])
        if kv != (buckets if st["last"] else []):
            raise _Bad(f"programs.{kind}", f"has buckets {_show(kv)}, not "
                       + (f"prefill.buckets {_show(buckets)}" if st["last"] else
                          "none (a stage that does not end the model has no logits to leave out)"))
    if buckets:
        for k, need in (("prefill_logits", st["last"]), ("prefill_tokens", st["first"])):
            if need and k not in mm:
                raise _Bad(f"memory_map.{k}", "is missing (the bundle has prefill programs)")
    if buckets and st["first"]:
        if "token_rows" not in m["prefill"]:
            raise _Bad("prefill.token_rows", "is missing")
        vocab = m["model"]["vocab_size"]
        for i, (r0, nr) in enumerate(m["prefill"]["lm_head_tiles"]):
            if r0 + nr > vocab:
                raise _Bad(f"prefill.lm_head_tiles[{i}]", f"{[r0, nr]} ends past vocab_size {vocab}")
        tr = m["prefill"]["token_rows"]
        if tr["row_bytes"] > tr["row_stride"]:
            raise _Bad("prefill.token_rows.row_bytes", f"is {tr['row_bytes']}, more than row_stride "
                                                        f"{tr['row_stride']}")
        end = m["registers"]["wbase"] + tr["embedding_offset"] + vocab * tr["row_bytes"]
        if end > files["hbm.bin"]["bytes"]:
            raise _Bad("prefill.token_rows.embedding_offset",
                       f"puts the embedding rows past the HBM image ({end} > {files['hbm.bin']['bytes']})")


def validate_manifest(man, where: str = "manifest.json") -> None:
    """Schema, consistency and bundle hash; raises :class:`BundleError` naming ``where`` and the field."""
    if not isinstance(man, dict):
        raise BundleError(f"{where}: corrupt manifest (a JSON {type(man).__name__}, not an object)")
    if man.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{where}: bundle format version {_show(man.get('format_version'))}, "
                          f"this llmfab reads version {FORMAT_VERSION}; recompile it with llmfab compile")
    try:
        MANIFEST_SCHEMA(man, "")
        _check_consistency(man)
    except _Bad as e:
        raise BundleError(f"{where}: {e}") from None
    h = bundle_hash(man)
    if h != man["bundle_hash"]:
        raise BundleError(f"{where}: the manifest was modified or is corrupt (bundle_hash "
                          f"{man['bundle_hash']}, content hashes to {h})")


def _no_dups(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise BundleError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _bad_constant(name):
    raise BundleError(f"{name} is not allowed")


def _lstat_regular(fp: str, label: str, bundle_path: str):
    try:
        st = os.lstat(fp)
    except FileNotFoundError:
        raise BundleError(f"{bundle_path}: missing {label}") from None
    except OSError as e:
        raise BundleError(f"{fp}: cannot read ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{fp}: is a symbolic link; a bundle holds only regular files")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{fp}: not a regular file")
    return st


def _read_exact(fp: str, size: int) -> np.ndarray:
    arr = np.empty(size, np.uint8)
    fd = os.open(fp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        n = fh.readinto(memoryview(arr))
        extra = fh.read(1)
    if n != size or extra:
        raise BundleError(f"{fp}: changed while it was read")
    return arr


def read_manifest(path: str) -> dict:
    """The manifest of the bundle at ``path``, validated (schema, consistency, bundle hash)."""
    path = str(path)
    if not os.path.isdir(path):
        raise BundleError(f"{path}: not a bundle directory")
    mpath = os.path.join(path, "manifest.json")
    st = _lstat_regular(mpath, "manifest.json (not a bundle)", path)
    if st.st_size > 64 << 20:
        raise BundleError(f"{mpath}: corrupt manifest ({st.st_size} bytes, more than 64 MiB)")
    try:
        with open(mpath, "rb") as fh:
            man = json.loads(fh.read().decode("utf-8"), object_pairs_hook=_no_dups,
                             parse_constant=_bad_constant)
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: corrupt manifest ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise BundleError(f"{mpath}: corrupt manifest (not UTF-8 text)") from None
    except BundleError as e:
        raise BundleError(f"{mpath}: corrupt manifest ({e})") from None
    except RecursionError:
        raise BundleError(f"{mpath}: corrupt manifest (nested too deeply)") from None
    validate_manifest(man, mpath)
    return man


def read_bundle(path: str, config=None, *, verify: bool = True) -> Bundle:
    """Load and verify the bundle at ``path`` (see the module); ``config``: refuse another configuration.

    ``verify=False`` skips the files' SHA-256 (not the manifest's checks or the sizes).
    """
    path = str(path)
    man = read_manifest(path)
    data = {}
    for name, info in man["files"].items():
        fp = os.path.join(path, name)
        st = _lstat_regular(fp, name, path)
        if st.st_size != info["bytes"]:
            raise BundleError(f"{fp}: truncated or corrupt ({st.st_size} bytes, manifest says {info['bytes']})")
        arr = _read_exact(fp, info["bytes"])
        if verify and _sha(arr) != info["sha256"]:
            raise BundleError(f"{fp}: corrupt (SHA-256 does not match the manifest)")
        data[name] = arr if name == "hbm.bin" else arr.tobytes()
    prefill = {int(k): data[p["file"]] for k, p in man["programs"]["prefill"].items()}
    kv = {int(k): data[p["file"]] for k, p in man["programs"]["prefill_kv"].items()}
    last = {int(k): data[p["file"]] for k, p in man["programs"]["prefill_last"].items()}
    b = Bundle(manifest=man, program=data[man["programs"]["decode"]["file"]], hbm_image=data["hbm.bin"],
               path=path, prefill=prefill, prefill_kv=kv, prefill_last=last)
    if config is not None:
        b.check_config(config)
    return b


def describe(b: Bundle) -> dict:
    """What ``llmfab info`` prints: model, configuration, programs, sizes, hashes."""
    m = b.manifest
    md = m["model"]
    return {
        "bundle": b.path, "format_version": m["format_version"], "bundle_hash": b.hash,
        "model": {"name": md["name"], "file": md["file"], "sha256": md["sha256"], "source": md["source"],
                  "n_layers": md["n_layers"], "dim": md["dim"], "vocab_size": md["vocab_size"]},
        "config": {"name": m["config_name"], "hash": m["config_hash"]},
        "compiler": m["compiler"],
        "context": m["context"],
        "sparsity": {k: v for k, v in m["sparsity"].items() if v != "dense"},
        "programs": {"decode": {"bytes": m["programs"]["decode"]["bytes"],
                                "words": m["programs"]["decode"]["words"]},
                     **{f"{kind}_{k}": {"bytes": p["bytes"], "words": p["words"]}
                        for kind in ("prefill", "prefill_kv", "prefill_last")
                        for k, p in sorted(m["programs"][kind].items(), key=lambda kv: int(kv[0]))}},
        "hbm_size": m["hbm_size"],
        "weight_bytes_per_token": m["stats"]["weight_bytes_per_token"],
        "files": {k: dict(v) for k, v in sorted(m["files"].items())},
        "total_bytes": sum(v["bytes"] for v in m["files"].values()),
    }
