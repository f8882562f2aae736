"""The golden model's test programs on the RTL accelerator (``tiny`` configuration): the
golden model's bytes, bit for bit.

The programs of tests/test_golden.py and tests/test_prefill.py, compiled for ``tiny``
from tiny 2-layer models (tests/tinymodel.py): the three weight formats, the N:M
sparse variants (2:4, 8:16, 4:16, 2:16), the prefill buckets (MM) mixed with decode
runs, greedy generation, the status-code programs (illegal instruction, HBM out of
range, token-dependent HBM range, on-chip out of range, deadlock, no END) and the
randomly corrupted programs; besides those, a model whose matrices take many weight
tiles (MM into the stage + COPY), runs up to the last context position (long ATTN), and
sixteen LDs back to back (many outstanding bursts). Every run is made on the golden
model and on the RTL
(``host/rtl_backend.py``'s execution unit, ``RtlAccelerator``) and compared: status and
pc, logits (decode and un-tiled prefill logits), and the whole HBM the program may
address (weights, KV cache, I/O region) after every run; generation compares tokens.

One Verilator build and one simulator process serve the whole module (per pytest
worker): the bundles are all compiled for ``tiny``, and :class:`Rtl` puts each one into
the running simulation in turn (HBM image, registers, program). The build is the
default tiny accelerator the other RTL tests share (sim/rtl/harness.py caches it), so
the module adds no build of its own; the ``ci`` accelerator (2 ports x 256 bit, 4
chains) runs SmolLM2 in the ``slow`` tests and benchmarks/rtl_decode.py (it cost
``make test`` ~10 CPU-minutes of Verilator and C++ compile here).
"""

import numpy as np
import pytest

from llmfab.boards.config import load_config
from llmfab.compiler import isa
from llmfab.compiler.bundle import Bundle, logits_rows, prefill_program
from llmfab.compiler.compile import compile_model
from llmfab.compiler.model import load_model
from llmfab.sim.golden import Golden
from llmfab.host.golden_backend import GoldenDevice

import tinymodel

CONFIG = "tiny"
#: Watchdog of every run: a tiny-model decode step takes ~10^4 cycles.
WATCHDOG = 2_000_000


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


# ---------------------------------------------------------------------------------------
# bundles: tiny models compiled for the tiny configuration
# ---------------------------------------------------------------------------------------

#: name -> (qtype, seed, sparsity), as the golden tests make them
MODELS = {
    "q4_0": ("q4_0", 3, None),
    "q4_1": ("q4_1", 3, None),
    "q8_0": ("q8_0", 3, None),
    "sp2:4": ("q4_1", 5, "2:4"),
    "sp4:16,8:16": ("q4_1", 5, "ffn=4:16,attn=8:16"),
    "sp2:16": ("q4_1", 5, "2:16"),
    "status": ("q4_1", 2, None),        # test_golden.py's tiny_bundle
    "tiled": ("q8_0", 4, None),         # several weight tiles per matrix (test_tiled_model)
}
#: write_tiny_gguf arguments other than the defaults
SHAPES = {}


@pytest.fixture(scope="module")
def config():
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def bundles(config, tmp_path_factory):
    d = tmp_path_factory.mktemp("gp")
    out = {}
    for name, (qtype, seed, sp) in MODELS.items():
        m = load_model(tinymodel.write_tiny_gguf(d / f"{name.replace(':', '_')}.gguf", qtype, seed=seed,
                                                 **SHAPES.get(name, {})))
        out[name] = (m, compile_model(m, config, sparsity=sp))
    return out


# ---------------------------------------------------------------------------------------
# the RTL side: one simulation, bundles swapped in
# ---------------------------------------------------------------------------------------

def _end_pc(program: bytes) -> int:
    """The pc of the first END (where a clean run stops)."""
    for pc, w in enumerate(isa.from_bytes(program)):
        try:
            ins = isa.decode(w)
        except Exception:
            continue
        if ins.op == "SYS" and ins["func"] == isa.SYS_END:
            return pc
    return -1


