"""Attention on the chains in hw/sfu_exec.py and hw/execute.py (``chains=True``), in Amaranth's
simulator, against the golden model's bytes.

:class:`SfuExec` (and :class:`MiscExec` for MUL) alone with a flat on-chip memory (one-cycle
line reads; random back-pressure on the read requests and on ``wr``), the ``ci`` geometry
(64-byte lines, 8 lanes, context 512) on one slice and on two (stripe 32), ``tiny``'s (one
slice, 16-byte lines) and lines narrower than ``slices * stripe`` (2 x 64 on 64-byte lines as
``u280-slice``, 4 x 8 on 16-byte lines as ``tiny4c``): a sequence of
MISC SOFTMAX (lengths ``n + R[reg]`` from 1 to the context, in place and not, unaligned),
KVROW (head dims 64 and 32, positions crossing tile boundaries, several rows into one
region, a region at an odd address on one slice) and QUANT / MUL with a register length. The expected memory is
``sim/golden.py``'s ``Golden._misc`` (``_kvrow``) run on the same image, op after op; the
whole memory must match byte for byte. KVROWs followed by QUANTs also run under bursts of
write stalls (up to 40 cycles).
"""

import numpy as np
import pytest

from llmfab.compiler import isa
from llmfab.sim.golden import Golden

F = isa.MISC_FUNCS
MEM = 1 << 18
GB = MEM - 256
CTX = 512
SCALE = np.float32(0.125)
REG = isa.REG_POS              # the register a dynamic length / KVROW's position comes from


def _sim(dut, mem, words, *, seed=0, stall=0.25, limit=40000, bursts=None):
    """Run ``words`` [(word, rval)] one after the other; returns the cycles of each (from the
    accepting edge to ``done``). ``stall``: the probability of a port's ready being low in a
    cycle; ``bursts`` (optional, (probability, longest)): ``wr``'s ready also goes low for
    runs of 1 .. ``longest`` cycles, a run starting with that probability in a cycle."""
    from amaranth.sim import Simulator
    D = dut._d
    rng = np.random.default_rng(seed)
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
                assert n < limit, "hang"
            cycles.append(n)

    async def memory(ctx):
        ports = [dut.rd0, dut.rd1]
        wr = dut.wr.req
        rdy = [1, 1, 1]
        run = [0]

        def draw():
            for k in range(3):
                rdy[k] = int(rng.random() >= stall)
            if bursts is not None:
                if run[0] == 0 and rng.random() < bursts[0]:
                    run[0] = int(rng.integers(1, bursts[1] + 1))
                if run[0]:
                    run[0] -= 1
                    rdy[2] = 0
            for p, r in zip(ports, rdy):
                ctx.set(p.req.ready, r)
            ctx.set(wr.ready, rdy[2])
        draw()
        async for _, _, v0, v1, a0, a1, wv, wa, wd, wb in ctx.tick().sample(
                ports[0].req.valid, ports[1].req.valid, ports[0].req.payload, ports[1].req.payload,
                wr.valid, wr.payload.addr, wr.payload.data, wr.payload.be):
            for p, v, a, r in ((ports[0], v0, a0, rdy[0]), (ports[1], v1, a1, rdy[1])):
                ctx.set(p.rsp.valid, v and r)
                if v and r:
                    ctx.set(p.rsp.payload, int.from_bytes(bytes(mem[a * D:(a + 1) * D]), "little"))
            if wv and rdy[2]:
                dat = int(wd).to_bytes(D, "little")
                for k in range(D):
                    if wb >> k & 1:
                        mem[wa * D + k] = dat[k]
            draw()
    sim.add_testbench(tb)
    sim.add_process(memory)
    sim.run()
    return cycles


def _golden(slices, stripe):
    """The golden model's MISC executor on a bare memory (no bundle)."""
    g = Golden.__new__(Golden)
    g.gb_base, g.kv_context, g.slices, g.stripe = GB, CTX, slices, stripe
    g.line = slices * stripe
    return g


