"""CPU throughput of the sample and score jobs with the tiny model (issue 5), and guidance cost.

Usage: python benchmarks/bench_jobs.py [--num 256] [--steps 50]
Sampling: images/s of `pixelgen sample` work (Euler-50 and Heun-50 at guidance 1, Euler-50 at guidance 1.5)
on a freshly initialised tiny JiT at 32 px. Scoring: images/s through torch-fidelity's Inception (random
weights; the architecture and input resizing to 299 px are the real ones, so the cost is too).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pixelgen.config import load_config
from pixelgen.model import build_model
from pixelgen.solvers import sample
from pixelgen.score import build_inception, inception_outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(load_config()["model"]).eval()
    with torch.no_grad():  # off the zero init so the work is representative
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    size = model.cfg.image_size
    print(f"# jobs benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, tiny JiT {size} px, "
          f"{args.num} images, batch {args.batch}")
    timings = {}
    for name, sampler, guidance in [("euler", "euler", 1.0), ("heun", "heun", 1.0), ("euler_cfg1.5", "euler", 1.5)]:
        start = time.perf_counter()
        for i in range(0, args.num, args.batch):
            noise = torch.randn(args.batch, 3, size, size)
            y = torch.arange(args.batch) % model.cfg.num_classes
            sample(model, noise, y, sampler=sampler, steps=args.steps, guidance=guidance, interval=(0.1, 0.9),
                   null_class=model.null_class)
        timings[name] = time.perf_counter() - start
        print(f"sample {name:13s} {args.steps} steps : {args.num / timings[name]:7.1f} img/s")
    print(f"guidance 1.0 / 1.5 time ratio      : {timings['euler'] / timings['euler_cfg1.5']:.2f} "
          f"(80% of steps inside (0.1, 0.9] are doubled: expected 1/1.8 = 0.56)")
    print(f"Heun-{args.steps} / Euler-{args.steps} time ratio   : {timings['heun'] / timings['euler']:.2f} "
          f"(expected {(2 * args.steps - 1) / args.steps:.2f} from the evaluation count)")

    net, _ = build_inception("/nonexistent", True, torch.device("cpu"))
    images = torch.randint(0, 256, (args.num, 3, size, size), dtype=torch.uint8)
    batches = (images[i:i + args.batch] for i in range(0, args.num, args.batch))
    start = time.perf_counter()
    inception_outputs(net, batches, torch.device("cpu"), progress=False)
    print(f"score (Inception features)         : {args.num / (time.perf_counter() - start):7.1f} img/s")


if __name__ == "__main__":
    main()
