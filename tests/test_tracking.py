"""MLflow API for the jobs: the trained model, the dataset, sample grids by step, system metrics, the parent run."""

import json
from pathlib import Path

import pytest
import torch

from pixelgen.tracking import (SystemMetrics, Tracker, export_ema, finish_parent, load_ema, log_dataset, log_grid,
                               log_model, start_parent_run)


def tracker_cfg(uri: str, **extra) -> dict:
    return {"enabled": True, "uri": uri, "experiment": "unit", "grid": None, "variant": None, "parent_run_id": None,
            "system_metrics": False, **extra}


@pytest.fixture()
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture()
def tracker(store):
    t = Tracker(tracker_cfg(store))
    t.start("job", {"a": 1}, {})
    yield t
    t.end()


def tiny_model():
    from pixelgen.model import SIZES, JiT

    torch.manual_seed(0)
    return JiT(SIZES["tiny"]).eval()


def model_inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([0.3, 0.8]), torch.tensor([1, 7])


def test_a_logged_model_loads_back_from_the_store_and_gives_the_same_output(tracker, tmp_path):
    import mlflow.pytorch
    from mlflow import MlflowClient

    model = tiny_model()
    x, t, y = model_inputs()
    with torch.no_grad():
        expected = model(x, t, y)
    uri = log_model(tracker, model, tmp_path / "ckpt", best_effort=False)
    assert uri
    # the run stays as it was (RUNNING) until the job ends it
    client = MlflowClient(tracking_uri=tracker.cfg["uri"])
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    for model_uri in (uri, f"runs:/{tracker.run_id}/model"):
        loaded = mlflow.pytorch.load_model(model_uri)
        with torch.no_grad():
            assert torch.equal(loaded(x, t, y), expected), model_uri
    # the EMA-only safetensors export, also an artifact of the run, loads into the same network
    assert "weights/ema.safetensors" in {a.path for a in client.list_artifacts(tracker.run_id, "weights")}
    local = client.download_artifacts(tracker.run_id, "weights/ema.safetensors", str(tmp_path / "dl"))
    with torch.no_grad():
        assert torch.equal(load_ema(local)(x, t, y), expected)


