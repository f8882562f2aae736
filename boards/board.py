"""Board facts: one YAML file per card, validated into a frozen :class:`Board`.

Every card llmfab targets is described by ``boards/<name>.yaml`` (see
``docs/boards.md`` for the fields and the rule that every fact carries its
source in a YAML comment). This module reads those files, checks every field
and turns each mistake into a one-line :class:`~llmfab.core.errors.BoardError`
that names the file and the field::

    boards/u280.yaml: field 'resources.dsp' must be a positive integer, not 'lots'

Unknown fields are errors too, so a typo never passes silently.

The YAML helpers at the top (:func:`read_yaml`, :class:`Fields`) are shared with
:mod:`llmfab.boards.config`, which validates accelerator configurations the
same way.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from llmfab.core.errors import BoardError, LlmfabError

__all__ = [
    "BOARDS_DIR",
    "FAMILIES",
    "DSP_TYPES",
    "MEMORY_KINDS",
    "Resources",
    "ShellReserved",
    "MemorySpec",
    "Board",
    "load_board",
    "list_boards",
    "board_names",
    "format_boards_table",
]

#: Folder holding the board YAML files (the package folder itself).
BOARDS_DIR = Path(__file__).resolve().parent

#: Device families and the DSP slice each one has.
FAMILIES = {"ultrascale_plus": "DSP48E2", "versal": "DSP58"}
DSP_TYPES = tuple(sorted(set(FAMILIES.values())))
MEMORY_KINDS = ("hbm", "ddr")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_MIB = 1 << 20
_GIB = 1 << 30


# --------------------------------------------------------------------------
# YAML reading and field checking, shared with config.py
# --------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys (the later one would win silently)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def show(value: Any) -> str:
    """Render a YAML value for an error message (``'lots'``, ``48``, ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def display_path(path: Path, package_dir: Path = BOARDS_DIR) -> str:
    """Short name of a file for messages: ``boards/u280.yaml`` for packaged files."""
    try:
        return str(Path("boards") / path.resolve().relative_to(package_dir))
    except ValueError:
        return str(path)


#: Board and configuration files are a few KiB; anything past this is the wrong file.
MAX_YAML_BYTES = 1 << 20


def read_yaml(path: Path, display: str, error: type[LlmfabError]) -> dict:
    """Read a YAML file that must hold a mapping of fields.

    Parameters
    ----------
    path : Path
        The file to read.
    display : str
        How the file is named in error messages.
    error : type
        The exception class to raise (:class:`BoardError` or ``ConfigError``).

    Raises
    ------
    LlmfabError
        One line naming the file: unreadable, malformed YAML, duplicate key,
        or not a mapping.
    """
    try:
        size = path.stat().st_size
    except OSError:
        size = 0                      # reported by the read below
    if size > MAX_YAML_BYTES:
        raise error(f"{display}: {size} bytes is too large for a YAML description "
                    f"(at most {MAX_YAML_BYTES}); is it the right file?")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{display}: file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{display}: cannot read the file ({exc})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise error(f"{display}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise error(f"{display}: not valid YAML: {exc}") from None
    if data is None:
        raise error(f"{display}: the file is empty; expected a mapping of fields")
    if not isinstance(data, dict):
        raise error(f"{display}: expected a mapping of fields, not {type(data).__name__} "
                    f"{show(data)}")
    return data


class Fields:
    """Checks the fields of one YAML mapping, raising one-line errors.

    Parameters
    ----------
    data : dict
        The mapping read from YAML.
    display : str
        The file name used in messages.
    error : type
        Exception class raised on a bad field.
    prefix : str
        Dotted path of this mapping inside the file (``""`` at top level).
    """

    def __init__(self, data: dict, display: str, error: type[LlmfabError], prefix: str = ""):
        self.data = data
        self.display = display
        self.error = error
        self.prefix = prefix

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, message: str) -> LlmfabError:
        """Build the error for *key*: ``<file>: field '<path>' <message>``."""
        return self.error(f"{self.display}: field '{self.path(key)}' {message}")

    def check_keys(self, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        """Unknown keys first (a typo explains the missing key it causes), then missing."""
        known = list(required) + list(optional)
        for key in self.data:
            if key not in known:
                if not isinstance(key, str):
                    raise self.error(f"{self.display}: key {show(key)} under "
                                     f"'{self.prefix or 'top level'}' is not a field name")
                close = difflib.get_close_matches(key, known, n=1)
                if close:
                    raise self.fail(key, f"is unknown (did you mean '{self.path(close[0])}'?)")
                raise self.fail(key, f"is unknown; known fields here: {', '.join(known)}")
        for key in required:
            if key not in self.data:
                raise self.fail(key, "is missing")

    def has(self, key: str) -> bool:
        return key in self.data

    def sub(self, key: str) -> "Fields":
        value = self.data[key]
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping of fields, not {show(value)}")
        return Fields(value, self.display, self.error, self.path(key))

    def sub_list(self, key: str) -> list["Fields"]:
        value = self.data[key]
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"must be a non-empty list, not {show(value)}")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.fail(f"{key}[{i}]", f"must be a mapping of fields, not {show(item)}")
            out.append(Fields(item, self.display, self.error, f"{self.path(key)}[{i}]"))
        return out

    def string(self, key: str, choices: tuple[str, ...] | None = None,
               nullable: bool = False) -> str | None:
        value = self.data[key]
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value.strip():
            what = "a non-empty string" + (" or null" if nullable else "")
            raise self.fail(key, f"must be {what}, not {show(value)}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, not {show(value)}")
        return value

    def boolean(self, key: str) -> bool:
        value = self.data[key]
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {show(value)}")
        return value

    def integer(self, key: str, minimum: int = 1) -> int:
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = {1: "a positive integer", 0: "a non-negative integer"}.get(
                minimum, f"an integer >= {minimum}")
            raise self.fail(key, f"must be {kind}, not {show(value)}")
        return value

    def number(self, key: str, allow_zero: bool = False) -> int | float:
        value = self.data[key]
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and math.isfinite(value) and (value >= 0 if allow_zero else value > 0))
        if not ok:
            kind = "a non-negative number" if allow_zero else "a positive number"
            raise self.fail(key, f"must be {kind}, not {show(value)}")
        return normalize_number(value)


