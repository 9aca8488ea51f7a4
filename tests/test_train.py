import io
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from jobs_helpers import fast_config, make_shards, pixelgen
from pixelgen.config import load_config
from pixelgen.errors import PixelgenError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("train"))


@pytest.fixture()
def setup(tmp_path, shards):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return tmp_path, fast_config(tmp_path / "config.yaml", shards, uri), uri


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not states_equal(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical_to_an_uninterrupted_run(setup):
    tmp, config, _ = setup
    full = pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "full"), "--quiet")
    assert full.returncode == 0, full.stderr
    assert "train step" not in full.stderr  # --quiet: no progress output at all
    stopped = pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "resumed"), "--quiet",
                       "--stop-at-step", "3")
    assert stopped.returncode == 143 and "rerun" in stopped.stderr
    assert torch.load(tmp / "resumed/checkpoints/last.pt", weights_only=False)["step"] == 3
    assert not (tmp / "resumed/checkpoints/final.pt").exists()
    resumed = pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "resumed"), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp / "full/checkpoints/final.pt", weights_only=False)
    b = torch.load(tmp / "resumed/checkpoints/final.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"]["shadow"], b["ema"]["shadow"])
    assert any(k.startswith("projector.") for k in a["model"])  # the REPA projector lives in the same module
    assert a["data"] == b["data"] and a["perceptual_weight"] == b["perceptual_weight"]
    # and training did move the weights
    w = a["model"]["net.final.linear.weight"]
    assert not torch.equal(w, torch.zeros_like(w))
    # rerunning a finished run does nothing
    again = pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "full"), "--quiet")
    assert again.returncode == 0 and "training is done" in again.stderr


def test_checkpoint_holds_everything_for_a_resume(setup):
    tmp, config, _ = setup
    assert pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "r"), "--quiet",
                    "--set", "train.steps=2").returncode == 0
    ckpt = torch.load(tmp / "r/checkpoints/last.pt", weights_only=False)
    assert {"model", "ema", "optimizer", "step", "rng", "perceptual_weight", "rank_fingerprints", "data",
            "config"} <= set(ckpt)
    assert {k.split(".")[0] for k in ckpt["model"]} == {"net", "projector"}
    assert {"python", "numpy", "torch", "generator"} <= set(ckpt["rng"][0])
    assert ckpt["data"]["batches_consumed"] == 2 and ckpt["config"]["train"]["steps"] == 2
    assert (tmp / "r/config.yaml").exists() and (tmp / "r/previews/final.png").exists()
    assert not list((tmp / "r/checkpoints").glob(".*tmp*"))  # atomic writes leave no temp files


PROGRESS_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) train step (\d+): loss \d+\.\d{4} "
                           r"fm \d+\.\d{4} img/s \d+\.\d, \d+/6 steps, \d+\.\d step/s, eta \d+:\d\d:\d\d$")


