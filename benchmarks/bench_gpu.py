"""GPU benchmark for issue 5 (run it where a GPU is lent; results go to benchmarks/RESULTS.md).

For each size (B/16, XL/16 at 256 px): training images/s with bf16 autocast and torch.compile, model FLOPs
utilisation (MFU: model FLOPs of forward + backward = 3 x forward, against the device's dense bf16 peak), peak
memory at per-GPU batch 32 and 64, and the time 50K samples would take with Euler-50 and Heun-50 (measured on a
few batches, extrapolated). The perceptual encoders run with random weights: their cost, not their values,
matters here. Usage:
    python benchmarks/bench_gpu.py                         # on a GPU machine
    python benchmarks/bench_gpu.py --sizes tiny --image-size 32 --device cpu --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import time

import torch

from pixelgen.config import load_config
from pixelgen.losses import PixelGenLoss
from pixelgen.denoiser import build_denoiser
from pixelgen.model import build_model, model_config
from pixelgen.solvers import sample

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def forward_flops(model, batch: int) -> float:
    """Matmul FLOPs of one forward pass (2 x MACs of every Linear/Conv on its tokens, plus attention)."""
    cfg = model.cfg
    tokens = cfg.grid ** 2 + cfg.in_context_len
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                        and m not in list(model.t_embed.modules()))
    attention = 4 * cfg.depth * tokens * tokens * cfg.width  # QK^T and AV
    return 2 * batch * (tokens * linear_params + attention)


def train_benchmark(size, image_size, batch, steps, device, compile_model):
    overrides = [f"model.size={size}", f"model.image_size={image_size}", "encoders.random_init=true",
                 "model.num_classes=1000"]
    if size == "tiny":
        overrides += ["model.patch_size=4"]
    cfg = load_config(overrides=overrides)
    net_cfg = model_config(cfg["model"])
    criterion = PixelGenLoss(cfg, net_cfg.grid, net_cfg.patch_size).to(device)
    denoiser = build_denoiser(cfg, criterion.repa_dim).to(device)
    model = denoiser.net
    opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-4)
    forward_model = torch.compile(denoiser) if compile_model else denoiser
    x = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with autocast:
            out = criterion(forward_model, x, y)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()

    for _ in range(3):  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    flops = 3 * forward_flops(model, batch)
    peak = peak_tflops(device)
    mfu = flops / seconds / (peak * 1e12) if peak else float("nan")
    return batch / seconds, mfu, peak_mem, model


@torch.no_grad()
def sampling_benchmark(model, image_size, batch, device, sampler, batches=2):
    model.eval()
    noise = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, model.cfg.num_classes, (batch,), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        sample(model, noise[:2], y[:2], sampler=sampler, steps=50)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            sample(model, noise, y, sampler=sampler, steps=50)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    per_image = (time.perf_counter() - start) / (batches * batch)
    return per_image * 50_000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["B/16", "XL/16"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# GPU benchmark on {name}, torch {torch.__version__}, {args.image_size} px, bf16, "
          f"compile={not args.no_compile}")
    print("| size | batch/GPU | train img/s | MFU | peak mem (GiB) | 50K Euler-50 | 50K Heun-50 |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for batch in args.batches:
            ips, mfu, mem, model = train_benchmark(size, args.image_size, batch, args.steps, device,
                                                   not args.no_compile)
            euler = sampling_benchmark(model, args.image_size, batch, device, "euler")
            heun = sampling_benchmark(model, args.image_size, batch, device, "heun")
            print(f"| {size} | {batch} | {ips:.1f} | {mfu:.1%} | {mem:.1f} | {euler / 3600:.2f} h | "
                  f"{heun / 3600:.2f} h |", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
