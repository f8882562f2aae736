"""Compiled bundles for the golden and rtl backends: from a bundle directory, the cache, or the compiler.

The cache lives in ``<cache dir>/bundles/<key>/`` (``core/cache.py`` says where the
cache dir is). The key is a hash of everything a bundle depends on: the model's
identity (:func:`~llmfab.compiler.identity.file_hash`, the SHA-256 of the model file,
remembered by path, size and mtime), the configuration hash, the sparsity request,
the bundle format version and the compiler's own sources. An entry is a bundle
directory like the one ``llmfab compile`` writes, written under a temporary name and
renamed into place, so concurrent runs (pytest-xdist workers) see it whole or not at
all; it is verified like any bundle when it is read, and a damaged entry is compiled
again. ``llmfab cache info`` lists the entries, ``llmfab cache clear`` removes them,
``--no-cache`` bypasses the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field

from llmfab.core.cache import cache_dir
from llmfab.core.errors import BundleError, LlmfabError
from llmfab.compiler.bundle import FORMAT_VERSION, Bundle, canonical_json, read_bundle, read_manifest, \
    write_bundle
from llmfab.compiler.identity import compiler_hash, file_hash

#: the cache's subdirectories (``cache clear`` removes these and nothing else)
SUBDIRS = ("bundles", "model-hashes")


@dataclass
class Compiled:
    """A bundle ready for a backend, and how it was obtained (``info`` goes into ``--json``)."""

    bundle: Bundle
    model_path: str
    info: dict = field(default_factory=dict)


def bundles_dir() -> str:
    return os.path.join(cache_dir(), "bundles")


def cache_key(model_sha256: str, config, sparsity: dict) -> str:
    return hashlib.sha256(canonical_json({
        "format_version": FORMAT_VERSION, "compiler": compiler_hash(), "model": model_sha256,
        "config": config.config_hash(), "sparsity": sparsity})).hexdigest()[:32]


def _model_path(path) -> str:
    if path is None:
        from llmfab.compiler.paths import default_model_path
        return default_model_path()
    path = str(path)
    if not os.path.exists(path):
        from llmfab.compiler.model import load_model
        load_model(path)                  # raises the loader's own "no such file" error
    return path


def compiled_bundle(model_path, config, *, sparsity: str | None = None, use_cache: bool = True,
                    progress: bool = False) -> Compiled:
    """The bundle of ``model_path`` compiled for ``config``: from the cache, else compiled (and cached).

    ``info``: ``compile_s`` (seconds to obtain the bundle: hashing the model and reading
    the cache entry, or loading the model and compiling), ``compile_cached`` and
    ``bundle`` (the cache entry, or None).
    """
    from llmfab.compiler.compile import parse_sparsity
    t0 = time.perf_counter()
    path = _model_path(model_path)
    sp = parse_sparsity(sparsity)
    sha = file_hash(path, remember=use_cache)
    entry = os.path.join(bundles_dir(), cache_key(sha, config, sp))
    if use_cache and os.path.isdir(entry):
        try:
            b = read_bundle(entry, config)
            b.check_model(sha, path)
            return Compiled(b, path, {"compile_s": round(time.perf_counter() - t0, 3),
                                      "compile_cached": True, "bundle": entry})
        except BundleError as e:
            warnings.warn(f"cache entry {entry} is damaged ({e}); compiling again")
            shutil.rmtree(entry, ignore_errors=True)
    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    b = compile_model(load_model(path), config, sparsity=sparsity, progress=progress)
    if not use_cache:
        return Compiled(b, path, {"compile_s": round(time.perf_counter() - t0, 3),
                                  "compile_cached": False, "bundle": None})
    _store(b, entry)
    return Compiled(b, path, {"compile_s": round(time.perf_counter() - t0, 3),
                              "compile_cached": False, "bundle": b.path or None})


def _store(b: Bundle, entry: str) -> None:
    """Write ``b`` to the cache entry whole (temporary directory + rename); a concurrent
    writer's entry, if it got there first, is kept. A cache that cannot be written is
    reported and skipped."""
    parent = os.path.dirname(entry)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    except OSError as e:
        warnings.warn(f"cannot write the bundle cache {parent} ({e.strerror}); not caching")
        return
    try:
        write_bundle(b, tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isdir(entry):
                raise
            shutil.rmtree(tmp, ignore_errors=True)      # another process cached it first
            b.path = ""
            return
        b.path = entry
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        b.path = ""
        warnings.warn(f"cannot write the bundle cache {parent} ({e.strerror}); not caching")


def load_bundle(bundle_dir: str, config=None, *, model_path=None, need_model: bool = False) -> Compiled:
    """A bundle directory for ``--bundle``: verified, for ``config`` (when given), with the model
    file it was compiled from (``model_path``, else the one the manifest records) checked by its
    hash when one is given or needed (``need_model``: the tokenizer reads it)."""
    t0 = time.perf_counter()
    b = read_bundle(bundle_dir, config)
    path = model_path if model_path is not None else b.manifest["model"]["file"]
    if model_path is not None or need_model:
        if model_path is None and not os.path.exists(path):
            raise BundleError(f"bundle {bundle_dir}: its model file {path} does not exist; "
                              f"give the model with --model")
        b.check_model(file_hash(_model_path(path)), path)
    return Compiled(b, path, {"compile_s": round(time.perf_counter() - t0, 3), "compile_cached": True,
                              "bundle": bundle_dir})


def cache_info() -> dict:
    """The cache's entries with their model, configuration and size."""
    root = cache_dir()
    entries = []
    for name in sorted(os.listdir(bundles_dir())) if os.path.isdir(bundles_dir()) else []:
        p = os.path.join(bundles_dir(), name)
        if name.startswith(".") or not os.path.isdir(p):
            continue
        size = sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p)
                   if os.path.isfile(os.path.join(p, f)))
        try:
            m = read_manifest(p)
            entries.append({"key": name, "model": m["model"]["file"], "model_sha256": m["model"]["sha256"],
                            "config": m["config_name"], "config_hash": m["config_hash"], "bytes": size})
        except LlmfabError as e:
            entries.append({"key": name, "damaged": str(e), "bytes": size})
    hashes = os.path.join(root, "model-hashes")
    n_hashes = len(os.listdir(hashes)) if os.path.isdir(hashes) else 0
    return {"cache_dir": root, "bundles": entries, "total_bytes": sum(e["bytes"] for e in entries),
            "model_hashes": n_hashes}


def cache_clear() -> dict:
    """Remove the cache's bundles and remembered model hashes (only ``SUBDIRS``, never the root)."""
    info = cache_info()
    for sub in SUBDIRS:
        p = os.path.join(cache_dir(), sub)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
    return {"cache_dir": info["cache_dir"], "removed_bundles": len(info["bundles"]),
            "freed_bytes": info["total_bytes"]}
