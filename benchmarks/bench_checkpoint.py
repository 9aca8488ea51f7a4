"""How long a checkpoint save blocks the training loop: a synchronous save (torch.save to a temp file, fsync,
rename: what Trainer.save did before) against the asynchronous one (async_save: the loop waits only for the
snapshot of the state to CPU memory; the write runs in a background thread).

The state is a training checkpoint's bulk: network weights, EMA weights and AdamW's two moments (4 copies of the
parameters, fp32). `--size tiny` builds the real tiny JiT and takes its state after one AdamW step; `--params N`
uses random tensors of N parameters in blocks of `--block` (XL/16 is about 675M parameters: a 10.8 GB state,
use --params 675e6 only with the memory for two such states). Usage: python benchmarks/bench_checkpoint.py [--help]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pixelgen import checkpoint
from pixelgen.async_save import AsyncWriter, snapshot

from bench_core import time_it  # benchmarks/ is on sys.path when run as a script


def tiny_state() -> dict:
    from pixelgen.ema import EMA
    from pixelgen.model import build_model

    net = build_model({"size": "tiny", "image_size": 32, "patch_size": None, "num_classes": 10, "proj_dropout": None})
    optimizer = torch.optim.AdamW(net.parameters())
    sum(p.sum() for p in net.parameters()).backward()
    optimizer.step()
    return {"model": net.state_dict(), "ema": EMA(net).state_dict(), "optimizer": optimizer.state_dict()}


def random_state(params: int, block: int) -> dict:
    sizes = [block] * (params // block) + ([params % block] if params % block else [])

    def weights():
        return {f"w{i}": torch.randn(n) for i, n in enumerate(sizes)}

    return {"model": weights(), "ema": {"shadow": weights()},
            "optimizer": {"state": {i: {"exp_avg": t, "exp_avg_sq": t.clone()}
                                    for i, t in enumerate(weights().values())}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny"], default=None, help="the real tiny JiT's state")
    parser.add_argument("--params", type=float, default=50e6, help="random state of this many parameters")
    parser.add_argument("--block", type=int, default=4_000_000, help="parameters per tensor (random state)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = tiny_state() if args.size else random_state(int(args.params), args.block)
    numel = sum(t.numel() for part in (state["model"], state["ema"]["shadow"]) for t in part.values())
    numel += sum(t.numel() for s in state["optimizer"]["state"].values() for t in s.values()
                 if isinstance(t, torch.Tensor))
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path, writer = Path(folder) / "last.pt", AsyncWriter()
        sync = time_it(lambda: checkpoint.save_atomic(state, path), args.repeats, warmup=0)

        def async_save():
            writer.wait()  # as Trainer.save: the previous write first (not timed below: measured apart)
            frozen = snapshot(state)
            writer.submit(lambda: checkpoint.save_atomic(frozen, path))

        blocked = []
        for _ in range(args.repeats):
            writer.wait()
            start = time.perf_counter()
            async_save()
            blocked.append(time.perf_counter() - start)
        writer.wait()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; state: {numel / 1e6:.1f}M fp32 values ({numel * 4 / 1e9:.2f} GB)")
    print(f"loop blocked by a save: synchronous {sync:.3f} s, asynchronous (snapshot) "
          f"{statistics.median(blocked):.3f} s ({sync / statistics.median(blocked):.1f}x less)")


if __name__ == "__main__":
    main()
