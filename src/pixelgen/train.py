"""`pixelgen train`: one resumable training job (CPU, one GPU, or DDP under torchrun), logged to MLflow.

State lives in RUN_DIR: config.yaml (resolved), checkpoints/last.pt (every train.ckpt_every steps, on SIGTERM,
and at the end) and checkpoints/final.pt (at the end). Rerunning the same command resumes from last.pt and
gives bit-identical weights to an uninterrupted run on the same hardware and process layout.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as torch_dist
import yaml

from . import checkpoint, distributed
from .config import flatten
from .data import StreamLoader
from .ema import EMA
from .errors import PixelgenError
from .images import save_grid
from .denoiser import build_denoiser
from .losses import PixelGenLoss
from .model import model_config
from .sampling import sample
from .tracking import SystemMetrics, Tracker


class Preempted(PixelgenError):
    """SIGTERM arrived (Slurm preemption, scancel): state is saved; rerunning resumes."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=143)


# keys that may change between a run and its resumption without changing the trajectory
RESUMABLE_CHANGES = ("tracking.", "train.ckpt_every", "train.log_every", "train.sample_every", "train.steps",
                     "data.workers")


def config_differences(saved: dict, current: dict) -> list[str]:
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=generator.device) < p
    return torch.where(drop.to(y.device), torch.full_like(y, null_class), y)


@torch.no_grad()
def ema_sample_grid(model, cfg: dict, device, count: int, steps: int, path: Path) -> Path:
    """A grid of EMA samples: fixed noise and labels cycling through the classes, so grids compare over time."""
    size = model.cfg.image_size
    gen = torch.Generator().manual_seed(1234)
    noise = (torch.randn(count, 3, size, size, generator=gen) * cfg["flow"]["noise_scale"]).to(device)
    labels = (torch.arange(count) % model.cfg.num_classes).to(device)
    images = sample(model, noise, labels, sampler="euler", steps=steps, cfg=1.0, t_eps=cfg["flow"]["t_eps"],
                    null_class=model.null_class)
    return save_grid(images, path, nrow=min(count, model.cfg.num_classes))


class _SigtermFlag:
    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
        return False


def train(config: dict, run_dir: Path, stop_at_step: int | None = None, progress: bool = True) -> Path:
    """Run (or resume) training; returns the path of checkpoints/final.pt."""
    tc = config["train"]
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last_path, final_path = ckpt_dir / "last.pt", ckpt_dir / "final.pt"
    d = distributed.init(tc["device"])
    try:
        return _train(config, run_dir, d, last_path, final_path, stop_at_step, progress)
    finally:
        distributed.shutdown()


