"""Program bundles: the compiler's output, read by every backend.

A bundle is a directory::

    manifest.json   format version, configuration hash, model description,
                    memory map, registers, program list, statistics
    program.bin     the decode program (128-bit little-endian words)
    prefill_<T>.bin the prefill program of bucket T (manifest "programs" -> "prefill")
    hbm.bin         the initial HBM image from byte 0: weights, tables (norms,
                    constants, RoPE cos/sin), zeroed KV cache and I/O regions
                    are not stored (they start as zeros); see manifest "hbm_size"

Loading checks the format version, the sizes and a SHA-256 of every file, and
(when a configuration is given) that the bundle was compiled for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from llmfab.core.errors import BundleError

FORMAT_VERSION = 2


@dataclass
class Bundle:
    manifest: dict
    program: bytes
    hbm_image: np.ndarray                 # uint8, the initialized prefix of HBM
    path: str = ""
    extra: dict = field(default_factory=dict)
    prefill: dict = field(default_factory=dict)     # bucket T -> program bytes

    @property
    def config_hash(self) -> str:
        return self.manifest["config_hash"]

    @property
    def memory_map(self) -> dict:
        return self.manifest["memory_map"]

    @property
    def onchip(self) -> dict:
        return self.manifest["onchip"]

    def check_config(self, config) -> None:
        h = config.config_hash()
        if h != self.config_hash:
            raise BundleError(f"bundle {self.path or '(in memory)'} was compiled for configuration "
                              f"{self.manifest.get('config_name')!r} (hash {self.config_hash}), not "
                              f"{config.name!r} (hash {h}); recompile with --config {config.name}")


def _sha(b) -> str:
    return hashlib.sha256(b).hexdigest()


def write_bundle(bundle: Bundle, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    img = np.ascontiguousarray(bundle.hbm_image, dtype=np.uint8)
    man = dict(bundle.manifest)
    progs = {"program.bin": bundle.program}
    for T, prog in sorted(bundle.prefill.items()):
        progs[f"prefill_{int(T)}.bin"] = prog
    man["files"] = {name: {"bytes": len(p), "sha256": _sha(p)} for name, p in progs.items()}
    man["files"]["hbm.bin"] = {"bytes": int(img.nbytes), "sha256": _sha(img.tobytes())}
    for name, prog in progs.items():
        with open(os.path.join(path, name), "wb") as fh:
            fh.write(prog)
    img.tofile(os.path.join(path, "hbm.bin"))
    tmp = os.path.join(path, "manifest.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(man, fh, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, "manifest.json"))
    bundle.manifest = man
    bundle.path = path


def read_bundle(path: str, config=None, *, verify: bool = True) -> Bundle:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise BundleError(f"{path}: not a bundle directory")
    if not os.path.isfile(mpath):
        raise BundleError(f"{path}: not a bundle (no manifest.json)")
    try:
        with open(mpath) as fh:
            man = json.load(fh)
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: corrupt manifest ({e.msg} at line {e.lineno})") from None
    if man.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {man.get('format_version')!r}, "
                          f"this llmfab reads version {FORMAT_VERSION}")
    for key in ("config_hash", "memory_map", "files", "model", "onchip", "registers"):
        if key not in man:
            raise BundleError(f"{mpath}: corrupt manifest (missing '{key}')")
    data = {}
    for name, info in man["files"].items():
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise BundleError(f"{path}: missing {name}")
        size = os.path.getsize(fp)
        if size != info["bytes"]:
            raise BundleError(f"{fp}: truncated or corrupt ({size} bytes, manifest says {info['bytes']})")
        if name == "hbm.bin":
            arr = np.fromfile(fp, dtype=np.uint8)
            if verify and _sha(arr.tobytes()) != info["sha256"]:
                raise BundleError(f"{fp}: corrupt (SHA-256 does not match the manifest)")
            data[name] = arr
        else:
            with open(fp, "rb") as fh:
                b = fh.read()
            if verify and _sha(b) != info["sha256"]:
                raise BundleError(f"{fp}: corrupt (SHA-256 does not match the manifest)")
            data[name] = b
    prefill = {}
    for key, info in man.get("programs", {}).get("prefill", {}).items():
        if info.get("file") not in data:
            raise BundleError(f"{mpath}: corrupt manifest (prefill program {key} has no file)")
        prefill[int(key)] = data[info["file"]]
    b = Bundle(manifest=man, program=data["program.bin"], hbm_image=data["hbm.bin"], path=path,
               prefill=prefill)
    if config is not None:
        b.check_config(config)
    return b
