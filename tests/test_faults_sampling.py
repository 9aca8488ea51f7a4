"""The promises of `pixelgen sample`, `score` and `ref-stats` when something is off (issue 12, "nothing silently
wrong"): a sample folder never mixes checkpoints or settings, one job per part, and a score is computed only
from a complete, intact sample set that matches its reference. Each refusal is one line that names the thing
and the fix, with a non-zero exit and no traceback, and leaves the work already done in place."""

import json
import shutil

import numpy as np
import pytest
import torch

from jobs_helpers import fast_config, make_shards, pixelgen
from pixelgen import sample_folder
from pixelgen.errors import PixelgenError
from pixelgen.locks import exclusive_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-step checkpoint A, a checkpoint B of the same step with other weights (a retrain), a 20-image
    sample folder of A, and ref-stats of 40 training images (random Inception)."""
    root = tmp_path_factory.mktemp("faults")
    shards = make_shards(root)
    config = fast_config(root / "config.yaml", shards, f"sqlite:///{root / 'mlflow.db'}", train={"steps": 2})
    result = pixelgen("train", "--config", str(config), "--run-dir", str(root / "run"), "--quiet")
    assert result.returncode == 0, result.stderr
    ckpt_a = root / "run/checkpoints/final.pt"
    state = torch.load(ckpt_a, map_location="cpu", weights_only=False)
    for tensor in state["ema"]["shadow"].values():
        if tensor.is_floating_point():
            tensor.add_(0.01)
    ckpt_b = root / "other-run-final.pt"
    torch.save(state, ckpt_b)
    samples = root / "samples"
    sample(ckpt_a, samples)
    ref = root / "ref.npz"
    result = pixelgen("ref-stats", str(shards), "--out", str(ref), "--allow-random-weights", "--quiet", "--max", "40")
    assert result.returncode == 0, result.stderr
    return {"a": ckpt_a, "b": ckpt_b, "samples": samples, "ref": ref, "shards": shards}


def sample(ckpt, out, *extra, check=True):
    result = pixelgen("sample", "--ckpt", str(ckpt), "--num", "20", "--out", str(out), "--steps", "3",
                      "--shard-size", "8", "--quiet", "--device", "cpu", *extra)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def one_line_error(result, *named):
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for name in named:
        assert name in lines[0], lines[0]
    return lines[0]


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("samples-*.tar"))}


def copy_folder(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
    return dst


def score_in_process(samples, setup, tmp_path, **kwargs):
    from pixelgen.score import score

    kwargs.setdefault("fid_sqrt", "eigh")  # (the refusals are tested here, not the FID formula: the faster trace)
    return score(samples, kwargs.pop("ref", setup["ref"]), tmp_path / "metrics.json", allow_random=True,
                 device="cpu", progress=False, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", **kwargs)


# --- sample: one checkpoint, one set of settings per folder ----------------------------------------------------

def test_sampling_into_a_folder_of_another_checkpoint_is_refused_naming_it(setup, tmp_path):
    out = copy_folder(setup["samples"], tmp_path / "s")
    before = shard_bytes(out)
    (out / "samples-000001.tar").unlink()  # a resume: B would fill in this shard beside A's
    line = one_line_error(sample(setup["b"], out, check=False), "checkpoint", str(setup["a"]), str(setup["b"]),
                          "--out")
    assert "step" in line
    assert shard_bytes(out) == {k: v for k, v in before.items() if k != "samples-000001.tar"}  # nothing lost
    assert json.loads((out / "samples.json").read_text())["ckpt"] == str(setup["a"])


def test_a_reset_folder_keeps_samples_of_the_same_checkpoint_and_replaces_another_checkpoints(setup, tmp_path):
    # what the workflow runs once before the parts whenever training reruns: never a refusal, never old samples
    out = copy_folder(setup["samples"], tmp_path / "s")
    before = shard_bytes(out)
    assert "s: kept" in sample(setup["a"], out, "--reset").stdout and shard_bytes(out) == before
    assert "s: replaced" in sample(setup["b"], out, "--reset").stdout
    assert shard_bytes(out) == {} and not (out / "samples.json").exists()
    sample(setup["b"], out)
    assert json.loads((out / "samples.json").read_text())["ckpt"] == str(setup["b"])
    assert shard_bytes(out).keys() == before.keys() and shard_bytes(out) != before


def test_a_reset_is_refused_while_a_part_is_sampling(setup, tmp_path):
    out = copy_folder(setup["samples"], tmp_path / "s")
    with exclusive_folder(sample_folder.part_lock_folder(out, 1, 2), "sample --part 1/2"):
        one_line_error(sample(setup["b"], out, "--reset", check=False), "in use by sample --part 1/2")
    assert shard_bytes(out) == shard_bytes(setup["samples"])


def test_parts_of_one_folder_from_two_checkpoints_are_refused(setup, tmp_path):
    out = tmp_path / "s"
    sample(setup["a"], out, "--part", "0/2")
    one_line_error(sample(setup["b"], out, "--part", "1/2", check=False), "checkpoint", str(setup["a"]))
    assert not (out / "samples.json").exists() and not (out / "samples-000001.tar").exists()


def test_the_same_checkpoint_copied_elsewhere_resumes(setup, tmp_path):
    out = copy_folder(setup["samples"], tmp_path / "s")
    (out / "samples-000002.tar").unlink()
    copy = shutil.copy(setup["a"], tmp_path / "moved.pt")  # the weights, not the path, identify the checkpoint
    sample(copy, out)
    assert shard_bytes(out) == shard_bytes(setup["samples"])


def test_resuming_with_other_settings_is_refused_naming_each_difference(setup, tmp_path):
    out = copy_folder(setup["samples"], tmp_path / "s")
    line = one_line_error(sample(setup["a"], out, "--seed", "5", check=False), "seed 0", "seed 5")
    assert "steps" not in line
    line = one_line_error(pixelgen("sample", "--ckpt", str(setup["a"]), "--num", "24", "--out", str(out),
                                   "--steps", "9", "--shard-size", "8", "--quiet"), "num 20", "num 24",
                          "steps 3", "steps 9")
    assert "seed" not in line and "shard_size" not in line
    assert shard_bytes(out) == shard_bytes(setup["samples"])


def test_shards_of_unknown_origin_are_not_reused(setup, tmp_path):
    out = copy_folder(setup["samples"], tmp_path / "s")
    (out / "settings.json").unlink()  # shards whose checkpoint and settings nobody recorded
    (out / "samples.json").unlink()
    one_line_error(sample(setup["a"], out, check=False), "settings.json", "--out")
    assert not (out / "samples.json").exists()


def test_a_second_sample_job_on_the_same_part_is_refused_while_other_parts_run(setup, tmp_path):
    out = tmp_path / "s"
    with exclusive_folder(sample_folder.part_lock_folder(out, 0, 2), "sample --part 0/2"):
        one_line_error(sample(setup["a"], out, "--part", "0/2", check=False), "in use", "sample --part 0/2")
        sample(setup["a"], out, "--part", "1/2")  # another part of the same folder runs meanwhile
    assert (out / "samples-000001.tar").exists() and not (out / "samples-000000.tar").exists()
    sample(setup["a"], out, "--part", "0/2")  # released with its holder
    assert shard_bytes(out) == shard_bytes(setup["samples"])


def test_settings_are_recorded_once_even_when_two_parts_start_together(tmp_path):
    """Two parts that both found no settings.json: the later one compares with the earlier one's, not overwrites."""
    path = tmp_path / "settings.json"
    assert sample_folder.record_once(path, {"steps": 3}) == {"steps": 3}
    assert sample_folder.record_once(path, {"steps": 4}) == {"steps": 3}
    assert json.loads(path.read_text()) == {"steps": 3} and not list(tmp_path.glob(".*"))