def normalize_number(value: int | float) -> int | float:
    """``300.0`` -> ``300`` so equal numbers print and hash the same."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _not_a_file(path: Path) -> str:
    """Why ``path`` is not a readable YAML file: missing, a directory, a device, a FIFO..."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a YAML file"
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a plain file")
    return f"is not a regular file ({kind}); give a YAML file"


def resolve_file(name_or_path: str | os.PathLike, folder: Path, kind: str,
                 known: Callable[[], list[str]], error: type[LlmfabError]) -> tuple[Path, bool]:
    """Turn a name or a path into a file; return ``(path, is_named)``.

    A :class:`os.PathLike`, or a string containing a path separator or ending
    in ``.yaml``/``.yml``, is a path; anything else is the name of a file in
    *folder*.
    """
    if isinstance(name_or_path, os.PathLike):
        text = os.fspath(name_or_path)
    elif isinstance(name_or_path, str):
        text = name_or_path
    else:
        raise error(f"a {kind} is given by name or path, not {show(name_or_path)}")
    is_path = (isinstance(name_or_path, os.PathLike) or "/" in text or os.sep in text
               or text.endswith((".yaml", ".yml")))
    if is_path:
        path = Path(text)
        if not path.is_file():
            raise error(f"{kind} file '{text}' {_not_a_file(path)}")
        return path, False
    path = folder / f"{text}.yaml"
    if not _NAME_RE.match(text) or not path.is_file():
        raise error(f"unknown {kind} '{text}'; known {kind}s: {', '.join(known())}")
    return path, True


# --------------------------------------------------------------------------
# The board schema
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    """Programmable-logic resources of the whole device.

    Attributes
    ----------
    dsp, lut, ff, bram36, uram : int
        DSP slices, LUTs, flip-flops, 36 Kb block RAMs, 288 Kb UltraRAMs.
    """

    dsp: int
    lut: int
    ff: int
    bram36: int
    uram: int


