"""The accelerator configuration: one validated description, every derived size.

One YAML file (``boards/configs/<name>.yaml`` or any path) describes an
accelerator instance: its board, clock, DSP chains, weight formats, sparsity
patterns, on-chip buffers and memory ports. :func:`load_config` validates it
into a frozen :class:`AccelConfig` and checks that it fits its board
(:func:`check_fits`).

Every size derived from the configuration (MACs per cycle, DSP estimate,
bytes per memory cycle, blocks per cycle, buffer geometry, address widths, the
configuration hash) is computed here and only here, the pattern of TVM-VTA's
``vta_config.json``: the hardware generator, the compiler, the golden model
and the performance model read these properties and never re-derive them.
``docs/config.md`` lists every field and every formula.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .board import (BOARDS_DIR, Board, Fields, board_names, display_path, load_board,
                    read_yaml, resolve_file, show)
from llmfab.core.errors import ConfigError, FitError
from llmfab.core.formats import (BLOCK_WEIGHTS, SPARSITY_PATTERNS, WEIGHT_FORMATS, block_bytes,
                                 check_format)

__all__ = [
    "CONFIGS_DIR",
    "BUFFERS",
    "ChainConfig",
    "BufferConfig",
    "HbmConfig",
    "BufferLayout",
    "AccelConfig",
    "load_config",
    "list_configs",
    "config_names",
    "check_fits",
    "format_configs_table",
]

#: Folder holding the named configurations.
CONFIGS_DIR = BOARDS_DIR / "configs"

#: On-chip buffers, in canonical order, with the field name of their size.
BUFFERS = ("activation", "weight", "kv", "global", "instruction")

# Memory primitives: both are 72 bits wide at their widest simple-dual-port shape.
PRIMITIVE_WIDTH = 72
#: Entry width of buffers whose width the dataflow does not force (byte-addressable data).
DEFAULT_BUFFER_WIDTH = 64
BRAM36_DEPTH = 512        # 512 x 72 = 36 Kb = 4.5 KiB
URAM_DEPTH = 4096         # 4096 x 72 = 288 Kb = 36 KiB
BRAM36_BYTES = BRAM36_DEPTH * PRIMITIVE_WIDTH // 8
URAM_BYTES = URAM_DEPTH * PRIMITIVE_WIDTH // 8
#: A buffer of at least this many bytes that is deeper than one BRAM36 goes to URAM.
URAM_MIN_BYTES = 64 * 1024

#: DSP slices per IEEE binary32 multiply: the 24x24 mantissa product needs two
#: 27x18 DSP48E2 multipliers; a DSP58 has a native single-precision mode (UG1273).
FMUL_DSP = {"DSP48E2": 2, "DSP58": 1}
#: Special-function unit estimate: one lane per chain, this many binary32
#: multiplies per lane (RMSNorm/softmax scaling, table interpolation for
#: exp/rsqrt/SiLU, RoPE rotation, eltwise multiply).
SFU_FMULS_PER_LANE = 4

#: Version of the hashed form; bump when the meaning of a field changes.
HASH_SCHEMA = 1

_KIB = 1024


def _ceil_log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ChainConfig:
    """The matrix engine's DSP chains.

    Attributes
    ----------
    length : int
        Weights one chain consumes per cycle: 32, 64, 128 or 256.
    count : int
        Chains (lanes of the matrix engine); each works on one output row. A multiple
        of ``hbm.ports``: the accelerator is one slice per memory port, each with
        ``count / ports`` chains (docs/isa.md, "Slices").
    break_points : bool
        The chain may split into ``length / 32`` independent 32-element dot
        products (required for ``length > 32``: every block has its own scale).
    pack_int4 : bool
        Two int4 x int8 products per DSP slice.
    tokens : int
        Token lanes (1, 2, 4 or 8; optional, default 1): each row pipeline's decoded weight
        blocks feed this many chains, one token each, so an MM (prefill) reads and decodes
        each weight row once per ``tokens`` tokens. MV (decode) uses the first lane. The
        chains and their scalers are replicated per lane (``dsp_total`` counts them).
    decoder_lookahead : int
        Beats each row pipeline's weight decoder holds beyond the two its shifter views (0
        or 1; optional, default 0). With 1 the next row's first beat waits in the decoder
        while a row's last block leaves, so a row whose first block straddles a beat (Q4_1
        rows of 576 columns: every other one) does not wait a cycle for it; it costs about
        485 LUT and 256 FF per row pipeline (hw/decoder.py).
    combines : int
        MvExec's row combines (1, 2, 4, 8 or 16; optional, default 1): rows summed (the four
        accum4 partials) and written per cycle, several in one line write when they share
        the line (a pass's rows are consecutive words). One combine takes a row a cycle, so
        rows shorter than the row pipelines (attention's MVs, few-block rows) wait for it, and
        every MV ends with its last pass's rows leaving one a cycle (128 on ``u280``).
    """

    length: int
    count: int
    break_points: bool
    pack_int4: bool
    tokens: int = 1
    decoder_lookahead: int = 0
    combines: int = 1


@dataclass(frozen=True)
class BufferConfig:
    """On-chip buffer sizes in KiB."""

    activation_kib: int
    weight_kib: int
    kv_kib: int
    global_kib: int
    instruction_kib: int
    #: Weight-tile slots the weight buffer is cut into (``buffers.weight_slots``, optional);
    #: 0: the compiler's choice (``compiler.compile._weight_slots``)
    weight_slots: int = 0


@dataclass(frozen=True)
class HbmConfig:
    """AXI4 master ports onto the board's main memory (HBM, or DDR on DDR-only cards).

    Attributes
    ----------
    ports : int
        Masters, each bound to one memory channel; one slice of the accelerator each
        (its share of the chains, its bank of the on-chip memory).
    data_width : int
        Bits per port per kernel cycle (64..1024, power of two).
    line_bytes : int
        Optional (0: the default): bytes of an on-chip line of the shared path, a
        power of two from one beat to one beat of every port. The default is the
        HBM line (one beat of every port) up to 64 bytes (hw/top.py's
        ``onchip_line_bytes``); tests set it to run a narrow line on few ports.
    """

    ports: int
    data_width: int
    line_bytes: int = 0


@dataclass(frozen=True)
class BufferLayout:
    """Geometry of one on-chip buffer, derived by :attr:`AccelConfig.buffer_layout`.

    Attributes
    ----------
    name : str
        ``"activation"``, ``"weight"``, ``"kv"``, ``"global"`` or ``"instruction"``.
    bytes : int
        Capacity in bytes.
    width_bits : int
        Data width of an entry: activation ``chain.length * activation_bits``
        (the slice the chains read per cycle), weight ``hbm.ports *
        hbm.data_width`` (one beat of every port per cycle), the others 64.
    depth : int
        Entries of ``width_bits``: ``ceil(bytes * 8 / width_bits)``.
    primitive : str
        ``"uram"`` if ``bytes >= 64 KiB`` and ``depth > 512``, else ``"bram36"``.
    count : int
        Primitives: ``ceil(width_bits / 72) * ceil(depth / D)``, D = 512
        (BRAM36) or 4096 (URAM); both primitives are 72 bits wide, so a 64-bit
        entry leaves 8 bits unused (4 KiB of a BRAM36's 4.5 KiB).
    addr_bits : int
        Bits of an entry address: ``ceil(log2(depth))`` (at least 1).
    """

    name: str
    bytes: int
    width_bits: int
    depth: int
    primitive: str
    count: int
    addr_bits: int


@dataclass(frozen=True)
class AccelConfig:
    """A validated accelerator configuration and everything derived from it.

    Fields mirror the YAML (see ``docs/config.md``); ``board`` is the board's
    name and ``board_spec`` the loaded :class:`~llmfab.boards.board.Board`.
    Derived sizes are properties; all of them together are :meth:`derived`.

    Attributes
    ----------
    name : str
    board : str
        Name of the board, as in the YAML.
    board_spec : Board
        The board's validated facts.
    clock_mhz : int or float
    chain : ChainConfig
    weight_formats : tuple of str
        Canonical order (q4_0, q4_1, q8_0).
    sparsity : tuple of str
        Canonical order; always contains ``"dense"``.
    activation_bits : int
    buffers : BufferConfig
    hbm : HbmConfig
    context : int
    max_prefill : int
    description : str
    source : str
        The file it was read from, as shown in messages.
    """

    name: str
    board: str
    board_spec: Board
    clock_mhz: int | float
    chain: ChainConfig
    weight_formats: tuple[str, ...]
    sparsity: tuple[str, ...]
    activation_bits: int
    buffers: BufferConfig
    hbm: HbmConfig
    context: int
    max_prefill: int
    description: str = ""
    attention: str = "sfu"
    source: str = field(default="", compare=False, repr=False)

    # ---- the matrix engine ------------------------------------------------

    @property
    def macs_per_cycle(self) -> int:
        """int4/int8 multiply-accumulates per cycle: ``length * count``."""
        return self.chain.length * self.chain.count

    @property
    def prefill_macs_per_cycle(self) -> int:
        """MACs per cycle of an MM with at least ``chain.tokens`` tokens: ``macs_per_cycle * tokens``."""
        return self.macs_per_cycle * self.chain.tokens

    @property
    def peak_gmacs(self) -> float:
        """Peak GMAC/s for 4-bit weights: ``macs_per_cycle * clock_mhz / 1000``."""
        return self.macs_per_cycle * self.clock_mhz / 1000

    def format_macs_per_cycle(self, fmt: str) -> int:
        """MACs per cycle for weights of *fmt*: halved for 8-bit weights when
        ``pack_int4`` (a packed DSP does one int8 x int8 product, not two)."""
        spec = check_format(fmt)
        if self.chain.pack_int4 and spec.weight_bits > 4:
            return self.macs_per_cycle // 2
        return self.macs_per_cycle

    @property
    def block_lanes_per_chain(self) -> int:
        """Independent 32-weight dot products per chain per cycle: ``length / 32``."""
        return self.chain.length // BLOCK_WEIGHTS

    @property
    def scale_fmuls(self) -> int:
        """binary32 multiplies per block lane: 2, or 3 if Q4_1 (its minimum term) is supported."""
        return max(WEIGHT_FORMATS[f].scale_fmuls for f in self.weight_formats)

    @property
    def mac_dsp_per_chain(self) -> int:
        """DSP slices doing the chain's products: ``length / 2`` with ``pack_int4``, else ``length``."""
        return self.chain.length // 2 if self.chain.pack_int4 else self.chain.length

    @property
    def scale_dsp_per_chain(self) -> int:
        """DSP slices scaling block results: ``lanes * scale_fmuls * FMUL_DSP[dsp_type]``."""
        return self.block_lanes_per_chain * self.scale_fmuls * FMUL_DSP[self.board_spec.dsp_type]

    @property
    def dsp_per_chain(self) -> int:
        """``mac_dsp_per_chain + scale_dsp_per_chain``."""
        return self.mac_dsp_per_chain + self.scale_dsp_per_chain

    @property
    def sfu_dsp(self) -> int:
        """SFU estimate: ``count * SFU_FMULS_PER_LANE * FMUL_DSP[dsp_type]``."""
        return self.chain.count * SFU_FMULS_PER_LANE * FMUL_DSP[self.board_spec.dsp_type]

    @property
    def dsp_total(self) -> int:
        """DSP slices of the accelerator: ``count * tokens * dsp_per_chain + sfu_dsp`` (every
        token lane has its own chains and scalers)."""
        return self.chain.count * self.chain.tokens * self.dsp_per_chain + self.sfu_dsp

    # ---- memory bandwidth ---------------------------------------------------

    @property
    def slices(self) -> int:
        """Slices of the accelerator: one per memory port (docs/isa.md, "Slices")."""
        return self.hbm.ports

    @property
    def stripe_bytes(self) -> int:
        """One port's beat, the stripe of HBM and of the on-chip banks: ``data_width / 8``."""
        return self.hbm.data_width // 8

    @property
    def onchip_line_bytes(self) -> int:
        """Bytes of an on-chip line, the shared path's width (docs/accelerator.md): the HBM
        line (one beat of every port) up to :data:`SHARED_LINE_BYTES`, else whole beats up to
        that (one beat when a beat is wider); ``hbm.line_bytes`` overrides it."""
        want = self.hbm.line_bytes or max(self.stripe_bytes, SHARED_LINE_BYTES)
        return min(self.hbm_bytes_per_cycle, want)

    @property
    def hbm_bytes_per_cycle(self) -> int:
        """Bytes the ports deliver per kernel cycle: ``ports * data_width / 8``."""
        return self.hbm.ports * self.hbm.data_width // 8

    @property
    def peak_hbm_gbps(self) -> float:
        """Port peak in GB/s: ``hbm_bytes_per_cycle * clock_mhz / 1000``."""
        return self.hbm_bytes_per_cycle * self.clock_mhz / 1000

    @property
    def memory_gbps(self) -> float:
        """What the bound channels can deliver: ``ports * channel bandwidth``."""
        return self.hbm.ports * self.board_spec.main_memory.bandwidth_gbps_per_channel

    @property
    def effective_hbm_gbps(self) -> float:
        """Theoretical streaming rate: ``min(peak_hbm_gbps, memory_gbps)``."""
        return min(self.peak_hbm_gbps, self.memory_gbps)

    @property
    def sustainable_hbm_gbps(self) -> float:
        """What the memory sustains for long sequential bursts through the ports: the board's
        memory timing (refresh, per-burst costs; ``boards/memory_timing.py``), or
        ``effective_hbm_gbps`` for a board without a ``timing`` section."""
        from llmfab.boards.memory_timing import sustainable_fraction
        return self.peak_hbm_gbps * sustainable_fraction(self, "card")

    def hbm_blocks_per_cycle(self, fmt: str, sparsity: str = "dense") -> float:
        """Weight blocks the ports deliver per cycle: ``hbm_bytes_per_cycle / block_bytes``."""
        return self.hbm_bytes_per_cycle / block_bytes(fmt, sparsity)

    def chain_blocks_per_cycle(self, fmt: str, sparsity: str = "dense") -> float:
        """Weight blocks the chains consume per cycle: ``format_macs_per_cycle(fmt) / 32``.

        The same for every sparsity pattern: a chain reads ``length`` activations
        per cycle, i.e. one 32-element block per 32 lanes, whatever fraction of
        its weights is kept (hw/chain.py). Sparsity saves HBM bytes, not chain
        cycles.
        """
        return self.format_macs_per_cycle(fmt) / BLOCK_WEIGHTS

    def keeps_up(self, fmt: str, sparsity: str = "dense") -> bool:
        """Whether the chains consume blocks at least as fast as the ports deliver them."""
        return self.chain_blocks_per_cycle(fmt, sparsity) >= self.hbm_blocks_per_cycle(fmt, sparsity)

    # ---- buffers and addresses ----------------------------------------------

    @property
    def buffer_bytes(self) -> dict[str, int]:
        """Bytes of each buffer (``<name>_kib * 1024``)."""
        return {name: getattr(self.buffers, f"{name}_kib") * _KIB for name in BUFFERS}

    @property
    def buffer_layout(self) -> dict[str, BufferLayout]:
        """Geometry and primitive count of each buffer (see :class:`BufferLayout`)."""
        widths = {
            "activation": self.chain.length * self.activation_bits,
            "weight": self.hbm.ports * self.hbm.data_width,
        }
        out = {}
        for name, nbytes in self.buffer_bytes.items():
            width = widths.get(name, DEFAULT_BUFFER_WIDTH)
            depth = math.ceil(nbytes * 8 / width)
            uram = nbytes >= URAM_MIN_BYTES and depth > BRAM36_DEPTH
            count = math.ceil(width / PRIMITIVE_WIDTH) * math.ceil(
                depth / (URAM_DEPTH if uram else BRAM36_DEPTH))
            out[name] = BufferLayout(name, nbytes, width, depth, "uram" if uram else "bram36",
                                     count, max(1, _ceil_log2(depth)))
        return out

    @property
    def bram36_total(self) -> int:
        """BRAM36 blocks of all buffers mapped to BRAM."""
        return sum(b.count for b in self.buffer_layout.values() if b.primitive == "bram36")

    @property
    def uram_total(self) -> int:
        """URAM blocks of all buffers mapped to URAM."""
        return sum(b.count for b in self.buffer_layout.values() if b.primitive == "uram")

    @property
    def hbm_addr_bits(self) -> int:
        """Bits of a byte address inside one main-memory channel."""
        return _ceil_log2(self.board_spec.main_memory.capacity_bytes_per_channel)

    @property
    def memory_addr_bits(self) -> int:
        """Bits of a byte address across the whole main memory."""
        return _ceil_log2(self.board_spec.main_memory.capacity_bytes)

    @property
    def position_bits(self) -> int:
        """Bits of a token position ``0 .. context-1``: ``log2(context)``."""
        return _ceil_log2(self.context)

    # ---- identity -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The configuration as YAML-shaped plain data (board by name)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update({
            "board": self.board,
            "clock_mhz": self.clock_mhz,
            "chain": {"length": self.chain.length, "count": self.chain.count,
                      "break_points": self.chain.break_points,
                      "pack_int4": self.chain.pack_int4,
                      # optional fields at their default are left out, so adding one does
                      # not change the hash of the configurations that do not use it
                      **({"tokens": self.chain.tokens} if self.chain.tokens != 1 else {}),
                      **({"decoder_lookahead": self.chain.decoder_lookahead}
                         if self.chain.decoder_lookahead else {}),
                      **({"combines": self.chain.combines} if self.chain.combines != 1 else {})},
            "weight_formats": list(self.weight_formats),
            "sparsity": list(self.sparsity),
            "activation_bits": self.activation_bits,
            "buffers": {**{f"{n}_kib": getattr(self.buffers, f"{n}_kib") for n in BUFFERS},
                        **({"weight_slots": self.buffers.weight_slots}
                           if self.buffers.weight_slots else {})},
            "hbm": {"ports": self.hbm.ports, "data_width": self.hbm.data_width,
                    **({"line_bytes": self.hbm.line_bytes} if self.hbm.line_bytes else {})},
            "context": self.context,
            "max_prefill": self.max_prefill,
            **({"attention": self.attention} if self.attention != "sfu" else {}),
        })
        return out

    def config_hash(self) -> str:
        """Stable identity of the hardware this configuration describes.

        ``sha256`` of the canonical JSON (sorted keys, no spaces) of
        :meth:`to_dict` without ``name`` and ``description`` (renaming a
        configuration does not change the hardware) plus ``"schema":
        HASH_SCHEMA``; the first 16 hex digits. Compiled programs record it.
        """
        data = self.to_dict()
        data.pop("name")
        data.pop("description", None)
        data["schema"] = HASH_SCHEMA
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def derived(self) -> dict[str, Any]:
        """Every derived size as plain data (JSON-serialisable)."""
        formats = {}
        for fmt in self.weight_formats:
            formats[fmt] = {
                s: {
                    "block_bytes": block_bytes(fmt, s),
                    "hbm_blocks_per_cycle": self.hbm_blocks_per_cycle(fmt, s),
                    "chain_blocks_per_cycle": self.chain_blocks_per_cycle(fmt, s),
                    "keeps_up": self.keeps_up(fmt, s),
                } for s in self.sparsity
            }
        return {
            "config_hash": self.config_hash(),
            "macs_per_cycle": self.macs_per_cycle,
            "peak_gmacs": self.peak_gmacs,
            "block_lanes_per_chain": self.block_lanes_per_chain,
            "scale_fmuls": self.scale_fmuls,
            "mac_dsp_per_chain": self.mac_dsp_per_chain,
            "scale_dsp_per_chain": self.scale_dsp_per_chain,
            "dsp_per_chain": self.dsp_per_chain,
            "sfu_dsp": self.sfu_dsp,
            "dsp_total": self.dsp_total,
            "hbm_bytes_per_cycle": self.hbm_bytes_per_cycle,
            "peak_hbm_gbps": self.peak_hbm_gbps,
            "memory_gbps": self.memory_gbps,
            "effective_hbm_gbps": self.effective_hbm_gbps,
            "sustainable_hbm_gbps": self.sustainable_hbm_gbps,
            "formats": formats,
            "buffers": {n: asdict(b) for n, b in self.buffer_layout.items()},
            "bram36_total": self.bram36_total,
            "uram_total": self.uram_total,
            "hbm_addr_bits": self.hbm_addr_bits,
            "memory_addr_bits": self.memory_addr_bits,
            "position_bits": self.position_bits,
        }


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

#: where attention runs (docs/config.md): "sfu", the float ATTN instruction over an fp16 cache;
#: "chains", MVs on the DSP chains over a quantized cache (docs/isa.md, "Attention on the chains")
ATTENTION_ENGINES = ("sfu", "chains")
_TOP_FIELDS = ("name", "board", "clock_mhz", "chain", "weight_formats", "sparsity",
               "activation_bits", "buffers", "hbm", "context", "max_prefill")
_CHAIN_FIELDS = ("length", "count", "break_points", "pack_int4")
_BUFFER_FIELDS = tuple(f"{n}_kib" for n in BUFFERS)
_HBM_FIELDS = ("ports", "data_width")
#: The on-chip line of the shared path when the HBM line (one beat of every port) is wider.
SHARED_LINE_BYTES = 64


def _pow2(f: Fields, key: str, lo: int, hi: int, why: str = "") -> int:
    value = f.integer(key)
    if not _is_pow2(value):
        raise f.fail(key, f"must be a power of two, not {value}")
    if not lo <= value <= hi:
        raise f.fail(key, f"must be between {lo} and {hi}{why}, not {value}")
    return value


def _sexagesimal(value: int) -> str | None:
    """YAML 1.1 reads an unquoted ``2:4`` as the number 124; undo that for the hint."""
    a, b = divmod(value, 60)
    text = f"{a}:{b}"
    return text if text in SPARSITY_PATTERNS else None


def _choices(f: Fields, key: str, known: dict, what: str) -> tuple[str, ...]:
    value = f.data[key]
    if not isinstance(value, list) or not value:
        raise f.fail(key, f"must be a non-empty list of {what}s, not {show(value)}")
    seen = set()
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and _sexagesimal(item):
            raise f.fail(key, f"has {item}, which is how YAML reads an unquoted "
                              f"{_sexagesimal(item)}; write \"{_sexagesimal(item)}\"")
        if item not in known:
            raise f.fail(key, f"entries must be one of {', '.join(known)}, not {show(item)}")
        if item in seen:
            raise f.fail(key, f"lists {show(item)} twice")
        seen.add(item)
    return tuple(k for k in known if k in seen)


def config_from_dict(data: dict, display: str, expected_name: str | None = None) -> AccelConfig:
    """Validate the mapping read from a configuration file and build the :class:`AccelConfig`.

    Does not check the fit to the board (:func:`load_config` does).

    Parameters
    ----------
    data : dict
        The parsed YAML.
    display : str
        File name used in error messages.
    expected_name : str, optional
        If given, ``name`` must equal it (named configurations: the file's stem).

    Raises
    ------
    ConfigError
        One line naming the file and the first bad field.
    """
    f = Fields(data, display, ConfigError)
    f.check_keys(_TOP_FIELDS, ("description", "attention"))

    name = f.string("name")
    if expected_name is not None and name != expected_name:
        raise f.fail("name", f"is {show(name)} but the file is named {expected_name}.yaml; "
                             f"make them equal")
    description = f.string("description") if f.has("description") else ""

    board_name = f.string("board")
    if board_name not in board_names():
        raise f.fail("board", f"must name a known board ({', '.join(board_names())}), "
                              f"not {show(board_name)}")
    board = load_board(board_name)

    clock = f.number("clock_mhz")

    c = f.sub("chain")
    c.check_keys(_CHAIN_FIELDS, ("tokens", "decoder_lookahead", "combines"))
    length = _pow2(c, "length", BLOCK_WEIGHTS, 8 * BLOCK_WEIGHTS,
                   " (one to eight 32-weight blocks)")
    count = c.integer("count")
    break_points = c.boolean("break_points")
    if length > BLOCK_WEIGHTS and not break_points:
        raise c.fail("break_points", f"must be true when chain.length is above {BLOCK_WEIGHTS} "
                                     f"(every 32-weight block has its own scale), not false")
    tokens = _pow2(c, "tokens", 1, 8, " (token lanes per row pipeline)") if c.has("tokens") else 1
    lookahead = 0
    if c.has("decoder_lookahead"):
        lookahead = c.integer("decoder_lookahead", minimum=0)
        if lookahead not in (0, 1):
            raise c.fail("decoder_lookahead", f"must be 0 or 1 (beats the row pipelines' "
                                              f"decoders hold ahead), not {lookahead}")
    combines = (_pow2(c, "combines", 1, 16, " (MvExec's row combines: rows written a cycle)")
                if c.has("combines") else 1)
    lanes = count * (length // BLOCK_WEIGHTS) * tokens
    if combines > lanes:
        raise c.fail("combines", f"must be at most the {lanes} output lanes of the row pipelines "
                                 f"(chain.count x length / 32 x tokens), not {combines}")
    chain = ChainConfig(length, count, break_points, c.boolean("pack_int4"), tokens, lookahead,
                        combines)

    formats = _choices(f, "weight_formats", WEIGHT_FORMATS, "weight format")
    sparsity = _choices(f, "sparsity", SPARSITY_PATTERNS, "sparsity pattern")
    if "dense" not in sparsity:
        raise f.fail("sparsity", "must include dense (every model has dense tensors)")

    activation_bits = f.integer("activation_bits")
    if activation_bits != 8:
        raise f.fail("activation_bits", f"must be 8 (int8 activations), not {activation_bits}")

    b = f.sub("buffers")
    b.check_keys(_BUFFER_FIELDS, ("weight_slots",))
    slots = b.integer("weight_slots", 2) if b.has("weight_slots") else 0
    buffers = BufferConfig(*(b.integer(k) for k in _BUFFER_FIELDS), weight_slots=slots)

    h = f.sub("hbm")
    h.check_keys(_HBM_FIELDS, ("line_bytes",))
    hbm = HbmConfig(h.integer("ports"), _pow2(h, "data_width", 64, 1024))
    if h.has("line_bytes"):
        beat = hbm.data_width // 8
        lb = _pow2(h, "line_bytes", beat, hbm.ports * beat,
                   f" (on-chip line: whole {beat}-byte beats, at most one of every port)")
        hbm = HbmConfig(hbm.ports, hbm.data_width, lb)
    if count % hbm.ports:
        # one slice per port (docs/isa.md, "Slices"): each gets count / ports chains
        raise c.fail("count", f"must be a multiple of hbm.ports ({hbm.ports}): each memory port's "
                              f"slice gets chain.count / hbm.ports chains, not {count}")

    context = f.integer("context")
    if not _is_pow2(context) or context < 64:
        raise f.fail("context", f"must be a power of two of at least 64, not {context}")
    max_prefill = f.integer("max_prefill")
    if max_prefill % 16:
        raise f.fail("max_prefill", f"must be a multiple of 16, not {max_prefill}")
    if max_prefill > context:
        raise f.fail("max_prefill", f"must not exceed context ({context}), not {max_prefill}")

    attention = f.string("attention") if f.has("attention") else "sfu"
    if attention not in ATTENTION_ENGINES:
        raise f.fail("attention", f"must be one of {', '.join(ATTENTION_ENGINES)}, not {show(attention)}")

    config = AccelConfig(name=name, board=board.name, board_spec=board, clock_mhz=clock, chain=chain,
                          weight_formats=formats, sparsity=sparsity,
                          activation_bits=activation_bits, buffers=buffers, hbm=hbm,
                          context=context, max_prefill=max_prefill, description=description,
                          source=display, attention=attention)
    if 4 * combines > config.onchip_line_bytes:
        raise c.fail("combines", f"must be at most the {config.onchip_line_bytes // 4} words of an "
                                 f"on-chip line ({config.onchip_line_bytes} bytes: the combines' "
                                 f"rows go out in one line write), not {combines}")
    return config


def check_fits(config: AccelConfig, board: Board | None = None) -> None:
    """Check that *config* can be built on *board* (default: its own, ``config.board_spec``).

    Checks, in order: clock, memory ports against the main memory's
    channels, DSP slices, BRAM36 and URAM (the last three after the shell's
    reservation).

    Raises
    ------
    FitError
        One line saying what does not fit and what to change, e.g.
        ``config 'x' needs 9800 DSP48E2 but board 'u280' has 9024; ...``.
    """
    board = board or config.board_spec
    who, where = f"config '{config.name}'", f"board '{board.name}'"
    if config.clock_mhz > board.max_kernel_clock_mhz:
        raise FitError(f"{who} runs at {config.clock_mhz:g} MHz but {where} allows at most "
                       f"{board.max_kernel_clock_mhz:g} MHz; lower clock_mhz")
    mem = board.main_memory
    if config.hbm.ports > mem.channels:
        raise FitError(f"{who} uses {config.hbm.ports} memory ports but {where} has "
                       f"{mem.channels} {mem.kind.upper()} channels; lower hbm.ports")
    needs = [
        ("dsp", config.dsp_total, board.dsp_type,
         "use fewer or shorter chains (chain.count, chain.length)"),
        ("bram36", config.bram36_total, "BRAM36", "shrink the buffers (buffers.*_kib)"),
        ("uram", config.uram_total, "URAM", "shrink the buffers (buffers.*_kib)"),
    ]
    for resource, need, unit, fix in needs:
        have = board.available(resource)
        if need > have:
            reserved = getattr(board.shell_reserved, resource)
            after = f" after the shell's {reserved:g}" if reserved else ""
            raise FitError(f"{who} needs {need} {unit} but {where} has {have}{after}; {fix}")


def config_names() -> list[str]:
    """Names of the packaged configurations (``boards/configs/*.yaml``), sorted."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def load_config(name_or_path: str | os.PathLike) -> AccelConfig:
    """Load, validate and fit-check a configuration by name (``"ci"``) or from a YAML file.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A packaged configuration's name, or a path (anything with a ``/`` or
        ending in ``.yaml``).

    Returns
    -------
    AccelConfig

    Raises
    ------
    ConfigError
        Unknown name, missing file, malformed YAML or a bad field (one line).
    FitError
        The configuration does not fit its board (a ``ConfigError``).
    BoardError
        The board file the configuration names is itself broken.
    """
    path, named = resolve_file(name_or_path, CONFIGS_DIR, "config", config_names, ConfigError)
    display = display_path(path) if named else str(name_or_path)
    data = read_yaml(path, display, ConfigError)
    config = config_from_dict(data, display, expected_name=path.stem if named else None)
    try:
        check_fits(config)
    except FitError as exc:
        if named:
            raise
        # a file given by path may carry any name: say which file (issue 9)
        raise FitError(f"{display}: {exc}") from None
    return config


def list_configs() -> list[AccelConfig]:
    """All packaged configurations, validated and fit-checked, sorted by name."""
    return [load_config(name) for name in config_names()]


def format_configs_table(configs: list[AccelConfig]) -> str:
    """A Markdown table of the configurations' headline derived figures (for docs/config.md).

    Parameters
    ----------
    configs : list of AccelConfig

    Returns
    -------
    str
        The table, no trailing newline.
    """
    header = ["config", "board", "MHz", "chains", "MAC/cycle", "GMAC/s", "DSP used / avail",
              "BRAM36", "URAM", "ports", "B/cycle", "peak GB/s", "eff. GB/s",
              "q4_0 blocks/cycle HBM / chains", "keeps up", "hash"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in configs:
        b = c.board_spec
        keeps = ", ".join(f for f in c.weight_formats if c.keeps_up(f)) or "none"
        row = [
            c.name, b.name, f"{c.clock_mhz:g}",
            f"{c.chain.count} x {c.chain.length}"
            + (f" x {c.chain.tokens} tokens" if c.chain.tokens > 1 else ""),
            f"{c.macs_per_cycle:,}", f"{c.peak_gmacs:,.1f}",
            f"{c.dsp_total:,} / {b.available('dsp'):,}",
            f"{c.bram36_total:,} / {b.available('bram36'):,}",
            f"{c.uram_total:,} / {b.available('uram'):,}",
            f"{c.hbm.ports} x {c.hbm.data_width}", f"{c.hbm_bytes_per_cycle:,}",
            f"{c.peak_hbm_gbps:,.1f}", f"{c.effective_hbm_gbps:,.1f}",
            f"{c.hbm_blocks_per_cycle('q4_0'):.1f} / {c.chain_blocks_per_cycle('q4_0'):g}"
            if "q4_0" in c.weight_formats else "-",
            keeps, f"`{c.config_hash()}`",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
