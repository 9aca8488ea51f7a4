"""ImageFolder -> WebDataset shards, once: ADM center crop, RGB, lossless PNG (or JPEG), manifest with checksums.

Layout of OUT:
    shard-000000.tar ...     samples: <key>.png|jpg|npy (image), <key>.cls (class index),
                             <key>.json ({"class_name", "path"}: the class and the source path relative to SRC)
    shard-000000.json ...    per-shard record (count, sha256, rejects): written after its tar, so a shard with
                             both files is complete; a rerun after a kill redoes only shards without them
    settings.json            the settings the shards were made with (a rerun must use the same ones)
    manifest.json            the whole set: resolution, classes, counts, shards with sha256, rejected files

Sample order is a seeded permutation of the sorted file list, so every shard mixes classes and two runs with
the same settings write byte-identical shards whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import PixelgenError
from .files import atomic_open, remove_stale_temps, sha256, write_atomic
from .progress import progress as progress_bar

SHARD_PATTERN = "shard-{:06d}"


@dataclass(frozen=True)
class ShardSettings:
    resolution: int
    shard_size: int = 1000
    image_format: str = "png"  # png (lossless) | jpeg (smaller) | npy (lossless uint8 HxWx3, no decode cost)
    quality: int = 95          # JPEG quality when image_format == "jpeg"
    seed: int = 0              # sample order

    @property
    def extension(self) -> str:
        return {"png": "png", "jpeg": "jpg", "npy": "npy"}[self.image_format]


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The ADM / DiT reference crop: halve with a box filter while the short side is >= 2 * size, then a
    bicubic resize of the short side to `size`, then a center crop to size x size."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


def load_rgb(path: Path) -> Image.Image:
    """Decode fully (so truncation is caught now) and convert any mode (L, CMYK, P, RGBA) to RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd EXIF/palette data; the image itself is fine
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")


def encode(image: Image.Image, settings: ShardSettings) -> bytes:
    buffer = io.BytesIO()
    if settings.image_format == "png":
        image.save(buffer, format="PNG")
    elif settings.image_format == "npy":
        np.save(buffer, np.asarray(image, dtype=np.uint8), allow_pickle=False)
    else:
        image.save(buffer, format="JPEG", quality=settings.quality, subsampling=0)
    return buffer.getvalue()


