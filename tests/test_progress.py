import io
import re

from pixelgen.progress import is_terminal, progress

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_lines_every_tenth_when_not_a_terminal():
    stream = io.StringIO()
    with progress(100, "score", stream=stream) as bar:
        for _ in range(25):
            bar.update(4)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10  # 10%, 20%, ... 100%; batches of 4 cross a multiple of 10 once each
    assert re.fullmatch(rf"{STAMP} score 12/100 images \(12%\), [\d.]+ img/s, eta \d+:\d\d:\d\d", lines[0])
    assert lines[-1].split(" ", 2)[2].startswith("score 100/100 images (100%)")


def test_log_lines_carry_the_counts_and_resume_offset():
    stream = io.StringIO()
    with progress(50, "sample", every=0, initial=20, stream=stream) as bar:
        bar.update(10)  # every=0: no automatic lines
        bar.log("shard 3/5 done")
    (line,) = stream.getvalue().splitlines()
    assert re.fullmatch(rf"{STAMP} sample shard 3/5 done, 30/50 images, [\d.]+ img/s, eta \d+:\d\d:\d\d", line)


def test_unknown_total_prints_every_1000_without_eta():
    stream = io.StringIO()
    with progress(None, "score", stream=stream) as bar:
        for _ in range(5):
            bar.update(500)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "2000 images, " in lines[1] and "eta" not in lines[1]


def test_terminal_gets_a_tqdm_bar_and_disabled_prints_nothing():
    terminal = Terminal()
    assert is_terminal(terminal) and not is_terminal(io.StringIO())
    with progress(10, "score", stream=terminal) as bar:
        bar.update(10)
        bar.log("ignored on a bar")
    assert bar.mode == "bar" and "10/10" in terminal.getvalue() and "ignored" not in terminal.getvalue()
    quiet = io.StringIO()
    with progress(10, "score", enabled=False, stream=quiet) as bar:
        bar.update(10)
        bar.log("nothing")
    assert quiet.getvalue() == ""