def _fields(**f):
    out = {"dst": 0, "a": 0, "b": 0, "n": 0, "aux": 0, "reg": 0}
    out.update(f)
    return out


def _regs(rv):
    r = [0] * isa.NREGS
    r[REG] = rv
    return r


def _put(mem, a, v):
    mem[a:a + v.nbytes] = np.ascontiguousarray(v).view(np.uint8)


def _floats(rng, n, scale=3.0):
    return (rng.standard_normal(n) * scale).astype(np.float32)


class _Prog:
    """Instructions and their inputs; the golden memory follows op by op."""

    def __init__(self, rng, slices, stripe):
        self.rng = rng
        self.mem = rng.integers(0, 256, MEM).astype(np.uint8)
        _put(self.mem, GB, np.float32([1e-5, SCALE, 1.0 / 576]))
        self.g = _golden(slices, stripe)
        self.ops = []                    # (word, rval, what)
        self.at = 0

    def alloc(self, nbytes, unal=True):
        off = int(self.rng.integers(0, 16)) * 4 if unal else 0
        a = self.at + off
        self.at = (a + nbytes + 63) & ~63
        assert self.at < GB - 4096, "test memory full"
        return a

    def op(self, name, rv, what, **f):
        f = _fields(func=F[name], **f)
        if f["reg"] == 0:
            rv_eff = 0
        else:
            rv_eff = rv
        self.ops.append((isa.encode(isa.make("MISC", **{k: v for k, v in f.items() if v})),
                         rv_eff, what))

    def golden(self, start_mem):
        """The golden memory after every op, from ``start_mem``."""
        g = self.g
        g.mem = start_mem.copy()
        for w, rv, what in self.ops:
            ins = isa.decode(w)
            f = _fields(**ins.fields)
            with np.errstate(all="ignore"):
                g._misc(isa.MISC_NAMES[f["func"]], f, _regs(rv))
        return g.mem


