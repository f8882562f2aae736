"""The one exception hierarchy of llmfab.

Every error a user can cause (a bad file, an unsupported type, a model too
large for the board, a configuration that cannot be built, a corrupt program)
is raised as a subclass of :class:`LlmfabError` with a one-line message that
names the thing and, where there is one, the fix. The CLI prints the message
without a traceback and exits non-zero.
"""


class LlmfabError(Exception):
    """Base class of every user-facing llmfab error (one-line message)."""

    def __init__(self, message: str):
        message = " ".join(str(message).split("\n"))
        super().__init__(message)


class BoardError(LlmfabError):
    """A board description is malformed or missing."""


class ConfigError(LlmfabError):
    """An accelerator configuration is malformed or cannot be built."""


class FitError(ConfigError):
    """A configuration or a model does not fit the board."""


class ModelError(LlmfabError):
    """A model file is malformed, truncated or unsupported."""


class TokenizerError(LlmfabError):
    """The tokenizer cannot be built from the model's metadata."""


class CompileError(LlmfabError):
    """The compiler cannot map the model onto the configuration."""


class BundleError(LlmfabError):
    """A program bundle is malformed, corrupt or for another configuration."""


class IsaError(LlmfabError):
    """An instruction word is illegal or cannot be encoded."""


class SimError(LlmfabError):
    """A simulation failed (error status, watchdog, missing tool)."""


class BackendError(LlmfabError):
    """A backend cannot be opened or used."""
