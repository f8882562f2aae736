"""Prefill programs (bucketed by length): bit-exact with the decode program token by token.

Every comparison is on bits: the logits of a T-token prefill run equal those of
T decode runs, and the KV cache left in HBM is identical, at position 0 and
after earlier prefill or decode runs.
"""

import os

import numpy as np
import pytest
import yaml

from llmfab.boards.config import load_config
from llmfab.core.errors import BackendError, BundleError, SimError
from llmfab.compiler import isa
from llmfab.compiler.bundle import Bundle, read_bundle, untile_logits, write_bundle
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.core import numerics as N
from llmfab.sim.golden import Golden, matmat
from llmfab.sim.golden_plan import Exec, Load, MvRun, MvScatter, MvStore, MvWrite
from llmfab.host.golden_backend import GoldenDevice
from llmfab.host.runtime import split_buckets
from llmfab.sim.numerics_model import NumericsModel, matvec, pack_matrix

import tinymodel

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "boards", "configs")


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _kv(g):
    base, size = g.bundle.manifest["memory_map"]["kv"]
    return g.hbm[base:base + size].copy()


def _write_config(tmp_path, base="ci", **changes):
    c = yaml.safe_load(open(os.path.join(CONFIGS, f"{base}.yaml")))
    for k, v in changes.items():
        node = c
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    path = tmp_path / f"cfg_{abs(hash(str(sorted(changes.items()))))}.yaml"
    path.write_text(yaml.safe_dump(c))
    return load_config(str(path))


def decode_run(bundle, tokens):
    """Golden after running ``tokens`` one by one through the decode program; logits [T, vocab]."""
    g = Golden(bundle)
    out = []
    for pos, t in enumerate(tokens):
        r = g.run(pos, t)
        assert r.status == isa.STATUS_OK, r
        out.append(g.logits())
    return g, np.stack(out)


def chunked_run(bundle, tokens, chunks, golden=None):
    """Golden after running ``tokens`` in chunks (T > 1: prefill_T, T = 1: decode)."""
    assert sum(chunks) == len(tokens)
    g = golden or Golden(bundle)
    out, pos = [], 0
    for T in chunks:
        if T == 1:
            r = g.run(pos, tokens[pos])
            assert r.status == isa.STATUS_OK, r
            out.append(g.logits()[None])
        else:
            r = g.prefill(pos, tokens[pos:pos + T])
            assert r.status == isa.STATUS_OK, r
            out.append(g.prefill_logits(T))
        pos += T
    return g, np.concatenate(out)


def assert_same(bundle, tokens, chunks, ref=None):
    gref, want = ref or decode_run(bundle, tokens)
    g, got = chunked_run(bundle, tokens, chunks)
    assert np.array_equal(_bits(got), _bits(want)), chunks
    assert np.array_equal(_kv(g), _kv(gref)), chunks
    return g


# ---- tiny models on the ci configuration (buckets 2, 4, 8) --------------------------------

@pytest.fixture(scope="module")
def ci_wb4(tmp_path_factory):
    """ci with a 4 KiB weight buffer: the tiny model's matrices take several tiles (MM into
    the stage, then COPY), as SmolLM2's do on ci."""
    return _write_config(tmp_path_factory.mktemp("cfg"), **{"buffers.weight_kib": 4})


