"""Issue 20, rows 13 and 14: `pixelgen report` never shows a blank row or a traceback for a variant whose metrics
are missing or not `pixelgen score`'s, and an evaluation run (`score --eval-run`) holds the scores of one set of
sampling settings only: a folder resampled with other settings gets a run of its own."""

import json

import numpy as np
import pytest
import yaml

from pixelgen import sample_folder, score
from pixelgen.cli import main
from pixelgen.tracking import start_parent_run


# --- row 13: report with a missing, empty or invalid metrics file ------------------------------------------------
def write_grid(tmp_path) -> tuple:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"variants": {"baseline": {}, "gated": {}}}))
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "baseline.json").write_text(json.dumps({"fid": 3.0, "num_samples": 8, "weights": "random"}))
    return grid, metrics


def report(tmp_path, grid, metrics) -> int:
    return main(["report", "--grid", str(grid), "--metrics", str(metrics), "--runs", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("content", ["", "{\"fid\": 3.0", "[1, 2]", "{}", b"\xff\xfe"],
                         ids=["empty", "truncated", "not-an-object", "no-fid", "binary"])
def test_a_metrics_file_that_is_not_scores_is_a_one_line_error_naming_it(tmp_path, capsys, content):
    grid, metrics = write_grid(tmp_path)
    bad = metrics / "gated.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert report(tmp_path, grid, metrics) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and "pixelgen score" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_variant_without_metrics_is_an_error_not_a_blank_row(tmp_path, capsys):
    grid, metrics = write_grid(tmp_path)  # gated was never scored
    assert report(tmp_path, grid, metrics) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(metrics / "gated.json") in err
    assert str(metrics / "baseline.json") not in err and not (tmp_path / "out").exists()
    # scored, the same report runs
    (metrics / "gated.json").write_text(json.dumps({"fid": 4.0, "num_samples": 8, "weights": "random"}))
    assert report(tmp_path, grid, metrics) == 0
    assert "| gated † | 4.00 |" in (tmp_path / "out/table.md").read_text()


def test_a_missing_metrics_folder_is_named(tmp_path, capsys):
    grid, _ = write_grid(tmp_path)
    assert report(tmp_path, grid, tmp_path / "nowhere") == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path / "nowhere") in err


# --- row 14: an eval run per sample folder, weights and sampling settings ---------------------------------------
SIDE = 16


def settings(**changes) -> dict:
    """A sample folder's identity (settings.json), as `pixelgen sample` records it."""
    base = {"precision": "fp32", "compile": False, "noise_device": "cpu", "sampler": "heun", "steps": 5,
            "guidance": 3.0, "interval": [0.1, 1.0], "shift": 1.0, "seed": 0, "num": 6, "shard_size": 6,
            "t_eps": 0.05, "noise_scale": 1.0, "corrector_interval_at": "t_cur", "guidance_schedule": "interval",
            "ckpt_step": 4, "ckpt_digest": "aaa"}
    return {**base, **changes}


def sample_into(out, identity: dict, run_dir) -> None:
    """What `pixelgen sample --reset` then `pixelgen sample` leave in `out`: the settings recorded (any other
    settings' samples deleted), a shard of images depending on the settings, and the manifest."""
    ckpt = str(run_dir / "checkpoints/final.pt")
    sample_folder.reset(out, {**identity, "ckpt": ckpt})
    rng = np.random.RandomState(len(json.dumps(identity, sort_keys=True)) + identity["seed"])
    images = rng.randint(0, 256, (identity["num"], SIDE, SIDE, 3), dtype=np.uint8)
    shards = [sample_folder.SHARD.format(0)]
    sample_folder.write_shard(out / shards[0], list(range(identity["num"])), images, [0] * identity["num"])
    sample_folder.write_manifest(out, {**identity, "ckpt": ckpt, "num_classes": 1, "image_size": SIDE,
                                       "nfe_per_image": 9, "shards": shards,
                                       "shard_sha256": sample_folder.shard_digests(out, shards),
                                       "encoders_real": False, "run_dir": str(run_dir)})


def test_a_folder_resampled_with_other_settings_is_scored_into_a_new_eval_run(tmp_path):
    from mlflow import MlflowClient

    from pixelgen.tracking import log_eval_run

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run("unit", "workflow-unit", store, tmp_path / "unit.parent")
    samples, metrics_file = tmp_path / "samples", tmp_path / "metrics.json"
    metrics_file.write_text("{}")

    def score_into_eval_run(identity: dict, fid: float) -> str:
        """Sample `identity` into the folder, then log a score of it as `pixelgen score --eval-run` does (the
        Inception work left out: the FID of a 2048-d covariance takes a minute on one CPU thread)."""
        sample_into(samples, identity, tmp_path / "no-run")
        manifest, _ = sample_folder.checked_shards(samples)
        result = {"samples": str(samples), "fid": fid, "weights": "random",
                  "sampling": {k: manifest[k] for k in score.SAMPLING_KEYS if k in manifest}}
        return log_eval_run(result, metrics_file, manifest, "heun_nfe9", parent, store)

    first = score_into_eval_run(settings(), 10.0)
    assert score_into_eval_run(settings(), 11.0) == first  # rescoring the same samples: the same run, a second point
    euler = score_into_eval_run(settings(sampler="euler", steps=3), 12.0)  # `sample --reset` with other settings
    other_seed = score_into_eval_run(settings(seed=1), 13.0)  # a setting metrics.json's `sampling` does not list
    assert len({first, euler, other_seed}) == 3
    client = MlflowClient(tracking_uri=store)
    assert [m.value for m in client.get_metric_history(first, "eval/fid")] == [10.0, 11.0]
    assert [m.value for m in client.get_metric_history(euler, "eval/fid")] == [12.0]
    params = client.get_run(euler).data.params
    assert params["sampling.sampler"] == "euler" and params["sampling.steps"] == "3"
    assert client.get_run(first).data.params["sampling.sampler"] == "heun"
