"""What a command owns on disk while it runs: the lock on each output it writes, and what to undo if it fails.

    lock_output(out)          # an exclusive flock on `.NAME.lock` beside `out`, held until the command ends
    if try_lock(out): ...     # the same lock, or False when another live process holds it (never raises)
    on_failure(undo)          # `undo()` runs if the command fails with an error (not when it is killed)

`cliutil.execute` runs the undo list on an error and releases every lock when the command ends. This
module imports nothing of s2d but `errors`, so that `artifacts`, `trainer` and `cliutil` can all use it
without importing each other.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import UsageError

_locks: dict[str, tuple[int, Path]] = {}
_on_failure: list[Callable[[], None]] = []


def _acquire(out: Path) -> str | None:
    """Take the lock of `out`; None once held, else the pid (text) of the live process holding it."""
    key = os.path.realpath(out)   # one lock per directory, however it is spelled (a symlink, `..`)
    if key in _locks:
        return None
    lock = Path(key).parent / f".{Path(key).name}.lock"
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            why = e.strerror
            if isinstance(e, (FileExistsError, NotADirectoryError)):
                why = f"{next(p for p in lock.parents if p.exists())} is not a directory"
            raise UsageError(f"{out}: cannot write there ({why})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise UsageError(f"{out}: cannot lock {lock} ({e.strerror})") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            return holder
        try:                      # the holder before us may have unlinked the file we opened: retry
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _locks[key] = (fd, lock)
    return None


def lock_output(out: Path) -> None:
    """One command at a time writes `out`: an exclusive flock on `.NAME.lock` beside it, held until the
    command ends (`release_locks`, or the process's exit). A second command on the same `--out` (a
    doubled Make target, a rerun while the first still loads its model) stops at once with a clear line,
    instead of taking over, deleting or interleaving the first one's staging and checkpoints."""
    holder = _acquire(out)
    if holder is not None:
        raise UsageError(f"{out}: another s2d command (pid {holder}) is writing it now; wait for it to "
                         "finish or choose another --out")


def try_lock(out: Path) -> bool:
    """`lock_output` for chores that may be skipped (tidying leftovers beside a finished output): False
    when another process holds the lock or the place cannot be written (a read-only finished output)."""
    try:
        return _acquire(out) is None
    except UsageError:
        return False


def unlock(out: Path) -> None:
    """Drop the lock of one output before the command ends (a finished output, tidied: nothing to write)."""
    held = _locks.pop(os.path.realpath(out), None)
    if held is not None:
        fd, lock = held
        try:
            lock.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def release_locks() -> None:
    """Drop the output locks this process holds (unlink first, so that no lock file is left behind)."""
    while _locks:
        _, (fd, lock) = _locks.popitem()
        try:
            lock.unlink(missing_ok=True)
        except OSError:           # a directory that became read-only: the file stays, unlocked, and the
            pass                  # command's own outcome stands (this runs in `execute`'s finally)
        finally:
            os.close(fd)


def on_failure(undo: Callable[[], None]) -> None:
    """Run `undo` if the current command fails (not when it is interrupted): e.g. remove a run directory
    this command made before anything in it was worth keeping, so that bad input leaves no partial output."""
    _on_failure.append(undo)


def forget_failure_undos() -> None:
    """A new command starts with nothing to undo."""
    _on_failure.clear()


def undo_failed() -> None:
    """Run the undo list of a failed command, newest first."""
    while _on_failure:
        try:
            _on_failure.pop()()
        except Exception:  # pragma: no cover - cleaning up must not hide the real error
            pass


def replace_dir(src: Path, dst: Path) -> None:
    """Atomically put directory `src` at `dst` (an old `dst` is moved aside first, then removed)."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
