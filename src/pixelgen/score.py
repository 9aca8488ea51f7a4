"""`pixelgen ref-stats` and `pixelgen score`: Inception features (inception.py) of reference images and of
samples (sample_folder.py), and the metrics between them (metrics.py), logged to the training run when there is
one (tracking.log_eval_metrics).

Without the Inception weights, the `--allow-random-weights` flag builds a randomly initialised Inception (demo,
tests), and every number is then written with "weights": "random" and "comparable": false.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import metrics, sample_folder
from .errors import PixelgenError
from .files import write_atomic, write_json_atomic
from .inception import build_inception, inception_outputs

MAX_PR_FEATURES = 10_000  # the ADM suite uses 10K reference images for precision/recall


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

    dev = pick_device(device, 0)
    net, real = build_inception(weights_dir, allow_random, dev)
    total = ShardStream(shard_dir, 1).num_samples
    total = min(total, limit) if limit else total
    outputs = inception_outputs(net, shard_batches(Path(shard_dir), batch_size, limit), dev, total, progress,
                                "ref-stats")
    feats = outputs.features
    stats = metrics.feature_statistics(feats)
    spatial = outputs.spatial.statistics()
    keep = np.sort(np.random.RandomState(0).permutation(len(feats))[:MAX_PR_FEATURES])
    write_atomic(out, lambda f: np.savez(f, mu=stats["mu"], sigma=stats["sigma"], mu_s=spatial["mu"],
                                         sigma_s=spatial["sigma"], features=feats[keep], num=len(feats),
                                         weights_real=real, source=str(shard_dir)))
    return {"num": len(feats), "weights_real": real}


def load_reference(ref: Path, net, device, batch_size: int, progress: bool) -> dict:
    """Our ref-stats file, or the ADM reference batch (VIRTUAL_imagenet256_labeled.npz: arr_0 images, mu, sigma,
    and mu_s, sigma_s for sFID). "spatial" is None for a ref-stats file made before sFID was computed."""
    if not Path(ref).is_file():
        raise PixelgenError(f"reference statistics not found: {ref} (make them with `pixelgen ref-stats SHARDS "
                            f"--out {ref}`, or pass the ADM reference batch .npz)")
    data = np.load(ref)
    spatial = {"mu": data["mu_s"], "sigma": data["sigma_s"]} if "mu_s" in data and "sigma_s" in data else None
    if "features" in data:
        return {"mu": data["mu"], "sigma": data["sigma"], "features": data["features"], "num": int(data["num"]),
                "spatial": spatial, "weights_real": bool(data["weights_real"]), "kind": "pixelgen ref-stats"}
    if "arr_0" in data and "mu" in data and "sigma" in data:
        images = data["arr_0"][:MAX_PR_FEATURES]
        batches = sample_folder.array_batches(images, batch_size)
        # the batch carries its own mu_s/sigma_s: only the pool3 features (for precision/recall, KID) are needed
        feats = inception_outputs(net, batches, device, len(images), progress, "reference batch",
                                  with_spatial=False).features
        return {"mu": data["mu"], "sigma": data["sigma"], "features": feats, "num": len(data["arr_0"]),
                "spatial": spatial, "weights_real": True, "kind": "ADM reference batch"}
    raise PixelgenError(f"{ref} is neither a pixelgen ref-stats file nor an ADM reference batch "
                        f"(expected keys mu, sigma and features or arr_0)")


def score(samples: Path, ref: Path, out: Path, *, batch_size: int = 100, weights_dir: str | None = None,
          allow_random: bool = False, device: str = "auto", mlflow_run_id: str | None = None,
          tracking_uri: str | None = None, progress: bool = True, is_mode: str = "adm",
          pr_distance: str = "adm") -> dict:
    from .distributed import pick_device

    samples = Path(samples)
    if not samples.exists():
        raise PixelgenError(f"samples not found: {samples}")
    dev = pick_device(device, 0)
    net, real = build_inception(weights_dir, allow_random, dev)
    reference = load_reference(Path(ref), net, dev, batch_size, progress)
    outputs = inception_outputs(net, sample_folder.batches(samples, batch_size), dev, sample_folder.count(samples),
                                progress, "score")
    manifest = sample_folder.read_manifest(samples)
    result = assemble_metrics(outputs, reference, manifest, real, str(ref), is_mode, pr_distance)
    write_json_atomic(out, result)
    try:
        from .tracking import log_eval_metrics

        log_eval_metrics(result, Path(out), manifest, mlflow_run_id, tracking_uri)
    except Exception as err:  # the numbers are safe in metrics.json; a tracking hiccup must not lose them
        import sys

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
    precision, recall = metrics.precision_recall(reference["features"], feats, distance=pr_distance)
    weights_real = real and reference["weights_real"] and bool(manifest.get("encoders_real", True))
    return {
        "fid": metrics.fid(metrics.feature_statistics(feats), reference),
        # None where the reference has no spatial statistics (a ref-stats file from before sFID: remake it)
        "sfid": metrics.fid(outputs.spatial.statistics(), reference["spatial"]) if reference["spatial"] else None,
        "inception_score": is_mean, "inception_score_std": is_std,
        "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
        "num_samples": len(feats), "reference": ref, "reference_kind": reference["kind"],
        "reference_num": reference["num"], "pr_k": 3, "pr_num_samples": len(feats),
        "is_mode": is_mode, "pr_distance": pr_distance,
        "weights": "real" if weights_real else "random",
        "comparable": weights_real,
        "inception_weights": "real" if real else "random",
        "sampling": {k: manifest[k] for k in ("sampler", "steps", "cfg", "interval", "shift", "ckpt_step") if k in manifest},
    }
