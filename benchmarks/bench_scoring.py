"""Time the parts of `pixelgen score` separately on N synthetic samples: shard decoding (serial and with
DataLoader workers), Inception, statistics (FID mean/covariance and the sFID running statistics) and
precision/recall. The Inception has RANDOM weights (the numbers it gives mean nothing; its speed is the real
network's). Usage: python benchmarks/bench_scoring.py --num 2000 --device cpu
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pixelgen import metrics, sample_folder
from pixelgen.inception import build_inception, inception_outputs
from pixelgen.score import MAX_PR_FEATURES, PR_K, decoded_batches


def timed(label: str, device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{label:<34} {time.perf_counter() - start:8.2f} s")
    return out


def write_samples(folder: Path, num: int, side: int, shard_size: int) -> tuple[list[Path], list[int]]:
    rng = np.random.RandomState(0)
    shards, counts = [], []
    for k, start in enumerate(range(0, num, shard_size)):
        n = min(shard_size, num - start)
        images = rng.randint(0, 256, (n, side, side, 3), dtype=np.uint8)
        path = sample_folder.shard_path(folder, k)
        sample_folder.write_shard(path, list(range(start, start + n)), images, [0] * n)
        shards.append(path)
        counts.append(n)
    return shards, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=2000, help="synthetic samples (default 2000)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=4, help="decoding processes for the parallel timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    pin = device.type == "cuda"
    print(f"{args.num} samples {args.image_size}px on {device} (RANDOM-weight Inception: timings only)")
    with tempfile.TemporaryDirectory() as tmp:
        shards, counts = timed("write shards (setup)", device,
                               lambda: write_samples(Path(tmp), args.num, args.image_size, args.shard_size))

        def decode(workers):
            return sum(len(b) for b in decoded_batches(Path(tmp), shards, counts, args.batch_size, workers, pin))

        timed("decode, in-process (--workers 0)", device, lambda: decode(0))
        timed(f"decode, --workers {args.workers}", device, lambda: decode(args.workers))
        net, _ = build_inception(None, True, device)
        batches = list(decoded_batches(Path(tmp), shards, counts, args.batch_size, args.workers, pin))
        out = timed("Inception (with sFID statistics)", device,
                    lambda: inception_outputs(net, iter(batches), device, progress=False))
    timed("FID statistics (float64)", device, lambda: metrics.feature_statistics(out.features))
    timed("sFID statistics (from running)", device, lambda: out.spatial.statistics())
    reference = out.features[:MAX_PR_FEATURES]
    timed("precision/recall (adm distances)", device,
          lambda: metrics.precision_recall(reference, out.features, k=PR_K))


if __name__ == "__main__":
    main()
