"""The compiler: bundles, the memory map, one decode program for every position, errors."""

import hashlib
import os

import numpy as np
import pytest
import yaml

from llmfab.boards.config import load_config
from llmfab.core.errors import BundleError, CompileError, FitError
from llmfab.compiler import isa
from llmfab.compiler.bundle import read_bundle, write_bundle
from llmfab.compiler.compile import compile_model, parse_sparsity
from llmfab.compiler.model import load_model

import tinymodel


def _sha(b):
    return hashlib.sha256(bytes(b)).hexdigest()


def test_compile_is_deterministic(smol, ci, smol_bundle):
    b2 = compile_model(smol, ci)
    assert b2.program == smol_bundle.program
    assert _sha(b2.hbm_image) == _sha(smol_bundle.hbm_image)


def test_program_decodes_and_ends(smol_bundle):
    words = isa.from_bytes(smol_bundle.program)
    instrs = [isa.decode(w) for w in words]
    assert instrs[-1].op == "SYS" and instrs[-1]["func"] == isa.SYS_END
    counts = smol_bundle.manifest["stats"]["instructions"]
    assert sum(counts.values()) == len(words)
    # always-on-chip decode: the only stores are K/V rows (fp16) and logits
    sts = [i for i in instrs if i.op == "ST" and i["len"]]
    kv = [i for i in sts if i["func"] == isa.ST_F16]
    assert len(kv) == 2 * 30 * 3
    assert all(i["hreg"] == isa.REG_IOBASE for i in sts if i["func"] == isa.ST_F32)


def test_decode_program_does_not_depend_on_context(smol):
    """One program serves every position: its length does not grow with the context."""
    small = compile_model(smol, load_config("ci"), context=64)
    big = compile_model(smol, load_config("ci"), context=512)
    assert len(small.program) == len(big.program)
    # the position-dependent instructions read R1 (pos) instead of immediates
    ins = [isa.decode(w) for w in isa.from_bytes(big.program)]
    kv_loads = [i for i in ins if i.op == "LD" and i["hreg"] == isa.REG_KVBASE]
    assert kv_loads and all(i["lreg"] == isa.REG_POS and i["len"] == 0 for i in kv_loads)
    kv_stores = [i for i in ins if i.op == "ST" and i["func"] == isa.ST_F16]
    assert all(i["ireg"] == isa.REG_POS for i in kv_stores)
    emb = [i for i in ins if i.op == "LD" and i["ireg"] == isa.REG_TOKEN]
    assert len(emb) == 1


