"""The workflow as users drive it: snakemake (local and Slurm), reruns, grids, and MLflow's server and UI."""

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml

from workflow_helpers import BIN, ENV, REPO, edit_yaml, planned, project_copy, snakemake

pytestmark = pytest.mark.slow  # end-to-end: in the full suite (CI), not in `-m "not slow"`


def slurm_available() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0


def site_profile(root) -> None:
    """The site profile as a user makes it: a copy of the example with this cluster's partition and account."""
    site = root / "workflow/profiles/slurm-site.example/config.yaml"
    text = site.read_text().replace("slurm_partition: cpu ", "slurm_partition: debug ")
    text = text.replace("slurm_partition: gpu ", "slurm_partition: debug ").replace("mylab", "local")
    (root / "slurm-site").mkdir()
    (root / "slurm-site/config.yaml").write_text(text)


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory):
    """config/test.yaml's whole DAG in a fresh copy of the project: `snakemake --profile <site> all` where a
    Slurm cluster answers (CI starts one), else `snakemake --cores 2 all`. One end-to-end run serves every test
    of a finished run; test_slurm_profile_runs_the_dag_under_slurm checks what Slurm recorded of it."""
    root = project_copy(tmp_path_factory.mktemp("dag") / "pixelgen")
    if slurm_available():
        site_profile(root)
        (root / "slurm-started").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        result = snakemake(root, "--profile", "slurm-site", "all", "--configfile", "config/test.yaml", timeout=3000)
    else:
        result = snakemake(root, "--cores", "2", "all", "--configfile", "config/test.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


@pytest.fixture
def finished(dag_run, tmp_path):
    """A copy of the finished local run (outputs, mtimes, Snakemake's metadata), to change settings in."""
    root = tmp_path / "finished"
    shutil.copytree(dag_run, root, symlinks=True)
    assert planned(root) == {}
    return root


DOWNSTREAM_OF_SAMPLES = {"score": 2, "report": 1, "all": 1}


def test_a_changed_model_setting_retrains_exactly_that_variant(finished):
    # a variant's model setting (the grid) ...
    edit_yaml(finished / "config/grids/demo.yaml",
              lambda g: g["variants"]["pixelgen"].update(set=["loss.gate=0.5"]))
    assert planned(finished) == {"train": 1, "sample_reset": 1, "sample_part": 2, "sample_gather": 1, "score": 1, "report": 1,
                                 "all": 1}


def test_editing_the_model_config_file_retrains(finished):
    # ... and the model config file itself, edited in place (which used to give "Nothing to be done")
    edit_yaml(finished / "config/pixelgen/demo.yaml", lambda c: c["loss"].update(repa_weight=0.25))
    assert planned(finished) == {"train": 2, "sample_reset": 2, "sample_part": 4, "sample_gather": 2,
                                 **DOWNSTREAM_OF_SAMPLES}


@pytest.mark.parametrize("key, value", [("shard_size", 20), ("format", "npy")])
def test_a_changed_data_setting_reshards_and_retrains(finished, key, value):
    edit_yaml(finished / "config/test.yaml", lambda c: c["dataset"].update({key: value}))
    assert planned(finished) == {"shard": 1, "ref_stats": 1, "train": 2, "sample_reset": 2, "sample_part": 4,
                                 "sample_gather": 2,
                                 **DOWNSTREAM_OF_SAMPLES}


def test_a_changed_sampling_setting_resamples_without_retraining(finished):
    edit_yaml(finished / "config/pixelgen/demo.yaml", lambda c: c["sampling"].update(shift=1.5))
    assert planned(finished) == {"sample_reset": 2, "sample_part": 4, "sample_gather": 2, **DOWNSTREAM_OF_SAMPLES}
    # the number of samples is the workflow's sample section: the same rules
    edit_yaml(finished / "config/test.yaml", lambda c: c["sample"].update(num=30))
    assert planned(finished) == {"sample_reset": 2, "sample_part": 4, "sample_gather": 2, **DOWNSTREAM_OF_SAMPLES}


def test_variants_share_a_training_run_only_when_their_training_is_identical(finished):
    # a and b differ in sampling only: one run; c differs in train.steps (a setting a run may resume with, so it
    # is not in the run key): a run of its own all the same; d trains differently
    (finished / "config/grids/share.yaml").write_text(yaml.safe_dump({"variants": {
        "a": {"set": ["sampling.steps=3"]}, "b": {"set": ["sampling.sampler=heun"]},
        "c": {"set": ["train.steps=6"]}, "d": {"set": ["loss.gate=0.5"]}}}))
    edit_yaml(finished / "config/test.yaml", lambda c: c.update(variants="config/grids/share.yaml", grid="share"))
    jobs = planned(finished)
    assert jobs["train"] == 3 and jobs["sample_reset"] == 4 and jobs["score"] == 4


def test_dag_run_produces_the_results(dag_run):
    results = dag_run / "results/ci"
    table = (results / "table.md").read_text()
    assert "baseline" in table and "pixelgen" in table and "23.67" in table and "random" in table
    for name in ("table.csv", "loss_curves.png", "fid_recall.png", "gate_weights.png", "samples/baseline.png", "samples/pixelgen.png",
                 "metrics/baseline.json", "metrics/pixelgen.json"):
        assert (results / name).stat().st_size > 0, name
    metrics = json.loads((results / "metrics/pixelgen.json").read_text())
    assert metrics["num_samples"] == 20 and metrics["weights"] == "random" and metrics["sfid"] > 0
    assert metrics["fid_sqrt"] == "eigh"  # config/test.yaml's faster trace reached the score rule
    import pandas as pd

    csv = pd.read_csv(results / "table.csv").set_index("variant")
    assert "sFID" in table and csv.loc["pixelgen", "sFID"] == pytest.approx(metrics["sfid"])
    # a job's log is readable progress, not one line at the end: timestamped lines from training, sampling, scoring
    logs = dag_run / "work/logs/ci"
    stamped = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", re.M)
    for kind in ("train", "sample", "score"):
        texts = [log.read_text() for log in (logs / kind).glob("*.log")]
        assert texts and any(stamped.search(text) for text in texts), kind
    # rerunning `all` finds nothing to do
    again = snakemake(dag_run, "--cores", "2", "all", "--configfile", "config/test.yaml")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_a_failed_training_job_resumes_and_new_weights_under_the_same_key_are_resampled(finished):
    """Two repairs in one rerun (each checked in the plan first): the pixelgen variant's training job died after
    its last checkpoint, and the baseline retrained onto the same run key with other weights."""
    import torch

    from pixelgen.sample_job import weights_digest

    # a retrain that lands on the same run key with other weights (new data behind the same shard folder, a
    # non-deterministic GPU rerun): the old sample folder must neither block the parts nor be scored again
    ema = next((finished / "work/runs/ci/baseline").glob("*/checkpoints/final_ema.pt"))
    state = torch.load(ema, map_location="cpu", weights_only=False)
    for tensor in state["ema"]["shadow"].values():
        if tensor.is_floating_point():
            tensor.add_(0.01)
    torch.save(state, ema)
    assert planned(finished) == {"sample_reset": 1, "sample_part": 2, "sample_gather": 1, "score": 1, "report": 1,
                                 "all": 1}

    # as if the pixelgen variant's training job had died after its last checkpoint: no final checkpoints, nothing
    # downstream
    [run] = (finished / "work/runs/ci/pixelgen").iterdir()  # the run dir is keyed by the resolved config
    (run / "checkpoints/final.pt").unlink()
    (run / "checkpoints/final_ema.pt").unlink()
    shutil.rmtree(finished / "work/samples/ci/pixelgen")
    (finished / "results/ci/metrics/pixelgen.json").unlink()
    logged_steps = (run / "metrics.jsonl").read_text().count("\n")
    result = snakemake(finished, "--cores", "2", "all", "--configfile", "config/test.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rule train" in result.stdout + result.stderr  # the job did run again ...
    assert torch.load(run / "checkpoints/final.pt", weights_only=False)["step"] == 4
    # ... but from last.pt (step 4): no step was trained twice
    assert (run / "metrics.jsonl").read_text().count("\n") == logged_steps
    assert (finished / "results/ci/metrics/pixelgen.json").exists()
    baseline = json.loads((finished / "results/ci/metrics/baseline.json").read_text())
    assert baseline["sampling"]["ckpt_digest"] == weights_digest(state)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_server_shows_parent_child_runs_metrics_and_a_screenshot(dag_run, tmp_path):
    port = free_port()
    db = dag_run / "results/mlflow.db"
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=dag_run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        experiment = get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ci")["experiment"]
        runs = get_json(f"{base}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert {"workflow-ci", "baseline", "pixelgen"} <= set(by_name)
        parent_id = by_name["workflow-ci"]["info"]["run_id"]
        for variant in ("baseline", "pixelgen"):
            run = by_name[variant]
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert tags["mlflow.parentRunId"] == parent_id and tags["weights"] == "random"
            assert {"loss/fm", "loss/loss", "eval/fid", "eval/recall", "eval/precision"} <= set(metrics)
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium:  # .ci/run installs Debian's chromium; a person can look at the PNGs
            pages = {"mlflow-ui-runs.png": f"#/experiments/{experiment['experiment_id']}/runs",
                     "mlflow-ui-run.png": f"#/experiments/{experiment['experiment_id']}/runs/"
                                          f"{by_name['pixelgen']['info']['run_id']}/model-metrics"}
            for name, page in pages.items():
                shot = REPO / "results" / name
                shot.parent.mkdir(exist_ok=True)
                subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                "--disable-sync", f"--user-data-dir={tmp_path / name}", "--window-size=1400,1000",
                                "--virtual-time-budget=20000", f"--screenshot={shot}", f"{base}/{page}"],
                               capture_output=True, timeout=120)
                assert shot.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_available(), reason="no Slurm cluster (.ci/run starts a local one)")
