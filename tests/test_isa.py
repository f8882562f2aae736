"""The instruction set (compiler/isa.py): encode/decode round trips, byte images, field
overflow, every class of illegal encoding with its exact message, and random words."""

import numpy as np
import pytest

from llmfab.core.errors import IsaError
from llmfab.compiler import isa

N_RANDOM_INSTR = 20_000
N_RANDOM_WORDS = 50_000
MASK128 = (1 << 128) - 1


def _full(ins):
    """Every field of the instruction's layout (except op and rsv), missing ones as 0."""
    op = isa.OPCODES[ins.op]
    return {name: int(ins[name]) for name, _ in isa.LAYOUTS[op] if name not in ("op", "rsv")}


def _mnemonic(ins):
    f = ins["func"]
    if ins.op == "MISC":
        return isa.MISC_NAMES[f]
    if ins.op == "SYS":
        return isa.SYS_NAMES[f]
    if ins.op in ("MV", "MM"):
        return f"{ins.op}.{isa.FMTS[f & 3]}"
    return ins.op


def _set(word, op, field, value):
    """Overwrite one field of an encoded word."""
    off, w = isa.OFFSETS[op][field]
    return (word & ~(((1 << w) - 1) << off)) | (value << off)


def _illegal(word, why):
    with pytest.raises(IsaError) as e:
        isa.decode(word)
    assert str(e.value) == f"illegal instruction {word:#034x}: {why}"


@pytest.fixture(scope="module")
def random_instrs():
    rng = np.random.default_rng(20240601)
    return [isa.random_instr(rng) for _ in range(N_RANDOM_INSTR)]


def _base(op):
    """A legal word of each class, with nonzero operands."""
    f = dict(
        LD=dict(func=0, wait_next=1, rel_next=1, buf=5, hreg=2, hoff=123, ireg=3, stride=7, len=64, lreg=1, lmul=2),
        ST=dict(func=1, wait_prev=1, rel_prev=1, buf=9, hreg=5, hoff=77, len=32),
        MV=dict(func=isa.mv_func("q4_1", "2:4"), wait_prev=1, rel_next=1, wb=3, rows=576, cols=576, qsrc=4,
                dst=8),
        MM=dict(func=isa.mv_func("q8_0", "dense"), wait_prev=1, wb=3, rows=64, cols=64, qsrc=1, dst=2, ntok=4),
        MISC=dict(func=isa.MISC_FUNCS["RMSNORM"], rel_prev=1, dst=1, a=2, b=3, n=576, aux=5, reg=1),
        SYS=dict(func=isa.SYS_END),
    )[op]
    return isa.encode(isa.make(op, **f))


# ---------------------------------------------------------------- round trips

def test_round_trip_random(random_instrs):
    words = []
    seen_ops, seen_misc, seen_mv = set(), set(), set()
    for ins in random_instrs:
        w = isa.encode(ins)
        assert 0 <= w <= MASK128 and w & 0xF == isa.OPCODES[ins.op]
        back = isa.decode(w)
        assert back.op == ins.op
        assert back.fields == _full(ins)                     # every field, none dropped or added
        if ins.op != "SYS":
            assert back == ins
        assert isa.encode(back) == w
        text = isa.disassemble(ins)
        assert text == isa.disassemble(back) == repr(back)
        assert text.startswith(_mnemonic(ins))
        words.append(w)
        seen_ops.add(ins.op)
        if ins.op == "MISC":
            seen_misc.add(ins["func"])
        if ins.op in ("MV", "MM"):
            seen_mv.add((ins.op, ins["func"]))
    assert seen_ops == set(isa.OPCODES)
    assert seen_misc == set(isa.MISC_NAMES)
    assert len(seen_mv) == 2 * 3 * 5                          # every format x sparsity for MV and MM
    non_sys = [w for w in words if w & 0xF != isa.OP_SYS]
    assert len(set(non_sys)) == len(non_sys)                  # SYS has only 3 legal words
    image = isa.to_bytes(words)
    assert len(image) == 16 * len(words)
    assert image[:16] == words[0].to_bytes(16, "little")
    assert isa.from_bytes(image) == words
    assert isa.assemble(random_instrs) == image
    assert [isa.decode(w) for w in isa.from_bytes(isa.assemble(random_instrs[:500]))] == \
        [isa.decode(w) for w in words[:500]]


