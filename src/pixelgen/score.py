"""`pixelgen ref-stats` and `pixelgen score`: Inception features (inception.py) of reference images and of
samples (sample_folder.py), and the metrics between them (metrics.py), logged to the training run when there is
one (tracking.log_eval_metrics).

Without the Inception weights, the `--allow-random-weights` flag builds a randomly initialised Inception (demo,
tests), and every number is then written with "weights": "random" and "comparable": false.

Nothing is scored that could give a silently wrong number: a sample folder must be finished and intact (every
shard that samples.json lists, with its sha256 and image count), the samples must have the reference's resolution
(ref-stats records it), both sets must have the k + 1 images that precision/recall needs, and an .npz must have
the expected arrays; otherwise a one-line error says what was expected, before any Inception work.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import metrics, sample_folder
from .errors import PixelgenError
from .files import check_writable_file, sha256, write_atomic, write_json_atomic
from .inception import build_inception, inception_outputs, network_digest

MAX_PR_FEATURES = 10_000  # the ADM suite uses 10K reference images for precision/recall
PR_K = 3  # precision/recall's k-th nearest neighbour
MIN_IMAGES = PR_K + 1  # the k-th neighbour of a point excludes the point itself
POOL3, SPATIAL = 2048, 2023  # feature sizes: pool3 (FID, KID, precision/recall) and mixed_6/conv (sFID)
ADM_BATCH = "ADM reference batch"
# what metrics.json repeats of samples.json: the settings and the checkpoint (step, weights digest) it scores
SAMPLING_KEYS = ("sampler", "steps", "guidance", "guidance_schedule", "interval", "shift", "precision", "compile",
                 "noise_device", "ckpt_step", "ckpt_digest", "nfe_per_image")


def shard_batches(shard_dir: Path, batch_size: int, limit: int | None) -> Iterator[torch.Tensor]:
    """uint8 batches of a training shard set, in stored order (the training reader, unshuffled and unflipped)."""
    from .data import ShardStream

    stream = ShardStream(shard_dir, batch_size, epochs=1, flip=False, shuffle_buffer=1)
    seen = 0
    for x, _ in stream:
        if limit is not None and seen + len(x) > limit:
            x = x[: limit - seen]
        seen += len(x)
        yield x
        if limit is not None and seen >= limit:
            return


def ref_stats(shard_dir: Path, out: Path, *, batch_size: int = 100, limit: int | None = None,
              weights_dir: str | None = None, allow_random: bool = False, device: str = "auto",
              progress: bool = True) -> dict:
    from .data import ShardStream
    from .distributed import pick_device

    check_writable_file(out, "--out")  # before the Inception work, not after it
    stream = ShardStream(shard_dir, 1)
    # `is not None`: --max 0 is zero images (refused below), not "no limit"
    total = min(stream.num_samples, limit) if limit is not None else stream.num_samples
    if total < MIN_IMAGES:
        raise PixelgenError(f"reference statistics of {total} images: precision/recall (k = {PR_K}) needs at least "
                            f"{MIN_IMAGES}; use a larger --max or more images in {shard_dir}")
    dev = pick_device(device, 0)
    net, real = build_inception(weights_dir, allow_random, dev)
    outputs = inception_outputs(net, shard_batches(Path(shard_dir), batch_size, limit), dev, total, progress,
                                "ref-stats")
    feats = outputs.features
    stats = metrics.feature_statistics(feats)
    spatial = outputs.spatial.statistics()
    keep = np.sort(np.random.RandomState(0).permutation(len(feats))[:MAX_PR_FEATURES])
    feats = feats.cpu().numpy()
    write_atomic(out, lambda f: np.savez(f, mu=stats["mu"], sigma=stats["sigma"], mu_s=spatial["mu"],
                                         sigma_s=spatial["sigma"], features=feats[keep], num=len(feats),
                                         weights_real=real, source=str(shard_dir),
                                         image_size=stream.resolution, inception_sha256=network_digest(net)))
    return {"num": len(feats), "weights_real": real}


@dataclass
class SampleSet:
    """Checked samples to score: a finished sample folder (its listed shards) or an ADM-format .npz."""

    path: Path
    manifest: dict  # samples.json ({} for an .npz)
    count: int
    image_shape: tuple[int, int]  # (H, W)
    batches: Callable[[int], Iterator[torch.Tensor]]


def open_samples(samples: Path, workers: int | None = None, pin_memory: bool = False) -> SampleSet:
    """The samples to score; a folder's shards are decoded by `workers` processes (None: default_workers)."""
    if not samples.exists():
        raise PixelgenError(f"samples not found: {samples}")
    if samples.suffix == ".npz":
        images = sample_folder.npz_images(samples)
        return SampleSet(samples, {}, len(images), images.shape[1:3],
                         lambda size: sample_folder.array_batches(images, size))
    manifest, shards = sample_folder.checked_shards(samples)
    counts = [sample_folder.expected_count(manifest, k) for k in range(len(shards))]
    size = manifest["image_size"]
    workers = default_workers(len(shards)) if workers is None else workers
    return SampleSet(samples, manifest, manifest["num"], (size, size),
                     lambda batch: decoded_batches(samples, shards, counts, batch, workers, pin_memory))


