import errno
import os
import subprocess
import sys

import pytest

from pixelgen.errors import PixelgenError
from pixelgen.files import remove_stale_temps, write_atomic, write_json_atomic


def test_write_atomic_writes_bytes_text_and_callables(tmp_path):
    write_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_atomic(tmp_path / "sub/b.txt", "hello")
    write_atomic(tmp_path / "c.bin", lambda f: f.write(b"xyz"))
    write_json_atomic(tmp_path / "d.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" and (tmp_path / "sub/b.txt").read_text() == "hello"
    assert (tmp_path / "c.bin").read_bytes() == b"xyz" and '"a"' in (tmp_path / "d.json").read_text()
    assert not [p for p in tmp_path.rglob(".*")]  # no temp file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")

    def full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(PixelgenError, match=r"^no space left on device writing .*last\.pt"):
        write_atomic(target, full_disk)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["last.pt"]
    with pytest.raises(ZeroDivisionError):
        write_atomic(target, lambda f: 1 / 0)
    assert os.listdir(tmp_path) == ["last.pt"]


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.pt.tmp-{dead.stdout.strip()}"
    live = tmp_path / f".last.pt.tmp-{os.getpid()}"
    stale.write_bytes(b"x")
    live.write_bytes(b"y")
    assert remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists()
