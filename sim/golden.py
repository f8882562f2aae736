"""The golden model: executes a bundle's instruction stream exactly as the hardware will.

It is the bit-exact specification of the RTL. A run takes the runtime
registers (position, token id, region bases), and either finishes with status
OK (logits in the I/O region of HBM) or with an error status:

1. The dispatcher decodes and checks every instruction in program order (the
   registers are constant during a run, so every address is known at
   dispatch). The first faulting instruction in program order decides the
   status: illegal encoding, HBM address out of range, on-chip address out of
   range. A program without END runs off its end (``NO_END``).
2. The queues execute under the dependency tokens (in-order queues of depth
   ``QUEUE_DEPTH``, dispatch stalls when the target queue is full). If no
   queue can make progress the status is ``DEADLOCK``.

Execution order: the token simulation (static: it does not depend on data or
registers) yields an order that respects every token; instructions then
execute in that order. Matrix-vector products whose weights come straight
from static weight loads are fused into one numpy product per run of tiles
(rows are independent, so the bits are the same).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from llmfab.boards.errors import IsaError, SimError
from llmfab.compiler import isa, sparse
from llmfab.compiler.bundle import Bundle
from llmfab.sim import numerics as N
from llmfab.sim.numerics_model import PackedMatrix, matvec

QUEUE_DEPTH = 16
QBLOCK_BYTES = 40
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


class GoldenFault(SimError):
    """A run ended with an error status."""

    def __init__(self, status: int, pc: int, detail: str):
        self.status, self.pc = status, pc
        super().__init__(f"status {status} ({isa.STATUS_NAMES[status]}) at instruction {pc}: {detail}")


@dataclass
class RunResult:
    status: int
    pc: int = -1
    detail: str = ""
    counters: dict = field(default_factory=dict)


def mv_weight_bytes(fmt, sp, rows, cols):
    return rows * (cols // 32) * sparse.sparse_block_bytes(fmt, sp)


class Golden:
    """Load a bundle; run its decode program for a token at a position."""

    def __init__(self, bundle: Bundle, *, registers: dict | None = None, fast: bool = True):
        self.bundle = bundle
        man = bundle.manifest
        self.onchip_size = int(man["onchip"]["size"])
        self.gb_base = int(man["onchip"]["global"][0])
        self.kv_context = int(man["onchip"]["context"])
        self.hbm_size = int(man["hbm_size"])
        self.hbm = np.zeros(self.hbm_size, np.uint8)
        img = bundle.hbm_image
        self.hbm[:img.size] = img
        self.mem = np.zeros(self.onchip_size, np.uint8)
        self.base_regs = {isa.REG_WBASE: man["registers"]["wbase"], isa.REG_TBASE: man["registers"]["tbase"],
                          isa.REG_KVBASE: man["registers"]["kvbase"], isa.REG_IOBASE: man["registers"]["iobase"]}
        if registers:
            self.base_regs.update(registers)
        self.fast = fast
        self.static_fault = None
        self.instrs = []
        self._decode_all()
        if self.static_fault is None:
            self._order = self._token_sim()
        else:
            self._order = None
        self._plan = None
        self._row_off = {}
        self._dyn = None
        self._run_out = {}
        self.counters = {"runs": 0}

    # ---- decode & static checks -------------------------------------------------------
    def _decode_all(self):
        words = isa.from_bytes(self.bundle.program)
        for pc, w in enumerate(words):
            try:
                ins = isa.decode(w)
            except IsaError as e:
                self.static_fault = (isa.STATUS_ILLEGAL, pc, str(e))
                return
            self.instrs.append(ins)
            if ins.op == "SYS" and ins["func"] == isa.SYS_END:
                return
        self.static_fault = (isa.STATUS_NO_END, len(words), "program ended without END")

    def _token_sim(self):
        """Simulate dispatch + queues + tokens; returns the execution order or a deadlock fault."""
        q = {"ld": [], "cmp": [], "st": []}
        heads = {"ld": 0, "cmp": 0, "st": 0}
        tok = {"ld2cmp": 0, "cmp2ld": 0, "cmp2st": 0, "st2cmp": 0}
        waits = {"ld": (("wait_next", "cmp2ld"),),
                 "cmp": (("wait_prev", "ld2cmp"), ("wait_next", "st2cmp")),
                 "st": (("wait_prev", "cmp2st"),)}
        rels = {"ld": (("rel_next", "ld2cmp"),),
                "cmp": (("rel_prev", "cmp2ld"), ("rel_next", "cmp2st")),
                "st": (("rel_prev", "st2cmp"),)}
        order = []
        pc = 0
        n = len(self.instrs)
        while True:
            progress = False
            # dispatch as much as possible
            while pc < n:
                ins = self.instrs[pc]
                qn = isa.QUEUE[isa.OPCODES[ins.op]]
                if qn == "sys":
                    if any(heads[k] < len(q[k]) for k in q):
                        break        # SYNC/END/NOP wait for the queues to drain
                    order.append(pc)
                    pc += 1
                    progress = True
                    if ins["func"] == isa.SYS_END:
                        return order
                    continue
                if len(q[qn]) - heads[qn] >= QUEUE_DEPTH:
                    break
                q[qn].append(pc)
                pc += 1
                progress = True
            # execute queue heads
            for qn in ("ld", "cmp", "st"):
                while heads[qn] < len(q[qn]):
                    i = q[qn][heads[qn]]
                    ins = self.instrs[i]
                    if any(ins[b] and tok[ch] == 0 for b, ch in waits[qn]):
                        break
                    for b, ch in waits[qn]:
                        if ins[b]:
                            tok[ch] -= 1
                    for b, ch in rels[qn]:
                        if ins[b]:
                            tok[ch] += 1
                    order.append(i)
                    heads[qn] += 1
                    progress = True
            if not progress:
                blocked = [(k, q[k][heads[k]]) for k in q if heads[k] < len(q[k])]
                pcs = ", ".join(f"{k} at {i} ({isa.disassemble(self.instrs[i])})" for k, i in blocked)
                self.static_fault = (isa.STATUS_DEADLOCK, blocked[0][1] if blocked else pc,
                                     f"no queue can proceed: {pcs or 'dispatch stalled'}")
                return None

    # ---- address ranges -----------------------------------------------------------------
    def _ranges(self, ins, regs):
        """(hbm ranges, on-chip ranges) touched by an instruction: lists of (start, length)."""
        f = ins.fields
        op = ins.op
        hbm, chip = [], []
        if op in ("LD", "ST"):
            addr = regs[f["hreg"]] + f["hoff"] * isa.HBM_ALIGN + regs[f["ireg"]] * f["stride"]
            ln = f["len"] + regs[f["lreg"]] * f["lmul"]
            hbm.append((addr, ln))
            chip.append((f["buf"], 2 * ln if op == "ST" and f["func"] == isa.ST_F16 else ln))
        elif op in ("MV", "MM"):
            fmt = isa.FMTS[f["func"] & 3]
            sp = isa.SPARSITIES[f["func"] >> 2]
            nt = f.get("ntok", 1) if op == "MM" else 1
            chip.append((f["wb"], mv_weight_bytes(fmt, sp, f["rows"], f["cols"])))
            chip.append((f["qsrc"], nt * f["cols"] // 32 * QBLOCK_BYTES))
            chip.append((f["dst"], nt * f["rows"] * 4))
        elif op == "MISC":
            name = isa.MISC_NAMES[f["func"]]
            n = f["n"]
            if name == "QUANT":
                chip += [(f["a"], 4 * n), (f["dst"], n // 32 * QBLOCK_BYTES)]
            elif name in ("ADD", "MUL", "SILU_MUL"):
                chip += [(f["a"], 4 * n), (f["b"], 4 * n), (f["dst"], 4 * n)]
            elif name == "RMSNORM":
                chip += [(f["a"], 4 * n), (f["b"], 4 * n), (f["dst"], 4 * n), (self.gb_base, 8)]
            elif name == "ROPE":
                hd = f["aux"]
                chip += [(f["a"], 4 * n * hd), (f["b"], 4 * hd), (f["dst"], 4 * n * hd)]
            elif name == "COPY":
                chip += [(f["a"], 4 * n), (f["dst"], 4 * n)]
            elif name == "EMBED":
                fmt = isa.FMTS[f["aux"]] if f["aux"] < 3 else None
                chip += [(f["a"], n // 32 * BLOCK_BYTES.get(fmt, 1 << 24)), (f["dst"], 4 * n)]
            elif name == "ATTN":
                hd = f["aux"]
                S = regs[f["reg"]]
                chip += [(f["a"], 4 * (n + 2) * hd), (f["b"], 2 * S * hd),
                         (f["b"] + 2 * self.kv_context * hd, 2 * S * hd), (f["dst"], 4 * n * hd),
                         (self.gb_base, 8)]
        return hbm, chip

    def _check(self, ins, pc, regs):
        f = ins.fields
        if ins.op == "MISC":
            name = isa.MISC_NAMES[f["func"]]
            if name in ("QUANT", "RMSNORM", "ADD", "MUL", "SILU_MUL", "COPY", "EMBED") and f["n"] % 32 \
                    and name in ("QUANT", "EMBED"):
                return isa.STATUS_ILLEGAL, f"{name} n={f['n']} is not a multiple of 32"
            if name in ("ROPE", "ATTN") and (f["aux"] == 0 or f["aux"] % 2):
                return isa.STATUS_ILLEGAL, f"{name} head dim {f['aux']}"
            if name == "EMBED" and f["aux"] >= 3:
                return isa.STATUS_ILLEGAL, f"EMBED format {f['aux']}"
        hbm, chip = self._ranges(ins, regs)
        for a, ln in hbm:
            if ln and (a < 0 or a + ln > self.hbm_size):
                return isa.STATUS_HBM_RANGE, f"HBM [{a:#x}, +{ln}) beyond {self.hbm_size:#x}"
        for a, ln in chip:
            if ln and a + ln > self.onchip_size:
                return isa.STATUS_BUF_RANGE, f"on-chip [{a:#x}, +{ln}) beyond {self.onchip_size:#x}"
        return None

    def _regs(self, pos, token):
        r = [0] * isa.NREGS
        for k, v in self.base_regs.items():
            r[k] = int(v)
        r[isa.REG_POS] = int(pos)
        r[isa.REG_SEQ] = int(pos) + 1
        r[isa.REG_TOKEN] = int(token)
        return r

    def check(self, pos: int, token: int) -> RunResult | None:
        """The error status a run at (pos, token) ends with, or None if it runs clean."""
        if self.static_fault and self.static_fault[0] == isa.STATUS_ILLEGAL:
            # everything before the illegal word is still checked first
            lim = self.static_fault[1]
        else:
            lim = len(self.instrs)
        regs = self._regs(pos, token)
        if self._dyn is None:
            # instructions whose ranges do not depend on the per-token registers are checked once
            self._dyn = []
            self._static_err = None
            r0 = self._regs(0, 0)
            for pc in range(min(lim, len(self.instrs))):
                ins = self.instrs[pc]
                f = ins.fields
                dyn = any(f.get(k, 0) in (isa.REG_POS, isa.REG_SEQ, isa.REG_TOKEN)
                          for k in ("hreg", "ireg", "lreg")) or (
                    ins.op == "MISC" and isa.MISC_NAMES[f["func"]] == "ATTN")
                if dyn:
                    self._dyn.append(pc)
                elif self._static_err is None:
                    r = self._check(ins, pc, r0)
                    if r:
                        self._static_err = (pc, r)
        first = None
        if self._static_err:
            first = self._static_err
        for pc in self._dyn:
            if first and pc > first[0]:
                break
            r = self._check(self.instrs[pc], pc, regs)
            if r:
                first = (pc, r)
                break
        if first:
            return RunResult(first[1][0], first[0], first[1][1])
        if self.static_fault:
            return RunResult(*self.static_fault)
        return None

    # ---- plan -------------------------------------------------------------------------------
    def _build_plan(self):
        """Execution order -> list of steps; static weight LD -> MV pairs become fused matvecs."""
        regs0 = self._regs(0, 0)
        wb_lo = int(self.bundle.manifest["onchip"]["weight"][0])
        order = self._order
        steps = []
        # last writer of each WB interval: list of (start, end, writer step index or LD pc)
        wb_writes = []   # (start, end, pc)
        ld_needed = set()
        ld_static = {}
        fast_mv = {}
        for pc in order:
            ins = self.instrs[pc]
            f = ins.fields
            if ins.op == "LD":
                start = f["buf"]
                dynamic = f["ireg"] != 0 or f["lreg"] != 0
                end = start + f["len"] + f["lmul"] * self._reg_max(f["lreg"], regs0)
                # an earlier write stays live unless this one covers it completely
                wb_writes = [w for w in wb_writes if not (start <= w[0] and w[1] <= end)] + [(start, end, pc)]
                if not dynamic:
                    ld_static[pc] = regs0[f["hreg"]] + f["hoff"] * isa.HBM_ALIGN
                else:
                    ld_needed.add(pc)
                continue
            hbm, chip = self._ranges(ins, regs0)
            reads = []
            writes = []
            if ins.op in ("MV", "MM"):
                reads = chip[:2]
                writes = chip[2:]
                wa, wl = chip[0]
                cover = [w for w in wb_writes if not (w[1] <= wa or w[0] >= wa + wl)]
                # the latest write overlapping the weights decides: fast if it is one static LD
                # that covers them all
                if self.fast and ins.op == "MV" and cover and cover[-1][2] in ld_static \
                        and cover[-1][0] <= wa and wa + wl <= cover[-1][1]:
                    ld = cover[-1][2]
                    fast_mv[pc] = ld_static[ld] + (wa - cover[-1][0])
                    reads = chip[1:2]
            elif ins.op == "ST":
                reads = chip
            elif ins.op == "MISC":
                reads, writes = chip[:-1], chip[-1:]
                if isa.MISC_NAMES[f["func"]] in ("RMSNORM", "ATTN"):
                    writes = [c for c in chip if c[0] == f["dst"]]
                    reads = [c for c in chip if c[0] != f["dst"]]
            for a, ln in reads:
                for w in wb_writes:
                    if not (w[1] <= a or w[0] >= a + ln):
                        ld_needed.add(w[2])
            for a, ln in writes:
                wb_writes = [w for w in wb_writes if not (a <= w[0] and w[1] <= a + ln)]
                if a + ln > wb_lo:
                    wb_writes.append((a, a + ln, -1))
        # LDs never read by a non-fused reader are skipped (fused matvecs read HBM directly).
        # Runs: fast MVs in execution order with the same input, format and width, whose
        # weights are contiguous in HBM, and whose input is not written in between, are
        # computed as one product at the first MV; each MV then writes its rows at its
        # own place in the order.
        runs = {}            # first pc -> [pcs]
        run_of = {}
        cur = None
        for pc in order:
            ins = self.instrs[pc]
            f = ins.fields
            if ins.op == "MV" and pc in fast_mv:
                if cur is not None:
                    h = self.instrs[cur[0]].fields
                    lastf = self.instrs[cur[-1]].fields
                    fmt = isa.FMTS[h["func"] & 3]
                    sp = isa.SPARSITIES[h["func"] >> 2]
                    if (f["func"] == h["func"] and f["cols"] == h["cols"] and f["qsrc"] == h["qsrc"]
                            and fast_mv[pc] == fast_mv[cur[-1]] + mv_weight_bytes(fmt, sp, lastf["rows"], h["cols"])):
                        cur.append(pc)
                        run_of[pc] = cur[0]
                        continue
                cur = [pc]
                runs[pc] = cur
                run_of[pc] = pc
                continue
            if cur is None or ins.op == "SYS":
                cur = None if ins.op == "SYS" else cur
                continue
            # does this instruction write the run's input?
            h = self.instrs[cur[0]].fields
            qa, ql = h["qsrc"], h["cols"] // 32 * QBLOCK_BYTES
            _, chip = self._ranges(ins, regs0)
            if ins.op == "LD":
                wr = chip
            elif ins.op in ("MV", "MM", "MISC"):
                wr = [c for c in chip if c[0] == f.get("dst", -1)]
            else:
                wr = []
            if any(not (a + ln <= qa or a >= qa + ql) for a, ln in wr):
                cur = None
        cache = {}
        steps = []
        for pc in order:
            ins = self.instrs[pc]
            if ins.op == "LD":
                if pc in ld_needed or not self.fast:
                    steps.append(("ld", pc))
                continue
            if ins.op == "MV" and pc in run_of:
                first = run_of[pc]
                f = ins.fields
                if pc == first:
                    run = runs[first]
                    rows = sum(self.instrs[p].fields["rows"] for p in run)
                    key = (fast_mv[pc], f["func"], rows, f["cols"])
                    if key not in cache:
                        cache[key] = self._pack(fast_mv[pc], f["func"], rows, f["cols"])
                    steps.append(("mvrun", pc, cache[key], f["qsrc"], f["cols"]))
                    off = 0
                    for p in run:
                        self._row_off[p] = off
                        off += self.instrs[p].fields["rows"]
                steps.append(("mvw", pc, first, self._row_off[pc], f["rows"], f["dst"]))
                continue
            steps.append(("ins", pc))
        # adjacent row writes of one run into contiguous destinations become one copy
        merged = []
        for st in steps:
            if st[0] == "mvw" and merged and merged[-1][0] == "mvw":
                _, pc0, first0, r00, nr0, dst0 = merged[-1]
                _, pc, first, r0, nr, dst = st
                if first == first0 and r0 == r00 + nr0 and dst == dst0 + 4 * nr0:
                    merged[-1] = ("mvw", pc0, first0, r00, nr0 + nr, dst0)
                    continue
            merged.append(st)
        self._plan = merged
        self._fast_mv = fast_mv

    def _reg_max(self, r, regs0):
        """Largest value register ``r`` takes over the runs of this bundle."""
        if r == isa.REG_POS:
            return self.kv_context - 1
        if r == isa.REG_SEQ:
            return self.kv_context
        if r == isa.REG_TOKEN:
            return int(self.bundle.manifest["model"]["vocab_size"])
        return regs0[r]

    def _pack(self, hbm_addr, func, rows, cols):
        fmt = isa.FMTS[func & 3]
        sp = isa.SPARSITIES[func >> 2]
        nb = cols // 32
        raw = self.hbm[hbm_addr:hbm_addr + mv_weight_bytes(fmt, sp, rows, cols)]
        return _unpack_weights(fmt, sp, raw, rows, nb)

    # ---- execution --------------------------------------------------------------------------
    def f32(self, addr, n):
        return self.mem[addr:addr + 4 * n].view(np.float32)

    def _exec(self, ins, regs):
        f = ins.fields
        op = ins.op
        c = self.counters
        if op == "LD":
            addr = regs[f["hreg"]] + f["hoff"] * isa.HBM_ALIGN + regs[f["ireg"]] * f["stride"]
            ln = f["len"] + regs[f["lreg"]] * f["lmul"]
            self.mem[f["buf"]:f["buf"] + ln] = self.hbm[addr:addr + ln]
            c["ld_bytes"] = c.get("ld_bytes", 0) + ln
        elif op == "ST":
            addr = regs[f["hreg"]] + f["hoff"] * isa.HBM_ALIGN + regs[f["ireg"]] * f["stride"]
            ln = f["len"] + regs[f["lreg"]] * f["lmul"]
            if f["func"] == isa.ST_F16:
                v = N.to_f16(self.f32(f["buf"], ln // 2))
                self.hbm[addr:addr + ln] = v.view(np.uint8)
            else:
                self.hbm[addr:addr + ln] = self.mem[f["buf"]:f["buf"] + ln]
            c["st_bytes"] = c.get("st_bytes", 0) + ln
        elif op == "MV":
            fmt = isa.FMTS[f["func"] & 3]
            sp = isa.SPARSITIES[f["func"] >> 2]
            nb = f["cols"] // 32
            raw = self.mem[f["wb"]:f["wb"] + mv_weight_bytes(fmt, sp, f["rows"], f["cols"])]
            W = _unpack_weights(fmt, sp, raw, f["rows"], nb)
            self._mv(W, f["qsrc"], f["dst"], f["cols"])
        elif op == "MM":
            fmt = isa.FMTS[f["func"] & 3]
            sp = isa.SPARSITIES[f["func"] >> 2]
            nb = f["cols"] // 32
            raw = self.mem[f["wb"]:f["wb"] + mv_weight_bytes(fmt, sp, f["rows"], f["cols"])]
            W = _unpack_weights(fmt, sp, raw, f["rows"], nb)
            for t in range(f["ntok"]):
                self._mv(W, f["qsrc"] + t * nb * QBLOCK_BYTES, f["dst"] + t * f["rows"] * 4, f["cols"])
        elif op == "MISC":
            self._misc(isa.MISC_NAMES[f["func"]], f, regs)

    def _read_q(self, qsrc, nb):
        q = self.mem[qsrc:qsrc + nb * 32].view(np.int8).reshape(nb, 32)
        d = self.mem[qsrc + nb * 32:qsrc + nb * 36].view(np.float32)
        s = self.mem[qsrc + nb * 36:qsrc + nb * 40].view(np.int32)
        return q, d, s

    def _mv(self, W, qsrc, dst, cols):
        nb = cols // 32
        y = matvec(W, None, act=self._read_q(qsrc, nb))
        self.f32(dst, W.rows)[:] = y
        self.counters["macs"] = self.counters.get("macs", 0) + W.rows * cols

    def _misc(self, name, f, regs):
        n = f["n"]
        if name == "NOP":
            return
        if name == "QUANT":
            q, d, s = N.quantize_act(self.f32(f["a"], n).copy())
            nb = n // 32
            dst = f["dst"]
            self.mem[dst:dst + nb * 32] = q.reshape(-1).view(np.uint8)
            self.mem[dst + nb * 32:dst + nb * 36] = d.astype(np.float32).view(np.uint8)
            self.mem[dst + nb * 36:dst + nb * 40] = s.astype(np.int32).view(np.uint8)
        elif name == "RMSNORM":
            eps = self.f32(self.gb_base, 1)[0]
            y = N.rms_norm(self.f32(f["a"], n).copy(), self.f32(f["b"], n).copy(), eps)
            self.f32(f["dst"], n)[:] = y
        elif name == "ROPE":
            hd = f["aux"]
            x = self.f32(f["a"], n * hd).copy().reshape(n, hd)
            tb = self.f32(f["b"], hd).copy()
            y = N.rope(x, tb[:hd // 2], tb[hd // 2:])
            self.f32(f["dst"], n * hd)[:] = y.reshape(-1)
        elif name == "ADD":
            self.f32(f["dst"], n)[:] = N.fadd(self.f32(f["a"], n), self.f32(f["b"], n))
        elif name == "MUL":
            self.f32(f["dst"], n)[:] = N.fmul(self.f32(f["a"], n), self.f32(f["b"], n))
        elif name == "SILU_MUL":
            self.f32(f["dst"], n)[:] = N.fmul(N.silu(self.f32(f["a"], n)), self.f32(f["b"], n))
        elif name == "COPY":
            self.f32(f["dst"], n)[:] = self.f32(f["a"], n).copy()
        elif name == "EMBED":
            fmt = isa.FMTS[f["aux"]]
            nb = n // 32
            raw = self.mem[f["a"]:f["a"] + nb * BLOCK_BYTES[fmt]]
            from llmfab.compiler import quant
            q, d, m = quant.split_blocks(fmt, raw)
            v = N.fmul(q.astype(np.float32), N.from_f16(d)[:, None])
            if m is not None:
                v = N.fadd(v, N.from_f16(m)[:, None])
            self.f32(f["dst"], n)[:] = v.reshape(-1)
        elif name == "ATTN":
            hd = f["aux"]
            S = regs[f["reg"]]
            scale = self.f32(self.gb_base + 4, 1)[0]
            a = f["a"]
            qh = self.f32(a, n * hd).copy().reshape(n, hd)
            kc = N.to_f16(self.f32(a + 4 * n * hd, hd))
            vc = N.to_f16(self.f32(a + 4 * (n + 1) * hd, hd))
            K = self.mem[f["b"]:f["b"] + 2 * S * hd].view(np.float16).reshape(S, hd)
            vb = f["b"] + 2 * self.kv_context * hd
            V = self.mem[vb:vb + 2 * S * hd].view(np.float16).reshape(S, hd)
            K = np.concatenate([K, kc[None]], 0)
            V = np.concatenate([V, vc[None]], 0)
            from llmfab.sim.numerics_model import attention
            o = attention(qh, K[:, None, :], V[:, None, :], scale, n)
            self.f32(f["dst"], n * hd)[:] = o.reshape(-1)

    def run(self, pos: int, token: int) -> RunResult:
        """Run the decode program once (token ``token`` at position ``pos``)."""
        fault = self.check(pos, token)
        if fault:
            return fault
        if self._plan is None:
            self._build_plan()
        regs = self._regs(pos, token)
        self.counters["runs"] += 1
        out = self._run_out
        for st in self._plan:
            kind = st[0]
            if kind == "mvw":
                _, pc, first, r0, nr, dst = st
                self.mem[dst:dst + 4 * nr] = out[first][4 * r0:4 * (r0 + nr)]
            elif kind == "mvrun":
                _, pc, W, qsrc, cols = st
                out[pc] = matvec(W, None, act=self._read_q(qsrc, cols // 32)).view(np.uint8)
                self.counters["macs"] = self.counters.get("macs", 0) + W.rows * cols
            else:
                self._exec(self.instrs[st[1]], regs)
        return RunResult(isa.STATUS_OK)

    def logits(self) -> np.ndarray:
        io = int(self.bundle.manifest["memory_map"]["logits"][0])
        n = int(self.bundle.manifest["model"]["vocab_size"])
        return self.hbm[io:io + 4 * n].view(np.float32).copy()

    def instruction_counts(self) -> dict:
        out = {}
        for ins in self.instrs:
            out[ins.op] = out.get(ins.op, 0) + 1
        return out


def _unpack_weights(fmt, sp, raw, rows, nb) -> PackedMatrix:
    from llmfab.compiler import quant
    raw = np.asarray(raw, np.uint8)
    if sp == "dense":
        q, d, m = quant.split_blocks(fmt, raw.reshape(rows, -1))
        return PackedMatrix(fmt, q, d, m)
    n, mm = sparse.parse_pattern(sp)
    K = sparse.kept(sp)
    vals, idx, d, m = sparse.decode_sparse_rows(fmt, raw, sp, nb)
    per = K // (32 // mm)
    pos = (np.arange(K) // per) * mm + idx                     # [rows, nb, K]
    q = np.zeros((rows, nb, 32), np.int8)
    mask = np.zeros((rows, nb, 32), bool)
    np.put_along_axis(q, pos, vals.astype(np.int8), axis=-1)
    np.put_along_axis(mask, pos, True, axis=-1)
    return PackedMatrix(fmt, q, d, m, mask)