class Rtl:
    """The running simulation, driven like the golden model (``run``, ``prefill``, ``hbm``)."""

    def __init__(self, acc):
        self.acc = acc
        self.bundle = None
        self.loaded = None

    def use(self, bundle):
        """Put ``bundle`` (compiled for the same configuration) into the simulation: HBM
        = its image (everything else zero), its registers and sizes, its decode program."""
        acc = self.acc
        man = bundle.manifest
        bundle.check_config(acc.config)
        assert int(man["hbm_size"]) <= acc.counters_addr, "bundle does not fit the simulated HBM"
        acc.bundle = bundle
        acc.hbm_size = int(man["hbm_size"])
        acc.registers = {k: int(v) for k, v in man["registers"].items()}
        acc.context = int(man["onchip"]["context"])
        acc.write_hbm(0, np.zeros(acc.counters_addr, np.uint8))
        acc.write_hbm(0, np.ascontiguousarray(bundle.hbm_image, np.uint8))
        self.bundle = bundle
        self.loaded = None
        self.load("decode")

    def load(self, name, program=None):
        """Load program ``name`` ("decode", "prefill_<T>", "prefill_kv_<T>", "prefill_last_<T>", or any name with
        ``program``) unless it is the one loaded."""
        if self.loaded == name:
            return
        if program is None:
            program = self.bundle.named_program(name)[0]
        self.acc.load_program(program)
        self.loaded = name

    def run(self, pos, token, program="decode", ntok=1):
        self.load(program)
        r = self.acc.run(pos, token, timeout_cycles=WATCHDOG, ntok=ntok)
        assert not r.timed_out, f"watchdog: {program} at pos {pos} not done after {r.sim_cycles} cycles"
        return r

    def stage_tokens(self, tokens):
        """The host's part of a prefill run: the tokens' raw embedding rows into the I/O region
        (as ``Golden.stage_tokens``)."""
        man = self.bundle.manifest
        tr = man["prefill"]["token_rows"]
        base, _ = man["memory_map"]["prefill_tokens"]
        stride, rb = int(tr["row_stride"]), int(tr["row_bytes"])
        emb = int(man["registers"]["wbase"]) + int(tr["embedding_offset"])
        img = self.bundle.hbm_image
        for t, tok in enumerate(tokens):
            self.acc.write_hbm(int(base) + t * stride, img[emb + tok * rb:emb + (tok + 1) * rb])

    def prefill(self, pos, tokens, logits=True):
        self.stage_tokens(tokens)
        return self.run(pos, 0, prefill_program(len(tokens), logits), ntok=len(tokens))

    def logits(self):
        return self.acc.logits().copy()

    def prefill_logits(self, ntok):
        return self.bundle.prefill_logits(ntok, self.acc.read_hbm)

    def hbm(self):
        return self.acc.read_hbm(0, self.acc.hbm_size)


@pytest.fixture(scope="module")
def rtl(config, bundles):
    from llmfab.sim.rtl.harness import RtlAccelerator
    from llmfab.host.rtl_backend import exec_factory, program_ops
    factory, implemented = exec_factory(config)
    for name, (_, b) in bundles.items():
        for prog in [b.program, *b.prefill.values(), *b.prefill_kv.values(), *b.prefill_last.values()]:
            missing = program_ops(prog) - implemented
            assert not missing, f"{name}: the execution unit lacks {sorted(missing)}"
    # the simulated HBM is sized for the largest bundle; the others are swapped in
    big = max((b for _, b in bundles.values()), key=lambda b: int(b.manifest["hbm_size"]))
    with RtlAccelerator(config, big, exec_factory=factory, timeout_seconds=900) as acc:
        yield Rtl(acc)


# ---------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------

def _first_diff(a, b):
    d = np.flatnonzero(np.asarray(a) != np.asarray(b))
    return f"{d.size} differ, first at {d[0]}" if d.size else "equal"


