"""The user's llmfab cache directory, and writes into it that concurrent processes cannot tear.

``$LLMFAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/llmfab``, else ``~/.cache/llmfab``.
Two things live there: ``bundles/<key>/`` (compiled bundles, ``host/cache.py``) and
``model-hashes/`` (the SHA-256 of model files, keyed by path, size, mtime and inode;
``compiler/identity.py``). Every entry appears whole or not at all: it is written
under a temporary name in the same directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile


def cache_dir() -> str:
    """The cache root (not created)."""
    d = os.environ.get("LLMFAB_CACHE_DIR")
    if d:
        return os.path.abspath(d)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return os.path.join(os.path.abspath(xdg), "llmfab")
    return os.path.join(os.path.expanduser("~"), ".cache", "llmfab")


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace``."""
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