def test_round_trip_sys_equality(random_instrs):
    sys_instrs = [i for i in random_instrs if i.op == "SYS"]
    assert sys_instrs
    assert all(isa.decode(isa.encode(i)) == i for i in sys_instrs)


def test_round_trip_by_hand():
    for op in isa.OPCODES:
        w = _base(op)
        ins = isa.decode(w)
        assert isa.encode(ins) == w
    ins = isa.make("MV", func=isa.mv_func("q4_0", "8:16"), wait_prev=1, rel_prev=1, wb=1, rows=2, cols=64,
                   qsrc=3, dst=4)
    assert isa.disassemble(ins) == "MV.q4_0.8:16[WR] wb=1 rows=2 cols=64 qsrc=3 dst=4"
    assert isa.disassemble(isa.make("SYS", func=isa.SYS_END)) == "END"
    assert isa.disassemble(isa.make("ST", func=isa.ST_F16, rel_prev=1, len=8)) == "ST.f16[R] len=8"
    assert isa.disassemble(isa.make("MISC", func=isa.MISC_FUNCS["ATTN"], n=3)) == "ATTN n=3"
    # the header layout: op[4] wait_prev wait_next rel_prev rel_next func[8]
    w = isa.encode(isa.make("MM", func=0x12, wait_prev=1, rel_next=1, rows=1, cols=32, ntok=1))
    assert w & 0xFFFF == 4 | 1 << 4 | 1 << 7 | 0x12 << 8
    assert isa.from_bytes(b"") == [] and isa.to_bytes([]) == b"" and isa.assemble([]) == b""


# ---------------------------------------------------------------- encode errors

def test_field_overflow():
    for op, layout in isa.LAYOUTS.items():
        name = isa.OPNAMES[op]
        for field, width in layout:
            if field == "op":
                continue
            top = (1 << width) - 1
            isa.encode(isa.make(name, **{field: top}))                   # the largest value fits
            for bad in (1 << width, -1, 1 << 200):
                with pytest.raises(IsaError) as e:
                    isa.encode(isa.make(name, **{field: bad}))
                assert str(e.value) == f"{name}.{field} = {bad} does not fit in {width} bits"
    with pytest.raises(IsaError) as e:
        isa.encode(isa.make("LD", ntok=1))
    assert str(e.value) == "LD has no field 'ntok'"
    with pytest.raises(IsaError) as e:
        isa.encode(isa.make("JMP"))
    assert str(e.value) == "unknown opcode 'JMP'"
    for w in (-1, 1 << 128):
        with pytest.raises(IsaError) as e:
            isa.decode(w)
        assert str(e.value) == f"instruction word {w:#x} is not 128 bits"
    with pytest.raises(IsaError) as e:
        isa.from_bytes(bytes(17))
    assert str(e.value) == "program of 17 bytes is not a whole number of 16-byte words"


# ---------------------------------------------------------------- illegal encodings

def test_illegal_opcodes():
    rng = np.random.default_rng(1)
    for op in [0] + list(range(7, 16)):
        for _ in range(20):
            w = (int.from_bytes(rng.bytes(16), "little") & ~0xF) | op
            _illegal(w, f"opcode {op}")
        _illegal(op, f"opcode {op}")


def test_illegal_token_bits():
    ld, st, sy = _base("LD"), _base("ST"), _base("SYS")
    for f in ("wait_prev", "rel_prev"):
        _illegal(_set(ld, isa.OP_LD, f, 1), "LD has no previous queue")
    _illegal(_set(_set(ld, isa.OP_LD, "wait_prev", 1), isa.OP_LD, "rel_prev", 1), "LD has no previous queue")
    for f in ("wait_next", "rel_next"):
        _illegal(_set(st, isa.OP_ST, f, 1), "ST has no next queue")
    for f in ("wait_prev", "wait_next", "rel_prev", "rel_next"):
        _illegal(_set(sy, isa.OP_SYS, f, 1), "SYS carries no tokens")
    # the other token bits are legal on these queues
    assert isa.decode(_set(ld, isa.OP_LD, "wait_next", 1))["wait_next"] == 1
    assert isa.decode(_set(st, isa.OP_ST, "wait_prev", 1))["wait_prev"] == 1
    for op in ("MV", "MM", "MISC"):
        w = _base(op)
        for f in ("wait_prev", "wait_next", "rel_prev", "rel_next"):
            assert isa.decode(_set(w, isa.OPCODES[op], f, 1))[f] == 1


