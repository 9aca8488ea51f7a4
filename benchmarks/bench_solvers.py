"""Solver error against model evaluations (NFE), on a trained checkpoint, on CPU.

Every solver (Euler, Heun, DPM-Solver++(2M)) samples the same noise and labels at about 10, 20, 50 and 100 model
evaluations per image; the error is the final image's RMSE and max |difference| in [-1, 1] pixel units against a
reference solve (by default Heun at 1000 steps, 1999 evaluations). Prints a markdown table and writes a log-log
plot, error vs NFE, one line per solver.

    PYTHONPATH=src python benchmarks/bench_solvers.py --ckpt /tmp/demo-model/final_ema.pt --num 32
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from pixelgen.sample_job import image_noise, labels_for, load_ema_model
from pixelgen.solvers import SAMPLERS, evaluations, sample

NFES = (10, 20, 50, 100)


def steps_for(sampler: str, nfe: int) -> int:
    """Steps whose cost is closest to `nfe` evaluations without exceeding it (Heun: 2 steps - 1)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def run(model, state, noise, y, sampler: str, steps: int, args) -> torch.Tensor:
    sc, flow = state["config"]["sampling"], state["config"]["flow"]
    interval = tuple(args.interval or sc["interval"])
    return sample(model, noise * flow["noise_scale"], y, sampler=sampler, steps=steps, guidance=args.guidance,
                  interval=interval, shift=args.shift, t_eps=flow["t_eps"], null_class=model.null_class)


def measure(args) -> list[dict]:
    torch.manual_seed(0)
    model, state = load_ema_model(Path(args.ckpt))
    size = model.cfg.image_size
    noise = torch.stack([image_noise(i, args.seed, (3, size, size)) for i in range(args.num)])
    y = labels_for(list(range(args.num)), model.cfg.num_classes)
    start = time.perf_counter()
    reference = run(model, state, noise, y, args.ref_sampler, args.ref_steps, args)
    print(f"reference {args.ref_sampler}-{args.ref_steps}: {time.perf_counter() - start:.0f} s")
    rows = []
    for sampler in args.samplers:
        for nfe in args.nfe:
            steps = steps_for(sampler, nfe)
            diff = run(model, state, noise, y, sampler, steps, args) - reference
            rows.append({"sampler": sampler, "steps": steps, "nfe": evaluations(sampler, steps),
                         "rmse": diff.pow(2).mean().sqrt().item(), "max": diff.abs().max().item()})
            print(f"{sampler}-{steps}: NFE {rows[-1]['nfe']}, RMSE {rows[-1]['rmse']:.5f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| solver | steps | NFE | RMSE | max abs |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['rmse']:.5f} | {r['max']:.4f} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on the machines this runs on
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == sampler]
        ax.loglog([r["nfe"] for r in mine], [r["rmse"] for r in mine], "o-", label=sampler)
    ax.set(xlabel="model evaluations per image (NFE)", ylabel="RMSE vs reference ([-1, 1] units)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="/tmp/demo-model/final_ema.pt", help="EMA checkpoint (final_ema.pt)")
    p.add_argument("--num", type=int, default=32, help="images (same noise and labels for every solver)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES), help="evaluation budgets per image")
    p.add_argument("--ref-sampler", default="heun", choices=SAMPLERS)
    p.add_argument("--ref-steps", type=int, default=1000)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guidance interval (default: the checkpoint's)")
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--plot", default=str(Path(__file__).with_name("solvers_error_vs_nfe.png")))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.num} images, "
          f"reference {args.ref_sampler}-{args.ref_steps}, guidance {args.guidance}, "
          f"interval {args.interval or 'checkpoint'}, shift {args.shift}\n")
    print(table(rows))
    plot(rows, Path(args.plot), f"{Path(args.ckpt).name}: error vs NFE")
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
