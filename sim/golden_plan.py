"""The golden model's execution planner: a program's execution order -> a plan of steps.

The interpreter (sim/golden.py) is the specification: it executes instructions one
by one in the order the token simulation gives. Executed that way a SmolLM2 token
costs thousands of small numpy products, so the golden model runs a *plan*
instead, which leaves exactly the same on-chip and HBM bytes (except the weight
buffer, whose loads the fused products skip):

- matrix-vector (MV) and matrix-matrix (MM) products whose weights come straight
  from static weight loads read their weights from HBM (unpacked once per bundle,
  each tile de-interleaved from its slice-major layout, docs/isa.md "Slices"),
  and a run of them with the same input and contiguous weights (each tile starting
  where the previous one's span ends) is one product (:class:`MvRun`) whose rows
  each instruction then writes (:class:`MvWrite`);
- weight loads only fused products read are dropped; the other instructions
  execute as they are (:class:`Load`, :class:`Exec`);
- a COPY that scatters a staged MM tile (:class:`MvScatter`) or an ST that streams a
  logits tile to HBM (:class:`MvStore`) takes the rows from the product in memory;
  writes a later write covers before anything reads them are dropped, and
  contiguous writes of one product merge.

Every rewrite checks that the steps it moves past touch none of the moved ranges.
A program that may store into the weights it reads gets the plain plan (every
instruction, :class:`Load` and :class:`Exec` only). ``Golden(bundle, fast=False)``
plans without fusion: the specification path.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import NamedTuple, Union

from llmfab.compiler import isa
from llmfab.core import formats
from llmfab.core.formats import QBLOCK_BYTES
from llmfab.sim.numerics_model import PackedMatrix

_DYN_REGS = isa.RUN_REGS                                 # registers that change from run to run
_ALL = [(0, 1 << 62)]                                     # "anywhere" (a register moves it)
_LOOK = 24      # how far the fusion passes look for a partner step


def mv_row_bytes(func, cols) -> int:
    """Bytes of one weight row of an MV/MM (``func``, ``cols``); a tile of rows takes
    ``isa.mv_span`` bytes (docs/isa.md, "Slices")."""
    return (cols // 32) * isa.func_block_bytes(func)


def onchip_ranges(ins, regs, *, gb_base: int, kv_context: int, slices: int, stripe: int) -> list:
    """The on-chip ranges, ``(start, length)``, an instruction touches (reads or writes): the
    validation pass's ranges (``Golden._ranges``), and what the execution unit compares to
    decide whether a MISC may run beside an MV/MM (docs/isa.md, "Overlap")."""
    f = ins.fields
    op = ins.op
    if op in ("LD", "ST"):
        ln = f["len"] + regs[f["lreg"]] * f["lmul"]
        if op == "ST" and f["func"] == isa.ST_X:
            return [(f["buf"] + regs[f["ireg"]] * f["stride"], ln)]
        return [(f["buf"], 2 * ln if op == "ST" and f["func"] == isa.ST_F16 else ln)]
    if op in ("MV", "MM"):
        nt = f.get("ntok", 1) if op == "MM" else 1
        rows, cols = isa.mv_shape(f, regs)
        return [(f["wb"], isa.weight_span(f["func"], rows, cols, slices, stripe)),
                (f["qsrc"], nt * cols // 32 * QBLOCK_BYTES),
                (f["dst"], nt * rows * 4)]
    if op != "MISC":
        return []
    name = isa.MISC_NAMES[f["func"]]
    n = isa.misc_len(f, regs)
    kv = isa.kv_region(f["n"], kv_context, slices, stripe) if name == "KVROW" else None
    out = (f["dst"], isa.misc_write_bytes(f, regs, kv))
    if name == "KVROW":
        return [(f["a"], 8 * f["n"]), out]
    if name == "SOFTMAX":
        return [(f["a"], 4 * n), out, (gb_base, 8)]
    if name == "QUANT":
        return [(f["a"], 4 * n), out]
    if name in ("ADD", "MUL", "SILU_MUL"):
        return [(f["a"], 4 * n), (f["b"], 4 * n), out]
    if name == "RMSNORM":
        return [(f["a"], 4 * n), (f["b"], 4 * n), out, (gb_base, 12)]
    if name == "ROPE":
        hd = f["aux"]
        return [(f["a"], 4 * n * hd), (f["b"], 4 * hd), out]
    if name == "COPY":
        reps, w, _stride = isa.copy_operands(f)
        return [(f["a"], 4 * reps * w), out]
    if name == "EMBED":
        fmt = isa.FMTS[f["aux"]] if f["aux"] < 3 else None
        return [(f["a"], n // 32 * formats.BLOCK_BYTES.get(fmt, 1 << 24)), out]
    if name == "ATTN":
        nh, t, hd, cached = isa.attn_operands(f)
        rows = regs[f["reg"]] + t + (1 if cached else 0)
        return [(f["a"], 4 * (nh + (0 if cached else 2)) * hd), (f["b"], 2 * rows * hd),
                (f["b"] + 2 * kv_context * hd, 2 * rows * hd), out, (gb_base, 8)]
    return []

# ---- steps -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    """Execute the LD at ``pc``."""
    pc: int


@dataclass(frozen=True)
class Exec:
    """Execute the instruction at ``pc`` (not an LD)."""
    pc: int


@dataclass(frozen=True, eq=False)
class MvRun:
    """Compute one product: the weights ``W`` (the tiles of a run of fused MV/MM
    instructions, the first at ``pc``) times the ``ntok`` quantized vectors at ``qsrc``
    (``ntok`` 0: one vector, an MV); the result ``[max(ntok, 1), W.rows]`` is kept by ``pc``."""
    pc: int
    W: PackedMatrix
    qsrc: int
    cols: int
    ntok: int


@dataclass(frozen=True)
class MvWrite:
    """Write rows ``r0 .. r0+rows`` of product ``first`` to on-chip ``dst`` (``[ntok][rows]``
    float32; the instruction at ``pc`` writes them)."""
    pc: int
    first: int
    r0: int
    rows: int
    dst: int
    ntok: int


@dataclass(frozen=True)
class MvScatter:
    """Rows ``r0 .. r0+rows`` of product ``first``, ``ntok`` vectors, scattered to on-chip
    ``dst`` with a row stride of ``stride`` words (the COPY of staged MM tiles); ``stages``
    are the stage writes it replaces, ``(address, r0, rows)``, written first in order."""
    first: int
    r0: int
    rows: int
    ntok: int
    dst: int
    stride: int
    stages: tuple


@dataclass(frozen=True)
class MvStore:
    """``tiles`` tiles of ``rows`` rows of product ``first`` from row ``r0``, each
    ``[max(ntok, 1)][rows]`` float32, stored one after the other to HBM at ``addr``
    (the logits STs, tile-major)."""
    first: int
    r0: int
    rows: int
    ntok: int
    addr: int
    tiles: int


Step = Union[Load, Exec, MvRun, MvWrite, MvScatter, MvStore]


# ---- ranges ------------------------------------------------------------------------------

def merge_ranges(ranges):
    """Sorted, disjoint, merged [(start, end)]."""
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlaps(a, b, merged) -> bool:
    """Does [a, b) overlap one of the merged ranges?"""
    i = bisect.bisect_right(merged, (b, -1)) - 1     # last range starting before b
    return i >= 0 and merged[i][1] > a and a < b


def _hit(ranges, others):
    return any(a < d and c < b for a, b in ranges for c, d in others)


class _Written(NamedTuple):
    """On-chip bytes [start, end) last written by the LD at ``pc`` (-1: by another writer)."""
    start: int
    end: int
    pc: int


def _overlap(w, a, ln):
    """Does the interval ``w`` overlap [a, a + ln)?"""
    return not (w.end <= a or w.start >= a + ln)


def _st_span(ins, regs0):
    """HBM bytes an ST may write, [start, end) (to infinity when a register moves it)."""
    f = ins.fields
    lo = regs0[f["hreg"]] + f["hoff"] * isa.HBM_ALIGN
    if f["hreg"] in _DYN_REGS or f["ireg"] or f["lreg"]:
        return (lo if f["hreg"] not in _DYN_REGS else 0, 1 << 62)
    return (lo, lo + f["len"])


# ---- the planner -----------------------------------------------------------------------

class Planner:
    """Plans one program of a :class:`~llmfab.sim.golden.Golden`.

    It reads the interpreter's address ranges (``golden._ranges``), registers and
    weight unpacking, and shares the bundle's cache of unpacked weights
    (``golden._packed``); :meth:`plan` records the HBM ranges fused products read in
    ``golden._fused`` (a store into them invalidates the plans).
    """

    def __init__(self, golden, program):
        self.g = golden
        self.p = program
        self.instrs = program.instrs
        self.regs0 = golden._regs(0, 0, program.ntok)
        self.absorbed = set()

    def plan(self) -> None:
        """Set ``program.plan`` (and ``fast_mv``, ``row_off``)."""
        g, p, instrs = self.g, self.p, self.instrs
        fast_mv, ld_needed = self._fast_products()
        merged, self.absorbed = self._token_groups(fast_mv)
        if merged:
            self.instrs = instrs = [merged.get(pc, ins) for pc, ins in enumerate(instrs)]
        runs, run_of = self._runs(fast_mv)
        fused = []
        for pc, a in fast_mv.items():
            f = instrs[pc].fields
            fused.append((a, a + g.mv_span(f["func"], f["rows"], f["cols"])))
        fused = merge_ranges(fused)
        st_spans = [_st_span(instrs[pc], self.regs0) for pc in p.order if instrs[pc].op == "ST"]
        if any(overlaps(a, b, fused) for a, b in st_spans):
            # the program may store into weights it reads: execute it instruction by instruction
            p.plan = [Load(pc) if instrs[pc].op == "LD" else Exec(pc) for pc in p.order]
            return
        if fused:
            g._fused = merge_ranges(g._fused + fused)
            g._fused_span = (g._fused[0][0], g._fused[-1][1])
        steps = self._steps(fast_mv, ld_needed, runs, run_of)
        p.plan = self._fuse_writes(steps) if g.fast else steps
        p.fast_mv = fast_mv

    # -- fused products ------------------------------------------------------------------
    def _fast_products(self):
        """({MV/MM pc: HBM address of its weights} for the products that can read their
        weights from HBM, {LD pcs whose bytes a non-fused reader needs})."""
        g, p, instrs, regs0 = self.g, self.p, self.instrs, self.regs0
        wb_lo = int(g.bundle.manifest["onchip"]["weight"][0])
        # the live writes of on-chip intervals
        wb_writes = []
        ld_needed = set()
        ld_static = {}
        fast_mv = {}
        for pc in p.order:
            ins = instrs[pc]
            f = ins.fields
            if ins.op == "LD":
                start = f["buf"]
                dynamic = f["ireg"] != 0 or f["lreg"] != 0 or f["hreg"] in _DYN_REGS
                end = start + f["len"] + f["lmul"] * g._reg_max(f["lreg"], regs0, p)
                # an earlier write stays live unless this one covers it completely
                wb_writes = [w for w in wb_writes if not (start <= w.start and w.end <= end)]
                wb_writes.append(_Written(start, end, pc))
                if not dynamic:
                    ld_static[pc] = regs0[f["hreg"]] + f["hoff"] * isa.HBM_ALIGN
                else:
                    ld_needed.add(pc)
                continue
            _, chip = g._ranges(ins, regs0)
            reads = []
            writes = []
            if ins.op in ("MV", "MM"):
                reads = chip[:2]
                writes = chip[2:]
                wa, wl = chip[0]
                cover = [w for w in wb_writes if _overlap(w, wa, wl)]
                # the latest write overlapping the weights decides: fast if it is one static LD
                # that covers them all (and is not the host-staged I/O region)
                latest = cover[-1] if cover else None
                if g.fast and latest is not None and latest.pc in ld_static \
                        and latest.start <= wa and wa + wl <= latest.end:
                    fast_mv[pc] = ld_static[latest.pc] + (wa - latest.start)
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
                    if _overlap(w, a, ln):
                        ld_needed.add(w.pc)
            for a, ln in writes:
                wb_writes = [w for w in wb_writes if not (a <= w.start and w.end <= a + ln)]
                if a + ln > wb_lo:
                    wb_writes.append(_Written(a, a + ln, -1))
        return fast_mv, ld_needed

    def _regs_max(self):
        """The registers at their largest (the last run's position, the vocabulary's last
        token): the ranges a step may touch in any run."""
        g, T = self.g, self.p.ntok
        return g._regs(g.kv_context - T, int(g.bundle.manifest["model"]["vocab_size"]), T)

    def _token_groups(self, fast_mv):
        """A prefill program's first or last tile of a matrix token by token (one token lane:
        compiler/program.py ``ProgramBuilder._mm``): T fast MVs, in order, of one weight tile
        (same HBM weights, format, shape), token ``t``'s vector at ``qsrc + t nb 40`` and its
        rows to ``dst + t rows 4``, with the next token's inputs made between them. Where
        nothing between MV ``t`` and the last reads or writes MV ``t``'s rows, or writes its
        vector, they are the MM of the T tokens at the last one, which then joins the
        matrix's other tiles' run. Returns ({last MV's pc: that MM}, {the other MVs' pcs})."""
        p, instrs, T = self.p, self.instrs, self.p.ntok
        if T < 2:
            return {}, set()
        regs_max = self._regs_max()
        at = {pc: k for k, pc in enumerate(p.order)}
        mvs = [pc for pc in p.order if instrs[pc].op == "MV" and pc in fast_mv]
        merged, absorbed = {}, set()
        k = 0
        while k + T <= len(mvs):
            grp = mvs[k:k + T]
            f0 = instrs[grp[0]].fields
            rows, nb = f0["rows"], f0["cols"] // 32
            same = all(instrs[q].fields["func"] == f0["func"] and instrs[q].fields["cols"] == f0["cols"]
                       and instrs[q].fields["rows"] == rows and fast_mv[q] == fast_mv[grp[0]]
                       and instrs[q].fields["qsrc"] == f0["qsrc"] + t * nb * QBLOCK_BYTES
                       and instrs[q].fields["dst"] == f0["dst"] + t * rows * 4 for t, q in enumerate(grp))
            if not same:
                k += 1
                continue
            safe = True
            for t, q in enumerate(grp[:-1]):
                src = (f0["qsrc"] + t * nb * QBLOCK_BYTES, f0["qsrc"] + (t + 1) * nb * QBLOCK_BYTES)
                out = (f0["dst"] + t * rows * 4, f0["dst"] + (t + 1) * rows * 4)
                for pc in p.order[at[q] + 1:at[grp[-1]]]:
                    if pc in grp:
                        continue
                    r, w, _, _ = self._access(Exec(pc), regs_max)
                    if _hit([out], r + w) or _hit([src], w):
                        safe = False
                        break
                if not safe:
                    break
            if not safe:
                k += 1
                continue
            merged[grp[-1]] = isa.make("MM", **dict(instrs[grp[-1]].fields, ntok=T, qsrc=f0["qsrc"],
                                                    dst=f0["dst"]))
            absorbed.update(grp[:-1])
            k += T
        return merged, absorbed

    def _runs(self, fast_mv):
        """Runs: fast MVs (or MMs) in execution order with the same input, format, width and
        token count, whose weights are contiguous in HBM, and whose input is not written in
        between, are computed as one product at the first one; each then writes its rows at
        its own place in the order. Returns ({first pc: [pcs]}, {pc: first pc of its run})."""
        instrs, regs0 = self.instrs, self.regs0
        runs = {}
        run_of = {}
        cur = None
        for pc in self.p.order:
            if pc in self.absorbed:
                continue
            ins = instrs[pc]
            f = ins.fields
            if ins.op in ("MV", "MM") and pc in fast_mv:
                if cur is not None:
                    h0 = instrs[cur[0]]
                    h = h0.fields
                    lastf = instrs[cur[-1]].fields
                    # the next tile starts where the last one's bytes (its span) end
                    if (ins.op == h0.op and f.get("ntok", 1) == h.get("ntok", 1)
                            and f["func"] == h["func"] and f["cols"] == h["cols"] and f["qsrc"] == h["qsrc"]
                            and fast_mv[pc] == fast_mv[cur[-1]] + self.g.mv_span(h["func"], lastf["rows"], h["cols"])):
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
            h = instrs[cur[0]].fields
            qa, ql = h["qsrc"], h.get("ntok", 1) * h["cols"] // 32 * QBLOCK_BYTES
            _, chip = self.g._ranges(ins, regs0)
            if ins.op == "LD":
                wr = chip
            elif ins.op in ("MV", "MM", "MISC"):
                wr = [c for c in chip if c[0] == f.get("dst", -1)]
            else:
                wr = []
            if any(not (a + ln <= qa or a >= qa + ql) for a, ln in wr):
                cur = None
        return runs, run_of

    def _steps(self, fast_mv, ld_needed, runs, run_of):
        """The steps in execution order: LDs that are needed, one :class:`MvRun` per run and
        one :class:`MvWrite` per fused instruction, the rest as :class:`Exec`."""
        g, p, instrs = self.g, self.p, self.instrs
        cache = g._packed
        steps = []
        for pc in p.order:
            if pc in self.absorbed:
                continue
            ins = instrs[pc]
            if ins.op == "LD":
                if pc in ld_needed or not g.fast:
                    steps.append(Load(pc))
                continue
            if ins.op in ("MV", "MM") and pc in run_of:
                first = run_of[pc]
                f = ins.fields
                nt = f.get("ntok", 1) if ins.op == "MM" else 0
                if pc == first:
                    run = runs[first]
                    tiles = tuple(instrs[q].fields["rows"] for q in run)
                    key = (fast_mv[pc], f["func"], tiles, f["cols"])
                    if key not in cache:
                        cache[key] = g._pack(fast_mv[pc], f["func"], tiles, f["cols"])
                    steps.append(MvRun(pc, cache[key], f["qsrc"], f["cols"], nt))
                    off = 0
                    for q in run:
                        p.row_off[q] = off
                        off += instrs[q].fields["rows"]
                steps.append(MvWrite(pc, first, p.row_off[pc], f["rows"], f["dst"], nt))
                continue
            steps.append(Exec(pc))
        # adjacent row writes of one MV run into contiguous destinations become one copy
        merged = []
        for st in steps:
            if isinstance(st, MvWrite) and merged and isinstance(merged[-1], MvWrite) and st.ntok == 0:
                o = merged[-1]
                if st.first == o.first and st.r0 == o.r0 + o.rows and st.dst == o.dst + 4 * o.rows:
                    merged[-1] = replace(o, rows=o.rows + st.rows)
                    continue
            merged.append(st)
        return merged

    # -- write fusion ------------------------------------------------------------------------
    # The results of a fused product are in memory (numpy), so a COPY that scatters a staged
    # MM tile, or an ST that streams a logits tile to HBM, can take them from there; writes
    # that a later write covers before anything reads them are dropped, and the remaining row
    # writes of one product into contiguous places merge. Every rewrite checks that the steps
    # it moves past touch none of the moved ranges, so the final on-chip and HBM contents are
    # those of executing the instructions one by one.

    def _access(self, st, regs_max):
        """(on-chip reads, on-chip writes, HBM reads, HBM writes) of a plan step: [(start, end)]."""
        if isinstance(st, MvWrite):
            return [], [(st.dst, st.dst + 4 * max(st.ntok, 1) * st.rows)], [], []
        if isinstance(st, MvRun):
            return [(st.qsrc, st.qsrc + max(st.ntok, 1) * st.cols // 32 * QBLOCK_BYTES)], [], [], []
        if isinstance(st, MvScatter):
            w = [(st.dst, st.dst + 4 * ((st.ntok - 1) * st.stride + st.rows))]
            w += [(sa, sa + 4 * st.ntok * snr) for sa, _, snr in st.stages]
            return [], w, [], []
        if isinstance(st, MvStore):
            return [], [], [], [(st.addr, st.addr + 4 * max(st.ntok, 1) * st.rows * st.tiles)]
        ins = self.instrs[st.pc]
        f = ins.fields
        if ins.op == "SYS":
            return [], [], [], []
        hbm, chip = self.g._ranges(ins, regs_max)
        chip = [(a, a + ln) for a, ln in chip]
        if ins.op == "ST" and f["func"] == isa.ST_X:
            # an indexed on-chip source moves with the registers: every place it may be
            _, lo = self.g._ranges(ins, self.regs0)
            chip = [(min(a, c), max(b, c + ln)) for (a, b), (c, ln) in zip(chip, lo)]
        if ins.op in ("LD", "ST"):
            static = f["ireg"] == 0 and f["lreg"] == 0 and f["hreg"] not in _DYN_REGS
            h = [(a, a + ln) for a, ln in hbm] if static else _ALL
            return ([], chip, h, []) if ins.op == "LD" else (chip, [], [], h)
        return chip, chip, [], []

    def _fuse_writes(self, steps):
        instrs = self.instrs
        regs_max = self._regs_max()
        acc = lambda st: self._access(st, regs_max)          # noqa: E731
        # A: COPY scattering a staged MM tile -> MvScatter (from the product, plus the stage)
        out = []
        for st in steps:
            if isinstance(st, Exec) and instrs[st.pc].op == "MISC" and \
                    isa.MISC_NAMES[instrs[st.pc]["func"]] == "COPY":
                f = instrs[st.pc].fields
                reps, w, stride = isa.copy_operands(f)
                # the rows it writes, token by token (a SiLU of other rows may lie between)
                cdst = [(f["dst"] + 4 * r * stride, f["dst"] + 4 * (r * stride + w)) for r in range(reps)]
                csrc = (f["a"], f["a"] + 4 * reps * w)
                for k in range(len(out) - 1, max(len(out) - _LOOK, -1), -1):
                    o = out[k]
                    if isinstance(o, MvWrite):
                        srcr = (o.dst, o.dst + 4 * max(o.ntok, 1) * o.rows)
                        between = [acc(x) for x in out[k + 1:]]
                        if o.ntok > 1 and o.dst == f["a"] and o.ntok == reps and o.rows == w and not any(
                                _hit([srcr] + cdst, b[0] + b[1]) for b in between) \
                                and not _hit([srcr], cdst):
                            out[k] = MvScatter(o.first, o.r0, o.rows, o.ntok, f["dst"], stride,
                                               ((o.dst, o.r0, o.rows),))
                            st = None
                            break
                    # look past loads and steps that touch neither the stage nor the
                    # destination (prefill's tile-wise SiLU between an MM and its COPY; the
                    # next tile's MM into the other stage, which the compiler puts before
                    # this COPY)
                    if not isinstance(o, Load) and _hit([csrc] + cdst, acc(o)[0] + acc(o)[1]):
                        break
                if st is None:
                    continue
            out.append(st)
        steps = out
        # B: ST of a fused product's rows -> MvStore (HBM written from the product)
        out = []
        for st in steps:
            if isinstance(st, Exec) and instrs[st.pc].op == "ST" and instrs[st.pc]["func"] == isa.ST_F32:
                cr, _, _, hw = acc(st)
                if hw != _ALL:
                    for k in range(len(out) - 1, max(len(out) - _LOOK, -1), -1):
                        o = out[k]
                        ocw = acc(o)[1]
                        if not _hit(cr, ocw):
                            continue
                        if isinstance(o, MvWrite) and ocw == cr:
                            st = MvStore(o.first, o.r0, o.rows, o.ntok, hw[0][0], 1)
                        break
            out.append(st)
        steps = out
        # C: drop row writes (and stage writes) that a later row or stage write covers first
        out = list(steps)

        def one_stage(s):
            return isinstance(s, MvScatter) and len(s.stages) == 1

        for i, st in enumerate(out):
            if not (isinstance(st, MvWrite) or one_stage(st)):
                continue
            region = acc(st)[1][-1]
            for j in range(i + 1, min(i + _LOOK, len(out))):
                o = out[j]
                if o is None:
                    continue
                r, w, _, _ = acc(o)
                cover = w[0] if isinstance(o, MvWrite) else (w[-1] if one_stage(o) else None)
                if cover and cover[0] <= region[0] and region[1] <= cover[1] and \
                        not _hit([region], w[:-1] if isinstance(o, MvScatter) else []):
                    out[i] = None if isinstance(st, MvWrite) else replace(st, stages=())
                    break
                if _hit([region], r + w):
                    break
        steps = [st for st in out if st is not None]
        # D, E: merge contiguous scatters / HBM writes of one product
        out = []
        for st in steps:
            if isinstance(st, (MvScatter, MvStore)):
                for k in range(len(out) - 1, max(len(out) - _LOOK, -1), -1):
                    o = out[k]
                    if type(o) is type(st) and o.first == st.first:
                        mine = acc(st)
                        between = [acc(x) for x in out[k + 1:]]
                        # on-chip writes against on-chip accesses, HBM writes against HBM
                        # accesses (the two address spaces overlap numerically)
                        if isinstance(st, MvScatter):
                            safe = not any(_hit(mine[1], b[0] + b[1]) for b in between)
                            ok = (st.ntok == o.ntok and st.stride == o.stride and st.r0 == o.r0 + o.rows
                                  and st.dst == o.dst + 4 * o.rows)
                            if ok and safe:
                                # the scatters merge; the stage writes stay in their order
                                out[k] = replace(o, rows=o.rows + st.rows, stages=o.stages + st.stages)
                                st = None
                        else:
                            safe = not any(_hit(mine[3], b[2] + b[3]) for b in between)
                            ok = (st.ntok == o.ntok and st.rows == o.rows and st.r0 == o.r0 + o.tiles * o.rows
                                  and st.addr == o.addr + 4 * max(o.ntok, 1) * o.rows * o.tiles)
                            if ok and safe:
                                out[k] = replace(o, tiles=o.tiles + 1)
                                st = None
                        break
                if st is None:
                    continue
            out.append(st)
        return out
