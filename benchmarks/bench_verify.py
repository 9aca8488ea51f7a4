"""Cost of the shard digest check that train and ref-stats run at start (issue 12): seconds for a shard set,
MB/s, and the time it extrapolates to for a 10 GB set.

Usage: python benchmarks/bench_verify.py --src ../shared/data/tiny-imagenet-20/train [--resolution 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pixelgen import shards
from pixelgen.shards import ShardSettings, build_shards, verify_shards


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        build_shards(Path(args.src), out, ShardSettings(args.resolution), workers=2, progress=False)
        size = sum(p.stat().st_size for p in out.glob("*.tar"))
        times = []
        for _ in range(args.repeats):
            shards._VERIFIED.clear()  # measure the hashing, not the in-process memo
            start = time.perf_counter()
            verify_shards(out, digests=True)
            times.append(time.perf_counter() - start)
        best = min(times)
        rate = size / best / 1e6
        print(f"{len(list(out.glob('*.tar')))} shards, {size / 1e6:.1f} MB: {best:.3f} s (best of {args.repeats}), "
              f"{rate:.0f} MB/s, 10 GB extrapolated: {10e9 / (rate * 1e6):.0f} s")


if __name__ == "__main__":
    main()
