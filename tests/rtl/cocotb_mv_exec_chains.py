"""cocotb bench of hw/mv_exec.py built with ``chains`` (attention on the chains, docs/isa.md):
MV words with register-extended shapes (``rows + R[rreg]``, ``cols + R[creg]``: the
execution unit's ``rval`` and ``rval2`` beside the word) over the tiled layouts (MV_RT row
tiles, the K cache; MV_BT block tiles, the transposed V cache), results compared bit for bit
with ``sim.numerics_model.matvec`` on ``compiler.isa.operand_rows`` of the on-chip image (the
golden model's MV: block tiles' d as 1.0). The memory model and helpers are tests/rtl/cocotb_mv_exec.py's (same
environment variables); MV_REPORT names the file the cycle figures go to.
"""

import os

import cocotb
import numpy as np
from cocotb.triggers import RisingEdge

from llmfab.compiler import isa
from llmfab.core import formats
from llmfab.sim.golden import _unpack_weights
from llmfab.sim.numerics_model import matvec

from cocotb_mv_exec import A0, D, NP, R0, SB, W0, qvec, snoop, start, weights

Q8 = isa.mv_func("q8_0")
WATCHDOG = 50_000
MODES = [(f, p) for f in ("q4_0", "q4_1", "q8_0") for p in ("dense", "2:4", "8:16", "4:16", "2:16")]


