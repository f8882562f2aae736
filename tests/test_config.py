"""Tests of llmfab.boards.config: named configurations, derived sizes, hash, errors."""

import json
import pathlib

import pytest
import yaml

from llmfab.core.formats import block_bytes, kept_weights
from llmfab.boards import (AccelConfig, ConfigError, FitError, check_fits,
                           config_names, format_configs_table, list_configs,
                           load_board, load_config)
from llmfab.boards.config import CONFIGS_DIR

ALL_CONFIGS = ["ci", "ci-chains", "tiny", "u250", "u280", "u280-slice", "u55c", "v80", "vhk158"]
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def packaged(name):
    """The parsed YAML of a packaged configuration, to be modified by a test."""
    return yaml.safe_load((CONFIGS_DIR / f"{name}.yaml").read_text())


def write(tmp_path, data, name="config.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(path_or_name, kind=ConfigError):
    with pytest.raises(kind) as info:
        load_config(path_or_name)
    message = str(info.value)
    assert "\n" not in message
    return message


def variant(tmp_path, base="ci", **changes):
    """Write a copy of a packaged config with dotted-path fields changed."""
    data = packaged(base)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    return write(tmp_path, data)


# ---- the packaged configurations ----------------------------------------------

def test_config_names():
    assert config_names() == ALL_CONFIGS


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_loads_fits_and_keeps_up(name):
    config = load_config(name)
    assert isinstance(config, AccelConfig)
    assert config.name == name
    check_fits(config, config.board_spec)
    assert config.clock_mhz <= config.board_spec.max_kernel_clock_mhz
    assert config.hbm.ports <= config.board_spec.main_memory.channels
    assert "dense" in config.sparsity
    # every named config streams every dense format it supports at full port bandwidth;
    # sparse blocks are smaller but take the chains as many cycles as dense ones
    for fmt in config.weight_formats:
        assert config.keeps_up(fmt, "dense"), (name, fmt)
        for s in config.sparsity:
            assert config.chain_blocks_per_cycle(fmt, s) == config.chain_blocks_per_cycle(fmt), (name, fmt, s)
    json.dumps(config.derived())  # plain data


def test_list_configs():
    assert [c.name for c in list_configs()] == ALL_CONFIGS


def test_board_is_named_and_loaded():
    c = load_config("u280")
    assert c.board == "u280"
    assert c.board_spec == load_board("u280")
    assert c.to_dict()["board"] == "u280"


def test_named_boards():
    assert {c.name: c.board for c in list_configs()} == {
        "ci": "sim-small", "ci-chains": "sim-small", "tiny": "sim-tiny", "u250": "u250", "u280": "u280", "u280-slice": "u280",
        "u55c": "u55c", "v80": "v80", "vhk158": "vhk158"}


# ---- block sizes ----------------------------------------------------------------

@pytest.mark.parametrize("fmt, sparsity, expected", [
    ("q4_0", "dense", 18), ("q4_1", "dense", 20), ("q8_0", "dense", 34),
    # header + kept * bits / 8 + kept * log2(M) / 8
    ("q4_0", "2:4", 2 + 8 + 4), ("q4_0", "8:16", 2 + 8 + 8), ("q4_0", "4:16", 2 + 4 + 4),
    ("q4_0", "2:16", 2 + 2 + 2), ("q4_1", "2:4", 4 + 8 + 4), ("q8_0", "2:4", 2 + 16 + 4),
    ("q8_0", "2:16", 2 + 4 + 2),
])
def test_block_bytes(fmt, sparsity, expected):
    assert block_bytes(fmt, sparsity) == expected


def test_kept_weights():
    assert [kept_weights(s) for s in ["dense", "2:4", "8:16", "4:16", "2:16"]] == [32, 16, 16, 8, 4]


def test_block_bytes_unknown():
    with pytest.raises(ConfigError, match=r"^unknown weight format 'q5_0' \(choose from q4_0, q4_1, q8_0\)$"):
        block_bytes("q5_0")
    with pytest.raises(ConfigError, match=r"^unknown sparsity pattern '3:4'"):
        block_bytes("q4_0", "3:4")


# ---- derived sizes, by hand -------------------------------------------------------

def test_ci_derived_by_hand():
    c = load_config("ci")
    assert (c.chain.length, c.chain.count, c.clock_mhz) == (32, 4, 200)
    assert c.macs_per_cycle == 32 * 4
    assert c.peak_gmacs == pytest.approx(128 * 200 / 1000)
    # DSPs: 16 packed MAC DSPs + 1 block lane x 3 binary32 multiplies x 2 DSP48E2 per chain,
    # SFU 4 lanes x 4 multiplies x 2
    assert c.mac_dsp_per_chain == 16
    assert c.scale_dsp_per_chain == 1 * 3 * 2
    assert c.dsp_per_chain == 22
    assert c.sfu_dsp == 32
    assert c.dsp_total == 4 * 22 + 32 == 120
    # memory: 2 ports x 256 bit
    assert c.hbm_bytes_per_cycle == 64
    assert c.peak_hbm_gbps == pytest.approx(12.8)
    assert c.memory_gbps == pytest.approx(2 * 6.4)
    assert c.effective_hbm_gbps == pytest.approx(12.8)
    assert c.hbm_blocks_per_cycle("q4_1") == pytest.approx(64 / 20)
    assert c.hbm_blocks_per_cycle("q4_0") == pytest.approx(64 / 18)
    assert c.chain_blocks_per_cycle("q4_1") == 4
    assert c.chain_blocks_per_cycle("q8_0") == 2          # packed DSPs do one int8 product
    assert c.hbm_blocks_per_cycle("q8_0") == pytest.approx(64 / 34)
    assert c.chain_blocks_per_cycle("q4_0", "2:4") == 4      # sparsity saves bytes, not cycles
    assert c.keeps_up("q4_1") and c.keeps_up("q4_0") and c.keeps_up("q8_0")
    # buffers: (bytes, width, depth, primitive, count, address bits)
    layout = {n: (b.bytes, b.width_bits, b.depth, b.primitive, b.count, b.addr_bits)
              for n, b in c.buffer_layout.items()}
    assert layout == {
        "activation": (64 * 1024, 32 * 8, 2048, "uram", 4 * 1, 11),       # ceil(256/72)=4
        "weight": (256 * 1024, 2 * 256, 4096, "uram", 8 * 1, 12),       # ceil(512/72)=8
        "kv": (256 * 1024, 64, 32768, "uram", 1 * 8, 15),
        "global": (64 * 1024, 64, 8192, "uram", 1 * 2, 13),
        "instruction": (16 * 1024, 64, 2048, "bram36", 1 * 4, 11),      # < 64 KiB: BRAM
    }
    assert c.bram36_total == 4
    assert c.uram_total == 22
    assert c.hbm_addr_bits == 28          # 256 MiB per channel
    assert c.memory_addr_bits == 30       # 1 GiB
    assert c.position_bits == 9           # context 512


def test_u280_derived_by_hand():
    c = load_config("u280")
    assert c.macs_per_cycle == 128 * 32 == 4096
    assert c.hbm_bytes_per_cycle == 32 * 512 // 8 == 2048
    assert c.peak_hbm_gbps == pytest.approx(2048 * 225 / 1000)        # 460.8
    assert c.effective_hbm_gbps == pytest.approx(460.0)                # 32 x 14.375
    assert c.hbm_blocks_per_cycle("q4_1") == pytest.approx(102.4)
    assert c.hbm_blocks_per_cycle("q4_0") == pytest.approx(2048 / 18)  # 113.8
    assert c.chain_blocks_per_cycle("q4_0") == 128
    assert c.chain_blocks_per_cycle("q8_0") == 64 >= 2048 / 34
    # 64 MAC DSPs + 4 lanes x 3 x 2 = 88 per chain; SFU 32 x 4 x 2 = 256
    assert c.dsp_per_chain == 88
    assert c.dsp_total == 32 * 88 + 256 == 3072
    layout = c.buffer_layout
    assert (layout["weight"].width_bits, layout["weight"].depth, layout["weight"].primitive,
            layout["weight"].count) == (16384, 512, "bram36", 228)     # ceil(16384/72)=228, 512 deep
    assert (layout["activation"].count, layout["kv"].count, layout["global"].count,
            layout["instruction"].count) == (15 * 4, 128, 32, 8)
    assert c.bram36_total == 228
    assert c.uram_total == 228
    assert c.hbm_addr_bits == 28 and c.memory_addr_bits == 33 and c.position_bits == 12


def test_versal_scale_multiply_uses_one_dsp58():
    c = load_config("v80")
    assert c.board_spec.dsp_type == "DSP58"
    assert c.scale_dsp_per_chain == (256 // 32) * 3 * 1
    assert c.sfu_dsp == 32 * 4 * 1


def test_format_without_q4_1_needs_two_multiplies(tmp_path):
    c = load_config(variant(tmp_path, weight_formats=["q4_0", "q8_0"]))
    assert c.scale_fmuls == 2
    assert c.scale_dsp_per_chain == 1 * 2 * 2


def test_unpacked_chain(tmp_path):
    c = load_config(variant(tmp_path, chain__pack_int4=False))
    assert c.mac_dsp_per_chain == 32
    assert c.format_macs_per_cycle("q8_0") == c.macs_per_cycle == 128


def test_derived_dict_matches_properties():
    c = load_config("ci")
    d = c.derived()
    for key in ("macs_per_cycle", "dsp_total", "hbm_bytes_per_cycle", "peak_hbm_gbps",
                "bram36_total", "uram_total", "position_bits"):
        assert d[key] == getattr(c, key)
    assert d["formats"]["q4_1"]["dense"] == {
        "block_bytes": 20, "hbm_blocks_per_cycle": 3.2, "chain_blocks_per_cycle": 4.0,
        "keeps_up": True}
    assert d["config_hash"] == c.config_hash()


# ---- configuration hash ----------------------------------------------------------------

def test_config_hash_is_stable():
    # Recorded by compiled programs: changing these literals invalidates every bundle.
    assert load_config("ci").config_hash() == "4d61f8e9a26a7937"
    assert load_config("u280").config_hash() == "f4a9ec33f3a6a23b"   # weight 1024, global 1024 KiB
    assert load_config("ci").config_hash() == load_config("ci").config_hash()


def test_config_hash_ignores_name_order_and_source(tmp_path):
    data = packaged("ci")
    data["name"] = "renamed"
    data["description"] = "another text"
    data["weight_formats"] = list(reversed(data["weight_formats"]))
    data["clock_mhz"] = 200.0
    assert load_config(write(tmp_path, data)).config_hash() == load_config("ci").config_hash()


@pytest.mark.parametrize("change", [
    {"clock_mhz": 150}, {"chain__count": 2}, {"chain__pack_int4": False},
    {"weight_formats": ["q4_0"]}, {"sparsity": ["dense"]}, {"buffers__kv_kib": 128},
    {"hbm__ports": 1}, {"context": 256}, {"max_prefill": 64},
])
def test_config_hash_changes_with_fields(tmp_path, change):
    path = variant(tmp_path, **change)
    assert load_config(path).config_hash() != load_config("ci").config_hash()


def test_config_hash_changes_with_board(tmp_path):
    path = variant(tmp_path, "tiny", board="sim-small")
    assert load_config(path).config_hash() != load_config("tiny").config_hash()


# ---- error messages ----------------------------------------------------------------

def test_unknown_config_name():
    assert error_of("big") == ("unknown config 'big'; known configs: "
                               "ci, ci-chains, tiny, u250, u280, u280-slice, u55c, v80, vhk158")


def test_missing_field(tmp_path):
    data = packaged("ci")
    del data["chain"]["count"]
    path = write(tmp_path, data)
    assert error_of(path) == f"{path}: field 'chain.count' is missing"


def test_chain_count_a_multiple_of_ports(tmp_path):
    """One slice per memory port, each with chain.count / hbm.ports chains (docs/isa.md, "Slices")."""
    path = variant(tmp_path, chain__count=3)
    assert error_of(path) == (f"{path}: field 'chain.count' must be a multiple of hbm.ports (2): each "
                              "memory port's slice gets chain.count / hbm.ports chains, not 3")
    path = variant(tmp_path, "tiny", hbm__ports=2, chain__count=1)
    assert error_of(path) == (f"{path}: field 'chain.count' must be a multiple of hbm.ports (2): each "
                              "memory port's slice gets chain.count / hbm.ports chains, not 1")
    c = load_config(variant(tmp_path, chain__count=6))
    assert (c.slices, c.stripe_bytes, c.chain.count // c.slices) == (2, 32, 3)
    for name in config_names():
        c = load_config(name)
        assert c.chain.count % c.slices == 0 and c.slices == c.hbm.ports


def test_wrong_type(tmp_path):
    path = variant(tmp_path, hbm__ports="two")
    assert error_of(path) == f"{path}: field 'hbm.ports' must be a positive integer, not 'two'"


def test_wrong_bool(tmp_path):
    path = variant(tmp_path, chain__pack_int4="yes please")
    assert error_of(path) == f"{path}: field 'chain.pack_int4' must be true or false, not 'yes please'"


def test_unknown_field(tmp_path):
    data = packaged("ci")
    data["buffers"]["kv_kb"] = data["buffers"].pop("kv_kib")
    path = write(tmp_path, data)
    assert error_of(path) == f"{path}: field 'buffers.kv_kb' is unknown (did you mean 'buffers.kv_kib'?)"


def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "name: ci\nchain: {length: 32\n")
    message = error_of(path)
    assert message.startswith(f"{path}: not valid YAML at line 3, column 1: ")


@pytest.mark.parametrize("length, message", [
    (48, "must be a power of two, not 48"),
    (16, "must be between 32 and 256 (one to eight 32-weight blocks), not 16"),
    (512, "must be between 32 and 256 (one to eight 32-weight blocks), not 512"),
    ("long", "must be a positive integer, not 'long'"),
])
def test_bad_chain_length(tmp_path, length, message):
    path = variant(tmp_path, chain__length=length)
    assert error_of(path) == f"{path}: field 'chain.length' {message}"


@pytest.mark.parametrize("tokens, message", [
    (3, "must be a power of two, not 3"),
    (16, "must be between 1 and 8 (token lanes per row pipeline), not 16"),
    (0, "must be a positive integer, not 0"),
])
def test_bad_chain_tokens(tmp_path, tokens, message):
    path = variant(tmp_path, chain__tokens=tokens)
    assert error_of(path) == f"{path}: field 'chain.tokens' {message}"


def test_chain_tokens(tmp_path):
    """Token lanes replicate the chains and scalers (DSPs), double the MM MACs per cycle, and
    appear in the hash only when they are not 1 (so ci's hash did not move)."""
    ci = load_config("ci")
    two = load_config(str(variant(tmp_path, chain__tokens=2)))
    assert (ci.chain.tokens, two.chain.tokens) == (1, 2)
    assert "tokens" not in ci.to_dict()["chain"] and two.to_dict()["chain"]["tokens"] == 2
    assert two.config_hash() != ci.config_hash()
    assert two.dsp_total - two.sfu_dsp == 2 * (ci.dsp_total - ci.sfu_dsp)
    assert (two.macs_per_cycle, two.prefill_macs_per_cycle) == (ci.macs_per_cycle, 2 * ci.macs_per_cycle)
    explicit = load_config(str(variant(tmp_path, chain__tokens=1)))
    assert explicit.config_hash() == ci.config_hash()


@pytest.mark.parametrize("lookahead, message", [
    (2, "must be 0 or 1 (beats the row pipelines' decoders hold ahead), not 2"),
    (-1, "must be a non-negative integer, not -1"),
    ("yes", "must be a non-negative integer, not 'yes'"),
])
def test_bad_decoder_lookahead(tmp_path, lookahead, message):
    path = variant(tmp_path, chain__decoder_lookahead=lookahead)
    assert error_of(path) == f"{path}: field 'chain.decoder_lookahead' {message}"


def test_decoder_lookahead(tmp_path):
    """The decoders' lookahead beat: in the hash only when set (0, the default, leaves it
    alone); ci-chains sets it, the card configurations do not (their LUT budget)."""
    ci = load_config("ci")
    one = load_config(str(variant(tmp_path, chain__decoder_lookahead=1)))
    assert (ci.chain.decoder_lookahead, one.chain.decoder_lookahead) == (0, 1)
    assert "decoder_lookahead" not in ci.to_dict()["chain"]
    assert one.to_dict()["chain"]["decoder_lookahead"] == 1 and one.config_hash() != ci.config_hash()
    zero = load_config(str(variant(tmp_path, chain__decoder_lookahead=0)))
    assert zero.config_hash() == ci.config_hash()
    assert load_config("ci-chains").chain.decoder_lookahead == 1
    assert load_config("u280").chain.decoder_lookahead == 0


@pytest.mark.parametrize("slots, message", [
    (1, "must be an integer >= 2, not 1"),
    ("six", "must be an integer >= 2, not 'six'"),
])
def test_bad_weight_slots(tmp_path, slots, message):
    path = variant(tmp_path, buffers__weight_slots=slots)
    assert error_of(path) == f"{path}: field 'buffers.weight_slots' {message}"


def test_weight_slots(tmp_path):
    """buffers.weight_slots cuts the weight buffer into that many tile slots (the compiler's
    choice without it: four on ci), and appears in the hash only when it is set."""
    from llmfab.compiler.compile import _weight_slots
    ci = load_config("ci")
    six = load_config(str(variant(tmp_path, buffers__weight_slots=6)))
    assert ci.buffers.weight_slots == 0 and "weight_slots" not in ci.to_dict()["buffers"]
    assert six.to_dict()["buffers"]["weight_slots"] == 6 and six.config_hash() != ci.config_hash()
    wb = ci.buffer_bytes["weight"]
    assert _weight_slots(wb, ci) == (4, wb // 4)
    assert _weight_slots(wb, six) == (6, wb // 6 // 64 * 64)
    cc = load_config("ci-chains")
    assert _weight_slots(cc.buffer_bytes["weight"], cc) == (6, 64 * 1024)


def test_break_points_required_above_32(tmp_path):
    path = variant(tmp_path, chain__length=64, chain__break_points=False)
    assert error_of(path) == (f"{path}: field 'chain.break_points' must be true when chain.length "
                              f"is above 32 (every 32-weight block has its own scale), not false")


def test_unknown_weight_format(tmp_path):
    path = variant(tmp_path, weight_formats=["q4_0", "q5_0"])
    assert error_of(path) == (f"{path}: field 'weight_formats' entries must be one of "
                              f"q4_0, q4_1, q8_0, not 'q5_0'")


def test_duplicate_weight_format(tmp_path):
    path = variant(tmp_path, weight_formats=["q4_0", "q4_0"])
    assert error_of(path) == f"{path}: field 'weight_formats' lists 'q4_0' twice"


def test_unknown_sparsity(tmp_path):
    path = variant(tmp_path, sparsity=["dense", "3:4"])
    assert error_of(path) == (f"{path}: field 'sparsity' entries must be one of "
                              f"dense, 2:4, 8:16, 4:16, 2:16, not '3:4'")


def test_unquoted_sparsity_pattern(tmp_path):
    data = packaged("ci")
    text = yaml.safe_dump(data, sort_keys=False)
    path = write(tmp_path, text.replace("sparsity:\n- dense\n- '2:4'", "sparsity:\n- dense\n- 2:4"))
    assert error_of(path) == (f"{path}: field 'sparsity' has 124, which is how YAML reads "
                              f"an unquoted 2:4; write \"2:4\"")


def test_sparsity_needs_dense(tmp_path):
    path = variant(tmp_path, sparsity=["2:4"])
    assert error_of(path) == (f"{path}: field 'sparsity' must include dense "
                              f"(every model has dense tensors)")


def test_bad_data_width(tmp_path):
    path = variant(tmp_path, hbm__data_width=2048)
    assert error_of(path) == f"{path}: field 'hbm.data_width' must be between 64 and 1024, not 2048"


def test_bad_activation_bits(tmp_path):
    path = variant(tmp_path, activation_bits=16)
    assert error_of(path) == f"{path}: field 'activation_bits' must be 8 (int8 activations), not 16"


def test_bad_context_and_prefill(tmp_path):
    path = variant(tmp_path, context=500)
    assert error_of(path) == f"{path}: field 'context' must be a power of two of at least 64, not 500"
    path = variant(tmp_path, max_prefill=100)
    assert error_of(path) == f"{path}: field 'max_prefill' must be a multiple of 16, not 100"
    path = variant(tmp_path, max_prefill=1024)
    assert error_of(path) == f"{path}: field 'max_prefill' must not exceed context (512), not 1024"


def test_unknown_board(tmp_path):
    path = variant(tmp_path, board="u290")
    assert error_of(path) == (f"{path}: field 'board' must name a known board (sim-small, "
                              f"sim-tiny, u250, u280, u55c, v80, vhk158), not 'u290'")


def test_packaged_name_must_match_file(tmp_path):
    from llmfab.boards.config import config_from_dict
    data = packaged("ci")
    data["name"] = "cx"
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "boards/configs/ci.yaml", expected_name="ci")
    assert str(info.value) == ("boards/configs/ci.yaml: field 'name' is 'cx' but the file is "
                               "named ci.yaml; make them equal")


# ---- fit to the board --------------------------------------------------------------

def test_does_not_fit_dsp(tmp_path):
    path = variant(tmp_path, chain__count=64)
    # 64 chains x 22 + SFU 64 x 4 x 2
    assert error_of(path, FitError) == (
        f"{path}: config 'ci' needs 1920 DSP48E2 but board 'sim-small' has 256; "
        "use fewer or shorter chains (chain.count, chain.length)")


def test_does_not_fit_memory_channels(tmp_path):
    path = variant(tmp_path, hbm__ports=8, chain__count=8)
    assert error_of(path, FitError) == (
        f"{path}: config 'ci' uses 8 memory ports but board 'sim-small' has 4 HBM channels; lower hbm.ports")


def test_clock_too_high(tmp_path):
    path = variant(tmp_path, clock_mhz=250)
    assert error_of(path, FitError) == (
        f"{path}: config 'ci' runs at 250 MHz but board 'sim-small' allows at most 200 MHz; lower clock_mhz")


def test_does_not_fit_bram36(tmp_path):
    # tiny: activation 8 + weight 2 + kv 16 (63 KiB, 64 bit x 8064) + global 16 + instruction 1
    path = variant(tmp_path, "tiny", buffers__kv_kib=63, buffers__global_kib=63)
    assert error_of(path, FitError) == (
        f"{path}: config 'tiny' needs 43 BRAM36 but board 'sim-tiny' has 32; "
        "shrink the buffers (buffers.*_kib)")


def test_does_not_fit_uram(tmp_path):
    # 64 KiB and 8192 deep: goes to URAM (2 of them), and sim-tiny has none
    path = variant(tmp_path, "tiny", buffers__kv_kib=64)
    assert error_of(path, FitError) == (
        f"{path}: config 'tiny' needs 2 URAM but board 'sim-tiny' has 0; shrink the buffers (buffers.*_kib)")


def test_fit_counts_the_shell_reservation(tmp_path):
    data = yaml.safe_load((CONFIGS_DIR.parent / "u280.yaml").read_text())
    data["shell_reserved"]["dsp"] = 8000
    board = load_board(write(tmp_path, data, "u280-shell.yaml"))
    with pytest.raises(FitError) as info:
        check_fits(load_config("u280"), board)
    assert str(info.value) == (
        "config 'u280' needs 3072 DSP48E2 but board 'u280' has 1024 after the shell's 8000; "
        "use fewer or shorter chains (chain.count, chain.length)")


def test_wide_shallow_weight_buffer_stays_in_bram(tmp_path):
    # 32 x 1024 bit = 4096 B per entry: 2 MiB is 512 deep (BRAM36), 4 MiB is 1024 deep (URAM)
    c = load_config(variant(tmp_path, "u280", hbm__data_width=1024, buffers__weight_kib=2048))
    w = c.buffer_layout["weight"]
    assert (w.width_bits, w.depth, w.primitive, w.count) == (32768, 512, "bram36", 456)
    c = load_config(variant(tmp_path, "u280", hbm__data_width=1024, buffers__weight_kib=4096))
    w = c.buffer_layout["weight"]
    assert (w.depth, w.primitive, w.count) == (1024, "uram", 456)


def test_check_fits_against_another_board():
    with pytest.raises(FitError) as info:
        check_fits(load_config("u280"), load_board("sim-small"))
    assert str(info.value) == ("config 'u280' runs at 225 MHz but board 'sim-small' allows at "
                               "most 200 MHz; lower clock_mhz")
    check_fits(load_config("ci"), load_board("u280"))   # the small config fits a big card


def test_fit_error_is_a_config_error():
    assert issubclass(FitError, ConfigError)


# ---- docs stay true to the code ------------------------------------------------------

def test_docs_config_table_is_generated_from_code():
    text = (DOCS / "config.md").read_text()
    assert format_configs_table(list_configs()) in text, \
        "docs/config.md is stale: paste format_configs_table(list_configs())"


# ---- errors name the file (issue 9) --------------------------------------------------

def test_fit_error_names_the_file_not_only_the_name(tmp_path):
    """A configuration given by path may carry any name: its file is what to fix."""
    data = packaged("ci")
    data["name"] = "u280"          # not the packaged u280: nothing to do with it
    data["chain"]["count"] = 64
    path = write(tmp_path, data, "mine.yaml")
    assert error_of(str(path), FitError) == (
        f"{path}: config 'u280' needs 1920 DSP48E2 but board 'sim-small' has 256; "
        "use fewer or shorter chains (chain.count, chain.length)")


def test_field_errors_name_the_file(tmp_path):
    data = packaged("ci")
    data["name"] = "other"
    data["context"] = 100
    path = write(tmp_path, data, "mine.yaml")
    assert error_of(str(path)) == f"{path}: field 'context' must be a power of two of at least 64, not 100"


@pytest.mark.parametrize("target,kind", [("/dev/zero", "a character device"),
                                         ("/dev/null", "a character device")])
def test_config_that_is_a_device(target, kind):
    assert error_of(target) == f"config file '{target}' is not a regular file ({kind}); give a YAML file"


def test_config_that_is_a_fifo_or_directory(tmp_path):
    import os
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert error_of(str(fifo)) == f"config file '{fifo}' is not a regular file (a FIFO); give a YAML file"
    d = tmp_path / "dir.yaml"
    d.mkdir()
    assert error_of(str(d)) == f"config file '{d}' is a directory, not a YAML file"
    assert error_of(str(tmp_path / "none.yaml")) == f"config file '{tmp_path / 'none.yaml'}' does not exist"


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    import tinymodel
    from llmfab.host.cli import main
    model = tinymodel.write_tiny_gguf(tmp_path / "tiny.gguf")     # not the 98 MB default
    assert main(["compile", "--model", model, "--config", "/dev/zero", "--out", str(tmp_path / "b")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == ("llmfab: error: config file '/dev/zero' is not a regular file "
                                 "(a character device); give a YAML file\n")
    path = variant(tmp_path, hbm__ports=8, chain__count=8)
    assert main(["compile", "--model", model, "--config", str(path), "--out", str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err == (
        f"llmfab: error: {path}: config 'ci' uses 8 memory ports but board 'sim-small' has "
        "4 HBM channels; lower hbm.ports\n")
    assert not (tmp_path / "b").exists()


def test_config_that_is_too_large(tmp_path):
    """--config pointing at a model file (or a sparse 1 TB file) is refused from its size."""
    big = tmp_path / "model.gguf"
    with open(big, "wb") as f:
        f.truncate((1 << 20) + 1)
    assert error_of(str(big)) == (f"{big}: 1048577 bytes is too large for a YAML description "
                                  "(at most 1048576); is it the right file?")


@pytest.mark.parametrize("combines, message", [
    (3, "must be a power of two, not 3"),
    (32, "must be between 1 and 16 (MvExec's row combines: rows written a cycle), not 32"),
    (8, "must be at most the 4 output lanes of the row pipelines (chain.count x length / 32 x "
        "tokens), not 8"),
])
def test_bad_combines(tmp_path, combines, message):
    path = variant(tmp_path, chain__combines=combines)
    assert error_of(path) == f"{path}: field 'chain.combines' {message}"


def test_combines_beyond_a_line(tmp_path):
    """The combines' rows go out in one on-chip line write: one 256-bit port (32-byte lines)
    takes at most 8, whatever the lanes."""
    path = variant(tmp_path, chain__count=16, chain__combines=16, hbm={"ports": 1, "data_width": 256})
    assert error_of(path) == (f"{path}: field 'chain.combines' must be at most the 8 words of an "
                              f"on-chip line (32 bytes: the combines' rows go out in one line "
                              f"write), not 16")


def test_combines(tmp_path):
    """MvExec's row combines: in the hash only when set (1, the default, leaves it alone);
    the packaged configurations keep one (the card's LUT budget, docs/config.md)."""
    ci = load_config("ci")
    four = load_config(str(variant(tmp_path, chain__combines=4)))
    assert (ci.chain.combines, four.chain.combines) == (1, 4)
    assert "combines" not in ci.to_dict()["chain"]
    assert four.to_dict()["chain"]["combines"] == 4 and four.config_hash() != ci.config_hash()
    assert load_config(str(variant(tmp_path, chain__combines=1))).config_hash() == ci.config_hash()
    assert all(load_config(n).chain.combines == 1 for n in ("tiny", "ci", "ci-chains", "u280-slice", "u280"))
