"""One writer per run folder: `har train` holds its run folder's lock, `har evaluate` the run's `eval/` lock.

Two trainers on one folder (the cluster case: Snakemake is killed, its job trains on, the user runs
`snakemake --unlock` and starts the workflow again) would overwrite each other's checkpoints. The lock is a file,
`LOCK`, created with O_CREAT | O_EXCL (atomic on local disks and on NFS v3+, Lustre and GPFS) and holding
its holder's host, pid, boot id, command and start time as JSON, so that a refused process can say who holds
it. The holder also takes a POSIX record lock (`fcntl.lockf`) on it where the file system supports them: the
kernel (or the NFS / Lustre / GPFS lock manager) drops that lock when its process dies, which tells a stale
lock from a live one without trusting pids. A lock of a dead process on this host is taken over with a
warning; a lock of another host is never taken over (its process may be alive behind a network partition):
the message says how to remove it by hand.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from har.errors import FolderBusy, RunError
from har.run.folder import LOCK

log = logging.getLogger(__name__)

EXIT_LOCKED = 73  # sysexits.h EX_CANTCREAT: distinct from errors (2), crashes (1) and "retry" (75)
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
_NO_RECORD_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # e.g. NFS without lockd

_held: dict[Path, int] = {}  # lock file -> descriptor, for the locks this process holds



@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file says."""

    host: str
    pid: int
    started: str
    command: str
    boot_id: str | None = None

    def __str__(self) -> str:
        return f"har {self.command} on host {self.host}, pid {self.pid}, started {self.started}"


def _boot_id() -> str | None:
    """This boot's id (Linux): a lock written before a reboot is stale whatever its pid is now."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _this_process(command: str) -> Holder:
    return Holder(socket.gethostname(), os.getpid(), datetime.now().astimezone().isoformat(timespec="seconds"),
                  command, _boot_id())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _record_lock(fd: int, exclusive: bool, wait: bool = False) -> bool | None:
    """Take a POSIX record lock on the whole file (without waiting unless `wait`): True taken, False held by
    another process, None where the file system has no record locks."""
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if exc.errno in _NO_RECORD_LOCKS:
            return None
        raise
    return True


def _read_holder(fd: int) -> Holder | None:
    """The holder a lock file names (None: empty, cut short or not ours)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return Holder(**json.loads(os.read(fd, 1 << 16)))
    except (ValueError, TypeError):
        return None


def _write_holder(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(asdict(holder)) + "\n").encode())
    os.fsync(fd)


def _create_exclusive(path: Path) -> int:
    """A new lock file, or FileExistsError (the one step that makes the lock exclusive)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


def _is_stale(holder: Holder | None, record_lock: bool | None) -> bool:
    """Whether a lock whose record lock was free (True) or cannot be known (None) belongs to a dead process.

    Only locks of this host are judged: on this host a free record lock means its process is gone (a live
    pid is then a reused one); without record locks, the pid (and the boot id) decide.
    """
    if holder is None or holder.host != socket.gethostname():
        return False
    if record_lock:
        return True
    return (holder.boot_id is not None and holder.boot_id != _boot_id()) or not _pid_alive(holder.pid)


def _busy(lock: Path, holder: Holder | None, what: str) -> FolderBusy:
    if holder is None:
        return FolderBusy(f"{lock.parent} is locked ({lock} exists but names no holder: it is being written, or "
                          f"a process died while writing it); if no har process uses the folder, delete {lock}")
    advice = (f"wait for it to end or stop it (kill {holder.pid})" if holder.host == socket.gethostname() else
              f"if that process is gone (check on {holder.host}), delete {lock} by hand; a lock of another host "
              f"is never taken over automatically")
    return FolderBusy(f"{lock.parent} is {what} by {holder}; {advice}")


@dataclass(frozen=True)
class FolderLock:
    """A held lock (`held` True), or the reason a read-only folder is used without one."""

    folder: Path
    held: bool
    read_only: str = ""  # the error that refused the lock file


def make_folder(folder: Path, what: str) -> None:
    """Create `folder` (and its parents), with a clear error when it is a file or lies below one."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise RunError(f"{what} {folder} is a file, not a folder; choose another path") from exc
    except NotADirectoryError as exc:
        parent = next((p for p in folder.parents if p.is_file()), folder.parent)
        raise RunError(f"{what} {folder} lies below {parent}, which is a file; choose another path") from exc
    except OSError as exc:
        raise RunError(f"cannot create {what} {folder}: {exc.strerror}; choose another path or fix its "
                       f"permissions") from exc


