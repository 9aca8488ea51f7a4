"""Sample-quality metrics on Inception features: FID, Inception Score, KID (torch-fidelity's implementations)
and precision/recall with k = 3 nearest neighbours on Inception pool3 features, as in the ADM evaluation suite."""

from __future__ import annotations

import numpy as np
import torch


def feature_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and covariance (the FID statistics) of (N, D) features."""
    f = np.asarray(features, dtype=np.float64)
    return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}


class RunningStatistics:
    """Mean and covariance of features that arrive in batches, without keeping them (sFID's 2023-dim spatial
    features of 50K images would take 400 MB). Merges batches with Chan et al.'s pairwise update, which stays
    exact where the naive sum-of-squares formula cancels catastrophically for features with a large mean."""

    def __init__(self):
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None  # sum of outer products of deviations from the mean

    def update(self, features) -> None:
        f = np.asarray(features, dtype=np.float64)
        if len(f) == 0:
            return
        n_b, mean_b = len(f), f.mean(0)
        centred = f - mean_b
        m2_b = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.count * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def statistics(self) -> dict[str, np.ndarray]:
        """The same numbers as feature_statistics of all the features seen (unbiased covariance, like np.cov)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, got {self.count}")
        return {"mu": self.mean, "sigma": self.m2 / (self.count - 1)}


def fid(stats_a: dict, stats_b: dict) -> float:
    import warnings

    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {"mu": np.asarray(stats_a["mu"], np.float64), "sigma": np.asarray(stats_a["sigma"], np.float64)}
    b = {"mu": np.asarray(stats_b["mu"], np.float64), "sigma": np.asarray(stats_b["sigma"], np.float64)}
    with warnings.catch_warnings():
        # few samples give singular covariances; scipy warns, torch-fidelity already adds an offset and retries
        warnings.simplefilter("ignore")
        return float(fid_statistics_to_metric(a, b, False)[KEY_METRIC_FID])


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    splits = max(1, min(splits, len(logits)))
    out = isc_features_to_metric(torch.as_tensor(np.asarray(logits)), splits=splits)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def kid(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(features_a), len(features_b))
    out = kid_features_to_metric(torch.as_tensor(np.asarray(features_a)), torch.as_tensor(np.asarray(features_b)),
                                 kid_subsets=subsets, kid_subset_size=size, verbose=False, rng_seed=2020,
                                 kid_degree=3, kid_gamma=None, kid_coef0=1)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for i in range(0, len(features), chunk):
        d = torch.cdist(features[i:i + chunk], features)
        # k + 1: the nearest "neighbour" of a point is itself at distance 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    inside = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk], centres)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1000) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): precision = share of fake samples inside the real
    manifold (union of balls reaching each real point's k-th neighbour), recall = the reverse."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    precision = _inside_any_ball(f, r, _kth_neighbour_radii(r, k, chunk), chunk).double().mean().item()
    recall = _inside_any_ball(r, f, _kth_neighbour_radii(f, k, chunk), chunk).double().mean().item()
    return precision, recall
