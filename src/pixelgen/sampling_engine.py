"""How `pixelgen sample` runs the EMA denoiser and writes its output fast, without changing what it computes
unless a setting says so (every such setting is in the sample folder's identity, sample_folder.check_settings).

- precision "bf16": the matmul weights (nn.Linear, nn.Conv2d) are converted to bf16 once and the model runs under
  bf16 autocast, which is what the official sampler's Lightning `precision: bf16-mixed` computes (autocast casts
  fp32 weights to the same bf16 values on every call; converting them once skips that). Norms, embeddings and
  the rest stay fp32 as under autocast; the ODE state z stays fp32 and the model's output is cast back to fp32.
  TF32 is allowed on CUDA for what stays fp32. "fp32": exactly today's eager fp32 (TF32 off).
- compile: torch.compile with static shapes; the last batch of a shard is padded to the batch size so that only
  the first batch compiles (twice at most: guidance runs the model on a doubled batch).
- noise: image i's noise comes from a generator seeded by (seed, i) alone, on `sampling.noise_device` (cpu, as
  every earlier pixelgen, or cuda: no host work and copy per batch), so it is the same for any batch size or GPU
  count; CPU and CUDA generators give different numbers, hence `noise_device` in the folder identity.
- ShardWriter: PNG encoding and the atomic shard writes run in threads while the next batch samples.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import PixelgenError

PRECISIONS = ("fp32", "bf16")
NOISE_DEVICES = ("cpu", "cuda")
MATMUL_MODULES = (nn.Linear, nn.Conv2d)  # the modules autocast runs in bf16 (norms and embeddings it leaves)


def image_noise(index: int, seed: int, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """Image `index`'s noise: a generator on `device` seeded by (seed, index) only. On CPU, the same numbers as
    every earlier pixelgen; on CUDA other numbers (another generator), the same for any batch size."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=gen, device=device)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise PixelgenError(f"sampling precision must be one of {', '.join(PRECISIONS)}, got {precision!r}; "
                            f"set --precision or sampling.precision", exit_code=2)
    return precision


def check_noise_device(noise_device: str, device: torch.device, sampling: bool) -> str:
    """The noise device is a setting (recorded in the folder), so a job that samples must be able to use it."""
    if noise_device not in NOISE_DEVICES:
        raise PixelgenError(f"sampling.noise_device must be one of {', '.join(NOISE_DEVICES)}, got "
                            f"{noise_device!r}", exit_code=2)
    if sampling and noise_device == "cuda" and device.type != "cuda":
        raise PixelgenError(f"sampling.noise_device is cuda but this job samples on {device}: run it on a GPU "
                            f"(--device cuda), or sample into a new --out with --set sampling.noise_device=cpu")
    return noise_device


def convert_matmul_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the weights of the modules autocast would run in `dtype`, once, in place."""
    for module in model.modules():
        if isinstance(module, MATMUL_MODULES):
            module.to(dtype)
    return model


@contextmanager
def tf32_allowed(device: torch.device, allowed: bool):
    """TF32 for fp32 matmuls and convolutions on CUDA while sampling, restored afterwards (process-wide flags)."""
    if device.type != "cuda" or not allowed:
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclass
class Engine:
    """The denoiser as the solver calls it, (z, t, y) -> fp32 x_hat, and what sampling needs to know of it."""

    denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    image_size: int
    num_classes: int
    null_class: int
    device: torch.device
    precision: str
    static_batch: bool  # pad every batch to the batch size (compiled: one shape, no recompile)


def build_engine(model: nn.Module, device: torch.device, precision: str = "fp32", compile: bool = False,
                 compile_backend: str = "inductor") -> Engine:
    """Move `model` (eval, no grad) to `device` in `precision`, compiled or not, wrapped for the solver."""
    check_precision(precision)
    model = model.to(device)
    if precision == "bf16":
        convert_matmul_weights(model, torch.bfloat16)
    net = torch.compile(model, dynamic=False, backend=compile_backend) if compile else model

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def denoise(z, t, y):
        with autocast():
            return net(z, t, y).float()

    return Engine(denoise, model.cfg.image_size, model.cfg.num_classes, model.null_class, device, precision,
                  static_batch=compile)


def padded(batch: list[int], size: int) -> list[int]:
    """`batch` filled up to `size` by repeating its first index (rows sampled, then dropped)."""
    return batch + [batch[0]] * (size - len(batch))


class ShardWriter:
    """Encodes each finished batch's PNGs in a thread pool and writes each finished shard (atomically, the same
    bytes as sample_folder.write_shard) in a writer thread, while the caller samples the next batch. At most
    `queued` shards wait to be written, so host memory stays bounded when encoding is the slower side."""

    def __init__(self, encoders: int = 4, queued: int = 1):
        self.encode_pool = ThreadPoolExecutor(encoders, thread_name_prefix="png")
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="shard")  # own pool: it waits on encodings
        self.pending: list[tuple[Path, Future]] = []
        self.queued = queued

    def encode(self, images: np.ndarray) -> list[Future]:
        from .images import png_bytes

        return [self.encode_pool.submit(png_bytes, image) for image in images]

    def write(self, path: Path, indices: list[int], pngs: list[Future], labels: list[int]) -> list[Path]:
        """Queue shard `path`; returns the shards finished meanwhile (their errors are raised here)."""
        from .sample_folder import write_encoded_shard

        self.pending.append((path, self.write_pool.submit(
            lambda: write_encoded_shard(path, indices, [f.result() for f in pngs], labels))))
        return self.collect(keep=self.queued)

    def collect(self, keep: int = 0) -> list[Path]:
        done = []
        while len(self.pending) > keep:
            path, future = self.pending.pop(0)
            future.result()
            done.append(path)
        return done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.encode_pool.shutdown(wait=True)  # a failed run still finishes (or fails) the shards it queued
        self.write_pool.shutdown(wait=True)
