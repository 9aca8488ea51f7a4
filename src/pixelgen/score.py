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

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import metrics, sample_folder
from .errors import PixelgenError
from .files import write_atomic, write_json_atomic
from .inception import build_inception, inception_outputs, network_digest

MAX_PR_FEATURES = 10_000  # the ADM suite uses 10K reference images for precision/recall
PR_K = 3  # precision/recall's k-th nearest neighbour
MIN_IMAGES = PR_K + 1  # the k-th neighbour of a point excludes the point itself
POOL3, SPATIAL = 2048, 2023  # feature sizes: pool3 (FID, KID, precision/recall) and mixed_6/conv (sFID)
ADM_BATCH = "ADM reference batch"
# what metrics.json repeats of samples.json: the settings and the checkpoint (step, weights digest) it scores
SAMPLING_KEYS = ("sampler", "steps", "guidance", "interval", "shift", "ckpt_step", "ckpt_digest")


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


def open_samples(samples: Path) -> SampleSet:
    if not samples.exists():
        raise PixelgenError(f"samples not found: {samples}")
    if samples.suffix == ".npz":
        images = sample_folder.npz_images(samples)
        return SampleSet(samples, {}, len(images), images.shape[1:3],
                         lambda size: sample_folder.array_batches(images, size))
    manifest, shards = sample_folder.checked_shards(samples)
    counts = [sample_folder.expected_count(manifest, k) for k in range(len(shards))]
    size = manifest["image_size"]
    return SampleSet(samples, manifest, manifest["num"], (size, size),
                     lambda batch: sample_folder.batches(samples, batch, shards, counts))


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


def load_reference(ref: Path, data: dict, kind: str, net, device, batch_size: int, progress: bool) -> dict:
    """The statistics of our ref-stats file, or of the ADM reference batch (VIRTUAL_imagenet256_labeled.npz:
    arr_0 images, mu, sigma, and mu_s, sigma_s for sFID). "spatial" is None for a ref-stats file made before
    sFID was computed."""
    spatial = {"mu": data["mu_s"], "sigma": data["sigma_s"]} if "mu_s" in data and "sigma_s" in data else None
    if kind != ADM_BATCH:
        return {"mu": data["mu"], "sigma": data["sigma"], "features": data["features"], "num": int(data["num"]),
                "spatial": spatial, "weights_real": bool(data["weights_real"]), "kind": kind}
    images = data["arr_0"][:MAX_PR_FEATURES]
    batches = sample_folder.array_batches(images, batch_size)
    # the batch carries its own mu_s/sigma_s: only the pool3 features (for precision/recall, KID) are needed
    feats = inception_outputs(net, batches, device, len(images), progress, "reference batch",
                              with_spatial=False).features
    return {"mu": data["mu"], "sigma": data["sigma"], "features": feats, "num": len(data["arr_0"]),
            "spatial": spatial, "weights_real": True, "kind": kind}


def score(samples: Path, ref: Path, out: Path, *, batch_size: int = 100, weights_dir: str | None = None,
          allow_random: bool = False, device: str = "auto", mlflow_run_id: str | None = None,
          tracking_uri: str | None = None, progress: bool = True, is_mode: str = "adm",
          pr_distance: str = "adm") -> dict:
    from .distributed import pick_device

    sample_set = open_samples(Path(samples))
    data, kind = read_reference(Path(ref))
    check_comparable(sample_set, Path(ref), data, kind)
    dev = pick_device(device, 0)
    net, real = build_inception(weights_dir, allow_random, dev)
    check_same_network(Path(ref), data, net, real)
    reference = load_reference(Path(ref), data, kind, net, dev, batch_size, progress)
    outputs = inception_outputs(net, sample_set.batches(batch_size), dev, sample_set.count, progress, "score")
    manifest = sample_set.manifest
    result = assemble_metrics(outputs, reference, manifest, real, str(ref), is_mode, pr_distance)
    result["samples"] = str(samples)
    write_json_atomic(out, result)
    try:
        from .tracking import log_eval_metrics

        log_eval_metrics(result, Path(out), manifest, mlflow_run_id, tracking_uri)
    except Exception as err:  # the numbers are safe in metrics.json; a tracking hiccup must not lose them
        print(f"warning: could not log the metrics to MLflow ({type(err).__name__}: {str(err)[:200]}); "
              f"they are in {out}", file=sys.stderr)
    return result


def assemble_metrics(outputs, reference: dict, manifest: dict, real: bool, ref: str, is_mode: str,
                     pr_distance: str) -> dict:
    """metrics.json: every metric of the samples' Inception outputs against the reference, and their labels."""
    feats, logits = outputs.features, outputs.logits
    is_mean, is_std = metrics.inception_score(logits, mode=is_mode)
    kid_mean, kid_std = metrics.kid(feats, reference["features"])
    # every sample against the reference features, as the ADM evaluator (50K samples vs its 10K reference batch)
    precision, recall = metrics.precision_recall(reference["features"], feats, k=PR_K, distance=pr_distance)
    weights_real = real and reference["weights_real"] and bool(manifest.get("encoders_real", True))
    return {
        "fid": metrics.fid(metrics.feature_statistics(feats), reference),
        # None where the reference has no spatial statistics (a ref-stats file from before sFID: remake it)
        "sfid": metrics.fid(outputs.spatial.statistics(), reference["spatial"]) if reference["spatial"] else None,
        "inception_score": is_mean, "inception_score_std": is_std,
        "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
        "num_samples": len(feats), "reference": ref, "reference_kind": reference["kind"],
        "reference_num": reference["num"], "pr_k": PR_K, "pr_num_samples": len(feats),
        "is_mode": is_mode, "pr_distance": pr_distance,
        "weights": "real" if weights_real else "random",
        "comparable": weights_real,
        "inception_weights": "real" if real else "random",
        "sampling": {k: manifest[k] for k in SAMPLING_KEYS if k in manifest},
    }
