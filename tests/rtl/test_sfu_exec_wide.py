"""hw/sfu_exec.py's L-lane paths (ATTN, RMSNORM, QUANT, ROPE) at 8 lanes (64-byte lines, the
``ci`` geometry) in Amaranth's simulator, against core.numerics, bit for bit.

tests/rtl/test_sfu_exec.py runs every op inside the tiny accelerator (16-byte lines: 4
lanes) under Verilator; this one drives :class:`SfuExec` alone with a flat on-chip memory
(one-cycle line reads, writes always accepted) so that the 8-lane geometry is covered
too: one simulation, a few dozen random instructions with edge values (zeros, products
that flush or overflow, binary16 subnormals in the cache, head dims that are not
multiples of the lanes, rows of two heads in one beat, unaligned operands).
"""

import numpy as np
import pytest

from llmfab.compiler import isa
from llmfab.core import numerics as N
from llmfab.sim.numerics_model import attention

F = isa.MISC_FUNCS
MEM = 1 << 17
GB = MEM - 256
CTX = 64
EPS, SCALE = np.float32(1e-5), np.float32(0.125)


def _sim(dut, mem, words):
    from amaranth.sim import Simulator
    D = dut._d
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    cycles = []

    async def tb(ctx):
        ctx.set(dut.context, CTX)
        for w, rv in words:
            ctx.set(dut.instr.payload.word, w)
            ctx.set(dut.instr.payload.rval, rv)
            ctx.set(dut.instr.valid, 1)
            await ctx.tick().until(dut.instr.ready)
            ctx.set(dut.instr.valid, 0)
            n = 0
            while not ctx.get(dut.done):
                await ctx.tick()
                n += 1
                assert n < 20000, "hang"
            cycles.append(n)

    async def memory(ctx):
        ports = [dut.rd0, dut.rd1]
        for p in ports:
            ctx.set(p.req.ready, 1)
        ctx.set(dut.wr.req.ready, 1)
        wr = dut.wr.req
        async for _, _, v0, v1, a0, a1, wv, wa, wd, wb in ctx.tick().sample(
                ports[0].req.valid, ports[1].req.valid, ports[0].req.payload, ports[1].req.payload,
                wr.valid, wr.payload.addr, wr.payload.data, wr.payload.be):
            for p, v, a in ((ports[0], v0, a0), (ports[1], v1, a1)):
                ctx.set(p.rsp.valid, v)
                if v:
                    ctx.set(p.rsp.payload, int.from_bytes(bytes(mem[a * D:(a + 1) * D]), "little"))
            if wv:
                dat = int(wd).to_bytes(D, "little")
                for k in range(D):
                    if wb >> k & 1:
                        mem[wa * D + k] = dat[k]
    sim.add_testbench(tb)
    sim.add_process(memory)
    sim.run()
    return cycles


class _Alloc:
    def __init__(self, rng):
        self.at = 0
        self.rng = rng

    def __call__(self, nbytes, unal=True, align=4):
        off = int(self.rng.integers(0, 16)) * align if unal else 0
        a = self.at + off
        self.at = (a + nbytes + 63) & ~63
        assert self.at < GB
        return a


def _put(mem, a, v):
    mem[a:a + v.nbytes] = np.ascontiguousarray(v).view(np.uint8)


def _f32(mem, a, n):
    return mem[a:a + 4 * n].view(np.float32)


