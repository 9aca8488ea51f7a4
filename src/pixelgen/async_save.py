"""Checkpoints written in the background: the training loop waits for a copy of the state, not for the disk.

`snapshot(state)` copies every tensor of a checkpoint to CPU memory at the step (the saved state is exactly the
state at that step, whatever the loop does next); `AsyncWriter.submit` then writes it in a background thread
(checkpoint.save_atomic: temp file, fsync, rename). At most one write is in flight: the next submit waits for
the previous one first, so host memory holds at most one snapshot. A failed write (a full disk) is raised as its
one-line PixelgenError by the next `submit` or by `wait`, which the job calls before it ends, so a preempted job
leaves a complete last.pt or says that it could not.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import PixelgenError
from .files import what_survived


def snapshot(obj: Any) -> Any:
    """A private copy of a checkpoint's state: tensors cloned to CPU, containers rebuilt, the rest deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if type(obj) in (dict, OrderedDict):  # state_dicts are OrderedDicts
        copied = type(obj)((k, snapshot(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's versions, which load_state_dict reads
            copied._metadata = copy.deepcopy(obj._metadata)
        return copied
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class AsyncWriter:
    """One background writer thread at a time; its error is kept and raised in the training thread."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._targets: tuple[Path, ...] = ()

    def submit(self, write: Callable[[], None], targets: Iterable[Path] = ()) -> None:
        """Wait for the previous write (raising its error), then run `write()` in the background; `targets`, the
        files it writes, let a failure say what is left of them."""
        self.wait()
        self._targets = tuple(Path(t) for t in targets)
        # not a daemon: should the job end without wait() (a bug), the interpreter still finishes the write
        self._thread = threading.Thread(target=self._run, args=(write,), name="pixelgen-checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as err:  # raised again in the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until no write is in flight; raise the error of the last write, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if isinstance(error, PixelgenError):  # a full disk: one line naming the file, from files.atomic_open
            raise error
        if error is not None:  # the targets were written atomically: each is its old self or absent
            kept = "; ".join(what_survived(t) for t in self._targets) or "no earlier file was changed"
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            raise PixelgenError(f"writing a checkpoint failed in the background ({type(error).__name__}: "
                                f"{reason}); {kept}") from error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
