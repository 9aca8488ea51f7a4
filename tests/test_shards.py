import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from jobs_helpers import pixelgen
from PIL import Image

from pixelgen.demo_data import CLASSES, write_demo_dataset
from pixelgen.errors import PixelgenError
from pixelgen.shards import ShardSettings, adm_center_crop, build_shards, list_image_folder


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("demo")
    write_demo_dataset(src, resolution=32, per_class=12, num_classes=5, progress=False)
    return src


@pytest.fixture()
def messy_src(tmp_path, demo_src):
    """The demo set plus the real-world trouble: grayscale, CMYK, a truncated JPEG, a text file named .JPEG."""
    import shutil

    src = tmp_path / "messy"
    shutil.copytree(demo_src, src)
    cls = src / CLASSES[0][0]
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (48, 40), dtype=np.uint8), "L").save(cls / "gray.JPEG")
    Image.fromarray(rng.randint(0, 255, (40, 48, 4), dtype=np.uint8), "CMYK").save(cls / "cmyk.JPEG")
    Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(cls / "whole.JPEG", quality=90)
    data = (cls / "whole.JPEG").read_bytes()
    (cls / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (cls / "notes.JPEG").write_text("this is not an image\n")
    return src


def read_shards(out: Path):
    samples = {}
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return manifest, samples


def test_counts_labels_and_manifest(demo_src, tmp_path):
    out = tmp_path / "shards"
    manifest = build_shards(demo_src, out, ShardSettings(resolution=32, shard_size=16), workers=2, progress=False)
    classes, items = list_image_folder(demo_src)
    assert manifest["classes"] == classes == sorted(c[0] for c in CLASSES[:5])
    assert manifest["counts"] == manifest["source_counts"] == {c: 12 for c in classes}
    assert manifest["num_samples"] == 60 and len(manifest["shards"]) == 4  # 16 + 16 + 16 + 12
    assert [s["samples"] for s in manifest["shards"]] == [16, 16, 16, 12]
    import hashlib

    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    manifest, samples = read_shards(out)
    assert len(samples) == 60
    for sample in samples.values():
        meta = json.loads(sample["json"])
        label, name, path = int(sample["cls"]), meta["class_name"], meta["path"]
        assert classes[label] == name == path.split("/")[0]
        image = Image.open(__import__("io").BytesIO(sample["png"]))
        assert image.mode == "RGB" and image.size == (32, 32)
        # lossless: the stored pixels are the source pixels (the demo images are already 32 px squares)
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(demo_src / path).convert("RGB")))
    # shards mix classes (seeded permutation), so a shuffle buffer does not see one class at a time
    with tarfile.open(out / "shard-000000.tar") as tar:
        labels = {int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")}
    assert len(labels) >= 3


def test_grayscale_and_cmyk_come_out_rgb_and_bad_files_are_rejected(messy_src, tmp_path):
    out = tmp_path / "shards"
    manifest = build_shards(messy_src, out, ShardSettings(resolution=32, shard_size=25), progress=False)
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    first = CLASSES[0][0]
    assert set(rejected) == {f"{first}/truncated.JPEG", f"{first}/notes.JPEG"}
    assert "truncated" in rejected[f"{first}/truncated.JPEG"].lower()
    assert "identify" in rejected[f"{first}/notes.JPEG"].lower()
    assert manifest["counts"][first] == 12 + 3 and manifest["source_counts"][first] == 12 + 5
    _, samples = read_shards(out)
    by_path = {json.loads(s["json"])["path"]: s for s in samples.values()}
    for name in ("gray.JPEG", "cmyk.JPEG", "whole.JPEG"):
        image = Image.open(__import__("io").BytesIO(by_path[f"{first}/{name}"]["png"]))
        assert image.mode == "RGB" and image.size == (32, 32)


def test_strict_makes_bad_files_fatal_and_keeps_finished_shards(messy_src, tmp_path):
    out = tmp_path / "strict"
    result = pixelgen("shard", str(messy_src), str(out), "--resolution", "32", "--strict", "--shard-size", "5", "--quiet")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and ".JPEG" in result.stderr and "--strict" in result.stderr
    assert not list(out.glob("*.part")) and not list(out.glob(".*.tmp-*"))  # the refused shard left no temp tar


def test_missing_or_empty_source_is_a_clear_error(tmp_path):
    result = pixelgen("shard", str(tmp_path / "nope"), str(tmp_path / "out"), "--resolution", "32", "--quiet")
    assert result.returncode == 1 and "not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(PixelgenError, match="no images"):
        build_shards(tmp_path / "empty", tmp_path / "out", ShardSettings(32), progress=False)


def test_rerun_with_other_settings_is_refused(demo_src, tmp_path):
    build_shards(demo_src, tmp_path / "s", ShardSettings(32, shard_size=30), progress=False)
    with pytest.raises(PixelgenError, match="shard_size"):
        build_shards(demo_src, tmp_path / "s", ShardSettings(32, shard_size=20), progress=False)


def test_adm_center_crop():
    # a 300 x 512 (w x h) image: two box halvings (300 -> 150 -> 75 < 128), bicubic to 64, center crop
    arr = np.zeros((512, 300, 3), np.uint8)
    arr[:, :150] = (255, 0, 0)
    arr[:, 150:] = (0, 0, 255)
    arr[:256] += np.array([0, 100, 0], np.uint8)  # top half greenish
    out = np.asarray(adm_center_crop(Image.fromarray(arr), 64))
    assert out.shape == (64, 64, 3)
    assert out[32, 5, 0] > 200 and out[32, 58, 2] > 200  # left red, right blue survive the crop
    # the crop is centred vertically: the green boundary (row 256 of 512) lands in the middle rows
    assert out[20, 5, 1] > 80 and out[44, 5, 1] < 20
    small = np.asarray(adm_center_crop(Image.fromarray(np.full((20, 30, 3), 7, np.uint8)), 64))
    assert small.shape == (64, 64, 3) and (small == 7).all()  # upscaling works too


def test_jpeg_and_npy_options(demo_src, tmp_path):
    manifest = build_shards(demo_src, tmp_path / "j", ShardSettings(32, 100, image_format="jpeg", quality=90),
                            progress=False)
    assert manifest["image_format"] == "jpeg" and manifest["quality"] == 90
    _, samples = read_shards(tmp_path / "j")
    assert all("jpg" in s for s in samples.values())
    build_shards(demo_src, tmp_path / "n", ShardSettings(32, 100, image_format="npy"), progress=False)
    _, samples = read_shards(tmp_path / "n")
    for sample in samples.values():  # lossless: exactly the source pixels
        array = np.load(__import__("io").BytesIO(sample["npy"]))
        source = np.asarray(Image.open(demo_src / json.loads(sample["json"])["path"]).convert("RGB"))
        assert array.dtype == np.uint8 and np.array_equal(array, source)


def test_killed_run_resumes_to_the_same_result(tmp_path):
    src = tmp_path / "src"
    write_demo_dataset(src, resolution=32, per_class=60, num_classes=10, progress=False)
    args = ["--resolution", "32", "--shard-size", "20", "--workers", "1"]
    reference = pixelgen("shard", str(src), str(tmp_path / "ref"), *args)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pixelgen.cli", "shard", str(src), str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.json")}
    assert 3 <= len(complete) < 30, "the kill should land mid-run"
    resumed = pixelgen("shard", str(src), str(out), *args)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "manifest.json").read_text() == (tmp_path / "ref" / "manifest.json").read_text()
    # shards that were complete before the kill were kept, not rewritten
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in complete.items())
    assert not list(out.glob("*.part")) and not list(out.glob(".*.tmp-*"))  # the killed run's temp tar is swept
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "ref" / shard["name"]).read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PIXELGEN_REAL_DATA"), reason="set PIXELGEN_REAL_DATA to tiny-imagenet-20")
def test_real_photos_tiny_imagenet(tmp_path):
    root = Path(os.environ["PIXELGEN_REAL_DATA"])
    out = tmp_path / "tin"
    result = pixelgen("shard", str(root / "train"), str(out), "--resolution", "64", "--workers", "2")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    wnids = [line.split("\t")[0] for line in (root / "classes.tsv").read_text().splitlines() if line.strip()]
    assert manifest["classes"] == wnids
    assert manifest["counts"] == {w: 500 for w in wnids} and manifest["rejected"] == []
    _, samples = read_shards(out)
    gray = [s for s in samples.values() if json.loads(s["json"])["path"] == "n01644900/n01644900_417.JPEG"]
    assert Image.open(root / "train/n01644900/n01644900_417.JPEG").mode == "L"
    image = Image.open(__import__("io").BytesIO(gray[0]["png"]))
    assert image.mode == "RGB" and image.size == (64, 64)
    for sample in list(samples.values())[:500]:
        meta = json.loads(sample["json"])
        assert wnids[int(sample["cls"])] == meta["class_name"] == meta["path"].split("/")[0]
