"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class EntropyLabError(Exception):
    """An error caused by the user's input; the CLI prints it as one line (exit code 2)."""


class ConfigError(EntropyLabError):
    """A malformed or invalid configuration value."""


class CheckpointError(EntropyLabError):
    """A checkpoint folder that cannot be loaded as asked."""
