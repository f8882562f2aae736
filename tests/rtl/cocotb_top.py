"""cocotb tests of the accelerator's pieces that need direct signal access.

* ``decoder_random``: hw/isa.py's :class:`InstrDecoder` against
  ``compiler.isa.decode`` on random words (legal, bit-flipped, random), one build.

Whole-accelerator runs go through :mod:`llmfab.sim.rtl.harness` (tests/rtl/test_top.py).
"""

import os

import cocotb
import numpy as np
from cocotb.triggers import Timer

from llmfab.core.errors import IsaError
from llmfab.compiler import isa

MASK128 = (1 << 128) - 1


def _rand128(rng) -> int:
    return int.from_bytes(rng.bytes(16), "little")


#: Words of the exhaustive part of :func:`decoder_words`: every opcode x func.
SWEEP = 16 * 256


def decoder_words(n: int, seed: int) -> list:
    """Every opcode x func (:data:`SWEEP` words), then ``n`` random words: legal ones, legal
    ones with bits flipped or fields replaced, random ones."""
    rng = np.random.default_rng(seed)
    words = []
    # every opcode x func, random token bits, a body that is zero or a legal one's
    for op in range(16):
        for func in range(256):
            body = isa.encode(isa.random_instr(rng)) >> 16 if rng.random() < 0.5 else 0
            words.append(op | int(rng.integers(0, 16)) << 4 | func << 8 | body << 16)
    while len(words) < SWEEP + n:
        kind = rng.integers(0, 6)
        w = isa.encode(isa.random_instr(rng))
        if kind == 1:                                   # one bit flipped
            w ^= 1 << int(rng.integers(0, 128))
        elif kind == 2:                                 # a few bits flipped
            for _ in range(int(rng.integers(2, 6))):
                w ^= 1 << int(rng.integers(0, 128))
        elif kind == 3:                                 # one field replaced by random bits
            op = w & 0xF
            name, (off, width) = list(isa.OFFSETS[op].items())[int(rng.integers(1, len(isa.OFFSETS[op])))]
            v = int(rng.integers(0, 1 << min(width, 62))) if rng.random() < 0.7 else 0
            w = (w & ~(((1 << width) - 1) << off)) | (v << off)
        elif kind == 4:                                 # random body, legal opcode
            w = (_rand128(rng) & ~0xF) | int(rng.integers(1, 7))
        elif kind == 5:
            w = _rand128(rng)
        words.append(w & MASK128)
    return words


def expected(word):
    try:
        ins = isa.decode(word)
    except IsaError:
        return 0, None
    q = {"ld": 0, "cmp": 1, "st": 2, "sys": 3}[isa.QUEUE[isa.OPCODES[ins.op]]]
    return 1, q


@cocotb.test()
async def decoder_random(dut):
    n = int(os.environ.get("DEC_N", "8000"))
    words = decoder_words(n, int(os.environ.get("DEC_SEED", "5")))
    legal_count = 0
    bad = []
    for w in words:
        dut.word.value = w
        await Timer(1, unit="ns")
        exp_legal, exp_q = expected(w)
        got_legal = int(dut.legal.value)
        legal_count += exp_legal
        if got_legal != exp_legal or (exp_legal and int(dut.queue.value) != exp_q):
            bad.append((hex(w), exp_legal, got_legal, exp_q, int(dut.queue.value)))
    dut._log.info("%d words, %d legal, %d illegal, %d mismatches", len(words), legal_count,
                  len(words) - legal_count, len(bad))
    assert len(words) == SWEEP + n
    # the random part is a mix of legal and illegal words
    legal_random = sum(expected(w)[0] for w in words[SWEEP:])
    assert 0.2 < legal_random / n < 0.8, legal_random
    assert not bad, bad[:10]
