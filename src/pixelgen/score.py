"""`pixelgen ref-stats` and `pixelgen score`: Inception features (torch-fidelity's TF-compatible Inception-v3)
of reference images and of samples, and the metrics between them.

The Inception weights come from the weights directory like every other network. Without them, the
`--allow-random-weights` flag builds a randomly initialised Inception (demo, tests), and every number is then
written with "weights": "random" and "comparable": false.
"""

from __future__ import annotations

import io
import json
import tarfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import metrics, weights
from .errors import PixelgenError

MAX_PR_FEATURES = 10_000  # the ADM suite uses 10K reference images for precision/recall
# sFID as in the ADM suite: the first 7 channels of TF-Inception's 17x17 "mixed_6/conv" map, 7 * 17 * 17 = 2023
SPATIAL_CHANNELS = 7


def build_inception(weights_dir: str | None, allow_random: bool, device) -> tuple[torch.nn.Module, bool]:
    """(network, real): torch-fidelity's Inception with pool3 ('2048') and 'logits_unbiased' outputs."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    directory = weights.weights_dir(weights_dir)
    path = directory / weights.WEIGHT_FILES["inception"].filename
    if path.is_file():
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(path))
        real = weights.is_published("inception", path)
    elif allow_random:
        torch.manual_seed(0)  # the same random network every time, so random-weight numbers are repeatable
        net = _inception_from_state(weights._random_inception_state())
        real = False
    else:
        weights.weight_path("inception", directory)  # raises the one-line missing-file error
        raise AssertionError("unreachable")
    return net.eval().to(device), real


def _inception_from_state(state: dict):
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with tempfile.NamedTemporaryFile(suffix=".pth") as f:
        torch.save(state, f.name)
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=f.name)


@dataclass
class InceptionOutputs:
    features: np.ndarray  # (N, 2048) pool3, float32
    logits: np.ndarray  # (N, 1008) unbiased logits, float32
    spatial: metrics.RunningStatistics | None  # mean/covariance of the (N, 2023) sFID features, if asked for


@contextmanager
def spatial_features(net):
    """Collect the sFID features while `net` runs. The TF graph's blocks mixed, mixed_1, ..., mixed_10 are
    torch-fidelity's Mixed_5b ... Mixed_7c, so "mixed_6" is Mixed_6d and its "conv" is the 1x1 branch. Flattened
    in TF's (H, W, C) order, so that our statistics line up with the ADM reference batch's mu_s / sigma_s."""
    captured: list[torch.Tensor] = []

    def keep(module, inputs, output):
        captured.append(output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float().cpu())

    handle = net.Mixed_6d.branch1x1.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def inception_outputs(net, batches: Iterator[torch.Tensor], device, total: int | None = None,
                      progress: bool = True, desc: str = "inception", with_spatial: bool = True) -> InceptionOutputs:
    """uint8 (B, 3, H, W) batches -> pool3 features, unbiased logits and (with_spatial) the sFID statistics."""
    from tqdm import tqdm

    feats, logits = [], []
    spatial = metrics.RunningStatistics() if with_spatial else None
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar, \
            (spatial_features(net) if with_spatial else nullcontext()) as maps:
        for batch in batches:
            f, l = net(batch.to(device))
            feats.append(f.float().cpu().numpy())
            logits.append(l.float().cpu().numpy())
            if spatial is not None:
                spatial.update(maps.pop().numpy())
            bar.update(len(batch))
    if not feats:
        raise PixelgenError("no images to score")
    return InceptionOutputs(np.concatenate(feats), np.concatenate(logits), spatial)


def shard_batches(shard_dir: Path, batch_size: int, limit: int | None) -> Iterator[torch.Tensor]:
    """uint8 batches of a training shard set, in stored order."""
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


def sample_batches(samples: Path, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches of a sample folder (samples-*.tar) or an .npz (arr_0 = (N, H, W, 3) uint8)."""
    from PIL import Image

    if samples.suffix == ".npz":
        array = np.load(samples)["arr_0"]
        for i in range(0, len(array), batch_size):
            yield torch.from_numpy(array[i:i + batch_size]).permute(0, 3, 1, 2)
        return
    tars = sorted(samples.glob("samples-*.tar"))
    if not tars:
        raise PixelgenError(f"no samples-*.tar in {samples}: run `pixelgen sample ... --out {samples}` first")
    batch = []
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    batch.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
                    if len(batch) == batch_size:
                        yield torch.stack(batch)
                        batch = []
    if batch:
        yield torch.stack(batch)