def default_workers(num_shards: int) -> int:
    """Decoding processes when --workers is not given: one per core but one (the main process feeds Inception),
    at most 8 (PNG decoding of 8 shards outruns an H100's Inception) and no more than there are shards."""
    return max(0, min(8, len(os.sched_getaffinity(0)) - 1, num_shards))


class ShardImages(torch.utils.data.Dataset):
    """Item k: the images of shard k as one uint8 (n, 3, H, W) tensor, checked to hold its manifest count. A
    map-style dataset, so the DataLoader hands shards back in index order whichever worker decoded them."""

    def __init__(self, folder: Path, shards: list[Path], counts: list[int]):
        self.folder, self.shards, self.counts = folder, shards, counts

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, k: int) -> torch.Tensor | str:
        try:
            images = [image for _, image, _ in
                      sample_folder.iter_samples(self.folder, [self.shards[k]], [self.counts[k]])]
        except PixelgenError as err:  # returned, not raised: a worker's exception reaches the user as a traceback
            return str(err)
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def decoded_batches(folder: Path, shards: list[Path], counts: list[int], batch_size: int, workers: int,
                    pin_memory: bool) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of the shards, in the order serial decoding gives (shard by shard, index
    order), decoded by `workers` DataLoader processes (0: in this process), in pinned memory if asked."""
    loader = torch.utils.data.DataLoader(ShardImages(folder, shards, counts), batch_size=None,
                                         num_workers=workers, pin_memory=pin_memory)
    pending: list[torch.Tensor] = []  # images decoded but not yet handed out, in order
    held = 0
    for shard in loader:
        if isinstance(shard, str):
            raise PixelgenError(shard)
        pending.append(shard)
        held += len(shard)
        while held >= batch_size:
            batch, pending = split_off(pending, batch_size)
            held -= batch_size
            yield pin(batch, pin_memory)
    if held:
        yield pin(torch.cat(pending), pin_memory)


def split_off(pieces: list[torch.Tensor], size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first `size` images of consecutive pieces, and the pieces that are left."""
    taken, left = [], size
    while left:
        piece = pieces.pop(0)
        taken.append(piece[:left])
        if len(piece) > left:
            pieces.insert(0, piece[left:])
        left -= len(taken[-1])
    return (taken[0] if len(taken) == 1 else torch.cat(taken)), pieces