def _train(config, run_dir, d, last_path, final_path, stop_at_step, progress):
    from tqdm import tqdm

    tc = config["train"]
    if final_path.exists():
        saved = checkpoint.load(final_path)
        if saved["step"] >= tc["steps"]:
            if d.is_main:
                print(f"{final_path} exists (step {saved['step']}): training is done", file=sys.stderr)
            return final_path

    resume = checkpoint.load(last_path) if last_path.exists() else None
    if resume is not None:
        changed = config_differences(resume["config"], config)
        if changed:
            raise PixelgenError(f"{run_dir} was started with another config ({', '.join(changed[:5])} differ); "
                                f"use the same config to resume, or a new --run-dir")
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    device = d.device
    # the same seed on every rank while building, so all ranks start from one network and projector (DDP also
    # broadcasts rank 0's); a per-rank seed afterwards, so dropout differs between ranks
    torch.manual_seed(tc["seed"])
    model_cfg = model_config(config["model"])  # grid and patch, to size the encoders
    criterion = PixelGenLoss(config, model_cfg.grid, model_cfg.patch_size).to(device)
    denoiser = build_denoiser(config, criterion.repa_dim).to(device)
    model = denoiser.net
    torch.manual_seed(tc["seed"] * 1000 + d.rank)
    params = list(denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=tc["lr"], betas=tuple(tc["betas"]), weight_decay=tc["weight_decay"])
    ema = EMA(model, decay=tc["ema_decay"], warmup=tc["ema_warmup"])  # of the network only: sampling needs no projector
    # one generator for everything random in the objective (t, noise, label drop): its state is checkpointed
    generator = torch.Generator(device=device).manual_seed(tc["seed"] * 1000 + d.rank + 1)
    dc = config["data"]
    loader = StreamLoader(dc["shards"], dc["batch_size"], num_workers=dc["workers"], seed=tc["seed"],
                          shuffle_buffer=dc["shuffle_buffer"], flip=dc["flip"], rank=d.rank,
                          world_size=d.world_size, device=device, pin_memory=device.type == "cuda")
    step = 0
    if resume is not None:
        denoiser.load_state_dict(resume["model"])
        criterion.adaptive.value = resume["perceptual_weight"][d.rank]
        optimizer.load_state_dict(resume["optimizer"])
        ema.load_state_dict(resume["ema"])
        loader.load_state_dict(resume["data_per_rank"][d.rank])  # each rank's own stream position
        checkpoint.set_rng_state(resume["rng"][d.rank], generator)
        step = resume["step"]

    forward_model = denoiser
    if tc["compile"]:
        forward_model = torch.compile(denoiser)
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward_model = DistributedDataParallel(forward_model, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = tc["precision"] == "bf16" or (tc["precision"] == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    tracker = Tracker(config["tracking"], enabled=d.is_main)
    run_id_file = run_dir / "mlflow_run_id"
    previous_run = run_id_file.read_text().strip() if (resume is not None and run_id_file.exists()) else None
    tags = {"variant": config["tracking"]["variant"] or run_dir.name, "grid": config["tracking"]["grid"] or "",
            "weights": "real" if criterion.encoders_real else "random", "job": "train"}
    run_id = tracker.start(tags["variant"], flatten(config), tags, resume_run_id=previous_run)
    if run_id and d.is_main:
        run_id_file.write_text(run_id)
        tracker.log_artifact(run_dir / "config.yaml")

    def save(*paths: Path) -> None:
        # per rank: its RNG, so each resumes its own stream, its adaptive weight (computed from local grads),
        # and a fingerprint of its trainable weights: ranks that drifted apart must not be saved as one model
        mine = (checkpoint.rng_state(generator), criterion.adaptive.value, checkpoint.fingerprint(denoiser),
                loader.state_dict())
        if d.world_size > 1:
            states = [None] * d.world_size
            torch_dist.all_gather_object(states, mine)
        else:
            states = [mine]
        if any(s[2] != states[0][2] for s in states):
            raise PixelgenError(f"the {d.world_size} ranks hold different weights at step {step} (fingerprints "
                                f"{[s[2][:12] for s in states]}); not saving; report this as a bug")
        if d.is_main:
            state = {"model": denoiser.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step, "rng": [s[0] for s in states], "perceptual_weight": [s[1] for s in states],
                     "rank_fingerprints": [s[2] for s in states],
                     "data": states[0][3], "data_per_rank": [s[3] for s in states], "config": config, "encoders_real": criterion.encoders_real}
            for path in paths:
                checkpoint.save_atomic(state, path)
        distributed.barrier(d)

    def grid(tag: str) -> None:
        if d.is_main and tc["sample_count"] > 0:
            path = ema_sample_grid(ema.shadow, config, device, tc["sample_count"], tc["sample_steps"],
                                   run_dir / "samples" / f"{tag}.png")
            tracker.log_artifact(path, "samples")

    saved_step = resume["step"] if resume is not None else 0
    global_batch = dc["batch_size"] * d.world_size
    batches = iter(loader)
    status = "FAILED"
    with _SigtermFlag() as sigterm, SystemMetrics(tracker), \
            tqdm(total=tc["steps"], initial=step, desc="train", unit="step", disable=not (progress and d.is_main),
                 dynamic_ncols=True) as bar:
        try:
            window_start, window_steps = time.perf_counter(), 0
            while step < tc["steps"]:
                x, y = next(batches)
                y = drop_labels(y.to(device), tc["class_dropout"], model.null_class, generator)
                with autocast():
                    out = criterion(forward_model, x, y, generator=generator, step=step,
                                    last_layer=denoiser.last_layer)
                bad = [k for k, v in out.terms.items() if not math.isfinite(v)]
                if bad:
                    raise PixelgenError(f"non-finite loss at step {step + 1} in term(s) {', '.join(bad)} "
                                        f"({', '.join(f'{k}={out.terms[k]}' for k in bad)}); {last_path} keeps the "
                                        f"last good state (step {saved_step}); lower train.lr or check the data")
                optimizer.zero_grad(set_to_none=True)
                out.total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc["grad_clip"] if tc["grad_clip"] > 0 else float("inf"))
                optimizer.step()
                ema.update(model)
                step += 1
                window_steps += 1
                bar.update(1)

                if step % tc["log_every"] == 0 or step == tc["steps"]:
                    elapsed = time.perf_counter() - window_start
                    metrics = {**{f"loss/{k}": v for k, v in out.terms.items()}, "grad_norm": float(grad_norm),
                               "images_per_sec": window_steps * global_batch / max(elapsed, 1e-9)}
                    bar.set_postfix(loss=f"{out.terms['loss']:.4f}", fm=f"{out.terms['fm']:.4f}",
                                    img_s=f"{metrics['images_per_sec']:.0f}")
                    tracker.log_metrics(metrics, step)
                    if d.is_main:  # a plain copy beside the checkpoints, for reports that need no tracking server
                        with open(run_dir / "metrics.jsonl", "a") as log:
                            log.write(json.dumps({"step": step, **metrics}) + "\n")
                    window_start, window_steps = time.perf_counter(), 0
                stop_now = sigterm.raised
                if d.world_size > 1:  # all ranks must agree to stop at the same step
                    flag = torch.tensor([float(stop_now)], device=device)
                    torch_dist.all_reduce(flag)
                    stop_now = bool(flag.item() > 0)
                if step % tc["ckpt_every"] == 0 or stop_now or step == stop_at_step:
                    save(last_path)
                    saved_step = step
                if tc["sample_every"] and step % tc["sample_every"] == 0 and step < tc["steps"]:
                    grid(f"step_{step:07d}")
                if stop_now:
                    status = "KILLED"
                    raise Preempted(f"preempted (SIGTERM) at step {step}: saved {last_path}; "
                                    f"rerun the same command to resume")
                if step == stop_at_step:
                    status = "KILLED"
                    raise Preempted(f"stopped at step {step} as asked: saved {last_path}; rerun to resume")
            save(last_path, final_path)
            grid("final")
            status = "FINISHED"
        finally:
            tracker.end(status)
    return final_path
