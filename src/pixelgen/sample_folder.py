"""A sample folder, the hand-off between `pixelgen sample` and `pixelgen score`: how it is written and read.

Layout of OUT:
    settings.json            the sampling settings and the checkpoint (step and weights digest) the shards come
                             from; recorded by the first job, and every later job (resume, other part) must match
    samples-000000.tar ...   shards of --shard-size images: <index>.png (uint8 RGB) and <index>.cls (label)
    samples.json             the manifest, written once every shard exists (so its presence means complete); it
                             lists the shards with their sha256, and only those are read
    samples.npz              optional, the ADM evaluator's format: arr_0 (N, H, W, 3) uint8, arr_1 (N,) labels
    .part-<i>-of-<n>/        the lock of the job sampling part i/n (locks.py): one job per part, parts in parallel

Every file is written atomically (pixelgen.files), so a folder never holds a torn shard under its real name.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import PixelgenError
from .files import sha256, temp_path, write_atomic, write_json_atomic
from .images import png_bytes

SHARD = "samples-{:06d}.tar"
MANIFEST = "samples.json"
SETTINGS = "settings.json"
NPZ = "samples.npz"


def shard_path(out: Path, k: int) -> Path:
    return Path(out) / SHARD.format(k)


def write_shard(path: Path, indices: list[int], images: np.ndarray, labels: list[int]) -> None:
    write_encoded_shard(path, indices, [png_bytes(image) for image in images], labels)


def write_encoded_shard(path: Path, indices: list[int], pngs: list[bytes], labels: list[int]) -> None:
    """A shard of already encoded PNGs (sampling_engine.ShardWriter encodes them in threads)."""
    import webdataset as wds

    def write(stream):
        sink = _CutOnFailure(stream)
        writer = wds.TarWriter(sink, mtime=0)  # fixed mtime: the bytes depend on the images only
        try:
            for i, png, label in zip(indices, pngs, labels):
                writer.write({"__key__": f"{i:07d}", "png": png, "cls": str(label).encode()})
        except BaseException:
            sink.cut = True
            raise
        writer.close()

    write_atomic(path, write)


class _CutOnFailure:
    """The temp file as a tar stream sees it. A tar stream left unclosed by a failed write (a full disk) closes
    itself when collected, writing its last blocks into the temp file that write_atomic has closed and removed
    ("Exception ignored ... write to closed file" after the real error): once cut, writes go nowhere."""

    def __init__(self, stream):
        self.stream, self.cut = stream, False

    def write(self, data) -> int:
        return len(data) if self.cut else self.stream.write(data)


def part_lock_folder(out: Path, part_index: int, parts: int) -> Path:
    """The folder whose lock (locks.exclusive_folder) the job sampling part i/n holds: one per part, so the parts
    of one folder run in parallel while a second job on the same part is refused."""
    return Path(out) / f".part-{part_index}-of-{parts}"


# recorded for the refusal message only: the same weights under another path are the same checkpoint
NOT_COMPARED = ("ckpt",)
def sampled_before_recorded(key: str):
    """The value a setting recorded only since it was added (config.ADDED_KEYS: precision, compile, noise_device,
    guidance_schedule) had in every folder recorded before it: its default, which is the behaviour from before
    it existed. So those folders stay valid for runs that ask the same."""
    from .config import ADDED_KEYS, base_config

    name = f"sampling.{key}"
    return base_config()["sampling"][key] if name in ADDED_KEYS else None


def record_once(path: Path, identity: dict) -> dict:
    """Write `identity` to `path` unless a file is there, and return what `path` holds. Two parts that start
    together may both find no settings.json: os.link creates the name only if it is free, so the later one
    reads (and is compared with) the earlier one's instead of overwriting it."""
    path = Path(path)
    tmp = write_json_atomic(temp_path(path.with_name(path.name + ".new")), identity)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return json.loads(path.read_text())


def differences(recorded: dict, identity: dict) -> list[str]:
    """The compared settings whose values differ."""
    keys = sorted((set(recorded) | set(identity)) - set(NOT_COMPARED))
    return [k for k in keys if recorded_value(recorded, k) != identity.get(k)]


def recorded_value(recorded: dict, key: str):
    return recorded[key] if key in recorded else sampled_before_recorded(key)