def test_weights_in_image_are_the_gguf_blocks(smol, smol_bundle):
    """Every weight byte of the model is in the HBM image (Q/K/V rows regrouped per KV head):
    the embedding's rows first, back to back (EMBED reads a row by token id); on ci's two
    slices the tied LM head is a second, slice-major copy (docs/isa.md, "Slices")."""
    img = smol_bundle.hbm_image
    emb = smol.tensor("token_embd.weight").data
    assert np.array_equal(img[:emb.nbytes], emb.reshape(-1))
    assert smol_bundle.manifest["prefill"]["token_rows"]["embedding_offset"] == 0
    wb = smol_bundle.manifest["memory_map"]["weights"][1]
    total = sum(t.nbytes for t in smol.tensors.values() if len(t.shape) == 2) + emb.nbytes
    assert total <= wb < total + 4096 * 300
    # the LM head's tiles: slice_rows of the embedding's rows, one after the other on lines
    head = smol_bundle.manifest["prefill"]["lm_head_tiles"]
    off = -(-emb.nbytes // 64) * 64
    for r0, nr in head:
        span = isa.mv_span(nr, emb.shape[1], 2, 32)
        assert np.array_equal(isa.unslice_rows(img[off:off + span], nr, emb.shape[1], 2, 32),
                              emb[r0:r0 + nr])
        off += span


def test_bundle_roundtrip(tmp_path, smol_bundle, ci):
    p = tmp_path / "b"
    write_bundle(smol_bundle, str(p))
    b = read_bundle(str(p), ci)
    assert b.program == smol_bundle.program
    assert np.array_equal(b.hbm_image, smol_bundle.hbm_image)
    assert b.manifest == smol_bundle.manifest


def test_bundle_errors(tmp_path, smol_bundle, ci):
    p = tmp_path / "b"
    write_bundle(smol_bundle, str(p))
    with pytest.raises(BundleError, match=r"was compiled for configuration 'ci' \(hash [0-9a-f]{16}\), "
                                          r"not 'u280' \(hash [0-9a-f]{16}\); recompile with --config u280"):
        read_bundle(str(p), load_config("u280"))
    prog = p / "program.bin"
    data = bytearray(prog.read_bytes())
    data[100] ^= 0xFF
    prog.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"program.bin: corrupt \(SHA-256 does not match the manifest\)$"):
        read_bundle(str(p))
    prog.write_bytes(bytes(data[:-16]))
    with pytest.raises(BundleError, match=r"program.bin: truncated or corrupt \(\d+ bytes, manifest says \d+\)$"):
        read_bundle(str(p))
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest.json: corrupt manifest \(Expecting property name"):
        read_bundle(str(p))
    with pytest.raises(BundleError, match=r"not a bundle directory$"):
        read_bundle(str(tmp_path / "nope"))


def _write_config(tmp_path, base="ci", **changes):
    c = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "boards", "configs", f"{base}.yaml")))
    for k, v in changes.items():
        node = c
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(c))
    return load_config(str(path))


def test_model_too_large_for_board():
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from compile_decode import LLAMA2_7B, shape_model
    with pytest.raises(FitError, match=r"^model 'LLaMA2-7B-shaped' needs 3\.78 GiB of device memory "
                                       r"\(weights 3\.53 GiB, KV cache 0\.25 GiB at context 512\) "
                                       r"but board 'sim-small' has 1\.00 GiB$"):
        compile_model(shape_model(LLAMA2_7B, "q4_0"), load_config("ci"), emit_image=False)


def test_unsupported_format_is_an_error(tmp_path, smol):
    cfg = _write_config(tmp_path, weight_formats=["q4_0", "q8_0"])
    with pytest.raises(CompileError, match=rf"^{tmp_path / 'cfg.yaml'}: configuration 'ci' "
                                           r"does not support Q4_1 weights \(blk\.0\.attn_q\.weight\); "
                                           r"it supports Q4_0, Q8_0$"):
        compile_model(smol, cfg)


@pytest.mark.parametrize("kib,what", [
    (1, "token_embd: a row (612 bytes) does not fit a weight-buffer slot of 512 bytes"),
    (2, "token_embd.head: a row (612 bytes, a tile of 1280 bytes on 2 slices of 32-byte stripes) "
        "does not fit a weight-buffer slot of 1024 bytes"),
    (9, "token_embd.head: a weight-buffer slot of 4608 bytes holds 6 rows (612 bytes each, on 2 "
        "slices of 32-byte stripes), but LM-head tiles must start at multiples of 8 rows"),
])
def test_weight_buffer_too_small(tmp_path, smol, kib, what):
    """Issue 9: 'LM-head tile rows must start at multiples of 8' said neither which buffer
    nor how large; the size it names now is the smallest that compiles. On ci's two slices a
    tile's span (each slice's rows in whole 32-byte stripes) must fit a slot: 6 rows of 612
    bytes span 2 x 58 stripes = 3712 bytes, 8 rows 2 x 77 = 4928 (kib 10: slots of 5120)."""
    cfg = _write_config(tmp_path, **{"buffers.weight_kib": kib})
    with pytest.raises(FitError) as e:
        compile_model(smol, cfg, emit_image=False)
    assert str(e.value) == (f"{tmp_path / 'cfg.yaml'}: buffers.weight_kib {kib} is too small: {what}; "
                            "set buffers.weight_kib to at least 10 for this model")


