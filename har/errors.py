"""The package's errors, at the ground: every module that raises one imports it from here.

Each is an error the command line reports in one line, without a traceback (`har.cli`, the pipeline's jobs).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range."""


class DataError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file and the fix."""


class RunError(RuntimeError):
    """A run folder cannot be used as asked (another config, incomplete training, unreadable checkpoint)."""


class FolderBusy(RunError):
    """Another process holds the folder's lock: stop at once (exit status `EXIT_LOCKED` of `har.run.lock`)."""


class ResultError(ValueError):
    """A run's results are missing, unreadable, incomplete or belong to another config."""


class PackError(ValueError):
    """Members that cannot be computed as one K-wide network (different structure, an unsupported layer)."""
