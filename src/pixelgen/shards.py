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
import sys
import warnings
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import PixelgenError
from .files import atomic_open, remove_stale_temps, sha256, write_atomic
from .locks import exclusive_folder
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


# PIL modes that hold more than 8 bits per pixel: convert("RGB") clips them to 255 (white) or 0 (black)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_rgb(path: Path) -> Image.Image:
    """Decode fully (so truncation is caught now) and convert any mode (L, CMYK, P, RGBA, 16-bit, float) to RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd EXIF/palette data; the image itself is fine
        with Image.open(path) as image:
            image.load()
            if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
                return wide_to_rgb(image)
            return image.convert("RGB")


def wide_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer images by the 16-bit range (0..65535), float images by [0, 1] or [0, 255]:
    scaled to 8 bits. Values outside those ranges have no known meaning: a reject with the reason."""
    values = np.asarray(image).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise ValueError("float image with NaN or infinite values")
        if low >= 0 and high <= 1:
            scale = 255.0
        elif low >= 0 and high <= 255:
            scale = 1.0
        else:
            raise ValueError(f"float image with values in [{low:g}, {high:g}]: expected [0, 1] or [0, 255]")
    else:
        if low < 0 or high > 65535:
            raise ValueError(f"integer image with values in [{low:g}, {high:g}]: expected 16-bit [0, 65535]")
        scale = 255.0 / 65535.0
    gray = np.clip(np.floor(values * scale + 0.5), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def encode(image: Image.Image, settings: ShardSettings) -> bytes:
    buffer = io.BytesIO()
    if settings.image_format == "png":
        image.save(buffer, format="PNG")
    elif settings.image_format == "npy":
        np.save(buffer, np.asarray(image, dtype=np.uint8), allow_pickle=False)
    else:
        image.save(buffer, format="JPEG", quality=settings.quality, subsampling=0)
    return buffer.getvalue()


# folders that archivers and notebooks leave behind: never classes, never images
NOT_DATA_FOLDERS = ("__MACOSX", "__pycache__")


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in NOT_DATA_FOLDERS


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.listdir decodes undecodable bytes to lone surrogates
        return False


def printable_path(path: str) -> str:
    """A path that may hold undecodable bytes, as text that JSON and terminals accept (bad bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


@dataclass
class Listing:
    classes: list[str]
    items: list[tuple[str, int]]   # (path relative to SRC, class index)
    rejected: list[dict]           # files or folders not taken, with the reason
    warnings: list[str]


def scan_image_folder(src: Path) -> Listing:
    """Classes (sorted folder names, as torchvision's ImageFolder, hidden ones such as .ipynb_checkpoints and
    __MACOSX left out), every file as (relative path, class), and what was left out and why."""
    if not src.exists():
        raise PixelgenError(f"source folder not found: {src} (pass an ImageFolder: SRC/<class>/<image>)")
    if not src.is_dir():
        raise PixelgenError(f"source is not a folder: {src} (pass an ImageFolder: SRC/<class>/<image>)")
    rejected, warnings_ = [], []
    classes = []
    for d in sorted(src.iterdir()):
        if not d.is_dir() or _is_hidden(d.name):
            continue
        if not _utf8(d.name):
            rejected.append({"path": printable_path(d.name) + "/", "reason": "folder name is not valid UTF-8"})
            continue
        classes.append(d.name)
    items = []
    for index, name in enumerate(classes):
        before = len(items)
        for root, dirs, files in os.walk(src / name):
            dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
            for file in sorted(files):
                if _is_hidden(file):
                    continue
                rel = str((Path(root) / file).relative_to(src))
                if _utf8(rel):
                    items.append((rel, index))
                else:  # cannot be a tar key or a JSON string as it is: named in the manifest, not taken
                    rejected.append({"path": printable_path(rel), "reason": "file name is not valid UTF-8"})
        if len(items) == before:
            warnings_.append(f"class folder {name!r} holds no files: the class exists but has no images")
    if not items:
        raise PixelgenError(f"no images found in {src} (expected class folders with images: SRC/<class>/<image>)")
    return Listing(classes, items, rejected, warnings_)


def list_image_folder(src: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and every file as (relative path, class): `scan_image_folder` without the rejects."""
    listing = scan_image_folder(src)
    return listing.classes, listing.items


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
                 progress: bool = True, min_images: int = 1) -> dict:
    """Shard SRC into OUT (resuming any earlier run with the same settings) and return the manifest.

    One job per OUT (a second is refused). Fewer than `min_images` usable images is an error once the manifest,
    which lists every reject, is written: an empty set must not reach training."""
    if settings.image_format not in ("png", "jpeg", "npy"):
        raise PixelgenError(f"--format must be png, jpeg or npy, got {settings.image_format!r}", exit_code=2)
    if settings.resolution < 8 or settings.shard_size < 1:
        raise PixelgenError("--resolution must be >= 8 and --shard-size >= 1", exit_code=2)
    src, out = Path(src), Path(out)
    listing = scan_image_folder(src)
    with exclusive_folder(out, "shard"):
        manifest = _build_shards_locked(src, out, settings, listing, workers, strict, progress)
    for warning in manifest.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    _check_enough_images(manifest, src, out, min_images)
    return manifest


