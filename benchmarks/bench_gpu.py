"""GPU benchmark (issue 13): the production training step, sampling and scoring jobs, timed, with MFU.

For each size (B/16 and XL/16 at 256 px by default), on the paper config (config/pixelgen/imagenet256.yaml) with
random-weight encoders (their cost, not their values, matters here):

1. Training: the real `train.Trainer` (compile, bf16, DDP under torchrun, the config's clipping, EMA, label drop)
   reading real shards (synthetic images sharded by `pixelgen shard`'s build_shards, 1000 classes like
   ImageNet); `Trainer.train_step` timed CUDA-synchronised after warm-up steps. Reports img/s, peak memory and
   MFU against the detected part's dense bf16 peak, once for the JiT alone (formula: pixelgen.flops, forward +
   backward) and once with the encoders (DINOv2-B on the batch, P-DINO and LPIPS-VGG16 on the gated samples,
   measured with FlopCounterMode, counted at the gated fractions the timed steps drew).
2. Sampling: `sample_job.run_sampling` (the `pixelgen sample` job: its dtype, I/O, shards) with Euler-50 and
   Heun-50 from the EMA checkpoint the benchmark trained, at two image counts; the 50K time is extrapolated:
   start-up + 50,000 x the per-image time between the two runs.
3. Scoring: `score.ref_stats` on the shards (as the workflow's ref_stats rule) and `score.score` on the Euler
   samples, also at two counts, extrapolated to 50K the same way.
4. With --official-src PATH (a Zehong-Ma/PixelGen checkout): the official training step (its JiT, its REPATrainer
   loss, AdamW, its EMA) and its samplers at the same size and batch, so the ratios print beside ours.

The table is printed and appended to benchmarks/RESULTS.md (unless --no-record). Usage:
    python benchmarks/bench_gpu.py                                   # any CUDA machine, about 6 min on an H100
    python benchmarks/bench_gpu.py --device cpu --sizes tiny --image-size 32 --no-record   # CPU smoke, < 2 min
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from pixelgen import checkpoint, distributed
from pixelgen.config import load_config
from pixelgen.flops import device_peak, denoiser_flops, encoder_flops
from pixelgen.model import SIZES
from pixelgen.train import RunFiles, Trainer

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "RESULTS.md"
PAPER_CONFIG = REPO / "config" / "pixelgen" / "imagenet256.yaml"
TARGET = 50_000
# per-device defaults: a full run on a GPU in about 6 minutes, a smoke run on a CPU in well under 2
DEFAULTS = {"cuda": dict(batch=32, warmup=5, steps=20, sample_num=96, sample_batch=32, classes=1000, workers=8,
                         compile=True, sample_steps=50),
            "cpu": dict(batch=4, warmup=1, steps=2, sample_num=8, sample_batch=4, classes=10, workers=0,
                        compile=False, sample_steps=10)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["B/16", "XL/16"], help="model sizes (default B/16 XL/16)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--patch-size", type=int, help="model.patch_size (default: the size's own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="per-GPU training batch (GPU 32, CPU 4)")
    parser.add_argument("--warmup", type=int, help="untimed training steps first, compilation included (GPU 5)")
    parser.add_argument("--steps", type=int, help="timed training steps (GPU 20)")
    parser.add_argument("--sample-num", type=int, help="images sampled and scored in the larger run (GPU 96)")
    parser.add_argument("--sample-batch", type=int, help="sampling batch (GPU 32); the smaller run samples one batch")
    parser.add_argument("--sample-steps", type=int, help="solver steps (GPU 50; CPU 10, a smoke run)")
    parser.add_argument("--classes", type=int, help="classes in the synthetic shards and model (GPU 1000)")
    parser.add_argument("--workers", type=int, help="data.workers (GPU 8, CPU 0)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="train.compile (GPU: on, as the paper config; CPU: off)")
    parser.add_argument("--official-src", type=Path, help="a Zehong-Ma/PixelGen checkout: time its step and samplers")
    parser.add_argument("--work", type=Path, help="where shards, checkpoints and samples go (default: a temp dir)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def say(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[bench_gpu {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def extrapolate(small: tuple[int, float], large: tuple[int, float], target: int = TARGET) -> float:
    """Seconds for `target` images from two timed runs (n, seconds): the fixed start-up plus the per-image time
    between them (so a job's model load or compilation is paid once, not once per measured batch)."""
    (n1, t1), (n2, t2) = small, large
    per_image = max(t2 - t1, 0.0) / (n2 - n1)
    return max(t1 - n1 * per_image, 0.0) + target * per_image


# ---------------------------------------------------------------------------------------------------------------
# Data and config


def make_shards(work: Path, image_size: int, classes: int, images: int) -> Path:
    """Training shards of synthetic images at `image_size` with `classes` classes (ImageNet's 1000 on a GPU) and
    at least `images` images, written by the production sharder (PNG, as `pixelgen shard`'s default)."""
    from pixelgen.demo_data import CLASSES, write_demo_dataset
    from pixelgen.shards import ShardSettings, build_shards

    out = work / f"shards{image_size}-{classes}"
    if (out / "manifest.json").exists():
        return out
    per_class = math.ceil(max(images, classes) / classes)
    demo = work / f"demo{image_size}"
    drawn = min(classes, len(CLASSES))
    # `images` distinct drawings (about 50 ms each at 256 px), linked into the class folders as often as needed
    write_demo_dataset(demo, resolution=image_size, per_class=math.ceil(images / drawn), num_classes=drawn,
                       progress=False)
    pool = sorted(demo.rglob("*.png"))
    folder = work / f"folder{image_size}-{classes}"
    for c in range(classes):
        (folder / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            link = folder / f"c{c:04d}" / f"{i:05d}.png"
            if not link.exists():
                os.link(pool[(c * per_class + i) % len(pool)], link)
    build_shards(folder, out, ShardSettings(resolution=image_size), workers=min(8, os.cpu_count() or 1),
                 progress=False)
    return out


def bench_config(args, size: str, shards: Path) -> dict:
    # the paper's REPA block 8 does not exist in the 6-block tiny model: depth // 3 there (the base default)
    repa = [f"loss.repa_block={SIZES[size].depth // 3}"] if SIZES[size].depth < 8 else []
    return load_config(PAPER_CONFIG, overrides=repa + [
        f"model.size={size}", f"model.image_size={args.image_size}",
        *([f"model.patch_size={args.patch_size}"] if args.patch_size else []), f"model.num_classes={args.classes}",
        "encoders.random_init=true", f"data.shards={shards}", f"data.batch_size={args.batch}",
        f"data.workers={args.workers}", f"data.shuffle_buffer={4 * args.batch}",
        f"train.device={'cuda' if args.device.startswith('cuda') else 'cpu'}",
        f"train.compile={str(args.compile).lower()}", "tracking.enabled=false",
        f"train.steps={args.warmup + args.steps + 1}"])


# ---------------------------------------------------------------------------------------------------------------
# 1. Training


@dataclass
class TrainResult:
    images_per_s: float
    step_ms: float
    jit_flops_per_image: int       # forward + backward of the JiT and the REPA projector
    encoder_flops_per_image: float  # averaged over the timed steps' gated fractions
    gated_fraction: float
    peak_mem_gib: float | None  # None off CUDA
    ckpt: Path
    world_size: int


def time_training(config: dict, run_dir: Path, warmup: int, steps: int) -> TrainResult:
    dist = distributed.init(config["train"]["device"])
    device = dist.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(config, RunFiles(run_dir), dist)
    trainer.wrap_for_training()  # torch.compile, DDP when launched by torchrun
    batches = iter(trainer.loader)
    for _ in range(warmup):
        trainer.train_step(*next(batches))
    fractions = []  # only the gated fraction is kept: holding each step's outputs would inflate peak memory
    seconds = timed(lambda: fractions.extend(trainer.train_step(*next(batches))[0].terms["gated_fraction"]
                                             for _ in range(steps)), device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    batch = config["data"]["batch_size"]
    encoders = encoder_flops(trainer.criterion, config["model"]["image_size"])
    pdino_all = not config["loss"]["pdino_gated"]
    gated = [round(fraction * batch) for fraction in fractions]
    repa = config["loss"]["repa_weight"] > 0
    encoder_total = sum(encoders.per_step(batch, g, batch if pdino_all and g else g, repa) for g in gated)
    ckpt = save_ema_checkpoint(trainer, run_dir)
    return TrainResult(images_per_s=steps * batch * dist.world_size / seconds, step_ms=1000 * seconds / steps,
                       jit_flops_per_image=denoiser_flops(trainer.denoiser).training,
                       encoder_flops_per_image=encoder_total / (steps * batch),
                       gated_fraction=sum(gated) / (steps * batch), peak_mem_gib=peak, ckpt=ckpt,
                       world_size=dist.world_size)


def save_ema_checkpoint(trainer: Trainer, run_dir: Path) -> Path:
    """final_ema.pt as `pixelgen train` writes it (checkpoint.ema_only of the full state): what sampling reads."""
    trainer.files.checkpoints.mkdir(parents=True, exist_ok=True)
    state = trainer.save(trainer.files.last)
    trainer.wait_for_save()  # the background write must not overlap the sampling timings that follow
    if state is not None:
        checkpoint.save_atomic(checkpoint.ema_only(state), trainer.files.final_ema)
    return trainer.files.final_ema


# ---------------------------------------------------------------------------------------------------------------
# 2-3. Sampling and scoring, as the jobs run


def sampling_overrides(args) -> tuple[str, ...]:
    """The paper config samples as the official sampler does (bf16, compiled, noise on the GPU); a CPU smoke run
    keeps bf16 but draws its noise on the CPU and compiles only with --compile."""
    if torch.device(args.device).type == "cuda":
        return ()
    return ("sampling.noise_device=cpu", f"sampling.compile={str(bool(args.compile)).lower()}")


def time_sampling(ckpt: Path, work: Path, sampler: str, args) -> tuple[float, Path, Path]:
    """50K-image seconds (extrapolated) of `pixelgen sample` with `sampler`-50; and the two sample folders."""
    from pixelgen.sample_job import run_sampling

    runs, folders = [], []
    for num in (args.sample_batch, args.sample_num):
        out = work / f"samples-{sampler}-{num}"
        device = torch.device(args.device)
        runs.append((num, timed(lambda: run_sampling(ckpt, num, out, sampler=sampler, steps=args.sample_steps,
                                                     batch_size=args.sample_batch, device=args.device,
                                                     progress=False, overrides=sampling_overrides(args)),
                                device)))
        folders.append(out)
    return extrapolate(*runs), folders[0], folders[1]


def time_scoring(shards: Path, samples: tuple[Path, Path], work: Path, args) -> tuple[float, float, bool]:
    """50K-image seconds (extrapolated) of `pixelgen ref-stats` on the shards and `pixelgen score` on samples,
    and whether the Inception network had real weights."""
    from pixelgen.score import ref_stats, score

    device = torch.device(args.device)
    ref_runs, score_runs = [], []
    real = False
    for num, folder in zip((args.sample_batch, args.sample_num), samples):
        ref = work / f"ref-{num}.npz"
        result = {}
        ref_runs.append((num, timed(lambda: result.update(ref_stats(shards, ref, limit=num, allow_random=True,
                                                                    device=args.device, progress=False)), device)))
        real = result["weights_real"]
        score_runs.append((num, timed(lambda: score(folder, ref, work / f"metrics-{num}.json", allow_random=True,
                                                    device=args.device, progress=False), device)))
    return extrapolate(*ref_runs), extrapolate(*score_runs), real


# ---------------------------------------------------------------------------------------------------------------
# Output


@dataclass
class Row:
    size: str
    train: TrainResult
    euler_s: float | None = None
    heun_s: float | None = None
    ref_s: float | None = None
    score_s: float | None = None
    inception_real: bool = False
    official: dict = field(default_factory=dict)


def mfu(flops_per_image: float, images_per_s: float, world: int, peak: float | None) -> str:
    return f"{flops_per_image * images_per_s / world / peak:.1%}" if peak else "n/a"


def hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.2f} h"


def minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def markdown(rows: list[Row], args, device_name: str, part: str | None, peak: float | None, inception_real) -> str:
    n = args.sample_steps
    peak_text = f"{part}, dense bf16 peak {peak / 1e12:.1f} TFLOP/s" if peak else "unknown part: no MFU"
    lines = [
        f"\n## GPU benchmark (`bench_gpu.py`, issue 13): {device_name}, random-weight encoders\n",
        f"{device_name} ({peak_text}), torch {torch.__version__}, Python {platform.python_version()}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Paper config (config/pixelgen/imagenet256.yaml) at "
        f"{args.image_size} px, {args.classes} classes, compile={args.compile}, precision auto (bf16 on "
        f"CUDA); **random-weight encoders** (LPIPS-VGG16, DINOv2-B) and "
        f"{'real' if inception_real else 'random-weight'} Inception. Training: `Trainer.train_step` on real shards, "
        f"{args.warmup} warm-up + {args.steps} timed steps, batch {args.batch}/GPU. FLOPs per image: JiT (+ REPA "
        f"projector) forward + backward from pixelgen.flops (checked against FlopCounterMode), encoders measured "
        f"with FlopCounterMode at the gated fraction drawn. Sampling/scoring: the jobs' functions at "
        f"{args.sample_batch} and {args.sample_num} images, **extrapolated** to 50K (start-up + 50K x per-image "
        f"time between the two runs).\n",
        "| size | GPUs | batch/GPU | train img/s | step ms | JiT TFLOP/img | enc TFLOP/img (gated) | MFU JiT | "
        f"MFU JiT+enc | peak mem GiB | 50K Euler-{n} | 50K Heun-{n} | 50K ref-stats | 50K score |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.train
        lines.append(
            f"| {r.size} | {t.world_size} | {args.batch} | {t.images_per_s:.1f} | {t.step_ms:.0f} | "
            f"{t.jit_flops_per_image / 1e12:.3f} | {t.encoder_flops_per_image / 1e12:.3f} ({t.gated_fraction:.0%}) | "
            f"{mfu(t.jit_flops_per_image, t.images_per_s, t.world_size, peak)} | "
            f"{mfu(t.jit_flops_per_image + t.encoder_flops_per_image, t.images_per_s, t.world_size, peak)} | "
            f"{'-' if t.peak_mem_gib is None else f'{t.peak_mem_gib:.1f}'} | {hours(r.euler_s)} | {hours(r.heun_s)} | {minutes(r.ref_s)} | "
            f"{minutes(r.score_s)} |")
    official = [r for r in rows if r.official]
    if official:
        lines += ["", "Official PixelGen code on the same device, same size and batch (its JiT + REPATrainer loss + "
                  "AdamW + EMA, random-weight encoders; its samplers under bf16 autocast, no I/O):", "",
                  f"| size | official train img/s | ours / official (train) | official 50K Euler-{n} | official / ours "
                  f"(Euler) | official 50K Heun-{n} | official / ours (Heun) |", "|---|---|---|---|---|---|---|"]
        for r in official:
            o = r.official
            lines.append(f"| {r.size} | {o['train_img_s']:.1f} | {r.train.images_per_s / o['train_img_s']:.2f} | "
                         f"{hours(o['euler_s'])} | {ratio(o['euler_s'], r.euler_s)} | {hours(o['heun_s'])} | "
                         f"{ratio(o['heun_s'], r.heun_s)} |")
    return "\n".join(lines) + "\n"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


# ---------------------------------------------------------------------------------------------------------------


def bench_size(args, size: str, work: Path, shards: Path) -> Row:
    config = bench_config(args, size, shards)
    say(f"{size}: training")
    train = time_training(config, work / f"run-{size.replace('/', '')}", args.warmup, args.steps)
    say(f"{size}: {train.images_per_s:.1f} img/s, {train.step_ms:.0f} ms/step")
    row = Row(size, train)
    if train.world_size == 1:  # the jobs below are single-process here; under torchrun only training is timed
        row.euler_s, euler_small, euler_large = time_sampling(train.ckpt, work, "euler", args)
        say(f"{size}: 50K Euler {hours(row.euler_s)}")
        row.heun_s, _, _ = time_sampling(train.ckpt, work, "heun", args)
        say(f"{size}: 50K Heun {hours(row.heun_s)}")
        row.ref_s, row.score_s, row.inception_real = time_scoring(shards, (euler_small, euler_large), work, args)
        say(f"{size}: 50K ref-stats {minutes(row.ref_s)}, score {minutes(row.score_s)}")
    if args.official_src is not None:
        from bench_gpu_official import time_official

        row.official = time_official(args.official_src, config, args)
        say(f"{size}: official {row.official}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    device_name, part, peak = device_peak(device)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        images = max(args.sample_num, 2 * args.batch * int(os.environ.get("WORLD_SIZE", "1")))
        say(f"{device_name}: shards of {images} images at {args.image_size} px in {work}")
        shards = make_shards(work, args.image_size, args.classes, images)
        rows = [bench_size(args, size, work, shards) for size in args.sizes]
    distributed.shutdown()
    if int(os.environ.get("RANK", "0")) != 0:
        return rows
    table = markdown(rows, args, device_name, part, peak, any(r.inception_real for r in rows))
    print(table)
    if not args.no_record:
        RESULTS.write_text(RESULTS.read_text() + table)
    return rows


if __name__ == "__main__":
    main()
