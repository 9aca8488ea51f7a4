"""One job per output folder: an exclusive lock that a second job is refused by, and that no dead job can hold.

The lock is a POSIX record lock (`fcntl.lockf`) on `<folder>/.pixelgen.lock`. The kernel drops it when its
process exits, however it exits (SIGKILL, OOM), so a lock file left by a dead job is not a lock: the next job
takes it. A POSIX lock, unlike `flock`, belongs to the process and is not inherited by forked children, so a
DataLoader or pool worker that outlives its job by a moment does not keep the folder "in use". POSIX locks also
work on NFS (through its lock manager), Lustre and GPFS. Within one process they do not exclude each other, so
the folders this process holds are also kept in a set. The pid and host written into the file only serve the
refusal message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import PixelgenError

LOCK_NAME = ".pixelgen.lock"
_held_here: dict[Path, str] = {}  # lock files this process holds -> what the refusal message says


class FolderBusy(PixelgenError):
    """Another live process (or this one) holds the folder's lock."""


@contextmanager
def exclusive_folder(folder: Path | str, job: str) -> Iterator[Path]:
    """Hold `folder`'s lock for the block; refuse at once (no waiting) when another holder has it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_NAME).resolve()
    if path in _held_here:  # checked before opening: closing a second descriptor would drop this process's lock
        raise _busy(folder, path, _held_here[path])
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, by platform
            raise _busy(folder, path, os.pread(fd, 200, 0).decode(errors="replace").strip()) from None
        holder = f"{job} (pid {os.getpid()} on {socket.gethostname()})"
        _held_here[path] = holder
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{holder}\n".encode(), 0)
            yield path
        finally:
            del _held_here[path]
    finally:
        os.close(fd)  # closing the file releases the lock (closing any descriptor of it would: we open it once)


def _busy(folder: Path, path: Path, holder: str) -> FolderBusy:
    return FolderBusy(f"{folder} is in use by {holder or 'another process'}; wait for that job to end or use "
                      f"another folder (lock file {path})")
