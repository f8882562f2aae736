"""Identities that say which model and which compiler a bundle came from.

- :func:`file_hash`: the SHA-256 of a model file (what ``sha256sum`` prints), or of a
  Hugging Face checkpoint directory (the SHA-256 of the ``sha256sum``-style lines
  ``<sha256>  <name>`` of its ``config.json`` and ``*.safetensors``, sorted by name).
  Hashing SmolLM2's 98 MB takes about 0.2 s, so the result is remembered in the cache
  directory (``model-hashes/``) keyed by the file's real path, size, mtime (ns), inode and
  device: any ordinary rewrite of the file changes one of them and the file is hashed
  again. Only an in-place edit that restores the mtime could go unseen; ``--no-cache``
  (``remember=False``) always hashes.
- :func:`model_hash`: the identity of an imported :class:`~llmfab.compiler.model.Model`:
  its file's hash when it was loaded from a file, else a hash of its description and tensors.
  (A model loaded with non-default options, or changed in memory after loading, still
  carries its file's identity: the CLI, which caches by identity, does neither.)
- :func:`compiler_hash`: a hash of the sources of the layers that make a bundle
  (core, boards, compiler), part of the bundle-cache key so that a changed compiler
  never serves a bundle compiled by an older one.
"""

from __future__ import annotations

import hashlib
import json
import os

from llmfab.core.cache import cache_dir, write_json_atomic
from llmfab.core.errors import ModelError

_memo: dict = {}


def _sha_file(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while True:
                b = fh.read(1 << 20)
                if not b:
                    break
                h.update(b)
    except OSError as e:
        raise ModelError(f"{path}: cannot read the model file ({e.strerror})") from None
    return h.hexdigest()


def _one_file_hash(path: str, remember: bool) -> str:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise ModelError(f"{path}: cannot read the model file ({e.strerror})") from None
    stamp = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
             "dev": st.st_dev}
    key = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    entry = os.path.join(cache_dir(), "model-hashes", key + ".json")
    if remember:
        m = _memo.get(entry)
        if m is not None and m[0] == stamp:
            return m[1]
        try:
            with open(entry) as fh:
                old = json.load(fh)
            if isinstance(old, dict) and {k: old.get(k) for k in stamp} == stamp \
                    and isinstance(old.get("sha256"), str):
                _memo[entry] = (stamp, old["sha256"])
                return old["sha256"]
        except (OSError, ValueError):
            pass
    sha = _sha_file(real)
    if remember:
        _memo[entry] = (stamp, sha)
        try:
            write_json_atomic(entry, {**stamp, "sha256": sha})
        except OSError:
            pass                     # a read-only cache only costs the hashing time
    return sha


def file_hash(path: str, *, remember: bool = True) -> str:
    """SHA-256 identity of a model file or Hugging Face checkpoint directory (see the module)."""
    path = str(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path)
                       if n == "config.json" or n.endswith(".safetensors"))
        if not names:
            raise ModelError(f"{path}: no config.json or *.safetensors to identify the model by")
        lines = "".join(f"{_one_file_hash(os.path.join(path, n), remember)}  {n}\n" for n in names)
        return hashlib.sha256(lines.encode()).hexdigest()
    return _one_file_hash(path, remember)


def model_hash(model) -> str:
    """The identity of an imported model: its file's :func:`file_hash`, or (a model made in
    memory) the SHA-256 of its description and tensors."""
    if model.path and os.path.exists(model.path):
        return file_hash(model.path)
    h = hashlib.sha256(json.dumps(model.desc.to_dict(), sort_keys=True).encode())
    for name in sorted(model.tensors):
        t = model.tensors[name]
        h.update(f"\0{name}\0{t.qtype}\0{list(t.shape)}\0".encode())
        h.update(memoryview(t.data.tobytes() if not t.data.flags.c_contiguous else t.data).cast("B"))
    return h.hexdigest()


def compiler_hash() -> str:
    """SHA-256 of the core, boards and compiler sources (``*.py`` and ``*.yaml``)."""
    if "compiler" in _memo:
        return _memo["compiler"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for layer in ("core", "boards", "compiler"):
        for d, _, files in sorted(os.walk(os.path.join(root, layer))):
            for n in sorted(files):
                if n.endswith((".py", ".yaml")):
                    p = os.path.join(d, n)
                    h.update(os.path.relpath(p, root).encode() + b"\0")
                    with open(p, "rb") as fh:
                        h.update(fh.read())
    _memo["compiler"] = h.hexdigest()
    return _memo["compiler"]