def assert_same_hbm(g, r, what):
    got = r.hbm()
    want = g.hbm
    if np.array_equal(got, want):
        return
    man = g.bundle.manifest
    regions = {k: v for k, v in man["memory_map"].items()
               if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v)}
    bad = [f"{k} [{a:#x}, +{n}): {_first_diff(got[a:a + n], want[a:a + n])}"
           for k, (a, n) in regions.items() if not np.array_equal(got[a:a + n], want[a:a + n])]
    raise AssertionError(f"{what}: HBM differs from the golden model's: {_first_diff(got, want)}; "
                         + "; ".join(bad))


def assert_logits(got, want, what):
    gb, wb = _bits(got), _bits(want)
    if not np.array_equal(gb, wb):
        idx = np.argwhere(gb != wb)
        i = tuple(idx[0])
        raise AssertionError(f"{what}: {len(idx)} logits differ from the golden model's; first {i}: "
                             f"rtl {np.asarray(got)[i]!r} ({gb[i]:#010x}), golden "
                             f"{np.asarray(want)[i]!r} ({wb[i]:#010x})")


def run_chunks(g, r, bundle, tokens, chunks, pos=0):
    """Run ``tokens`` in ``chunks`` (1: decode, T: prefill_T, -T: prefill_kv_T, which leaves no
    logits, ``(T, "last")``: prefill_last_T, which leaves the last token's) on both; compare
    everything after every run. Returns the RTL's logits [rows of logits the chunks left, vocab]."""
    chunks = [c if isinstance(c, tuple) else (abs(c), c > 0) for c in chunks]
    assert sum(T for T, _ in chunks) == len(tokens)
    out = []
    i = 0
    for T, logits in chunks:
        what = f"{'decode' if T == 1 else prefill_program(T, logits)} at pos {pos}"
        if T == 1:
            gr = g.run(pos, tokens[i])
            rr = r.run(pos, tokens[i])
            prog = bundle.program
        else:
            gr = g.prefill(pos, tokens[i:i + T], logits=logits)
            rr = r.prefill(pos, tokens[i:i + T], logits=logits)
            prog = bundle.named_program(prefill_program(T, logits))[0]
        assert gr.status == isa.STATUS_OK, (what, gr)
        assert (rr.status, rr.pc) == (isa.STATUS_OK, _end_pc(prog)), (what, rr.status, rr.pc)
        if T == 1:
            want, got = g.logits()[None], r.logits()[None]
        elif logits:
            rows = logits_rows(T, logits)
            want, got = g.prefill_logits(rows), r.prefill_logits(rows)
        if logits:
            assert_logits(got, want, what)
            out.append(got)
        assert_same_hbm(g, r, what)
        pos += T
        i += T
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_tiny_models_decode(rtl, bundles, qtype):
    """test_golden.py's tiny models (seed 3) in each weight format: decode runs (MV)."""
    _, b = bundles[qtype]
    rtl.use(b)
    g = Golden(b)
    rng = np.random.default_rng(0)
    toks = [int(rng.integers(0, 256)) for _ in range(8)]
    run_chunks(g, rtl, b, toks, [1] * len(toks))


#: (format, chunks) of the prefill tests (test_prefill.py's patterns): every bucket (2, 4, 8)
#: in every format, at position 0 and after decode and other prefill runs (odd positions,
#: up to position 22)
PREFILL_CHUNKS = [("q4_0", [2, 1, 4, 8]), ("q4_1", [8, 1, 4, 2, 1]),
                  ("q4_1", [1, 2, 1, 4, 1, 8, 1, 4, 1]), ("q8_0", [4, 1, 2, 8]),
                  # the KV-only programs (-T), as generate runs a prompt's runs before its last
                  ("q4_0", [-8, -4, -2, 1, -2, 4]), ("q8_0", [1, -2, -8, 8])]
TOKS = [int(t) for t in np.random.default_rng(11).integers(0, 256, 23)]


@pytest.mark.parametrize("qtype,chunks", PREFILL_CHUNKS,
                         ids=[f"{q}-{'.'.join(map(str, c))}" for q, c in PREFILL_CHUNKS])
def test_tiny_models_prefill(rtl, bundles, qtype, chunks):
    """test_prefill.py's bucket programs (MM, cached ATTN, SYNC) and their KV-only twins
    mixed with decode runs."""
    _, b = bundles[qtype]
    assert b.manifest["prefill"]["buckets"] == [2, 4, 8]
    rtl.use(b)
    run_chunks(Golden(b), rtl, b, TOKS[:sum(abs(c) for c in chunks)], chunks)


