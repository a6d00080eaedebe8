"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class EntropyLabError(Exception):
    """An error caused by the user's input; the CLI prints it as one line (exit code 2)."""


class ConfigError(EntropyLabError):
    """A malformed or invalid configuration value."""


class CheckpointError(EntropyLabError):
    """A checkpoint folder that cannot be loaded as asked."""


def release_after_oom(exc: BaseException) -> str:
    """Frees the CUDA cache after an out-of-memory error; returns the error's first line
    (≤ 100 characters) for a one-line message."""
    import torch  # here, not at the top: the CLI's usage errors come before torch loads

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return (str(exc).strip().splitlines() or [""])[0][:100]
