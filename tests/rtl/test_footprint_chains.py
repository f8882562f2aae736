"""hw/dispatch.py's Footprint with attention on the chains, in Amaranth's simulator.

The on-chip ranges the validation pass checks and the execution unit compares for overlap
(docs/isa.md, "Overlap") must be ``sim/golden_plan.py``'s ``onchip_ranges`` for the chains
words too: an MV's register-extended shape (``rows + R[rreg]``, ``cols + R[creg]``) and its
tiled layouts (``isa.weight_span``), QUANT/MUL/SOFTMAX lengths ``n + R[reg]``, SOFTMAX's
rounded-up result, KVROW's whole KV-head region (``isa.kv_region``); and its operand flag must
be ``misc_operand_error`` or ``dynamic_operand_error``. An MM's bits 120..127 are ``ntok``, not
registers. Random words on one, two and four slices; the test is about the arithmetic, so it
runs without Verilator.
"""

import numpy as np
import pytest
from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from llmfab.compiler import isa
from llmfab.hw.dispatch import Footprint
from llmfab.sim.golden_plan import onchip_ranges

GB = 0x10000


class _Fp(wiring.Component):
    def __init__(self, slices, stripe):
        self._p, self._s = slices, stripe
        super().__init__({"word": In(128), "rval": In(32), "rval2": In(32), "context": In(32),
                          "starts": Out(64).array(Footprint.SLOTS),
                          "lens": Out(64).array(Footprint.SLOTS), "illegal": Out(1)})

    def elaborate(self, platform):
        m = Module()
        fp = Footprint(m, self.word, self.rval, self.context, global_base=GB, slices=self._p,
                       stripe=self._s, chains=True, rval2=self.rval2)
        m.d.comb += [a.eq(b) for a, b in zip(self.starts, fp.starts)]
        m.d.comb += [a.eq(b) for a, b in zip(self.lens, fp.lens)]
        m.d.comb += self.illegal.eq(fp.misc_illegal)
        return m


def _regs(rng):
    pos = int(rng.choice([0, 1, 31, 32, 33, 63, 64, 100, 255, 511, int(rng.integers(0, 4096))]))
    r = [0] * 16
    r[1:8] = [pos, pos + 1] + [int(x) for x in rng.integers(0, 1 << 20, 5)]
    r[7] = int(rng.choice([0, 5, 31, 64, 65504, 65535, 1 << 31, int(rng.integers(0, 1 << 32))]))
    for k, v in isa.run_registers(pos).items():
        r[k] = v
    return r


def _word(rng):
    """A random chains word (MV with registers and layouts, MM, QUANT/MUL/SOFTMAX/KVROW)."""
    kind = rng.integers(0, 8)
    reg = int(rng.choice([0, 1, 2, 7, 8, 9, 10, 15]))
    if kind <= 2:                                         # MV, any layout
        func = isa.mv_func(isa.FMTS[rng.integers(0, 3)], isa.SPARSITIES[rng.integers(0, 5)])
        func |= [0, isa.MV_RT, isa.MV_BT][int(rng.integers(0, 3))]
        return isa.make("MV", func=func, wb=int(rng.integers(0, 1 << 24)),
                        rows=int(rng.choice([1, 2, 31, 32, 33, int(rng.integers(1, 1 << 16))])),
                        cols=32 * int(rng.choice([1, 2, 3, int(rng.integers(1, 2048))])),
                        qsrc=int(rng.integers(0, 1 << 24)), dst=int(rng.integers(0, 1 << 24)),
                        rreg=reg, creg=int(rng.choice([0, 1, 7, 8, 9, 15])))
    if kind == 3:                                         # MM: bits 120..127 are ntok
        return isa.make("MM", func=isa.mv_func("q4_0"), wb=int(rng.integers(0, 1 << 24)),
                        rows=int(rng.integers(1, 300)), cols=32 * int(rng.integers(1, 20)),
                        qsrc=int(rng.integers(0, 1 << 24)), dst=int(rng.integers(0, 1 << 24)),
                        ntok=int(rng.integers(1, 256)))
    name = ["QUANT", "MUL", "SOFTMAX", "KVROW"][kind - 4]
    n = int(rng.choice([0, 1, 31, 32, 64, 96, 128, 256, int(rng.integers(0, 1 << 16))]))
    if name == "KVROW" and rng.random() < 0.6:
        n = 32 * int(rng.integers(1, 9))
    return isa.make("MISC", func=isa.MISC_FUNCS[name], dst=int(rng.integers(0, 1 << 24)),
                    a=int(rng.integers(0, 1 << 24)), b=int(rng.integers(0, 1 << 24)), n=n,
                    reg=reg)


@pytest.mark.parametrize("slices,stripe", [(1, 16), (2, 32), (4, 64)])
def test_footprint_chains_ranges_match_golden(slices, stripe):
    rng = np.random.default_rng(slices)
    cases = []
    for _ in range(400):
        ins = _word(rng)
        cases.append((ins, _regs(rng), int(rng.choice([32, 100, 128, 256, 512, 2048]))))
    dut = _Fp(slices, stripe)
    bad = []
    seen = {}

    async def bench(ctx):
        for ins, regs, context in cases:
            f = ins.fields
            word = isa.encode(ins)
            ctx.set(dut.word, word)
            ctx.set(dut.rval, regs[(word >> 120) & 15])
            ctx.set(dut.rval2, regs[(word >> 124) & 15])
            ctx.set(dut.context, context)
            await ctx.tick()
            got_ill = bool(ctx.get(dut.illegal))
            want_ill = (isa.misc_operand_error(ins) or isa.dynamic_operand_error(ins, regs)) is not None
            if got_ill != want_ill:
                bad.append((isa.disassemble(ins), regs[:10], "illegal", got_ill, want_ill))
                continue
            key = (ins.op, isa.mv_layout(f["func"]) if ins.op == "MV" else
                   isa.MISC_NAMES[f["func"]] if ins.op == "MISC" else "", want_ill)
            seen[key] = seen.get(key, 0) + 1
            if want_ill:
                continue
            want = [(a, n) for a, n in onchip_ranges(ins, regs, gb_base=GB, kv_context=context,
                                                       slices=slices, stripe=stripe) if n]
            got = [(ctx.get(dut.starts[k]), ctx.get(dut.lens[k])) for k in range(Footprint.SLOTS)]
            got = [(a, n) for a, n in got if n]
            if got != want:
                bad.append((isa.disassemble(ins), regs[:10], context, got, want))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert not bad, bad[:5]
    # every kind of word, legal and (where it can be) illegal
    for key in [("MV", lay, ill) for lay in ("rows", "row_tiles", "block_tiles") for ill in (0, 1)] + \
            [("MISC", n, 0) for n in ("QUANT", "MUL", "SOFTMAX", "KVROW")] + \
            [("MISC", n, 1) for n in ("QUANT", "KVROW")] + [("MM", "", 0)]:
        assert seen.get(key, 0) >= 3, (key, seen)
