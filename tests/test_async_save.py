"""Checkpoints written in the background (async_save) and written once at the end (final.pt a hard link)."""

import errno
import os
import threading
import time
from collections import OrderedDict

import pytest
import torch

from jobs_helpers import fast_config, make_shards
from pixelgen import checkpoint, train
from pixelgen.async_save import AsyncWriter, snapshot
from pixelgen.config import load_config
from pixelgen.errors import PixelgenError
from pixelgen.files import no_space_left


def test_a_snapshot_keeps_the_state_of_its_step_whatever_the_loop_does_next(tmp_path):
    model = torch.nn.Linear(3, 2)
    live = {"model": model.state_dict(), "step": 4, "rng": [{"torch": torch.get_rng_state()}], "cfg": {"a": [1]}}
    frozen = {k: v for k, v in snapshot(live).items()}
    expected = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # the next optimizer step, in place, while the write would still run
    live["cfg"]["a"].append(2)
    assert torch.equal(frozen["model"]["weight"], expected) and frozen["cfg"] == {"a": [1]}
    assert type(frozen["model"]) is OrderedDict and frozen["model"]["weight"].device.type == "cpu"
    assert frozen["model"]._metadata == live["model"]._metadata  # module versions, for load_state_dict
    assert frozen["model"]["weight"].untyped_storage().data_ptr() != model.weight.untyped_storage().data_ptr()
    checkpoint.save_atomic(frozen, tmp_path / "c.pt")
    assert torch.equal(checkpoint.load(tmp_path / "c.pt")["model"]["weight"], expected)


def test_submit_returns_while_the_write_runs_and_the_next_one_waits_for_it():
    writer, release, b_ran, log = AsyncWriter(), threading.Event(), threading.Event(), []

    def slow_a():
        release.wait()
        log.append("a done")

    def b():
        log.append("b saw " + ("a done" if "a done" in log else "a running"))
        b_ran.set()

    writer.submit(slow_a)  # returns although the write cannot finish before `release`
    assert writer.busy
    second = threading.Thread(target=writer.submit, args=(b,))
    second.start()
    b_ran.wait(timeout=0.5)  # a writer that did not wait would run b now, while a is still blocked
    release.set()
    second.join()
    writer.wait()
    assert log == ["a done", "b saw a done"] and not writer.busy


def test_a_failed_write_is_raised_once_by_the_next_wait_as_one_line():
    writer = AsyncWriter()

    def full_disk():
        raise no_space_left("ckpt/last.pt", "the previous last.pt, if any, is intact")

    writer.submit(full_disk)
    with pytest.raises(PixelgenError, match="no space left on device writing ckpt/last.pt"):
        writer.wait()
    writer.wait()  # reported once
    writer.submit(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(PixelgenError) as err:
        writer.submit(lambda: None)  # the next save raises the previous write's error
    assert "\n" not in str(err.value) and "OSError" in str(err.value) and "I/O error" in str(err.value)


def test_final_pt_is_a_hard_link_or_a_copy_and_replaces_an_older_one(tmp_path, monkeypatch):
    last, final = tmp_path / "last.pt", tmp_path / "final.pt"
    checkpoint.save_atomic({"step": 1}, last)
    final.write_bytes(b"an older final.pt")
    checkpoint.link_or_copy(last, final)
    assert os.path.samefile(last, final) and checkpoint.load(final) == {"step": 1}
    checkpoint.save_atomic({"step": 2}, last)  # a later save renames over last.pt: final.pt keeps its content
    assert checkpoint.load(final) == {"step": 1}

    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    checkpoint.link_or_copy(last, final)
    assert not os.path.samefile(last, final) and checkpoint.load(final) == {"step": 2}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# --- in a training job ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("async"))


@pytest.fixture()
def config(tmp_path, shards):
    return load_config(fast_config(tmp_path / "config.yaml", shards, f"sqlite:///{tmp_path / 'mlflow.db'}"),
                       ["train.steps=2"])


def count_full_writes(monkeypatch) -> list:
    """torch.save calls of a full training state (one with the optimizer), as they reach the disk."""
    writes, real_save = [], torch.save

    def counting_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:
            writes.append(obj["step"])
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", counting_save)
    return writes


@pytest.mark.parametrize("ckpt_every", [100, 2])  # the end's own save; a periodic save at the last step
def test_the_end_of_a_run_writes_the_full_state_once_and_all_three_files_load(tmp_path, config, monkeypatch,
                                                                               ckpt_every):
    writes = count_full_writes(monkeypatch)
    config["train"]["ckpt_every"] = ckpt_every
    train.train(config, tmp_path / "r", progress=False)
    checkpoints = tmp_path / "r/checkpoints"
    assert writes == [2]  # not once per name (last, final), nor again after a save at the same step
    assert os.path.samefile(checkpoints / "last.pt", checkpoints / "final.pt")
    last, final = checkpoint.load(checkpoints / "last.pt"), checkpoint.load(checkpoints / "final.pt")
    assert last["step"] == final["step"] == checkpoint.load(checkpoints / "final_ema.pt")["step"] == 2
    assert torch.equal(last["model"]["net.final.linear.weight"], final["model"]["net.final.linear.weight"])


def test_a_stopped_job_returns_only_after_its_slow_background_write_is_complete(tmp_path, config, monkeypatch):
    real_save_atomic = checkpoint.save_atomic

    def slow_save_atomic(obj, path):
        time.sleep(1.0)  # a large checkpoint on a slow disk: the loop has long moved on
        real_save_atomic(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", slow_save_atomic)
    with pytest.raises(train.Preempted, match="stopped at step 1"):
        train.train(config, tmp_path / "r", stop_at_step=1, progress=False)
    assert checkpoint.load(tmp_path / "r/checkpoints/last.pt")["step"] == 1
