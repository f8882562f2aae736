"""The golden model: executes a bundle's instruction stream exactly as the hardware will.

It is the bit-exact specification of the RTL. A run executes one program of
the bundle (the decode program, or the prefill program of a bucket of T tokens
whose embedding rows the host staged in the I/O region) with the runtime
registers (position, token id, region bases), and either finishes with status
OK (logits in the I/O region of HBM) or with an error status:

1. The dispatcher decodes and checks every instruction in program order (the
   registers are constant during a run, so every address is known at
   dispatch). The first faulting instruction in program order decides the
   status: illegal encoding, HBM address out of range, on-chip address out of
   range (an MV/MM's weights must lie in the weight buffer and, on several
   slices, start on a line: docs/isa.md, "Slices"). A program without END runs
   off its end (``NO_END``).
2. The queues execute under the dependency tokens (in-order queues of depth
   ``QUEUE_DEPTH``, dispatch stalls when the target queue is full). If no
   queue can make progress the status is ``DEADLOCK``.

Execution order: the token simulation (static: it does not depend on data or
registers) yields an order that respects every token; instructions then
execute in that order. Matrix-vector (MV) and matrix-matrix (MM) products
whose weights come straight from static weight loads are fused into one numpy
product per run of tiles (rows and tokens are independent, so the bits are
the same): sim/golden_plan.py turns the execution order into that plan, and
``Golden(bundle, fast=False)`` executes every instruction as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llmfab.core.errors import IsaError, SimError
from llmfab.compiler import isa, sparse
from llmfab.compiler.bundle import Bundle, prefill_program
from llmfab.core import numerics as N
from llmfab.core import formats
from llmfab.core.formats import BLOCK_BYTES, QBLOCK_BYTES
from llmfab.compiler import quant
from llmfab.sim.golden_plan import (MvRun, MvScatter, MvStore, MvWrite, Planner, mv_row_bytes,
                                    onchip_ranges, overlaps)
from llmfab.sim.numerics_model import PackedMatrix, attention, matvec

QUEUE_DEPTH = 16


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


class _Program:
    """One program of a bundle: its words decoded, its execution order, checks and plan (cached)."""

    def __init__(self, name: str, data: bytes, ntok: int):
        self.name, self.data, self.ntok = name, data, ntok
        self.instrs = []
        self.static_fault = None
        self.order = None
        self.plan = None
        self.dyn = None
        self.static_err = None
        self.row_off = {}
        self.fast_mv = {}


class Golden:
    """Load a bundle; run its decode program (one token) or a prefill program (T tokens).

    The programs share the device state (HBM with the KV cache, on-chip memory).
    Program names: ``"decode"``, ``"prefill_<T>"`` for each bucket T, ``"prefill_kv_<T>"``
    for its KV-only twin and ``"prefill_last_<T>"`` for its last-logits twin (a bundle that
    ends the model).
    """

    def __init__(self, bundle: Bundle, *, registers: dict | None = None, fast: bool = True):
        self.bundle = bundle
        man = bundle.manifest
        self.onchip_size = int(man["onchip"]["size"])
        self.gb_base = int(man["onchip"]["global"][0])
        wb0, wbn = (int(v) for v in man["onchip"]["weight"])
        self.weight_buffer = (wb0, wb0 + wbn)       # where MV/MM weights may be
        # the slices (docs/isa.md, "Slices"): one per HBM port, stripe = one port's beat
        self.slices = int(man["memory_map"]["hbm_ports"])
        self.stripe = int(man["memory_map"]["hbm_stripe_bytes"])
        self.line = self.slices * self.stripe
        self.kv_context = int(man["onchip"]["context"])
        # the ISA's attention-on-the-chains words exist on configurations that have them
        self.chains = man["onchip"].get("attention") == "chains"
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
        self.programs = {}
        self._run_out = {}
        # unpacked weights of fused products, shared by every Golden of this bundle while the
        # HBM ranges they come from hold the bundle's image (see _note_hbm_write)
        self._packed = bundle.extra.setdefault("golden_packed", {})
        self._fused = []                 # HBM ranges fused products read, [(start, end)]
        self._fused_span = (0, 0)
        self.counters = {"runs": 0}
        self.program("decode")

    # ---- programs ---------------------------------------------------------------------
    @property
    def buckets(self) -> list:
        """The prefill buckets of the bundle (token counts), ascending."""
        return sorted(int(t) for t in self.bundle.prefill)

    def program(self, name: str = "decode") -> _Program:
        """The decoded program ``name`` ("decode", "prefill_<T>", "prefill_kv_<T>" or
        "prefill_last_<T>")."""
        p = self.programs.get(name)
        if p is not None:
            return p
        found = self.bundle.named_program(name)
        if found is None:
            raise SimError(f"bundle has no program '{name}' (it has {', '.join(self.bundle.program_names())})")
        p = _Program(name, *found)
        self._decode_all(p)
        if p.static_fault is None:
            p.order = self._token_sim(p)
        self.programs[name] = p
        return p

    @property
    def instrs(self):
        return self.program("decode").instrs

    @property
    def static_fault(self):
        return self.program("decode").static_fault

    # ---- decode & static checks -------------------------------------------------------
    def _decode_all(self, p: _Program):
        words = isa.from_bytes(p.data)
        for pc, w in enumerate(words):
            try:
                ins = isa.decode(w)
            except IsaError as e:
                p.static_fault = (isa.STATUS_ILLEGAL, pc, str(e))
                return
            p.instrs.append(ins)
            if ins.op == "SYS" and ins["func"] == isa.SYS_END:
                return
        p.static_fault = (isa.STATUS_NO_END, len(words), "program ended without END")

    def _token_sim(self, p: _Program):
        """Simulate dispatch + queues + tokens; returns the execution order or a deadlock fault."""
        instrs = p.instrs
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
        n = len(instrs)
        while True:
            progress = False
            # dispatch as much as possible
            while pc < n:
                ins = instrs[pc]
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
                    ins = instrs[i]
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
                pcs = ", ".join(f"{k} at {i} ({isa.disassemble(instrs[i])})" for k, i in blocked)
                p.static_fault = (isa.STATUS_DEADLOCK, blocked[0][1] if blocked else pc,
                                  f"no queue can proceed: {pcs or 'dispatch stalled'}")
                return None

    # ---- address ranges -----------------------------------------------------------------
    def _ranges(self, ins, regs):
        """(hbm ranges, on-chip ranges) touched by an instruction: lists of (start, length)."""
        f = ins.fields
        hbm = []
        if ins.op in ("LD", "ST"):
            addr = regs[f["hreg"]] + f["hoff"] * isa.HBM_ALIGN + regs[f["ireg"]] * f["stride"]
            hbm.append((addr, f["len"] + regs[f["lreg"]] * f["lmul"]))
        chip = onchip_ranges(ins, regs, gb_base=self.gb_base, kv_context=self.kv_context,
                             slices=self.slices, stripe=self.stripe)
        return hbm, chip

    def mv_span(self, func, rows, cols) -> int:
        """Bytes of an MV/MM weight operand (``isa.weight_span`` on this bundle's slices)."""
        return isa.weight_span(func, rows, cols, self.slices, self.stripe)

    def _weight_error(self, ins, regs) -> str | None:
        """Why an MV/MM's weights are out of range (None: they are not), the checks in order:
        ``[wb, wb + span)`` inside the weight buffer, then (several slices) ``wb`` on a line."""
        f = ins.fields
        wb, span = f["wb"], self.mv_span(f["func"], *isa.mv_shape(f, regs))
        lo, hi = self.weight_buffer
        if wb < lo or wb + span > hi:
            return f"{ins.op} weights [{wb:#x}, +{span}) outside the weight buffer [{lo:#x}, {hi:#x})"
        if self.slices > 1 and wb % self.line:
            return (f"{ins.op} weights at {wb:#x}: not a multiple of the {self.line}-byte line of a "
                    f"{self.slices}-slice configuration")
        return None

    def _check(self, ins, pc, regs):
        """The status and message an instruction faults with (None: it does not). In order:
        operand rules (status 1), HBM ranges (2), on-chip ranges (3): an MV/MM's weights first
        (:meth:`_weight_error`), then every other operand against the on-chip size."""
        if not self.chains:
            why = isa.chains_feature(ins)
            if why:
                return isa.STATUS_ILLEGAL, f"{why} needs a configuration with attention: chains"
        why = isa.misc_operand_error(ins) or isa.dynamic_operand_error(ins, regs)
        if why:
            return isa.STATUS_ILLEGAL, why
        hbm, chip = self._ranges(ins, regs)
        for a, ln in hbm:
            if ln and (a < 0 or a + ln > self.hbm_size):
                return isa.STATUS_HBM_RANGE, f"HBM [{a:#x}, +{ln}) beyond {self.hbm_size:#x}"
        if ins.op in ("MV", "MM"):
            why = self._weight_error(ins, regs)
            if why:
                return isa.STATUS_BUF_RANGE, why
            chip = chip[1:]
        for a, ln in chip:
            if ln and a + ln > self.onchip_size:
                return isa.STATUS_BUF_RANGE, f"on-chip [{a:#x}, +{ln}) beyond {self.onchip_size:#x}"
        return None

    def _regs(self, pos, token, ntok=1):
        r = [0] * isa.NREGS
        for k, v in self.base_regs.items():
            r[k] = int(v)
        for k, v in isa.run_registers(pos, token, ntok).items():
            r[k] = v
        return r

    def check(self, pos: int, token: int = 0, program: str = "decode") -> RunResult | None:
        """The error status a run at (pos, token) ends with, or None if it runs clean."""
        p = self.program(program)
        if p.static_fault and p.static_fault[0] == isa.STATUS_ILLEGAL:
            # everything before the illegal word is still checked first
            lim = p.static_fault[1]
        else:
            lim = len(p.instrs)
        regs = self._regs(pos, token, p.ntok)
        if p.dyn is None:
            # instructions whose ranges do not depend on the per-token registers are checked once
            p.dyn = []
            p.static_err = None
            r0 = self._regs(0, 0, p.ntok)
            for pc in range(min(lim, len(p.instrs))):
                ins = p.instrs[pc]
                f = ins.fields
                dyn = any(f.get(k, 0) in isa.RUN_REGS
                          for k in ("hreg", "ireg", "lreg", "rreg", "creg")) or (
                    ins.op == "MISC" and (isa.MISC_NAMES[f["func"]] == "ATTN" or f["reg"]))
                if dyn:
                    p.dyn.append(pc)
                elif p.static_err is None:
                    r = self._check(ins, pc, r0)
                    if r:
                        p.static_err = (pc, r)
        first = None
        if p.static_err:
            first = p.static_err
        for pc in p.dyn:
            if first and pc > first[0]:
                break
            r = self._check(p.instrs[pc], pc, regs)
            if r:
                first = (pc, r)
                break
        if first:
            return RunResult(first[1][0], first[0], first[1][1])
        if p.static_fault:
            return RunResult(*p.static_fault)
        return None

    # ---- plan (sim/golden_plan.py) --------------------------------------------------------
    def _build_plan(self, p: _Program):
        """Plan the program ``p``: its execution order -> ``p.plan``, a list of steps
        (sim/golden_plan.py); fused products when ``fast``."""
        Planner(self, p).plan()

    def _note_hbm_write(self, addr, ln):
        """A run stored into HBM: if fused products read those bytes, later plans re-read them."""
        lo, hi = self._fused_span
        if addr < hi and lo < addr + ln and overlaps(addr, addr + ln, self._fused):
            self._packed = {}                       # private from now on: HBM left the image
            self._fused, self._fused_span = [], (0, 0)
            for q in self.programs.values():
                q.plan, q.row_off = None, {}

    def _reg_max(self, r, regs0, p: _Program):
        """Largest value register ``r`` takes over the runs of this program."""
        if r == isa.REG_POS:
            return self.kv_context - p.ntok
        if r == isa.REG_SEQ:
            return self.kv_context
        if r == isa.REG_TOKEN:
            return int(self.bundle.manifest["model"]["vocab_size"])
        if r in (isa.REG_PTILE, isa.REG_PBASE):
            return isa.run_registers(self.kv_context - p.ntok)[r]
        return regs0[r]

    def _pack(self, hbm_addr, func, tiles, cols):
        """The weights of a run of MV/MM tiles of ``tiles`` rows each, one after the other in
        HBM from ``hbm_addr`` (each ``mv_span`` bytes, slice-major), as one matrix."""
        fmt = isa.FMTS[func & 3]
        sp = isa.SPARSITIES[(func >> 2) & 7]
        nb = cols // 32
        rb = mv_row_bytes(func, cols)
        rows = sum(tiles)
        if self.slices == 1:
            raw = self.hbm[hbm_addr:hbm_addr + rows * rb].reshape(rows, rb)
        else:
            parts, a = [], hbm_addr
            for n in tiles:
                span = isa.mv_span(n, rb, self.slices, self.stripe)
                parts.append(isa.unslice_rows(self.hbm[a:a + span], n, rb, self.slices, self.stripe))
                a += span
            raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
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
                buf = f["buf"] + (regs[f["ireg"]] * f["stride"] if f["func"] == isa.ST_X else 0)
                self.hbm[addr:addr + ln] = self.mem[buf:buf + ln]
            c["st_bytes"] = c.get("st_bytes", 0) + ln
            self._note_hbm_write(addr, ln)
        elif op in ("MV", "MM"):
            fmt = isa.FMTS[f["func"] & 3]
            sp = isa.SPARSITIES[(f["func"] >> 2) & 7]
            rows, cols = isa.mv_shape(f, regs)
            if rows == 0:
                return
            nb = cols // 32
            if nb == 0:                     # an empty sum: +0.0 per row
                self.f32(f["dst"], rows)[:] = 0.0
                return
            span = self.mv_span(f["func"], rows, cols)
            raw = isa.operand_rows(self.mem[f["wb"]:f["wb"] + span], f["func"], rows, cols,
                                   self.slices, self.stripe)
            W = _unpack_weights(fmt, sp, raw, rows, nb)
            for t in range(f["ntok"] if op == "MM" else 1):
                self._mv(W, f["qsrc"] + t * nb * QBLOCK_BYTES, f["dst"] + t * rows * 4, cols)
        elif op == "MISC":
            self._misc(isa.MISC_NAMES[f["func"]], f, regs)

    def _read_q(self, qsrc, nb, ntok=0):
        """The quantized vector at qsrc (ntok = 0), or ntok of them one after the other."""
        if ntok == 0:
            q = self.mem[qsrc:qsrc + nb * 32].view(np.int8).reshape(nb, 32)
            d = self.mem[qsrc + nb * 32:qsrc + nb * 36].view(np.float32)
            s = self.mem[qsrc + nb * 36:qsrc + nb * 40].view(np.int32)
            return q, d, s
        v = self.mem[qsrc:qsrc + ntok * nb * QBLOCK_BYTES].reshape(ntok, nb * QBLOCK_BYTES)
        q = v[:, :nb * 32].view(np.int8).reshape(ntok, nb, 32)
        d = np.ascontiguousarray(v[:, nb * 32:nb * 36]).view(np.float32)
        s = np.ascontiguousarray(v[:, nb * 36:]).view(np.int32)
        return q, d, s

    def _mv(self, W, qsrc, dst, cols):
        nb = cols // 32
        y = matvec(W, None, act=self._read_q(qsrc, nb))
        self.f32(dst, W.rows)[:] = y
        self.counters["macs"] = self.counters.get("macs", 0) + W.rows * cols

    def _misc(self, name, f, regs):
        n = isa.misc_len(f, regs)
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
            eps, _, inv_n = self.f32(self.gb_base, 3)
            y = N.rms_norm(self.f32(f["a"], n).copy(), self.f32(f["b"], n).copy(), eps, inv_n)
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
            reps, w, stride = isa.copy_operands(f)
            src = self.f32(f["a"], reps * w).copy().reshape(reps, w)
            if reps == 1:
                self.f32(f["dst"], w)[:] = src[0]
            else:
                # row r goes to dst + 4*r*stride (the whole source is read first)
                out = self.f32(f["dst"], (reps - 1) * stride + w)
                np.lib.stride_tricks.as_strided(out, (reps, w), (4 * stride, 4))[:] = src
        elif name == "EMBED":
            fmt = isa.FMTS[f["aux"]]
            nb = n // 32
            raw = self.mem[f["a"]:f["a"] + nb * BLOCK_BYTES[fmt]]
            q, d, m = quant.split_blocks(fmt, raw)
            v = N.fmul(q.astype(np.float32), N.from_f16(d)[:, None])
            if m is not None:
                v = N.fadd(v, N.from_f16(m)[:, None])
            self.f32(f["dst"], n)[:] = v.reshape(-1)
        elif name == "SOFTMAX":
            scale = self.f32(self.gb_base + 4, 1)[0]
            p = N.softmax(N.fmul(self.f32(f["a"], n), scale)) if n else np.zeros(0, np.float32)
            out = self.f32(f["dst"], -(-n // 32) * 32)
            out[:n] = p
            out[n:] = 0.0
        elif name == "KVROW":
            self._kvrow(f, regs)
        elif name == "ATTN":
            nh, t, hd, cached = isa.attn_operands(f)
            S = regs[f["reg"]] + t                  # rows read from the cache before position S
            rows = S + (1 if cached else 0)
            scale = self.f32(self.gb_base + 4, 1)[0]
            a = f["a"]
            qh = self.f32(a, nh * hd).copy().reshape(nh, hd)
            K = self.mem[f["b"]:f["b"] + 2 * rows * hd].view(np.float16).reshape(rows, hd)
            vb = f["b"] + 2 * self.kv_context * hd
            V = self.mem[vb:vb + 2 * rows * hd].view(np.float16).reshape(rows, hd)
            if not cached:
                # the current K and V rows follow the queries, rounded as the cache stores them
                kc = N.to_f16(self.f32(a + 4 * nh * hd, hd))
                vc = N.to_f16(self.f32(a + 4 * (nh + 1) * hd, hd))
                K = np.concatenate([K, kc[None]], 0)
                V = np.concatenate([V, vc[None]], 0)
            o = attention(qh, K[:, None, :], V[:, None, :], scale, nh)
            self.f32(f["dst"], nh * hd)[:] = o.reshape(-1)

    def _kvrow(self, f, regs):
        """KVROW (docs/isa.md, "Attention on the chains"): the current K row (Q8_0 blocks) into
        row S % 32 of K tile S // 32, the current V row (int8, one scale) into column S % 32
        of V tile S // 32 (its q byte only: MV_BT takes the blocks' d as 1.0) and its scale into
        the scale array, S = R[reg] + aux."""
        hd = f["n"]
        S = regs[f["reg"]] + f["aux"]
        kv = isa.kv_region(hd, self.kv_context, self.slices, self.stripe)
        ti, r = divmod(S, isa.TILE_ROWS)
        base = f["dst"]
        k = self.f32(f["a"], hd).copy()
        v = self.f32(f["a"] + 4 * hd, hd).copy()
        kq, kd = N.quantize_q8_0(k)
        krow = np.concatenate([np.concatenate([kd[b:b + 1].view(np.uint8), kq[b].view(np.uint8)])
                               for b in range(hd // 32)])
        off = isa.row_address(r, krow.size, self.slices, self.stripe)
        self.mem[base + kv["k"] + ti * kv["k_tile"] + off] = krow
        vq, vd = N.quantize_row(v)
        vt = base + kv["v"] + ti * kv["v_tile"]
        off = isa.row_address(np.arange(hd), 34, self.slices, self.stripe)   # [hd, 34]
        self.mem[vt + off[:, 2 + r]] = vq.view(np.uint8)
        self.f32(base + kv["scale"] + 4 * S, 1)[0] = vd

    def run(self, pos: int, token: int = 0, program: str = "decode") -> RunResult:
        """Run a program once: decode (token ``token`` at position ``pos``) or a prefill
        program (the tokens staged in the I/O region at positions ``pos`` ..)."""
        p = self.program(program)
        fault = self.check(pos, token, program)
        if fault:
            return fault
        if p.plan is None:
            self._build_plan(p)
        regs = self._regs(pos, token, p.ntok)
        self.counters["runs"] += 1
        out = self._run_out
        c = self.counters
        for st in p.plan:
            t = type(st)
            if t is MvWrite:
                ne = max(st.ntok, 1)
                self.f32(st.dst, ne * st.rows).reshape(ne, st.rows)[:] = out[st.first][:, st.r0:st.r0 + st.rows]
            elif t is MvRun:
                ne = max(st.ntok, 1)
                out[st.pc] = matmat(st.W, self._read_q(st.qsrc, st.cols // 32, ne))
                c["macs"] = c.get("macs", 0) + st.W.rows * st.cols * ne
            elif t is MvScatter:
                # MM tiles into the stage, each scattered by COPY to rows r0.. of ntok vectors
                res = out[st.first]
                nt, nr = st.ntok, st.rows
                for sa, sr0, snr in st.stages:
                    self.f32(sa, nt * snr).reshape(nt, snr)[:] = res[:, sr0:sr0 + snr]
                v = self.f32(st.dst, (nt - 1) * st.stride + nr)
                np.lib.stride_tricks.as_strided(v, (nt, nr), (4 * st.stride, 4))[:] = res[:, st.r0:st.r0 + nr]
            elif t is MvStore:
                # k tiles of nr rows streamed to HBM, each [ne][nr] (tile-major)
                ne, nr, k, addr = max(st.ntok, 1), st.rows, st.tiles, st.addr
                blk = out[st.first][:, st.r0:st.r0 + k * nr].reshape(ne, k, nr).transpose(1, 0, 2)
                self.hbm[addr:addr + 4 * ne * nr * k].view(np.float32).reshape(k, ne, nr)[:] = blk
                c["st_bytes"] = c.get("st_bytes", 0) + 4 * ne * nr * k
                self._note_hbm_write(addr, 4 * ne * nr * k)
            else:                                   # Load, Exec
                self._exec(p.instrs[st.pc], regs)
        return RunResult(isa.STATUS_OK)

    # ---- host side: logits, prefill staging ------------------------------------------------
    def logits(self) -> np.ndarray:
        """The logits of the last decode run (``[vocab]`` float32)."""
        io = int(self.bundle.manifest["memory_map"]["logits"][0])
        n = int(self.bundle.manifest["model"]["vocab_size"])
        return self.hbm[io:io + 4 * n].view(np.float32).copy()

    def stage_tokens(self, tokens) -> None:
        """What the host does before a prefill run: write the raw embedding rows (GGUF
        blocks, from the bundle's weight image) of ``tokens`` into the I/O region."""
        vocab = int(self.bundle.manifest["model"]["vocab_size"])
        for tok in tokens:
            if not 0 <= int(tok) < vocab:
                raise SimError(f"token id {int(tok)} out of range (vocab size {vocab})")
        for addr, row in self.bundle.prefill_token_rows(tokens):
            self.hbm[addr:addr + row.size] = row

    def prefill(self, pos: int, tokens, program: str | None = None, *, logits: bool | str = True) -> RunResult:
        """Stage ``tokens`` and run the prefill program of bucket ``len(tokens)`` at ``pos``
        (``logits=False``: its KV-only twin, which leaves no logits; ``"last"``: its
        last-logits twin, which leaves the last token's)."""
        self.bundle.check_prefill_start(pos, len(tokens))
        self.stage_tokens(tokens)
        return self.run(pos, 0, program or prefill_program(len(tokens), logits))

    def prefill_logits(self, ntok: int) -> np.ndarray:
        """The logits of the last ``ntok``-token prefill run, ``[ntok, vocab]`` in token order
        (un-tiled from the tile-major I/O layout)."""
        return self.bundle.prefill_logits(ntok, lambda a, n: self.hbm[a:a + n])

    def instruction_counts(self, program: str = "decode") -> dict:
        out = {}
        for ins in self.program(program).instrs:
            out[ins.op] = out.get(ins.op, 0) + 1
        return out


_SAFE = np.float32(2.0 ** -102)


def matmat(W: PackedMatrix, act) -> np.ndarray:
    """``matvec`` for ``ntok`` quantized vectors at once: ``[ntok, rows]``, the same bits per token.

    ``act = (q [ntok, nb, 32], d [ntok, nb], sumq [ntok, nb])``. The block dot products
    are exact integers (any summation order gives the same float32 value; zero sums are
    made +0 as einsum gives them), every later step is elementwise, and ``accum4`` runs
    over the block axis as in ``matvec``. When every nonzero block value is at least
    2**-102 (and finite), neither the multiply's flush nor accum4's can fire, and plain
    float32 arithmetic gives those bits (the fast path of ``numerics.accum4``).
    """
    qx, dx, sumq = act
    xf = np.transpose(qx.astype(np.float32), (1, 0, 2))               # [nb, T, 32]
    dxt = np.asarray(dx, np.float32).T[:, :, None]                    # [nb, T, 1]
    sq = sumq.T.astype(np.float32)[:, :, None] if W.fmt == "q4_1" and W.mask is None else None
    nb, ntok = xf.shape[:2]
    step = max(256, (1 << 18) // (nb * ntok))                          # rows per cache-sized chunk
    if W.rows <= step:
        return _matmat_rows(W, xf, dxt, sq, slice(None))
    return np.concatenate([_matmat_rows(W, xf, dxt, sq, slice(r, r + step))
                           for r in range(0, W.rows, step)], axis=1)


def _matmat_rows(W, xf, dxt, sq, rs):
    v = np.matmul(xf, np.transpose(W.qf[:, rs], (0, 2, 1)))           # [nb, T, rows] isum
    v += np.float32(0)
    v *= W.d[:, None, rs]
    if W.fmt == "q4_1":
        if W.mask is not None:
            sq = np.matmul(xf, np.transpose(W.mask[:, rs], (0, 2, 1)))
        v += W.m[:, None, rs] * sq
    v *= dxt                                                           # fmul(t, d_x) before the flush
    a = np.abs(v)
    if not (((a < _SAFE) & (a != 0)).any() or not np.isfinite(a).all()):
        nb = v.shape[0]
        full = nb // 4 * 4
        p = np.zeros((4,) + v.shape[1:], np.float32)
        for i in range(0, full, 4):
            p += v[i:i + 4]
        tail = v[full:]
        p[:len(tail)] += tail
        return (p[0] + p[1]) + (p[2] + p[3])
    return N.accum4(N.ftz(v), axis=0)


def _unpack_weights(fmt, sp, raw, rows, nb) -> PackedMatrix:
    raw = np.asarray(raw, np.uint8)
    if sp == "dense":
        q, d, m = quant.split_blocks(fmt, raw.reshape(rows, -1))
        return PackedMatrix(fmt, q, d, m)
    n, mm = formats.pattern(sp)
    K = formats.kept_weights(sp)
    vals, idx, d, m = sparse.decode_sparse_rows(fmt, raw, sp, nb)
    per = K // (32 // mm)
    pos = (np.arange(K) // per) * mm + idx                     # [rows, nb, K]
    q = np.zeros((rows, nb, 32), np.int8)
    mask = np.zeros((rows, nb, 32), bool)
    np.put_along_axis(q, pos, vals.astype(np.int8), axis=-1)
    np.put_along_axis(mask, pos, True, axis=-1)
    return PackedMatrix(fmt, q, d, m, mask)