@pytest.fixture(scope="module", params=[(q, c) for c in ("ci", "ci_wb4") for q in ("q4_0", "q4_1", "q8_0")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def tiny(request, tmp_path_factory, ci, ci_wb4):
    qtype, cname = request.param
    cfg = ci if cname == "ci" else ci_wb4
    p = tmp_path_factory.mktemp("tiny") / f"{qtype}.gguf"
    m = load_model(tinymodel.write_tiny_gguf(p, qtype, seed=3))
    b = compile_model(m, cfg)
    copies = sum(1 for w in isa.from_bytes(b.prefill[2])
                 if isa.decode(w).op == "MISC" and isa.decode(w)["func"] == isa.MISC_FUNCS["COPY"])
    assert (copies > 0) == (cname == "ci_wb4")
    return m, b, cfg


TOKS = [int(t) for t in np.random.default_rng(11).integers(0, 256, 23)]


def test_tiny_buckets_and_programs(tiny):
    m, b, cfg = tiny
    man = b.manifest
    # smaller LM-head tiles (4 KiB weight buffer) leave room for one more bucket
    want = [2, 4, 8, 16] if cfg.buffers.weight_kib == 4 else [2, 4, 8]
    assert man["prefill"]["buckets"] == want
    assert man["prefill"]["note"].startswith(f"bucket {2 * want[-1]} does not fit: ")
    assert sorted(b.prefill) == want
    progs = man["programs"]["prefill"]
    for T, prog in b.prefill.items():
        info = progs[str(T)]
        assert info["file"] == f"prefill_{T}.bin" and info["tokens"] == T
        assert info["bytes"] == len(prog) == 16 * info["words"]
        assert man["stats"]["prefill_program_bytes"][str(T)] == len(prog)
        assert sum(info["instructions"].values()) == info["words"]
    assert man["programs"]["decode"]["bytes"] == len(b.program)


@pytest.mark.parametrize("chunks", [[2], [4], [8], [8, 8, 4, 2, 1], [1, 1, 1, 8, 4, 2, 2, 4],
                                    [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1], [1, 2, 1, 4, 1, 8, 1, 4, 1],
                                    [16, 4, 2, 1], [1, 16, 2]])
def test_tiny_prefill_bit_exact(tiny, chunks):
    """Every bucket, at position 0 and continuing after prefill and decode runs (odd positions)."""
    m, b, cfg = tiny
    if max(chunks) not in [1] + b.manifest["prefill"]["buckets"]:
        pytest.skip(f"no bucket {max(chunks)} on this configuration")
    toks = TOKS[:sum(chunks)]
    assert_same(b, toks, chunks)


def test_tiny_prefill_matches_numerics_model(tiny):
    m, b, cfg = tiny
    nm = NumericsModel(m, max_context=b.manifest["context"])
    want = nm.forward(TOKS[:15])
    _, got = chunked_run(b, TOKS[:15], [8, 4, 2, 1])
    assert np.array_equal(_bits(got), _bits(want))


def test_golden_device_uses_buckets(tiny):
    m, b, ci = tiny
    _, want = decode_run(b, TOKS)
    dev = GoldenDevice(m, ci, bundle=b)
    got = dev.logits(TOKS)                         # 23 = 8 + 8 + 4 + 2 + 1 (or 16 + 4 + 2 + 1)
    assert got.shape == (23, 256)
    assert np.array_equal(_bits(got), _bits(want))
    buckets = b.manifest["prefill"]["buckets"]
    runs = {8: 2, 4: 1, 2: 1} if buckets == [2, 4, 8] else {16: 1, 4: 1, 2: 1}
    assert dev.prefill_runs == runs and dev.steps == 1
    st = dev.stats()
    assert st["prefill_buckets"] == buckets
    assert st["prefill_runs"] == {str(k): v for k, v in sorted(runs.items())}
    assert set(st["prefill_program_bytes"]) == {str(t) for t in buckets}
    # chunked teacher forcing and a continued forward give the same bits
    assert np.array_equal(_bits(dev.logits(TOKS, chunk=5)), _bits(want))
    dev.reset()
    a = dev.forward(TOKS[:3])
    c = dev.forward(TOKS[3:])
    assert np.array_equal(_bits(np.concatenate([a, c])), _bits(want))
    # decode-only device: same bits
    dev1 = GoldenDevice(m, ci, bundle=b, prefill=False)
    assert np.array_equal(_bits(dev1.logits(TOKS)), _bits(want))
    assert dev1.prefill_runs == {} and dev1.steps == 23


def test_greedy_generation_same_with_prefill(tiny):
    m, b, ci = tiny
    d1 = GoldenDevice(m, ci, bundle=b)
    r1 = d1.generate(TOKS[:13], 6)
    r2 = GoldenDevice(m, ci, bundle=b, prefill=False).generate(TOKS[:13], 6)
    assert r1.tokens == r2.tokens
    # 13 = 8 + 4 + 1: the prompt's prefill runs KV-only, its last token through decode
    assert d1.prefill_kv_runs == {8: 1, 4: 1} and d1.prefill_runs == {} and d1.prefill_last_runs == {}
    assert d1.stats()["prefill_kv_runs"] == {"4": 1, "8": 1}
    # 12 = 8 + 4: the last run through the 4-token bucket's last-logits program
    d2 = GoldenDevice(m, ci, bundle=b)
    assert d2.generate(TOKS[:12], 6).tokens == GoldenDevice(m, ci, bundle=b, prefill=False).generate(TOKS[:12], 6).tokens
    assert d2.prefill_kv_runs == {8: 1} and d2.prefill_last_runs == {4: 1} and d2.prefill_runs == {}
    assert d2.stats()["prefill_last_runs"] == {"4": 1}


# ---- KV-only prefill programs (the runs of a prompt before its last) ----------------------

def _ops(prog):
    return [isa.decode(w) for w in isa.from_bytes(prog)]


def test_kv_only_programs_leave_the_kv_cache_and_no_logits(tiny):
    """Each bucket's KV-only program leaves the KV cache its full program leaves, bit for bit,
    after earlier runs too, and writes nothing to the logits; it has no LM head, and its last
    layer stops at the K/V rows (one attention norm, no ATTN, output projection or FFN)."""
    m, b, cfg = tiny
    assert sorted(b.prefill_kv) == sorted(b.prefill) == b.manifest["prefill"]["buckets"]
    io0, ion = (int(v) for v in b.manifest["memory_map"]["prefill_logits"])
    for T in sorted(b.prefill):
        full, kv = Golden(b), Golden(b)
        full.prefill(0, TOKS[:T])                     # earlier runs: both caches from the same runs
        kv.prefill(0, TOKS[:T], logits=False)
        assert np.array_equal(_kv(full), _kv(kv)), T
        kv.hbm[io0:io0 + ion] = 0xA5
        nxt = (TOKS * 2)[T:2 * T]
        r1, r2 = full.prefill(T, nxt), kv.prefill(T, nxt, logits=False)
        assert r1.status == r2.status == isa.STATUS_OK, (r1, r2)
        assert np.array_equal(_kv(full), _kv(kv)), T
        assert (kv.hbm[io0:io0 + ion] == 0xA5).all(), T
        fo, ko = _ops(b.prefill[T]), _ops(b.prefill_kv[T])
        count = lambda ops, f: sum(1 for i in ops if i.op == "MISC" and i["func"] == isa.MISC_FUNCS[f])  # noqa: E731
        n_mm = lambda ops: sum(1 for i in ops if i.op in ("MV", "MM"))   # noqa: E731
        L = m.desc.n_layers
        assert count(ko, "ATTN") == count(fo, "ATTN") * (L - 1) // L
        assert count(ko, "RMSNORM") == count(fo, "RMSNORM") - T * 2     # the last FFN norm and the final norm
        head_tiles = len(b.manifest["prefill"]["lm_head_tiles"])
        per_layer, rest = divmod(n_mm(fo) - head_tiles, L)
        assert rest == 0
        # the last layer's MMs: its QKV tiles, after its attention norm (its T RMSNORMs, the
        # later ones between the first tile's MVs), and nothing more
        norms = [k for k, i in enumerate(ko) if i.op == "MISC" and i["func"] == isa.MISC_FUNCS["RMSNORM"]]
        qkv = n_mm(ko[norms[-T]:])
        assert 0 < qkv < per_layer and n_mm(ko) == (L - 1) * per_layer + qkv, (n_mm(ko), per_layer, qkv)


def test_last_logits_programs_leave_the_last_tokens_logits(tiny):
    """Each bucket's last-logits program leaves the KV cache its full program leaves and the
    full program's last row of logits, bit for bit, after earlier runs too; its final norm and
    LM head are the last token's only (one RMSNORM and one MV per LM-head tile, no MM)."""
    m, b, cfg = tiny
    assert sorted(b.prefill_last) == sorted(b.prefill) == b.manifest["prefill"]["buckets"]
    head_tiles = len(b.manifest["prefill"]["lm_head_tiles"])
    for T in sorted(b.prefill):
        full, last = Golden(b), Golden(b)
        full.prefill(0, TOKS[:T])
        last.prefill(0, TOKS[:T], logits="last")
        assert np.array_equal(_kv(full), _kv(last)), T
        nxt = (TOKS * 2)[T:2 * T]
        r1, r2 = full.prefill(T, nxt), last.prefill(T, nxt, logits="last")
        assert r1.status == r2.status == isa.STATUS_OK, (r1, r2)
        assert np.array_equal(_kv(full), _kv(last)), T
        assert np.array_equal(_bits(last.prefill_logits(1)), _bits(full.prefill_logits(T)[-1:])), T
        fo, lo = _ops(b.prefill[T]), _ops(b.prefill_last[T])
        norms = lambda ops: sum(1 for i in ops if i.op == "MISC" and i["func"] == isa.MISC_FUNCS["RMSNORM"])  # noqa: E731
        assert norms(lo) == norms(fo) - (T - 1)
        mm_f = [i for i in fo if i.op in ("MV", "MM")]
        mm_l = [i for i in lo if i.op in ("MV", "MM")]
        assert mm_l[:-head_tiles] == mm_f[:-head_tiles]
        assert [i.op for i in mm_f[-head_tiles:]] == ["MM"] * head_tiles
        assert [i.op for i in mm_l[-head_tiles:]] == ["MV"] * head_tiles


def test_forward_last_runs_kv_only_programs(tiny):
    """``forward_last`` gives the last token's logits of ``forward``, bit for bit, running
    every prefill run but the last through its KV-only program and the last through its
    last-logits program; the cache it leaves is the same."""
    m, b, cfg = tiny
    _, want = decode_run(b, TOKS)
    for n in (2, 8, 11, 23):
        dev = GoldenDevice(m, cfg, bundle=b)
        got = dev.forward_last(TOKS[:n])
        assert got.shape == (1, 256) and np.array_equal(_bits(got), _bits(want[n - 1:n])), n
        full = GoldenDevice(m, cfg, bundle=b)
        full.forward(TOKS[:n])
        assert np.array_equal(_kv(dev.golden), _kv(full.golden)), n
        runs = split_buckets(n, b.manifest["prefill"]["buckets"])
        kv_runs = {}
        for T in runs[:-1]:
            if T > 1:
                kv_runs[T] = kv_runs.get(T, 0) + 1
        assert dev.prefill_kv_runs == kv_runs, n
        assert dev.prefill_last_runs == ({runs[-1]: 1} if runs[-1] > 1 else {}), n
        assert dev.prefill_runs == {}, n
        # and from a later position, after a decode step
        got2 = dev.forward_last(TOKS[n:n + 5]) if n + 5 <= len(TOKS) else None
        if got2 is not None:
            assert np.array_equal(_bits(got2), _bits(want[n + 4:n + 5])), n


# ---- sparse ----------------------------------------------------------------------------

@pytest.mark.parametrize("sp", ["ffn=2:4,attn=8:16", "2:16"])
def test_sparse_prefill_bit_exact(tmp_path, ci, sp):
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_1", seed=5))
    b = compile_model(m, ci, sparsity=sp)
    assert b.manifest["prefill"]["buckets"] == [2, 4, 8]
    toks = TOKS[:15]
    gref, want = decode_run(b, toks)
    assert_same(b, toks, [8, 4, 2, 1], ref=(gref, want))
    assert_same(b, toks, [1, 2, 4, 8], ref=(gref, want))
    nm = NumericsModel(m, max_context=b.manifest["context"], masks=b.extra["masks"])
    assert np.array_equal(_bits(want), _bits(nm.forward(toks)))
    dense = NumericsModel(m, max_context=b.manifest["context"]).forward(toks)
    assert not np.array_equal(want, dense)


# ---- SmolLM2 ---------------------------------------------------------------------------

SMOL_TOKS = [504, 3575, 282, 4649, 314, 7042, 28, 9, 1167, 253, 8134, 30, 2115, 282, 260, 1345,
             7042, 314, 28, 504, 3575, 282, 4649, 9, 30, 1167, 253, 8134, 2115, 260, 1345]


def test_smollm2_on_ci(smol, ci):
    """ci holds two tokens of SmolLM2 activations: bucket 2 only."""
    b = compile_model(smol, ci)
    pre = b.manifest["prefill"]
    assert pre["buckets"] == [2]
    assert pre["per_token_activation_bytes"] * 4 > 64 * 1024 >= pre["per_token_activation_bytes"] * 2
    assert "bucket 4 does not fit" in pre["note"]
    toks = SMOL_TOKS[:7]
    ref = decode_run(b, toks)
    assert_same(b, toks, [2, 2, 2, 1], ref=ref)
    assert_same(b, toks, [1, 2, 1, 2, 1], ref=ref)
    # the backend: greedy buckets, same logits
    dev = GoldenDevice(smol, ci, bundle=b)
    assert np.array_equal(_bits(dev.logits(toks)), _bits(ref[1]))
    assert dev.prefill_runs == {2: 3}


def test_buckets_stop_where_mm_tokens_overflow_mvexec():
    """A bucket whose T tokens of a multi-tile matrix overflow MvExec's activation buffers (each
    tile would reload them) is not built: LLaMA2-7B-shaped on u280 stops at 4 (its down
    projection's 11008 columns are 344 blocks a token: 8 x 344 > 2048), with the reason."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from compile_decode import LLAMA2_7B, shape_model

    from llmfab.hw.mv_exec import DEFAULT_MAX_BLOCKS
    assert isa.MV_ACT_BLOCKS == DEFAULT_MAX_BLOCKS
    b = compile_model(shape_model(LLAMA2_7B, "q4_0"), load_config("u280"), context=512,
                      emit_image=False)
    pre = b.manifest["prefill"]
    assert pre["buckets"] == [2, 4]
    assert pre["note"] == ("bucket 8 not built: 8 tokens of blk.0.ffn_down (11008 columns, 64 "
                           "tiles) exceed MvExec's activation buffers (2048 blocks), so each tile "
                           "would reload them")


def test_smollm2_larger_buckets(tmp_path, smol):
    """A ci variant with a 512 KiB activation buffer (and a 32 KiB weight buffer, so the
    board's URAM holds both): buckets 2 .. 16, every one bit-exact."""
    cfg = _write_config(tmp_path, **{"buffers.activation_kib": 512, "buffers.weight_kib": 32})
    b = compile_model(smol, cfg)
    assert b.manifest["prefill"]["buckets"] == [2, 4, 8, 16]
    sizes = [len(b.prefill[T]) for T in (2, 4, 8, 16)]
    assert sizes == sorted(sizes) and sizes[0] > len(b.program)
    toks = SMOL_TOKS
    assert_same(b, toks, [16, 8, 4, 2, 1])


# ---- what the programs contain ----------------------------------------------------------

def _instrs(prog):
    return [isa.decode(w) for w in isa.from_bytes(prog)]


def test_prefill_program_structure(tmp_path, ci):
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_1", seed=1))
    b = compile_model(m, ci)
    d = m.desc
    hd, g = d.head_dim, d.gqa_group
    man = b.manifest
    io = man["registers"]["iobase"]
    tok_base = man["memory_map"]["prefill_tokens"][0] - io
    stride = man["prefill"]["token_rows"]["row_stride"]
    assert stride % 32 == 0 and stride >= man["prefill"]["token_rows"]["row_bytes"]
    dec = _instrs(b.program)
    # the decode program's ATTN: t = 0, current row from q/k/v (the meaning it always had)
    for i in dec:
        if i.op == "MISC" and i["func"] == isa.MISC_FUNCS["ATTN"]:
            assert (i["n"], i["aux"]) == (g, hd)
    assert not any(i.op == "SYS" and i["func"] == isa.SYS_SYNC for i in dec)
    for T, prog in b.prefill.items():
        ins = _instrs(prog)
        assert ins[-1].op == "SYS" and ins[-1]["func"] == isa.SYS_END
        mms = [i for i in ins if i.op == "MM"]
        assert mms and all(i["ntok"] == T for i in mms)
        # the first tile of each layer's QKV, output, gate and down projections token by token
        # (one token lane: each token's MV after its inputs, the next token's norm or
        # quantization beside it; ProgramBuilder._mm), and the up projection's last (each
        # token's SiLU-multiply and quantization beside the next token's MV): T MVs on one
        # weight tile (every matrix here is one tile)
        mvs = [i for i in ins if i.op == "MV"]
        assert ci.chain.tokens == 1 and len(mvs) == 5 * d.n_layers * T
        for k in range(0, len(mvs), T):
            grp, nb = mvs[k:k + T], mvs[k]["cols"] // 32
            assert all((i["wb"], i["rows"], i["cols"]) == (grp[0]["wb"], grp[0]["rows"], grp[0]["cols"]) for i in grp)
            assert [i["qsrc"] - grp[0]["qsrc"] for i in grp] == [t * nb * 40 for t in range(T)]
            assert [i["dst"] - grp[0]["dst"] for i in grp] == [t * grp[0]["rows"] * 4 for t in range(T)]
        # one SYNC per layer: the K/V stores reach HBM before the cache is reloaded
        assert sum(i.op == "SYS" and i["func"] == isa.SYS_SYNC for i in ins) == d.n_layers
        attn = [i for i in ins if i.op == "MISC" and i["func"] == isa.MISC_FUNCS["ATTN"]]
        assert len(attn) == d.n_layers * d.n_kv_heads * T
        ops = [isa.attn_operands(i.fields) for i in attn]
        assert all(o[0] == g and o[2] == hd and o[3] for o in ops)
        assert sorted({o[1] for o in ops}) == list(range(T))
        kv_st = [i for i in ins if i.op == "ST" and i["func"] == isa.ST_F16]
        assert len(kv_st) == 2 * T * d.n_kv_heads * d.n_layers
        assert all(i["ireg"] == isa.REG_POS and i["stride"] == 2 * hd for i in kv_st)
        kv_ld = [i for i in ins if i.op == "LD" and i["hreg"] == isa.REG_KVBASE]
        assert kv_ld and all(i["len"] == T * hd * 2 and i["lreg"] == isa.REG_POS for i in kv_ld)
        rope_ld = [i for i in ins if i.op == "LD" and i["ireg"] == isa.REG_POS]
        assert len(rope_ld) == d.n_layers and all(i["len"] == T * hd * 4 for i in rope_ld)
        # token rows come from the I/O region, never through R7
        assert not any(i["ireg"] == isa.REG_TOKEN for i in ins if i.op in ("LD", "ST"))
        tok_ld = [i for i in ins if i.op == "LD" and i["hreg"] == isa.REG_IOBASE]
        assert sum(i["len"] for i in tok_ld) == T * stride
        assert min(i["hoff"] for i in tok_ld) * 32 == tok_base
        embeds = [i for i in ins if i.op == "MISC" and i["func"] == isa.MISC_FUNCS["EMBED"]]
        assert len(embeds) == T
        # logits: one ST per LM-head tile, [T][rows] at T*r0*4
        lst = [i for i in ins if i.op == "ST" and i["func"] == isa.ST_F32]
        tiles = man["prefill"]["lm_head_tiles"]
        assert [(i["hoff"] * 32, i["len"]) for i in lst] == [(T * r0 * 4, T * nr * 4) for r0, nr in tiles]


def test_prefill_io_layout_and_untiling():
    rng = np.random.default_rng(0)
    tiles = [[0, 24], [24, 24], [48, 24], [72, 16], [88, 8], [96, 8], [104, 3]]
    vocab = 107
    for T in (1, 2, 5):
        want = rng.standard_normal((T, vocab)).astype(np.float32)
        flat = np.concatenate([want[:, r0:r0 + nr].reshape(-1) for r0, nr in tiles])
        assert np.array_equal(untile_logits(flat, T, tiles, vocab), want)


def test_no_prefill_when_only_one_token_fits(tmp_path):
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_0", seed=2))
    cfg = _write_config(tmp_path, base="tiny", **{"buffers.activation_kib": 4})
    b = compile_model(m, cfg)
    pre = b.manifest["prefill"]
    assert pre["buckets"] == [] and b.prefill == {} and b.manifest["programs"]["prefill"] == {}
    assert pre["note"].startswith("no prefill programs: only T=1 fits the activation buffer (4096 bytes; ")
    assert pre["note"] in b.manifest["notes"]
    assert "prefill_tokens" not in b.manifest["memory_map"]
    out = tmp_path / "b"
    write_bundle(b, str(out))
    assert sorted(os.listdir(out)) == ["hbm.bin", "manifest.json", "program.bin"]
    dev = GoldenDevice(m, cfg, bundle=read_bundle(str(out), cfg))
    _, want = decode_run(b, TOKS[:5])
    assert np.array_equal(_bits(dev.logits(TOKS[:5])), _bits(want))
    with pytest.raises(SimError, match=r"^bundle has no program 'prefill_2' \(it has decode\)$"):
        dev.golden.run(0, 0, program="prefill_2")


def test_no_prefill_for_head_dim_not_multiple_of_16(tmp_path, ci):
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q8_0", n_heads=8, n_kv_heads=2))
    assert m.desc.head_dim == 8
    b = compile_model(m, ci)
    assert b.manifest["prefill"]["buckets"] == []
    assert "head dim 8 is not a multiple of 16" in b.manifest["prefill"]["note"]
    assert compile_model(m, ci, prefill=False).manifest["prefill"]["note"] == "prefill programs not requested"


# ---- bundles -----------------------------------------------------------------------------

def test_bundle_roundtrip_with_prefill(tmp_path, tiny):
    m, b, ci = tiny
    p = tmp_path / "b"
    write_bundle(b, str(p))
    assert sorted(os.listdir(p)) == sorted(["hbm.bin", "manifest.json", "program.bin"]
                                           + [f"prefill_{t}.bin" for t in b.prefill]
                                           + [f"prefill_kv_{t}.bin" for t in b.prefill]
                                           + [f"prefill_last_{t}.bin" for t in b.prefill])
    r = read_bundle(str(p), ci)
    assert r.prefill == b.prefill and r.program == b.program and r.manifest == b.manifest
    assert r.prefill_kv == b.prefill_kv and sorted(r.prefill_kv) == sorted(b.prefill)
    assert r.prefill_last == b.prefill_last and sorted(r.prefill_last) == sorted(b.prefill)
    assert set(r.manifest["files"]) == set(os.listdir(p)) - {"manifest.json"}
    _, want = decode_run(r, TOKS[:8])
    _, got = chunked_run(r, TOKS[:8], [8])
    assert np.array_equal(_bits(got), _bits(want))
    f = p / "prefill_4.bin"
    data = bytearray(f.read_bytes())
    data[40] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"prefill_4.bin: corrupt \(SHA-256 does not match the manifest\)$"):
        read_bundle(str(p))
    f.unlink()
    with pytest.raises(BundleError, match=r": missing prefill_4.bin$"):
        read_bundle(str(p))


# ---- validation, deadlock and status semantics on prefill programs -------------------------

@pytest.fixture(scope="module")
def tiny41(tmp_path_factory, ci_wb4):
    p = tmp_path_factory.mktemp("t41") / "t.gguf"
    m = load_model(tinymodel.write_tiny_gguf(p, "q4_1", seed=2))
    return compile_model(m, ci_wb4)


def _patched(b, T, edit):
    words = isa.from_bytes(b.prefill[T])
    edit(words)
    return Bundle(manifest=b.manifest, program=b.program, hbm_image=b.hbm_image,
                  prefill={**b.prefill, T: isa.to_bytes(words)})


def _find(words, pred, last=False):
    idx = range(len(words) - 1, -1, -1) if last else range(len(words))
    for i in idx:
        ins = isa.decode(words[i])
        if pred(ins):
            return i, ins
    raise AssertionError("not found")


def _run4(b):
    g = Golden(b)
    g.stage_tokens(TOKS[:4])
    return g.run(3, 0, program="prefill_4")


def test_prefill_illegal_word_reported(tiny41):
    def edit(w):
        w[50] = (w[50] & ~0xF) | 0xF
    b = _patched(tiny41, 4, edit)
    r = _run4(b)
    assert (r.status, r.pc) == (isa.STATUS_ILLEGAL, 50)
    assert r.detail.startswith("illegal instruction 0x") and r.detail.endswith("opcode 15")
    g = Golden(b)                       # the other programs are unaffected
    assert g.run(0, 1).status == isa.STATUS_OK
    assert g.prefill(1, TOKS[:2]).status == isa.STATUS_OK


def test_prefill_attn_operand_illegal(tiny41):
    hd = tiny41.manifest["model"]["head_dim"]

    def edit(w):
        i, ins = _find(w, lambda x: x.op == "MISC" and x["func"] == isa.MISC_FUNCS["ATTN"])
        ins.fields["aux"] = (hd + 1) | isa.ATTN_CACHED
        w[i] = isa.encode(ins)
        edit.pc = i
    r = _run4(_patched(tiny41, 4, edit))
    assert (r.status, r.pc, r.detail) == (isa.STATUS_ILLEGAL, edit.pc, f"ATTN head dim {hd + 1}")


def test_prefill_first_fault_in_program_order(tiny41):
    """An HBM fault before an illegal word decides the status (registers are known at dispatch)."""
    def edit(w):
        i, ins = _find(w, lambda x: x.op == "LD" and x["hreg"] == isa.REG_KVBASE)
        ins.fields["hoff"] = (1 << 28) - 1
        w[i] = isa.encode(ins)
        w[i + 5] = (w[i + 5] & ~0xF) | 0x9
        edit.pc = i
    r = _run4(_patched(tiny41, 4, edit))
    assert (r.status, r.pc) == (isa.STATUS_HBM_RANGE, edit.pc)


def test_prefill_copy_range_checked(tiny41):
    def edit(w):
        i, ins = _find(w, lambda x: x.op == "MISC" and x["func"] == isa.MISC_FUNCS["COPY"])
        ins.fields["b"] = (1 << 24) - 1          # destination row stride beyond the on-chip space
        w[i] = isa.encode(ins)
        edit.pc = i
    r = _run4(_patched(tiny41, 4, edit))
    assert (r.status, r.pc) == (isa.STATUS_BUF_RANGE, edit.pc)


def test_prefill_deadlock_and_no_end(tiny41):
    def dead(w):
        i, ins = _find(w, lambda x: x.op == "LD" and x["hreg"] == isa.REG_KVBASE and x["rel_next"])
        ins.fields["rel_next"] = 0
        w[i] = isa.encode(ins)
    r = _run4(_patched(tiny41, 4, dead))
    assert r.status == isa.STATUS_DEADLOCK and "no queue can proceed" in r.detail

    def no_end(w):
        w[-1] = isa.encode(isa.make("SYS", func=isa.SYS_NOP))
    assert _run4(_patched(tiny41, 4, no_end)).status == isa.STATUS_NO_END


def test_prefill_random_corruption_never_hangs(tiny41):
    rng = np.random.default_rng(9)
    seen = set()
    for _ in range(30):
        words = isa.from_bytes(tiny41.prefill[2])
        for _ in range(3):
            i = int(rng.integers(0, len(words)))
            words[i] ^= 1 << int(rng.integers(0, 128))
        b = Bundle(manifest=tiny41.manifest, program=tiny41.program, hbm_image=tiny41.hbm_image,
                   prefill={2: isa.to_bytes(words)})
        g = Golden(b)
        g.stage_tokens(TOKS[:2])
        with np.errstate(all="ignore"):
            r = g.run(0, 0, program="prefill_2")
        assert r.status in isa.STATUS_NAMES
        seen.add(r.status)
    assert isa.STATUS_ILLEGAL in seen


def test_prefill_token_errors(tiny41, ci):
    g = Golden(tiny41)
    with pytest.raises(SimError, match=r"^token id 256 out of range \(vocab size 256\)$"):
        g.prefill(0, [1, 256])
    assert g.buckets == [2, 4, 8, 16]
    with pytest.raises(SimError, match=r"^17 prefill tokens exceed the staging region"):
        g.stage_tokens([1] * 17)
    with pytest.raises(SimError, match=r"^bundle has no program 'prefill_3' \(it has decode, prefill_2, "
                                       r"prefill_4, prefill_8, prefill_16, prefill_kv_2, prefill_kv_4, "
                                       r"prefill_kv_8, prefill_kv_16, prefill_last_2, prefill_last_4, "
                                       r"prefill_last_8, prefill_last_16\)$"):
        g.run(0, 0, program="prefill_3")
    with pytest.raises(SimError, match=r"^bundle has no program 'prefill_kv_x'"):
        g.run(0, 0, program="prefill_kv_x")


def test_backend_context_limits_buckets(tmp_path):
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q8_0", seed=4))
    cfg = load_config("ci")
    b = compile_model(m, cfg, context=20)
    assert b.manifest["prefill"]["buckets"] == [2, 4, 8]
    toks = [int(t) for t in np.random.default_rng(1).integers(0, 256, 20)]
    g, want = decode_run(b, toks)
    dev = GoldenDevice(m, cfg, bundle=b)
    dev.forward(toks[:3])                              # 2 + 1
    got = dev.forward(toks[3:15])                      # 8 + 4
    assert np.array_equal(_bits(got), _bits(want[3:15]))
    # 6 tokens, 5 positions left: 4 + 1 run, then the context is full
    with pytest.raises(BackendError, match=r"^context overflow: position 20 >= compiled context 20$"):
        dev.forward(toks[15:] + [1])
    assert dev.prefill_runs == {2: 1, 8: 1, 4: 2} and dev.steps == 2
    assert np.array_equal(_kv(dev.golden), _kv(g))
    dev.reset()
    with pytest.raises(BackendError, match=r"^token id 300 out of range \(vocab size 256\)$"):
        dev.forward([1, 300])


def test_split_buckets():
    assert split_buckets(23, [2, 4, 8]) == [8, 8, 4, 2, 1]
    assert split_buckets(7, []) == [1] * 7
    assert split_buckets(0, [2]) == []
    assert split_buckets(3, [2]) == [2, 1]


# ---- the golden model's fused products --------------------------------------------------

@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_matmat_equals_matvec(qtype):
    from llmfab.compiler import quant, sparse
    rng = np.random.default_rng(5)
    rows, cols = 200, 160
    raw = quant.quantize_rows(qtype, (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32))
    mats = [pack_matrix(qtype, raw)]
    for sp in ("2:4", "8:16"):
        mats.append(pack_matrix(qtype, raw, sparse.prune(qtype, raw, sp)))
    for W in mats:
        for T, scale in ((1, 1.0), (3, 1.0), (7, 1e-30), (2, 1e-35)):
            xs = (rng.standard_normal((T, cols)) * scale).astype(np.float32)
            xs[0, :32] = 0                        # an all-zero block
            acts = [N.quantize_act(x) for x in xs]
            act = tuple(np.stack([a[i] for a in acts]) for i in range(3))
            want = np.stack([matvec(W, None, act=a) for a in acts])
            assert np.array_equal(_bits(matmat(W, act)), _bits(want))


def test_fast_plan_equals_instruction_by_instruction(tiny41):
    """The fused plan leaves exactly the on-chip and HBM bytes of executing every instruction
    (except the weight buffer: the fused products read their weights from HBM, so the
    weight loads are skipped)."""
    fast, slow = Golden(tiny41), Golden(tiny41, fast=False)
    wb = tiny41.manifest["onchip"]["weight"][0]
    for chunks in ([2, 1, 4], [8, 1]):
        pos = 0
        for T in chunks:
            for g in (fast, slow):
                if T == 1:
                    assert g.run(pos, TOKS[pos]).status == isa.STATUS_OK
                else:
                    assert g.prefill(pos, TOKS[pos:pos + T]).status == isa.STATUS_OK
            assert np.array_equal(fast.mem[:wb], slow.mem[:wb]), (chunks, T)
            assert np.array_equal(fast.hbm, slow.hbm), (chunks, T)
            pos += T
        fast.hbm[:] = slow.hbm[:] = Golden(tiny41).hbm
    plan = fast.program("prefill_8").plan
    kinds = {type(s) for s in plan}
    assert {MvRun, MvStore, MvScatter} <= kinds
    # the fusion really shortens the plan: fewer row writes than MM tiles (the last tiles of
    # the attention output, FFN up and FFN down projections, token by token, keep one row
    # write each);
    # the scatters of a matrix's tiles merge into one (QKV, attention output, FFN down), except
    # the FFN's gate and up tiles, which alternate with the SiLU-multiplies of the tile before:
    # one each per tile but the up projection's last, token by token. No logits ST left; the
    # only COPYs left are those of the last tiles token by token (attention output, up,
    # down), one row block of one token each
    instrs = fast.program("prefill_8").instrs
    n_layers = int(tiny41.manifest["model"]["n_layers"])
    # MM tiles, and the first and last tiles token by token (8 MVs each), which the plan fuses
    # with the matrix's other tiles (Planner._token_groups)
    n_mm = sum(i.op == "MM" for i in instrs) + sum(i.op == "MV" for i in instrs) // 8
    assert not any(isinstance(s, Exec) and instrs[s.pc].op in ("MV", "MM") for s in plan)
    assert all(s.ntok == 8 for s in plan if isinstance(s, MvRun))
    assert sum(isinstance(s, (MvWrite, MvScatter, MvStore)) for s in plan) < n_mm * 2 // 3 + 3 * n_layers
    n_silu = sum(i.op == "MISC" and i["func"] == isa.MISC_FUNCS["SILU_MUL"] for i in instrs)
    ffn_tiles = n_silu // (n_layers * 8)
    assert ffn_tiles > 1
    assert sum(isinstance(s, MvScatter) for s in plan) == n_layers * (3 + 2 * ffn_tiles - 1)
    left = [instrs[s.pc] for s in plan if isinstance(s, Exec)]
    copies = [i for i in left if i.op == "MISC" and i["func"] == isa.MISC_FUNCS["COPY"]]
    assert len(copies) == 3 * n_layers * 8 and all(i["aux"] == 1 for i in copies)
    assert not any(i.op == "ST" and i["func"] == isa.ST_F32 for i in left)


def test_isa_attn_and_copy_operands():
    f = isa.attn_fields(3, 64, t=5, cached=True)
    assert f == {"n": 3 | 5 << 8, "aux": 64 | 0x8000}
    assert isa.attn_operands(f) == (3, 5, 64, True)
    assert isa.attn_fields(9, 64) == {"n": 9, "aux": 64}          # decode: the old encoding
    assert isa.attn_operands({"n": 9, "aux": 64}) == (9, 0, 64, False)
    for bad in ((0, 64, 0), (256, 64, 0), (1, 64, 256), (1, 0, 0), (1, 1 << 15, 0)):
        with pytest.raises(Exception, match="ATTN operands out of range"):
            isa.attn_fields(bad[0], bad[1], bad[2])
    assert isa.copy_operands({"n": 10, "aux": 0, "b": 99}) == (1, 10, 10)
    assert isa.copy_operands({"n": 10, "aux": 4, "b": 99}) == (4, 10, 99)
    w = isa.decode(isa.encode(isa.make("MISC", func=isa.MISC_FUNCS["ATTN"], **f)))
    assert isa.misc_operand_error(w) is None
    w.fields["aux"] = 63 | isa.ATTN_CACHED
    assert isa.misc_operand_error(w) == "ATTN head dim 63"
    assert isa.misc_operand_error(isa.make("MISC", func=isa.MISC_FUNCS["QUANT"], n=33)) == \
        "QUANT n=33 is not a multiple of 32"
    assert isa.misc_operand_error(isa.make("LD")) is None


def test_stores_into_weights_are_seen(tiny41):
    """A (corrupted) prefill program that stores into weights later loads read: the fused plan
    falls back to executing instructions, and the decode program's plan re-reads HBM."""
    def edit(w):
        i, ins = _find(w, lambda x: x.op == "ST" and x["func"] == isa.ST_F16)
        j, ld = _find(w, lambda x: x.op == "LD" and x["hreg"] == isa.REG_WBASE and x["len"] >= 64,
                      last=True)
        assert j > i
        ins.fields.update(hreg=isa.REG_WBASE, hoff=ld["hoff"], ireg=0)
        w[i] = isa.encode(ins)
    b = _patched(tiny41, 2, edit)
    fast, slow = Golden(b), Golden(b, fast=False)
    for g in (fast, slow):
        assert g.run(0, 5).status == isa.STATUS_OK          # decode plan built from the image
        assert g.prefill(1, TOKS[:2]).status == isa.STATUS_OK
        assert g.run(3, 7).status == isa.STATUS_OK          # reads the overwritten weights
    assert np.array_equal(fast.hbm, slow.hbm)
    assert np.array_equal(_bits(fast.logits()), _bits(slow.logits()))
    p = fast.program("prefill_2")
    fast._build_plan(p)
    assert all(isinstance(s, (Load, Exec)) for s in p.plan)
    clean = Golden(tiny41)
    clean.run(0, 5)
    clean.prefill(1, TOKS[:2])
    clean.run(3, 7)
    assert not np.array_equal(clean.logits(), fast.logits())
    assert Golden(tiny41)._packed is clean._packed            # the clean cache is still shared


def test_compile_cli_reports_prefill(tmp_path, capsys):
    import json

    from llmfab.host.cli import main
    model = tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_0", seed=4)
    out = tmp_path / "bundle"
    assert main(["compile", "--model", model, "--config", "ci", "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    b = read_bundle(str(out))
    assert rep["prefill_buckets"] == [2, 4, 8]
    assert rep["prefill_program_bytes"] == {str(t): len(p) for t, p in b.prefill.items()}


def test_rtl_prefill_benchmark_plans_prompts_as_generate(tiny):
    """benchmarks/rtl_prefill.py measures a prompt as ``generate`` runs it: its runs, each
    KV-only but the last, which is last-logits (or decode, a single token; ``--all-logits``:
    every run with every token's logits), run one at a time from the state before (as its
    shards do) leave the cache and last logits ``forward_last`` does."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from rtl_prefill import _macs_of, _one_run, _plan, program_macs
    m, b, cfg = tiny
    buckets = b.manifest["prefill"]["buckets"]
    runs = split_buckets(15, buckets)
    plan = _plan(b, 15, False)
    assert [(T, lg) for _, _, T, lg in plan] == [(T, i == len(runs) - 1) for i, T in enumerate(runs)]
    assert [p for _, p, _, _ in plan] == [sum(runs[:i]) for i in range(len(runs))]
    assert all(lg is True for *_, lg in _plan(b, 15, True))
    assert [(T, lg) for _, _, T, lg in _plan(b, 14, False)] == [(8, False), (4, False), (2, "last")]
    macs = _macs_of(b)
    assert macs[(1, True)] == program_macs(b.program)
    assert all(macs[(T, False)] < macs[(T, "last")] < macs[(T, True)] for T in buckets)
    one, ref = GoldenDevice(m, cfg, bundle=b), GoldenDevice(m, cfg, bundle=b)
    for _, pos, T, logits in plan:
        out = _one_run(one, pos, TOKS[pos:pos + T], logits)
        assert (out is None) == (not logits)
    want = ref.forward_last(TOKS[:15])
    assert np.array_equal(_bits(out[-1:]), _bits(want)) and np.array_equal(_kv(one.golden), _kv(ref.golden))


def test_rtl_prefill_benchmark_runs_shared_runs_once(tiny):
    """The benchmark's shards simulate a run that several prompts share (same start, tokens and
    kind: the prompts are prefixes of one text) once: the 8-token prompt's three KV-only runs are
    the 32-token prompt's first three; its last run (with logits) is its own. Here: B + 2 and
    2B + 2 tokens (B the largest bucket) share their first run (B tokens, KV-only)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from rtl_prefill import _distinct_runs, _plan
    _, b, _ = tiny
    B = max(b.manifest["prefill"]["buckets"])
    plans = {n: _plan(b, n, False) for n in (B + 2, 2 * B + 2)}
    runs = _distinct_runs(plans)
    assert sorted(m for ms in runs.values() for m in ms) == sorted(
        (n, i) for n, plan in plans.items() for i, *_ in plan)
    assert {k: ms for k, ms in runs.items() if len(ms) > 1} == {(0, B, False): [(B + 2, 0), (2 * B + 2, 0)]}
    assert len(runs) == len(plans[B + 2]) + len(plans[2 * B + 2]) - 1


def test_rtl_prefill_benchmark_attention_override():
    """``--attention chains`` measures a configuration with its attention moved to the chains
    (``u280-slice``, two slices of ``u280``, whose attention runs there): its own hash, so its
    own results key and Verilator build; the rows and the table say where attention ran."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from rtl_prefill import _key, _prompt_row, table, with_lanes
    base = load_config("u280-slice")
    sfu, chains = with_lanes(base, 1), with_lanes(base, 1, "chains")
    assert (sfu.attention, chains.attention) == ("sfu", "chains")
    assert with_lanes(load_config("ci-chains"), 2).attention == "chains"
    assert _key(sfu, 8, False) != _key(chains, 8, False)
    assert chains.to_dict() == dict(sfu.to_dict(), attention="chains")
    row = _prompt_row(chains, 8, [(2, False)] * 3 + [(2, True)], 1000, 800, 192000,
                      logits_bit_exact=True, kv_bit_exact=True)
    assert (row["attention"], row["mac_utilization"], row["mac_utilization_mv_busy"]) == ("chains", 0.75, 0.938)
    assert table([row]).splitlines()[2] == ("| u280-slice | chains | 1 | 8 | 4 x 2 (3 KV-only) | 1,000 | 125 | "
                                            "1,800,000.0 | 0.0 ms | 0.750 / 0.938 | yes |")
    row = _prompt_row(chains, 8, [(2, False)] * 3 + [(2, "last")], 1000, 800, 192000,
                      logits_bit_exact=True, kv_bit_exact=True)
    assert table([row]).splitlines()[2].startswith("| u280-slice | chains | 1 | 8 | 4 x 2 (3 KV-only, 1 last-logits) |")


def test_rtl_prefill_results_of_another_program_are_not_reused(tiny, tmp_path, capsys):
    """A results line of a prompt's last run recorded with another program (every token's
    logits, as before the last-logits programs; or another compiler's program of the same
    kind: its ``program`` hash) does not stand for the last-logits run: the prompt's row
    waits for it."""
    import json
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from rtl_prefill import _key, _plan, _program_id, merge
    m, b, cfg = tiny
    plan = _plan(b, 14, False)
    res = tmp_path / "r.jsonl"

    def write(last, program=None):
        with open(res, "w") as f:
            for i, pos, T, logits in plan:
                kind = last if i == len(plan) - 1 else logits
                prog = program if program is not None and i == len(plan) - 1 else _program_id(b, T, kind)
                f.write(json.dumps({"key": _key(cfg, 14, False), "run": i, "pos": pos, "tokens": T,
                                    "logits": kind, "program": prog, "cycles": 100,
                                    "busy_mv": 90, "logits_bit_exact": True, "kv_bit_exact": True,
                                    "wall_seconds": 1.0}) + "\n")
    write(True)
    assert merge(cfg, m, [14], str(res)) == []
    assert f"1 of {len(plan)} runs missing ({len(plan) - 1})" in capsys.readouterr().err
    write("last", program="0" * 16)
    assert merge(cfg, m, [14], str(res)) == []
    assert f"1 of {len(plan)} runs missing ({len(plan) - 1})" in capsys.readouterr().err
    write("last")
    [row] = merge(cfg, m, [14], str(res))
    assert row["cycles"] == 100 * len(plan) and row["last_logits_runs"] == 1


def test_first_tile_token_by_token_only_with_one_lane(tmp_path):
    """A matrix's first tile (and the attention output's, FFN up's and FFN down's last) goes
    token by token (T MVs) with one token lane only; with two, every tile is an MM of all T
    tokens (the lane groups' MMs would reload the vectors), and both programs leave the same
    KV cache and logits, bit for bit. With a 4 KiB weight buffer every matrix of the model has
    several tiles: seven such tiles a layer."""
    m = load_model(tinymodel.write_tiny_gguf(tmp_path / "t.gguf", "q4_0", seed=3))
    one = compile_model(m, _write_config(tmp_path, **{"buffers.weight_kib": 4}))
    two = compile_model(m, _write_config(tmp_path, **{"buffers.weight_kib": 4, "chain.tokens": 2}))
    for T in (4, 8):
        mv1 = [i for i in _instrs(one.prefill[T]) if i.op == "MV"]
        ins2 = _instrs(two.prefill[T])
        assert len(mv1) == 7 * m.desc.n_layers * T, T
        assert not any(i.op == "MV" for i in ins2) and all(i["ntok"] == T for i in ins2 if i.op == "MM"), T
        a, b = Golden(one, fast=False), Golden(two, fast=False)
        assert a.prefill(0, TOKS[:T]).status == b.prefill(0, TOKS[:T]).status == isa.STATUS_OK
        assert np.array_equal(_bits(a.logits()), _bits(b.logits())) and np.array_equal(_kv(a), _kv(b)), T


def test_prefill_overlap_order(tiny41):
    """The prefill programs' MISC work beside the MM work (docs/isa.md, "Prefill programs"):
    staged MM tiles take the two stages in turn, each COPY scatters the stage its MM wrote
    while the next MM writes the other; the FFN's SiLU-multiplies go tile by tile and token
    by token between the gate and up MMs, not once over the whole vector after the last tile.
    A tile token by token (one token lane: T MVs, the first into the stage) counts as one
    staged tile; the last tiles of the attention output, FFN up and FFN down projections
    scatter token by token (a COPY of one token's rows each, after the tile's last MV, each
    before that token's residual add or, up, its SiLU-multiply). A staged tile's COPY comes
    right after its MM or after the next MM/MV word (the next tile's, into the other stage),
    never after another word."""
    ffn = int(tiny41.manifest["model"]["ffn_dim"])
    copy_f, silu_f = isa.MISC_FUNCS["COPY"], isa.MISC_FUNCS["SILU_MUL"]
    add_f = isa.MISC_FUNCS["ADD"]
    deferred = 0
    for T, prog in tiny41.prefill.items():
        ins = _instrs(prog)
        copies = [i for i in ins if i.op == "MISC" and i["func"] == copy_f]
        stages = {c["a"] for c in copies if c["aux"] == T}
        staged = [i for i in ins if i.op in ("MM", "MV") and i["dst"] in stages]
        assert len({i["dst"] for i in staged}) == 2, T
        tiles = [i for i, j in zip(staged, [None] + staged) if j is None or i["dst"] != j["dst"] or i.op == "MM"]
        assert all(x["dst"] != y["dst"] for x, y in zip(tiles, tiles[1:])), T
        last_mm, by_token, tok = None, None, 0
        for k, i in enumerate(ins):
            if i.op == "MM" or i.op == "MV" and i["dst"] in stages:
                last_mm = i
            elif i.op == "MISC" and i["func"] == copy_f and i["aux"] == T:
                # the stage of the MM just before it, or of the one before that (the COPY
                # after the next tile's MM, which wrote the other stage)
                if i["a"] != last_mm["dst"]:
                    # right after the next tile's MM; the MV/MM word before that one is its own
                    # (or its last token's MV)
                    prev = next(j for j in reversed(ins[:k - 1]) if j.op in ("MV", "MM"))
                    assert ins[k - 1] is last_mm and i["a"] <= prev["dst"] < i["a"] + T * i["n"] * 4, T
                    deferred += 1
            elif i.op == "MISC" and i["func"] == copy_f:
                if i["a"] in stages:                   # token 0: right after the tile's last MV
                    by_token, tok = i, 0                # (up: and the tile before's SiLU-multiplies)
                    prev = next(j for j in reversed(ins[:k]) if j.op in ("MV", "MM", "MISC")
                                and not (j.op == "MISC" and j["func"] == silu_f))
                    assert prev.op == "MV" and prev["dst"] == i["a"] + (T - 1) * i["n"] * 4, T
                tok += 1
                assert i["aux"] == 1 and i["a"] == by_token["a"] + (tok - 1) * i["n"] * 4, T
                assert ins[k + 1].op == "MISC" and ins[k + 1]["func"] in (add_f, silu_f), T
        silu = [k for k, i in enumerate(ins) if i.op == "MISC" and i["func"] == silu_f]
        assert all(ins[k]["n"] < ffn for k in silu), T        # a tile's rows of one token
        # MMs (the next gate and up tiles) between a layer's first and last SiLU-multiply
        assert any(i.op == "MM" for i in ins[silu[0]:silu[T * 2]]), T
    assert deferred, "no staged tile's COPY after the next tile's MM"
