"""One `hf-compress run` per output folder: an exclusive lock on ``<output_dir>/.hf-compress.lock``.

The lock is an advisory ``fcntl.flock`` on an open file, so the operating system releases it when the process ends
in any way (``kill -9`` included): a stale lock file never blocks a rerun. The file holds the pid and host of its
holder, for the message a second run gets. Only the main process of a multi-process launch takes it.

Call it around the stages of a run (``hf_compress.recipes.pipeline.run_recipe``)::

    with output_lock(out, enabled=state.is_main_process):
        ...
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
    out = check_output_dir(output_dir)
    if not enabled:
        yield None
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            raise OutputLockedError(
                f"`output_dir` {str(out)!r} is in use by another hf-compress run ({holder}); wait for it to finish "
                "or pass another `--output-dir`."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