def test_illegal_reserved_bits():
    for op in ("MISC", "SYS"):
        code = isa.OPCODES[op]
        off, width = isa.OFFSETS[code]["rsv"]
        for bit in range(width):
            _illegal(_base(op) | (1 << (off + bit)), "reserved bits set")
        _illegal(_set(_base(op), code, "rsv", (1 << width) - 1), "reserved bits set")
    assert isa.OFFSETS[isa.OP_SYS]["rsv"] == (16, 112)


def test_illegal_funcs():
    for f in range(256):
        w = _set(_base("LD"), isa.OP_LD, "func", f)
        if f == 0:
            isa.decode(w)
        else:
            _illegal(w, f"LD func {f}")
        w = _set(_base("ST"), isa.OP_ST, "func", f)
        if f <= 2:                              # ST, ST.f16, ST.x
            assert isa.decode(w)["func"] == f
        else:
            _illegal(w, f"ST func {f}")
        w = _set(_base("MISC"), isa.OP_MISC, "func", f)
        if f in isa.MISC_NAMES:
            assert isa.decode(w)["func"] == f
        else:
            _illegal(w, f"MISC func {f}")
        w = _set(_base("SYS"), isa.OP_SYS, "func", f)
        if f <= 2:
            assert isa.decode(w)["func"] == f
        else:
            _illegal(w, f"SYS func {f}")
        for op in ("MV", "MM"):
            w = _set(_base(op), isa.OPCODES[op], "func", f)
            fmt, sp, tiles = f & 3, (f >> 2) & 7, f >> 5
            # an MV's func bits 5 and 6: row tiles, block tiles (not both); bit 7 illegal
            if op == "MV" and tiles == 3 and fmt != 3 and sp < 5:
                _illegal(w, "MV with both tiled layouts")
            elif fmt == 3 or sp >= 5 or (tiles and (op == "MM" or tiles > 3)):
                _illegal(w, f"{op} func {f}")
            else:
                ins = isa.decode(w)
                assert ins["func"] == isa.mv_func(isa.FMTS[fmt], isa.SPARSITIES[sp]) | tiles << 5


def test_illegal_shapes():
    for op in ("MV", "MM"):
        code = isa.OPCODES[op]
        base = _base(op)
        rows = isa.decode(base)["rows"]
        for cols in (0, 1, 31, 33, 48, 65535):
            _illegal(_set(base, code, "cols", cols), f"{op} shape {rows}x{cols}")
        _illegal(_set(base, code, "rows", 0), f"{op} shape 0x{isa.decode(base)['cols']}")
        _illegal(_set(_set(base, code, "rows", 0), code, "cols", 0), f"{op} shape 0x0")
        for cols in (32, 64, 65504):
            assert isa.decode(_set(base, code, "cols", cols))["cols"] == cols
        assert isa.decode(_set(base, code, "rows", 1))["rows"] == 1
    _illegal(_set(_base("MM"), isa.OP_MM, "ntok", 0), "MM ntok 0")
    assert isa.decode(_set(_base("MM"), isa.OP_MM, "ntok", 255))["ntok"] == 255


# ---------------------------------------------------------------- random words

def _check_word(w):
    """A word is rejected with the standard message, or decodes to what encodes back to it."""
    try:
        ins = isa.decode(w)
    except IsaError as e:
        assert str(e).startswith(f"illegal instruction {w:#034x}: ")
        return False
    assert isa.encode(ins) == w
    isa.disassemble(ins)
    return True


def test_random_words():
    rng = np.random.default_rng(7)
    words = [int.from_bytes(rng.bytes(16), "little") for _ in range(N_RANDOM_WORDS)]
    accepted = sum(_check_word(w) for w in words)
    assert 0 < accepted < N_RANDOM_WORDS // 100
    # legal words with a few bits flipped: many of these are accepted, the rest must be rejected
    rng = np.random.default_rng(8)
    legal = [isa.encode(isa.random_instr(rng)) for _ in range(2000)]
    acc = 0
    for w in legal:
        for _ in range(5):
            flips = rng.integers(0, 128, rng.integers(1, 4))
            for b in flips:
                w ^= 1 << int(b)
            acc += _check_word(w)
    assert 1000 < acc < 9000
    # every single-bit flip of one legal word per class
    for op in isa.OPCODES:
        w = _base(op)
        for b in range(128):
            _check_word(w ^ (1 << b))


