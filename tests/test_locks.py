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


def test_a_forked_child_does_not_keep_the_lock_after_the_job_releases_it(tmp_path):
    import os
    import signal
    import time

    with exclusive_folder(tmp_path, "train"):
        child = os.fork()
        if child == 0:  # a DataLoader/pool worker that outlives the block a little
            time.sleep(30)
            os._exit(0)
    try:
        with exclusive_folder(tmp_path, "train"):  # the job ended: the folder is free although the child lives
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_refused_second_holder_in_the_same_process_does_not_release_the_first(tmp_path):
    code = ("import sys; from pixelgen.locks import exclusive_folder\n"
            "with exclusive_folder(sys.argv[1], 'probe'):\n    pass\n")
    with exclusive_folder(tmp_path, "train"):
        with pytest.raises(FolderBusy):
            with exclusive_folder(tmp_path, "train"):
                pass
        probe = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert probe.returncode != 0 and "in use by train" in probe.stderr
