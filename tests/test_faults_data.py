"""The data side of "nothing silently wrong" (issue 12): the list of promises `pixelgen shard` and the training
stream keep when the data is empty, too small, corrupt, oddly encoded or moved, or when a job is killed."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from forked_cli import run_pixelgen
from PIL import Image

from pixelgen.data import StreamLoader
from pixelgen.demo_data import write_demo_dataset
from pixelgen.errors import PixelgenError
from pixelgen.locks import FolderBusy, exclusive_folder
from pixelgen.shards import ShardSettings, build_shards, load_rgb


def pixelgen(*args, **kwargs):
    return run_pixelgen(*args, timeout=120, **kwargs)


def one_line_error(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    write_demo_dataset(src, resolution=32, per_class=12, num_classes=5, progress=False)
    return src


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, demo_src):
    out = tmp_path_factory.mktemp("shards") / "shards"
    build_shards(demo_src, out, ShardSettings(32, shard_size=8), progress=False)  # 60 images, 8 shards
    return out


@pytest.fixture()
def copy_of_shards(tmp_path, shard_dir):
    out = tmp_path / "copy"
    shutil.copytree(shard_dir, out)
    return out


def broken_src(root: Path, files: int = 3) -> Path:
    """An ImageFolder whose every file is unreadable."""
    src = root / "broken"
    (src / "cats").mkdir(parents=True)
    for i in range(files):
        (src / "cats" / f"{i}.JPEG").write_text("not an image\n")
    return src


# --- case 1: empty and too-small sets, killed jobs --------------------------------------------------------------

def test_a_set_with_no_usable_images_fails_at_shard_time(tmp_path):
    src = broken_src(tmp_path)
    result = pixelgen("shard", str(src), str(tmp_path / "out"), "--resolution", "16", "--quiet")
    line = one_line_error(result)
    assert "0 usable images" in line and "--min-images 0" in line and "0.JPEG" in line
    assert json.loads((tmp_path / "out/manifest.json").read_text())["rejected"]  # the rejects stay readable
    kept = pixelgen("shard", str(src), str(tmp_path / "out"), "--resolution", "16", "--quiet", "--min-images", "0")
    assert kept.returncode == 0, kept.stderr


def _run_stream_script(code: str, timeout: float):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_training_on_a_set_with_no_images_fails_at_start_instead_of_spinning(tmp_path):
    out = tmp_path / "empty"
    build_shards(broken_src(tmp_path), out, ShardSettings(16), progress=False, min_images=0)
    try:
        result = _run_stream_script(f"""
            from pixelgen.data import StreamLoader
            from pixelgen.errors import PixelgenError
            try:
                next(iter(StreamLoader({str(out)!r}, 4, num_workers=0)))
            except PixelgenError as err:
                print("ERROR", err)
            """, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the stream spins on an empty set")
    assert "ERROR" in result.stdout and "no images" in result.stdout


def test_a_set_smaller_than_one_batch_fails_at_train_start(shard_dir):
    with pytest.raises(PixelgenError, match="fewer than one global batch"):
        StreamLoader(shard_dir, 64, num_workers=0)


def test_a_stream_that_yields_nothing_is_an_error_not_a_busy_loop(tmp_path):
    # 1 image over 2 ranks: rank 1's stream has no sample in any epoch
    src = tmp_path / "one"
    (src / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(src / "a" / "x.png")
    out = tmp_path / "shards"
    build_shards(src, out, ShardSettings(16), progress=False)
    try:
        result = _run_stream_script(f"""
            from pixelgen.data import ShardStream
            from pixelgen.errors import PixelgenError
            try:
                next(iter(ShardStream({str(out)!r}, 1, rank=1, world_size=2)))
            except PixelgenError as err:
                print("ERROR", err)
            """, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the stream spins when it gets no samples")
    assert "ERROR" in result.stdout and "no samples" in result.stdout


SLOW_LOADER = """
    import os, sys, time, itertools
    from pixelgen import data
    original = data.ShardStream._collate
    def slow(self, batch):  # a worker busy with a batch when its parent dies
        with open(sys.argv[1] + f"/worker-{os.getpid()}", "w"):
            pass
        time.sleep(120)
        return original(self, batch)
    data.ShardStream._collate = slow
    loader = data.StreamLoader(sys.argv[2], 4, num_workers=2)
    print("started", flush=True)
    for batch in loader:
        pass
    """


def _worker_pids_once_busy(proc, folder: Path) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = [int(p.name.split("-")[1]) for p in folder.glob("worker-*")]
        if len(pids) == 2:
            return pids
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    pytest.fail("the workers never started")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_worker_outlives_a_killed_or_terminated_training_process(tmp_path, shard_dir, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_LOADER), str(tmp_path), str(shard_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        workers = _worker_pids_once_busy(proc, tmp_path)
        proc.send_signal(sig)
        proc.wait(timeout=30)  # SIGTERM during data loading ends the process
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in workers if _alive(p)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)  # this test's own orphans
        assert not survivors, f"workers {survivors} outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()


# --- case 5: classes ---------------------------------------------------------------------------------------------

def test_num_classes_not_matching_the_shards_is_refused_naming_the_value_to_set(shard_dir):
    loader = StreamLoader(shard_dir, 8, num_workers=0)
    loader.check_num_classes(5)  # the shards' count: fine
    for wrong in (4, 6, 1000):
        with pytest.raises(PixelgenError, match="set model.num_classes=5"):
            loader.check_num_classes(wrong)


def test_train_with_the_wrong_num_classes_stops_at_start_with_one_line(tmp_path, shard_dir):
    from jobs_helpers import fast_config

    config = fast_config(tmp_path / "c.yaml", shard_dir, f"sqlite:///{tmp_path / 'm.db'}",
                         model={"num_classes": 4})
    result = pixelgen("train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--quiet")
    assert "model.num_classes=5" in one_line_error(result)


def test_hidden_folders_are_not_classes(tmp_path, demo_src):
    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    for hidden in ("__MACOSX", ".ipynb_checkpoints"):
        (src / hidden).mkdir()
        Image.new("RGB", (16, 16)).save(src / hidden / "x.png")
    first = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))[0]
    (first / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (16, 16)).save(first / ".ipynb_checkpoints" / "y.png")
    manifest = build_shards(src, tmp_path / "out", ShardSettings(16), progress=False)
    assert len(manifest["classes"]) == 5 and "__MACOSX" not in manifest["classes"]
    assert manifest["num_samples"] == 60


def test_an_empty_class_folder_is_warned_about_in_the_manifest_and_on_the_terminal(tmp_path, demo_src):
    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    (src / "zz_empty").mkdir()
    result = pixelgen("shard", str(src), str(tmp_path / "out"), "--resolution", "16", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "zz_empty" in result.stderr
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert any("zz_empty" in w for w in manifest["warnings"])


# --- case 6: corrupt shards ---------------------------------------------------------------------------------------

def _rewrite_tar(path: Path, change) -> None:
    """Rewrite a shard with `change(name, data) -> data` applied to every member (same member layout)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            import io

            data = change(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def _flip_one_label(path: Path) -> None:
    done = []

    def change(name, data):
        if name.endswith(".cls") and not done:
            done.append(name)
            return str((int(data) + 1) % 5).encode()
        return data
    _rewrite_tar(path, change)


def test_a_flipped_label_byte_is_caught_at_train_start_naming_the_shard(copy_of_shards):
    _flip_one_label(copy_of_shards / "shard-000003.tar")
    with pytest.raises(PixelgenError, match="shard-000003.tar is corrupt"):
        StreamLoader(copy_of_shards, 8, num_workers=0)


def test_shard_verify_names_the_corrupt_shard_and_passes_a_good_folder(copy_of_shards):
    good = pixelgen("shard", "--verify", str(copy_of_shards))
    assert good.returncode == 0, good.stderr
    _flip_one_label(copy_of_shards / "shard-000001.tar")
    assert "shard-000001.tar" in one_line_error(pixelgen("shard", "--verify", str(copy_of_shards)))


def test_ref_stats_stream_checks_digests_by_default(copy_of_shards):
    from pixelgen.data import ShardStream

    _flip_one_label(copy_of_shards / "shard-000002.tar")
    with pytest.raises(PixelgenError, match="shard-000002.tar"):
        ShardStream(copy_of_shards, 10, epochs=1, flip=False, shuffle_buffer=1)


def test_a_truncated_shard_fails_while_reading_naming_the_shard(copy_of_shards):
    # even with digests off, the stream counts every shard it reads against the manifest
    path = copy_of_shards / "shard-000004.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    cut = members[len(members) // 2].offset  # whole samples gone, the tar still well-formed up to there
    data = path.read_bytes()[:cut] + b"\0" * 1024
    path.write_bytes(data)
    loader = StreamLoader(copy_of_shards, 8, num_workers=0, epochs=1, verify=False)
    with pytest.raises(PixelgenError, match="shard-000004.tar"):
        list(loader)


def test_a_missing_shard_is_an_error_naming_it(copy_of_shards):
    (copy_of_shards / "shard-000005.tar").unlink()
    with pytest.raises(PixelgenError, match="shard-000005.tar is missing"):
        StreamLoader(copy_of_shards, 8, num_workers=0, verify=False)


# --- case 8: 16-bit and float images ------------------------------------------------------------------------------

def _mid_gray(mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(np.full((20, 20), 32896, np.uint16))  # 128 * 257
    if mode == "I":
        return Image.fromarray(np.full((20, 20), 32896, np.int32), "I")
    if mode == "F":
        return Image.fromarray(np.full((20, 20), 0.5, np.float32), "F")
    if mode == "F255":
        return Image.fromarray(np.full((20, 20), 128.0, np.float32), "F")
    return Image.new("RGB", (20, 20), (128, 128, 128)).convert(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F", "F255"])
def test_every_pil_mode_keeps_its_brightness(tmp_path, mode):
    image = _mid_gray(mode)
    path = tmp_path / ("x.tif" if image.mode in ("I", "F", "CMYK", "YCbCr") else "x.png")
    if image.mode == "YCbCr":
        path = tmp_path / "x.jpg"
    image.save(path)
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (20, 20, 3)
    assert abs(float(rgb.mean()) - 128) <= 3, (mode, rgb.mean())


def test_a_float_image_of_unknown_range_is_rejected_with_the_reason(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(src / "a" / "fine.png")
    Image.fromarray(np.linspace(-5, 900, 256, dtype=np.float32).reshape(16, 16), "F").save(src / "a" / "hdr.tif")
    manifest = build_shards(src, tmp_path / "out", ShardSettings(16), progress=False)
    assert manifest["num_samples"] == 1
    [rejected] = manifest["rejected"]
    assert rejected["path"].endswith("hdr.tif") and "float image" in rejected["reason"]


# --- case 9: file names -------------------------------------------------------------------------------------------

def test_a_file_name_that_is_not_utf8_is_rejected_and_named_in_the_manifest(tmp_path, demo_src):
    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    first = sorted(p for p in src.iterdir() if p.is_dir())[0]
    bad = os.path.join(os.fsencode(first), b"caf\xe9.png")
    Image.new("RGB", (16, 16)).save(os.fsdecode(bad), format="PNG")
    result = pixelgen("shard", str(src), str(tmp_path / "out"), "--resolution", "16", "--quiet")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["num_samples"] == 60
    [rejected] = manifest["rejected"]
    assert rejected["path"] == f"{first.name}/caf\\xe9.png" and "UTF-8" in rejected["reason"]


# --- case 14: resume with another worker count or a moved folder -------------------------------------------------

def _batches(loader, n):
    return [(x.clone(), y.clone()) for x, y in itertools.islice(loader, n)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_resume_with_two_workers_sees_the_batches_of_an_uninterrupted_one_worker_run(shard_dir):
    uninterrupted = _batches(StreamLoader(shard_dir, 8, num_workers=1, seed=3), 16)  # 128 samples: > 2 epochs
    first = StreamLoader(shard_dir, 8, num_workers=1, seed=3)
    head = _batches(first, 5)
    resumed = StreamLoader(shard_dir, 8, num_workers=2, seed=3)
    resumed.load_state_dict(first.state_dict())
    tail = _batches(resumed, 11)
    assert _same(uninterrupted, head + tail)


def test_the_order_does_not_depend_on_the_worker_count(shard_dir):
    one = _batches(StreamLoader(shard_dir, 8, num_workers=0, seed=1), 12)
    assert _same(one, _batches(StreamLoader(shard_dir, 8, num_workers=2, seed=1), 12))
    assert _same(one, _batches(StreamLoader(shard_dir, 8, num_workers=3, seed=1), 12))


def test_resume_from_a_moved_shard_folder_continues_the_same_stream(shard_dir, tmp_path):
    moved = tmp_path / "scratch" / "shards"
    shutil.copytree(shard_dir, moved)
    uninterrupted = _batches(StreamLoader(shard_dir, 8, num_workers=1), 9)
    first = StreamLoader(shard_dir, 8, num_workers=1)
    head = _batches(first, 4)
    resumed = StreamLoader(moved, 8, num_workers=2)
    resumed.load_state_dict(first.state_dict())
    assert _same(uninterrupted, head + _batches(resumed, 5))


def test_a_moved_path_is_a_resumable_config_change_but_other_data_is_refused(shard_dir, tmp_path, demo_src):
    from pixelgen.train import config_differences

    saved = {"data": {"shards": str(shard_dir), "workers": 1}}
    assert config_differences(saved, {"data": {"shards": "/scratch/elsewhere", "workers": 2}}) == []
    other = tmp_path / "other"
    build_shards(demo_src, other, ShardSettings(32, shard_size=8, seed=9), progress=False)
    state = StreamLoader(shard_dir, 8, num_workers=1).state_dict()
    with pytest.raises(PixelgenError, match="manifest_sha256"):
        StreamLoader(other, 8, num_workers=1).load_state_dict(state)


# --- case 4 (last part): one shard job per folder ----------------------------------------------------------------

def test_two_shard_jobs_on_one_folder_cannot_run_at_once(tmp_path, demo_src):
    out = tmp_path / "out"
    with exclusive_folder(out, "shard"):  # a first job holds the folder
        with pytest.raises(FolderBusy, match="in use"):
            build_shards(demo_src, out, ShardSettings(16), progress=False)
        busy = pixelgen("shard", str(demo_src), str(out), "--resolution", "16", "--quiet")
        assert "in use" in one_line_error(busy)
    assert not (out / "manifest.json").exists()
    build_shards(demo_src, out, ShardSettings(16), progress=False)  # the lock died with its holder


# --- siblings -----------------------------------------------------------------------------------------------------

SLOW_SHARD_JOB = """
    import os, sys, time
    from pathlib import Path
    from pixelgen import shards
    original = shards.write_shard
    def slow(job):  # a pool worker busy with a shard when the shard job dies
        with open(sys.argv[1] + f"/worker-{os.getpid()}", "w"):
            pass
        time.sleep(120)
        return original(job)
    shards.write_shard = slow
    shards.build_shards(Path(sys.argv[2]), Path(sys.argv[1]) / "out", shards.ShardSettings(16, shard_size=10),
                        workers=2, progress=False)
    """


def test_no_shard_worker_outlives_a_killed_shard_job(tmp_path, demo_src):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_SHARD_JOB), str(tmp_path), str(demo_src)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        workers = _worker_pids_once_busy(proc, tmp_path)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in workers if _alive(p)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"shard workers {survivors} outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_damaged_manifest_is_a_one_line_error_naming_it(copy_of_shards):
    (copy_of_shards / "manifest.json").write_text('{"classes": [')
    with pytest.raises(PixelgenError, match="manifest.json is not valid JSON"):
        StreamLoader(copy_of_shards, 8, num_workers=0)
    line = one_line_error(pixelgen("shard", "--verify", str(copy_of_shards)))
    assert "manifest.json is not valid JSON" in line