def _softmax(p, n, rv, in_place, kind="normal", unal=True):
    rng = p.rng
    ne = n + rv
    a = p.alloc(4 * ne, unal)
    x = _floats(rng, ne, 4.0)
    if kind == "peaked":
        x[int(rng.integers(0, ne))] = np.float32(300)
    elif kind == "equal":
        x[:] = np.float32(1.5)
    elif kind == "big":
        x *= np.float32(1e3)                                   # exp underflows to 0 mostly
    _put(p.mem, a, x)
    pad = -(-ne // 32) * 32
    dst = a if in_place else p.alloc(4 * pad, unal)
    p.op("SOFTMAX", rv, ("SOFTMAX", ne, in_place, kind), dst=dst, a=a, n=n,
         reg=REG if rv else 0)


def _kvrow(p, hd, S, base):
    rng = p.rng
    a = p.alloc(8 * hd)
    kv = _floats(rng, 2 * hd, 2.0)
    r = rng.random()
    if r < 0.15:
        kv[:hd // 2] = 0                                       # a zero K block
    kv[hd:hd + 3] = np.float32([0.5, -0.5, 1.5]) * (np.abs(kv[hd:]).max() / 127 * 2)
    _put(p.mem, a, kv)
    p.op("KVROW", S, ("KVROW", hd, S), dst=base, a=a, n=hd, reg=REG)


def _quant(p, n, rv):
    rng = p.rng
    ne = n + rv
    a = p.alloc(4 * ne)
    x = _floats(rng, ne, 10.0)
    x[:32] = 0 if ne >= 64 else x[:32]
    _put(p.mem, a, x)
    dst = p.alloc(40 * ne // 32)
    p.op("QUANT", rv, ("QUANT", ne), dst=dst, a=a, n=n, reg=REG if rv else 0)


def _run(p, dut, seed):
    start = p.mem.copy()
    gold = p.golden(start)
    mem = start.copy()
    cycles = _sim(dut, mem, [(w, rv) for w, rv, _ in p.ops], seed=seed)
    diff = np.flatnonzero(mem != gold)
    return mem, gold, diff, cycles


def _check(p, mem, gold, diff):
    if diff.size:
        # which op's result differs (first one)
        bad = []
        for w, rv, what in p.ops:
            f = _fields(**isa.decode(w).fields)
            bad.append((what, f["dst"]))
        raise AssertionError(f"{diff.size} bytes differ, first at {diff[:10].tolist()}; ops {bad}")


@pytest.mark.parametrize("slices,stripe,line", [(1, 64, 64), (2, 32, 64), (1, 16, 16), (2, 64, 64),
                                               (4, 8, 16)])
def test_sfu_exec_chains_matches_golden(slices, stripe, line):
    from llmfab.hw.sfu_exec import SfuExec
    rng = np.random.default_rng(3 + slices)
    p = _Prog(rng, slices, stripe)
    # KVROW: one region per head dim, rows at positions crossing tile boundaries
    for hd, positions in ((64, (0, 1, 31, 32, 63, 200, 511)), (32, (0, 5, 33, 200))):
        span = isa.kv_region(hd, CTX, slices, stripe)["size"]
        base = p.alloc(span, unal=False)
        for S in positions:
            _kvrow(p, hd, S, base)
    if slices == 1:
        # a region at an odd address: rows and fields straddle lines anywhere
        base = p.alloc(isa.kv_region(32, CTX)["size"] + 3, unal=False) + 3
        for S in (2, 40, 41):
            _kvrow(p, 32, S, base)
    # SOFTMAX: n + R[reg] elements, in place and not
    for n, rv, ip, kind in ((1, 0, False, "normal"), (0, 31, True, "normal"),
                            (32, 0, False, "peaked"), (1, 32, True, "normal"),
                            (64, 36, False, "equal"), (100, 0, True, "big"),
                            (0, CTX, True, "normal")):
        _softmax(p, n, rv, ip, kind)
    # QUANT with a register length
    for n, rv in ((32, 64), (0, 32), (64, 0)):
        _quant(p, n, rv)
    order = list(range(len(p.ops)))
    # shuffle the SOFTMAX/QUANT ops among the KVROWs (each op's inputs are its own)
    rng.shuffle(order)
    p.ops = [p.ops[i] for i in order]
    dut = SfuExec(addr_bits=17, line_bytes=line, gb_base=GB, max_len=CTX, max_hd=64,
                  chains=True, slices=slices, stripe=stripe)
    assert dut.lanes == min(8, line // 4)
    mem, gold, diff, cycles = _run(p, dut, seed=slices)
    _check(p, mem, gold, diff)


def test_sfu_exec_kvrow_u280_geometry():
    """KVROW on ``u280``'s geometry (32 slices x 64-byte stripes, 64-byte on-chip lines: a
    line holds one slice's stripe), head dim 32 (the region fits the test memory)."""
    from llmfab.hw.sfu_exec import SfuExec
    rng = np.random.default_rng(5)
    p = _Prog(rng, 32, 64)
    base = p.alloc(isa.kv_region(32, CTX, 32, 64)["size"], unal=False)
    for S in (0, 1, 31, 33, 200, 511):
        _kvrow(p, 32, S, base)
    dut = SfuExec(addr_bits=17, line_bytes=64, gb_base=GB, max_len=CTX, max_hd=64,
                  chains=True, slices=32, stripe=64)
    mem, gold, diff, cycles = _run(p, dut, seed=1)
    _check(p, mem, gold, diff)


def test_sfu_exec_chains_cycles(capsys):
    """Cycles (accepting edge to done, SfuExec alone, no back-pressure) of SOFTMAX n = 100 /
    400 and KVROW hd 64 (ci geometry); bit-exact too. KVROW writes a V dim's q byte a cycle
    and no block's d, at a block's first position (S % 32 == 0) as at any other: the model's
    ``kvrow_fixed + kvrow_per_dim * hd``."""
    from llmfab.hw.sfu_exec import SfuExec
    rng = np.random.default_rng(8)
    p = _Prog(rng, 1, 64)
    _softmax(p, 100, 0, False, unal=False)
    _softmax(p, 0, 400, True, unal=False)
    base = p.alloc(isa.kv_region(64, CTX)["size"], unal=False)
    _kvrow(p, 64, 40, base)
    _kvrow(p, 64, 41, base)
    _kvrow(p, 64, 64, base)
    dut = SfuExec(addr_bits=17, line_bytes=64, gb_base=GB, max_len=CTX, max_hd=64, chains=True)
    start = p.mem.copy()
    gold = p.golden(start)
    mem = start.copy()
    cycles = _sim(dut, mem, [(w, rv) for w, rv, _ in p.ops], stall=0.0)
    _check(p, mem, gold, np.flatnonzero(mem != gold))
    with capsys.disabled():
        print("\nSfuExec chains cycles (ci geometry, alone):")
        for (_, _, what), c in zip(p.ops, cycles):
            print(f"  {what}: {c}")
    from llmfab.sim.perf import COSTS
    assert cycles[-3:] == [COSTS.kvrow_fixed + COSTS.kvrow_per_dim * 64] * 3


def test_misc_exec_mul_register_length():
    """MiscExec's MUL over n + R[reg] elements (chains=True), unaligned, against the golden
    model; reg 0 keeps n."""
    from llmfab.hw.execute import MiscExec
    rng = np.random.default_rng(21)
    p = _Prog(rng, 1, 64)
    for n, rv in ((16, 17), (0, 33), (5, 0), (1, 100)):
        ne = n + rv
        a, b, dst = p.alloc(4 * ne), p.alloc(4 * ne), p.alloc(4 * ne)
        _put(p.mem, a, _floats(rng, ne, 10.0))
        _put(p.mem, b, _floats(rng, ne, 10.0))
        p.op("MUL", rv, ("MUL", ne), dst=dst, a=a, b=b, n=n, reg=REG if rv else 0)
    dut = MiscExec(addr_bits=17, line_bytes=64, chains=True)
    dut._d = 64
    mem, gold, diff, cycles = _run(p, dut, seed=4)
    _check(p, mem, gold, diff)


def test_chains_validated():
    from llmfab.hw.sfu_exec import SfuExec
    with pytest.raises(ValueError, match="slices"):
        SfuExec(addr_bits=16, line_bytes=64, gb_base=0, chains=True, slices=2, stripe=16)


@pytest.mark.parametrize("slices,stripe,line", [(1, 16, 16), (2, 32, 64)])
def test_sfu_exec_chains_kvrow_write_bursts(slices, stripe, line):
    """KVROWs each followed by a QUANT with long write stalls (runs of up to 40 cycles of
    ``wr`` ready low, as an LD writing the same banks): the K row's bytes may still be going
    out when the V row's start (KVV), and only the V items may count there (they once counted
    the K bytes too: the KVROW ended with V outputs left in the post stage and V bytes
    unwritten, and the next op's writer took them -- the tinyc accelerator hung)."""
    from llmfab.hw.sfu_exec import SfuExec
    rng = np.random.default_rng(40 + slices)
    p = _Prog(rng, slices, stripe)
    for hd, positions in ((32, (0, 1, 33)), (64, (2, 31, 32))):
        base = p.alloc(isa.kv_region(hd, CTX, slices, stripe)["size"], unal=False)
        for S in positions:
            _kvrow(p, hd, S, base)
            _quant(p, 32, 0)
    dut = SfuExec(addr_bits=17, line_bytes=line, gb_base=GB, max_len=CTX, max_hd=64,
                  chains=True, slices=slices, stripe=stripe)
    start = p.mem.copy()
    gold = p.golden(start)
    mem = start.copy()
    _sim(dut, mem, [(w, rv) for w, rv, _ in p.ops], seed=slices, stall=0.1,
         bursts=(0.05, 40), limit=10000)
    _check(p, mem, gold, np.flatnonzero(mem != gold))
