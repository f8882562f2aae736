"""llmfab.boards: board facts (YAML per card) and accelerator configurations.

>>> from llmfab.boards import load_board, load_config
>>> load_board("u280").resources.dsp
9024
>>> load_config("ci").macs_per_cycle
128

See ``docs/boards.md`` and ``docs/config.md``.
"""

from .board import (Board, MemorySpec, Resources, ShellReserved, board_names,
                    format_boards_table, list_boards, load_board)
from .config import (AccelConfig, BufferConfig, BufferLayout, ChainConfig, HbmConfig, check_fits,
                     config_names, format_configs_table, list_configs, load_config)
from llmfab.core.errors import BoardError, ConfigError, FitError

__all__ = [
    "Board", "MemorySpec", "Resources", "ShellReserved",
    "load_board", "list_boards", "board_names", "format_boards_table",
    "AccelConfig", "ChainConfig", "BufferConfig", "HbmConfig", "BufferLayout",
    "load_config", "list_configs", "config_names", "check_fits", "format_configs_table",
    "BoardError", "ConfigError", "FitError",
]
