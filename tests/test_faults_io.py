"""Promises of the jobs around files and signals (issue 20, rows 5, 9, 10, 11, 15): a finished run is never
relabelled by a lower train.steps; a SIGTERM whose grace ends inside a data read says so in one readable line;
an output path that cannot be written is refused at the start of train, sample, score and ref-stats, before any
work; a full disk says "no space left" and only true things about what survived, with no noise after it; a
refused sample run writes nothing into its folder."""

import builtins
import errno
import gc
import os
import shutil
import signal
import sys
import time

import numpy as np
import pytest
import torch

from jobs_helpers import fast_config, make_shards
from pixelgen import checkpoint, files, score as score_module, train
from pixelgen.async_save import AsyncWriter
from pixelgen.cli import main
from pixelgen.config import load_config
from pixelgen.errors import PixelgenError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run (tracking off: nothing here is about MLflow) and its shards."""
    root = tmp_path_factory.mktemp("faults-io")
    shards = make_shards(root)
    config_path = fast_config(root / "config.yaml", shards, f"sqlite:///{root / 'mlflow.db'}",
                              train={"steps": 2}, tracking={"enabled": False})
    train.train(load_config(config_path), root / "run", progress=False)
    return {"root": root, "shards": shards, "config": config_path, "run": root / "run",
            "ckpt": root / "run/checkpoints/final_ema.pt"}


def copy_run(trained, tmp_path):
    return shutil.copytree(trained["run"], tmp_path / "run")


def one_line_refusal(capsys, argv) -> str:
    """Run the CLI in-process; it must exit non-zero with one line on stderr and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- row 5: a finished run rerun with fewer train.steps (the 4 -> 2; here 2 -> 1) ---------------------------

def test_a_finished_run_rerun_with_fewer_steps_is_refused_naming_both_counts(trained):
    run = trained["run"]
    before = checkpoint.load(run / "checkpoints/final.pt")
    config_before = (run / "config.yaml").read_text()
    with pytest.raises(PixelgenError) as refusal:
        train.train(load_config(trained["config"], ["train.steps=1"]), run, progress=False)
    message = str(refusal.value)
    assert "finished at step 2 (train.steps=2)" in message and "train.steps=1" in message and "done" not in message
    after = checkpoint.load(run / "checkpoints/final.pt")
    assert after["step"] == 2 and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert (run / "config.yaml").read_text() == config_before


def test_an_unfinished_run_whose_last_pt_is_past_the_new_steps_is_refused(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    for name in ("final.pt", "final_ema.pt"):  # last.pt (step 2) left: as a run stopped at step 2
        (run / "checkpoints" / name).unlink()
    with pytest.raises(PixelgenError, match=r"holds step 2 in .*last\.pt .*train\.steps=1"):
        train.train(load_config(trained["config"], ["train.steps=1"]), run, progress=False)
    assert not (run / "checkpoints/final.pt").exists()


def test_a_finished_run_is_extended_by_more_steps(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    final = train.train(load_config(trained["config"], ["train.steps=3"]), run, progress=False)
    assert checkpoint.load(final)["step"] == 3


# --- row 9: the SIGTERM grace period ending inside a data read --------------------------------------------------

def test_a_grace_period_ending_inside_a_data_read_is_one_readable_line(trained, monkeypatch):
    from webdataset import cache

    from pixelgen.data import StreamLoader
    from pixelgen.train import Preempted, SigtermFlag

    class HungRead:  # a shard on a network file system that stopped answering
        def __init__(self, f):
            self.f = f

        def read(self, *args):
            time.sleep(30)

        def __getattr__(self, name):
            return getattr(self.f, name)

    # webdataset opens local shards with the builtin open in its cache module
    monkeypatch.setattr(cache, "open", lambda path, mode="r": HungRead(builtins.open(path, mode)), raising=False)
    loader = StreamLoader(trained["shards"], 8, num_workers=0, seed=0, shuffle_buffer=10, verify=False)
    start = time.monotonic()
    with pytest.raises(Preempted) as stopped:
        with SigtermFlag(grace_s=0.2):
            os.kill(os.getpid(), signal.SIGTERM)
            next(iter(loader))
    assert time.monotonic() - start < 10
    message = str(stopped.value)
    assert message.startswith("SIGTERM: no step boundary within 0.2 s") and message.endswith("last.pt"), message
    assert "HungRead" not in message and "\n" not in message


# --- row 10: output paths that cannot be written, refused before any work ---------------------------------------

@pytest.fixture()
def a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker


@pytest.fixture()
def no_inception(monkeypatch):
    """Any Inception work fails the test: the refusal must come before it."""
    def forbidden(*args, **kwargs):
        raise AssertionError("Inception was built before the output path was checked")

    monkeypatch.setattr(score_module, "build_inception", forbidden)


def test_train_with_a_run_dir_under_a_file_is_one_line_before_any_work(trained, a_file, capsys):
    line = one_line_refusal(capsys, ["train", "--config", str(trained["config"]), "--run-dir", str(a_file / "run"),
                                     "--quiet"])
    assert str(a_file) in line and "not a folder" in line and "--run-dir" in line


def test_sample_into_a_path_under_a_file_is_one_line_before_any_work(trained, a_file, capsys):
    line = one_line_refusal(capsys, ["sample", "--ckpt", str(trained["ckpt"]), "--num", "4", "--out",
                                     str(a_file / "samples"), "--steps", "2", "--quiet", "--device", "cpu"])
    assert str(a_file) in line and "--out" in line


def test_sample_into_a_path_that_is_a_file_is_one_line(trained, a_file, capsys):
    line = one_line_refusal(capsys, ["sample", "--ckpt", str(trained["ckpt"]), "--num", "4", "--out", str(a_file),
                                     "--steps", "2", "--quiet", "--device", "cpu", "--reset"])
    assert str(a_file) in line and "not a folder" in line


def test_ref_stats_to_an_unwritable_path_is_one_line_before_any_inception_work(trained, a_file, capsys,
                                                                              no_inception):
    line = one_line_refusal(capsys, ["ref-stats", str(trained["shards"]), "--out", str(a_file / "ref.npz"),
                                     "--allow-random-weights", "--quiet"])
    assert str(a_file) in line and "--out" in line


def fake_reference(path):
    """A ref-stats file that passes every check before the Inception work (32x32, 8 images)."""
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32), features=np.zeros((8, 2048), np.float32),
             num=8, weights_real=False, image_size=32)
    return path


