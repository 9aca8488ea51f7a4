import subprocess
import sys

import pytest

from pixelgen.locks import FolderBusy, exclusive_folder


def test_a_second_holder_of_a_folder_is_refused_naming_the_first(tmp_path):
    with exclusive_folder(tmp_path, "train"):
        with pytest.raises(FolderBusy, match=r"in use by train \(pid \d+"):
            with exclusive_folder(tmp_path, "train"):
                pass
    with exclusive_folder(tmp_path, "train"):  # released when the block ends
        pass


def test_a_lock_left_by_a_killed_process_is_not_a_lock(tmp_path):
    code = ("import os, sys; from pixelgen.locks import exclusive_folder\n"
            "with exclusive_folder(sys.argv[1], 'sample'):\n    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert proc.returncode == -9 and (tmp_path / ".pixelgen.lock").read_text().startswith("sample")
    with exclusive_folder(tmp_path, "sample"):
        pass