def test_a_log_file_gets_a_timestamped_progress_line_every_log_every_steps(setup):
    tmp, config, _ = setup
    result = pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "r"))  # stderr is a pipe, as in Slurm
    assert result.returncode == 0, result.stderr
    lines = [m for m in map(PROGRESS_LINE.match, result.stderr.splitlines()) if m]
    assert [int(m[2]) for m in lines] == [2, 4, 6], result.stderr  # train.log_every=2, train.steps=6
    stamps = [datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S") for m in lines]
    assert stamps == sorted(stamps)
    assert "\r" not in result.stderr and "it/s" not in result.stderr  # no tqdm bar


def test_a_terminal_gets_the_bar_and_disabled_progress_prints_nothing():
    from pixelgen.train import TrainProgress as Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terms = {"loss": 0.5, "fm": 0.25}
    terminal, log = Terminal(), io.StringIO()
    with Progress(4, 0, enabled=True, stream=terminal) as progress:
        progress.advance()
        progress.log(1, terms, 10.0)
    assert "train" in terminal.getvalue() and "train step" not in terminal.getvalue()
    with Progress(4, 0, enabled=False, stream=log) as progress:
        progress.advance()
        progress.log(1, terms, 10.0)
    assert log.getvalue() == ""


def test_final_ema_holds_what_sampling_reads_and_is_much_smaller(setup):
    tmp, config_path, _ = setup
    from pixelgen import train
    from pixelgen.sample_job import load_ema_model

    checkpoints = tmp / "r/checkpoints"
    stale = checkpoints / ".last.pt.tmp-999999999"  # left by a killed process (no such pid can run)
    checkpoints.mkdir(parents=True)
    stale.write_bytes(b"torn")
    config = load_config(config_path, ["train.steps=2"])
    train.train(config, tmp / "r", progress=False)
    assert not stale.exists()
    from_final, _ = load_ema_model(checkpoints / "final.pt")
    from_export, export = load_ema_model(checkpoints / "final_ema.pt")
    assert states_equal(from_final.state_dict(), from_export.state_dict())
    assert set(export) == {"ema", "config", "step", "encoders_real", "init_from"} and set(export["ema"]) == {"shadow"}
    assert export["init_from"] is None  # a run from scratch
    assert export["step"] == 2 and export["config"] == config
    assert (checkpoints / "final_ema.pt").stat().st_size < (checkpoints / "final.pt").stat().st_size / 3
    # rerunning a finished run writes the export if it is missing (runs finished before it existed)
    (checkpoints / "final_ema.pt").unlink()
    train.train(config, tmp / "r", progress=False)
    assert states_equal(torch.load(checkpoints / "final_ema.pt", weights_only=False)["ema"], export["ema"])


def test_resume_with_another_config_is_refused(setup):
    tmp, config, _ = setup
    assert pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "r"), "--quiet",
                    "--stop-at-step", "2").returncode == 143
    result = pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "r"), "--quiet",
                      "--set", "train.lr=0.001")
    assert result.returncode == 1 and "train.lr" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_saves_and_a_rerun_resumes(setup):
    tmp, config, _ = setup
    run = tmp / "preempted"
    proc = subprocess.Popen([sys.executable, "-m", "pixelgen.cli", "train", "--config", str(config),
                             "--run-dir", str(run), "--quiet", "--set", "train.steps=400",
                             "--set", "train.ckpt_every=1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "mlflow_run_id").exists():
        time.sleep(0.2)
    time.sleep(3)  # let it take a few steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err
    step = torch.load(run / "checkpoints/last.pt", weights_only=False)["step"]
    assert 0 < step < 400
    resumed = pixelgen("train", "--config", str(config), "--run-dir", str(run), "--quiet",
                       "--set", f"train.steps={step + 2}", "--set", "train.ckpt_every=1000")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run / "checkpoints/final.pt", weights_only=False)["step"] == step + 2


def test_nan_loss_stops_with_the_step_and_term_and_keeps_the_last_good_state(setup, monkeypatch):
    tmp, config_path, _ = setup
    from pixelgen import flow, train

    calls = {"n": 0}
    real = flow.velocity_loss

    def poisoned(v_hat, v):
        calls["n"] += 1
        out = real(v_hat, v)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(flow, "velocity_loss", poisoned)
    config = load_config(config_path)
    with pytest.raises(PixelgenError) as err:
        train.train(config, tmp / "nan", progress=False)
    message = str(err.value)
    assert "step 5" in message and "fm" in message and "step 4" in message
    assert torch.load(tmp / "nan/checkpoints/last.pt", weights_only=False)["step"] == 4


@pytest.mark.slow
def test_training_is_logged_to_mlflow(setup):
    tmp, config, uri = setup
    assert pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "logged"), "--quiet",
                    "--set", "tracking.variant=pixelgen", "--set", "tracking.grid=unit").returncode == 0
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run((tmp / "logged/mlflow_run_id").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == "pixelgen"
    assert run.data.tags["weights"] == "random" and run.data.tags["variant"] == "pixelgen"
    assert "git_commit" in run.data.tags
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    assert run.data.params["loss.gate"] == "0.3" and run.data.params["train.steps"] == "6"
    history = client.get_metric_history(run.info.run_id, "loss/fm")
    assert [m.step for m in history] == [2, 4, 6]
    for key in ("loss/loss", "loss/repa", "loss/lpips", "loss/pdino", "loss/gated_fraction", "images_per_sec"):
        assert key in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "previews" in artifacts
    assert "previews/final.png" in {a.path for a in client.list_artifacts(run.info.run_id, "previews")}


@pytest.mark.slow
def test_concurrent_jobs_lose_no_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    script = (
        "import sys\n"
        "from pixelgen.tracking import Tracker\n"
        "cfg = {'enabled': True, 'uri': sys.argv[1], 'experiment': 'stress', 'grid': None, 'variant': None,"
        " 'parent_run_id': None, 'system_metrics': False}\n"
        "t = Tracker(cfg)\n"
        "t.start(f'job{sys.argv[2]}', {'job': sys.argv[2]}, {})\n"
        "for step in range(60):\n"
        "    t.log_metrics({'a': step, 'b': -step}, step)\n"
        "t.end()\n"
        "print(t.run_id)\n"
    )
    # create the schema once, as the workflow's first job does, then hammer it from 6 processes at once
    subprocess.run([sys.executable, "-c", script, uri, "init"], check=True, capture_output=True)
    procs = [subprocess.Popen([sys.executable, "-c", script, uri, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(6)]
    run_ids = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        run_ids.append(out.strip().splitlines()[-1])
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for run_id in run_ids:
        for key in ("a", "b"):
            assert len(client.get_metric_history(run_id, key)) == 60


def torchrun_train(config, run_dir, port, *extra):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "pixelgen.cli",
                           "train", "--config", str(config), "--run-dir", str(run_dir), "--quiet", *extra],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_ddp_ranks_hold_one_model_and_projector_and_resume_bit_identically(setup):
    from pixelgen.checkpoint import fingerprint
    from pixelgen.denoiser import build_denoiser

    tmp, config, _ = setup
    full = torchrun_train(config, tmp / "ddp", 29517, "--set", "train.steps=4")
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt = torch.load(tmp / "ddp/checkpoints/final.pt", weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2  # both ranks' RNG saved for an exact resume
    assert ckpt["data"]["world_size"] == 2
    # every rank's denoiser (network + REPA projector) was identical when saved, and the file is that model
    denoiser = build_denoiser(ckpt["config"], ckpt["model"]["projector.4.weight"].shape[0])
    denoiser.load_state_dict(ckpt["model"])
    assert ckpt["rank_fingerprints"][0] == ckpt["rank_fingerprints"][1] == fingerprint(denoiser)

    stopped = torchrun_train(config, tmp / "ddp-resumed", 29518, "--set", "train.steps=4", "--stop-at-step", "2")
    assert stopped.returncode != 0 and (tmp / "ddp-resumed/checkpoints/last.pt").exists()
    resumed = torchrun_train(config, tmp / "ddp-resumed", 29519, "--set", "train.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = torch.load(tmp / "ddp-resumed/checkpoints/final.pt", weights_only=False)
    assert states_equal(ckpt["model"], again["model"]) and states_equal(ckpt["ema"]["shadow"], again["ema"]["shadow"])
