"""Sample-quality metrics on Inception features: FID and KID (torch-fidelity's implementations), and the
Inception Score and precision/recall (k = 3 nearest neighbours on pool3 features) as the ADM evaluation suite
(openai/guided-diffusion evaluations/evaluator.py) computes them."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


def _host(x) -> np.ndarray:
    """A numpy array of `x`, wherever it lives (features may stay on the scoring device until a host metric)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _float64(features) -> torch.Tensor:
    """(N, D) features as a float64 tensor on their own device (a numpy array stays on the CPU)."""
    return torch.as_tensor(features).to(torch.float64)


def feature_statistics(features) -> dict[str, np.ndarray]:
    """Mean and covariance (the FID statistics) of (N, D) features, numpy or a tensor on any device: computed
    there in float64 (what the ADM evaluator's np.cov does), returned as float64 numpy arrays."""
    f = _float64(features)
    mu = f.mean(0)
    centred = f - mu
    # np.cov's unbiased estimate, centred before the product like np.cov (no sum-of-squares cancellation)
    stats = {"mu": _host(mu), "sigma": _host(centred.T @ centred / (len(f) - 1))}
    return stats | _low_rank_factor(centred, len(f))


def _low_rank_factor(centred: torch.Tensor, count: int) -> dict[str, np.ndarray]:
    """{"factor": F} with sigma = F^T F, where fewer samples than dimensions make it the cheaper form of sigma
    (FID's eigh trace then needs an N x N eigenproblem, not a D x D one: _trace_sqrt_product); {} otherwise."""
    if count > centred.shape[1]:
        return {}
    return {"factor": _host(centred / (count - 1) ** 0.5)}