def test_weight_buffer_too_small_for_its_slots(tmp_path, smol):
    """With buffers.weight_slots the slot count is the configuration's: four slots must each
    hold an LM-head tile of 8 rows (4928 bytes on ci's two slices), so 20 KiB (slots of 5120)
    is the smallest; the message names the slot count."""
    cfg = _write_config(tmp_path, **{"buffers.weight_kib": 10, "buffers.weight_slots": 4})
    with pytest.raises(FitError) as e:
        compile_model(smol, cfg, emit_image=False)
    assert str(e.value) == (f"{tmp_path / 'cfg.yaml'}: buffers.weight_kib 10 is too small for "
                            "buffers.weight_slots 4: token_embd.head: a weight-buffer slot of 2560 bytes "
                            "holds 4 rows (612 bytes each, on 2 slices of 32-byte stripes), but LM-head "
                            "tiles must start at multiples of 8 rows; set buffers.weight_kib to at least "
                            "20 for this model")
    b = compile_model(smol, _write_config(tmp_path, **{"buffers.weight_kib": 20, "buffers.weight_slots": 4}),
                      emit_image=False)
    w0 = b.manifest["onchip"]["weight"][0]
    wbs = {isa.decode(w)["wb"] for w in isa.from_bytes(b.program) if isa.decode(w).op == "MV"}
    assert {wb for wb in wbs if wb >= w0} == {w0 + i * 5120 for i in range(4)}


def test_weight_buffer_smallest_size_compiles(tmp_path, smol):
    compile_model(smol, _write_config(tmp_path, **{"buffers.weight_kib": 10}), emit_image=False)


def test_weight_buffer_too_small_for_aligned_tiles(tmp_path):
    """A tile of 7 rows of 136 bytes would start off the 32-byte grid (was an AssertionError).
    That is a one-slice rule (ci with one port): on several slices every tile starts on its
    own line, and a slot holds whole slices' worth of rows (6 of 136 bytes on ci)."""
    import tinymodel as tm
    from llmfab.compiler.model import load_model
    model = load_model(tm.write_tiny_gguf(tmp_path / "t.gguf", "q8_0"))
    cfg = _write_config(tmp_path, **{"buffers.weight_kib": 2, "hbm.ports": 1})
    with pytest.raises(FitError) as e:
        compile_model(model, cfg)
    assert str(e.value) == (f"{tmp_path / 'cfg.yaml'}: buffers.weight_kib 2 is too small: "
                            "blk.0.ffn_down: a weight-buffer slot of 1024 bytes holds 7 rows (136 bytes "
                            "each), but tiles must start at 32-byte aligned offsets; set "
                            "buffers.weight_kib to at least 3 for this model")
    compile_model(model, _write_config(tmp_path, **{"buffers.weight_kib": 3, "hbm.ports": 1}))
    b = compile_model(model, _write_config(tmp_path, **{"buffers.weight_kib": 2}))
    rows = {isa.decode(w)["rows"] for w in isa.from_bytes(b.program) if isa.decode(w).op == "MV"}
    assert 6 in rows and max(rows) <= 8


def test_weight_buffer_message_names_packaged_config(smol):
    import dataclasses
    cfg = load_config("ci")
    small = dataclasses.replace(cfg, buffers=dataclasses.replace(cfg.buffers, weight_kib=4))
    with pytest.raises(FitError, match=r"^boards/configs/ci\.yaml: buffers\.weight_kib 4 is too "
                                       r"small: .* at least 10 for this model$"):
        compile_model(smol, small, emit_image=False)


def test_sparsity_errors(tmp_path, smol, ci):
    with pytest.raises(CompileError, match=r"^unknown sparsity pattern '3:7'"):
        parse_sparsity("3:7")
    with pytest.raises(CompileError, match=r"^--sparsity: unknown target 'mlp'"):
        parse_sparsity("mlp=2:4")
    cfg = _write_config(tmp_path, sparsity=["dense"])
    with pytest.raises(CompileError, match=rf"^{tmp_path / 'cfg.yaml'}: configuration 'ci' does not "
                                           r"support sparsity 2:4 \(supports dense\)$"):
        compile_model(smol, cfg, sparsity="2:4")