def pin(batch: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """A batch cut from one pinned shard is a pinned view; one joined across shards is pinned again."""
    return batch.pin_memory() if pin_memory and not batch.is_pinned() else batch


def read_reference(ref: Path) -> tuple[dict, str]:
    """The arrays of our ref-stats file or of the ADM reference batch, checked; and which of the two it is."""
    if not Path(ref).is_file():
        raise PixelgenError(f"reference statistics not found: {ref} (make them with `pixelgen ref-stats SHARDS "
                            f"--out {ref}`, or pass the ADM reference batch .npz)")
    data = sample_folder.load_npz(ref, "reference statistics")
    if "features" in data:
        kind = "pixelgen ref-stats"
    elif "arr_0" in data and "mu" in data and "sigma" in data:
        kind = ADM_BATCH
    else:
        raise PixelgenError(f"{ref} is neither a pixelgen ref-stats file nor an ADM reference batch "
                            f"(expected keys mu, sigma and features or arr_0)")
    check_reference_layout(ref, data, kind)
    return data, kind


def check_reference_layout(ref: Path, data: dict, kind: str) -> None:
    expected = {"mu": (POOL3,), "sigma": (POOL3, POOL3), "mu_s": (SPATIAL,), "sigma_s": (SPATIAL, SPATIAL)}
    for key, shape in expected.items():
        if key in data and (data[key].shape != shape or data[key].dtype.kind != "f"):
            raise PixelgenError(f"{ref}: {key} is {data[key].dtype} of shape {data[key].shape}; expected float of "
                                f"shape {shape} (Inception-v3 statistics); remake it with `pixelgen ref-stats`")
    if kind == ADM_BATCH:
        sample_folder.npz_images(Path(ref), data)
        return
    features = data["features"]
    if features.ndim != 2 or features.shape[1] != POOL3 or features.dtype.kind != "f":
        raise PixelgenError(f"{ref}: features is {features.dtype} of shape {features.shape}; expected float of "
                            f"shape (N, {POOL3}); remake it with `pixelgen ref-stats`")


def reference_image_shape(data: dict, kind: str) -> tuple[int, int] | None:
    """The resolution the reference was measured at; None for a ref-stats file from before it was recorded."""
    if kind == ADM_BATCH:
        return tuple(data["arr_0"].shape[1:3])
    return (int(data["image_size"]),) * 2 if "image_size" in data else None


def check_comparable(samples: SampleSet, ref: Path, data: dict, kind: str) -> None:
    """Refuse samples the reference cannot measure: another resolution (Inception resizes both, so FID would
    compare the resizing), or fewer images than precision/recall's k-th neighbour needs."""
    shape = reference_image_shape(data, kind)
    if shape is None:
        print(f"warning: {ref} does not record its image resolution (made before it was recorded): the samples' "
              f"{samples.image_shape[0]}x{samples.image_shape[1]} cannot be checked against it; remake it with "
              f"`pixelgen ref-stats`", file=sys.stderr)
    elif tuple(samples.image_shape) != tuple(shape):
        raise PixelgenError(f"{samples.path} holds {samples.image_shape[0]}x{samples.image_shape[1]} images but "
                            f"{ref} was measured on {shape[0]}x{shape[1]} images; score against a reference of "
                            f"the samples' resolution")
    if samples.count < MIN_IMAGES:
        raise PixelgenError(f"{samples.path} has {samples.count} samples; precision/recall (k = {PR_K} nearest "
                            f"neighbours) needs at least {MIN_IMAGES}: sample more (--num)")
    num_ref = len(data["features"] if kind != ADM_BATCH else data["arr_0"])
    if num_ref < MIN_IMAGES:
        raise PixelgenError(f"{ref} has {num_ref} reference images; precision/recall (k = {PR_K}) needs at least "
                            f"{MIN_IMAGES}: remake it from more images")


def check_same_network(ref: Path, data: dict, net, real: bool) -> None:
    """Refuse to measure samples with another Inception than the one a ref-stats file was measured with."""
    if "inception_sha256" not in data:  # the ADM batch, or a ref-stats file from before this was recorded
        return
    recorded, ours = str(data["inception_sha256"]), network_digest(net)
    if recorded != ours:
        which = "the published" if real else "a random (not the published)"
        raise PixelgenError(f"{ref} was measured with another Inception network (weights {recorded[:12]}) than "
                            f"this score's, {which} one ({ours[:12]}); score with the --weights-dir / "
                            f"--allow-random-weights that ref-stats used, or remake {ref}")


def load_reference(ref: Path, data: dict, kind: str, net, device, batch_size: int, progress: bool,
                   cache_dir: Path | None = None) -> dict:
    """The statistics of our ref-stats file, or of the ADM reference batch (VIRTUAL_imagenet256_labeled.npz:
    arr_0 images, mu, sigma, and mu_s, sigma_s for sFID). "spatial" is None for a ref-stats file made before
    sFID was computed."""
    spatial = {"mu": data["mu_s"], "sigma": data["sigma_s"]} if "mu_s" in data and "sigma_s" in data else None
    if kind != ADM_BATCH:
        # on the scoring device, beside the samples' features, for precision/recall there
        features = torch.as_tensor(data["features"]).to(device)
        return {"mu": data["mu"], "sigma": data["sigma"], "features": features, "num": int(data["num"]),
                "spatial": spatial, "weights_real": bool(data["weights_real"]), "kind": kind}
    # the batch carries its own mu_s/sigma_s: only the pool3 features (for precision/recall, KID) are needed
    feats = cached_batch_features(ref, data["arr_0"][:MAX_PR_FEATURES], net, device, batch_size, progress,
                                  cache_dir)
    return {"mu": data["mu"], "sigma": data["sigma"], "features": feats, "num": len(data["arr_0"]),
            "spatial": spatial, "weights_real": True, "kind": kind}


CACHE_FORMAT = 1  # bump when what a cache file holds, or how its features are computed, changes


def feature_cache_key(ref: Path, images: np.ndarray, net, device, batch_size: int) -> dict:
    """Everything the reference batch's features depend on: the file's bytes, the network's weights, which
    images are measured, and where and how (another device or batch size may round differently)."""
    dev = torch.device(device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return {"format": CACHE_FORMAT, "reference_sha256": sha256(ref), "inception_sha256": network_digest(net),
            "images": list(images.shape), "device": where, "batch_size": batch_size, "torch": torch.__version__,
            "torch_fidelity": importlib.metadata.version("torch-fidelity")}  # it implements the Inception forward


def feature_cache_path(ref: Path, key: dict, cache_dir: Path | None) -> Path:
    """<cache_dir or the reference's folder>/<reference name>.inception-<hash of the key>.npz."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir or ref.parent) / f"{ref.name}.inception-{digest}.npz"


def read_feature_cache(path: Path, key: dict) -> np.ndarray | None:
    """The cached features if `path` holds exactly `key`'s, else None (absent, damaged or another key: the
    features are recomputed, never taken from a cache that might not be theirs)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as cache:
            recorded, feats = json.loads(str(cache["key"])), cache["features"]
    except Exception as err:  # truncated, not an .npz, missing arrays
        print(f"warning: ignoring the unreadable feature cache {path} ({type(err).__name__}); recomputing it",
              file=sys.stderr)
        return None
    if recorded != key or feats.shape != (key["images"][0], POOL3) or feats.dtype != np.float32:
        print(f"warning: the feature cache {path} is not of this reference and network; recomputing it",
              file=sys.stderr)
        return None
    return feats


def cached_batch_features(ref: Path, images: np.ndarray, net, device, batch_size: int, progress: bool,
                          cache_dir: Path | None) -> torch.Tensor:
    """pool3 features of the reference batch's images on `device`: from the cache file of this exact reference,
    network and setup when there is one, else measured and cached (atomically: concurrent scorers each write a
    whole file, and the last rename wins with the same content)."""
    key = feature_cache_key(ref, images, net, device, batch_size)
    path = feature_cache_path(ref, key, cache_dir)
    cached = read_feature_cache(path, key)
    if cached is not None:
        return torch.from_numpy(cached).to(device)
    feats = inception_outputs(net, sample_folder.array_batches(images, batch_size), device, len(images), progress,
                              "reference batch", with_spatial=False).features
    try:
        host = feats.cpu().numpy()
        write_atomic(path, lambda f: np.savez(f, key=json.dumps(key, sort_keys=True), features=host))
    except OSError as err:  # a read-only reference folder: score anyway, uncached
        print(f"warning: could not cache the reference features in {path} ({err.strerror or err}); pass "
              f"--ref-cache DIR to cache them elsewhere", file=sys.stderr)
    return feats


def score(samples: Path, ref: Path, out: Path, *, batch_size: int = 100, weights_dir: str | None = None,
          allow_random: bool = False, device: str = "auto", mlflow_run_id: str | None = None,
          tracking_uri: str | None = None, progress: bool = True, is_mode: str = "adm",
          pr_distance: str = "adm", workers: int | None = None, ref_cache: Path | None = None,
          eval_run: tuple[str, Path] | None = None, fid_sqrt: str = "adm") -> dict:
    """Score `samples` against `ref`; `workers` decode the sample shards (None: default_workers, 0: this
    process); the ADM reference batch's features are cached in `ref_cache` (default: beside `ref`).
    The metrics go to MLflow: to `eval_run` = (name, parent run id file) when given (tracking.log_eval_run),
    else to `mlflow_run_id` or the checkpoint's training run."""
    check_writable_file(out, "--out")  # before every metric is computed, not after
    if eval_run is not None and not Path(eval_run[1]).is_file():
        raise PixelgenError(f"parent run id file not found: {eval_run[1]} (run `pixelgen track-parent` first)",
                            exit_code=2)
    from .distributed import pick_device

    dev = pick_device(device, 0)
    sample_set = open_samples(Path(samples), workers, pin_memory=torch.device(dev).type == "cuda")
    data, kind = read_reference(Path(ref))
    check_comparable(sample_set, Path(ref), data, kind)
    net, real = build_inception(weights_dir, allow_random, dev)
    check_same_network(Path(ref), data, net, real)
    reference = load_reference(Path(ref), data, kind, net, dev, batch_size, progress, ref_cache)
    outputs = inception_outputs(net, sample_set.batches(batch_size), dev, sample_set.count, progress, "score")
    manifest = sample_set.manifest
    result = assemble_metrics(outputs, reference, manifest, real, str(ref), is_mode, pr_distance, fid_sqrt)
    result["samples"] = str(samples)
    write_json_atomic(out, result)
    try:
        from .tracking import log_eval_metrics, log_eval_run

        if eval_run is not None:
            log_eval_run(result, Path(out), manifest, eval_run[0], Path(eval_run[1]).read_text().strip(),
                         tracking_uri)
        else:
            log_eval_metrics(result, Path(out), manifest, mlflow_run_id, tracking_uri)
    except Exception as err:  # the numbers are safe in metrics.json; a tracking hiccup must not lose them
        print(f"warning: could not log the metrics to MLflow ({type(err).__name__}: {str(err)[:200]}); "
              f"they are in {out}", file=sys.stderr)
    return result


def assemble_metrics(outputs, reference: dict, manifest: dict, real: bool, ref: str, is_mode: str,
                     pr_distance: str, fid_sqrt: str = "adm") -> dict:
    """metrics.json: every metric of the samples' Inception outputs against the reference, and their labels."""
    feats, logits = outputs.features, outputs.logits
    is_mean, is_std = metrics.inception_score(logits, mode=is_mode)
    kid_mean, kid_std = metrics.kid(feats, reference["features"])
    # every sample against the reference features, as the ADM evaluator (50K samples vs its 10K reference batch)
    precision, recall = metrics.precision_recall(reference["features"], feats, k=PR_K, distance=pr_distance)
    weights_real = real and reference["weights_real"] and bool(manifest.get("encoders_real", True))
    return {
        "fid": metrics.fid(metrics.feature_statistics(feats), reference, fid_sqrt),
        # None where the reference has no spatial statistics (a ref-stats file from before sFID: remake it)
        "sfid": (metrics.fid(outputs.spatial.statistics(), reference["spatial"], fid_sqrt)
                 if reference["spatial"] else None),
        "inception_score": is_mean, "inception_score_std": is_std,
        "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
        "num_samples": len(feats), "reference": ref, "reference_kind": reference["kind"],
        "reference_num": reference["num"], "pr_k": PR_K, "pr_num_samples": len(feats),
        "is_mode": is_mode, "pr_distance": pr_distance, "fid_sqrt": fid_sqrt,
        "weights": "real" if weights_real else "random",
        "comparable": weights_real,
        "inception_weights": "real" if real else "random",
        "sampling": {k: manifest[k] for k in SAMPLING_KEYS if k in manifest},
    }
