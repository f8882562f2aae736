"""Slice-major MV/MM weights (docs/isa.md, "Slices"): the tile layout, its two range rules in
the golden model, the compiler's tiles, and numerics that do not depend on the layout."""

import os

import numpy as np
import pytest
import yaml

from llmfab.boards.config import load_config
from llmfab.compiler import isa
from llmfab.compiler.bundle import Bundle
from llmfab.compiler.compile import WeightImage, _weight_slots, compile_model, parse_sparsity
from llmfab.compiler.model import load_model
from llmfab.core.formats import block_bytes
from llmfab.sim.golden import Golden
from llmfab.sim.numerics_model import NumericsModel

import tinymodel

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "boards", "configs")


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _config(tmp_path, base="ci", **changes):
    c = yaml.safe_load(open(os.path.join(CONFIGS, f"{base}.yaml")))
    for k, v in changes.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    path = tmp_path / f"{base}-{abs(hash(str(sorted(changes.items()))))}.yaml"
    path.write_text(yaml.safe_dump(c))
    return load_config(str(path))


# ---- the layout ----------------------------------------------------------------------------

@pytest.mark.parametrize("rows,rb,P,S", [
    (1, 40, 2, 32), (7, 40, 2, 32), (13, 360, 2, 32), (176, 360, 2, 32), (3, 100, 4, 64),
    (8, 36, 4, 8), (5, 20, 8, 16), (64, 68, 32, 64), (97, 2304, 32, 64), (9, 18, 1, 16),
])
def test_slice_rows_round_trip(rows, rb, P, S):
    raw = np.random.default_rng(rows * rb + P).integers(0, 256, (rows, rb), dtype=np.uint8)
    tile = isa.slice_rows(raw, P, S)
    span = isa.mv_span(rows, rb, P, S)
    assert tile.dtype == np.uint8 and tile.size == span
    assert np.array_equal(isa.unslice_rows(tile, rows, rb, P, S), raw)
    assert np.array_equal(isa.unslice_rows(tile.tobytes(), rows, rb, P, S), raw)
    if P == 1:
        assert span == rows * rb and np.array_equal(tile, raw.reshape(-1))
        return
    D = P * S
    assert span % D == 0
    assert span == P * -(-(-(-rows // P) * rb) // S) * S
    # byte x is bank (x // S) % P's; bank p's bytes are rows p, p + P, ... back to back, then zeros
    x = np.arange(span)
    for p in range(P):
        bank = tile[(x // S) % P == p]
        stream = raw[p::P].reshape(-1)
        assert np.array_equal(bank[:stream.size], stream)
        assert not bank[stream.size:].any()


def test_slice_rows_one_stripe_example():
    """Two slices of 4-byte stripes, rows of 6 bytes: slice 0 holds rows 0 and 2, slice 1 row 1."""
    raw = np.arange(18, dtype=np.uint8).reshape(3, 6) + 1
    tile = isa.slice_rows(raw, 2, 4)
    assert list(tile) == [1, 2, 3, 4, 7, 8, 9, 10,           # line 0: stripe 0 | stripe 1
                          5, 6, 13, 14, 11, 12, 0, 0,        # line 1
                          15, 16, 17, 18, 0, 0, 0, 0]        # line 2


# ---- the golden model's rules ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tinymodel.write_tiny_gguf(tmp_path_factory.mktemp("m") / "t.gguf", "q4_1", seed=4))


@pytest.fixture(scope="module")
def ci_bundle(model, ci):
    return compile_model(model, ci)


def _patched(b, edit, program=None):
    words = isa.from_bytes(b.program if program is None else b.prefill[program])
    edit(words)
    if program is None:
        return Bundle(manifest=b.manifest, program=isa.to_bytes(words), hbm_image=b.hbm_image,
                      prefill=b.prefill)
    return Bundle(manifest=b.manifest, program=b.program, hbm_image=b.hbm_image,
                  prefill={**b.prefill, program: isa.to_bytes(words)})


def _first(words, op):
    for i, w in enumerate(words):
        ins = isa.decode(w)
        if ins.op == op:
            return i, ins
    raise AssertionError(op)


def _mv_fault(b, set_fields, op="MV", program=None):
    """Patch the first MV (or MM) of a program; (fault, pc of that word, its fields)."""
    out = {}

    def edit(w):
        i, ins = _first(w, op)
        ins.fields.update(set_fields(ins.fields))
        w[i] = isa.encode(ins)
        out.update(pc=i, f=ins.fields)
    pb = _patched(b, edit, program)
    name = "decode" if program is None else f"prefill_{program}"
    return Golden(pb).check(3, 5, name), out["pc"], out["f"]


def _span(f, P=2, S=32):
    fmt, sp = isa.FMTS[f["func"] & 3], isa.SPARSITIES[f["func"] >> 2]
    return isa.mv_span(f["rows"], f["cols"] // 32 * block_bytes(fmt, sp), P, S)


def test_compiled_weights_obey_the_rules(ci_bundle):
    """Every MV/MM of the compiled programs: wb on a 64-byte line inside the weight buffer, its
    LD an mv_span-long load from a line-aligned HBM offset (the tiles are slice-major)."""
    lo, n = ci_bundle.manifest["onchip"]["weight"]
    for prog in [ci_bundle.program] + list(ci_bundle.prefill.values()):
        ins = [isa.decode(w) for w in isa.from_bytes(prog)]
        loads = {}
        for x in ins:
            if x.op == "LD" and x["hreg"] == isa.REG_WBASE:
                loads[x["buf"]] = x
            if x.op in ("MV", "MM"):
                ld = loads[x["wb"]]
                assert x["wb"] % 64 == 0 and lo <= x["wb"] and x["wb"] + _span(x) <= lo + n
                assert ld["len"] == _span(x) and (ld["hoff"] * 32) % 64 == 0
    g = Golden(ci_bundle)
    assert g.check(0, 1) is None and all(g.check(0, 0, f"prefill_{T}") is None for T in g.buckets)


def test_wb_in_the_activation_region(ci_bundle):
    lo, n = ci_bundle.manifest["onchip"]["weight"]
    r, pc, f = _mv_fault(ci_bundle, lambda f: {"wb": 0})
    assert (r.status, r.pc) == (isa.STATUS_BUF_RANGE, pc)
    assert r.detail == (f"MV weights [0x0, +{_span(f)}) outside the weight buffer "
                        f"[{lo:#x}, {lo + n:#x})")
    assert r.detail.startswith("MV weights [0x0, +") and "outside the weight buffer [0x" in r.detail


def test_wb_not_on_a_line(ci_bundle):
    lo, n = ci_bundle.manifest["onchip"]["weight"]
    r, pc, f = _mv_fault(ci_bundle, lambda f: {"wb": f["wb"] + 32})
    assert f["wb"] + _span(f) <= lo + n                  # inside the buffer: only the line is wrong
    assert (r.status, r.pc) == (isa.STATUS_BUF_RANGE, pc)
    assert r.detail == f"MV weights at {f['wb']:#x}: not a multiple of the 64-byte line of a 2-slice configuration"


def test_span_past_the_weight_buffer(ci_bundle):
    lo, n = ci_bundle.manifest["onchip"]["weight"]
    end = lo + n
    r, pc, f = _mv_fault(ci_bundle, lambda f: {"wb": end - 64})
    assert _span(f) > 64
    assert (r.status, r.pc) == (isa.STATUS_BUF_RANGE, pc)
    assert r.detail == f"MV weights [{end - 64:#x}, +{_span(f)}) outside the weight buffer [{lo:#x}, {end:#x})"
    # misaligned and past the end: the region rule comes first
    r, _, f = _mv_fault(ci_bundle, lambda f: {"wb": end - 32})
    assert r.detail == f"MV weights [{end - 32:#x}, +{_span(f)}) outside the weight buffer [{lo:#x}, {end:#x})"


def test_weight_rules_before_the_other_operands(ci_bundle):
    """An MV's checks: weights in the buffer, weights on a line, then qsrc and dst against the
    on-chip size; the first that fails is reported."""
    size = ci_bundle.manifest["onchip"]["size"]
    r, _, f = _mv_fault(ci_bundle, lambda f: {"wb": f["wb"] + 32, "dst": size - 4})
    assert r.detail.endswith("not a multiple of the 64-byte line of a 2-slice configuration")
    r, _, f = _mv_fault(ci_bundle, lambda f: {"dst": size - 4})
    assert r.status == isa.STATUS_BUF_RANGE and r.detail == f"on-chip [{size - 4:#x}, +{4 * f['rows']}) beyond {size:#x}"


def test_mm_weights(ci_bundle):
    T = min(ci_bundle.prefill)
    lo, n = ci_bundle.manifest["onchip"]["weight"]
    r, pc, f = _mv_fault(ci_bundle, lambda f: {"wb": 64}, op="MM", program=T)
    assert (r.status, r.pc) == (isa.STATUS_BUF_RANGE, pc)
    assert r.detail == f"MM weights [0x40, +{_span(f)}) outside the weight buffer [{lo:#x}, {lo + n:#x})"
    r, pc, f = _mv_fault(ci_bundle, lambda f: {"wb": f["wb"] + 16}, op="MM", program=T)
    assert r.detail == f"MM weights at {f['wb']:#x}: not a multiple of the 64-byte line of a 2-slice configuration"


def test_one_slice_has_no_line_rule(tmp_path, model):
    """tiny (one port): any wb inside the weight buffer is legal; outside it is not."""
    b = compile_model(model, load_config("tiny"))
    lo, n = b.manifest["onchip"]["weight"]

    def edit(w):
        i, ins = _first(w, "MV")
        ins.fields["wb"] += 4
        w[i] = isa.encode(ins)
    assert Golden(_patched(b, edit)).check(0, 1) is None
    r, pc, f = _mv_fault(b, lambda f: {"wb": lo - 4})
    assert r.detail == f"MV weights [{lo - 4:#x}, +{_span(f, 1)}) outside the weight buffer [{lo:#x}, {lo + n:#x})"


def test_128_byte_line(tmp_path, model):
    """u280-slice: two ports of 512 bits, so a 128-byte line."""
    b = compile_model(model, load_config("u280-slice"), prefill=False)
    r, pc, f = _mv_fault(b, lambda f: {"wb": f["wb"] + 64})
    assert r.detail == f"MV weights at {f['wb']:#x}: not a multiple of the 128-byte line of a 2-slice configuration"
    assert Golden(b).check(0, 1) is None


# ---- the compiler's tiles and the numerics ----------------------------------------------------

def test_tiles_are_slice_rows_of_the_matrix(model, ci):
    """Each tile in the HBM image is slice_rows of its rows, at a 64-byte aligned offset; the
    embedding's rows stay back to back and the tied LM head is a second, sliced copy."""
    _, slot = _weight_slots(ci.buffer_bytes["weight"], ci)
    w = WeightImage.build(model, ci, parse_sparsity(None), slot, 0, model.desc.n_layers,
                          emit_image=True, progress=False)
    img = np.frombuffer(bytes(w.data), np.uint8)
    emb = model.tensor("token_embd.weight").data
    assert w.emb.slices == 1 and w.emb is not w.head and w.head.slices == 2
    assert np.array_equal(img[w.emb.hbm_off:w.emb.hbm_off + emb.nbytes], emb.reshape(-1))
    mats = [(w.head, emb)] + [(w.layers[li].ffn_down, model.tensor(f"blk.{li}.ffn_down.weight").data)
                              for li in range(model.desc.n_layers)]
    for cm, raw in mats:
        assert len(cm.tiles) >= 1
        for r0, nr, off in cm.tiles:
            assert off % 64 == 0 and nr % 2 == 0
            tile = img[off:off + cm.tile_bytes(nr)]
            assert np.array_equal(tile, isa.slice_rows(raw[r0:r0 + nr], 2, 32))


def test_prefill_token_rows_are_the_embedding_rows(ci_bundle, model):
    emb = model.tensor("token_embd.weight").data
    rows = ci_bundle.prefill_token_rows([7, 200, 3])
    assert [bytes(r) for _, r in rows] == [emb[t].tobytes() for t in (7, 200, 3)]


@pytest.mark.parametrize("qtype,sp,tied", [("q4_1", None, True), ("q4_0", "2:4", False),
                                           ("q8_0", None, True)])
def test_logits_do_not_depend_on_the_layout(tmp_path, ci, qtype, sp, tied):
    """ci (2 slices of 32-byte stripes) against ci with one 512-bit port (the same 64-byte line
    and chain count, one slice: rows back to back) and the numerics model over the model's own
    tensors: the same logits bit for bit, decode and prefill, fast and specification paths."""
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", qtype, seed=8, tied=tied))
    one = _config(tmp_path, **{"hbm.ports": 1, "hbm.data_width": 512})
    assert (one.slices, one.hbm_bytes_per_cycle, ci.slices, ci.hbm_bytes_per_cycle) == (1, 64, 2, 64)
    b2, b1 = compile_model(m, ci, sparsity=sp), compile_model(m, one, sparsity=sp)
    n = min(b1.hbm_image.size, b2.hbm_image.size)
    assert not np.array_equal(b2.hbm_image[:n], b1.hbm_image[:n])     # the layouts differ
    nm = NumericsModel(m, max_context=b2.manifest["context"], masks=b2.extra["masks"])
    g2, g1, spec = Golden(b2), Golden(b1), Golden(b2, fast=False)
    toks = [3, 250, 17, 99, 1, 64, 200]
    for pos, t in enumerate(toks[:3]):
        want = nm.step(t)
        for g in (g2, g1, spec):
            assert g.run(pos, t).status == isa.STATUS_OK
            assert np.array_equal(_bits(g.logits()), _bits(want)), (pos, g)
    assert 4 in g2.buckets and 4 in g1.buckets
    want = np.stack([nm.step(t) for t in toks[3:]])
    for g in (g2, g1, spec):
        assert g.prefill(3, toks[3:]).status == isa.STATUS_OK
        assert np.array_equal(_bits(g.prefill_logits(4)), _bits(want)), g
    assert np.array_equal(g2.hbm[b2.manifest["memory_map"]["kv"][0]:],
                          spec.hbm[b2.manifest["memory_map"]["kv"][0]:])