def test_export_ema_holds_only_the_network(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model()
    saved = load_file(str(export_ema(model, tmp_path / "ema.safetensors")))
    assert saved.keys() == model.state_dict().keys()


def test_log_dataset_records_the_manifest_digest_once(tracker, tmp_path):
    import hashlib

    from mlflow import MlflowClient

    shards = tmp_path / "shards-32"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"num_samples": 30, "resolution": 32,
                                                      "shards": [{"name": "a.tar", "sha256": "0" * 64}]}))
    digest = log_dataset(tracker, shards / "manifest.json")
    assert digest == hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert log_dataset(tracker, shards / "manifest.json") == digest  # a resumed job logs it again: no duplicate
    inputs = MlflowClient(tracking_uri=tracker.cfg["uri"]).get_run(tracker.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "shards-32" and digest.startswith(dataset.digest)
    assert json.loads(dataset.profile)["manifest_sha256"] == digest and json.loads(dataset.profile)["num_samples"] == 30
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "train"


def test_a_grid_logged_by_step_is_an_image_artifact(tracker, tmp_path):
    from mlflow import MlflowClient
    from PIL import Image

    for step in (100, 200):
        path = tmp_path / f"step_{step}.png"
        Image.new("RGB", (64, 32), (step % 256, 0, 0)).save(path)
        log_grid(tracker, path, step)
    client = MlflowClient(tracking_uri=tracker.cfg["uri"])
    images = [a.path for a in client.list_artifacts(tracker.run_id, "images")]
    # MLflow's layout for images with a key and step: images/<key>+step+<step>+timestamp+...png (+ a webp preview)
    pngs = sorted(Path(p).name for p in images if p.endswith(".png"))
    assert [name.split("+")[:3] for name in pngs] == [["previews", "step", "100"], ["previews", "step", "200"]], images


def test_finish_parent_ends_the_parent_with_the_report(store, tmp_path):
    from mlflow import MlflowClient

    id_file = tmp_path / "work/mlflow/unit.parent"
    parent = start_parent_run("unit", "workflow-unit", store, id_file)
    child = Tracker(tracker_cfg(store, parent_run_id=parent))
    child.start("variant", {}, {})
    child.end()
    report = tmp_path / "results/unit"
    (report / "plots").mkdir(parents=True)
    (report / "table.md").write_text("| variant | FID |\n")
    (report / "loss_curves.png").write_bytes(b"png")
    (report / "plots/loss_variant.csv").write_text("step,loss\n1,0.5\n")
    (report / "summary.json").write_text(json.dumps({"variant": {"fid": 12.5, "recall": 0.4, "sfid": None}}))
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(parent).info.status == "RUNNING"
    assert finish_parent(id_file, report, store) == parent
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/table.md", "report/loss_curves.png", "report/plots", "report/summary.json"} <= artifacts
    assert run.data.metrics["variant/fid"] == 12.5 and "variant/sfid" not in run.data.metrics
    # a rerun of the workflow nests under the same parent and reopens it; the next report ends it again
    again = Tracker(tracker_cfg(store, parent_run_id=parent))
    again.start("variant", {}, {})
    assert client.get_run(parent).info.status == "RUNNING"
    again.end()
    finish_parent(parent, report, store)  # by id as well as by file
    assert client.get_run(parent).info.status == "FINISHED"


def test_system_metrics_come_from_mlflows_monitor(store):
    from mlflow import MlflowClient

    tracker = Tracker(tracker_cfg(store, system_metrics=True))
    tracker.start("job", {}, {})
    with SystemMetrics(tracker, interval=0.2) as monitor:
        assert monitor.monitor is not None
        import time

        time.sleep(1.5)
    tracker.end()
    metrics = MlflowClient(tracking_uri=store).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


def test_everything_is_a_no_op_when_tracking_is_off(tmp_path):
    off = Tracker(tracker_cfg("sqlite:///unused.db"), enabled=False)
    assert off.start("job", {}, {}) is None
    assert log_model(off, tiny_model(), tmp_path) is None and log_dataset(off, tmp_path / "none.json") is None
    log_grid(off, tmp_path / "none.png", 1)
    with SystemMetrics(off) as monitor:
        assert monitor.monitor is None
    assert not (tmp_path / "ema.safetensors").exists()


def test_an_eval_run_is_one_per_sample_folder_and_weights(store, tmp_path):
    from mlflow import MlflowClient

    from pixelgen.tracking import log_eval_run

    parent = start_parent_run("unit", "workflow-unit", store, tmp_path / "unit.parent")
    samples = tmp_path / "it's samples"  # a quote in the path must not break the lookup
    metrics_file = tmp_path / "m.json"
    metrics_file.write_text("{}")

    def score(fid, digest, folder=samples):
        result = {"samples": str(folder), "fid": fid, "recall": 0.5, "weights": "random",
                  "sampling": {"sampler": "heun", "steps": 5, "ckpt_step": 4, "ckpt_digest": digest}}
        return log_eval_run(result, metrics_file, {"run_dir": str(tmp_path / "no-run")}, "heun_nfe9", parent, store)

    first = score(10.0, "aaa")
    assert score(11.0, "aaa") == first  # rescoring the same samples: the same run, a second point
    client = MlflowClient(tracking_uri=store)
    assert [m.value for m in client.get_metric_history(first, "eval/fid")] == [10.0, 11.0]
    run = client.get_run(first)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["train_run_id"] == "none"
    assert run.data.params["sampling.sampler"] == "heun" and run.info.status == "FINISHED"
    # other weights behind the same folder (a retrain under the same key), or another folder: a run of its own
    retrained, other = score(12.0, "bbb"), score(13.0, "aaa", tmp_path / "other")
    assert len({first, retrained, other}) == 3
    assert [m.value for m in client.get_metric_history(retrained, "eval/fid")] == [12.0]
