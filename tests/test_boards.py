"""Tests of llmfab.boards.board: the board files, their schema and its error messages."""

import pathlib

import pytest
import yaml

from llmfab.boards import (Board, BoardError, board_names, format_boards_table, list_boards,
                           load_board)
from llmfab.boards.board import BOARDS_DIR, board_from_dict

ALL_BOARDS = ["sim-small", "sim-tiny", "u250", "u280", "u55c", "v80", "vhk158"]
GIB = 1 << 30
MIB = 1 << 20


def packaged(name):
    """The parsed YAML of a packaged board, to be modified by a test."""
    return yaml.safe_load((BOARDS_DIR / f"{name}.yaml").read_text())


def write(tmp_path, data, name="board.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(path_or_name):
    with pytest.raises(BoardError) as info:
        load_board(path_or_name)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- the packaged boards ------------------------------------------------------

def test_board_names():
    assert board_names() == ALL_BOARDS


@pytest.mark.parametrize("name", ALL_BOARDS)
def test_every_board_loads(name):
    board = load_board(name)
    assert isinstance(board, Board)
    assert board.name == name
    assert board.source == f"boards/{name}.yaml"
    assert board.kernel_clock_mhz <= board.max_kernel_clock_mhz
    assert board.dsp_type == {"ultrascale_plus": "DSP48E2", "versal": "DSP58"}[board.family]
    assert board.platform is None or board.platform.startswith("xilinx_")


@pytest.mark.parametrize("name", [n for n in ALL_BOARDS if not n.startswith("sim-")])
def test_every_fact_has_a_source_comment(name):
    """The source rule (docs/boards.md): each fact line of a real card, or the
    line opening its group (``resources:``, ``- kind:``), carries a comment."""
    keys = ("part:", "family:", "dsp_type:", "kernel_clock_mhz:", "max_kernel_clock_mhz:",
            "slrs:", "platform:", "resources:", "- kind:", "bandwidth_gbps_per_channel:")
    for line in (BOARDS_DIR / f"{name}.yaml").read_text().splitlines():
        if line.strip().startswith(keys):
            assert "#" in line, f"{name}.yaml: no source comment on {line.strip()!r}"


def test_list_boards():
    assert [b.name for b in list_boards()] == ALL_BOARDS


def test_u280_facts_and_derived():
    b = load_board("u280")
    assert b.resources.dsp == 9024
    assert b.resources.lut == 1_303_680
    assert b.resources.bram36 == 2016
    assert b.resources.uram == 960
    assert b.slrs == 3
    assert b.platform == "xilinx_u280_gen3x16_xdma_1_202211_1"
    hbm, ddr = b.memory
    assert (hbm.kind, hbm.channels, hbm.capacity_bytes_per_channel) == ("hbm", 32, 256 * MIB)
    assert hbm.capacity_bytes == 8 * GIB
    assert hbm.bandwidth_gbps == pytest.approx(460.0)
    assert ddr.capacity_bytes == 32 * GIB
    assert b.main_memory is hbm
    assert b.total_memory_bytes == 40 * GIB
    assert b.total_bandwidth_gbps == pytest.approx(460.0 + 38.5)
    assert b.memory_channels == 34
    assert b.available("bram36") == 1820        # 2016 - 195.5, rounded down
    assert b.available("lut") == 1_303_680 - 107_629
    assert b.available("dsp") == 9024


def test_other_headline_facts():
    assert load_board("u55c").main_memory.capacity_bytes == 16 * GIB
    u250 = load_board("u250")
    assert u250.main_memory.kind == "ddr"
    assert u250.total_bandwidth_gbps == pytest.approx(77.0)
    v80 = load_board("v80")
    assert (v80.resources.dsp, v80.dsp_type) == (10848, "DSP58")
    assert v80.main_memory.bandwidth_gbps == pytest.approx(819.2)
    assert load_board("sim-small").main_memory.channels == 4
    assert load_board("sim-small").max_kernel_clock_mhz == 200


def test_v80_notes_the_bandwidth_conflict():
    text = (BOARDS_DIR / "v80.yaml").read_text()
    assert "819.2" in text and "460" in text and "CONFLICT" in text


def test_boards_table():
    table = format_boards_table(list_boards())
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["board", "part", "DSP", "LUT"]
    assert len(lines) == 2 + len(ALL_BOARDS)
    u280 = next(line for line in lines if line.startswith("u280 "))
    assert "HBM2 8 GiB, 32 ch + DDR4 32 GiB, 2 ch" in u280
    assert "9,024 DSP48E2" in u280
    assert "460 + 38.5" in u280
    assert "300 (max 500)" in u280
    assert "HBM2e 32 GiB, 32 ch" in next(line for line in lines if line.startswith("v80 "))


def test_summary_is_plain_data():
    import json
    s = load_board("u280").summary()
    assert json.loads(json.dumps(s)) == s
    assert (s["name"], s["dsp"], s["memory"][0]["label"]) == ("u280", 9024, "HBM2 8 GiB, 32 ch")


def test_load_by_path_and_pathlike(tmp_path):
    path = write(tmp_path, packaged("u280"), "mycard.yaml")
    assert load_board(path) == load_board("u280")
    assert load_board(str(path)).source == str(path)


# ---- error messages -----------------------------------------------------------

def test_unknown_board_name():
    assert error_of("u290") == ("unknown board 'u290'; known boards: "
                                "sim-small, sim-tiny, u250, u280, u55c, v80, vhk158")


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert error_of(missing) == f"board file '{missing}' does not exist"


def test_missing_field(tmp_path):
    data = packaged("u280")
    del data["resources"]["dsp"]
    path = write(tmp_path, data)
    assert error_of(path) == f"{path}: field 'resources.dsp' is missing"


def test_missing_top_level_field(tmp_path):
    data = packaged("u280")
    del data["slrs"]
    path = write(tmp_path, data)
    assert error_of(path) == f"{path}: field 'slrs' is missing"


def test_wrong_type(tmp_path):
    data = packaged("u280")
    data["resources"]["dsp"] = "lots"
    path = write(tmp_path, data)
    assert error_of(path) == f"{path}: field 'resources.dsp' must be a positive integer, not 'lots'"


@pytest.mark.parametrize("value, shown", [(True, "true"), (-3, "-3"), (12.5, "12.5"), (None, "null")])
def test_wrong_integer_values(tmp_path, value, shown):
    data = packaged("u280")
    data["resources"]["dsp"] = value
    path = write(tmp_path, data)
    assert error_of(path) == f"{path}: field 'resources.dsp' must be a positive integer, not {shown}"


def test_wrong_memory_field(tmp_path):
    data = packaged("u280")
    data["memory"][1]["bandwidth_gbps_per_channel"] = "fast"
    path = write(tmp_path, data)
    assert error_of(path) == (f"{path}: field 'memory[1].bandwidth_gbps_per_channel' "
                              f"must be a positive number, not 'fast'")


def test_bad_choice(tmp_path):
    data = packaged("u280")
    data["memory"][0]["kind"] = "sram"
    path = write(tmp_path, data)
    assert error_of(path) == f"{path}: field 'memory[0].kind' must be one of hbm, ddr, not 'sram'"


def test_dsp_type_must_match_family(tmp_path):
    data = packaged("u280")
    data["dsp_type"] = "DSP58"
    path = write(tmp_path, data)
    assert error_of(path) == (f"{path}: field 'dsp_type' must be DSP48E2 for family "
                              f"ultrascale_plus, not 'DSP58'")


def test_unknown_field_with_suggestion(tmp_path):
    data = packaged("u280")
    data["resources"]["dsps"] = data["resources"].pop("dsp")
    path = write(tmp_path, data)
    assert error_of(path) == f"{path}: field 'resources.dsps' is unknown (did you mean 'resources.dsp'?)"


def test_unknown_field_without_suggestion(tmp_path):
    data = packaged("sim-tiny")
    data["colour"] = "red"
    path = write(tmp_path, data)
    assert error_of(path) == (
        f"{path}: field 'colour' is unknown; known fields here: name, part, family, "
        f"description, resources, dsp_type, memory, kernel_clock_mhz, max_kernel_clock_mhz, "
        f"slrs, platform, shell_reserved")


def test_capacity_needs_exactly_one_unit(tmp_path):
    data = packaged("u280")
    data["memory"][0]["capacity_gib_per_channel"] = 0.25
    path = write(tmp_path, data)
    assert error_of(path) == (f"{path}: field 'memory[0]' needs exactly one of "
                              f"'capacity_gib_per_channel' or 'capacity_mib_per_channel'")


def test_memory_must_be_a_list(tmp_path):
    data = packaged("u280")
    data["memory"] = {"kind": "hbm"}
    path = write(tmp_path, data)
    assert error_of(path) == (f"{path}: field 'memory' must be a non-empty list, "
                              f"not {{'kind': 'hbm'}}")


def test_clock_above_max(tmp_path):
    data = packaged("u280")
    data["kernel_clock_mhz"] = 600
    path = write(tmp_path, data)
    assert error_of(path) == (f"{path}: field 'kernel_clock_mhz' must not exceed "
                              f"max_kernel_clock_mhz (500), not 600")


def test_shell_reservation_above_resources(tmp_path):
    data = packaged("u280")
    data["shell_reserved"]["bram36"] = 5000
    path = write(tmp_path, data)
    assert error_of(path) == (f"{path}: field 'shell_reserved.bram36' must not exceed "
                              f"resources.bram36 (2016), not 5000")


def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "name: u280\nresources: [1, 2\n")
    assert error_of(path) == (f"{path}: not valid YAML at line 3, column 1: "
                              f"expected ',' or ']', but got '<stream end>'")