@dataclass(frozen=True)
class ShellReserved:
    """Resources the platform shell occupies (fractional BRAM36 = BRAM18 halves)."""

    dsp: float = 0
    lut: float = 0
    ff: float = 0
    bram36: float = 0
    uram: float = 0


@dataclass(frozen=True)
class MemorySpec:
    """One kind of off-chip memory on the card.

    Attributes
    ----------
    kind : str
        ``"hbm"`` or ``"ddr"``.
    channels : int
        Independent channels (HBM pseudo-channels, DDR controllers); the
        accelerator binds one AXI4 master to one channel.
    capacity_bytes_per_channel : int
        Bytes per channel.
    bandwidth_gbps_per_channel : float
        Theoretical peak per channel in GB/s (1e9 bytes per second).
    standard : str or None
        Marketing name for tables (``"HBM2"``, ``"DDR4"``); defaults to the kind.
    """

    kind: str
    channels: int
    capacity_bytes_per_channel: int
    bandwidth_gbps_per_channel: float
    standard: str | None = None

    @property
    def capacity_bytes(self) -> int:
        """Total bytes of this memory."""
        return self.channels * self.capacity_bytes_per_channel

    @property
    def bandwidth_gbps(self) -> float:
        """Total theoretical bandwidth of this memory in GB/s."""
        return self.channels * self.bandwidth_gbps_per_channel

    @property
    def label(self) -> str:
        """Headline text, e.g. ``"HBM2 8 GiB, 32 ch"``."""
        return f"{self.standard or self.kind.upper()} {format_bytes(self.capacity_bytes)}, " \
               f"{self.channels} ch"


@dataclass(frozen=True)
class Board:
    """Validated facts of one card (see ``docs/boards.md``).

    Attributes
    ----------
    name : str
        Short name, equal to the file's stem for packaged boards.
    part : str
        FPGA part number.
    family : str
        ``"ultrascale_plus"`` or ``"versal"``.
    description : str
        One line for people.
    resources : Resources
        Device resources.
    dsp_type : str
        ``"DSP48E2"`` (UltraScale+) or ``"DSP58"`` (Versal).
    memory : tuple of MemorySpec
        Off-chip memories; the first is the *main memory* the accelerator
        streams weights from (its ``hbm`` ports bind to its channels).
    kernel_clock_mhz : int or float
        Default kernel clock of the platform.
    max_kernel_clock_mhz : int or float
        Highest kernel clock a configuration may ask for.
    slrs : int
        Super logic regions (dies).
    platform : str or None
        Vitis platform name; ``None`` for simulation boards and cards without
        an XRT shell.
    shell_reserved : ShellReserved
        Resources the shell occupies (zero where not known).
    source : str
        The file it was read from, as shown in messages.
    """

    name: str
    part: str
    family: str
    description: str
    resources: Resources
    dsp_type: str
    memory: tuple[MemorySpec, ...]
    kernel_clock_mhz: int | float
    max_kernel_clock_mhz: int | float
    slrs: int
    platform: str | None
    shell_reserved: ShellReserved = field(default_factory=ShellReserved)
    source: str = field(default="", compare=False, repr=False)

    @property
    def main_memory(self) -> MemorySpec:
        """The memory the accelerator's ports stream from (the first listed)."""
        return self.memory[0]

    @property
    def total_memory_bytes(self) -> int:
        """Bytes of all off-chip memories together."""
        return sum(m.capacity_bytes for m in self.memory)

    @property
    def total_bandwidth_gbps(self) -> float:
        """Theoretical GB/s of all off-chip memories together."""
        return sum(m.bandwidth_gbps for m in self.memory)

    @property
    def memory_channels(self) -> int:
        """Channels of all off-chip memories together."""
        return sum(m.channels for m in self.memory)

    def summary(self) -> dict:
        """Headline facts as plain data (JSON-serialisable), e.g. for ``llmfab boards --json``."""
        return {
            "name": self.name,
            "part": self.part,
            "family": self.family,
            "description": self.description,
            "dsp": self.resources.dsp,
            "dsp_type": self.dsp_type,
            "lut": self.resources.lut,
            "ff": self.resources.ff,
            "bram36": self.resources.bram36,
            "uram": self.resources.uram,
            "memory": [{"kind": m.kind, "label": m.label, "channels": m.channels,
                        "capacity_bytes": m.capacity_bytes, "bandwidth_gbps": m.bandwidth_gbps}
                       for m in self.memory],
            "total_memory_bytes": self.total_memory_bytes,
            "total_bandwidth_gbps": self.total_bandwidth_gbps,
            "kernel_clock_mhz": self.kernel_clock_mhz,
            "max_kernel_clock_mhz": self.max_kernel_clock_mhz,
            "slrs": self.slrs,
            "platform": self.platform,
        }

    def available(self, resource: str) -> int:
        """Units of *resource* (``"dsp"``, ``"lut"``, ``"ff"``, ``"bram36"``, ``"uram"``)
        left for the accelerator after the shell's reservation (rounded down)."""
        total = getattr(self.resources, resource)
        return int(math.floor(total - getattr(self.shell_reserved, resource)))