def mismatch_message(out: Path, recorded: dict, identity: dict, keys: list[str]) -> str:
    fix = f"use a new --out, or delete {out} to resample"
    if "ckpt_digest" in keys and "ckpt_digest" not in recorded:
        return (f"{out} was sampled by an older pixelgen that did not record which weights its shards come from, "
                f"so they cannot be reused safely; {fix}")
    if "ckpt_digest" in keys or "ckpt_step" in keys:
        def ckpt(d):
            return (f"{d.get('ckpt', 'an unrecorded path')} (step {d.get('ckpt_step')}, weights "
                    f"{str(d.get('ckpt_digest'))[:12]})")
        return f"{out} holds samples of checkpoint {ckpt(recorded)}, not of {ckpt(identity)}; {fix}"
    had = ", ".join(f"{k} {recorded_value(recorded, k)}" for k in keys)
    asked = ", ".join(f"{k} {identity.get(k)}" for k in keys)
    return f"{out} holds samples made with other settings: it has {had}; this run asks {asked}; {fix}"


def check_settings(out: Path, identity: dict, write: bool) -> None:
    """Refuse a folder sampled with other settings or another checkpoint, naming what differs; record them in a
    new one (`write`). Shards without a settings.json are of unknown origin: refused, never reused."""
    path = Path(out) / SETTINGS
    if not path.exists() and any(Path(out).glob("samples-*.tar")):
        raise PixelgenError(f"{out} holds sample shards but no {SETTINGS}, so their checkpoint and settings are "
                            f"unknown; use a new --out, or delete the shards in {out} to resample")
    if write:
        recorded = record_once(path, identity)
    elif path.exists():
        recorded = json.loads(path.read_text())
    else:
        return
    keys = differences(recorded, identity)
    if keys:
        raise PixelgenError(mismatch_message(out, recorded, identity, keys))


def reset(out: Path, identity: dict) -> str:
    """Make `out` a folder for `identity` (one checkpoint, one set of settings) and return what was done:
    "kept" (it already was), "replaced" (samples of another checkpoint or other settings, or shards of unknown
    origin, deleted) or "new". For a folder a workflow owns: Snakemake runs it once whenever the checkpoint is
    retrained, before the parts, so a retrain never meets a refusal (or, worse, old samples). Refused while a
    part of the folder is running (each part's lock is taken for the reset)."""
    from contextlib import ExitStack

    from .locks import exclusive_folder

    out = Path(out)
    path = out / SETTINGS
    with ExitStack() as locks:
        for folder in sorted(out.glob(".part-*-of-*")):
            locks.enter_context(exclusive_folder(folder, "sample --reset"))
        if path.exists() and not differences(json.loads(path.read_text()), identity):
            return "kept"
        leftovers = [*out.glob("samples-*.tar"), out / MANIFEST, out / NPZ, out / "noise_gpu.json", path]
        existed = any(f.exists() for f in leftovers)
        for f in leftovers:
            f.unlink(missing_ok=True)
        record_once(path, identity)
        return "replaced" if existed else "new"


def write_manifest(out: Path, manifest: dict) -> None:
    write_json_atomic(Path(out) / MANIFEST, manifest)


def read_manifest(out: Path) -> dict:
    """The manifest, or {} for a folder without one (unfinished, or an .npz given instead of a folder)."""
    path = Path(out) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def count(out: Path) -> int | None:
    return read_manifest(out).get("num")