def test_duplicate_key(tmp_path):
    path = write(tmp_path, "name: a\nname: b\n")
    assert error_of(path) == f"{path}: not valid YAML at line 2, column 1: duplicate key 'name'"


def test_empty_and_non_mapping_files(tmp_path):
    empty = write(tmp_path, "", "empty.yaml")
    assert error_of(empty) == f"{empty}: the file is empty; expected a mapping of fields"
    listed = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    assert error_of(listed) == f"{listed}: expected a mapping of fields, not list [1, 2]"


def test_packaged_name_must_match_file():
    data = packaged("u280")
    data["name"] = "u281"
    with pytest.raises(BoardError) as info:
        board_from_dict(data, "boards/u280.yaml", expected_name="u280")
    assert str(info.value) == ("boards/u280.yaml: field 'name' is 'u281' but the file is "
                               "named u280.yaml; make them equal")


def test_board_is_frozen():
    board = load_board("sim-tiny")
    with pytest.raises(AttributeError):
        board.name = "x"


def test_board_files_are_package_data():
    """The YAML files sit in the package folder so both install modes ship them."""
    assert BOARDS_DIR.name == "boards"
    assert sorted(p.stem for p in pathlib.Path(BOARDS_DIR).glob("*.yaml")) == ALL_BOARDS


def test_docs_boards_table_is_generated_from_code():
    docs = pathlib.Path(__file__).resolve().parent.parent / "docs" / "boards.md"
    assert format_boards_table(list_boards()) in docs.read_text(), \
        "docs/boards.md is stale: paste format_boards_table(list_boards())"
