"""The promises of training and config when something goes wrong (issue 12, "Nothing silently wrong").

Each test is one promise: a fault the user can cause (a changed config, a second job, a number spelled 1e-4, a
fresh tracking store, a full disk, a non-finite loss, weights from elsewhere) either works or is refused with one
line naming the thing and the fix, exits non-zero, and loses no work.
"""

import builtins
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from jobs_helpers import fast_config, make_shards, pixelgen
from pixelgen import train
from pixelgen.config import apply_overrides, base_config, load_config
from pixelgen.errors import ConfigError, PixelgenError
from pixelgen.locks import exclusive_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("faults"))


@pytest.fixture()
def setup(tmp_path, shards):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return tmp_path, fast_config(tmp_path / "config.yaml", shards, uri)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if " INFO " not in line]  # MLflow's own store notices
    assert len(lines) == 1, stderr
    return lines[0]


def finished_run(setup, name="run", *overrides):
    tmp, config_path = setup
    config = load_config(config_path, overrides)
    train.train(config, tmp / name, progress=False)
    return tmp / name, config


# --- 3: a finished run dir rerun with another config ----------------------------------------------------------

def test_a_finished_run_rerun_with_another_config_is_refused_not_called_done(setup):
    run, _ = finished_run(setup)
    before = torch.load(run / "checkpoints/final.pt", weights_only=False)["model"]
    result = pixelgen("train", "--config", str(setup[1]), "--run-dir", str(run), "--quiet", "--set", "train.lr=0.001")
    line = one_line(result.stderr)
    assert result.returncode == 1 and "train.lr" in line and "--init-from" in line and "done" not in line
    after = torch.load(run / "checkpoints/final.pt", weights_only=False)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_finished_run_rerun_with_the_same_config_is_still_done(setup):
    run, config = finished_run(setup)
    assert train.train(config, run, progress=False) == run / "checkpoints/final.pt"


# --- 4: one train per run dir ---------------------------------------------------------------------------------

def test_a_second_train_on_the_same_run_dir_is_refused(setup):
    tmp, config = setup
    run = tmp / "busy"
    with exclusive_folder(run, "pixelgen train"):  # as a running job holds it
        result = pixelgen("train", "--config", str(config), "--run-dir", str(run), "--quiet")
    line = one_line(result.stderr)
    assert result.returncode != 0 and str(run) in line and "in use" in line
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_a_lock_left_by_a_killed_train_does_not_block_the_next(setup):
    tmp, config_path = setup
    run = tmp / "killed"
    code = ("import os, sys; from pixelgen.locks import exclusive_folder\n"
            "with exclusive_folder(sys.argv[1], 'pixelgen train'):\n    os.kill(os.getpid(), 9)\n")
    assert subprocess.run([sys.executable, "-c", code, str(run)]).returncode == -9
    train.train(load_config(config_path), run, progress=False)
    assert (run / "checkpoints/final.pt").exists()


def test_a_resumed_run_logs_each_step_once_in_metrics_jsonl(setup):
    tmp, config_path = setup
    run = tmp / "relogged"
    config = load_config(config_path, ["train.log_every=1"])
    with pytest.raises(train.Preempted):
        train.train(config, run, stop_at_step=3, progress=False)
    with open(run / "metrics.jsonl", "a") as log:  # a killed job logged step 4 after its last checkpoint (3)
        log.write(json.dumps({"step": 4, "loss/loss": 1.0}) + "\n")
    train.train(config, run, progress=False)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# --- 10: numbers as people write them -------------------------------------------------------------------------

SPELLINGS = [("1e-4", 1e-4), ("1E-4", 1e-4), ("3.e-4", 3e-4), ("3.0e-4", 3e-4), (".5", 0.5), ("+1e-4", 1e-4),
             ("1_000.0", 1000.0), ("2", 2.0), ("0.0003", 3e-4)]


@pytest.mark.parametrize("text, value", SPELLINGS)
def test_a_float_is_accepted_in_every_spelling_with_set(text, value):
    assert apply_overrides(base_config(), [f"train.lr={text}"])["train"]["lr"] == value


@pytest.mark.parametrize("text, value", SPELLINGS)
def test_a_float_is_accepted_in_every_spelling_in_a_yaml_file(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text}\n  grad_clip: {text}\n")  # (betas must lie in [0, 1): not 1_000.0)
    config = load_config(path)
    assert config["train"]["lr"] == value and config["train"]["grad_clip"] == value


def test_a_nullable_float_and_a_whole_number_in_exponent_form_are_accepted():
    config = apply_overrides(base_config(), ["model.proj_dropout=1e-1", "train.steps=4e5"])
    assert config["model"]["proj_dropout"] == 0.1
    assert config["train"]["steps"] == 400000 and isinstance(config["train"]["steps"], int)


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "inf", "1e999"])
def test_a_non_finite_number_is_refused_naming_the_key(text):
    with pytest.raises(ConfigError, match="train.lr"):
        apply_overrides(base_config(), [f"train.lr={text}"])


def test_a_fractional_number_for_a_whole_number_key_is_still_refused():
    with pytest.raises(ConfigError, match="train.steps"):
        apply_overrides(base_config(), ["train.steps=2.5e0"])


def test_text_that_looks_like_a_number_stays_text_where_text_is_wanted():
    config = apply_overrides(base_config(), ["tracking.variant=lr1e-4"])
    assert config["tracking"]["variant"] == "lr1e-4"


def test_the_cli_takes_lr_3e_4():
    result = pixelgen("config", "--set", "train.lr=3e-4")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["train"]["lr"] == 3e-4


# --- 11: a fresh MLflow store created by several jobs at once -------------------------------------------------

RACE = """
import sys, time
from pathlib import Path
from pixelgen.tracking import Tracker
import mlflow.store.tracking.sqlalchemy_store  # the slow imports before the start line
uri, folder, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
(folder / f"ready-{me}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
cfg = {'enabled': True, 'uri': uri, 'experiment': 'race', 'grid': None, 'variant': None,
       'parent_run_id': None, 'system_metrics': False}
t = Tracker(cfg)
t.start(f"job{me}", {"me": me}, {})
t.end()
"""


def test_jobs_creating_a_fresh_mlflow_store_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"  # its folder does not exist yet either
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, uri, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(4)]
    deadline = time.time() + 240
    while len(list(tmp_path.glob("ready-*"))) < 4 and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    from mlflow import MlflowClient

    runs = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("race").experiment_id])
    assert len(runs) == 4


# --- 12: a full disk ------------------------------------------------------------------------------------------

def full_disk_for(monkeypatch, name: str) -> None:
    """Writes to files whose name contains `name` fail as on a full disk."""
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if name in str(path) and any(m in mode for m in "wa") else f

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_keeps_last_pt_and_leaves_no_temp(setup):
    tmp, config = setup
    run = tmp / "full"
    assert pixelgen("train", "--config", str(config), "--run-dir", str(run), "--quiet",
                    "--stop-at-step", "2").returncode == 143
    script = ("import builtins, errno, sys\nreal = builtins.open\n"
              "class Full:\n"
              "    def __init__(self, f): self.f = f\n"
              "    def write(self, b): raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "    def __getattr__(self, a): return getattr(self.f, a)\n"
              "    def __enter__(self): return self\n"
              "    def __exit__(self, *e): self.f.close()\n"
              "def fake(p, mode='r', *a, **k):\n"
              "    f = real(p, mode, *a, **k)\n"
              "    return Full(f) if 'last.pt' in str(p) and 'w' in mode else f\n"
              "builtins.open = fake\n"
              "from pixelgen.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", script, "train", "--config", str(config), "--run-dir", str(run),
                             "--quiet"], capture_output=True, text=True)
    line = one_line(result.stderr)
    assert result.returncode == 1 and "no space left on device writing" in line and "last.pt" in line
    assert torch.load(run / "checkpoints/last.pt", weights_only=False)["step"] == 2
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name]


def test_a_full_disk_while_logging_metrics_is_a_one_line_error(setup, monkeypatch):
    tmp, config = setup
    full_disk_for(monkeypatch, "metrics.jsonl")
    with pytest.raises(PixelgenError, match="no space left on device writing .*metrics.jsonl"):
        train.train(load_config(config), tmp / "full-log", progress=False)


def test_temp_files_of_killed_jobs_are_removed_when_training_starts(setup):
    tmp, config = setup
    run = tmp / "stale"
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = [run / f".config.yaml.tmp-{dead}", run / "checkpoints" / f".last.pt.tmp-{dead}",
             run / "previews" / f".final.png.tmp-{dead}"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    train.train(load_config(config), run, progress=False)
    assert not any(path.exists() for path in stale)


def test_an_ema_export_that_cannot_be_written_leaves_no_temp_file(tmp_path):
    from pixelgen.model import JiT, JiTConfig
    from pixelgen.tracking import export_ema

    net = JiT(JiTConfig(depth=2, width=32, heads=2, bottleneck=None, in_context_len=0, patch_size=8, image_size=16,
                        num_classes=3))
    target = tmp_path / "ema.safetensors"
    target.mkdir()  # the rename onto it fails
    with pytest.raises(OSError):
        export_ema(net, target)
    assert list(tmp_path.iterdir()) == [target] and not list(target.iterdir())


# --- 13: non-finite numbers -----------------------------------------------------------------------------------

def nan_at(monkeypatch, call: int):
    from pixelgen import flow

    calls = {"n": 0}
    real = flow.velocity_loss

    def poisoned(v_hat, v):
        calls["n"] += 1
        out = real(v_hat, v)
        return out * float("nan") if calls["n"] == call else out

    monkeypatch.setattr(flow, "velocity_loss", poisoned)


def test_a_nan_before_any_checkpoint_says_nothing_was_saved(setup, monkeypatch):
    tmp, config = setup
    nan_at(monkeypatch, 1)
    with pytest.raises(PixelgenError) as err:
        train.train(load_config(config), tmp / "nan", progress=False)
    message = str(err.value)
    assert "step 1" in message and "no checkpoint" in message and "keeps" not in message
    assert not (tmp / "nan/checkpoints/last.pt").exists()


def test_a_nan_after_a_checkpoint_names_the_step_last_pt_holds(setup, monkeypatch):
    tmp, config = setup
    nan_at(monkeypatch, 4)
    with pytest.raises(PixelgenError) as err:
        train.train(load_config(config), tmp / "nan2", progress=False)
    assert "last.pt" in str(err.value) and "step 2" in str(err.value) and "--init-from" in str(err.value)


def test_weights_that_became_non_finite_are_never_saved(setup, monkeypatch):
    tmp, config = setup
    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        poisoning_step.calls += 1
        if poisoning_step.calls == 4:  # the update of step 4 makes a weight infinite; last.pt is due at step 4
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    poisoning_step.calls = 0
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(PixelgenError, match="non-finite weights at step 4") as err:
        train.train(load_config(config), tmp / "inf", progress=False)
    assert "step 2" in str(err.value)
    saved = torch.load(tmp / "inf/checkpoints/last.pt", weights_only=False)
    assert saved["step"] == 2 and all(v.isfinite().all() for v in saved["model"].values() if v.is_floating_point())


# --- 15: starting from given weights --------------------------------------------------------------------------

@pytest.mark.slow
def test_init_from_a_training_checkpoint_starts_a_new_run_from_its_weights(setup):
    source, config = finished_run(setup, "source")
    tmp = setup[0]
    result = pixelgen("train", "--config", str(setup[1]), "--run-dir", str(tmp / "tuned"), "--quiet",
                      "--init-from", str(source / "checkpoints/final.pt"), "--stop-at-step", "1",
                      "--set", "train.lr=0")
    assert result.returncode == 143, result.stderr
    src = torch.load(source / "checkpoints/final.pt", weights_only=False)
    new = torch.load(tmp / "tuned/checkpoints/last.pt", weights_only=False)
    assert new["step"] == 1  # a new run: step, optimizer and data start over
    assert all(torch.equal(src["model"][k], new["model"][k]) for k in src["model"])  # lr 0: the weights as given
    assert new["init_from"]["path"] == str((source / "checkpoints/final.pt").resolve())
    assert new["init_from"]["sha256"] == checkpoint_digest(source / "checkpoints/final.pt")


def checkpoint_digest(path):
    from pixelgen.files import sha256

    return sha256(path)


@pytest.mark.slow
def test_init_from_an_ema_export_or_an_imported_checkpoint_takes_its_ema_network(setup):
    source, config = finished_run(setup, "source")
    tmp = setup[0]
    ema = torch.load(source / "checkpoints/final_ema.pt", weights_only=False)
    shadow = ema["ema"]["shadow"]
    imported = {"model": {f"net.{k}": v for k, v in shadow.items()}, "ema": {"shadow": shadow}, "step": 0,
                "config": ema["config"], "source": {"official": "x.ckpt"}}  # what import-official writes
    torch.save(imported, tmp / "imported.pt")
    for name, path in (("from-ema", source / "checkpoints/final_ema.pt"), ("from-import", tmp / "imported.pt")):
        with pytest.raises(train.Preempted):
            train.train(load_config(setup[1], ["train.lr=0"]), tmp / name, stop_at_step=1, progress=False,
                        init_from=path)
        new = torch.load(tmp / name / "checkpoints/last.pt", weights_only=False)
        assert all(torch.equal(shadow[k], new["model"][f"net.{k}"]) for k in shadow)
        assert all(torch.equal(shadow[k], new["ema"]["shadow"][k]) for k in shadow)


def test_init_from_another_architecture_is_refused_naming_the_first_mismatch(setup):
    source, _ = finished_run(setup, "source")
    tmp, config = setup
    result = pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "wide"), "--quiet",
                      "--init-from", str(source / "checkpoints/final.pt"), "--set", "model.patch_size=4")
    line = one_line(result.stderr)
    assert result.returncode == 1 and "final.pt" in line and "net." in line and "shape" in line
    assert not (tmp / "wide/checkpoints/last.pt").exists()


def test_init_from_a_missing_file_is_one_line(setup):
    tmp, config = setup
    result = pixelgen("train", "--config", str(config), "--run-dir", str(tmp / "x"), "--quiet",
                      "--init-from", str(tmp / "nope.pt"))
    assert result.returncode == 1 and "nope.pt" in one_line(result.stderr)


def test_a_rerun_with_another_init_from_is_refused_and_the_same_one_resumes(setup):
    source, _ = finished_run(setup, "source")
    tmp, config_path = setup
    config = load_config(config_path)
    with pytest.raises(train.Preempted):
        train.train(config, tmp / "tuned", stop_at_step=2, progress=False, init_from=source / "checkpoints/final.pt")
    with pytest.raises(PixelgenError, match="--init-from"):
        train.train(config, tmp / "tuned", progress=False, init_from=source / "checkpoints/final_ema.pt")
    train.train(config, tmp / "tuned", progress=False, init_from=source / "checkpoints/final.pt")
    assert torch.load(tmp / "tuned/checkpoints/final.pt", weights_only=False)["step"] == 6


def test_init_from_on_a_run_dir_with_its_own_checkpoint_is_refused(setup):
    source, config = finished_run(setup, "source")
    tmp = setup[0]
    with pytest.raises(PixelgenError, match="new --run-dir"):
        train.train(config, source, progress=False, init_from=source / "checkpoints/final.pt")


def test_the_init_source_is_an_mlflow_param(setup):
    source, _ = finished_run(setup, "source")
    tmp, config_path = setup
    train.train(load_config(config_path), tmp / "tuned", progress=False, init_from=source / "checkpoints/final.pt")
    from mlflow import MlflowClient

    uri = load_config(config_path)["tracking"]["uri"]
    run = MlflowClient(tracking_uri=uri).get_run((tmp / "tuned/mlflow_run_id").read_text().strip())
    assert run.data.params["init_from.path"] == str((source / "checkpoints/final.pt").resolve())
    assert run.data.params["init_from.sha256"] == checkpoint_digest(source / "checkpoints/final.pt")


def test_sigterm_stops_training_even_when_no_step_boundary_comes():
    """A hung data read must not make a job deaf to SIGTERM: the grace period ends it, a second SIGTERM at once."""
    from pixelgen.train import Preempted, SigtermFlag

    before = signal.getsignal(signal.SIGTERM)
    for second_signal, grace in ((False, 0.3), (True, 60.0)):
        start = time.monotonic()
        with pytest.raises(Preempted, match="without saving"):
            with SigtermFlag(grace_s=grace) as flag:
                os.kill(os.getpid(), signal.SIGTERM)
                assert flag.raised
                if second_signal:
                    os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # stands for a step that never ends
        assert time.monotonic() - start < 5
    assert signal.getsignal(signal.SIGTERM) == before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