async def execute(dut, word, rval=0, rval2=0, qsrc=None):
    """One word with its register values (ExecInstr: word, pc, rval, rval2); cycles to done."""
    if qsrc is not None:
        await snoop(dut, qsrc // int(os.environ.get("MV_D", "64")))
    dut.instr__payload.value = word | (rval << 160) | (rval2 << 192)
    dut.instr__valid.value = 1
    while True:
        await RisingEdge(dut.clk)
        if int(dut.instr__ready.value):
            break
    dut.instr__valid.value = 0
    n = 0
    while True:
        await RisingEdge(dut.clk)
        n += 1
        if int(dut.done.value):
            return n
        assert n < WATCHDOG, f"no done after {n} cycles: {isa.decode(word)} rval {rval} rval2 {rval2}"


def tiled_image(rng, func, rows, cols):
    """The bytes of a ``rows`` x ``cols`` operand in ``func``'s layout (every tile's rows past
    ``rows`` random blocks too), ``isa.weight_span`` of them."""
    fmt, sp = isa.FMTS[func & 3], isa.SPARSITIES[(func >> 2) & 7]
    nb = cols // 32
    bb = formats.block_bytes(fmt, sp)
    lay = isa.mv_layout(func)
    if lay == "row_tiles":
        nt = -(-rows // isa.TILE_ROWS)
        raw = weights(rng, fmt, sp, nt * isa.TILE_ROWS, cols).reshape(nt * isa.TILE_ROWS, -1)
        img = np.concatenate([isa.slice_rows(raw[i * 32:(i + 1) * 32], NP, SB) for i in range(nt)])
    elif lay == "block_tiles":
        raw = weights(rng, fmt, sp, rows, cols).reshape(rows, -1)
        img = np.concatenate([isa.slice_rows(raw[:, j * bb:(j + 1) * bb], NP, SB)
                              for j in range(nb)])
    else:
        img = isa.slice_rows(weights(rng, fmt, sp, rows, cols).reshape(rows, -1), NP, SB)
    assert img.size == isa.weight_span(func, rows, cols, NP, SB), (lay, img.size)
    return img


def place(rng, mm, func, rows, cols, ntok=0, aligned=True):
    """Write a tiled operand and vectors; returns (fields without the shape, expected)."""
    fmt, sp = isa.FMTS[func & 3], isa.SPARSITIES[(func >> 2) & 7]
    nb = cols // 32
    img = tiled_image(rng, func, rows, cols)
    wb = W0 + (0 if aligned or NP > 1 else int(rng.integers(0, 64)))
    mm.mem[wb:wb + img.size] = img
    # as the MV reads it: block tiles' random d bytes count as 1.0 (isa.operand_rows)
    raw = isa.operand_rows(mm.mem[wb:wb + img.size], func, rows, cols, NP, SB)
    W = _unpack_weights(fmt, sp, np.ascontiguousarray(raw).reshape(-1), rows, nb)
    qsrc = A0 + (0 if aligned else int(rng.integers(0, 64)))
    dst = R0 + (0 if aligned else int(rng.integers(0, 64)))
    exp = []
    for t in range(max(ntok, 1)):
        b, act = qvec(rng, nb)
        mm.mem[qsrc + t * nb * 40:qsrc + t * nb * 40 + b.size] = b
        exp.append(np.asarray(matvec(W, None, act=act), np.float32))
    return dict(func=func, wb=wb, qsrc=qsrc, dst=dst), np.stack(exp)


async def run_one(dut, mm, f, exp, rval=0, rval2=0, what=""):
    cyc = await execute(dut, isa.encode(isa.make("MV", **f)), rval, rval2, f["qsrc"])
    got = mm.mem[f["dst"]:f["dst"] + exp.size * 4].copy().view(np.uint32)
    want = exp.reshape(-1).view(np.uint32)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{what} {f} rval {rval} rval2 {rval2}: rows {bad[:8]} of {want.size} differ"
    return cyc


@cocotb.test()
async def k_row_tiles(dut):
    """Q·K^T: MV.q8_0.rt rows = 1 + R[rreg] (rval 0, 1, 31, 32, 70, 200) of 64 columns."""
    rng = np.random.default_rng(11)
    mm = await start(dut, rng, fill=True)
    for rval in (0, 1, 31, 32, 70, 200):
        rows = 1 + rval
        f, exp = place(rng, mm, Q8 | isa.MV_RT, rows, 64, aligned=rval % 2 == 0)
        f.update(rows=1, cols=64, rreg=isa.REG_POS)
        await run_one(dut, mm, f, exp, rval=rval, what="K")
    # rows of an odd number of blocks: on 64-byte stripes a tile's stream ends mid-line (pad)
    for cols, rval in ((32, 40), (96, 70)):
        rows = 1 + rval
        f, exp = place(rng, mm, Q8 | isa.MV_RT, rows, cols)
        pad = (isa.mv_span(32, cols // 32 * 34, NP, SB) - 32 * cols // 32 * 34) if NP > 1 else 0
        f.update(rows=1, cols=cols, rreg=isa.REG_POS)
        await run_one(dut, mm, f, exp, rval=rval, what=f"K (tile pad {pad})")
    dut._log.info("K row tiles bit-exact")


@cocotb.test()
async def v_block_tiles(dut):
    """softmax·V: MV.q8_0.bt of 64 rows, cols = 32 + R[creg] (rval2 0, 32, 96, 224)."""
    rng = np.random.default_rng(12)
    mm = await start(dut, rng, fill=True)
    for rval2 in (0, 32, 96, 224):
        cols = 32 + rval2
        f, exp = place(rng, mm, Q8 | isa.MV_BT, 64, cols, aligned=rval2 % 64 == 0)
        f.update(rows=64, cols=32, creg=isa.REG_PBASE)
        await run_one(dut, mm, f, exp, rval2=rval2, what="V")
    dut._log.info("V block tiles bit-exact")


@cocotb.test()
async def tiles_random(dut):
    """Random tiled and plain MVs in every mode with register-extended shapes, and MMs whose
    ntok bits (where an MV has rreg/creg) come with nonzero rval/rval2 (not added)."""
    rng = np.random.default_rng(int(os.environ.get("MV_SEED", "3")) + 20)
    mm = await start(dut, rng, fill=True)
    n = int(os.environ.get("MV_N", "30"))
    for i in range(n):
        fmt, sp = MODES[i % len(MODES)]
        base = isa.mv_func(fmt, sp)
        kind = ("rt", "bt", "rows", "mm")[i % 4]
        rows0, cols0 = int(rng.integers(1, 40)), 32 * int(rng.integers(1, 6))
        rval = int(rng.integers(0, 80)) if kind != "mm" else int(rng.integers(1, 1 << 20))
        rval2 = 32 * int(rng.integers(0, 8)) if kind != "mm" else int(rng.integers(1, 1 << 20))
        if kind == "mm":
            ntok = int(rng.integers(2, 6))
            rows, cols = rows0, cols0
            f, exp = place(rng, mm, base, rows, cols, ntok=ntok, aligned=i % 3 == 0)
            f.update(rows=rows, cols=cols, ntok=ntok)
            cyc = await execute(dut, isa.encode(isa.make("MM", **f)), rval, rval2, f["qsrc"])
            got = mm.mem[f["dst"]:f["dst"] + exp.size * 4].copy().view(np.uint32)
            assert np.array_equal(got, exp.reshape(-1).view(np.uint32)), f"MM {i} {f}"
            continue
        func = base | {"rt": isa.MV_RT, "bt": isa.MV_BT, "rows": 0}[kind]
        rows, cols = rows0 + rval, cols0 + rval2
        f, exp = place(rng, mm, func, rows, cols, aligned=i % 3 == 0)
        f.update(rows=rows0, cols=cols0, rreg=1, creg=2)
        await run_one(dut, mm, f, exp, rval, rval2, what=f"{i} {kind} {fmt} {sp}")
    dut._log.info(f"{n} random tiled/plain MV and MM bit-exact")


@cocotb.test()
async def attention_cycles(dut):
    """Cycles of the K scores MV (rows 129 and 401, 64 columns) and the V MV (64 rows,
    cols 160 and 416), memory never stalling."""
    rng = np.random.default_rng(13)
    mm = await start(dut, rng, stall=0.0)
    lines = []
    for rows in (129, 401):
        f, exp = place(rng, mm, Q8 | isa.MV_RT, rows, 64)
        f.update(rows=1, cols=64, rreg=1)
        cyc = await run_one(dut, mm, f, exp, rval=rows - 1, what="K")
        lines.append(f"K scores MV.q8_0.rt {rows} rows x 64 cols: {cyc} cycles "
                     f"({cyc / (rows * 2):.3f} cycles/block)")
    for cols in (160, 416):
        f, exp = place(rng, mm, Q8 | isa.MV_BT, 64, cols)
        f.update(rows=64, cols=32, creg=2)
        cyc = await run_one(dut, mm, f, exp, rval2=cols - 32, what="V")
        lines.append(f"V MV.q8_0.bt 64 rows x {cols} cols: {cyc} cycles "
                     f"({cyc / (64 * cols // 32):.3f} cycles/block)")
    for rows, cols in ((128, 64), (64, 416)):      # the same shapes untiled, for comparison
        f, exp = place(rng, mm, Q8, rows, cols)
        f.update(rows=rows, cols=cols)
        cyc = await run_one(dut, mm, f, exp, what="plain")
        lines.append(f"(plain MV.q8_0 {rows} rows x {cols} cols: {cyc} cycles)")
    dut._log.info("attention MVs:\n%s", "\n".join(lines))
    with open(os.environ.get("MV_REPORT", "mv_chains.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


@cocotb.test()
async def activation_cache_two_entries(dut):
    """The chains build's two-entry activation cache: vectors that fit half the buffers stay
    cached side by side (an attention MV between two weight tiles does not evict the tiles'
    vector), the least recently used one is replaced, a write to a line of one reloads it,
    and vectors larger than half take the whole buffers (both entries go). Every result bit
    for bit; a hit skips the load."""
    rng = np.random.default_rng(14)
    mm = await start(dut, rng, stall=0.0)
    half = int(os.environ.get("MV_NB", "64")) // 2
    nb_small, nb_big, rows = 4, half + 4, 16
    vecs = {}

    def vector(name, nb, at):
        b, act = qvec(rng, nb)
        mm.mem[at:at + b.size] = b
        vecs[name] = (at, nb, act, b.size)

    vector("x", nb_small, A0)
    vector("y", nb_small, A0 + 4096)
    vector("z", nb_small, A0 + 8192)
    vector("big", nb_big, A0 + 12288)
    cyc = []

    async def mv(name):
        qsrc, nb, act, _ = vecs[name]
        w = weights(rng, "q8_0", "dense", rows, nb * 32)
        t = isa.slice_rows(w.reshape(rows, -1), NP, SB)
        mm.mem[W0:W0 + t.size] = t
        exp = np.asarray(matvec(_unpack_weights("q8_0", "dense", w, rows, nb), None, act=act),
                         np.float32)
        f = dict(func=Q8, wb=W0, rows=rows, cols=nb * 32, qsrc=qsrc, dst=R0)
        c = await execute(dut, isa.encode(isa.make("MV", **f)))
        got = mm.mem[R0:R0 + rows * 4].copy().view(np.uint32)
        assert np.array_equal(got, exp.view(np.uint32)), f"MV {len(cyc)} ({name})"
        cyc.append(c)

    seq = ["x", "y", "x", "y", "z", "y", "x", "Y!", "y", "big", "big", "x", "y", "x"]
    loads = [True, True, False, False, True, False, True, None, True, True, False, True, True,
             False]
    for name in seq:
        if name == "Y!":             # a write to the last line of y's vector
            qsrc, _, _, size = vecs["y"]
            await snoop(dut, (qsrc + size - 1) // D)
            continue
        await mv(name)
    loads = [ld for ld in loads if ld is not None]
    names = [n for n in seq if n != "Y!"]
    # every small MV takes the first one's cycles when it loads its vector, the third one's
    # (a hit) when not: which MVs loaded is exactly the expected list
    miss, hit = cyc[0], cyc[2]
    assert hit < miss, cyc
    for i, (c, ld, name) in enumerate(zip(cyc, loads, names)):
        if name != "big":
            assert c == (miss if ld else hit), (i, name, cyc, loads)
    big = [c for c, name in zip(cyc, names) if name == "big"]
    assert big[1] < big[0], cyc
    dut._log.info(f"two-entry activation cache: cycles per MV {cyc} (loads {loads})")
