"""MLflow wiring: where runs go, how a job attaches to (or resumes) its run, and retries for busy stores.

Layout in the UI: an experiment per grid, a parent run per workflow run, a child run per variant.
The default store is a SQLite file under results/, with artifacts beside it, so `mlflow ui
--backend-store-uri sqlite:///results/mlflow.db` shows everything. Many jobs may log at once: SQLite answers
"database is locked" under contention, so every call retries with backoff instead of losing the metric.
"""

from __future__ import annotations

import os
import random
import subprocess
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
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


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

    def start(self, run_name: str, params: dict, tags: dict, resume_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        from mlflow import MlflowClient

        uri = tracking_uri(self.cfg["uri"])
        self.client = MlflowClient(tracking_uri=uri)
        if resume_run_id:
            self.run_id = resume_run_id
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
    """CPU/memory/GPU utilisation logged to the run every `interval` seconds, from a daemon thread."""

    def __init__(self, tracker: Tracker, interval: float = 10.0):
        self.tracker, self.interval = tracker, interval
        self._stop = None

    def __enter__(self):
        import threading

        if not (self.tracker.enabled and self.tracker.cfg["system_metrics"]):
            return self
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()
        return self

    def _loop(self):
        import psutil

        step = 0
        while not self._stop.wait(self.interval):
            metrics = {"system/cpu_percent": psutil.cpu_percent(),
                       "system/memory_percent": psutil.virtual_memory().percent}
            try:
                import torch

                if torch.cuda.is_available():
                    metrics["system/gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            except Exception:
                pass
            try:
                self.tracker.log_metrics(metrics, step)
            except Exception:
                pass  # system metrics are best effort; never kill training over them
            step += 1

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
        return False


def start_parent_run(experiment: str, name: str, uri: str | None, out: Path) -> str:
    """The parent run of a workflow run: created once, its id kept in `out` so reruns nest under the same one."""
    if out.exists() and out.read_text().strip():
        return out.read_text().strip()
    from mlflow import MlflowClient

    resolved = tracking_uri(uri)
    client = MlflowClient(tracking_uri=resolved)
    exp = experiment_id(client, experiment, resolved)
    run = with_retries(client.create_run, exp, run_name=name, tags={"git_commit": git_commit(), "kind": "workflow"})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(run.info.run_id)
    return run.info.run_id


def log_eval_metrics(result: dict, metrics_file: Path, manifest: dict, run_id: str | None = None,
                     uri: str | None = None) -> str | None:
    """Attach `pixelgen score`'s metrics (eval/fid, ...), its weights label and metrics.json to the training run:
    `run_id`, or the one recorded in the run dir named by the sample manifest. Returns the run id, None if none."""
    if run_id is None and manifest.get("run_dir"):
        id_file = Path(manifest["run_dir"]) / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
    if run_id is None:
        return None
    from mlflow import MlflowClient  # imported only when there is a run: it takes seconds
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri(uri or manifest.get("tracking_uri")))
    step = int(result["sampling"].get("ckpt_step", 0))
    now = int(time.time() * 1000)
    keys = ("fid", "sfid", "inception_score", "kid", "precision", "recall")
    with_retries(client.log_batch, run_id, metrics=[Metric(f"eval/{k}", float(result[k]), now, step)
                                                    for k in keys if result.get(k) is not None])
    with_retries(client.set_tag, run_id, "eval_weights", result["weights"])
    with_retries(client.log_artifact, run_id, str(metrics_file), "eval")
    return run_id
