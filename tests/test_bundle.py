"""Bundles: verified whole on load (issue 9, item 6), run with --bundle, described by `llmfab info`,
cached by the golden and rtl backends (item 7)."""

import json
import os
import shutil
import time

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.compiler import identity
from llmfab.compiler.bundle import FORMAT_VERSION, bundle_hash, read_bundle
from llmfab.core.errors import BundleError
from llmfab.host import cache
from llmfab.host.cli import main

import tinymodel


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny GGUF model and its bundle for the tiny configuration, written by `llmfab compile`."""
    d = tmp_path_factory.mktemp("bundle")
    model = tinymodel.write_tiny_gguf(d / "t.gguf", "q4_1", seed=3)
    out = d / "b"
    assert main(["compile", "--model", model, "--config", "tiny", "--out", str(out)]) == 0
    return model, str(out)


@pytest.fixture
def bundle(built, tmp_path):
    """A fresh copy of the bundle to damage."""
    p = tmp_path / "b"
    shutil.copytree(built[1], p)
    return p


def _manifest(p):
    return json.loads((p / "manifest.json").read_text())


def _rewrite(p, edit, rehash=True):
    """Edit the manifest; ``rehash``: as a writer that knows the format would, so that the
    schema, not the hash, must catch the damage."""
    m = _manifest(p)
    edit(m)
    if rehash:
        m["bundle_hash"] = bundle_hash(m)
    (p / "manifest.json").write_text(json.dumps(m))


def _err(p):
    with pytest.raises(BundleError) as e:
        read_bundle(str(p))
    return str(e.value)


# ---- item 6: damaged bundles ----------------------------------------------------------------

def test_edited_prefill_map_is_caught_by_the_bundle_hash(bundle):
    old = _manifest(bundle)["bundle_hash"]

    def edit(m):
        m["prefill"]["lm_head_tiles"][0][1] -= 8

    _rewrite(bundle, edit, rehash=False)
    new = bundle_hash(_manifest(bundle))
    assert _err(bundle) == (f"{bundle}/manifest.json: the manifest was modified or is corrupt "
                            f"(bundle_hash {old}, content hashes to {new})")


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "..", "sub/program.bin",
                                  "manifest.json", ".hidden"])
def test_files_may_name_only_plain_files_of_the_bundle(bundle, name):
    def edit(m):
        m["files"][name] = m["files"].pop("program.bin")
        m["programs"]["decode"]["file"] = name

    _rewrite(bundle, edit)
    assert _err(bundle) == (f"{bundle}/manifest.json: manifest field 'programs.decode.file' names "
                            f"{json.dumps(name)}: a bundle names only plain files inside its own directory")


def test_a_file_key_outside_the_bundle_is_refused(bundle):
    _rewrite(bundle, lambda m: m["files"].__setitem__("../../../../etc/hostname",
                                                       {"bytes": 1, "sha256": "0" * 64}))
    assert _err(bundle) == (f"{bundle}/manifest.json: manifest field 'files' names "
                            f"\"../../../../etc/hostname\": a bundle names only plain files inside its own directory")


def _drop(path):
    def edit(m):
        *parents, last = path.split("/")
        for k in parents:
            m = m[k]
        del m[last]
    return edit


def _set(path, value):
    def edit(m):
        *parents, last = path.split("/")
        for k in parents:
            m = m[k]
        m[last] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_drop("memory_map/kv"), "manifest field 'memory_map.kv' is missing"),
    (_drop("config_hash"), "manifest field 'config_hash' is missing"),
    (_drop("programs/prefill/2/file"), "manifest field 'programs.prefill.2.file' is missing"),
    (_drop("programs/prefill_kv"), "manifest field 'programs.prefill_kv' is missing"),
    (_set("programs/prefill_kv/4/tokens", 2), "manifest field 'programs.prefill_kv.4.tokens' is 2, not 4"),
    (_drop("programs/prefill_last"), "manifest field 'programs.prefill_last' is missing"),
    (_set("programs/prefill_last/8/tokens", 4), "manifest field 'programs.prefill_last.8.tokens' is 4, not 8"),
    (_drop("model/sha256"), "manifest field 'model.sha256' is missing"),
    (_set("context", "128"), "manifest field 'context' must be an integer >= 1, not \"128\""),
    (_set("registers/wbase", None), "manifest field 'registers.wbase' must be an integer >= 0, not null"),
    (_set("model/vocab_size", -1), "manifest field 'model.vocab_size' must be an integer >= 1, not -1"),
    (_set("model/tied_embeddings", 1), "manifest field 'model.tied_embeddings' must be true or false, not 1"),
    (_set("memory_map/kv", [1, 2, 3]),
     "manifest field 'memory_map.kv' must be [offset, bytes] with non-negative integers, not [1, 2, 3]"),
    (_set("memory_map/io", "abc"),
     "manifest field 'memory_map.io' must be [offset, bytes] with non-negative integers, not \"abc\""),
    (_set("programs/prefill", []), "manifest field 'programs.prefill' must be an object, not []"),
    (_set("prefill/buckets", "2"), "manifest field 'prefill.buckets' must be a list, not \"2\""),
    (_set("files/program.bin", "x"), "manifest field 'files.program.bin' must be an object, not \"x\""),
    (_set("config_hash", "XYZ"), "manifest field 'config_hash' must be 16 lowercase hex digits, not \"XYZ\""),
    (_set("model/rope_base", -1.0), "manifest field 'model.rope_base' must be a positive finite number, not -1.0"),
    (_set("prefill/buckets", [4]), "manifest field 'prefill.buckets' is [4], not the prefill programs' sizes [2, 4, 8]"),
    (_set("registers/kvbase", 0), "manifest field 'registers.kvbase' is 0, not memory_map.kv's offset 77824"),
    (_set("hbm_size", 1000), "manifest field 'memory_map.weights' [0, 63488] ends past hbm_size 1000"),
    (_set("onchip/context", 64), "manifest field 'onchip.context' is 64, not context 128"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_malformed_fields_are_bundle_errors_naming_the_field(bundle, edit, message):
    _rewrite(bundle, edit)
    assert _err(bundle) == f"{bundle}/manifest.json: {message}"


def test_prefill_keys_are_bucket_sizes(bundle):
    def edit(m):
        m["programs"]["prefill"]["x2"] = m["programs"]["prefill"].pop("2")
    _rewrite(bundle, edit)
    assert _err(bundle).endswith("manifest field 'programs.prefill.x2' is not a valid key "
                                 "(a bucket size 2..128 in decimal)")


@pytest.mark.parametrize("kind", ["prefill_kv", "prefill_last"])
def test_kv_only_and_last_logits_programs_match_the_buckets(bundle, kind):
    """A bundle that ends the model has a KV-only and a last-logits program for every bucket,
    and no other."""
    def edit(m):
        del m["programs"][kind]["8"]
        del m["files"][f"{kind}_8.bin"]
    (bundle / f"{kind}_8.bin").unlink()
    _rewrite(bundle, edit)
    assert _err(bundle) == (f"{bundle}/manifest.json: manifest field 'programs.{kind}' has buckets "
                            "[2, 4], not prefill.buckets [2, 4, 8]")


def test_unused_file_entry_is_refused(bundle):
    (bundle / "extra.bin").write_bytes(b"x")
    _rewrite(bundle, lambda m: m["files"].__setitem__(
        "extra.bin", {"bytes": 1, "sha256": identity.hashlib.sha256(b"x").hexdigest()}))
    assert _err(bundle) == f"{bundle}/manifest.json: manifest field 'files.extra.bin' is a file no program or image uses"


@pytest.mark.parametrize("text, problem", [
    ("[1, 2]", "corrupt manifest (a JSON list, not an object)"),
    ('{"format_version": 3, "format_version": 3}', "corrupt manifest (duplicate key 'format_version')"),
    ('{"format_version": NaN}', "corrupt manifest (NaN is not allowed)"),
    ('{"format_version": 2}', f"bundle format version 2, this llmfab reads version {FORMAT_VERSION}; "
                              "recompile it with llmfab compile"),
    ("{", "corrupt manifest (Expecting property name enclosed in double quotes at line 1)"),
])
def test_unreadable_manifests(bundle, text, problem):
    (bundle / "manifest.json").write_text(text)
    assert _err(bundle) == f"{bundle}/manifest.json: {problem}"
    (bundle / "manifest.json").write_bytes(b"\xff\xfe")
    assert _err(bundle) == f"{bundle}/manifest.json: corrupt manifest (not UTF-8 text)"


@pytest.mark.parametrize("old", [3, 4, 5])
def test_old_bundle_is_refused(bundle, old):
    """Version 3 had MV/MM weight tiles as rows back to back (version 4's are slice-major,
    docs/isa.md "Slices"); version 4 had no KV-only prefill programs, version 5 no
    last-logits ones: an old bundle, even with a consistent hash, is refused, not misread."""
    assert FORMAT_VERSION == 6
    _rewrite(bundle, lambda m: m.__setitem__("format_version", old))
    assert _err(bundle) == (f"{bundle}/manifest.json: bundle format version {old}, this llmfab reads "
                            "version 6; recompile it with llmfab compile")


def test_truncated_and_corrupt_files(bundle):
    size = (bundle / "hbm.bin").stat().st_size
    data = (bundle / "hbm.bin").read_bytes()
    (bundle / "hbm.bin").write_bytes(data[:-100])
    assert _err(bundle) == f"{bundle}/hbm.bin: truncated or corrupt ({size - 100} bytes, manifest says {size})"
    (bundle / "hbm.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert _err(bundle) == f"{bundle}/hbm.bin: corrupt (SHA-256 does not match the manifest)"
    (bundle / "hbm.bin").unlink()
    assert _err(bundle) == f"{bundle}: missing hbm.bin"


def test_symbolic_links_are_refused(bundle, tmp_path):
    outside = tmp_path / "outside.bin"
    shutil.copy(bundle / "program.bin", outside)
    (bundle / "program.bin").unlink()
    os.symlink(outside, bundle / "program.bin")
    assert _err(bundle) == f"{bundle}/program.bin: is a symbolic link; a bundle holds only regular files"
    (bundle / "program.bin").unlink()
    shutil.copy(outside, bundle / "program.bin")
    shutil.move(bundle / "manifest.json", tmp_path / "m.json")
    os.symlink(tmp_path / "m.json", bundle / "manifest.json")
    assert _err(bundle) == f"{bundle}/manifest.json: is a symbolic link; a bundle holds only regular files"
    (bundle / "manifest.json").unlink()
    assert _err(bundle) == f"{bundle}: missing manifest.json (not a bundle)"


def test_cli_prints_a_damaged_bundle_as_one_line(bundle, capsys):
    _rewrite(bundle, _drop("onchip/size"))
    assert main(["info", str(bundle)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"llmfab: error: {bundle}/manifest.json: manifest field 'onchip.size' is missing"]


# ---- item 7: --bundle, info, the cache -------------------------------------------------------

def test_bundle_runs_like_a_fresh_compile(built, tmp_path, capsys):
    model, b = built
    fresh, run = tmp_path / "fresh.npy", tmp_path / "bundle.npy"
    base = ["logits", "--backend", "golden", "--tokens", "1,7,42,99,200"]
    assert main(base + ["--model", model, "--config", "tiny", "--no-cache", "--out", str(fresh)]) == 0
    assert main(base + ["--bundle", b, "--out", str(run)]) == 0
    assert np.array_equal(np.load(fresh).view(np.uint32), np.load(run).view(np.uint32))
    capsys.readouterr()
    gen = ["generate", "--backend", "golden", "--prompt", "the", "--max-tokens", "5", "--json"]
    assert main(gen + ["--model", model, "--config", "tiny", "--no-cache"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(gen + ["--bundle", b]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == a["tokens"] and r["bundle"] == b and r["compile_cached"] is True
    assert a["compile_cached"] is False and a["bundle"] is None


def test_bundle_for_another_config_or_model_is_refused(built, tmp_path, capsys):
    model, b = built
    tiny, ci = load_config("tiny").config_hash(), load_config("ci").config_hash()
    assert main(["logits", "--backend", "golden", "--bundle", b, "--config", "ci", "--tokens", "1",
                 "--out", str(tmp_path / "x.npy")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"llmfab: error: bundle {b} was compiled for configuration 'tiny' (hash {tiny}), not 'ci' "
        f"(hash {ci}); recompile with --config ci"]
    other = tinymodel.write_tiny_gguf(tmp_path / "other.gguf", "q4_1", seed=4)
    mine = identity.file_hash(model)
    theirs = identity.file_hash(other)
    assert main(["generate", "--backend", "golden", "--bundle", b, "--model", other,
                 "--prompt", "the"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"llmfab: error: bundle {b} was compiled for model {model} (sha256 {mine}), not {other} "
        f"(sha256 {theirs}); recompile with --model {other}"]
    assert main(["generate", "--backend", "reference", "--bundle", b, "--prompt", "the"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "llmfab: error: --bundle runs on --backend golden, rtl or xrt, not reference"]


def test_bundle_runs_on_golden_when_no_backend_is_named(built, capsys):
    model, b = built
    assert main(["generate", "--bundle", b, "--prompt", "the", "--max-tokens", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "golden" and r["bundle"] == b and r["compile_cached"] is True


def test_bundle_whose_model_file_is_gone(built, tmp_path, capsys):
    model, b = built
    m2 = tmp_path / "m.gguf"
    shutil.copy(model, m2)
    out = tmp_path / "b"
    assert main(["compile", "--model", str(m2), "--config", "tiny", "--out", str(out)]) == 0
    m2.unlink()
    capsys.readouterr()
    # logits --tokens needs no model file; generate needs its tokenizer
    assert main(["logits", "--backend", "golden", "--bundle", str(out), "--tokens", "1,2",
                 "--out", str(tmp_path / "l.npy")]) == 0
    assert main(["generate", "--backend", "golden", "--bundle", str(out), "--prompt", "the"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"llmfab: error: bundle {out}: its model file {m2} does not exist; give the model with --model")
    assert main(["generate", "--backend", "golden", "--bundle", str(out), "--model", model,
                 "--prompt", "the", "--max-tokens", "2", "--json"]) == 0


def test_info(built, capsys):
    model, b = built
    assert main(["info", b, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    rb = read_bundle(b)
    assert d["bundle_hash"] == rb.hash == rb.manifest["bundle_hash"]
    assert d["model"]["sha256"] == identity.file_hash(model) and d["model"]["file"] == model
    assert d["config"] == {"name": "tiny", "hash": load_config("tiny").config_hash()}
    assert set(d["programs"]) == {"decode", "prefill_2", "prefill_4", "prefill_8",
                                  "prefill_kv_2", "prefill_kv_4", "prefill_kv_8",
                                  "prefill_last_2", "prefill_last_4", "prefill_last_8"}
    assert d["files"]["program.bin"]["bytes"] == len(rb.program)
    assert d["total_bytes"] == sum(os.path.getsize(os.path.join(b, f)) for f in rb.manifest["files"])
    assert main(["info", b]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == f"bundle       {b} (format {FORMAT_VERSION})"
    assert text[1] == f"bundle hash  {rb.hash}"
    assert f"model hash   {d['model']['sha256']}" in text
    assert f"config       tiny (hash {d['config']['hash']})" in text
    assert any(line.startswith("program      prefill_2: ") for line in text)


def test_cache_second_run_is_a_cache_hit(built, tmp_path, monkeypatch, capsys):
    model, _ = built
    monkeypatch.setenv("LLMFAB_CACHE_DIR", str(tmp_path / "cache"))
    gen = ["generate", "--backend", "golden", "--model", model, "--config", "tiny", "--prompt", "the",
           "--max-tokens", "3", "--json"]
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        assert main(gen) == 0
        runs.append((json.loads(capsys.readouterr().out), time.perf_counter() - t0))
    (first, _), (second, _) = runs
    assert first["compile_cached"] is False and second["compile_cached"] is True
    assert second["tokens"] == first["tokens"] and second["bundle"] == first["bundle"]
    assert second["bundle"].startswith(str(tmp_path / "cache" / "bundles"))
    assert second["compile_s"] < 1
    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["config"] for e in info["bundles"]] == ["tiny"] and info["model_hashes"] == 1
    # --no-cache compiles and leaves the cache alone
    assert main(gen + ["--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["compile_cached"] is False
    # a damaged entry is compiled again
    with open(os.path.join(second["bundle"], "program.bin"), "r+b") as fh:
        fh.write(b"\0" * 16)
    assert main(gen) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["compile_cached"] is False
    assert err.splitlines() == [f"llmfab: warning: cache entry {second['bundle']} is damaged "
                                f"({second['bundle']}/program.bin: corrupt (SHA-256 does not match the "
                                f"manifest)); compiling again"]
    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out.startswith(f"removed 1 bundles (")
    assert not os.path.exists(tmp_path / "cache" / "bundles")
    assert os.path.isdir(tmp_path / "cache")         # the root itself stays


def test_cache_keys_follow_model_config_and_sparsity(built, tmp_path):
    model, _ = built
    tiny, ci = load_config("tiny"), load_config("ci")
    sha = identity.file_hash(model)
    dense = {m: "dense" for m in ("attn_k", "attn_output", "attn_q", "attn_v", "ffn_down", "ffn_gate", "ffn_up")}
    k = cache.cache_key(sha, tiny, dense)
    assert k != cache.cache_key(sha, ci, dense)
    assert k != cache.cache_key("0" * 64, tiny, dense)
    assert k != cache.cache_key(sha, tiny, {**dense, "ffn_up": "2:4"})


def test_concurrent_store_keeps_the_first_entry(built, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFAB_CACHE_DIR", str(tmp_path / "cache"))
    rb = read_bundle(built[1])
    entry = os.path.join(cache.bundles_dir(), "k")
    cache._store(rb, entry)
    assert rb.path == entry and read_bundle(entry).hash == rb.hash
    cache._store(read_bundle(built[1]), entry)           # lost the race: the first entry stays
    assert os.listdir(cache.bundles_dir()) == ["k"]
    assert read_bundle(entry).hash == rb.hash


def test_model_hash_is_remembered_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(identity, "_memo", {})
    f = tmp_path / "m.bin"
    f.write_bytes(b"abc")
    calls = []
    real = identity._sha_file
    monkeypatch.setattr(identity, "_sha_file", lambda p: calls.append(p) or real(p))
    h = identity.file_hash(f)
    assert h == identity.hashlib.sha256(b"abc").hexdigest()
    monkeypatch.setattr(identity, "_memo", {})             # a new process: from the cache dir
    assert identity.file_hash(f) == h and len(calls) == 1
    f.write_bytes(b"abd")
    os.utime(f, ns=(1, 1))
    assert identity.file_hash(f) == identity.hashlib.sha256(b"abd").hexdigest() and len(calls) == 2
    assert identity.file_hash(f, remember=False) and len(calls) == 3


def test_tests_use_their_own_cache_dir():
    d = os.environ["LLMFAB_CACHE_DIR"]
    assert not d.startswith(os.path.expanduser("~/.cache"))


def test_rtl_device_takes_a_bundle_without_compiling(built, monkeypatch):
    """The rtl backend runs the bundle it is given (no compiler call), after checking its configuration."""
    from llmfab.compiler import compile as compile_mod
    from llmfab.host.rtl_backend import RtlDevice
    from llmfab.sim.rtl import harness

    def no_compile(*a, **k):
        raise AssertionError("compiled")

    started = []

    class FakeAccelerator:
        def __init__(self, config, bundle, **kw):
            bundle.check_config(config)
            self.bundle = bundle

        def start(self):
            started.append(self.bundle)

        def close(self):
            pass

    monkeypatch.setattr(compile_mod, "compile_model", no_compile)
    monkeypatch.setattr(harness, "RtlAccelerator", FakeAccelerator)
    b = read_bundle(built[1])
    dev = RtlDevice(None, load_config("tiny"), bundle=b)
    assert started == [b] and dev.context == b.manifest["context"]
    with pytest.raises(BundleError, match=r"compiled for configuration 'tiny' .* not 'ci'"):
        RtlDevice(None, load_config("ci"), bundle=b)
