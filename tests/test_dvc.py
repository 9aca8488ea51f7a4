"""`dvc repro` as users type it, on a fresh copy of the project."""

import json
import subprocess

import pytest
import yaml

from workflow_helpers import (BIN, ENV, project_copy)

pytestmark = pytest.mark.slow  # end-to-end: in the full suite (CI), not in `-m "not slow"`


def test_dvc_repro_runs_the_demo_and_leaves_status_clean(tmp_path):
    root = project_copy(tmp_path / "dvc-run")
    env = {**ENV, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def dvc(*args, check=True):
        result = subprocess.run([str(BIN / "dvc"), *args], cwd=root, capture_output=True, text=True, env=env,
                                timeout=1800)
        assert not check or result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    # the demo as committed, made tiny: the same stages, with fewer steps and samples
    pg = yaml.safe_load((root / "config/pixelgen/demo.yaml").read_text())
    pg["train"].update(steps=2, ckpt_every=2, log_every=1, preview_count=4, preview_steps=2)
    pg["sampling"]["steps"] = 2
    (root / "config/pixelgen/demo.yaml").write_text(yaml.safe_dump(pg))
    cfg = yaml.safe_load((root / "config/demo.yaml").read_text())
    cfg["sample"].update(num=20)
    cfg["ref_max"] = 20
    cfg["dataset"]["demo_per_class"] = 6  # 60 images to make and shard, not 3,000
    cfg["fid_sqrt"] = "eigh"  # the faster trace (the ADM sqrtm of the 2048-d product costs about a minute here)
    (root / "config/demo.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run(["git", "commit", "-qam", "tiny"], cwd=root, check=True, env=env)
    # `dvc repro` typed alone: its first stage generates the demo set (here 6 images a class, the stage's param)
    assert not (root / "data").exists()
    dvc("repro")
    assert (root / "results/demo/table.md").exists()
    assert "up to date" in dvc("status").stdout
    # the stages behind `dvc dag`: demo_data feeds the first step, shard
    assert "demo_data" in dvc("dag", "--md").stdout

    metrics = json.loads(dvc("metrics", "show", "--json").stdout)
    summary = next(iter(metrics.values()))["data"]["results/demo/summary.json"]["data"]
    for variant in ("baseline", "pixelgen"):
        assert summary[variant]["fid"] > 0 and 0 <= summary[variant]["recall"] <= 1
        assert summary[variant]["samples"] == 20
    shown = json.loads(dvc("plots", "show", "--json").stdout)
    assert not shown.get("errors"), shown["errors"]
    plots = shown["data"]
    assert {"loss", "fm", "perceptual", "fid_recall", "results/demo/loss_curves.png",
            "results/demo/samples/pixelgen.png"} <= set(plots), list(plots)
    losses = [row for item in plots["loss"] for row in item["content"]["data"]["values"]]
    assert {int(row["step"]) for row in losses} == {1, 2}
    assert {row["filename"] for row in losses} == {"loss_baseline.csv", "loss_pixelgen.csv"}
    dvc("plots", "show", "-o", "dvc_plots")
    html = (root / "dvc_plots/index.html").read_text()
    assert "loss_curves.png" in html or "loss_curves" in html

    def would_run():
        # the stages whose own deps or params changed (a real run then reruns the stages downstream of them,
        # whose deps, the upstream outputs, change in turn)
        out = dvc("repro", "--dry").stdout
        return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}

    # a change reruns exactly what it affects: sampling settings do not retrain, training settings do
    pg["sampling"]["steps"] = 3
    (root / "config/pixelgen/demo.yaml").write_text(yaml.safe_dump(pg))
    assert would_run() == {"sample@baseline", "sample@pixelgen"}
    subprocess.run(["git", "checkout", "config/pixelgen/demo.yaml"], cwd=root, check=True)
    pg["sampling"]["steps"] = 2
    pg["train"]["steps"] = 3
    (root / "config/pixelgen/demo.yaml").write_text(yaml.safe_dump(pg))
    assert would_run() == {"train@baseline", "train@pixelgen"}
    subprocess.run(["git", "checkout", "config/pixelgen/demo.yaml"], cwd=root, check=True)
    # one variant's overrides: that variant only (and the report, which reads the grid's titles and paper numbers)
    grid = yaml.safe_load((root / "config/grids/demo.yaml").read_text())
    grid["variants"]["baseline"]["set"].append("loss.gate=0.5")
    (root / "config/grids/demo.yaml").write_text(yaml.safe_dump(grid))
    assert would_run() == {"train@baseline", "report"}
    subprocess.run(["git", "checkout", "config/grids/demo.yaml"], cwd=root, check=True)
    assert "up to date" in dvc("status").stdout

    # the workflow's MLflow parent run ends with the report attached
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'results/mlflow.db'}")
    parent = client.get_run((root / "work/mlflow/demo.parent").read_text().strip())
    assert parent.info.status == "FINISHED"
    assert "report/table.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
