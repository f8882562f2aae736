"""hw/sfu_exec.py in the whole accelerator (tiny configuration) against the golden model.

The ``tiny`` accelerator as the rtl backend builds it (the default ``ExecUnit``: MISC
QUANT/RMSNORM/ROPE/SILU_MUL/EMBED/ATTN -> :class:`SfuExec`, NOP/COPY/ADD/MUL ->
:class:`MiscExec`, MV/MM -> MvExec), so its Verilator build is the one the other tiny
tests share; one simulation for every run: each program loads the
whole on-chip space from HBM (random operands, the GB constants), runs
random MISC operations, stores the whole on-chip space back; HBM after the
run must be the golden model's, byte for byte.
"""

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.compiler import isa
from llmfab.compiler.bundle import Bundle
from llmfab.sim.golden import Golden

F = isa.MISC_FUNCS
WATCHDOG = 2_000_000


def _w(op, **f):
    return isa.encode(isa.make(op, **f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tinymodel import write_tiny_gguf

    from llmfab.compiler.compile import compile_model
    from llmfab.compiler.model import load_model
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(path, "q4_1")
    config = load_config("tiny")
    return config, compile_model(load_model(path), config)


@pytest.fixture(scope="module")
def acc(tiny):
    from llmfab.sim.rtl.harness import RtlAccelerator
    config, bundle = tiny
    with RtlAccelerator(config, bundle, timeout_seconds=1800) as a:
        yield a


def with_program(bundle, words) -> Bundle:
    return Bundle(manifest=bundle.manifest, program=isa.to_bytes(words), hbm_image=bundle.hbm_image)


def floats(rng, n, lo=100, hi=150):
    """Normal binary32 values (exponents lo..hi), random signs, some zeros."""
    e = rng.integers(lo, hi, n).astype(np.uint32)
    frac = rng.integers(0, 1 << 23, n).astype(np.uint32)
    sign = rng.integers(0, 2, n).astype(np.uint32) << 31
    v = (sign | (e << 23) | frac).view(np.float32)
    v[rng.random(n) < 0.02] = 0
    return v


def f16_finite(rng, n):
    """Finite binary16 bit patterns (subnormals included), as uint16."""
    h = rng.integers(0, 1 << 16, n).astype(np.uint16)
    bad = (h & 0x7C00) == 0x7C00
    h[bad] &= 0xBFFF
    return h


class Layout:
    def __init__(self, man):
        # the on-chip bytes a test program loads from and stores to the KV region: all of the
        # on-chip memory, or as much as the HBM past the KV base holds
        room = int(man["hbm_size"]) - int(man["memory_map"]["kv"][0])
        self.chip = min(int(man["onchip"]["size"]), room) & ~63
        self.gb = int(man["onchip"]["global"][0])
        self.z = self.chip // 3 & ~63           # zones: a [0, z), b [z, 2z), dst [2z, chip)
        self.context = int(man["onchip"]["context"])
        self.pos = 1


def put_f32(img, addr, v):
    img[addr:addr + 4 * v.size] = np.asarray(v, np.float32).view(np.uint8)


def random_op(rng, img, L, name, sizes=None):
    """One MISC op of ``name`` with random operands; fills its inputs into ``img``."""
    z = L.z
    unal = rng.random() < 0.4

    def place(lo, hi, nbytes, align=4):
        a = int(rng.integers(lo, hi - nbytes))
        return a if unal else a & ~(align - 1)
    if name == "QUANT":
        n = 32 * int(rng.choice(sizes or [1, 2, 3, 5, 18]))
        a = place(0, z, 4 * n)
        v = floats(rng, n, 60, 190)
        blocks = v.reshape(-1, 32)
        for blk in blocks:
            r = rng.random()
            if r < 0.1:
                blk[:] = 0
            elif r < 0.2:
                blk[:] = floats(rng, 32, 1, 8)        # tiny amax: d flushes -> zero block
            elif r < 0.3:
                blk[:] = np.float32(rng.integers(-3, 4, 32)) * np.float32(0.5)   # ties
        put_f32(img, a, v)
        dst = place(2 * z, L.chip, 40 * n // 32)
        return dict(func=F["QUANT"], dst=dst, a=a, n=n)
    if name == "RMSNORM":
        n = int(rng.choice(sizes or [1, 2, 7, 31, 64, 100, 576]))
        a, b = place(0, z, 4 * n), place(z, 2 * z, 4 * n)
        x = floats(rng, n, 90, 160)
        if rng.random() < 0.1:
            x[:] = 0
        put_f32(img, a, x)
        put_f32(img, b, floats(rng, n, 110, 135))
        return dict(func=F["RMSNORM"], dst=place(2 * z, L.chip, 4 * n), a=a, b=b, n=n)
    if name == "SILU_MUL":
        n = int(rng.choice(sizes or [1, 3, 16, 17, 50, 300]))
        a, b = place(0, z, 4 * n), place(z, 2 * z, 4 * n)
        x = floats(rng, n, 100, 140)
        x[rng.random(n) < 0.1] *= np.float32(1e-3)
        x[:8] = np.float32([100.0, -100.0, 88.0, -88.0, -200.0, 0.0, -0.0, 1.0])[:min(8, n)]
        put_f32(img, a, x)
        put_f32(img, b, floats(rng, n, 110, 140))
        return dict(func=F["SILU_MUL"], dst=place(2 * z, L.chip, 4 * n), a=a, b=b, n=n)
    if name == "ROPE":
        hd = int(rng.choice([2, 4, 8, 16, 64]))
        nh = int(rng.choice(sizes or [1, 2, 3, 5]))
        a, b = place(0, z, 4 * nh * hd), place(z, 2 * z, 4 * hd)
        put_f32(img, a, floats(rng, nh * hd, 100, 140))
        ang = rng.random(hd // 2) * 100
        tab = np.concatenate([np.cos(ang), np.sin(ang)]).astype(np.float32)
        put_f32(img, b, tab)
        return dict(func=F["ROPE"], dst=place(2 * z, L.chip, 4 * nh * hd), a=a, b=b, n=nh,
                    aux=hd)
    if name == "EMBED":
        fmt = int(rng.integers(0, 3))
        bs = {0: 18, 1: 20, 2: 34}[fmt]
        nb = int(rng.choice(sizes or [1, 2, 5, 18]))
        a = int(rng.integers(0, z - nb * bs))
        raw = rng.integers(0, 256, nb * bs).astype(np.uint8).reshape(nb, bs)
        raw[:, 0:2] = f16_finite(rng, nb).view(np.uint8).reshape(nb, 2)
        if fmt == 1:
            raw[:, 2:4] = f16_finite(rng, nb).view(np.uint8).reshape(nb, 2)
        img[a:a + raw.size] = raw.reshape(-1)
        return dict(func=F["EMBED"], dst=place(2 * z, L.chip, 128 * nb), a=a, n=32 * nb, aux=fmt)
    if name == "COPY":
        n = int(rng.choice([1, 5, 16, 33]))
        reps = int(rng.choice([0, 1, 2, 3, 4]))
        stride = n + int(rng.integers(0, 5)) if reps > 1 else 0
        r = max(reps, 1)
        a = place(0, z, 4 * n * r)
        put_f32(img, a, floats(rng, n * r))
        span = 4 * ((r - 1) * stride + n) if r > 1 else 4 * n
        return dict(func=F["COPY"], dst=place(2 * z, L.chip, span), a=a, b=stride, n=n, aux=reps)
    if name == "ATTN":
        ctx = int(L.context)
        hd = int(rng.choice([2, 4, 8, 16]))
        nh = int(rng.choice([1, 2, 3]))
        t = int(rng.choice([0, 0, 1, 3]))
        cached = int(rng.random() < 0.3)
        reg = int(rng.choice([isa.REG_ZERO, isa.REG_POS, isa.REG_POS]))
        S = (L.pos if reg == isa.REG_POS else 0) + t
        rows = S + 1
        b = int(rng.integers(0, 4800)) & ~1
        kv = (rng.standard_normal(ctx * hd + rows * hd) * 2).astype(np.float16)
        kv[rng.random(kv.size) < 0.02] = np.float16(6e-6)        # binary16 subnormals
        img[b:b + 2 * kv.size] = kv.view(np.uint8)
        a = place(L.z, 2 * L.z - 64, 4 * (nh + 2) * hd)
        q = (rng.standard_normal((nh + 2) * hd) * 3).astype(np.float32)
        if rng.random() < 0.2:
            q[:hd] *= np.float32(300)                           # a peaked softmax
        put_f32(img, a, q)
        return dict(func=F["ATTN"], dst=place(2 * z, L.chip, 4 * nh * hd), a=a, b=b,
                    n=nh | t << 8, aux=hd | cached << 15, reg=reg)
    if name in ("ADD", "MUL"):
        n = int(rng.choice([1, 16, 33]))
        a, b = place(0, z, 4 * n), place(z, 2 * z, 4 * n)
        put_f32(img, a, floats(rng, n, 110, 140))
        put_f32(img, b, floats(rng, n, 110, 140))
        return dict(func=F[name], dst=place(2 * z, L.chip, 4 * n), a=a, b=b, n=n)
    raise ValueError(name)


def _nan_free(gold_chip, ops):
    """No NaN in the float results left in the final image (NaN payloads are not compared:
    the hardware makes canonical NaNs, numpy propagates payloads)."""
    for o in ops:
        name = isa.MISC_NAMES[o["func"]]
        if name == "QUANT":
            continue
        nw = o["n"] * (o.get("aux") or 1) if name in ("ROPE", "COPY") else o["n"]
        if name == "ATTN":
            nw = (o["n"] & 255) * (o["aux"] & 0x7FFF)
        if name == "COPY" and (o.get("aux") or 0) > 1:
            nw = (o["aux"] - 1) * o["b"] + o["n"]
        v = gold_chip[o["dst"]:o["dst"] + 4 * nw].copy().view(np.float32)
        if np.isnan(v).any():
            return False
    return True


def run_ops(bundle, acc, rng, ops_fn, inv_n=1.0 / 576, pos=1):
    """Image + program of ops (regenerated until the golden results hold no NaN) ->
    (golden on-chip image, RTL on-chip image, RTL run, ops)."""
    man = bundle.manifest
    L = Layout(man)
    L.pos = pos
    kv0 = int(man["memory_map"]["kv"][0])
    token = 2
    for attempt in range(50):
        img = floats(rng, L.chip // 4).view(np.uint8).copy()
        consts = np.zeros(16, np.float32)
        consts[:3] = [1e-5, 0.125, inv_n]
        ops = ops_fn(img, L)
        assert ops
        img[L.gb:L.gb + 64] = consts.view(np.uint8)      # operands placed over the constants
        words = [_w("LD", buf=0, hreg=isa.REG_KVBASE, len=L.chip, rel_next=1)]
        ops[0]["wait_prev"] = 1
        ops[-1]["rel_next"] = 1
        words += [_w("MISC", **o) for o in ops]
        words.append(_w("ST", wait_prev=1, buf=0, hreg=isa.REG_KVBASE, len=L.chip))
        words.append(_w("SYS", func=isa.SYS_END))
        g = Golden(with_program(bundle, words), fast=False)
        assert g.check(pos, token) is None
        g.hbm[kv0:kv0 + img.size] = img
        with np.errstate(all="ignore"):
            assert g.run(pos, token).status == 0
        gold = g.hbm[kv0:kv0 + L.chip]
        if _nan_free(gold, ops):
            break
    else:
        raise AssertionError("no NaN-free program in 50 attempts")
    acc.reload_hbm()
    acc.write_hbm(kv0, img)
    acc.load_program(isa.to_bytes(words))
    r = acc.run(pos, token, timeout_cycles=WATCHDOG)
    assert not r.timed_out, "watchdog"
    assert r.status == 0, (r.status, r.pc)
    return gold, acc.read_hbm(kv0, L.chip), r, ops


def _describe(ops, L, gold, got):
    diff = np.flatnonzero(gold != got)
    where = []
    for o in ops:
        name = isa.MISC_NAMES[o["func"]]
        where.append((name, o["dst"], o.get("n")))
    return f"{diff.size} bytes differ, first at {(diff[:8] + 0).tolist()}; ops {where}"


@pytest.mark.parametrize("name", ["QUANT", "RMSNORM", "SILU_MUL", "ROPE", "EMBED", "COPY",
                                  "ATTN"])
def test_sfu_exec_op_matches_golden(tiny, acc, name):
    """Random instances of one op (random lengths, alignments, edge values) per program,
    three programs: HBM is the golden model's, bit for bit."""
    config, bundle = tiny
    rng = np.random.default_rng(sum(name.encode()))
    for trial in range(3):
        pos = min(int(rng.choice([0, 1, 7, 40, 100])), int(bundle.manifest["onchip"]["context"]) - 8)
        gold, got, r, ops = run_ops(bundle, acc, rng, lambda img, L: [
            random_op(rng, img, L, name) for _ in range(int(rng.integers(3, 7)))], pos=pos)
        assert np.array_equal(gold, got), f"{name} trial {trial}: " + _describe(ops, None, gold, got)


def test_sfu_exec_mixed_with_misc_exec(tiny, acc):
    """Every op of both units interleaved in one program (the router keeps program order)."""
    config, bundle = tiny
    rng = np.random.default_rng(5)
    names = ["QUANT", "RMSNORM", "SILU_MUL", "ROPE", "EMBED", "COPY", "ATTN", "ADD", "MUL"]
    for trial in range(2):
        gold, got, r, ops = run_ops(bundle, acc, rng, lambda img, L: [
            random_op(rng, img, L, names[int(rng.integers(0, len(names)))]) for _ in range(10)])
        assert np.array_equal(gold, got), f"trial {trial}: " + _describe(ops, None, gold, got)


def test_sfu_exec_cycles(tiny, acc, capsys):
    """Compute-queue busy cycles of single ops at SmolLM2 sizes (printed; bit-exact too)."""
    config, bundle = tiny
    rng = np.random.default_rng(9)
    rows = []
    cases = [("RMSNORM", [576]), ("SILU_MUL", None), ("QUANT", [18]), ("QUANT", [48]),
             ("ROPE", None), ("EMBED", [18])]
    for name, sizes in cases:
        def one(img, L, name=name, sizes=sizes):
            if name == "SILU_MUL":
                # n = 1536: a and b do not fit the zones of the tiny layout; use fixed places
                n = 1536
                put_f32(img, 0, floats(rng, n, 100, 140))
                put_f32(img, L.gb + 64, floats(rng, n, 110, 140))
                return [dict(func=F["SILU_MUL"], dst=L.chip - 4 * n, a=0, b=L.gb + 64, n=n)]
            if name == "ROPE":
                a, b = 0, L.z
                put_f32(img, a, floats(rng, 3 * 64, 100, 140))
                ang = rng.random(32) * 100
                put_f32(img, b, np.concatenate([np.cos(ang), np.sin(ang)]).astype(np.float32))
                return [dict(func=F["ROPE"], dst=2 * L.z, a=a, b=b, n=3, aux=64)]
            return [random_op(rng, img, L, name, sizes)]
        gold, got, r, ops = run_ops(bundle, acc, rng, one)
        assert np.array_equal(gold, got), f"{name}: " + _describe(ops, None, gold, got)
        o = ops[0]
        rows.append((name, o.get("n"), o.get("aux", 0), r.counters["busy_cmp"]))
    ctx = int(bundle.manifest["onchip"]["context"])
    for pos in (1, 50, 100):
        if pos + 1 > ctx or 2 * 64 * (ctx + pos + 1) + 64 + 8 * 64 * 4 > Layout(bundle.manifest).chip:
            continue

        def attn(img, L, pos=pos):
            kv = (rng.standard_normal(ctx * 64 + (pos + 1) * 64) * 2).astype(np.float16)
            img[0:2 * kv.size] = kv.view(np.uint8)
            a = 2 * kv.size + 64
            put_f32(img, a, (rng.standard_normal(5 * 64) * 3).astype(np.float32))
            return [dict(func=F["ATTN"], dst=a + 5 * 64 * 4, a=a, b=0, n=3, aux=64,
                         reg=isa.REG_POS)]
        gold, got, r, ops = run_ops(bundle, acc, rng, attn, pos=pos)
        assert np.array_equal(gold, got), f"ATTN pos {pos}: " + _describe(ops, None, gold, got)
        rows.append((f"ATTN@{pos}", 3, 64, r.counters["busy_cmp"]))
    with capsys.disabled():
        print("\nSfuExec cycles per op (tiny, D=16; busy_cmp):")
        for name, n, aux, cyc in rows:
            print(f"  {name:9s} n={n:5d} aux={aux:3d}: {cyc} cycles")


def test_sfu_exec_rope_table_cache(tiny, acc):
    """SfuExec keeps the last ROPE table: a ROPE with the same ``b`` and head dim skips
    reading it (``hd`` cycles less), and re-reads it after a write to one of its lines by
    the execution unit (an ADD over it) or the load engine (an LD over it), or for another
    head dim. Every result bit for bit the golden model's (which reads the table each time)."""
    config, bundle = tiny
    man = bundle.manifest
    L = Layout(man)
    kv0 = int(man["memory_map"]["kv"][0])
    rng = np.random.default_rng(31)
    hd = 64
    img = floats(rng, L.chip // 4, 110, 135).view(np.uint8).copy()
    b, b2 = L.z, L.z + 1024                       # the table, and a second one to load over it
    for at in (b, b2):
        ang = rng.random(hd // 2) * 100
        put_f32(img, at, np.concatenate([np.cos(ang), np.sin(ang)]).astype(np.float32))
    consts = np.zeros(16, np.float32)
    consts[:3] = [1e-5, 0.125, 1.0 / 576]
    img[L.gb:L.gb + 64] = consts.view(np.uint8)
    a = 0
    d = 2 * L.z

    def rope(k, n=2, aux=hd, **hdr):
        return _w("MISC", func=F["ROPE"], dst=d + k * 4096, a=a + k * 1024, b=b, n=n, aux=aux, **hdr)

    def program(middle):
        return ([_w("LD", buf=0, hreg=isa.REG_KVBASE, len=L.chip, rel_next=1)] + middle
                + [_w("ST", wait_prev=1, buf=0, hreg=isa.REG_KVBASE, len=L.chip),
                   _w("SYS", func=isa.SYS_END)])

    programs = {
        "one": program([rope(0, wait_prev=1, rel_next=1)]),
        "two": program([rope(0, wait_prev=1), rope(1, rel_next=1)]),
        # the execution unit writes the table's first line: the third ROPE reads it again
        "add": program([rope(0, wait_prev=1), rope(1),
                        _w("MISC", func=F["ADD"], dst=b, a=b, b=b + 4, n=4), rope(2, rel_next=1)]),
        # the load engine writes the second table over it (after the first two ROPEs)
        "ld": program([rope(0, wait_prev=1), rope(1, rel_prev=1),
                       _w("LD", wait_next=1, buf=b, hreg=isa.REG_KVBASE, hoff=b2 // 32, len=4 * hd,
                          rel_next=1),
                       rope(2, wait_prev=1, rel_next=1)]),
        # another head dim over the same b
        "hd": program([rope(0, wait_prev=1), rope(1, aux=32, n=4), rope(2, rel_next=1)]),
        "hd2": program([rope(0, wait_prev=1), rope(1, aux=32, n=4, rel_next=1)]),
    }
    from test_mv_exec import run_both
    busy = {}
    for name, words in programs.items():
        g, r = run_both(acc, bundle, words, img, kv0)
        got = acc.read_hbm(kv0, L.chip)
        assert np.array_equal(g.hbm[kv0:kv0 + L.chip], got), name
        busy[name] = r.counters["busy_cmp"]
    one = busy["one"]
    assert busy["two"] - one < one - hd // 2          # the second ROPE without the table
    assert busy["add"] - busy["two"] >= one - 4        # the third reads it again (+ the ADD)
    assert busy["ld"] - busy["two"] >= one - 4
    assert busy["hd"] - busy["hd2"] >= one - 4