def test_slurm_profile_runs_the_dag_under_slurm(dag_run):
    started = (dag_run / "slurm-started").read_text()
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-S", started, "-o", "JobID,Comment,State,Account,WorkDir"],
                           capture_output=True, text=True).stdout.strip().splitlines()
    jobs = [line.split("|") for line in sacct if line.split("|")[4] == str(dag_run)]  # this run's, not others'
    # the plugin puts the rule (and wildcards) in the job comment: rule_train_wildcards_pixelgen
    rules = {comment.split("_wildcards")[0] for _, comment, state, _, _ in jobs if state == "COMPLETED"}
    # every non-local rule ran as a Slurm job: demo_data, shard, ref_stats, 2 train, the 4 sampling parts (group
    # `sample`, up to 4 parts a job: group_components), 2 gather, 2 score
    assert {"rule_demo_data", "rule_shard", "rule_ref_stats", "rule_train", "rule_score"} <= rules
    assert rules & {"rule_sample", "rule_sample_part"}
    assert len([j for j in jobs if j[2] == "COMPLETED"]) >= 10 and all(j[3] == "local" for j in jobs)
    # the results the other tests check were made by those jobs
    assert (dag_run / "results/ci/table.md").exists()


def test_snakemake_html_report(dag_run):
    result = snakemake(dag_run, "--report", "results/ci/report.html", "--configfile", "config/test.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    html = (dag_run / "results/ci/report.html").read_text(errors="ignore")
    assert len(html) > 100_000 and "table.md" in html and "loss_curves.png" in html