def list_image_folder(src: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted folder names, as torchvision's ImageFolder) and every file as (relative path, class)."""
    if not src.exists():
        raise PixelgenError(f"source folder not found: {src} (pass an ImageFolder: SRC/<class>/<image>)")
    if not src.is_dir():
        raise PixelgenError(f"source is not a folder: {src} (pass an ImageFolder: SRC/<class>/<image>)")
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = []
    for index, name in enumerate(classes):
        for root, dirs, files in os.walk(src / name):
            dirs.sort()
            for file in sorted(files):
                if not file.startswith("."):
                    items.append((str((Path(root) / file).relative_to(src)), index))
    if not items:
        raise PixelgenError(f"no images found in {src} (expected class folders with images: SRC/<class>/<image>)")
    return classes, items


def sample_order(n: int, seed: int) -> list[int]:
    return np.random.RandomState(seed).permutation(n).tolist()


def write_shard(job: tuple) -> dict:
    """Write one shard (tar, then its json record). Runs in a worker process."""
    import webdataset as wds

    shard_index, entries, src, out, settings, classes, strict = job
    name = SHARD_PATTERN.format(shard_index)
    tar_path = out / f"{name}.tar"
    rejected, per_class, count = [], {}, 0
    with atomic_open(tar_path) as stream:  # an error (a --strict reject included) leaves no tar behind
        # fixed mtime/user: the tar bytes depend only on the images, so reruns are byte-identical.
        # mtime must be the int 0: a float makes tarfile add a PAX header to every member, which doubled the
        # reader's parse time (measured).
        writer = wds.TarWriter(stream, mtime=0)
        try:
            for global_index, (rel, label) in entries:
                try:
                    image = adm_center_crop(load_rgb(src / rel), settings.resolution)
                except Exception as err:  # every decode failure is a reject with its reason, never a crash
                    reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                    if strict:
                        raise PixelgenError(f"cannot read image {src / rel} ({reason}); fix or remove it, "
                                            f"or run without --strict") from None
                    rejected.append({"path": rel, "reason": reason})
                    continue
                # few members per sample: every tar member costs the reader ~50 us
                meta = json.dumps({"class_name": classes[label], "path": rel}, sort_keys=True)
                writer.write({"__key__": f"{global_index:09d}", settings.extension: encode(image, settings),
                              "cls": str(label).encode(), "json": meta.encode()})
                per_class[classes[label]] = per_class.get(classes[label], 0) + 1
                count += 1
        finally:
            writer.close()
    record = {"name": tar_path.name, "samples": count, "sha256": sha256(tar_path), "per_class": per_class,
              "rejected": rejected}
    _write_json(out / f"{name}.json", record)
    return record


def _write_json(path: Path, data) -> None:
    # the trailing newline keeps records and manifests byte-identical to those made before (DVC hashes them)
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _shard_done(out: Path, index: int) -> bool:
    name = SHARD_PATTERN.format(index)
    record_path, tar_path = out / f"{name}.json", out / f"{name}.tar"
    if not (record_path.is_file() and tar_path.is_file()):
        return False
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return False
    return record.get("sha256") == sha256(tar_path)


def build_shards(src: Path, out: Path, settings: ShardSettings, workers: int = 1, strict: bool = False,
                 progress: bool = True) -> dict:
    """Shard SRC into OUT (resuming any earlier run with the same settings) and return the manifest."""
    if settings.image_format not in ("png", "jpeg", "npy"):
        raise PixelgenError(f"--format must be png, jpeg or npy, got {settings.image_format!r}", exit_code=2)
    if settings.resolution < 8 or settings.shard_size < 1:
        raise PixelgenError("--resolution must be >= 8 and --shard-size >= 1", exit_code=2)
    src, out = Path(src), Path(out)
    classes, items = list_image_folder(src)
    order = sample_order(len(items), settings.seed)
    listing = hashlib.sha256("\n".join(f"{p}\t{c}" for p, c in items).encode()).hexdigest()
    wanted = {**settings.__dict__, "source_listing_sha256": listing, "num_files": len(items)}

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # half-written tars of a killed run (one job owns OUT, unlike a sample folder)
    settings_path = out / "settings.json"
    if settings_path.exists():
        existing = json.loads(settings_path.read_text())
        if existing != wanted:
            changed = sorted(k for k in wanted if existing.get(k) != wanted[k])
            raise PixelgenError(f"{out} holds shards made with other settings or sources ({', '.join(changed)}); "
                                f"use a new output folder or delete {out}")
    else:
        _write_json(settings_path, wanted)

    shards = [order[i:i + settings.shard_size] for i in range(0, len(order), settings.shard_size)]
    jobs = [(k, [(g, items[g]) for g in members], src, out, settings, classes, strict)
            for k, members in enumerate(shards) if not _shard_done(out, k)]
    done = len(shards) - len(jobs)
    with progress_bar(len(shards), f"shard {src.name}", unit="shard", noun="shards", initial=done,
                      enabled=progress) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                write_shard(job)
                bar.update(1)
        else:
            with get_context("fork").Pool(workers) as pool:
                for _ in pool.imap_unordered(write_shard, jobs):
                    bar.update(1)

    records = [json.loads((out / f"{SHARD_PATTERN.format(k)}.json").read_text()) for k in range(len(shards))]
    counts = {name: 0 for name in classes}
    source_counts = {name: 0 for name in classes}
    for _, label in items:
        source_counts[classes[label]] += 1
    for record in records:
        for name, n in record["per_class"].items():
            counts[name] += n
    manifest = {
        "resolution": settings.resolution,
        "image_format": settings.image_format,
        "quality": settings.quality if settings.image_format == "jpeg" else None,
        "crop": "adm_center_crop",
        "seed": settings.seed,
        "classes": classes,
        "num_samples": sum(r["samples"] for r in records),
        "counts": counts,
        "source_counts": source_counts,
        "shards": [{"name": r["name"], "samples": r["samples"], "sha256": r["sha256"]} for r in records],
        "rejected": sorted((rej for r in records for rej in r["rejected"]), key=lambda r: r["path"]),
    }
    _write_json(out / "manifest.json", manifest)
    return manifest


def read_manifest(shard_dir: Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise PixelgenError(f"no manifest.json in {shard_dir}: make the shards with `pixelgen shard SRC {shard_dir}`")
    return json.loads(path.read_text())
