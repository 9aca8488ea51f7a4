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
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise no_space_left(path, f"the previous {path.name}, if any, is intact") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def no_space_left(path: Path | str, kept: str):
    """The one-line error of a full disk; `kept` says what is still intact."""
    from .errors import PixelgenError

    return PixelgenError(f"no space left on device writing {path}; free space and rerun ({kept})")


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