def acquire(folder: Path, command: str, what: str, read_only_ok: bool = False) -> FolderLock:
    """Create `folder` (`what` names it in errors) and lock it for this process, or raise :class:`FolderBusy`
    naming the holder.

    With `read_only_ok`, a folder in which the lock file cannot be created for lack of permission (a read-only
    folder or file system) is returned unlocked (`held` False): the caller must then only read it.
    """
    folder = Path(folder)
    make_folder(folder, what)
    lock = folder / LOCK
    if lock in _held:
        raise FolderBusy(f"{folder} is already locked by this process (pid {os.getpid()})")
    for _ in range(10):  # a holder may end (or a stale lock be taken over) between the steps below
        try:
            fd = _create_exclusive(lock)
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno in READ_ONLY and read_only_ok and folder.is_dir():
                return FolderLock(folder, held=False, read_only=f"{exc.strerror}: {lock}")
            raise RunError(f"cannot create the lock file {lock}: {exc.strerror}; the folder must be writable "
                           f"(fix its permissions or choose another folder)") from exc
        else:
            _record_lock(fd, exclusive=True, wait=True)  # a new file: others only probe it for an instant
            _write_holder(fd, _this_process(command))
            _held[lock] = fd
            return FolderLock(folder, held=True)
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue  # released meanwhile
        except OSError as exc:
            if exc.errno in READ_ONLY and read_only_ok:
                return FolderLock(folder, held=False, read_only=f"{exc.strerror}: {lock}")
            raise
        try:
            record = _record_lock(fd, exclusive=True)
            holder = _read_holder(fd)
            if record is False or not _is_stale(holder, record):
                raise _busy(lock, holder, "locked")
            if os.fstat(fd).st_ino != _inode(lock):
                continue  # released (and perhaps taken) between open and lock: try again
            _write_holder(fd, _this_process(command))
        except BaseException:
            os.close(fd)
            raise
        log.warning("taking over %s, left by %s, which is no longer running", lock, holder)
        _held[lock] = fd
        return FolderLock(folder, held=True)
    raise FolderBusy(f"{lock} kept changing while this process tried to take it; another process is "
                     f"starting in {folder}")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def release(lock: FolderLock) -> None:
    """Remove the lock file, then drop the record lock (in this order, so that nobody locks a removed file)."""
    path = lock.folder / LOCK
    fd = _held.pop(path, None) if lock.held else None
    if fd is None:
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # the folder turned read-only: the dead pid marks the lock stale for the next run
        log.warning("could not remove %s (%s)", path, exc.strerror)
    finally:
        os.close(fd)


def refuse_if_held(folder: Path, doing: str) -> None:
    """Raise :class:`FolderBusy` when a live process holds `folder`'s lock (a stale lock is left alone).

    Probing never writes, so it also works in a read-only folder.
    """
    lock = Path(folder) / LOCK
    if lock in _held:
        raise FolderBusy(f"{folder} is locked by this process (pid {os.getpid()}); {doing} after it is released")
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        record = _record_lock(fd, exclusive=False)  # a shared lock conflicts only with a holder's
        holder = _read_holder(fd)
    finally:
        os.close(fd)
    if record is False or not _is_stale(holder, record):
        raise _busy(lock, holder, f"being written (so {doing} must wait)")


@contextmanager
def folder_lock(folder: Path, command: str, what: str, read_only_ok: bool = False) -> Iterator[FolderLock]:
    """Hold `folder`'s lock for the `with` block (see :func:`acquire`)."""
    lock = acquire(folder, command, what, read_only_ok)
    try:
        yield lock
    finally:
        release(lock)