# --- score: a complete, intact sample set that matches the reference -------------------------------------------

def test_scoring_a_folder_with_a_missing_shard_is_refused_naming_it(setup, tmp_path):
    out = copy_folder(setup["samples"], tmp_path / "s")
    (out / "samples-000001.tar").unlink()
    result = pixelgen("score", str(out), "--ref", str(setup["ref"]), "--out", str(tmp_path / "m.json"),
                      "--allow-random-weights", "--quiet")
    one_line_error(result, "samples-000001.tar", "pixelgen sample")
    assert not (tmp_path / "m.json").exists()


def test_scoring_an_unfinished_folder_is_refused(setup, tmp_path):
    out = copy_folder(setup["samples"], tmp_path / "s")
    (out / "samples.json").unlink()  # what a folder looks like while parts are still running
    with pytest.raises(PixelgenError, match="samples.json.*unfinished"):
        score_in_process(out, setup, tmp_path)


def test_a_shard_that_does_not_match_samples_json_is_refused_naming_it(setup, tmp_path):
    out = copy_folder(setup["samples"], tmp_path / "s")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    sample_folder.write_shard(out / "samples-000002.tar", list(range(16, 20)), images, [6, 7, 8, 9])  # same count
    with pytest.raises(PixelgenError, match="samples-000002.tar"):
        score_in_process(out, setup, tmp_path)


def test_a_shard_with_the_wrong_number_of_images_is_refused_naming_it(setup, tmp_path):
    """A folder from before shard digests were recorded: the image count of each shard is still checked."""
    out = copy_folder(setup["samples"], tmp_path / "s")
    manifest = json.loads((out / "samples.json").read_text())
    manifest.pop("shard_sha256", None)
    (out / "samples.json").write_text(json.dumps(manifest))
    images, labels = sample_folder.read_images(out)
    sample_folder.write_shard(out / "samples-000001.tar", list(range(8, 14)), images[8:14], labels[8:14].tolist())
    with pytest.raises(PixelgenError, match="samples-000001.tar.* 6 images.* 8"):
        score_in_process(out, setup, tmp_path)


def test_shards_not_listed_in_samples_json_are_not_scored(setup, tmp_path):
    out = copy_folder(setup["samples"], tmp_path / "s")
    shutil.copy(out / "samples-000000.tar", out / "samples-000003.tar")  # left by an earlier, larger --num
    assert score_in_process(out, setup, tmp_path)["num_samples"] == 20


