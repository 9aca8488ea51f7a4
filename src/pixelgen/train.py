"""`pixelgen train`: one resumable training job (CPU, one GPU, or DDP under torchrun), logged to MLflow.

State lives in RUN_DIR: config.yaml (resolved), checkpoints/last.pt (every train.ckpt_every steps, on SIGTERM,
and at the end), checkpoints/final.pt (at the end) and checkpoints/final_ema.pt (at the end: the EMA network
only, what `pixelgen sample` reads). Rerunning the same command resumes from last.pt and gives bit-identical
weights to an uninterrupted run on the same hardware and process layout. One job at a time holds RUN_DIR (a
lock released on any exit); a checkpoint never holds non-finite weights. `init_from` (--init-from) starts a new
run from another checkpoint's weights, recorded (path and sha256) in every checkpoint and in MLflow.

The job reads top to bottom as its phases: `train` -> `_run`: skip a finished run, check the resume, set up
(`Trainer.__init__`), restore (or start from init_from), wrap for training, start tracking, then `Trainer.run`
steps, logs, saves and samples until `Trainer.finish`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path

import torch
import torch.distributed as torch_dist
import yaml

from . import async_save, checkpoint, distributed
from .checkpoint import CheckpointIO, Entry
from .config import RESUMABLE_CHANGES, flatten, with_added_keys
from .data import StreamLoader
from .denoiser import build_denoiser
from .ema import EMA
from .errors import PixelgenError
from .files import append_text, check_writable_folder, remove_stale_temps, sha256, write_atomic
from .images import save_grid
from .locks import FolderBusy, exclusive_folder
from .losses import LossOutput, PixelGenLoss
from .model import model_config
from .solvers import sample
from .progress import Progress
from .tracking import SystemMetrics, Tracker, log_dataset, log_grid, log_model


# the host generator (training times) is seeded apart from the device one, so the two never share a stream on CPU
HOST_SEED_OFFSET = 1 << 40


class Preempted(PixelgenError):
    """SIGTERM arrived (Slurm preemption, scancel): state is saved; rerunning resumes."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=143)
        self.message = message

    def __str__(self) -> str:
        # raised by a signal handler wherever the job is, e.g. inside webdataset's tar reader, which appends the
        # file handle and URL to the args of any exception passing through: the message is the one raised
        return self.message


STOP_CHECK_EVERY = 10  # steps between the DDP ranks' agreement on a SIGTERM (besides log and checkpoint steps)


