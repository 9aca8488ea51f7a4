import subprocess

import pytest
from forked_cli import run_pixelgen

SUBCOMMANDS = ["demo-data", "shard", "ref-stats", "train", "sample", "score", "report", "weights"]


def run_cli(*args, env=None):
    import os

    return run_pixelgen(*args, env=dict(os.environ, **(env or {})))


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name):
    result = run_cli(name, "--help")
    assert result.returncode == 0 and "usage: pixelgen " + name in result.stdout


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("pixelgen")
    assert exe, "pip install should put a `pixelgen` console script on PATH"
    assert subprocess.run([exe, "--help"], capture_output=True).returncode == 0


@pytest.mark.parametrize("args", [["--eval-run", "heun_nfe9"], ["--parent-run-id-file", "p.parent"]])
def test_score_eval_run_without_its_parent_file_or_name_is_refused_in_one_line(tmp_path, args):
    result = run_cli("score", str(tmp_path / "samples"), "--ref", "r.npz", "--out", str(tmp_path / "m.json"), *args)
    assert result.returncode == 2 and "--eval-run and --parent-run-id-file go together" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.json").exists()