class RunningStatistics:
    """Mean and covariance of features that arrive in batches, without keeping them (sFID's 2023-dim spatial
    features of 50K images would take 400 MB). Merges batches with Chan et al.'s pairwise update, which stays
    exact where the naive sum-of-squares formula cancels catastrophically for features with a large mean.
    Accumulates in float64 on the device the batches come from (numpy batches: the CPU)."""

    def __init__(self):
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None  # sum of outer products of deviations from the mean
        self.rows: list[torch.Tensor] | None = []  # the features themselves while they are fewer than their dims

    def update(self, features) -> None:
        f = _float64(features)
        if len(f) == 0:
            return
        if self.rows is not None:
            self.rows.append(f)
            if self.count + len(f) > f.shape[1]:  # as many samples as dims: the factor saves nothing any more
                self.rows = None
        n_b, mean_b = len(f), f.mean(0)
        centred = f - mean_b
        m2_b = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + torch.outer(delta, delta) * (self.count * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def statistics(self) -> dict[str, np.ndarray]:
        """The same numbers as feature_statistics of all the features seen (unbiased covariance, like np.cov)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, got {self.count}")
        stats = {"mu": _host(self.mean), "sigma": _host(self.m2 / (self.count - 1))}
        if self.rows is None:
            return stats
        return stats | _low_rank_factor(torch.cat(self.rows) - self.mean, self.count)


FID_SQRT_MODES = ("adm", "eigh")


def fid(stats_a: dict, stats_b: dict, sqrt: str = "adm") -> float:
    """Frechet distance of two Gaussians. sqrt = adm: tr sqrtm(sigma_a sigma_b) by scipy's sqrtm, as the ADM
    evaluator (and torch-fidelity) compute it; eigh: the same trace from symmetric eigenvalues (_trace_sqrt_product),
    4-5x faster on a CPU, equal to 1e-10 or better on full-rank covariances (1e-15
    measured at 2048 dimensions) and to 1e-5 on the singular ones of a few samples."""
    import warnings

    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if sqrt not in FID_SQRT_MODES:
        raise ValueError(f"fid sqrt must be one of {', '.join(FID_SQRT_MODES)}, got {sqrt!r}")
    # the matrix square root of the 2048 x 2048 product stays on the host in float64: once per score, and exact
    a = {k: _host(stats_a[k]).astype(np.float64) for k in ("mu", "sigma")}
    b = {k: _host(stats_b[k]).astype(np.float64) for k in ("mu", "sigma")}
    if sqrt == "eigh":
        diff = a["mu"] - b["mu"]
        # the side with the low-rank factor (a few samples) goes second: its factor shrinks the eigenproblem
        (first, second), factor = ((a, b), stats_b.get("factor")) if "factor" in stats_b else ((b, a), stats_a.get("factor"))
        product = _trace_sqrt_product(first["sigma"], second["sigma"], factor)
        trace = np.trace(a["sigma"]) + np.trace(b["sigma"]) - 2 * product
        return float(diff.dot(diff) + trace)
    with warnings.catch_warnings():
        # few samples give singular covariances; scipy warns, torch-fidelity already adds an offset and retries
        warnings.simplefilter("ignore")
        return float(fid_statistics_to_metric(a, b, False)[KEY_METRIC_FID])


def _trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray, factor_b: np.ndarray | None = None) -> float:
    """tr sqrt(A B) for covariances A, B: the eigenvalues of A B are those of the symmetric A^1/2 B A^1/2 (real,
    >= 0), so two symmetric eigen-decompositions replace the general sqrtm (a Schur form of a non-symmetric
    matrix). Round-off below zero is clipped. With few samples (a singular A) it is the more accurate of the two:
    sqrtm of a singular product is ill-conditioned, which is why the ADM evaluator retries with an offset.
    Given B = F^T F with F of N < D rows, the nonzero eigenvalues of A B are those of the N x N F A F^T."""
    if factor_b is not None:
        f = _host(factor_b).astype(np.float64)
        return float(np.sqrt(np.clip(np.linalg.eigvalsh(f @ sigma_a @ f.T), 0, None)).sum())
    values, vectors = np.linalg.eigh(sigma_a)
    half = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    product = np.linalg.eigvalsh(half @ sigma_b @ half)
    return float(np.sqrt(np.clip(product, 0, None)).sum())


def inception_score(logits: np.ndarray, mode: str = "adm", split_size: int = 5000,
                    splits: int = 10) -> tuple[float, float]:
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), from the unbiased Inception logits.

    mode "adm": the ADM evaluator's protocol, contiguous splits of `split_size` images in the given order (the last
    one may be shorter). mode "torch-fidelity": torch-fidelity's, `splits` equal splits after a seeded shuffle."""
    logits = _host(logits)
    if len(logits) == 0:
        raise ValueError("the Inception Score needs at least 1 image, got 0")
    if mode == "torch-fidelity":
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

        splits = max(1, min(splits, len(logits)))
        out = isc_features_to_metric(torch.as_tensor(logits), splits=splits)
        return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]
    if mode != "adm":
        raise ValueError(f"unknown Inception Score mode {mode!r} (expected 'adm' or 'torch-fidelity')")
    x = torch.as_tensor(logits).double()
    p, log_p = x.softmax(1), x.log_softmax(1)
    scores = []
    for i in range(0, len(x), split_size):
        part, log_part = p[i:i + split_size], log_p[i:i + split_size]
        kl = part * (log_part - part.mean(0, keepdim=True).log())
        # p log p -> 0 where p underflowed to 0 (the 0 * -inf would be NaN)
        kl = torch.where(part > 0, kl, torch.zeros_like(kl))
        scores.append(kl.sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def kid(features_a, features_b, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(features_a), len(features_b))
    out = kid_features_to_metric(torch.as_tensor(_host(features_a)), torch.as_tensor(_host(features_b)),
                                 kid_subsets=subsets, kid_subset_size=size, verbose=False, rng_seed=2020,
                                 kid_degree=3, kid_gamma=None, kid_coef0=1)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def _adm_operands(x: torch.Tensor) -> tuple:
    """What ADM's DistanceBlock feeds its two graphs: the float16 values (held in float32) with their float16
    squared norms (squares rounded to float16, summed in float32), and the float32 values with theirs (fallback)."""
    x32 = x.float()
    x16 = x32.half()
    return x16.float(), (x16 * x16).float().sum(1).half(), x32, (x32 * x32).sum(1)


def _distances(a, b, distance: str) -> torch.Tensor:
    """A monotone distance between the rows of a and b (prepared by _prepare): ADM's squared Euclidean distance
    (float32), or the exact Euclidean distance (float64)."""
    if distance == "exact":
        return torch.cdist(a, b)
    a16, na16, a32, na32 = a
    b16, nb16, b32, nb32 = b
    # TF's float16 matmul multiplies and sums in float32 and rounds once to float16: a float32 matmul of the float16
    # values does the same up to summation order (their products are exact in float32), with fast BLAS on CPU
    mm16 = (a16 @ b16.T).half()
    d = na16[:, None] - 2 * mm16 + nb16[None]  # each operation rounded to float16, as in the TF graph
    if not torch.isfinite(d).all():  # float16 overflowed in this block: ADM redoes the block in float32
        d = na32[:, None] - 2 * (a32 @ b32.T) + nb32[None]
    return d.float().clamp_min(0)


def _prepare(x, distance: str):
    """The operands of `distance` for numpy features (CPU) or a tensor, on the tensor's device."""
    x = torch.as_tensor(x)
    if distance == "exact":
        return x.to(torch.float64)
    return _adm_operands(x)


@contextmanager
def exact_float32_matmul():
    """float32 matmuls in IEEE float32 while precision/recall runs: TF32 (which a training script may enable for
    speed) would round the operands to 10 mantissa bits and change which points fall inside a ball."""
    # the legacy flag, as sampling_engine.tf32_allowed uses: torch refuses a process that mixes it with the newer
    # fp32_precision setting
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def _rows(prepared, i: int, j: int):
    return prepared[i:j] if isinstance(prepared, torch.Tensor) else tuple(t[i:j] for t in prepared)


def _kth_neighbour_radii(x, n: int, k: int, distance: str, chunk: int) -> torch.Tensor:
    radii = []
    for i in range(0, n, chunk):
        d = _distances(_rows(x, i, i + chunk), x, distance)
        # index k of the sorted row (k + 1-th smallest): the nearest "neighbour" of a point is itself
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_any_ball(points, n: int, centres, radii: torch.Tensor, distance: str, chunk: int) -> torch.Tensor:
    inside = []
    for i in range(0, n, chunk):
        d = _distances(_rows(points, i, i + chunk), centres, distance)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real, fake, k: int = 3, chunk: int = 1000,
                     distance: str = "adm") -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019) as the ADM evaluator computes it: precision = share of
    fake samples inside the real manifold (union of balls reaching each real point's k-th neighbour), recall = the
    reverse. Every row of both sets is used; distances go `chunk` rows at a time against all rows of the other set.

    distance "adm": ADM's squared distances max(|u|^2 - 2 u.v + |v|^2, 0) in float16, redone in float32 for a
    chunk where float16 overflows (ADM decides per 10K x 10K block; this matters only where float16 overflows).
    distance "exact": float64 Euclidean distances.

    `real` and `fake` are numpy arrays (computed on the CPU) or tensors on one device (computed there)."""
    if distance not in ("adm", "exact"):
        raise ValueError(f"unknown precision/recall distance {distance!r} (expected 'adm' or 'exact')")
    n_real, n_fake = len(real), len(fake)
    if min(n_real, n_fake) < k + 1:
        raise ValueError(f"precision/recall with k = {k} needs at least k + 1 = {k + 1} points in each set (the "
                         f"k-th neighbour excludes the point itself), got {n_real} reference and {n_fake} samples")
    r, f = _prepare(real, distance), _prepare(fake, distance)
    with exact_float32_matmul():
        real_radii = _kth_neighbour_radii(r, n_real, k, distance, chunk)
        fake_radii = _kth_neighbour_radii(f, n_fake, k, distance, chunk)
        precision = _inside_any_ball(f, n_fake, r, real_radii, distance, chunk).double().mean().item()
        recall = _inside_any_ball(r, n_real, f, fake_radii, distance, chunk).double().mean().item()
    return precision, recall