def shard_digests(out: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each shard, recorded in the manifest so that `score` can tell a replaced or damaged shard."""
    return {name: sha256(Path(out) / name) for name in names}


def expected_count(manifest: dict, k: int) -> int:
    """Images in shard k of a manifest: --shard-size, fewer in the last shard."""
    size = manifest["shard_size"]
    return min(size, manifest["num"] - k * size)


def checked_shards(out: Path) -> tuple[dict, list[Path]]:
    """The manifest of a finished folder and its shards, each present and (where the manifest records digests)
    with the bytes `pixelgen sample` wrote. Only the listed shards are samples: a stray samples-*.tar (an earlier,
    larger --num) is not."""
    out = Path(out)
    manifest = read_manifest(out)
    if not manifest:
        if not any(out.glob("samples-*.tar")):
            raise PixelgenError(f"no samples-*.tar in {out}: run `pixelgen sample ... --out {out}` first")
        raise PixelgenError(f"no {MANIFEST} in {out}: its sampling is unfinished (a part is still running or was "
                            f"killed); rerun the missing `pixelgen sample ... --out {out} --part i/n` jobs")
    missing = [name for name in manifest["shards"] if not (out / name).is_file()]
    if missing:
        raise PixelgenError(f"{out} lacks {', '.join(missing)} listed in {MANIFEST}; rerun `pixelgen sample` "
                            f"with the same arguments to write it again")
    for name, digest in manifest.get("shard_sha256", {}).items():
        if sha256(out / name) != digest:
            raise PixelgenError(f"{out / name} is not the shard that {MANIFEST} lists (its sha256 differs): it was "
                                f"replaced or damaged; delete it and rerun `pixelgen sample` with the same arguments")
    return manifest, [out / name for name in manifest["shards"]]


def read_shard(tar_path: Path) -> dict[int, dict[str, bytes]]:
    members: dict[int, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            members.setdefault(int(key), {})[ext] = tar.extractfile(member).read()
    return members


def iter_samples(out: Path, shards: list[Path] | None = None,
                 counts: list[int] | None = None) -> Iterator[tuple[int, np.ndarray, int | None]]:
    """(index, (H, W, 3) uint8, label) for every sample, shard by shard, in index order: of `shards` (default:
    every samples-*.tar in `out`), each checked to hold its `counts` images where given."""
    from PIL import Image

    shards = sorted(Path(out).glob("samples-*.tar")) if shards is None else shards
    for k, tar_path in enumerate(shards):
        members = {i: files for i, files in read_shard(tar_path).items() if "png" in files}
        if counts is not None and len(members) != counts[k]:
            raise PixelgenError(f"{tar_path} holds {len(members)} images where {MANIFEST} expects {counts[k]}: "
                                f"it was replaced or damaged; delete it and rerun `pixelgen sample`")
        for index in sorted(members):
            files = members[index]
            image = np.array(Image.open(io.BytesIO(files["png"])).convert("RGB"))  # writable, for torch
            yield index, image, int(files["cls"]) if "cls" in files else None


def read_images(out: Path, shards: list[Path] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All samples (of `shards`, default all) in index order as (N, H, W, 3) uint8 and (N,) labels."""
    images, labels = [], []
    for _, image, label in iter_samples(out, shards):
        images.append(image)
        labels.append(label)
    return np.stack(images), np.array(labels)


def write_npz(out: Path, shards: list[Path] | None = None) -> str:
    images, labels = read_images(out, shards)
    write_atomic(Path(out) / NPZ, lambda f: np.savez(f, arr_0=images, arr_1=labels))
    return NPZ


def array_batches(array: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """(N, H, W, 3) uint8 -> (B, 3, H, W) uint8 batches."""
    for i in range(0, len(array), batch_size):
        yield torch.from_numpy(array[i:i + batch_size]).permute(0, 3, 1, 2)


def load_npz(path: Path, what: str = "samples") -> dict:
    """The arrays of an .npz, or a one-line error for a file that is not one."""
    try:
        with np.load(path) as data:
            return dict(data)
    except FileNotFoundError:
        raise PixelgenError(f"{what} not found: {path}") from None
    except Exception as err:  # not a zip, a pickle (object arrays), truncated
        raise PixelgenError(f"{path} is not a readable .npz of {what} ({type(err).__name__}: "
                            f"{str(err)[:100]})") from None


def npz_images(path: Path, data: dict | None = None) -> np.ndarray:
    """arr_0 of an ADM-format .npz, checked to be (N, H, W, 3) uint8 images."""
    data = load_npz(path) if data is None else data
    if "arr_0" not in data:
        raise PixelgenError(f"{path} has no arr_0 (it has {', '.join(sorted(data)) or 'nothing'}); expected the ADM "
                            f"evaluator's format, arr_0 = images as (N, H, W, 3) uint8")
    images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise PixelgenError(f"{path}: arr_0 is {images.dtype} of shape {images.shape}; expected images as "
                            f"(N, H, W, 3) uint8 (channels last, values 0..255)")
    return images


def batches(samples: Path, batch_size: int, shards: list[Path] | None = None,
            counts: list[int] | None = None) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of a sample folder (its `shards`, default all), or of an .npz (arr_0 =
    (N, H, W, 3) uint8)."""
    samples = Path(samples)
    if samples.suffix == ".npz":
        yield from array_batches(npz_images(samples), batch_size)
        return
    if shards is None and not any(samples.glob("samples-*.tar")):
        raise PixelgenError(f"no samples-*.tar in {samples}: run `pixelgen sample ... --out {samples}` first")
    batch = []
    for _, image, _ in iter_samples(samples, shards, counts):
        batch.append(torch.from_numpy(image).permute(2, 0, 1))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