@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_score_to_an_unwritable_out_is_one_line_before_any_metric(trained, a_file, tmp_path, capsys, no_inception,
                                                                  where):
    samples = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(trained["ckpt"]), "--num", "4", "--out", str(samples), "--steps", "2",
                 "--quiet", "--device", "cpu"]) == 0
    out = a_file / "metrics.json" if where == "under a file" else tmp_path
    line = one_line_refusal(capsys, ["score", str(samples), "--ref", str(fake_reference(tmp_path / "ref.npz")),
                                     "--out", str(out), "--allow-random-weights", "--quiet", "--device", "cpu"])
    assert str(a_file if where == "under a file" else out) in line and "--out" in line


def test_a_run_dir_without_write_permission_is_refused_naming_it(trained, tmp_path, monkeypatch):
    """Tests run as root, which chmod does not stop: the permission check (os.access) is made to say no."""
    locked = tmp_path / "read-only"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.fspath(path) == str(locked)
                        else real_access(path, mode, **kw))
    with pytest.raises(PixelgenError, match=f"cannot write in {locked}"):
        train.train(load_config(trained["config"]), locked / "run", progress=False)
    assert list(locked.iterdir()) == []


# --- row 11: a full disk -----------------------------------------------------------------------------------------

def disk_full_after(monkeypatch, name: str, writes_allowed: int) -> None:
    """Files written through pixelgen.files whose name contains `name` take `writes_allowed` writes, then fail
    as on a full disk (after the first one, torch.save's zip writer turns the error into "unexpected pos")."""
    real_open = builtins.open

    class FillsUp:
        def __init__(self, f):
            self.f, self.left = f, writes_allowed

        def write(self, data):
            if self.left == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= 1
            return self.f.write(data)

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FillsUp(f) if name in str(path) and "w" in mode else f

    monkeypatch.setattr(files, "open", fake_open, raising=False)  # shadows the builtin in pixelgen.files only


def background_save(state, path):
    writer = AsyncWriter()
    writer.submit(lambda: checkpoint.save_atomic(state, path))  # as Trainer.save does
    writer.wait()


def test_a_full_disk_during_the_first_background_checkpoint_says_so_and_claims_no_previous_file(tmp_path,
                                                                                              monkeypatch):
    path = tmp_path / "checkpoints/last.pt"
    disk_full_after(monkeypatch, "last.pt", writes_allowed=1)
    with pytest.raises(PixelgenError) as failure:
        background_save({"w": torch.zeros(10_000)}, path)
    message = str(failure.value)
    assert f"no space left on device writing {path}" in message and "\n" not in message
    assert "unexpected pos" not in message and "intact" not in message and "no last.pt" in message
    assert not path.exists() and not list(path.parent.iterdir())  # no temp file either


def test_a_full_disk_during_a_later_background_checkpoint_keeps_the_previous_one_and_says_so(tmp_path,
                                                                                           monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 2}, path)
    disk_full_after(monkeypatch, "last.pt", writes_allowed=1)
    with pytest.raises(PixelgenError, match=f"no space left on device writing {path}.*previous last.pt is intact"):
        background_save({"step": 4, "w": torch.zeros(10_000)}, path)
    assert checkpoint.load(path) == {"step": 2}


def test_a_full_disk_while_sampling_is_one_line_and_no_noise_after_it(trained, tmp_path, monkeypatch):
    from pixelgen.sample_job import run_sampling

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    disk_full_after(monkeypatch, "samples-000000.tar", writes_allowed=1)
    out = tmp_path / "samples"
    try:  # 16 noisy 32x32 PNGs: more than the tar stream's 10 KB buffer, so the disk fills inside a shard
        run_sampling(trained["ckpt"], 16, out, steps=2, batch_size=16, device="cpu", progress=False)
        message = "no error"
    except PixelgenError as failure:
        message = str(failure)  # the exception (and its frames) dropped after the block
    gc.collect()  # a half-written tar stream left to the collector would write into the closed file now
    assert f"no space left on device writing {out / 'samples-000000.tar'}" in message
    assert unraisable == [], [str(u.exc_value) for u in unraisable]
    assert not (out / "samples-000000.tar").exists()


# --- row 15: a refused sample run writes nothing -----------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_sample_run_refused_for_cuda_noise_on_cpu_writes_nothing_and_the_corrected_run_works(trained, tmp_path):
    from pixelgen.sample_job import run_sampling

    out = tmp_path / "samples"
    with pytest.raises(PixelgenError, match="noise_device is cuda"):
        run_sampling(trained["ckpt"], 4, out, steps=2, batch_size=4, device="cpu", progress=False,
                     overrides=("sampling.noise_device=cuda",))
    assert not out.exists()
    manifest = run_sampling(trained["ckpt"], 4, out, steps=2, batch_size=4, device="cpu", progress=False)
    assert manifest["num"] == 4 and manifest["noise_device"] == "cpu"
