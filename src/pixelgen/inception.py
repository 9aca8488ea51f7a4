"""The frozen Inception-v3 that ref-stats and score measure images with (torch-fidelity's TF-compatible port),
beside the other frozen networks (encoders.py: LPIPS, DINOv2).

It gives pool3 features (FID, KID, precision/recall), unbiased logits (IS) and, through a forward hook, the sFID
features. The weights come from the weights directory like every other network; `allow_random` builds a randomly
initialised one instead (demo, tests), and the caller labels its numbers not comparable.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from . import metrics, weights
from .errors import PixelgenError
from .progress import progress as progress_bar

# sFID as in the ADM suite: the first 7 channels of TF-Inception's 17x17 "mixed_6/conv" map, 7 * 17 * 17 = 2023
SPATIAL_CHANNELS = 7
OUTPUTS = ["2048", "logits_unbiased"]  # torch-fidelity's names for pool3 and the unbiased logits


def build_inception(weights_dir: str | None, allow_random: bool, device) -> tuple[torch.nn.Module, bool]:
    """(network, real): torch-fidelity's Inception with pool3 ('2048') and 'logits_unbiased' outputs."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    directory = weights.weights_dir(weights_dir)
    path = directory / weights.WEIGHT_FILES["inception"].filename
    if path.is_file():
        net = FeatureExtractorInceptionV3("inception-v3-compat", OUTPUTS, feature_extractor_weights_path=str(path))
        real = weights.is_published("inception", path)
    elif allow_random:
        torch.manual_seed(0)  # the same random network every time, so random-weight numbers are repeatable
        net = _inception_from_state(weights._random_inception_state())
        real = False
    else:
        weights.weight_path("inception", directory)  # raises the one-line missing-file error
        raise AssertionError("unreachable")
    return net.eval().to(device), real


@torch.no_grad()
def network_digest(net: torch.nn.Module) -> str:
    """sha256 of the network's weights and buffers: ref-stats records it, and score measures the samples with the
    same network or not at all (features of two networks are not comparable, whatever their labels say)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(t.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _inception_from_state(state: dict):
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity loads its weights only from a path
    with tempfile.NamedTemporaryFile(suffix=".pth") as f:
        torch.save(state, f.name)
        return FeatureExtractorInceptionV3("inception-v3-compat", OUTPUTS, feature_extractor_weights_path=f.name)


@dataclass
class InceptionOutputs:
    # kept on the scoring device: statistics and precision/recall run there (metrics.py), without a host round trip
    features: torch.Tensor  # (N, 2048) pool3, float32
    logits: torch.Tensor  # (N, 1008) unbiased logits, float32
    spatial: metrics.RunningStatistics | None  # mean/covariance of the (N, 2023) sFID features, if asked for


@contextmanager
def spatial_features(net):
    """Collect the sFID features while `net` runs. The TF graph's blocks mixed, mixed_1, ..., mixed_10 are
    torch-fidelity's Mixed_5b ... Mixed_7c, so "mixed_6" is Mixed_6d and its "conv" is the 1x1 branch. Flattened
    in TF's (H, W, C) order, so that our statistics line up with the ADM reference batch's mu_s / sigma_s."""
    captured: list[torch.Tensor] = []

    def keep(module, inputs, output):
        captured.append(output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float())

    handle = net.Mixed_6d.branch1x1.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def inception_outputs(net, batches: Iterator[torch.Tensor], device, total: int | None = None,
                      progress: bool = True, desc: str = "inception", with_spatial: bool = True) -> InceptionOutputs:
    """uint8 (B, 3, H, W) batches -> pool3 features, unbiased logits and (with_spatial) the sFID statistics, all
    on `device`. Batches in pinned memory are copied without blocking, overlapping the next batch's decoding."""
    feats, logits = [], []
    spatial = metrics.RunningStatistics() if with_spatial else None
    with progress_bar(total, desc, enabled=progress) as bar, \
            (spatial_features(net) if with_spatial else nullcontext()) as maps:
        for batch in batches:
            f, l = net(batch.to(device, non_blocking=True))
            feats.append(f.float())
            logits.append(l.float())
            if spatial is not None:
                spatial.update(maps.pop())
            bar.update(len(batch))
    if not feats:
        raise PixelgenError("no images to score")
    return InceptionOutputs(torch.cat(feats), torch.cat(logits), spatial)
