"""File helpers shared by the jobs: content digests and atomic writes.

Every file a job writes for another job (checkpoints, shards, manifests, metrics, samples) goes through
`write_atomic`: written to a hidden temp file in the same folder, flushed to disk, then renamed over the target,
so a kill or a full disk never leaves a torn file under the real name, and the temp file is removed on failure.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

TEMP_MARK = ".tmp-"  # hidden temp files are named .<name>.tmp-<pid>


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights and shards are far larger than memory wants)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


@contextmanager
def atomic_open(path: Path | str) -> Iterator[IO[bytes]]:
    """A binary file handle whose content appears at `path` only when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if disk_full(err):
            raise no_space_left(path, what_survived(path)) from None
        raise


def disk_full(err: BaseException) -> bool:
    """Whether `err` is, or was raised while handling, a full disk: torch.save's zip writer turns a failed write
    after the first into RuntimeError("... unexpected pos N vs M"), keeping the OSError only as its context."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def what_survived(path: Path) -> str:
    """What an atomic write that failed left at `path`: the file that was there (never touched), or nothing."""
    if path.exists():
        return f"the previous {path.name} is intact"
    return f"no {path.name} was written, and none existed before"


def no_space_left(path: Path | str, kept: str):
    """The one-line error of a full disk; `kept` says what is still intact."""
    from .errors import PixelgenError

    return PixelgenError(f"no space left on device writing {path}; free space and rerun ({kept})")


def check_writable_folder(folder: Path | str, flag: str) -> None:
    """Refuse, in one line before any work, a folder (named by `flag`) that a job cannot create or write in: one
    that is a file, lies under a file, or whose nearest existing folder denies writing."""
    problem = _folder_problem(Path(folder))
    if problem:
        raise _unwritable(f"{flag} {folder} {problem}; choose another {flag}")


def check_writable_file(path: Path | str, flag: str) -> None:
    """The same for an output file (written atomically at the end: a temp file beside it, renamed over it): a
    folder of that name, or a folder it cannot be written in, is refused at the start."""
    path = Path(path)
    problem = "is a folder, not a file" if path.is_dir() else _folder_problem(path.parent)
    if problem:
        where = "" if path.is_dir() else f": its folder {path.parent}"
        raise _unwritable(f"{flag} {path}{where} {problem}; choose another {flag}")


def _folder_problem(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (created if missing), or None. Permissions are asked with
    os.access, which also knows read-only mounts (root, whom mode bits do not stop, passes it)."""
    folder = folder.absolute()
    existing = folder
    while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return "is a file, not a folder" if existing == folder else f"lies under {existing}, a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"is not writable: cannot write in {existing} (permission denied or a read-only file system)"
    return None


def _unwritable(message: str):
    from .errors import PixelgenError

    return PixelgenError(message)


def append_text(path: Path | str, text: str) -> None:
    """Append to a log file (metrics.jsonl); a full disk is a one-line error, not a traceback."""
    try:
        with open(path, "a") as log:
            log.write(text)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise no_space_left(path, "the lines before are intact") from None
        raise


def write_atomic(path: Path | str, content: bytes | str | Callable[[IO[bytes]], Any]) -> Path:
    """Write bytes, text, or whatever `content(file)` writes (e.g. `lambda f: torch.save(obj, f)`), atomically."""
    with atomic_open(path) as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)
    return Path(path)


def write_json_atomic(path: Path | str, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def remove_stale_temps(folder: Path | str) -> list[Path]:
    """Delete temp files that killed processes left in `folder` (those whose pid no longer runs)."""
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_MARK}*"):
        pid = tmp.name.rsplit(TEMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
