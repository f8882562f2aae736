"""cocotb bench of hw/mv_exec.py alone (built with a small activation buffer, so MMs run in
several passes): an on-chip memory model behind rd0/rd1/wr and the slices' weight-bank ports
(``bank[p][j]``: stripe p of the weight buffer's lines, from 64-byte stripes on half-lines of
the bank's two half memories: read port ``j // 2`` of half ``j % 2``), MV/MM words
in, results compared with sim.numerics_model.matvec (the golden model's MV), bit for bit.

Environment: MV_D (line bytes), MV_AB (line address bits), MV_N (random instructions),
MV_SEED, MV_STALL (probability that rd0, bank port 0 and wr are not ready in a cycle: the
store and load engines' priority), MV_P (slices), MV_S (stripe: bytes per bank line; D / MV_P
unless given), MV_WB (weight buffer base), MV_BAB (bank line address bits).
"""

import os

import cocotb
import numpy as np
from cocotb.triggers import RisingEdge

from llmfab.compiler import isa, quant, sparse
from llmfab.core import formats
from llmfab.core import numerics as N
from llmfab.sim.golden import _unpack_weights
from llmfab.sim.numerics_model import matvec

from tb import TB

D = int(os.environ.get("MV_D", "64"))
AB = int(os.environ.get("MV_AB", "13"))
NI = int(os.environ.get("MV_N", "30"))
NL = int(os.environ.get("MV_L", "1"))      # row pipelines of the unit
SEED = int(os.environ.get("MV_SEED", "3"))
NP = int(os.environ.get("MV_P", "1"))      # slices (weight banks of D / NP bytes)
WB = int(os.environ.get("MV_WB", "0"))     # the weight buffer's first byte
BAB = int(os.environ.get("MV_BAB", "13"))  # bank line address bits
STALL = float(os.environ.get("MV_STALL", "0.2"))
MODES = [(f, p) for f in ("q4_0", "q4_1", "q8_0") for p in ("dense", "2:4", "8:16", "4:16", "2:16")]
SB = int(os.environ.get("MV_S", str(D // NP)))   # bytes per bank line (a stripe)
LOOKAHEAD = int(os.environ.get("MV_LOOKAHEAD", "0"))   # the decoders' lookahead beats
NH = 2 if SB >= 64 else 1                   # half memories per bank (hw/onchip.py bank_halves)
# the results clear of the weights: with attention on the chains the weight buffer starts at
# the KV buffer (ci-chains: 128 KiB), where the results used to go
W0, A0 = WB, 1 << 16
R0 = 1 << 17 if not WB <= 1 << 17 < WB + (1 << 17) else WB + (1 << 17)
MEM = max(1 << 19, WB + (1 << 17))


class MemModel:
    """Line reads (response one cycle after the handshake) and byte-enabled line writes."""

    def __init__(self, dut, rng):
        self.dut, self.rng = dut, rng
        self.mem = np.zeros(MEM, np.uint8)
        self.stall = STALL
        self.writes = 0

    def line(self, a):
        return int.from_bytes(self.mem[a * D:(a + 1) * D].tobytes(), "little")

    async def run(self):
        dut = self.dut
        mask = (1 << AB) - 1
        while True:
            dut.rd0__req__ready.value = int(self.rng.random() >= self.stall)
            dut.rd1__req__ready.value = 1
            for p in range(NP):        # bank port 0 shares its memory port with the line view
                for j in range(2 * NH):
                    getattr(dut, f"bank__{p}__{j}__req__ready").value = \
                        int(j // NH == 1 or self.rng.random() >= self.stall)
            dut.wr__req__ready.value = int(self.rng.random() >= self.stall)
            await RisingEdge(dut.clk)
            for p in range(NP):
                for j in range(2 * NH):
                    pre = f"bank__{p}__{j}__"
                    if int(getattr(dut, pre + "req__valid").value) and \
                            int(getattr(dut, pre + "req__ready").value):
                        a = int(getattr(dut, pre + "req__payload").value) & ((1 << BAB) - 1)
                        b0 = WB + a * NP * SB + p * SB + (j % NH) * (SB // NH)
                        getattr(dut, pre + "rsp__payload").value = int.from_bytes(
                            self.mem[b0:b0 + SB // NH].tobytes(), "little")
                        getattr(dut, pre + "rsp__valid").value = 1
                    else:
                        getattr(dut, pre + "rsp__valid").value = 0
            for p in ("rd0", "rd1"):
                req_v = int(getattr(dut, f"{p}__req__valid").value)
                req_r = int(getattr(dut, f"{p}__req__ready").value)
                if req_v and req_r:
                    a = int(getattr(dut, f"{p}__req__payload").value) & mask
                    getattr(dut, f"{p}__rsp__payload").value = self.line(a)
                    getattr(dut, f"{p}__rsp__valid").value = 1
                else:
                    getattr(dut, f"{p}__rsp__valid").value = 0
            if int(dut.wr__req__valid.value) and int(dut.wr__req__ready.value):
                v = int(dut.wr__req__payload.value)
                a = v & mask
                data = (v >> AB) & ((1 << (8 * D)) - 1)
                be = v >> (AB + 8 * D)
                b = data.to_bytes(D, "little")
                for i in range(D):
                    if be >> i & 1:
                        self.mem[a * D + i] = b[i]
                self.writes += 1


def weights(rng, fmt, sp, rows, cols):
    vals = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(rng.uniform(0.01, 2))
    raw = quant.quantize_rows(fmt, vals).reshape(rows, -1)
    if sp != "dense":
        raw = sparse.encode_sparse_rows(fmt, raw, sparse.prune(fmt, raw, sp), sp)
    return np.ascontiguousarray(raw, np.uint8).reshape(-1)


def qvec(rng, nb):
    x = rng.standard_normal(nb * 32).astype(np.float32) * np.float32(10 ** rng.uniform(-3, 2))
    q, d, s = N.quantize_act(x)
    return (np.concatenate([np.asarray(q, np.int8).view(np.uint8).reshape(-1),
                            np.asarray(d, np.float32).view(np.uint8),
                            np.asarray(s, np.int32).view(np.uint8)]), (q, d, s))


async def snoop(dut, line):
    """Tell the unit that the bench wrote on-chip ``line`` (as the load engine's writes are)."""
    dut.snoop.value = 1 | ((line & ((1 << AB) - 1)) << 1)
    await RisingEdge(dut.clk)
    dut.snoop.value = 0


async def execute(dut, word, qsrc=None):
    """Hand one word to the unit (after announcing a write to the first line of its vectors
    at ``qsrc``); cycles from the handshake to done."""
    if qsrc is not None:
        await snoop(dut, qsrc // D)
    dut.instr__payload.value = word
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


def place(rng, mm, fmt, sp, rows, nb, ntok, aligned):
    """Write weights and vectors; returns (fields, expected [ntok][rows] float32)."""
    w = weights(rng, fmt, sp, rows, nb * 32)
    # slice-major (docs/isa.md): on several slices the tile starts on a line
    wb = W0 + (0 if aligned or NP > 1 else int(rng.integers(0, 64)))
    t = isa.slice_rows(w.reshape(rows, -1), NP, SB)
    mm.mem[wb:wb + t.size] = t
    qsrc = A0 + (0 if aligned else int(rng.integers(0, 64)))
    dst = R0 + (0 if aligned else int(rng.integers(0, 64)))
    W = _unpack_weights(fmt, sp, w, rows, nb)
    exp = []
    for t in range(max(ntok, 1)):
        b, act = qvec(rng, nb)
        a = qsrc + t * nb * 40
        mm.mem[a:a + b.size] = b
        exp.append(np.asarray(matvec(W, None, act=act), np.float32))
    func = isa.FMTS.index(fmt) | (isa.SPARSITIES.index(sp) << 2)
    f = dict(func=func, wb=wb, rows=rows, cols=nb * 32, qsrc=qsrc, dst=dst)
    if ntok:
        f["ntok"] = ntok
    return ("MM" if ntok else "MV"), f, np.stack(exp)


async def start(dut, rng, stall=STALL, fill=False):
    """Clock, reset, and the memory model (random contents with ``fill``) running."""
    tb = TB(dut, period_ns=2)
    mm = MemModel(dut, rng)
    mm.stall = stall
    if fill:
        mm.mem[:] = rng.integers(0, 256, MEM, dtype=np.uint8)
    dut.instr__valid.value = 0
    dut.snoop.value = 0
    await tb.reset(3)
    cocotb.start_soon(mm.run())
    return mm


@cocotb.test()
async def mv_random(dut):
    rng = np.random.default_rng(SEED)
    mm = await start(dut, rng, fill=True)
    for i in range(NI):
        fmt, sp = MODES[i % len(MODES)]
        nb = int(rng.integers(1, 25))
        rows = int(rng.integers(1, 41))
        ntok = int(rng.integers(2, 7)) if rng.random() < 0.4 else 0
        op, f, exp = place(rng, mm, fmt, sp, rows, nb, ntok, aligned=i % 3 == 0)
        await execute(dut, isa.encode(isa.make(op, **f)), f["qsrc"])
        got = mm.mem[f["dst"]:f["dst"] + exp.size * 4].copy().view(np.float32).reshape(exp.shape)
        assert np.array_equal(got.view(np.uint32), exp.view(np.uint32)), \
            f"instruction {i} {op} {fmt} {sp} {f}: {np.flatnonzero(got != exp)[:8]}"
    dut._log.info(f"{NI} random MV/MM bit-exact (D = {D})")


@cocotb.test()
async def mv_steady_state(dut):
    """Cycles per block from two row counts, memory never stalling (18-block rows: their
    starts fall mid-beat, which cost a cycle per row before the realigner->decoder slack, and
    half a cycle per row on average, the rows whose first block straddles a beat, before the
    decoder's lookahead beat)."""
    rng = np.random.default_rng(SEED + 1)
    mm = await start(dut, rng, stall=0.0)
    nb = 18          # SmolLM2's rows (576 columns): rows start mid-beat, as real matrices do
    lines = []
    for fmt, sp in [("q4_0", "dense"), ("q4_1", "dense"), ("q8_0", "dense"), ("q4_0", "2:4"),
                    ("q4_1", "4:16"), ("q8_0", "2:16")]:
        cyc = {}
        for rows in (8, 72):
            op, f, exp = place(rng, mm, fmt, sp, rows, nb, 0, aligned=True)
            cyc[rows] = await execute(dut, isa.encode(isa.make(op, **f)), f["qsrc"])
            got = mm.mem[f["dst"]:f["dst"] + exp.size * 4].copy().view(np.uint32)
            assert np.array_equal(got, exp.reshape(-1).view(np.uint32))
        cpb = (cyc[72] - cyc[8]) / (64 * nb)
        if (fmt, sp) == ("q4_0", "dense"):
            cyc8_q4 = cyc[8]
        # bound: each of the L row pipelines one block per cycle (the chain: two for dense
        # Q8_0) and, without the decoders' lookahead beat (MV_LOOKAHEAD 0), one idle decoder
        # cycle per row, or the two read ports' line rate. With it no idle cycle at all: the
        # next row's first beat waits in the decoder while a row's last block leaves
        chain = 2.0 if (fmt, sp) == ("q8_0", "dense") else 1.0
        idle = 0 if LOOKAHEAD else 1
        bound = max((chain * nb + idle) / (nb * NL), formats.block_bytes(fmt, sp) / (2 * D))
        assert cpb <= bound * (1.002 if LOOKAHEAD else 1.05), (fmt, sp, cpb, bound)
        lines.append(f"{fmt} {sp}: {cpb:.3f} cycles/block (MV of 8 rows x {nb} blocks: "
                     f"{cyc[8]} cycles)")
    # MM: 4 tokens in one pass vs 4 MVs
    op, f, exp = place(rng, mm, "q4_0", "dense", 8, nb, 4, aligned=True)
    c_mm = await execute(dut, isa.encode(isa.make(op, **f)), f["qsrc"])
    got = mm.mem[f["dst"]:f["dst"] + exp.size * 4].copy().view(np.uint32)
    assert np.array_equal(got, exp.reshape(-1).view(np.uint32))
    lines.append(f"q4_0 dense MM of 4 tokens x 8 rows x {nb} blocks: {c_mm} cycles "
                 f"(4 MVs: {4 * cyc8_q4})")
    dut._log.info("steady state (D = %d):\n%s", D, "\n".join(lines))
    with open(os.environ.get("MV_REPORT", "mv_steady.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


@cocotb.test()
async def mv_activation_cache(dut):
    """Consecutive MVs on one vector load it once; a write to any line of it reloads it."""
    rng = np.random.default_rng(SEED + 2)
    mm = await start(dut, rng, stall=0.0)
    nb, rows = 18, 16
    qsrc = A0 + 24
    b, act = qvec(rng, nb)
    mm.mem[qsrc:qsrc + b.size] = b
    cyc = []
    for i in range(4):
        w = weights(rng, "q4_1", "dense", rows, nb * 32)
        t = isa.slice_rows(w.reshape(rows, -1), NP, SB)
        mm.mem[W0:W0 + t.size] = t
        if i == 2:                       # new vector, announced through its last line
            b, act = qvec(rng, nb)
            mm.mem[qsrc:qsrc + b.size] = b
            await snoop(dut, (qsrc + b.size - 1) // D)
        exp = np.asarray(matvec(_unpack_weights("q4_1", "dense", w, rows, nb), None, act=act),
                         np.float32)
        f = dict(func=1, wb=W0, rows=rows, cols=nb * 32, qsrc=qsrc, dst=R0)
        cyc.append(await execute(dut, isa.encode(isa.make("MV", **f)), qsrc if i == 0 else None))
        got = mm.mem[R0:R0 + rows * 4].copy().view(np.uint32)
        assert np.array_equal(got, exp.view(np.uint32)), f"MV {i}"
    # the first and the third load the vector (40 * nb bytes), the others do not
    assert cyc[1] < cyc[0] and cyc[3] < cyc[2], cyc
    dut._log.info(f"activation cache: cycles per MV {cyc}")