def test_samples_at_another_resolution_than_the_reference_are_refused(setup, tmp_path):
    assert int(np.load(setup["ref"])["image_size"]) == 32  # ref-stats records the resolution it measured
    small = tmp_path / "small.npz"
    np.savez(small, arr_0=np.zeros((20, 16, 16, 3), np.uint8))
    result = pixelgen("score", str(small), "--ref", str(setup["ref"]), "--out", str(tmp_path / "m.json"),
                      "--allow-random-weights", "--quiet")
    one_line_error(result, "16", "32", str(setup["ref"]))


def test_fewer_samples_than_precision_recall_needs_is_a_one_line_error(setup, tmp_path):
    few = tmp_path / "few.npz"
    np.savez(few, arr_0=np.zeros((3, 32, 32, 3), np.uint8))
    result = pixelgen("score", str(few), "--ref", str(setup["ref"]), "--out", str(tmp_path / "m.json"),
                      "--allow-random-weights", "--quiet")
    line = one_line_error(result, "3 samples", "at least 4")
    assert "kthvalue" not in line


@pytest.mark.parametrize("max_images", ["3"])
def test_ref_stats_of_too_few_images_is_a_one_line_error(setup, tmp_path, max_images):
    result = pixelgen("ref-stats", str(setup["shards"]), "--out", str(tmp_path / "r.npz"), "--max", max_images,
                      "--allow-random-weights", "--quiet")
    one_line_error(result, f"{max_images} images", "at least 4")
    assert not (tmp_path / "r.npz").exists()


@pytest.mark.parametrize("arr_0, expected", [
    (np.zeros((20, 32, 32, 3), np.float32), "uint8"),
    (np.zeros((20, 3, 32, 32), np.uint8), "(N, H, W, 3)"),
    (None, "arr_0"),
])
def test_a_samples_npz_of_the_wrong_dtype_or_layout_is_refused_saying_what_was_expected(setup, tmp_path, arr_0,
                                                                                         expected):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **({"images": np.zeros(3)} if arr_0 is None else {"arr_0": arr_0}))
    with pytest.raises(PixelgenError, match=f"{bad}.*{expected.replace('(', '[(]').replace(')', '[)]')}"):
        score_in_process(bad, setup, tmp_path)


def test_a_reference_npz_of_the_wrong_layout_is_refused_saying_what_was_expected(setup, tmp_path):
    data = dict(np.load(setup["ref"]))
    data["sigma"] = data["sigma"][:10]
    bad = tmp_path / "bad-ref.npz"
    np.savez(bad, **data)
    result = pixelgen("score", str(setup["samples"]), "--ref", str(bad), "--out", str(tmp_path / "m.json"),
                      "--allow-random-weights", "--quiet")
    one_line_error(result, str(bad), "sigma", "(2048, 2048)")
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("not an npz")
    result = pixelgen("score", str(setup["samples"]), "--ref", str(not_npz), "--out", str(tmp_path / "m.json"),
                      "--allow-random-weights", "--quiet")
    one_line_error(result, str(not_npz), ".npz")


def test_metrics_name_the_samples_and_checkpoint_they_were_computed_from(setup, tmp_path):
    m = score_in_process(setup["samples"], setup, tmp_path)
    manifest = json.loads((setup["samples"] / "samples.json").read_text())
    assert m["samples"] == str(setup["samples"]) and m["sampling"]["ckpt_digest"] == manifest["ckpt_digest"]


def test_a_folder_from_before_checkpoints_were_identified_is_not_resumed(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"steps": 3, "ckpt_step": 2}))
    with pytest.raises(PixelgenError, match="older pixelgen.*--out"):
        sample_folder.check_settings(tmp_path, {"steps": 3, "ckpt_step": 2, "ckpt_digest": "abc"}, write=True)


def test_scoring_with_another_inception_network_than_the_reference_is_refused(setup, tmp_path):
    from pixelgen import weights

    weights.init_random(tmp_path / "w", ["inception"], seed=1)  # a weight file, but not the reference's network
    result = pixelgen("score", str(setup["samples"]), "--ref", str(setup["ref"]), "--out", str(tmp_path / "m.json"),
                      "--weights-dir", str(tmp_path / "w"), "--quiet")
    one_line_error(result, str(setup["ref"]), "Inception", "--weights-dir")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("job, flag", [("score", "--batch-size"), ("ref-stats", "--max"), ("ref-stats", "--batch-size")])
def test_a_count_of_zero_is_a_usage_error_naming_the_flag(setup, tmp_path, job, flag):
    # --max 0 once counted the whole set but measured nothing; --batch-size 0 was a traceback
    target = ["x", "--ref", "y"] if job == "score" else [str(setup["shards"])]
    result = pixelgen(job, *target, "--out", str(tmp_path / "o"), flag, "0", "--allow-random-weights", "--quiet")
    assert result.returncode == 2 and f"argument {flag}: must be at least 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr
