"""MLflow wiring: where runs go, how a job attaches to (or resumes) its run, and retries for busy stores.

Layout in the UI: an experiment per grid, a parent run per workflow run, a child run per variant.
The default store is a SQLite file under results/, with artifacts beside it, so `mlflow ui
--backend-store-uri sqlite:///results/mlflow.db` shows everything. Many jobs may log at once: SQLite answers
"database is locked" under contention, so every call retries with backoff instead of losing the metric.
A fresh SQLite store is created (its tables migrated) under a lock beside it, so jobs that start together
do not run the same migration twice.
"""

from __future__ import annotations

import fcntl
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

DEFAULT_DB = Path("results") / "mlflow.db"


def tracking_uri(configured: str | None = None) -> str:
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_DB.resolve()}"


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (results/mlartifacts); other stores choose their own."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def client_for(uri: str):
    """An MlflowClient whose store exists. MLflow creates a SQLite store's tables on first use; two jobs doing
    that at once both migrate and one dies ("table ... already exists"). So the first use of the store happens
    under an exclusive flock on `<db>.lock`: the second job waits, then finds the tables made."""
    from mlflow import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not its folder
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or by the kernel if the job dies
        client = MlflowClient(tracking_uri=uri)  # may open the store already
        with_retries(client.search_experiments, max_results=1)  # opens it if not: creates/migrates the tables
    return client


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def with_retries(fn: Callable, *args, attempts: int = 30, **kwargs) -> Any:
    """Call fn, retrying transient store errors (locked SQLite, HTTP hiccups) with jittered backoff."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # mlflow wraps sqlalchemy/HTTP errors in several types
            text = str(err).lower()
            transient = any(s in text for s in ("locked", "busy", "timed out", "connection", "unique constraint"))
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))


def experiment_id(client, name: str, uri: str) -> str:
    experiment = with_retries(client.get_experiment_by_name, name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        # the experiment kind makes MLflow 3's UI open it as model training (runs, charts), not GenAI traces
        return with_retries(client.create_experiment, name, artifact_location=artifact_root(uri),
                            tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # another job created it first
        return with_retries(client.get_experiment_by_name, name).experiment_id


class Tracker:
    """One MLflow run for one job. `enabled=False` (or a non-zero rank) makes every call a no-op."""

    def __init__(self, cfg: dict, enabled: bool = True):
        self.cfg = cfg
        self.enabled = enabled and cfg["enabled"]
        self.run_id: str | None = None
        self.client = None
        self.resumed = False

    def start(self, run_name: str, params: dict, tags: dict, resume_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        uri = tracking_uri(self.cfg["uri"])
        self.client = client_for(uri)
        if self.cfg["parent_run_id"]:
            reopen(self.client, self.cfg["parent_run_id"])
        if resume_run_id:
            self.run_id, self.resumed = resume_run_id, True
            with_retries(self.client.update_run, resume_run_id, status="RUNNING")
            return resume_run_id
        exp = experiment_id(self.client, self.cfg["grid"] or self.cfg["experiment"], uri)
        all_tags = {"mlflow.runName": run_name, "git_commit": git_commit(), **tags}
        if self.cfg["parent_run_id"]:
            all_tags["mlflow.parentRunId"] = self.cfg["parent_run_id"]
        run = with_retries(self.client.create_run, exp, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            with_retries(self.client.log_batch, self.run_id, params=items[i:i + 100])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with_retries(self.client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        if self.enabled and self.run_id is not None:
            with_retries(self.client.log_artifact, self.run_id, str(path), subdir)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled and self.run_id is not None:
            for k, v in tags.items():
                with_retries(self.client.set_tag, self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id is not None:
            with_retries(self.client.set_terminated, self.run_id, status)


class SystemMetrics:
    """MLflow's own system-metrics monitor on the tracker's run, as a context manager (the name train.py uses).

    MLflow samples CPU, memory, disk and network with psutil, and GPU utilisation, memory and power with
    pynvml (`pip install nvidia-ml-py`; without it GPU metrics are skipped, the rest still logged), into
    `system/*` metrics of the run every `interval` seconds. It is MLflow's `log_system_metrics=True` of
    `mlflow.start_run`, attached to a run made through the client. Off when tracking is off, on non-zero
    ranks, or with `tracking.system_metrics: false`; best effort: a failing monitor never stops training.
    """

    def __init__(self, tracker: Tracker, interval: float = 10.0):
        self.tracker, self.interval = tracker, interval
        self.monitor = None

    def __enter__(self):
        if not (self.tracker.enabled and self.tracker.cfg["system_metrics"] and self.tracker.run_id):
            return self
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.tracker.run_id, sampling_interval=self.interval,
                                                resume_logging=self.tracker.resumed,
                                                tracking_uri=tracking_uri(self.tracker.cfg["uri"]))
            self.monitor.start()
        except Exception as err:  # psutil missing, an odd platform: log nothing rather than fail the job
            print(f"system metrics off: {err}", file=sys.stderr)
            self.monitor = None
        return self

    def __exit__(self, *exc):
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:
                pass
        return False


def reopen(client, run_id: str) -> None:
    """Mark a finished parent RUNNING again: a rerun of the workflow nests new work under it (the report ends it)."""
    try:
        run = with_retries(client.get_run, run_id)
        if run.info.status != "RUNNING":
            with_retries(client.update_run, run_id, status="RUNNING")
    except Exception as err:  # a parent from another store, deleted: the child still logs
        print(f"MLflow parent run {run_id} not reopened: {err}", file=sys.stderr)


def start_parent_run(experiment: str, name: str, uri: str | None, out: Path) -> str:
    """The parent run of a workflow run: created once, its id kept in `out` so reruns nest under the same one."""
    if out.exists() and out.read_text().strip():
        return out.read_text().strip()
    resolved = tracking_uri(uri)
    client = client_for(resolved)
    exp = experiment_id(client, experiment, resolved)
    run = with_retries(client.create_run, exp, run_name=name, tags={"git_commit": git_commit(), "kind": "workflow"})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(run.info.run_id)
    return run.info.run_id


def log_eval_metrics(result: dict, metrics_file: Path, manifest: dict, run_id: str | None = None,
                     uri: str | None = None) -> str | None:
    """Attach `pixelgen score`'s metrics (eval/fid, ...), its weights label and metrics.json to the training run:
    `run_id`, or the one recorded in the run dir named by the sample manifest. Returns the run id, None if none."""
    run_id = run_id or training_run_id(manifest)
    if run_id is None:
        return None
    client = client_for(tracking_uri(uri or manifest.get("tracking_uri")))
    _log_scores(client, run_id, result, metrics_file)
    return run_id


EVAL_KEYS = ("fid", "sfid", "inception_score", "kid", "precision", "recall")


def training_run_id(manifest: dict) -> str | None:
    """The MLflow run of the training run a sample folder's checkpoint came from (None: imported, or untracked)."""
    id_file = Path(manifest.get("run_dir") or "") / "mlflow_run_id"
    return id_file.read_text().strip() if manifest.get("run_dir") and id_file.is_file() else None


def _log_scores(client, run_id: str, result: dict, metrics_file: Path) -> None:
    """`eval/*` at the checkpoint's step, the weights label and metrics.json, into one run."""
    from mlflow.entities import Metric  # imported only when there is a run: it takes seconds

    step = int(result["sampling"].get("ckpt_step", 0))
    now = int(time.time() * 1000)
    with_retries(client.log_batch, run_id, metrics=[Metric(f"eval/{k}", float(result[k]), now, step)
                                                    for k in EVAL_KEYS if result.get(k) is not None])
    with_retries(client.set_tag, run_id, "eval_weights", result["weights"])
    with_retries(client.log_artifact, run_id, str(metrics_file), "eval")


def eval_key(result: dict) -> str:
    """What an evaluation run holds the scores of: one sample folder, sampled from one checkpoint with one set of
    settings. The settings are the folder's settings.json (sampler, steps, guidance, seed, --num, the weights'
    digest, ...: all a `sample --reset` may change under the same path), or for an .npz, which records none,
    metrics.json's `sampling`. A digest of them, so an eval run's `sampling.*` params always name its scores."""
    import hashlib
    import json

    from . import sample_folder

    samples = Path(result["samples"]).resolve()
    recorded = samples / sample_folder.SETTINGS
    if recorded.is_file():
        settings = {k: v for k, v in json.loads(recorded.read_text()).items() if k not in sample_folder.NOT_COMPARED}
    else:
        settings = result["sampling"]
    identity = json.dumps({"samples": str(samples), "settings": settings}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def log_eval_run(result: dict, metrics_file: Path, manifest: dict, name: str, parent_run_id: str,
                 uri: str | None = None) -> str:
    """Attach `pixelgen score`'s metrics to an evaluation run of their own: a child of the workflow's parent run,
    named `name` (the grid variant), with the sampling settings as params and a tag naming the training run
    sampled (its id, if it has one). For variants that sample a run another variant trained, or an imported
    release: logging them into the training run would make several variants' FIDs one metric's history.
    The run is found again by its `eval_key` tag (a hex digest: no quoting in the search), so rescoring the
    same samples logs into it, and new weights or other sampling settings behind the same folder (a retrain
    under the same key, a `sample --reset` with another sampler) get a new run instead of joining its history."""
    from mlflow.entities import Param

    client = client_for(tracking_uri(uri))
    reopen(client, parent_run_id)
    experiment = with_retries(client.get_run, parent_run_id).info.experiment_id
    samples = str(Path(result["samples"]).resolve())
    key = eval_key(result)
    found = with_retries(client.search_runs, [experiment], filter_string=f"tags.eval_key = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {"mlflow.parentRunId": parent_run_id, "kind": "eval", "variant": name, "eval_key": key,
                "eval_samples": samples, "checkpoint": str(manifest.get("ckpt", "")), "git_commit": git_commit(),
                "train_run_id": training_run_id(manifest) or "none"}
        run_id = with_retries(client.create_run, experiment, run_name=name, tags=tags).info.run_id
        params = [Param(f"sampling.{k}", str(v)[:6000]) for k, v in result["sampling"].items()]
        with_retries(client.log_batch, run_id, params=params)
    _log_scores(client, run_id, result, metrics_file)
    with_retries(client.set_terminated, run_id, "FINISHED")
    return run_id


def log_dataset(tracker: Tracker, manifest: str | Path, name: str | None = None, context: str = "train") -> str | None:
    """Record the training shards as the run's dataset input (`mlflow.log_input`): name, source (the shard
    folder) and digest (sha256 of manifest.json, which lists every shard's sha256, so it names the data exactly;
    MLflow keeps 36 characters of a digest, so the full hash is in the profile). Returns the digest."""
    if not tracker.enabled or tracker.run_id is None:
        return None
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from .files import sha256

    manifest = Path(manifest)
    full = sha256(manifest)
    info = json.loads(manifest.read_text())
    profile = {"manifest_sha256": full, "num_samples": info.get("num_samples", info.get("total")),
               "num_shards": len(info.get("shards", [])), "resolution": info.get("resolution")}
    dataset = Dataset(name=name or manifest.parent.name, digest=full[:32], source_type="local",
                      source=json.dumps({"uri": manifest.parent.resolve().as_uri()}), profile=json.dumps(profile))
    already = with_retries(tracker.client.get_run, tracker.run_id).inputs.dataset_inputs
    if not any(d.dataset.digest == dataset.digest and d.dataset.name == dataset.name for d in already):
        with_retries(tracker.client.log_inputs, tracker.run_id,
                     [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])
    return full


def log_grid(tracker: Tracker, image: str | Path, step: int, key: str = "previews") -> None:
    """A sample grid as an MLflow image at a step (`log_image(key=..., step=...)`): the run page's image
    panel shows the grids of one key with a step slider."""
    if not tracker.enabled or tracker.run_id is None:
        return
    from PIL import Image

    with Image.open(image) as im:
        picture = im.convert("RGB")
    with_retries(tracker.client.log_image, tracker.run_id, picture, key=key, step=int(step))


def export_ema(model, path: str | Path) -> Path:
    """The EMA network alone (no optimizer, no projector) as safetensors, with its JiT config in the metadata."""
    import json
    from dataclasses import asdict, is_dataclass

    from safetensors.torch import save

    from .files import write_atomic

    # clone: safetensors refuses tensors that share storage
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    cfg = getattr(model, "cfg", None)
    metadata = {"format": "pt", "kind": "pixelgen-ema"}
    if cfg is not None and is_dataclass(cfg):
        metadata["config"] = json.dumps(asdict(cfg))
    return write_atomic(path, save(state, metadata=metadata))  # no half-written or stray temp file on failure


def load_ema(path: str | Path):
    """A JiT from an export_ema file (for use without MLflow)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from .model import JiT, JiTConfig

    with safe_open(str(path), "pt") as f:
        cfg = JiTConfig(**json.loads(f.metadata()["config"]))
    model = JiT(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def log_model(tracker: Tracker, model, out_dir: str | Path, name: str = "model", step: int | None = None,
              best_effort: bool = True) -> str | None:
    """Log the trained (EMA) network so a run's model loads from MLflow:

    - `ema.safetensors` (export_ema) as a run artifact under `weights/`;
    - an MLflow PyTorch model `name` (`mlflow.pytorch.log_model`, with the pixelgen package as code, so it
      loads where pixelgen is not installed): `mlflow.pytorch.load_model(f"runs:/{run_id}/{name}")` or the
      returned `models:/` URI gives the module; call it as `model(x, t, y)` or sample with pixelgen.solvers.

    Returns the model URI. With best_effort, a failure is printed, not raised: the checkpoint is on disk
    already, and a tracking hiccup must not fail a finished training job."""
    if not tracker.enabled or tracker.run_id is None:
        return None
    try:
        import copy

        import mlflow
        import mlflow.pytorch
        import torch

        weights = export_ema(model, Path(out_dir) / "ema.safetensors")
        with_retries(tracker.client.log_artifact, tracker.run_id, str(weights), "weights")
        module = copy.deepcopy(model).cpu().eval()
        mlflow.set_tracking_uri(tracking_uri(tracker.cfg["uri"]))
        status = with_retries(tracker.client.get_run, tracker.run_id).info.status
        # the fluent API needs an active run; leaving `with` marks it FINISHED, so the status is put back
        with mlflow.start_run(run_id=tracker.run_id):
            info = mlflow.pytorch.log_model(
                module, name=name, step=step or 0, serialization_format="pickle", code_paths=[str(Path(__file__).resolve().parent)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy"])
        with_retries(tracker.client.update_run, tracker.run_id, status=status)
        return info.model_uri
    except Exception as err:
        if not best_effort:
            raise
        print(f"MLflow model not logged ({type(err).__name__}: {err}); the checkpoint is on disk", file=sys.stderr)
        return None


def _run_id(run_id_file_or_id: str | Path) -> str:
    path = Path(run_id_file_or_id)
    if path.is_file():
        return path.read_text().strip()
    if isinstance(run_id_file_or_id, Path) or os.sep in str(run_id_file_or_id):
        raise FileNotFoundError(f"no MLflow run id file at {path}")
    return str(run_id_file_or_id)


def finish_parent(run_id_file_or_id: str | Path, report_dir: str | Path | None = None, uri: str | None = None,
                  status: str = "FINISHED") -> str:
    """End the workflow's parent run, with the report attached: every file of report_dir (table.md/.csv,
    summary.json, plots, sample grids, metrics) under `report/`, and summary.json's numbers as metrics
    `<variant>/<metric>`. Idempotent: a rerun of the report logs again and ends the run again."""
    run_id = _run_id(run_id_file_or_id)
    client = client_for(tracking_uri(uri))
    if report_dir is not None and Path(report_dir).is_dir():
        report_dir = Path(report_dir)
        with_retries(client.log_artifacts, run_id, str(report_dir), "report")
        summary = report_dir / "summary.json"
        if summary.is_file():
            import json

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(f"{variant}/{key}", float(value), now, 0)
                     for variant, row in json.loads(summary.read_text()).items()
                     for key, value in row.items() if isinstance(value, (int, float)) and value is not None]
            for i in range(0, len(batch), 500):
                with_retries(client.log_batch, run_id, metrics=batch[i:i + 500])
    with_retries(client.set_terminated, run_id, status)
    return run_id