def config_differences(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ, a saved config's missing newer keys read at their defaults."""
    a, b = with_added_keys(flatten(saved)), with_added_keys(flatten(current))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def refuse_other_config(saved: dict, config: dict, files: "RunFiles", ckpt: Path) -> None:
    """A run dir continues only under the config it was started with, finished or not."""
    changed = config_differences(saved["config"], config)
    if changed:
        raise PixelgenError(f"{files.run_dir} was started with another config ({', '.join(changed[:5])} differ); "
                            f"use the same config to resume, or a new --run-dir (with --init-from {ckpt} to "
                            f"start from its weights)")


def refuse_fewer_steps(saved: dict, config: dict, files: "RunFiles", ckpt: Path) -> None:
    """train.steps may be raised (the run continues from its last state) but not set below a saved step: the run
    would end, or say it is done, with the weights of more steps than its config says."""
    step, steps = saved["step"], config["train"]["steps"]
    if step <= steps:
        return
    was = saved["config"]["train"]["steps"]
    state = f"finished at step {step}" if ckpt == files.final else f"holds step {step} in {ckpt}"
    raise PixelgenError(f"{files.run_dir} {state} (train.steps={was}), past the new train.steps={steps}: trained "
                        f"steps cannot be taken back; rerun with train.steps={was} (or more, to continue), or "
                        f"train {steps} steps in a new --run-dir")


def init_source(path: Path | str) -> dict:
    """What --init-from names: the resolved path and the sha256 that identifies the file."""
    path = Path(path).resolve()
    if not path.is_file():
        raise PixelgenError(f"--init-from {path}: no such checkpoint file")
    return {"path": str(path), "sha256": sha256(path)}


def refuse_other_init(saved: dict, init: dict | None, files: "RunFiles", ckpt: Path) -> None:
    """A rerun may repeat --init-from or leave it out (the run dir holds the state); another source is refused."""
    if init is None:
        return
    recorded = saved.get("init_from")
    if recorded is None:
        raise PixelgenError(f"{files.run_dir} holds its own training state ({ckpt.name}, step {saved['step']}); "
                            f"--init-from starts a new run: use a new --run-dir")
    if recorded["sha256"] != init["sha256"]:
        raise PixelgenError(f"{files.run_dir} was started from {recorded['path']} (sha256 {recorded['sha256'][:12]}), "
                            f"not {init['path']}; rerun with that --init-from to resume, or use a new --run-dir")


class RunFiles:
    """Where a run keeps its state."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.checkpoints = run_dir / "checkpoints"
        self.last, self.final, self.final_ema = (self.checkpoints / name
                                                 for name in ("last.pt", "final.pt", "final_ema.pt"))
        self.config, self.mlflow_run_id, self.metrics = (run_dir / name
                                                         for name in ("config.yaml", "mlflow_run_id", "metrics.jsonl"))
        self.previews = run_dir / "previews"

    def last_saved(self, step: int) -> str:
        """What a stopped run can go back to, said truthfully (there may be no checkpoint yet)."""
        if self.last.exists():
            return (f"{self.last} holds step {step}, the last saved state (resume by rerunning, or start a new "
                    f"--run-dir from it with --init-from {self.last})")
        return "no checkpoint was saved yet"


def _model_differences(source: dict, config: dict) -> str:
    """' (model.patch_size=8 there)': the settings to copy when a checkpoint does not fit, if it says them."""
    theirs = source.get("config", {}).get("model")
    if not isinstance(theirs, dict):
        return ""
    ours = config["model"]
    differ = [f"model.{k}={theirs[k]!r} there" for k in ours if k in theirs and theirs[k] != ours[k]]
    return f" ({', '.join(differ)})" if differ else ""


@torch.no_grad()
def ema_preview_grid(model, cfg: dict, device, count: int, steps: int, path: Path) -> Path:
    """A grid of EMA samples: fixed noise and labels cycling through the classes, so grids compare over time."""
    size = model.cfg.image_size
    gen = torch.Generator().manual_seed(1234)
    noise = (torch.randn(count, 3, size, size, generator=gen) * cfg["flow"]["noise_scale"]).to(device)
    labels = (torch.arange(count) % model.cfg.num_classes).to(device)
    images = sample(model, noise, labels, sampler="euler", steps=steps, guidance=1.0, t_eps=cfg["flow"]["t_eps"],
                    null_class=model.null_class)
    return save_grid(images, path, nrow=min(count, model.cfg.num_classes))


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each step, so the state is saved at a step boundary.

    A step boundary may never come (a data read hung on a network file system, a stuck collective), so the
    flag alone could make a job ignore SIGTERM: a second SIGTERM, or `grace_s` seconds without reaching a
    boundary (SIGALRM), stops the job at once without saving; last.pt keeps the last periodic state.
    Slurm's `--signal=TERM@300` leaves 300 s before the kill, hence the 240 s default.
    """

    def __init__(self, grace_s: float | None = None):
        self.raised = False
        env = os.environ.get("PIXELGEN_SIGTERM_GRACE_S")
        self.grace_s = grace_s if grace_s is not None else float(env) if env else 240.0
        self._previous: dict = {}

    def __enter__(self):
        for sig, handler in ((signal.SIGTERM, self._handle), (signal.SIGALRM, self._grace_over)):
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise Preempted("a second SIGTERM: stopped at once without saving; "
                            "rerun the same command to resume from last.pt")
        self.raised = True
        signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _grace_over(self, signum, frame):
        raise Preempted(f"SIGTERM: no step boundary within {self.grace_s:g} s (data or a collective hung?), "
                        f"stopped without saving; rerun the same command to resume from last.pt")

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class TrainProgress:
    """Training's view of the shared progress display (pixelgen.progress: a tqdm bar on a terminal, timestamped
    lines in a log): the bar advances every step and shows the loss; a log gets one line per train.log_every."""

    def __init__(self, total: int, initial: int, enabled: bool, stream=None):
        self.display = Progress(total, "train", unit="step", noun="steps", enabled=enabled, every=0,
                                initial=initial, stream=stream)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.display.close()
        return False

    def advance(self) -> None:
        self.display.update(1)

    def log(self, step: int, terms: dict, images_per_sec: float) -> None:
        if self.display.bar is not None:
            self.display.bar.set_postfix(loss=f"{terms['loss']:.4f}", fm=f"{terms['fm']:.4f}",
                                         img_s=f"{images_per_sec:.0f}")
        else:  # then ", 120/1000 steps, 3.1 step/s, eta 0:04:43" from the shared counts
            self.display.log(f"step {step}: loss {terms['loss']:.4f} fm {terms['fm']:.4f} img/s {images_per_sec:.1f}")


class Throughput:
    """Images per second over the steps since the last reading."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def count_step(self) -> None:
        self.steps += 1

    def read_and_restart(self) -> float:
        rate = self.steps * self.global_batch / max(time.perf_counter() - self.start, 1e-9)
        self.restart()
        return rate


def autocast_for(precision: str, device: torch.device):
    """A context factory: bf16 autocast when asked for (or 'auto' on a GPU), else a no-op."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext


# ---------------------------------------------------------------------------------------------------------------
# The job


def train(config: dict, run_dir: Path, stop_at_step: int | None = None, progress: bool = True,
          init_from: Path | str | None = None) -> Path:
    """Run (or resume) training; returns the path of checkpoints/final.pt. `init_from`: a checkpoint whose
    weights a new run starts from (a training checkpoint, final_ema.pt, or an imported official release)."""
    files = RunFiles(Path(run_dir))
    check_writable_folder(files.run_dir, "--run-dir")  # one line before any work, not a traceback from mkdir
    dist = distributed.init(config["train"]["device"])
    try:
        with _run_dir_lock(files, dist):
            init = init_source(init_from) if init_from is not None else None
            return _run(config, files, dist, stop_at_step, progress, init)
    finally:
        distributed.shutdown()


@contextmanager
def _run_dir_lock(files: RunFiles, dist: distributed.Dist):
    """One job per run dir: a second one would interleave metrics.jsonl and overwrite the other's checkpoints.
    Only rank 0 locks (every rank of a DDP job shares the run dir); its refusal stops every rank."""
    with ExitStack() as held:
        refusal = None
        if dist.is_main:
            try:
                held.enter_context(exclusive_folder(files.run_dir, "pixelgen train"))
            except FolderBusy as err:
                refusal = err
        if not distributed.all_ok(dist, refusal is None):
            raise refusal or PixelgenError(f"{files.run_dir} is in use by another job (rank 0 was refused its lock)")
        yield


def _run(config: dict, files: RunFiles, dist: distributed.Dist, stop_at_step: int | None,
         show_progress: bool, init: dict | None) -> Path:
    # Phase 1: anything left to do, and may this config (and init source) continue what RUN_DIR holds?
    if _already_finished(config, files, dist, init):
        return files.final
    resume = _load_resumable(config, files, init)
    _prepare_run_dir(config, files, dist, start_step=resume["step"] if resume else 0)

    # Phase 2: build everything from the seed, put the saved state (or the init weights) over it, then wrap
    trainer = Trainer(config, files, dist)
    resumed = resume is not None
    if resumed:
        trainer.restore(resume)
    elif init is not None:
        trainer.start_from(init)
    del resume  # a full checkpoint in host memory (optimizer moments included) is not needed any longer
    trainer.wrap_for_training()

    # Phase 3: train, tracked; the MLflow run ends FINISHED, KILLED (preempted/stopped) or FAILED
    tracker = _start_tracking(config, files, dist, trainer.criterion.encoders_real, resumed=resumed,
                              init=trainer.init_from)
    with SigtermFlag() as sigterm, SystemMetrics(tracker), \
            TrainProgress(trainer.total_steps, trainer.step, enabled=show_progress and dist.is_main) as progress:
        status = "FAILED"
        try:
            try:
                trainer.run(tracker, progress, sigterm, stop_at_step)
            finally:  # preempted, stopped or failed: the last.pt being written is completed (or its error raised)
                trainer.wait_for_save()
            status = "FINISHED"
        except Preempted:
            status = "KILLED"
            raise
        finally:
            tracker.end(status)
    return files.final


def _already_finished(config: dict, files: RunFiles, dist: distributed.Dist, init: dict | None) -> bool:
    if not files.final.exists():
        return False
    saved = checkpoint.load(files.final)
    refuse_other_config(saved, config, files, files.final)  # "done" must mean done with this config
    refuse_other_init(saved, init, files, files.final)
    refuse_fewer_steps(saved, config, files, files.final)
    if saved["step"] < config["train"]["steps"]:
        return False  # train.steps was raised: continue from last.pt
    if dist.is_main:
        if not files.final_ema.exists():  # finished before final_ema.pt existed, or killed just before writing it
            checkpoint.save_atomic(checkpoint.ema_only(saved), files.final_ema)
        print(f"{files.final} exists (step {saved['step']}): training is done", file=sys.stderr)
    return True


def _load_resumable(config: dict, files: RunFiles, init: dict | None) -> dict | None:
    """last.pt if there is one; refused when it was written under a config that changes the trajectory, or
    from another --init-from."""
    if not files.last.exists():
        return None
    resume = checkpoint.load(files.last)
    refuse_other_config(resume, config, files, files.last)
    refuse_other_init(resume, init, files, files.last)
    refuse_fewer_steps(resume, config, files, files.last)
    return resume


def _prepare_run_dir(config: dict, files: RunFiles, dist: distributed.Dist, start_step: int) -> None:
    if dist.is_main:
        files.run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (files.run_dir, files.checkpoints, files.previews):  # half-written files of killed jobs
            remove_stale_temps(folder)
        write_atomic(files.config, yaml.safe_dump(config, sort_keys=False))
        _trim_metrics_log(files.metrics, start_step)


def _trim_metrics_log(path: Path, start_step: int) -> None:
    """Drop the lines a killed job logged after its last checkpoint (and a torn last line): the resumed job
    logs those steps again, and each step must appear once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) is not None and _logged_step(line) <= start_step]
    if kept != lines:
        write_atomic(path, "".join(kept))


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _start_tracking(config: dict, files: RunFiles, dist: distributed.Dist, encoders_real: bool,
                    resumed: bool, init: dict | None) -> Tracker:
    """An MLflow run on rank 0 (a no-op tracker elsewhere); a resumed job continues its previous run."""
    tracker = Tracker(config["tracking"], enabled=dist.is_main)
    previous_run = files.mlflow_run_id.read_text().strip() if resumed and files.mlflow_run_id.exists() else None
    tags = {"variant": config["tracking"]["variant"] or files.run_dir.name, "grid": config["tracking"]["grid"] or "",
            "weights": "real" if encoders_real else "random", "job": "train"}
    params = {**flatten(config), **({f"init_from.{k}": v for k, v in init.items()} if init else {})}
    run_id = tracker.start(tags["variant"], params, tags, resume_run_id=previous_run)
    if run_id and dist.is_main:
        write_atomic(files.mlflow_run_id, run_id)
        tracker.log_artifact(files.config)
        log_dataset(tracker, Path(config["data"]["shards"]) / "manifest.json")
    return tracker


# ---------------------------------------------------------------------------------------------------------------
# The training state and what is done with it


class Trainer:
    """The training state (network + REPA projector, objective, optimizer, EMA, data stream, random generator)
    and the operations on it: restore, step, log, save, sample grid, finish."""

    def __init__(self, config: dict, files: RunFiles, dist: distributed.Dist):
        self.config, self.files, self.dist = config, files, dist
        self.settings = config["train"]
        self.device = dist.device
        self.total_steps = self.settings["steps"]
        self.step = self.saved_step = 0
        self.init_from: dict | None = None  # {"path", "sha256"} of the checkpoint a new run started from
        self._build_networks()
        self._build_optimizer_and_data()
        self.checkpoint_io = self._declare_checkpoint()
        self.forward_model = self.denoiser
        self.autocast = autocast_for(self.settings["precision"], self.device)
        self.throughput = Throughput(config["data"]["batch_size"] * dist.world_size)
        self.writer = async_save.AsyncWriter()  # checkpoints are written in the background (see save)

    def _build_networks(self) -> None:
        seed = self.settings["seed"]
        # the same seed on every rank while building, so all ranks start from one network and projector (DDP also
        # broadcasts rank 0's); a per-rank seed afterwards, so dropout differs between ranks
        torch.manual_seed(seed)
        shape = model_config(self.config["model"])  # grid and patch, to size the encoders
        self.criterion = PixelGenLoss(self.config, shape.grid, shape.patch_size).to(self.device)
        self.denoiser = build_denoiser(self.config, self.criterion.repa_dim,
                                       class_dropout=self.settings["class_dropout"]).to(self.device)
        self.net = self.denoiser.net
        torch.manual_seed(seed * 1000 + self.dist.rank)

    def _build_optimizer_and_data(self) -> None:
        s, data, dist = self.settings, self.config["data"], self.dist
        self.params = list(self.denoiser.parameters())
        # fused: one kernel for the whole update and no read of the step counts on the host (CUDA and CPU alike)
        self.optimizer = torch.optim.AdamW(self.params, lr=s["lr"], betas=tuple(s["betas"]),
                                           weight_decay=s["weight_decay"], fused=True)
        # the EMA of the network only: sampling needs no projector
        self.ema = EMA(self.net, decay=s["ema_decay"], warmup=s["ema_warmup"])
        # the objective's randomness, both generators checkpointed: noise and label drop on the device; t on the
        # host, so the noise gate's index is known there without waiting for the device (losses.draw_times)
        self.generator = torch.Generator(device=self.device).manual_seed(s["seed"] * 1000 + dist.rank + 1)
        self.host_generator = torch.Generator().manual_seed(HOST_SEED_OFFSET + s["seed"] * 1000 + dist.rank + 1)
        self.first_nonfinite_step = torch.full((), -1, device=self.device)  # the device notes it; log steps read it
        self.loader = StreamLoader(data["shards"], data["batch_size"], num_workers=data["workers"], seed=s["seed"],
                                   shuffle_buffer=data["shuffle_buffer"], flip=data["flip"], rank=dist.rank,
                                   world_size=dist.world_size, device=self.device,
                                   pin_memory=self.device.type == "cuda")
        self.loader.check_num_classes(self.config["model"]["num_classes"])  # data.py: names the fix

    def _declare_checkpoint(self) -> CheckpointIO:
        # Per rank: its RNG, so each resumes its own stream; its adaptive weight (computed from local grads); its
        # data position; and a fingerprint of its trainable weights (ranks that drifted apart must not be saved
        # as one model). The rest is rank 0's. Entries without a restore are for readers and checks.
        adaptive = self.criterion.adaptive
        return CheckpointIO(
            Entry("model", self.denoiser.state_dict, self.denoiser.load_state_dict),
            Entry("ema", self.ema.state_dict, self.ema.load_state_dict),
            Entry("optimizer", self.optimizer.state_dict, self.optimizer.load_state_dict),
            Entry("step", lambda: self.step, self._set_step),
            Entry("perceptual_weight", lambda: adaptive.value, lambda v: setattr(adaptive, "value", v), per_rank=True),
            Entry("rank_fingerprints", lambda: checkpoint.fingerprint(self.denoiser), per_rank=True),
            Entry("data", self.loader.state_dict),
            Entry("data_per_rank", self.loader.state_dict, self.loader.load_state_dict, per_rank=True),
            Entry("config", lambda: self.config),
            Entry("encoders_real", lambda: self.criterion.encoders_real),
            Entry("init_from", lambda: self.init_from, lambda v: setattr(self, "init_from", v), optional=True),
            # last, so nothing restored after it can draw from the restored streams
            Entry("rng", self._rng_state, self._set_rng_state, per_rank=True),
        )

    def _set_step(self, step: int) -> None:
        self.step = self.saved_step = step

    def _rng_state(self) -> dict:
        return {**checkpoint.rng_state(self.generator), "host_generator": self.host_generator.get_state()}

    def _set_rng_state(self, state: dict) -> None:
        checkpoint.set_rng_state(state, self.generator)
        if "host_generator" in state:
            self.host_generator.set_state(state["host_generator"])
        elif self.dist.is_main:  # written before t was drawn on the host: the run goes on, on another stream
            print("the checkpoint predates the host-side time generator: t is drawn from a fresh stream, so the "
                  "continued run is not bit-identical to an uninterrupted one", file=sys.stderr)

    # -- restore and wrap ---------------------------------------------------------------------------------------

    def restore(self, state: dict) -> None:
        self.checkpoint_io.restore(state, self.dist.rank)

    def start_from(self, init: dict) -> None:
        """A new run from another checkpoint's weights: the network (and the REPA projector when it fits) and
        the EMA network; step, optimizer, data stream and EMA count start over."""
        path = Path(init["path"])
        source = checkpoint.load(path)
        model, ema = checkpoint.network_weights(source, path)
        net_only = {k: v for k, v in model.items() if k.startswith("net.")}
        mine = {k: v for k, v in self.denoiser.state_dict().items() if k.startswith("net.")}
        mismatch = checkpoint.first_mismatch(net_only, mine) or checkpoint.first_mismatch(ema, self.ema.shadow.state_dict())
        if mismatch:
            raise PixelgenError(f"--init-from {path} does not fit this model: {mismatch}"
                                f"{_model_differences(source, self.config)}; set model.* as in that checkpoint")
        projector = {k: v for k, v in model.items() if k.startswith("projector.")}
        fits = checkpoint.first_mismatch(projector, {k: v for k, v in self.denoiser.state_dict().items()
                                                     if k.startswith("projector.")}) is None
        if not fits and self.dist.is_main:
            print(f"--init-from {path}: no REPA projector of this shape there; the projector starts fresh",
                  file=sys.stderr)
        self.denoiser.load_state_dict({**self.denoiser.state_dict(), **net_only, **(projector if fits else {})})
        self.ema.shadow.load_state_dict(ema)
        self.init_from = init

    def wrap_for_training(self) -> None:
        """torch.compile (the denoiser and the perceptual encoders) and DDP wrap for the forward pass; the
        unwrapped denoiser is saved."""
        if self.settings["compile"]:
            self.forward_model = torch.compile(self.forward_model)
            self.criterion.compile_encoders()
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Gradients live in DDP's buckets (no copy). Buffers are not broadcast: the model's (positions, RoPE
            # tables) are constants built from the config. The static graph (bucket order learnt once) holds
            # because every parameter, the REPA projector's included, is used every step (label drop swaps
            # labels, it skips nothing), except when the adaptive weight's extra autograd.grad runs.
            self.forward_model = DistributedDataParallel(
                self.forward_model, device_ids=device_ids, gradient_as_bucket_view=True, broadcast_buffers=False,
                static_graph=self.criterion.adaptive.start == 0, bucket_cap_mb=self.settings["ddp_bucket_mb"])

    # -- the main loop ------------------------------------------------------------------------------------------

    def run(self, tracker: Tracker, progress: Progress, sigterm: SigtermFlag, stop_at_step: int | None) -> None:
        """Step until train.steps, logging, saving and sampling on schedule; SIGTERM and --stop-at-step save
        last.pt and raise Preempted. Only log and checkpoint steps read numbers back from the device: the loss
        check, the log, and (under DDP) the all-reduce that asks every rank about SIGTERM happen there."""
        self.tracker, self.progress = tracker, progress
        batches = iter(self.loader)
        self.throughput.restart()
        while self.step < self.total_steps:
            out, grad_norm = self.train_step(*next(batches))
            progress.advance()
            log_due = self.step % self.settings["log_every"] == 0 or self.step == self.total_steps
            save_due = self.step % self.settings["ckpt_every"] == 0 or self.step == stop_at_step
            # one process asks nothing of others: it may notice SIGTERM at any step; under DDP the ranks agree
            # every STOP_CHECK_EVERY steps too, so a SIGTERM is acted on well within its grace period even when
            # log steps are minutes apart (one small all-reduce per 10 steps)
            check_stop = log_due or save_due or self.dist.world_size == 1 or self.step % STOP_CHECK_EVERY == 0
            stop = self._all_ranks_stop(sigterm.raised) if check_stop else False
            if log_due or save_due or stop:
                values = self._check_finite(out, grad_norm)
                if log_due:
                    self.log(values)
            if save_due or stop:
                self.save(self.files.last)
            every = self.settings["preview_every"]
            if every and self.step % every == 0 and self.step < self.total_steps:
                self.preview_grid(f"step_{self.step:07d}")
            if stop:
                raise Preempted(f"preempted (SIGTERM) at step {self.step}: saved {self.files.last}; "
                                f"rerun the same command to resume")
            if self.step == stop_at_step:
                raise Preempted(f"stopped at step {self.step} as asked: saved {self.files.last}; rerun to resume")
        self.finish()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[LossOutput, torch.Tensor | None]:
        """One update that never waits for the device: the loss terms stay device tensors, a non-finite loss
        is only noted (on the device) for the next log step, and the grad norm exists only when clipping."""
        labels = self.net.y_embed.drop(labels.to(self.device, non_blocking=True), self.generator)
        with self.autocast():
            out = self.criterion(self.forward_model, images, labels, generator=self.generator, step=self.step,
                                 last_layer=self.denoiser.last_layer, host_generator=self.host_generator,
                                 weighting=self.denoiser.loss_weighting)
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        grad_norm = None
        if self.settings["grad_clip"] > 0:  # the paper configs do not clip: no norm computed at all then
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings["grad_clip"], foreach=True)
        self.optimizer.step()
        self.ema.update(self.net)
        self.step += 1
        self._note_nonfinite(out.total)
        self.throughput.count_step()
        return out, grad_norm

    def _note_nonfinite(self, total: torch.Tensor) -> None:
        """Remember, on the device, the first step whose loss was not finite (no read-back)."""
        first = self.first_nonfinite_step
        bad = ~torch.isfinite(total.detach()) & (first < 0)
        self.first_nonfinite_step = torch.where(bad, torch.full_like(first, self.step), first)

    def _check_finite(self, out: LossOutput, grad_norm: torch.Tensor | None) -> dict[str, float]:
        """At a log or checkpoint step: read the step's numbers (one device->host copy) and stop if a loss since
        the last check was not finite, before the log or the save (saves also check the weights). Every rank
        agrees, so none is left waiting in a save. Returns the terms and the grad norm for the log."""
        if grad_norm is None:  # not clipping: the norm of this step's gradients, computed for the log only
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        terms, (first_bad, norm) = out.read_terms(self.first_nonfinite_step, grad_norm)
        if distributed.all_ok(self.dist, first_bad < 0):
            return {**terms, "grad_norm": norm}
        bad = [k for k, v in terms.items() if not math.isfinite(v)] or ["loss"]
        where = f"first at step {int(first_bad)}" if first_bad >= 0 else "first on another rank"
        raise PixelgenError(f"non-finite loss found at log step {self.step} ({where}) in term(s) {', '.join(bad)} "
                            f"({', '.join(f'{k}={terms.get(k)}' for k in bad)}); "
                            f"{self.files.last_saved(self.saved_step)}; lower train.lr or check the data")

    def _check_weights_finite(self) -> None:
        """A checkpoint never holds inf/nan: an update can break the weights after the step's loss was checked,
        and a save right after it would replace the good last.pt. Same weights on every rank: all agree."""
        params = list(self.denoiser.parameters())
        if torch.stack([torch.isfinite(p).all() for p in params]).all():
            return
        name = next(n for n, p in self.denoiser.named_parameters() if not torch.isfinite(p).all())
        raise PixelgenError(f"non-finite weights at step {self.step} ({name}), not saved; "
                            f"{self.files.last_saved(self.saved_step)}; lower train.lr or set train.grad_clip")

    def _all_ranks_stop(self, asked: bool) -> bool:
        """Under DDP every rank must stop at the same step (a SIGTERM may reach one rank first)."""
        return not distributed.all_ok(self.dist, not asked)

    # -- log, save, sample, finish ------------------------------------------------------------------------------

    def log(self, values: dict[str, float]) -> None:
        """`values`: the step's terms and grad norm, already read from the device by _check_finite."""
        terms = {k: v for k, v in values.items() if k != "grad_norm"}
        metrics = {**{f"loss/{k}": v for k, v in terms.items()}, "grad_norm": values["grad_norm"],
                   "images_per_sec": self.throughput.read_and_restart(), **self._learned_gate_curve()}
        self.progress.log(self.step, terms, metrics["images_per_sec"])
        self.tracker.log_metrics(metrics, self.step)
        if self.dist.is_main:  # a plain copy beside the checkpoints, for reports that need no tracking server
            append_text(self.files.metrics, json.dumps({"step": self.step, **metrics}) + "\n")

    def _learned_gate_curve(self) -> dict[str, float]:
        """The learned weighting's exp(-u) per term and time bin, as `gate_weight/<term>/<bin>` metrics (the
        report draws the last one over t); nothing without a learned weighting."""
        weighting = self.denoiser.loss_weighting
        if weighting is None:
            return {}
        return {f"gate_weight/{term}/{b}": w for term, curve in weighting.curve().items() for b, w in enumerate(curve)}

    def save(self, *paths: Path) -> dict | None:
        """Every rank takes part (the per-rank states are gathered); rank 0 snapshots the state to CPU memory at
        this step, writes it to `paths` in the background (async_save) and gets the snapshot back. The next save,
        finish, or the end of the job waits for that write and raises its error."""
        self._check_weights_finite()
        self._wait_for_previous_write()  # before the new snapshot: at most one in host memory
        per_rank = self.checkpoint_io.per_rank_states(self._gather)
        fingerprints = per_rank["rank_fingerprints"]
        if any(f != fingerprints[0] for f in fingerprints):
            raise PixelgenError(f"the {self.dist.world_size} ranks hold different weights at step {self.step} "
                                f"(fingerprints {[f[:12] for f in fingerprints]}); not saving; report this as a bug")
        state = async_save.snapshot(self.checkpoint_io.state(per_rank)) if self.dist.is_main else None
        if state is not None:
            self.writer.submit(lambda: [checkpoint.save_atomic(state, path) for path in paths], targets=paths)
        distributed.barrier(self.dist)
        self.saved_step = self.step
        return state

    def _wait_for_previous_write(self) -> None:
        """Every rank learns whether rank 0's background write failed, so that all stop at the same point."""
        failure = None
        try:
            self.writer.wait()
        except PixelgenError as err:
            failure = err
        if not distributed.all_ok(self.dist, failure is None):
            raise failure or PixelgenError("rank 0 could not write a checkpoint (its error says why)")

    def wait_for_save(self) -> None:
        """Block until the background write is on disk (the job calls it before it ends, even on an error)."""
        self.writer.wait()

    def _gather(self, mine: dict) -> list[dict]:
        if self.dist.world_size == 1:
            return [mine]
        states = [None] * self.dist.world_size
        torch_dist.all_gather_object(states, mine)
        return states

    def preview_grid(self, tag: str) -> None:
        if self.dist.is_main and self.settings["preview_count"] > 0:
            path = ema_preview_grid(self.ema.shadow, self.config, self.device, self.settings["preview_count"],
                                   self.settings["preview_steps"], self.files.previews / f"{tag}.png")
            self.tracker.log_artifact(path, "previews")
            log_grid(self.tracker, path, self.step)

    def finish(self) -> None:
        """last.pt (the full state, written once: not again when this step was just saved), final.pt (a hard
        link to it), final_ema.pt (what sampling reads), and a last sample grid, drawn while last.pt is written."""
        if self.saved_step != self.step:
            self.save(self.files.last)
        self.preview_grid("final")
        self._wait_for_previous_write()
        if self.dist.is_main:
            checkpoint.link_or_copy(self.files.last, self.files.final)
            checkpoint.save_atomic(checkpoint.ema_only(self.checkpoint_io.shared_state()), self.files.final_ema)
        if self.dist.is_main:  # the EMA network as an MLflow model (and an EMA-only safetensors file)
            log_model(self.tracker, self.ema.shadow, self.files.checkpoints, step=self.step)
