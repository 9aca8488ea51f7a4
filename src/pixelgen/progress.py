"""Progress of a long job: a tqdm bar on a terminal, timestamped lines anywhere else.

Under Slurm or Snakemake stderr is a log file, where tqdm's carriage-return redraws pile up into one unreadable
line. There a job prints a plain line now and then instead, which `tail -f` and `grep` can read:

    2026-11-27 00:15:02 sample shard 3/50 done, 3000/50000 images, 41.2 img/s, eta 0:19:10
    2026-11-27 00:16:40 score 10000/50000 images (20%), 812.3 img/s, eta 0:00:49

Use:

    with progress(total, "score", every=None) as bar:   # every: a line per `every` items (None: each 10%)
        for batch in batches:
            ...
            bar.update(len(batch))
        bar.log("shard 3/50 done")                      # a line now (lines mode only; the bar shows it anyway)
"""

from __future__ import annotations

import math
import sys
import time
from datetime import datetime, timedelta
from typing import TextIO


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts items towards `total`; shows a tqdm bar (terminal), timestamped lines (otherwise) or nothing."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "img", noun: str = "images",
                 enabled: bool = True, every: int | None = None, initial: int = 0, stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.noun = total, desc, unit, noun
        self.done = self.initial = initial
        self.stream = sys.stderr if stream is None else stream
        self.mode = "off" if not enabled else "bar" if is_terminal(self.stream) else "lines"
        # lines mode: a line each time `done` passes a multiple of `every`; 0 means only on log()
        self.every = every if every is not None else (math.ceil(total / 10) if total else 1000)
        self.start = time.monotonic()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines" and self.every and self.done // self.every > before // self.every:
            self._line(self._counts(percent=True))

    def log(self, event: str) -> None:
        """A line for a milestone (a finished shard), with the counts, rate and eta; nothing on a tqdm bar."""
        if self.mode == "lines":
            self._line(f"{event}, {self._counts(percent=False)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _counts(self, percent: bool) -> str:
        text = f"{self.done}/{self.total} {self.noun}" if self.total else f"{self.done} {self.noun}"
        if percent and self.total:
            text += f" ({100 * self.done // self.total}%)"
        rate = (self.done - self.initial) / max(time.monotonic() - self.start, 1e-9)
        text += f", {rate:.1f} {self.unit}/s"
        if self.total and rate > 0:
            text += f", eta {timedelta(seconds=round((self.total - self.done) / rate))}"
        return text

    def _line(self, text: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} {self.desc} {text}", file=self.stream, flush=True)


def progress(total: int | None, desc: str, **kwargs) -> Progress:
    """See `Progress`: keyword arguments unit, noun, enabled, every, initial, stream."""
    return Progress(total, desc, **kwargs)