def _ops(rng, mem, al):
    """(word, rval, check(mem) -> error or None) for a list of random instructions."""
    out = []
    # ATTN: head dims 64 / not a multiple of 8 / below 8; cached and current-row forms
    for hd, nh, S, t, cached, peaked in [(64, 3, 9, 0, 0, 0), (6, 2, 5, 1, 1, 0), (2, 1, 3, 0, 0, 1),
                                         (16, 2, 1, 0, 1, 1), (24, 1, 12, 3, 0, 0), (64, 1, 1, 0, 0, 0)]:
        rows = S + cached
        b = al(2 * (CTX * hd + rows * hd), align=2)
        kv = (rng.standard_normal(CTX * hd + rows * hd) * 2).astype(np.float16)
        kv[rng.random(kv.size) < 0.03] = np.float16(6e-6)          # binary16 subnormals
        kv[rng.random(kv.size) < 0.03] = 0
        _put(mem, b, kv)
        a = al(4 * (nh + 2) * hd)
        q = (rng.standard_normal((nh + 2) * hd) * 3).astype(np.float32)
        if peaked:
            q[:hd] *= np.float32(300)
        _put(mem, a, q)
        dst = al(4 * nh * hd)
        K = kv[:rows * hd].reshape(rows, hd)
        V = kv[CTX * hd:CTX * hd + rows * hd].reshape(rows, hd)
        if not cached:
            K = np.concatenate([K, N.to_f16(q[nh * hd:(nh + 1) * hd])[None]], 0)
            V = np.concatenate([V, N.to_f16(q[(nh + 1) * hd:])[None]], 0)
        with np.errstate(all="ignore"):
            exp = attention(q[:nh * hd].reshape(nh, hd), K[:, None, :], V[:, None, :], SCALE,
                            nh).reshape(-1)
        w = isa.encode(isa.make("MISC", func=F["ATTN"], dst=dst, a=a, b=b, n=nh | t << 8,
                                aux=hd | cached << 15, reg=isa.REG_POS))
        out.append((w, S - t, ("ATTN", hd, nh, S, t, cached), dst, exp))
    # RMSNORM: lengths 1 .. 576, zeros, squares that overflow or flush
    for n, kind in [(576, "normal"), (1, "normal"), (33, "zero"), (100, "huge"), (71, "tiny"),
                    (8, "normal"), (257, "mixed")]:
        x = (rng.standard_normal(n) * 10).astype(np.float32)
        if kind == "zero":
            x[:] = 0
        elif kind == "huge":
            x[::7] = np.float32(3e19)                                    # x*x = inf
        elif kind == "tiny":
            x *= np.float32(1e-22)                                       # x*x flushes
        elif kind == "mixed":
            x[::3] *= np.float32(1e-21)
        wv = rng.standard_normal(n).astype(np.float32)
        a, b, dst = al(4 * n), al(4 * n), al(4 * n)
        _put(mem, a, x)
        _put(mem, b, wv)
        with np.errstate(all="ignore"):
            exp = N.rms_norm(x, wv, EPS, np.float32(1.0 / 576))
        w = isa.encode(isa.make("MISC", func=F["RMSNORM"], dst=dst, a=a, b=b, n=n))
        out.append((w, 0, ("RMSNORM", n, kind), dst, exp))
    # ROPE: rows that are not a multiple of the lanes (a beat holds two rows' pairs)
    for nh, hd in [(3, 64), (5, 2), (3, 6), (2, 10), (1, 4)]:
        x = (rng.standard_normal(nh * hd) * 10).astype(np.float32)
        ang = rng.random(hd // 2) * 100
        tb = np.concatenate([np.cos(ang), np.sin(ang)]).astype(np.float32)
        a, b, dst = al(4 * nh * hd), al(4 * hd), al(4 * nh * hd)
        _put(mem, a, x)
        _put(mem, b, tb)
        exp = N.rope(x.reshape(nh, hd), tb[:hd // 2], tb[hd // 2:]).reshape(-1)
        w = isa.encode(isa.make("MISC", func=F["ROPE"], dst=dst, a=a, b=b, n=nh, aux=hd))
        out.append((w, 0, ("ROPE", nh, hd), dst, exp))
    # QUANT: ordinary, zero, flushing (tiny amax) and tie blocks
    for nb in (1, 5, 18):
        x = (rng.standard_normal(32 * nb) * 10).astype(np.float32)
        blocks = x.reshape(nb, 32)
        for i, blk in enumerate(blocks):
            r = i % 4
            if r == 1:
                blk[:] = 0
            elif r == 2:
                blk[:] = np.float32(1e-37)
            elif r == 3:
                blk[:] = np.float32(rng.integers(-3, 4, 32)) * np.float32(0.5)
        a, dst = al(4 * 32 * nb), al(40 * nb)
        _put(mem, a, x)
        q, d, sq = N.quantize_act(x)
        exp = np.concatenate([q.reshape(-1).view(np.uint8), d.astype(np.float32).view(np.uint8),
                              sq.astype(np.int32).view(np.uint8)])
        w = isa.encode(isa.make("MISC", func=F["QUANT"], dst=dst, a=a, n=32 * nb))
        out.append((w, 0, ("QUANT", nb), dst, exp))
    return out


@pytest.mark.parametrize("line_bytes", [64])
def test_sfu_exec_wide_pysim(line_bytes):
    from llmfab.hw.sfu_exec import SfuExec
    rng = np.random.default_rng(11)
    mem = np.zeros(MEM, np.uint8)
    _put(mem, GB, np.float32([EPS, SCALE, 1.0 / 576]))
    ops = _ops(rng, mem, _Alloc(rng))
    order = rng.permutation(len(ops))
    ops = [ops[i] for i in order]
    dut = SfuExec(addr_bits=17, line_bytes=line_bytes, gb_base=GB, max_len=1024, max_hd=64)
    assert dut.lanes == 8
    _sim(dut, mem, [(w, rv) for w, rv, *_ in ops])
    bad = []
    for w, rv, what, dst, exp in ops:
        got = mem[dst:dst + exp.nbytes]
        ev = exp.view(np.uint8)
        if what[0] != "QUANT":
            # NaN-ness only (the hardware's NaN is canonical)
            gf, ef = got.view(np.float32), exp.astype(np.float32)
            same = (gf.view(np.uint32) == ef.view(np.uint32)) | (np.isnan(gf) & np.isnan(ef))
            ok = bool(same.all())
        else:
            ok = np.array_equal(got, ev)
        if not ok:
            bad.append(what)
    assert not bad, bad


def test_lanes_validated():
    from llmfab.hw.sfu_exec import SfuExec
    assert SfuExec.default_lanes(16) == 4 and SfuExec.default_lanes(64) == 8
    assert SfuExec.default_lanes(256) == 8
    with pytest.raises(ValueError, match="lanes"):
        SfuExec(addr_bits=16, line_bytes=16, gb_base=0, lanes=8)
