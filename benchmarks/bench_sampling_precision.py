"""How far bf16 sampling (sampling.precision: bf16) is from fp32, and how fast each runs (issue 13).

Samples the same images (index-seeded noise, class i % C) from one checkpoint's EMA weights in fp32 and in bf16,
optionally compiled, and prints the largest uint8 pixel difference, the mean one, the share of pixels that
differ, and images per second of each. Usage:
    python benchmarks/bench_sampling_precision.py --ckpt /tmp/demo-model/final_ema.pt [--num 100] [--steps 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pixelgen.distributed import pick_device
from pixelgen.images import to_uint8
from pixelgen.sample_job import labels_for, load_ema_model
from pixelgen.sampling_engine import build_engine, image_noise, padded, tf32_allowed
from pixelgen.solvers import sample


def sample_uint8(engine, num: int, batch_size: int, steps: int, sampler: str, guidance: float) -> np.ndarray:
    out = []
    for start in range(0, num, batch_size):
        batch = list(range(start, min(start + batch_size, num)))
        run = padded(batch, batch_size) if engine.static_batch else batch
        noise = torch.stack([image_noise(i, 0, (3, engine.image_size, engine.image_size), engine.device)
                             for i in run])
        y = labels_for(run, engine.num_classes).to(engine.device)
        with tf32_allowed(engine.device, engine.precision == "bf16"):
            images = sample(engine.denoise, noise, y, sampler=sampler, steps=steps, guidance=guidance,
                            null_class=engine.null_class)
        out.append(to_uint8(images[:len(batch)]))
    return np.concatenate(out)


def timed(args, device, precision: str, compile: bool) -> tuple[np.ndarray, float]:
    model, _ = load_ema_model(args.ckpt)
    engine = build_engine(model, device, precision, compile)
    if compile:  # the one compile is not what a long run pays per image
        sample_uint8(engine, args.batch_size, args.batch_size, 2, args.sampler, args.guidance)
    start = time.perf_counter()
    images = sample_uint8(engine, args.num, args.batch_size, args.steps, args.sampler, args.guidance)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images, args.num / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/demo-model/final_ema.pt", help="checkpoint (EMA export or full)")
    parser.add_argument("--num", type=int, default=100, help="images (default 100)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50, help="solver steps (default 50)")
    parser.add_argument("--sampler", default="euler", choices=["euler", "heun"])
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="also time bf16 + torch.compile")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    device = pick_device(args.device, 0)
    print(f"{args.ckpt}: {args.num} images, {args.sampler}-{args.steps}, guidance {args.guidance}, {device}, "
          f"torch {torch.__version__}")
    runs = [("fp32", False), ("bf16", False)] + ([("bf16", True)] if args.compile else [])
    results = {run: timed(args, device, *run) for run in runs}
    reference = results[("fp32", False)][0].astype(int)
    for (precision, compile), (images, rate) in results.items():
        diff = np.abs(images.astype(int) - reference)
        print(f"{precision}{' + compile' if compile else ''}: {rate:.1f} img/s; vs fp32 max |diff| {diff.max()}, "
              f"mean {diff.mean():.4f}, pixels differing {100 * (diff > 0).mean():.2f}%")


if __name__ == "__main__":
    main()