def test_parse_sparsity():
    sp = parse_sparsity("ffn=2:4,attn_q=8:16")
    assert sp["ffn_gate"] == sp["ffn_up"] == sp["ffn_down"] == "2:4"
    assert sp["attn_q"] == "8:16" and sp["attn_k"] == "dense"


def test_tiny_model_on_tiny_config(tmp_path):
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_0"))
    b = compile_model(m, load_config("tiny"))
    assert b.manifest["model"]["n_layers"] == 2
    ins = [isa.decode(w) for w in isa.from_bytes(b.program)]
    assert ins[-1].op == "SYS"


def test_compile_parts_layouts_and_stages(tmp_path):
    """The named parts of a compile: every program's vectors are disjoint ranges of the
    activation buffer (its layout's ``ab.top`` is what the manifest reports), and the program
    builder's stages of a middle pipeline stage read the hidden state and store it."""
    from llmfab.compiler.compile import Dims, OnChipPlan, PrefillPlan, WeightImage
    from llmfab.core.formats import QBLOCK_BYTES
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_1", n_layers=3, seed=1))
    ci = load_config("ci")
    b = compile_model(m, ci, sparsity="ffn=2:4")
    ctx = b.manifest["context"]
    dims = Dims.of(m.desc)
    onchip = OnChipPlan.plan(ci, dims, ctx)
    assert onchip.manifest(ctx) == b.manifest["onchip"]
    weights = WeightImage.build(m, ci, parse_sparsity("ffn=2:4"), onchip.wslot_bytes, 0, 3,
                                emit_image=True, progress=False)
    assert weights.size == b.manifest["stats"]["weight_bytes"]
    assert set(weights.masks) == set(b.extra["masks"])
    pf = PrefillPlan.plan(ci, onchip, dims, weights, ctx, prefill=True, first=True, last=True)
    assert pf.buckets == b.manifest["prefill"]["buckets"]
    for T, L in pf.layouts.items():
        d, nqhd = dims, dims.nq * dims.hd
        sizes = {"x": d.dim * 4, "h": max(d.dim, nqhd) * 4, "qkv": d.qkv_rows * 4, "o": nqhd * 4,
                 "gate": d.ffn * 4, "up": d.ffn * 4, "qh": max(d.dim, nqhd) // 32 * QBLOCK_BYTES,
                 "qf": d.ffn // 32 * QBLOCK_BYTES}
        spans = sorted((getattr(L, k), getattr(L, k) + T * n) for k, n in sizes.items())
        spans += [(a, a + T * weights.head.tiles[0][1] * 4) for a in L.logits]
        assert all(a1 <= a2 for (_, a1), (a2, _) in zip(spans, spans[1:])), T
        assert spans[-1][1] <= L.ab.top <= onchip.activation
        if T > 1:
            assert b.manifest["programs"]["prefill"][str(T)]["activation_bytes"] == L.ab.top
    # a middle stage: X comes in from the I/O region and goes out to it
    st = compile_model(m, ci, layers=(1, 2))
    ins = [isa.decode(w) for w in isa.from_bytes(st.program)]
    io = st.manifest["registers"]["iobase"]
    lds = [i for i in ins if i.op == "LD" and i["hreg"] == isa.REG_IOBASE]
    sts = [i for i in ins if i.op == "ST" and i["hreg"] == isa.REG_IOBASE]
    assert [io + i["hoff"] * isa.HBM_ALIGN for i in lds] == [st.manifest["memory_map"]["hidden_in"][0]]
    assert [(i["hoff"], i["len"], i["func"]) for i in sts] == [(0, m.desc.dim * 4, isa.ST_F32)]
