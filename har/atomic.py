"""Atomic file writes, so that a killed job never leaves a half-written result behind."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from har.errors import RunError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _open_temp(path: Path) -> tuple[BinaryIO, Path]:
    """A new temporary file beside `path` (a name `prepare_run_dir` and `har evaluate` remove if left behind)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be as readable as any other file
    return os.fdopen(fd, "wb"), Path(tmp)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`, if any (torch's writers raise their own errors from the file's)."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen


def write_failure(path: Path, exc: OSError, doing: str = "write") -> RunError:
    """A one-line RunError for a failed write: the path, the cause and what to do."""
    code = errno.errorcode.get(exc.errno or 0, "?")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free space on that file system (or raise the quota), then run the same command again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "the folder is read-only for this user: make it writable, or choose another folder"
    else:
        advice = "check that file system, then run the same command again"
    return RunError(f"cannot {doing} {path}: {exc.strerror or exc} ({code}); {advice} (a training run resumes "
                    f"from its last checkpoint)")


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write through `write(file)` to a temporary file in the same folder, fsync, then rename over `path`.

    A failing file system (disk full, read-only folder) raises a one-line RunError naming `path` and the cause.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = _open_temp(path)
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        cause = _os_error(exc) if isinstance(exc, Exception) else None
        if cause is None:
            raise
        raise write_failure(path, cause) from exc


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, value: Any) -> None:
    """Replace `path` with `value` as indented JSON in one step."""
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")