def test_late_positions(rtl, bundles):
    """Long attention: decode and prefill runs up to the last position of the compiled context
    (128: the tiny configuration's context), the rows between left zero."""
    _, b = bundles["q4_1"]
    ctx = int(b.manifest["context"])
    rtl.use(b)
    g = Golden(b)
    run_chunks(g, rtl, b, TOKS[:3], [2, 1])
    run_chunks(g, rtl, b, TOKS[3:4], [1], pos=ctx // 2 + 1)
    run_chunks(g, rtl, b, TOKS[4:6], [2], pos=ctx - 2)          # ends at position ctx - 1


def test_tiled_model(rtl, bundles):
    """Q8_0 on tiny: every matrix (the FFN's 128 rows of 272 bytes, ...) exceeds a 2 KiB
    weight-buffer slot, so decode runs several MVs per matrix and the prefill program MMs
    each tile into the stage, then COPYs the rows into place (test_prefill.py's ci_wb4 path)."""
    _, b = bundles["tiled"]
    copies = sum(1 for w in isa.from_bytes(b.prefill[2])
                 if isa.decode(w).op == "MISC" and isa.decode(w)["func"] == isa.MISC_FUNCS["COPY"])
    assert copies > 0 and b.manifest["prefill"]["buckets"] == [2, 4, 8]
    rtl.use(b)
    chunks = [2, 1, 2]
    run_chunks(Golden(b), rtl, b, TOKS[:sum(chunks)], chunks)


@pytest.mark.parametrize("name", ["sp2:4", "sp4:16,8:16", "sp2:16"])
def test_sparse_models(rtl, bundles, name):
    """test_golden.py's sparse models (q4_1, seed 5): decode runs, then every prefill bucket
    (test_sparse_prefill_bit_exact)."""
    _, b = bundles[name]
    assert b.extra["masks"]
    rtl.use(b)
    toks = [1, 7, 42, 99, 200, 3, 17] + TOKS[:10]
    run_chunks(Golden(b), rtl, b, toks, [1, 1, 1, 4, 8, 2])


def test_greedy_generation(rtl, bundles, config):
    """Greedy generation as the golden backend does it (prompt through the prefill buckets,
    then decode): the same tokens, and the same KV cache at the end."""
    m, b = bundles["q4_1"]
    prompt, n = TOKS[:6], 5
    gold = GoldenDevice(m, config, bundle=b)
    want = gold.generate(prompt, n).tokens
    # 6 = 4 + 2: generate runs the prompt's 4 through the KV-only program, its 2 through the
    # last-logits program (7 = 4 + 2 + 1, the last token through decode: test_rtl_backend.py)
    assert gold.prefill_kv_runs == {4: 1} and gold.prefill_last_runs == {2: 1} and gold.prefill_runs == {}
    rtl.use(b)
    g = Golden(b)
    lg = run_chunks(g, rtl, b, prompt, [-4, (2, "last")])
    pos, out = len(prompt), []
    nxt = int(np.argmax(lg[-1]))
    for i in range(n):
        out.append(nxt)
        if i == n - 1:
            break
        lg = run_chunks(g, rtl, b, [nxt], [1], pos=pos)
        pos += 1
        nxt = int(np.argmax(lg[-1]))
    assert out == want
    kv0, kvn = b.manifest["memory_map"]["kv"]
    assert np.array_equal(rtl.hbm()[kv0:kv0 + kvn], gold.golden.hbm[kv0:kv0 + kvn])


# ---- status-code programs ---------------------------------------------------------------

def _patched(b, edit):
    words = isa.from_bytes(b.program)
    edit(words)
    return Bundle(manifest=b.manifest, program=isa.to_bytes(words), hbm_image=b.hbm_image)


def _find(words, pred):
    for i, w in enumerate(words):
        ins = isa.decode(w)
        if pred(ins):
            return i, ins
    raise AssertionError("not found")


def _illegal(w):
    w[7] = 0xF                                      # opcode 15


def _hbm_range(w):
    i, ins = _find(w, lambda x: x.op == "LD" and x["hreg"] == isa.REG_WBASE and x["len"] > 0)
    ins.fields["hoff"] = (1 << 28) - 1
    w[i] = isa.encode(ins)


def _onchip_range(w):
    i, ins = _find(w, lambda x: x.op == "MISC" and x["func"] == isa.MISC_FUNCS["ADD"])
    ins.fields["dst"] = (1 << 24) - 8
    w[i] = isa.encode(ins)


def _deadlock(w):
    i, ins = _find(w, lambda x: x.op == "LD" and x["rel_next"])
    ins.fields["rel_next"] = 0                      # the consumer now waits forever
    w[i] = isa.encode(ins)


def _no_end(w):
    w[-1] = isa.encode(isa.make("SYS", func=isa.SYS_NOP))


STATUS_CASES = {
    "illegal": (_illegal, isa.STATUS_ILLEGAL),
    "hbm_range": (_hbm_range, isa.STATUS_HBM_RANGE),
    "onchip_range": (_onchip_range, isa.STATUS_BUF_RANGE),
    "deadlock": (_deadlock, isa.STATUS_DEADLOCK),
    "no_end": (_no_end, isa.STATUS_NO_END),
}


def _clean_run_after(rtl, b, pos=0, token=5):
    """After a faulting run the clean program still gives the golden model's bytes."""
    rtl.use(b)
    run_chunks(Golden(b), rtl, b, [token], [1], pos=pos)


@pytest.mark.parametrize("case", list(STATUS_CASES))
def test_status_programs(rtl, bundles, case):
    """test_golden.py's error-status programs: the golden model's status and pc; a validation
    fault executes nothing (HBM untouched, as the golden model's)."""
    _, b0 = bundles["status"]
    edit, status = STATUS_CASES[case]
    b = _patched(b0, edit)
    g = Golden(b)
    gr = g.run(0, 1)
    assert gr.status == status
    rtl.use(b)
    rr = rtl.run(0, 1)
    assert (rr.status, rr.pc) == (gr.status, gr.pc), (case, gr.detail)
    if status != isa.STATUS_DEADLOCK:
        # (a deadlocked RTL may have executed instructions before it; the golden model executes none)
        assert_same_hbm(g, rtl, case)
    _clean_run_after(rtl, b0)


def test_token_dependent_hbm_range(rtl, bundles):
    """The embedding LD indexes by R7: a token id far past the vocabulary faults at run time."""
    _, b = bundles["status"]
    g = Golden(b)
    rtl.use(b)
    run_chunks(g, rtl, b, [1], [1])
    gr = g.run(1, 10 ** 8)
    rr = rtl.run(1, 10 ** 8)
    assert gr.status == isa.STATUS_HBM_RANGE
    assert (rr.status, rr.pc) == (gr.status, gr.pc)
    assert_same_hbm(g, rtl, "token 10**8")
    run_chunks(g, rtl, b, [9], [1], pos=1)          # the next token runs normally


def _wide_stride(w):
    i, ins = _find(w, lambda x: x.op == "LD" and x["ireg"] == isa.REG_TOKEN)
    ins.fields["stride"] = (1 << 16) - 1            # token x 65535 bytes
    w[i] = isa.encode(ins)


def test_hbm_range_past_the_flat_address_width(rtl, bundles):
    """With an ``hbm_size`` register of 2**41, past 2**40 (hw/axi.py FLAT_BITS, the load and
    store engines' flat address width), an LD ending between 2**40 and 2**41 is status 2 at
    the golden model's pc, not a burst to a wrapped address: the embedding LD with stride
    65535 and token 2**25 ends just below 2**41."""
    _, b0 = bundles["status"]
    b = _patched(b0, _wide_stride)
    token = 1 << 25
    g = Golden(b)
    gr = g.run(0, token)
    assert gr.status == isa.STATUS_HBM_RANGE
    rtl.use(b)
    rtl.acc.hbm_size = 1 << 41
    try:
        rr = rtl.run(0, token)
    finally:
        rtl.acc.hbm_size = int(b.manifest["hbm_size"])
    assert (rr.status, rr.pc) == (gr.status, gr.pc)
    assert_same_hbm(g, rtl, "stride 65535, token 2**25, hbm_size 2**41")
    _clean_run_after(rtl, b0)


def test_random_corruption(rtl, bundles):
    """test_golden.py's 40 randomly corrupted programs (seed 7, 3 bit flips each): every run ends,
    with the golden model's status and pc (the bytes of corrupted programs are not compared:
    on-chip memory is not cleared between runs on the RTL, and NaN payloads may differ)."""
    _, b0 = bundles["status"]
    rtl.use(b0)
    rng = np.random.default_rng(7)
    bad = []
    seen = set()
    for k in range(40):
        words = isa.from_bytes(b0.program)
        for _ in range(3):
            i = int(rng.integers(0, len(words)))
            words[i] ^= 1 << int(rng.integers(0, 128))
        b = Bundle(manifest=b0.manifest, program=isa.to_bytes(words), hbm_image=b0.hbm_image)
        with np.errstate(all="ignore"):
            gr = Golden(b).run(0, 3)
        want = (gr.status, gr.pc if gr.status != isa.STATUS_OK else _end_pc(b.program))
        rtl.acc.write_hbm(0, np.ascontiguousarray(b0.hbm_image, np.uint8))
        rtl.load(f"corrupt{k}", b.program)
        rr = rtl.acc.run(0, 3, timeout_cycles=WATCHDOG)     # a hang is reported, not raised
        seen.add(gr.status)
        if rr.timed_out or (rr.status, rr.pc) != want:
            bad.append((k, want, (rr.status, rr.pc), gr.detail))
    assert not bad, bad
    assert isa.STATUS_ILLEGAL in seen
    _clean_run_after(rtl, b0)


# ---- the memory system under many outstanding bursts -------------------------------------

def test_many_outstanding_bursts(rtl, bundles):
    """Sixteen LDs back to back, each starting 64 bytes past a 4 KiB boundary (so each is two
    bursts or more and the HBM model's 16-deep read queue fills while its pointers wrap), SYNC,
    then one ST of nearly all of what they loaded: HBM is the golden model's after each of
    three runs in a row, and a decode run still works.

    (Regression: sim/rtl/hbm_model.v took ``(wp - rp) == QDEPTH`` at 32 bits, so a full queue
    whose write pointer had wrapped looked not full; up to 5 more bursts were accepted over
    queued ones, the LDs got other bytes, and a beat left in the R channel hung the next run.)"""
    _, b = bundles["tiled"]
    rtl.use(b)
    g = Golden(b)
    onchip = int(b.manifest["onchip"]["size"])
    K = onchip // 16 // 64 * 64
    words = [isa.encode(isa.make("LD", buf=k * K, hreg=isa.REG_ZERO, hoff=(64 + k * 4096) // 32, len=K))
             for k in range(16)]
    words += [isa.encode(isa.make("SYS", func=isa.SYS_SYNC)),
              isa.encode(isa.make("ST", buf=0, hreg=isa.REG_ZERO, hoff=0, len=15 * K)),
              isa.encode(isa.make("SYS", func=isa.SYS_END))]
    prog = isa.to_bytes(words)
    gb = Bundle(manifest=b.manifest, program=prog, hbm_image=b.hbm_image)
    g = Golden(gb)
    rtl.load("bursts", prog)
    for i in range(3):
        gr = g.run(0, 0)
        rr = rtl.run(0, 0, program="bursts")
        assert gr.status == isa.STATUS_OK
        assert (rr.status, rr.pc) == (isa.STATUS_OK, len(words) - 1), i
        assert_same_hbm(g, rtl, f"run {i}")
        served = [p["rd_beats"] for p in rr.port_bytes]
        taken = [rr.counters[f"port{p}_rd_bytes"] // rtl.acc.geometry["beat_bytes"] for p in range(len(served))]
        assert served == taken, (i, "beats the HBM model served", served, "the accelerator took", taken)
    _clean_run_after(rtl, b)