def count_samples(samples: Path) -> int | None:
    manifest = samples / "samples.json"
    return json.loads(manifest.read_text())["num"] if manifest.exists() else None


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
    keep = np.random.RandomState(0).permutation(len(feats))[:MAX_PR_FEATURES]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as f:
        np.savez(f, mu=stats["mu"], sigma=stats["sigma"], mu_s=spatial["mu"], sigma_s=spatial["sigma"],
                 features=feats[np.sort(keep)],
                 num=len(feats), weights_real=real, source=str(shard_dir))
    tmp.replace(out)
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
        batches = (torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2)
                   for i in range(0, len(images), batch_size))
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
    outputs = inception_outputs(net, sample_batches(samples, batch_size), dev, count_samples(samples),
                                progress, "score")
    feats, logits = outputs.features, outputs.logits
    is_mean, is_std = metrics.inception_score(logits, mode=is_mode)
    kid_mean, kid_std = metrics.kid(feats, reference["features"])
    # every sample against the reference features, as the ADM evaluator (50K samples vs its 10K reference batch)
    precision, recall = metrics.precision_recall(reference["features"], feats, distance=pr_distance)
    manifest = json.loads((samples / "samples.json").read_text()) if (samples / "samples.json").exists() else {}
    weights_real = real and reference["weights_real"] and bool(manifest.get("encoders_real", True))
    result = {
        "fid": metrics.fid(metrics.feature_statistics(feats), reference),
        # None where the reference has no spatial statistics (a ref-stats file from before sFID: remake it)
        "sfid": metrics.fid(outputs.spatial.statistics(), reference["spatial"]) if reference["spatial"] else None,
        "inception_score": is_mean, "inception_score_std": is_std,
        "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
        "num_samples": len(feats), "reference": str(ref), "reference_kind": reference["kind"],
        "reference_num": reference["num"], "pr_k": 3, "pr_num_samples": len(feats),
        "is_mode": is_mode, "pr_distance": pr_distance,
        "weights": "real" if weights_real else "random",
        "comparable": weights_real,
        "inception_weights": "real" if real else "random",
        "sampling": {k: manifest[k] for k in ("sampler", "steps", "cfg", "interval", "shift", "ckpt_step") if k in manifest},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.replace(out)
    try:
        _log_to_training_run(result, out, manifest, mlflow_run_id, tracking_uri)
    except Exception as err:  # the numbers are safe in metrics.json; a tracking hiccup must not lose them
        import sys

        print(f"warning: could not log the metrics to MLflow ({type(err).__name__}: {str(err)[:200]}); "
              f"they are in {out}", file=sys.stderr)
    return result


def _log_to_training_run(result: dict, out: Path, manifest: dict, run_id: str | None, uri: str | None) -> None:
    """Attach the metrics to the training run (found through the checkpoint's run dir) when there is one."""
    if run_id is None and manifest.get("run_dir"):
        id_file = Path(manifest["run_dir"]) / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
    if run_id is None:
        return
    uri = uri or manifest.get("tracking_uri")
    from mlflow import MlflowClient

    from .tracking import tracking_uri, with_retries

    client = MlflowClient(tracking_uri=tracking_uri(uri))
    import time

    from mlflow.entities import Metric

    step = int(result["sampling"].get("ckpt_step", 0))
    now = int(time.time() * 1000)
    keys = ("fid", "sfid", "inception_score", "kid", "precision", "recall")
    with_retries(client.log_batch, run_id, metrics=[Metric(f"eval/{k}", float(result[k]), now, step)
                                                    for k in keys if result[k] is not None])
    with_retries(client.set_tag, run_id, "eval_weights", result["weights"])
    with_retries(client.log_artifact, run_id, str(out), "eval")