_BOARD_FIELDS = ("name", "part", "family", "description", "resources", "dsp_type", "memory",
                 "kernel_clock_mhz", "max_kernel_clock_mhz", "slrs", "platform")
_RESOURCE_FIELDS = ("dsp", "lut", "ff", "bram36", "uram")
_MEMORY_FIELDS = ("kind", "channels", "bandwidth_gbps_per_channel")
_MEMORY_OPTIONAL = ("capacity_gib_per_channel", "capacity_mib_per_channel", "standard")


def board_from_dict(data: dict, display: str, expected_name: str | None = None) -> Board:
    """Validate the mapping read from a board file and build the :class:`Board`.

    Parameters
    ----------
    data : dict
        The parsed YAML.
    display : str
        File name used in error messages.
    expected_name : str, optional
        If given, ``name`` must equal it (packaged boards: the file's stem).

    Raises
    ------
    BoardError
        One line naming the file and the first bad field.
    """
    f = Fields(data, display, BoardError)
    f.check_keys(_BOARD_FIELDS, ("shell_reserved",))

    name = f.string("name")
    if not _NAME_RE.match(name):
        raise f.fail("name", f"must be lower-case letters, digits, '-' or '_', not {show(name)}")
    if expected_name is not None and name != expected_name:
        raise f.fail("name", f"is {show(name)} but the file is named {expected_name}.yaml; "
                             f"make them equal")
    part = f.string("part")
    family = f.string("family", tuple(FAMILIES))
    description = f.string("description")

    r = f.sub("resources")
    r.check_keys(_RESOURCE_FIELDS)
    resources = Resources(dsp=r.integer("dsp"), lut=r.integer("lut"), ff=r.integer("ff"),
                          bram36=r.integer("bram36", 0), uram=r.integer("uram", 0))

    dsp_type = f.string("dsp_type", DSP_TYPES)
    if dsp_type != FAMILIES[family]:
        raise f.fail("dsp_type", f"must be {FAMILIES[family]} for family {family}, "
                                 f"not {show(dsp_type)}")

    memory = []
    for m in f.sub_list("memory"):
        m.check_keys(_MEMORY_FIELDS, _MEMORY_OPTIONAL)
        kind = m.string("kind", MEMORY_KINDS)
        channels = m.integer("channels")
        has_gib, has_mib = m.has("capacity_gib_per_channel"), m.has("capacity_mib_per_channel")
        if has_gib == has_mib:
            raise m.error(f"{display}: field '{m.prefix}' needs exactly one of "
                          f"'capacity_gib_per_channel' or 'capacity_mib_per_channel'")
        if has_gib:
            capacity = m.number("capacity_gib_per_channel") * _GIB
        else:
            capacity = m.number("capacity_mib_per_channel") * _MIB
        if not float(capacity).is_integer():
            key = "capacity_gib_per_channel" if has_gib else "capacity_mib_per_channel"
            raise m.fail(key, "must be a whole number of bytes")
        bandwidth = m.number("bandwidth_gbps_per_channel")
        standard = m.string("standard") if m.has("standard") else None
        memory.append(MemorySpec(kind, channels, int(capacity), bandwidth, standard))

    clock = f.number("kernel_clock_mhz")
    max_clock = f.number("max_kernel_clock_mhz")
    if clock > max_clock:
        raise f.fail("kernel_clock_mhz", f"must not exceed max_kernel_clock_mhz "
                                         f"({show(max_clock)}), not {show(clock)}")
    slrs = f.integer("slrs")
    platform = f.string("platform", nullable=True)

    shell = ShellReserved()
    if f.has("shell_reserved"):
        s = f.sub("shell_reserved")
        s.check_keys((), _RESOURCE_FIELDS)
        values = {k: s.number(k, allow_zero=True) for k in _RESOURCE_FIELDS if s.has(k)}
        for k, v in values.items():
            if v > getattr(resources, k):
                raise s.fail(k, f"must not exceed resources.{k} "
                                f"({getattr(resources, k)}), not {show(v)}")
        shell = ShellReserved(**values)

    return Board(name=name, part=part, family=family, description=description,
                 resources=resources, dsp_type=dsp_type, memory=tuple(memory),
                 kernel_clock_mhz=clock, max_kernel_clock_mhz=max_clock, slrs=slrs,
                 platform=platform, shell_reserved=shell, source=display)