def test_mv_register_fields_and_tiled_layouts():
    """An MV's rreg/creg (bits 120..127, formerly reserved) and its tiled layouts round-trip;
    the shapes they give under registers, and the weight spans of the layouts."""
    w = isa.make("MV", func=isa.mv_func("q8_0") | isa.MV_RT, wb=0x100, rows=1, rreg=isa.REG_POS,
                 cols=64, qsrc=0x40, dst=0x80)
    ins = isa.decode(isa.encode(w))
    assert (ins["rreg"], ins["creg"], ins["func"] & isa.MV_RT) == (isa.REG_POS, 0, isa.MV_RT)
    regs = [0] * isa.NREGS
    for r, v in isa.run_registers(70).items():
        regs[r] = v
    assert (regs[isa.REG_PTILE], regs[isa.REG_PBASE]) == (2, 64)
    assert isa.mv_shape(ins.fields, regs) == (71, 64)
    # row tiles: 3 started tiles of 32 rows of 2 Q8_0 blocks, on 1 and on 2 slices of 32 bytes
    assert isa.weight_span(ins["func"], 71, 64, 1, 32) == 3 * 32 * 68
    assert isa.weight_span(ins["func"], 71, 64, 2, 32) == 3 * isa.mv_span(32, 68, 2, 32)
    bt = isa.mv_func("q8_0") | isa.MV_BT
    assert isa.weight_span(bt, 64, 96, 2, 32) == 3 * isa.mv_span(64, 34, 2, 32)
    assert "MV.q8_0.rt" in isa.disassemble(ins)


@pytest.mark.parametrize("slices,stripe", [(1, 64), (2, 32), (4, 64)])
def test_tiled_layouts_round_trip(slices, stripe):
    """untile_rows inverts the layouts KVROW writes: row r of a slice-major tile at
    row_address(r); row tiles of 32 rows and block tiles of one block."""
    rng = np.random.default_rng(slices)
    rb = 68
    rows = 70
    raw = rng.integers(0, 256, (rows, rb), dtype=np.uint8)
    rt = isa.mv_func("q8_0") | isa.MV_RT
    buf = np.zeros(isa.weight_span(rt, rows, 64, slices, stripe), np.uint8)
    tile = isa.mv_span(32, rb, slices, stripe)
    for r in range(rows):
        buf[(r // 32) * tile + isa.row_address(r % 32, rb, slices, stripe)] = raw[r]
    assert np.array_equal(isa.untile_rows(buf, rt, rows, 64, slices, stripe), raw)
    bt = isa.mv_func("q8_0") | isa.MV_BT
    hd, nb = 64, 3
    raw = rng.integers(0, 256, (hd, nb * 34), dtype=np.uint8)
    tile = isa.mv_span(hd, 34, slices, stripe)
    buf = np.zeros(isa.weight_span(bt, hd, nb * 32, slices, stripe), np.uint8)
    for j in range(nb):
        for r in range(hd):
            buf[j * tile + isa.row_address(r, 34, slices, stripe)] = raw[r, 34 * j:34 * j + 34]
    assert np.array_equal(isa.untile_rows(buf, bt, hd, nb * 32, slices, stripe), raw)


def test_chains_features_named():
    """What a configuration without attention: chains refuses (status 1)."""
    q8 = isa.mv_func("q8_0")
    assert isa.chains_feature(isa.make("MV", func=q8, rows=1, cols=32)) is None
    assert isa.chains_feature(isa.make("MV", func=q8, rows=1, cols=32, creg=9)) == \
        "an MV with a tiled layout or a register-extended shape"
    assert isa.chains_feature(isa.make("ST", func=isa.ST_X)) == "ST.x"
    assert isa.chains_feature(isa.make("MISC", func=isa.MISC_FUNCS["SOFTMAX"])) == "SOFTMAX"
    assert isa.chains_feature(isa.make("MISC", func=isa.MISC_FUNCS["QUANT"], n=32, reg=9)) == \
        "a QUANT length from a register"
    assert isa.chains_feature(isa.make("MISC", func=isa.MISC_FUNCS["QUANT"], n=32)) is None
