"""One job per output folder: an exclusive lock that a second job is refused by, and that no dead job can hold.

The lock is `fcntl.flock` on `<folder>/.pixelgen.lock`. The kernel drops a flock when its process exits, however
it exits (SIGKILL, OOM, node reboot of a local disk), so a lock file left by a dead job is not a lock: the next
job takes it. The pid and host written into the file only serve the refusal message.

flock works on local disks and on NFSv4/Lustre/GPFS with their default mount options; on a file system where
flock is a no-op the lock protects nothing, which is why the message names the file (a user can check it).
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


class FolderBusy(PixelgenError):
    """Another live process holds the folder's lock."""


@contextmanager
def exclusive_folder(folder: Path | str, job: str) -> Iterator[Path]:
    """Hold `folder`'s lock for the block; refuse at once (no waiting) when another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise FolderBusy(f"{folder} is in use by {holder}; wait for that job to end or use another "
                             f"folder (lock file {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{job} (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock
