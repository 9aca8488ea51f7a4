"""`pixelgen sample`: class-balanced EMA samples from a checkpoint, written as shards of PNGs (+ optional .npz).

Image i has label i % num_classes and noise drawn from a generator seeded by (seed, i) alone, so the sample set
is the same whatever the batch size, the number of GPUs, or how the work is split across jobs (--part i/n).
Work is done in shards of --shard-size images (samples-000000.tar, ...), each written atomically: a rerun
after a kill writes only the missing shards. When every shard exists, the job writes samples.json (and
samples.npz in the ADM evaluator's format with --npz); running the command again once all parts are done is
the "gather" step of a scattered sampling job.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, distributed
from .config import section_over
from .errors import PixelgenError
from .images import png_bytes, to_uint8
from .model import build_model
from .sampling import evaluations, sample

SHARD = "samples-{:06d}.tar"


def image_noise(index: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)  # depends on (seed, index) only
    return torch.randn(shape, generator=gen)


def labels_for(indices: list[int], num_classes: int) -> torch.Tensor:
    """Class-balanced: image i gets class i % C, so any N that is a multiple of C has N / C per class."""
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long)


def parse_part(part: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in part.split("/"))
        assert 0 <= i < n
        return i, n
    except (ValueError, AssertionError):
        raise PixelgenError(f"--part must look like i/n with 0 <= i < n, got {part!r}", exit_code=2) from None


def load_ema_model(ckpt_path: Path):
    state = checkpoint.load(ckpt_path)
    model = build_model(state["config"]["model"])
    model.load_state_dict(state["ema"]["shadow"])
    return model.eval().requires_grad_(False), state


def write_sample_shard(path: Path, indices: list[int], images: np.ndarray, labels: list[int]) -> None:
    import webdataset as wds

    part = path.with_name(path.name + ".part")
    with open(part, "wb") as stream:
        writer = wds.TarWriter(stream, mtime=0)
        for i, image, label in zip(indices, images, labels):
            writer.write({"__key__": f"{i:07d}", "png": png_bytes(image), "cls": str(label).encode()})
        writer.close()
    os.replace(part, path)


def read_sample_images(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """All samples in index order as (N, H, W, 3) uint8 and (N,) labels."""
    import tarfile

    from PIL import Image

    images, labels = {}, {}
    for tar_path in sorted(out.glob("samples-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if ext == "png":
                    images[int(key)] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                elif ext == "cls":
                    labels[int(key)] = int(data)
    order = sorted(images)
    return np.stack([images[i] for i in order]), np.array([labels[i] for i in order])


def run_sampling(ckpt: Path, num: int, out: Path, *, sampler: str | None = None, steps: int | None = None,
                 cfg: float | None = None, interval: tuple[float, float] | None = None, shift: float | None = None,
                 batch_size: int = 64, shard_size: int = 1000, part: str = "0/1", seed: int = 0, npz: bool = False,
                 device: str = "auto", progress: bool = True, config_file: str | Path | None = None,
                 overrides: tuple[str, ...] = ()) -> dict | None:
    """Sample this job's missing shards; write the manifest (and npz) once every shard exists.
    Settings: the checkpoint's `sampling` section, then `config_file`'s and `overrides` (sampling.* only), then
    the explicit arguments."""
    from tqdm import tqdm

    if num < 1 or batch_size < 1 or shard_size < 1:
        raise PixelgenError("--num, --batch-size and --shard-size must be >= 1", exit_code=2)
    d = distributed.init(device)
    try:
        model, state = load_ema_model(Path(ckpt))
        model = model.to(d.device)
        sc = section_over(state["config"], "sampling", config_file, overrides)
        settings = {"sampler": sampler or sc["sampler"], "steps": steps or sc["steps"],
                    "cfg": sc["cfg"] if cfg is None else cfg, "interval": list(interval or sc["interval"]),
                    "shift": sc["shift"] if shift is None else shift, "seed": seed, "num": num,
                    "shard_size": shard_size, "t_eps": state["config"]["flow"]["t_eps"],
                    # the training noise scale is the sampling noise scale (official: both 1.0)
                    "noise_scale": state["config"]["flow"]["noise_scale"],
                    "corrector_interval_at": sc.get("corrector_interval_at", "t_cur")}
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        settings_file = out / "settings.json"
        identity = {**settings, "ckpt_step": state["step"]}
        if settings_file.exists() and json.loads(settings_file.read_text()) != identity:
            raise PixelgenError(f"{out} holds samples made with other settings or another checkpoint; "
                                f"use a new --out or delete {out}")
        if d.is_main and not settings_file.exists():
            tmp = settings_file.with_suffix(".json.part")
            tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
            tmp.replace(settings_file)

        part_index, parts = parse_part(part)
        n_shards = (num + shard_size - 1) // shard_size
        mine = [k for k in range(n_shards) if k % parts == part_index][d.rank::d.world_size]
        todo = [k for k in mine if not (out / SHARD.format(k)).exists()]
        size = model.cfg.image_size
        total_images = sum(min(shard_size, num - k * shard_size) for k in todo)
        with tqdm(total=total_images, desc=f"sample rank {d.rank}", unit="img",
                  disable=not (progress and d.is_main)) as bar:
            for k in todo:
                indices = list(range(k * shard_size, min((k + 1) * shard_size, num)))
                arrays, labels = [], []
                for b in range(0, len(indices), batch_size):
                    batch = indices[b:b + batch_size]
                    noise = torch.stack([image_noise(i, seed, (3, size, size)) for i in batch]).to(d.device)
                    noise = noise * settings["noise_scale"]
                    y = labels_for(batch, model.cfg.num_classes).to(d.device)
                    images = sample(model, noise, y, sampler=settings["sampler"], steps=settings["steps"],
                                    cfg=settings["cfg"], interval=tuple(settings["interval"]),
                                    shift=settings["shift"], t_eps=settings["t_eps"], null_class=model.null_class,
                                    corrector_interval_at=settings["corrector_interval_at"])
                    arrays.append(to_uint8(images))
                    labels += y.tolist()
                    bar.update(len(batch))
                write_sample_shard(out / SHARD.format(k), indices, np.concatenate(arrays), labels)
        distributed.barrier(d)
        if not d.is_main or not all((out / SHARD.format(k)).exists() for k in range(n_shards)):
            return None
        manifest = {**identity, "ckpt": str(ckpt), "num_classes": model.cfg.num_classes,
                    "image_size": size, "nfe_per_image": evaluations(settings["sampler"], settings["steps"]),
                    "shards": [SHARD.format(k) for k in range(n_shards)],
                    "encoders_real": bool(state.get("encoders_real", False)), "run_dir": str(Path(ckpt).resolve().parent.parent),
                    "tracking_uri": state["config"]["tracking"]["uri"]}
        if npz:
            images, labels = read_sample_images(out)
            tmp = out / "samples.npz.part"
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=images, arr_1=labels)
            tmp.replace(out / "samples.npz")
            manifest["npz"] = "samples.npz"
        tmp = out / "samples.json.part"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.replace(out / "samples.json")
        return manifest
    finally:
        distributed.shutdown()