def board_names() -> list[str]:
    """Names of the packaged boards (``boards/*.yaml``), sorted."""
    return sorted(p.stem for p in BOARDS_DIR.glob("*.yaml"))


def load_board(name_or_path: str | os.PathLike) -> Board:
    """Load and validate a board by name (``"u280"``) or from a YAML file.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A packaged board's name, or a path (anything with a ``/`` or ending in
        ``.yaml``).

    Returns
    -------
    Board

    Raises
    ------
    BoardError
        Unknown name, missing file, malformed YAML or a bad field (one line).
    """
    path, named = resolve_file(name_or_path, BOARDS_DIR, "board", board_names, BoardError)
    display = display_path(path) if named else str(name_or_path)
    data = read_yaml(path, display, BoardError)
    return board_from_dict(data, display, expected_name=path.stem if named else None)


def list_boards() -> list[Board]:
    """All packaged boards, validated, sorted by name."""
    return [load_board(name) for name in board_names()]


# --------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------

def format_bytes(n: int) -> str:
    """``8589934592`` -> ``"8 GiB"``; MiB below one GiB."""
    if n >= _GIB:
        v = n / _GIB
        return f"{v:g} GiB" if v == int(v) or v >= 10 else f"{v:.1f} GiB"
    return f"{n / _MIB:g} MiB"


def _format_gbps(value: float) -> str:
    text = f"{value:,.2f}".rstrip("0").rstrip(".")
    return text


def format_boards_table(boards: list[Board]) -> str:
    """A plain-text table of the boards' headline figures (for ``llmfab boards``).

    Parameters
    ----------
    boards : list of Board

    Returns
    -------
    str
        One header line, a rule, one line per board; no trailing newline.
        Memory and bandwidth list every memory of the card, main memory first.
    """
    header = ("board", "part", "DSP", "LUT", "BRAM36", "URAM", "memory", "GB/s", "clock MHz")
    rows = []
    for b in boards:
        r = b.resources
        rows.append((
            b.name,
            b.part,
            f"{r.dsp:,} {b.dsp_type}",
            f"{r.lut:,}",
            f"{r.bram36:,}",
            f"{r.uram:,}",
            " + ".join(m.label for m in b.memory),
            " + ".join(_format_gbps(m.bandwidth_gbps) for m in b.memory),
            f"{b.kernel_clock_mhz:g} (max {b.max_kernel_clock_mhz:g})",
        ))
    numeric = {2, 3, 4, 5}
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        out = [c.rjust(w) if i in numeric else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in rows]
    return "\n".join(lines)