def _check_enough_images(manifest: dict, src: Path, out: Path, min_images: int) -> None:
    n = manifest["num_samples"]
    if n >= min_images:
        return
    rejected = manifest["rejected"]
    example = f" (first: {rejected[0]['path']}: {rejected[0]['reason']})" if rejected else ""
    raise PixelgenError(f"only {n} usable images in {src}, fewer than --min-images {min_images}: "
                        f"{len(rejected)} files rejected{example}; see {out / 'manifest.json'}, fix the images "
                        f"or pass --min-images 0 to keep the set anyway")


def _build_shards_locked(src: Path, out: Path, settings: ShardSettings, listing: "Listing", workers: int,
                         strict: bool, progress: bool) -> dict:
    """The three phases of a shard job: claim OUT for these settings, write the missing shards, the manifest."""
    items = listing.items
    order = sample_order(len(items), settings.seed)
    listing_digest = hashlib.sha256("\n".join(f"{p}\t{c}" for p, c in items).encode()).hexdigest()
    remove_stale_temps(out)  # half-written tars of a killed run (one job owns OUT, unlike a sample folder)
    _claim_folder(out, {**settings.__dict__, "source_listing_sha256": listing_digest, "num_files": len(items)})
    shards = [order[i:i + settings.shard_size] for i in range(0, len(order), settings.shard_size)]
    _write_missing_shards(src, out, settings, listing, shards, workers, strict, progress)
    manifest = _manifest(out, settings, listing, len(shards))
    _write_json(out / "manifest.json", manifest)
    return manifest


def _claim_folder(out: Path, wanted: dict) -> None:
    """Record the settings and sources in a new OUT; refuse an OUT made from others, naming what differs."""
    settings_path = out / "settings.json"
    if not settings_path.exists():
        _write_json(settings_path, wanted)
        return
    existing = _read_json(settings_path, f"delete {settings_path} and rerun")
    if existing != wanted:
        changed = sorted(k for k in wanted if existing.get(k) != wanted[k])
        raise PixelgenError(f"{out} holds shards made with other settings or sources ({', '.join(changed)}); "
                            f"use a new output folder or delete {out}")


