"""A sample folder, the hand-off between `pixelgen sample` and `pixelgen score`: how it is written and read.

Layout of OUT:
    settings.json            the sampling settings and checkpoint step (a rerun must use the same ones)
    samples-000000.tar ...   shards of --shard-size images: <index>.png (uint8 RGB) and <index>.cls (label)
    samples.json             the manifest, written once every shard exists (so its presence means complete)
    samples.npz              optional, the ADM evaluator's format: arr_0 (N, H, W, 3) uint8, arr_1 (N,) labels

Every file is written atomically (pixelgen.files), so a folder never holds a torn shard under its real name.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import PixelgenError
from .files import write_atomic, write_json_atomic
from .images import png_bytes

SHARD = "samples-{:06d}.tar"
MANIFEST = "samples.json"
SETTINGS = "settings.json"
NPZ = "samples.npz"


def shard_path(out: Path, k: int) -> Path:
    return Path(out) / SHARD.format(k)


def write_shard(path: Path, indices: list[int], images: np.ndarray, labels: list[int]) -> None:
    import webdataset as wds

    def write(stream):
        writer = wds.TarWriter(stream, mtime=0)  # fixed mtime: the bytes depend on the images only
        for i, image, label in zip(indices, images, labels):
            writer.write({"__key__": f"{i:07d}", "png": png_bytes(image), "cls": str(label).encode()})
        writer.close()

    write_atomic(path, write)


def check_settings(out: Path, identity: dict, write: bool) -> None:
    """Refuse a folder sampled with other settings; record them in a new one (`write`: main process only)."""
    path = Path(out) / SETTINGS
    if path.exists() and json.loads(path.read_text()) != identity:
        raise PixelgenError(f"{out} holds samples made with other settings or another checkpoint; "
                            f"use a new --out or delete {out}")
    if write and not path.exists():
        write_json_atomic(path, identity)


def write_manifest(out: Path, manifest: dict) -> None:
    write_json_atomic(Path(out) / MANIFEST, manifest)


def read_manifest(out: Path) -> dict:
    """The manifest, or {} for a folder without one (unfinished, or an .npz given instead of a folder)."""
    path = Path(out) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def count(out: Path) -> int | None:
    return read_manifest(out).get("num")


def iter_samples(out: Path) -> Iterator[tuple[int, np.ndarray, int | None]]:
    """(index, (H, W, 3) uint8, label) for every sample, shard by shard, in index order."""
    from PIL import Image

    for tar_path in sorted(Path(out).glob("samples-*.tar")):
        members: dict[int, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(int(key), {})[ext] = tar.extractfile(member).read()
        for index in sorted(members):
            files = members[index]
            if "png" in files:
                image = np.array(Image.open(io.BytesIO(files["png"])).convert("RGB"))  # writable, for torch
                yield index, image, int(files["cls"]) if "cls" in files else None


def read_images(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """All samples in index order as (N, H, W, 3) uint8 and (N,) labels."""
    images, labels = [], []
    for _, image, label in iter_samples(out):
        images.append(image)
        labels.append(label)
    return np.stack(images), np.array(labels)


def write_npz(out: Path) -> str:
    images, labels = read_images(out)
    write_atomic(Path(out) / NPZ, lambda f: np.savez(f, arr_0=images, arr_1=labels))
    return NPZ


def array_batches(array: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """(N, H, W, 3) uint8 -> (B, 3, H, W) uint8 batches."""
    for i in range(0, len(array), batch_size):
        yield torch.from_numpy(array[i:i + batch_size]).permute(0, 3, 1, 2)


def batches(samples: Path, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of a sample folder, or of an .npz (arr_0 = (N, H, W, 3) uint8)."""
    samples = Path(samples)
    if samples.suffix == ".npz":
        yield from array_batches(np.load(samples)["arr_0"], batch_size)
        return
    if not any(samples.glob("samples-*.tar")):
        raise PixelgenError(f"no samples-*.tar in {samples}: run `pixelgen sample ... --out {samples}` first")
    batch = []
    for _, image, _ in iter_samples(samples):
        batch.append(torch.from_numpy(image).permute(2, 0, 1))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
