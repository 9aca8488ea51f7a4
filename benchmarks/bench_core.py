"""CPU benchmark of the core library with the tiny model (issue 3).

1. One full training step (loss forward + backward + AdamW) with the noise gate at 0.3 against the same step
   with the gate at 0.0 (perceptual losses on every sample), and against no perceptual losses at all, so the
   perceptual share of the step can be read off.
2. Sampling at guidance 1.0 against guidance 1.5 (interval (0.1, 0.9] and the full interval).

Encoders are randomly initialised (timing does not depend on weight values) with the real architectures:
LPIPS-VGG16 and DINOv2-B at 14 x the token grid. Usage: python benchmarks/bench_core.py [--help]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from pixelgen.config import load_config
from pixelgen.losses import PixelGenLoss
from pixelgen.denoiser import build_denoiser
from pixelgen.model import build_model, model_config
from pixelgen.solvers import sample


def time_it(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_time(overrides, batch, repeats):
    torch.manual_seed(0)
    cfg = load_config(overrides=["encoders.random_init=true", *overrides])
    net_cfg = model_config(cfg["model"])
    criterion = PixelGenLoss(cfg, net_cfg.grid, net_cfg.patch_size)
    model = build_denoiser(cfg, criterion.repa_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = net_cfg.image_size
    x = torch.rand(batch, 3, size, size) * 2 - 1
    y = torch.randint(0, net_cfg.num_classes, (batch,))
    gen = torch.Generator()

    def step():
        gen.manual_seed(0)  # the same t draw every repeat, so the gated fraction is the same for every config
        out = criterion(model, x, y, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        return out

    seconds = time_it(step, repeats)
    return seconds, step().terms["gated_fraction"]


def sampling_time(guidance, interval, batch, steps, repeats):
    torch.manual_seed(0)
    cfg = load_config()
    model = build_model(cfg["model"]).eval()
    size = model.cfg.image_size
    noise = torch.randn(batch, 3, size, size)
    y = torch.randint(0, model.cfg.num_classes, (batch,))
    return time_it(lambda: sample(model, noise, y, sampler="euler", steps=steps, guidance=guidance, interval=interval,
                                  null_class=model.null_class), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# core benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, tiny JiT at 32 px, batch {args.batch}")
    none_s, _ = train_step_time(["loss.lpips_weight=0", "loss.pdino_weight=0"], args.batch, args.repeats)
    gate0_s, frac0 = train_step_time(["loss.gate=0.0"], args.batch, args.repeats)
    gate3_s, frac3 = train_step_time(["loss.gate=0.3"], args.batch, args.repeats)
    print(f"train step, no perceptual losses : {none_s * 1000:8.1f} ms")
    print(f"train step, gate 0.0 (all {frac0:.0%})   : {gate0_s * 1000:8.1f} ms")
    print(f"train step, gate 0.3 ({frac3:.0%} gated)  : {gate3_s * 1000:8.1f} ms")
    print(f"ratio full step gate0.3/gate0.0        : {gate3_s / gate0_s:.2f}")
    print(f"ratio perceptual part gate0.3/gate0.0  : {(gate3_s - none_s) / (gate0_s - none_s):.2f} "
          f"(expected ~ gated fraction {frac3:.2f})")

    g1 = sampling_time(1.0, (0.1, 0.9), args.sample_batch, args.preview_steps, args.repeats)
    g15 = sampling_time(1.5, (0.1, 0.9), args.sample_batch, args.preview_steps, args.repeats)
    g15_full = sampling_time(1.5, (0.0, 1.0), args.sample_batch, args.preview_steps, args.repeats)
    n = args.sample_batch
    print(f"sampling Euler-{args.preview_steps}, guidance 1.0          : {g1:6.2f} s ({n / g1:6.1f} img/s)")
    print(f"sampling Euler-{args.preview_steps}, guidance 1.5 (0.1,0.9]: {g15:6.2f} s ({n / g15:6.1f} img/s)")
    print(f"sampling Euler-{args.preview_steps}, guidance 1.5 (0,1]    : {g15_full:6.2f} s ({n / g15_full:6.1f} img/s)")
    print(f"ratio guidance1/guidance1.5 interval   : {g1 / g15:.2f} (expected 1/1.8 = 0.56: 80% of steps doubled)")
    print(f"ratio guidance1/guidance1.5 full       : {g1 / g15_full:.2f} (expected 0.5)")


if __name__ == "__main__":
    main()
