"""The instruction set in hardware: ``amaranth.lib.data`` layouts of the 128-bit words, and a decoder.

The layouts are built from ``compiler/isa.py``'s ``(field, width)`` lists (bit 0
upwards), so the compiler, the golden model and the hardware share one
definition (docs/isa.md). :data:`Instruction` is a union over the six classes:
``View(Instruction, word).ld.hoff`` reads the ``hoff`` field of an LD word.

:class:`InstrDecoder` flags illegal encodings exactly as
:func:`llmfab.compiler.isa.decode` does (bad opcode, func, token bits, reserved
bits, MV/MM shape) and says which queue a legal word goes to. The
address-range and MISC-operand checks of ``Golden.check`` live in the
validator (``hw/dispatch.py``), because they need the runtime registers.
"""


from amaranth import Module, Signal
from amaranth.lib import data, enum, wiring
from amaranth.lib.wiring import In, Out

from llmfab.compiler import isa as _isa
from llmfab.core.formats import QBLOCK_BYTES, block_bytes

__all__ = [
    "WORD_BITS", "Op", "Queue", "MiscFunc", "SysFunc", "StFunc", "LAYOUTS", "Header",
    "LdLayout", "StLayout", "MvLayout", "MmLayout", "MiscLayout", "SysLayout", "Instruction",
    "BLOCK_BYTES", "SPARSE_BLOCK_BYTES", "QBLOCK_BYTES", "InstrDecoder", "is_legal",
]

WORD_BITS = _isa.WORD_BITS


class Op(enum.Enum, shape=4):
    """Opcodes (``op`` field); every other value is illegal."""
    LD = _isa.OP_LD
    ST = _isa.OP_ST
    MV = _isa.OP_MV
    MM = _isa.OP_MM
    MISC = _isa.OP_MISC
    SYS = _isa.OP_SYS


class Queue(enum.Enum, shape=2):
    """Where the dispatcher sends a legal word."""
    LD = 0
    CMP = 1
    ST = 2
    SYS = 3


class MiscFunc(enum.Enum, shape=8):
    """MISC (special-function unit) operations (``func`` of a MISC word)."""
    NOP = 0
    QUANT = 1
    RMSNORM = 2
    ROPE = 3
    ADD = 4
    MUL = 5
    SILU_MUL = 6
    ATTN = 7
    COPY = 8
    EMBED = 9
    KVROW = 10
    SOFTMAX = 11


assert {f.name: f.value for f in MiscFunc} == _isa.MISC_FUNCS


class SysFunc(enum.Enum, shape=8):
    """SYS operations."""
    NOP = _isa.SYS_NOP
    SYNC = _isa.SYS_SYNC
    END = _isa.SYS_END


class StFunc(enum.Enum, shape=8):
    """ST operations: raw bytes, or binary32 -> binary16."""
    F32 = _isa.ST_F32
    F16 = _isa.ST_F16
    X = _isa.ST_X


def _struct(fields):
    return data.StructLayout({name: width for name, width in fields})


#: One ``StructLayout`` per opcode, fields from bit 0 upwards (``compiler.isa.LAYOUTS``).
LAYOUTS = {Op(op): _struct(fields) for op, fields in _isa.LAYOUTS.items()}
#: The 16-bit header shared by every word, then the class-specific body.
Header = _struct(_isa.HEADER + [("body", WORD_BITS - 16)])
LdLayout = LAYOUTS[Op.LD]
StLayout = LAYOUTS[Op.ST]
MvLayout = LAYOUTS[Op.MV]
MmLayout = LAYOUTS[Op.MM]
MiscLayout = LAYOUTS[Op.MISC]
SysLayout = LAYOUTS[Op.SYS]
#: A 128-bit word seen as any of the classes.
Instruction = data.UnionLayout({
    "header": Header, "ld": LdLayout, "st": StLayout, "mv": MvLayout, "mm": MmLayout,
    "misc": MiscLayout, "sys": SysLayout,
})
for _lay in (*LAYOUTS.values(), Header, Instruction):
    assert _lay.size == WORD_BITS

#: Bytes of a dense GGUF block per format index (``fmt`` of MV/MM, ``aux`` of EMBED).
BLOCK_BYTES = [block_bytes(f) for f in _isa.FMTS]
#: Bytes of one 32-weight block per ``[fmt][sparsity]`` (``core.formats.block_bytes``).
SPARSE_BLOCK_BYTES = [[block_bytes(f, s) for s in _isa.SPARSITIES]
                      for f in _isa.FMTS]


def is_legal(m: Module, word) -> Signal:
    """A signal that is high when ``word`` (128 bits) decodes legally (``compiler.isa.decode``)."""
    w = data.View(Instruction, word)
    h = w.header
    op = h.op
    legal = Signal(name="legal")
    any_tok = h.wait_prev | h.wait_next | h.rel_prev | h.rel_next
    mv = w.mv
    fmt, sp = mv.func[0:2], mv.func[2:8]
    shape_ok = (mv.cols != 0) & (mv.cols[0:5] == 0) & (mv.rows != 0)
    # an MV's tiled layouts (func bits 5, 6: not both) are legal encodings; this RTL does not
    # execute them yet (the validator refuses them: Footprint.unsupported)
    mv_sp_ok = (mv.func[2:5] < len(_isa.SPARSITIES)) & (mv.func[7] == 0) & ~(mv.func[5] & mv.func[6])
    with m.Switch(op):
        with m.Case(Op.LD):
            m.d.comb += legal.eq(~h.wait_prev & ~h.rel_prev & (h.func == 0))
        with m.Case(Op.ST):
            m.d.comb += legal.eq(~h.wait_next & ~h.rel_next & (h.func < len(_isa.ST_NAMES)))
        with m.Case(Op.MV):
            m.d.comb += legal.eq((fmt < 3) & mv_sp_ok & shape_ok)
        with m.Case(Op.MM):
            m.d.comb += legal.eq((fmt < 3) & (sp < len(_isa.SPARSITIES)) & shape_ok
                                 & (w.mm.ntok != 0))
        with m.Case(Op.MISC):
            m.d.comb += legal.eq((w.misc.rsv == 0) & (h.func < len(_isa.MISC_FUNCS)))
        with m.Case(Op.SYS):
            m.d.comb += legal.eq((w.sys.rsv == 0) & ~any_tok & (h.func < len(_isa.SYS_NAMES)))
        with m.Default():
            m.d.comb += legal.eq(0)
    return legal


class InstrDecoder(wiring.Component):
    """Legality and queue of one instruction word (combinational).

    Members
    -------
    word : In(128)
        The instruction word.
    legal : Out(1)
        High when ``compiler.isa.decode`` accepts the word.
    queue : Out(Queue)
        The queue of a legal word (LD, CMP for MV/MM/MISC, ST, SYS).
    """

    word: In(WORD_BITS)
    legal: Out(1)
    queue: Out(Queue)

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.legal.eq(is_legal(m, self.word))
        op = data.View(Header, self.word).op
        with m.Switch(op):
            with m.Case(Op.LD):
                m.d.comb += self.queue.eq(Queue.LD)
            with m.Case(Op.ST):
                m.d.comb += self.queue.eq(Queue.ST)
            with m.Case(Op.MV, Op.MM, Op.MISC):
                m.d.comb += self.queue.eq(Queue.CMP)
            with m.Default():
                m.d.comb += self.queue.eq(Queue.SYS)
        return m