def _write_missing_shards(src: Path, out: Path, settings: ShardSettings, listing: "Listing", shards: list,
                          workers: int, strict: bool, progress: bool) -> None:
    items = listing.items
    jobs = [(k, [(g, items[g]) for g in members], src, out, settings, listing.classes, strict)
            for k, members in enumerate(shards) if not _shard_done(out, k)]
    with progress_bar(len(shards), f"shard {src.name}", unit="shard", noun="shards", initial=len(shards) - len(jobs),
                      enabled=progress) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                write_shard(job)
                bar.update(1)
        else:
            with get_context("fork").Pool(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                for _ in pool.imap_unordered(write_shard, jobs):
                    bar.update(1)


def _manifest(out: Path, settings: ShardSettings, listing: "Listing", num_shards: int) -> dict:
    """manifest.json's content, from the per-shard records the shard writers left beside their tars."""
    classes = listing.classes
    records = [json.loads((out / f"{SHARD_PATTERN.format(k)}.json").read_text()) for k in range(num_shards)]
    counts = {name: 0 for name in classes}
    source_counts = {name: 0 for name in classes}
    for _, label in listing.items:
        source_counts[classes[label]] += 1
    for record in records:
        for name, n in record["per_class"].items():
            counts[name] += n
    rejected = [rej for r in records for rej in r["rejected"]] + listing.rejected
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
        "rejected": sorted(rejected, key=lambda r: r["path"]),
    }
    warnings_ = listing.warnings + [f"class {name!r} has no usable images: all its files were rejected"
                                    for name in classes if counts[name] == 0 and source_counts[name] > 0]
    if warnings_:  # only when there are some: manifests without warnings stay byte-identical to earlier ones
        manifest["warnings"] = warnings_
    return manifest


def read_manifest(shard_dir: Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise PixelgenError(f"no manifest.json in {shard_dir}: make the shards with `pixelgen shard SRC {shard_dir}`")
    return _read_json(path, f"rerun `pixelgen shard` into {shard_dir} to write it again")


def _read_json(path: Path, fix: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PixelgenError(f"{path} is not valid JSON ({err}); {fix}") from None


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: end when the parent ends, however it ends (SIGKILL included), so no worker is left
    running or waiting forever. Linux kills the worker when its parent dies (PR_SET_PDEATHSIG); the pid check
    catches a parent that died before the request was made."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl here: the pid checks remain
    if os.getppid() != parent_pid:
        os._exit(1)


# Shard folders whose digests matched in this process, keyed by what would change if a file changed: a loader
# that builds its stream again (each epoch of ref-stats, each restart of a DataLoader) does not hash again.
_VERIFIED: set[tuple] = set()


def _verification_key(shard_dir: Path, manifest: dict) -> tuple:
    stats = []
    for shard in manifest["shards"]:
        st = (shard_dir / shard["name"]).stat()
        stats.append((shard["name"], shard["sha256"], st.st_size, st.st_mtime_ns, st.st_ino))
    return (str(shard_dir.resolve()), tuple(stats))


def verify_shards(shard_dir: Path, digests: bool = True, manifest: dict | None = None) -> dict:
    """Check a shard folder against its manifest: every shard present, the counts adding up, and with `digests`
    every tar's sha256 (a truncated tar or a flipped label byte changes it). Raises naming the first bad shard;
    returns the manifest."""
    shard_dir = Path(shard_dir)
    manifest = manifest if manifest is not None else read_manifest(shard_dir)
    missing = [s["name"] for s in manifest["shards"] if not (shard_dir / s["name"]).is_file()]
    if missing:
        raise PixelgenError(f"shard {shard_dir / missing[0]} is missing ({len(missing)} of "
                            f"{len(manifest['shards'])} missing); copy the whole folder or rebuild it with "
                            f"`pixelgen shard`")
    total = sum(s["samples"] for s in manifest["shards"])
    if total != manifest["num_samples"]:
        raise PixelgenError(f"{shard_dir / 'manifest.json'} is inconsistent: its shards hold {total} samples, "
                            f"its num_samples says {manifest['num_samples']}; rebuild the shards")
    if not digests:
        return manifest
    key = _verification_key(shard_dir, manifest)
    if key in _VERIFIED:
        return manifest
    for shard in manifest["shards"]:
        path = shard_dir / shard["name"]
        if sha256(path) != shard["sha256"]:
            raise PixelgenError(f"shard {path} is corrupt: its sha256 differs from the manifest's (truncated or "
                                f"modified since `pixelgen shard` wrote it); copy it again or rebuild the shards")
    _VERIFIED.add(key)
    return manifest
