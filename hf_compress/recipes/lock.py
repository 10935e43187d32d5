"""One `hf-compress run` per output folder: an exclusive lock on ``<output_dir>/.hf-compress.lock``.

The lock is an advisory ``fcntl.flock`` on an open file, so the operating system releases it when the process ends
in any way (``kill -9`` included): a stale lock file never blocks a rerun. The file holds the pid and host of its
holder, for the message a second run gets. Only the main process of a multi-process launch takes it.

Take it at the start of a run (``hf_compress.recipes.pipeline.run_recipe``, before anything is written)::

    lock = acquire_output_lock(out, enabled=state.is_main_process)  # held until run_recipe returns

or around a block: ``with output_lock(out, enabled=...): ...``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".hf-compress.lock"


class OutputLockedError(BlockingIOError):
    """Another `hf-compress run` holds the lock of the same output folder."""


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """`output_dir` as a `Path`; a `NotADirectoryError` naming it when it is an existing file (not `[Errno 17]`)."""
    out = Path(output_dir)
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(
                f"`--output-dir` {str(out)!r} is not a folder ({str(folder)!r} is a file); pass a folder path."
            )
        if folder.exists():
            break
    return out


class OutputLock:
    """The held lock of one output folder; released by :meth:`release`, when garbage-collected, or at exit."""

    def __init__(self, path: Path | None, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.release()


def acquire_output_lock(output_dir: str | os.PathLike, enabled: bool = True) -> OutputLock:
    """Take the exclusive lock of `output_dir` (created if needed) and return it; see :func:`output_lock`.

    One line at the start of a run holds it until the returned object is released or dropped:
    ``lock = acquire_output_lock(out, enabled=state.is_main_process)``.
    """
    out = check_output_dir(output_dir)
    if not enabled:
        return OutputLock(None, None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise OutputLockedError(
            f"`output_dir` {str(out)!r} is in use by another hf-compress run ({holder}); wait for it to finish "
            "or pass another `--output-dir`."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return OutputLock(path, fd)


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[Path | None]:
    """Hold the exclusive lock of `output_dir` (created if needed) for the duration of the block.

    Args:
        output_dir (`str` or `os.PathLike`): The run's output folder.
        enabled (`bool`, *optional*, defaults to `True`): `False` on non-main processes: nothing is created or locked.

    Yields:
        The lock file path (`None` when disabled).

    Raises:
        [`OutputLockedError`]: another process holds the lock; the folder is left untouched.
        `NotADirectoryError`: `output_dir` is a file.
    """
    lock = acquire_output_lock(output_dir, enabled)
    try:
        yield lock.path
    finally:
        lock.release()
