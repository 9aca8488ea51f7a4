import numpy as np
import pytest
import scipy.linalg
import torch

from pixelgen import metrics


def scipy_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_of_a_set_against_its_own_statistics_is_zero():
    feats = np.random.RandomState(0).randn(500, 16)
    stats = metrics.feature_statistics(feats)
    assert abs(metrics.fid(stats, stats)) < 1e-6


def test_fid_matches_a_direct_scipy_computation():
    rng = np.random.RandomState(1)
    a = rng.randn(400, 8)
    b = rng.randn(400, 8) @ np.diag(np.linspace(0.5, 2, 8)) + 0.7
    expected = scipy_fid(a, b)
    got = metrics.fid(metrics.feature_statistics(a), metrics.feature_statistics(b))
    assert expected > 1 and got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n_a, n_b, rel", [(400, 400, 1e-10), (12, 30, 1e-5)])
def test_the_eigh_trace_is_the_adm_sqrtm_fid(n_a, n_b, rel):
    """--fid-sqrt eigh (the test config's) against the ADM sqrtm: equal at full rank; close where few samples make
    the covariances singular (there sqrtm is the ill-conditioned one)."""
    rng = np.random.RandomState(4)
    a = rng.randn(n_a, 64)
    b = rng.randn(n_b, 64) @ np.diag(np.linspace(0.5, 2, 64)) + 0.3
    sa, sb = metrics.feature_statistics(a), metrics.feature_statistics(b)
    adm = metrics.fid(sa, sb)
    assert adm > 1 and metrics.fid(sa, sb, "eigh") == pytest.approx(adm, rel=rel)
    assert metrics.fid(sa, sa, "eigh") == pytest.approx(0, abs=1e-4)  # round-off of the zero eigenvalues
    with pytest.raises(ValueError, match="eigh"):
        metrics.fid(sa, sb, "svd")


@pytest.mark.parametrize("n_a, n_b", [(20, 30), (30, 20), (200, 30), (200, 300)])
def test_the_low_rank_eigh_trace_equals_the_full_one_and_is_used_only_below_full_rank(n_a, n_b):
    """Fewer samples than dimensions: the statistics carry sigma's factor and the eigh trace solves an N x N
    problem; the same number as the D x D one, on either side, and from batches (RunningStatistics) too."""
    rng = np.random.RandomState(5)
    a = rng.randn(n_a, 64) * 1.5
    b = rng.randn(n_b, 64) @ np.diag(np.linspace(0.5, 2, 64)) + 0.3
    sa, sb = metrics.feature_statistics(a), metrics.feature_statistics(b)
    assert ("factor" in sa, "factor" in sb) == (n_a <= 64, n_b <= 64)
    for stats in (sa, sb):
        if "factor" in stats:
            np.testing.assert_allclose(stats["factor"].T @ stats["factor"], stats["sigma"], atol=1e-12)
    full = {k: sa[k] for k in ("mu", "sigma")}, {k: sb[k] for k in ("mu", "sigma")}
    expected = metrics.fid(*full, "eigh")
    # (the D x D route takes square roots of the round-off left in the zero eigenvalues: ~1e-8 relative)
    assert metrics.fid(sa, sb, "eigh") == pytest.approx(expected, rel=1e-7)
    assert metrics.fid(sb, sa, "eigh") == pytest.approx(expected, rel=1e-7)
    running = metrics.RunningStatistics()
    for part in np.array_split(b, 3):
        running.update(torch.from_numpy(part))
    streamed = running.statistics()
    assert ("factor" in streamed) == (n_b <= 64)
    assert metrics.fid(sa, streamed, "eigh") == pytest.approx(expected, rel=1e-7)
    assert metrics.fid(sa, streamed) == pytest.approx(metrics.fid(*full), rel=1e-7)  # adm: sigma, as before


def test_fid_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.RandomState(2)
    a = rng.randn(20000, 4)
    b = a + np.array([1.0, 0, 0, 2.0])
    assert metrics.fid(metrics.feature_statistics(a), metrics.feature_statistics(b)) == pytest.approx(5.0, rel=1e-6)


def test_precision_recall_on_known_point_clouds():
    rng = np.random.RandomState(3)
    real = rng.randn(1000, 2)
    assert metrics.precision_recall(real, real + 1e-9) == pytest.approx((1.0, 1.0))
    far = rng.randn(1000, 2) + 100.0
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    # fakes collapsed onto a small part of the real cloud: precise but with poor recall (mode collapse)
    collapsed = rng.randn(1000, 2) * 0.05 + np.array([1.0, 1.0])
    precision, recall = metrics.precision_recall(real, collapsed)
    assert precision > 0.95 and recall < 0.2
    # fakes covering the real cloud and a far-away mode: recall stays, precision halves
    mixed = np.concatenate([rng.randn(500, 2), rng.randn(500, 2) + 100])
    precision, recall = metrics.precision_recall(real, mixed)
    assert 0.4 < precision < 0.6 and recall > 0.8


def test_inception_score_of_known_distributions():
    classes = 20
    confident_uniform = np.eye(1008)[np.arange(2000) % classes] * 50.0  # sure of each class, classes balanced
    # one split: the marginal is exactly uniform over 20 classes, so IS = exp(KL) = 20
    mean, std = metrics.inception_score(confident_uniform, mode="torch-fidelity", splits=1)
    assert mean == pytest.approx(classes, rel=1e-6) and std == 0
    # ten shuffled splits see slightly unbalanced marginals: a little below 20, never above
    mean, std = metrics.inception_score(confident_uniform, mode="torch-fidelity", splits=10)
    assert 18.5 < mean < 20 and std < 0.5
    uninformative = np.zeros((2000, 1008))
    assert metrics.inception_score(uninformative)[0] == pytest.approx(1.0)
    one_class = np.eye(1008)[np.zeros(2000, dtype=int)] * 50.0  # confident but always the same class
    assert metrics.inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-3)
    # probabilities that underflow to exactly 0 (and classes nobody predicts) add nothing, rather than NaN
    certain = np.eye(1008)[np.arange(2000) % classes] * 1000.0
    assert metrics.inception_score(certain) == (pytest.approx(classes, rel=1e-12), 0.0)


def numpy_adm_inception_score(logits, split_size=5000):
    """The ADM evaluator's formula, written out: softmax, contiguous splits, exp(mean KL(p || split marginal))."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1))))
    return scores


def test_adm_inception_score_uses_contiguous_5000_splits():
    rng = np.random.RandomState(6)
    # 12,000 images, so splits of 5000, 5000 and 2000; the first 5000 use only 30 classes, the rest 600, so the
    # contiguous splits score very differently, while shuffled splits all look alike
    classes = np.concatenate([rng.randint(0, 30, 5000), rng.randint(0, 600, 7000)])
    logits = (rng.randn(12000, 1008) + 8.0 * np.eye(1008)[classes]).astype(np.float32)
    expected = numpy_adm_inception_score(logits)
    assert len(expected) == 3 and max(expected) > 2 * min(expected)
    mean, std = metrics.inception_score(logits)  # ADM mode is the default
    assert mean == pytest.approx(np.mean(expected), rel=1e-9) and std == pytest.approx(np.std(expected), rel=1e-9)
    assert metrics.inception_score(logits, mode="adm", split_size=5000) == (mean, std)
    tf_mean, tf_std = metrics.inception_score(logits, mode="torch-fidelity")
    assert abs(tf_mean - mean) > 2 and tf_std < 0.1 * std
    # other split sizes are honoured: one split of everything
    assert metrics.inception_score(logits, split_size=12000)[0] == pytest.approx(numpy_adm_inception_score(logits, 12000)[0], rel=1e-9)
    with pytest.raises(ValueError, match="mode"):
        metrics.inception_score(logits, mode="tf")


def numpy_adm_squared_distances(u, v):
    """ADM's DistanceBlock in numpy: max(|u|^2 - 2 u.v + |v|^2, 0) in float16 (matmul summed in float32 and
    rounded once), the whole block in float32 when a float16 value is not finite."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    nu = (u16 * u16).astype(np.float32).sum(1).astype(np.float16)
    nv = (v16 * v16).astype(np.float32).sum(1).astype(np.float16)
    mm = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    d = nu[:, None] - np.float16(2) * mm + nv[None]
    if not np.isfinite(d).all():
        u32, v32 = u.astype(np.float32), v.astype(np.float32)
        d = (u32 * u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + (v32 * v32).sum(1)[None]
    return np.maximum(d, 0).astype(np.float32)


def numpy_exact_distances(u, v):
    return np.sqrt(((u[:, None].astype(np.float64) - v[None].astype(np.float64)) ** 2).sum(-1))


def numpy_precision_recall(real, fake, dist, k=3):
    """Brute force: radius = index k of each point's sorted distances within its own set (itself included);
    precision = share of fakes within some real ball, recall = share of reals within some fake ball."""
    real_radii = np.sort(dist(real, real), 1)[:, k]
    fake_radii = np.sort(dist(fake, fake), 1)[:, k]
    precision = (dist(fake, real) <= real_radii[None]).any(1).mean()
    recall = (dist(real, fake) <= fake_radii[None]).any(1).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_precision_recall_matches_a_brute_force_reference(seed):
    rng = np.random.RandomState(seed)
    # non-negative like pool3 features; the two sets differ in scale and offset, so P/R are strictly inside (0, 1)
    real = np.abs(rng.randn(300, 64)).astype(np.float32)
    fake = (np.abs(rng.randn(280, 64)) * 1.05 + 0.05).astype(np.float32)
    adm = metrics.precision_recall(real, fake, chunk=64)  # chunks that do not divide the set sizes
    assert adm == numpy_precision_recall(real, fake, numpy_adm_squared_distances)
    assert all(0.05 < x < 0.95 for x in adm)
    exact = metrics.precision_recall(real, fake, chunk=64, distance="exact")
    assert exact == numpy_precision_recall(real, fake, numpy_exact_distances)
    # float16 rounding moves at most a few points across a ball's border
    assert np.allclose(adm, exact, atol=0.03)


def test_adm_distances_fall_back_to_float32_where_float16_overflows():
    rng = np.random.RandomState(7)
    # squared norms of about 64 * 300^2 overflow float16 (max 65504): without the float32 redo every distance is
    # inf or nan and no point is inside any ball
    real = (rng.randn(200, 64) * 300).astype(np.float32)
    fake = (rng.randn(200, 64) * 360 + 40).astype(np.float32)
    adm = metrics.precision_recall(real, fake, chunk=50)
    with np.errstate(over="ignore", invalid="ignore"):  # the float16 overflow the reference falls back from
        assert not np.isfinite((real.astype(np.float32) ** 2).sum(1).astype(np.float16)).any()
        assert adm == numpy_precision_recall(real, fake, numpy_adm_squared_distances)
    assert adm == metrics.precision_recall(real, fake, distance="exact") and all(0 < x < 1 for x in adm)


@pytest.mark.parametrize("distance", ["adm", "exact"])
def test_precision_recall_uses_every_sample_and_every_reference(distance):
    rng = np.random.RandomState(8)
    real = rng.randn(200, 8).astype(np.float32)
    far = real + 100.0
    # the samples: copies of the reference, then as many far away; a prefix of the samples would give precision 1
    precision, recall = metrics.precision_recall(real, np.concatenate([real, far]), chunk=64, distance=distance)
    assert precision == 0.5 and recall == 1.0
    # the same with the roles swapped: half of the reference is never reached
    precision, recall = metrics.precision_recall(np.concatenate([real, far]), real, chunk=64, distance=distance)
    assert precision == 1.0 and recall == 0.5


def test_adm_and_exact_distances_agree_on_well_separated_data():
    rng = np.random.RandomState(9)
    centres = rng.randn(4, 16) * 5
    real = np.concatenate([c + 0.3 * rng.randn(75, 16) for c in centres]).astype(np.float32)
    # copies of the first two blobs, and two blobs that no reference point is near
    far = np.concatenate([c + 25 + 0.3 * rng.randn(75, 16) for c in centres[:2]])
    fake = np.concatenate([real[:150], far]).astype(np.float32)
    adm = metrics.precision_recall(real, fake)
    assert adm == metrics.precision_recall(real, fake, distance="exact") == (0.5, 0.5)


def test_precision_recall_needs_more_than_k_points_in_each_set():
    rng = np.random.RandomState(10)
    with pytest.raises(ValueError, match=r"k = 3 .* got 3 reference and 50 samples"):
        metrics.precision_recall(rng.randn(3, 4), rng.randn(50, 4))
    with pytest.raises(ValueError, match=r"k = 5 .* got 50 reference and 5 samples"):
        metrics.precision_recall(rng.randn(50, 4), rng.randn(5, 4), k=5)
    assert metrics.precision_recall(rng.randn(4, 4), rng.randn(4, 4))  # k + 1 points are enough
    with pytest.raises(ValueError, match="distance"):
        metrics.precision_recall(rng.randn(50, 4), rng.randn(50, 4), distance="cosine")


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.RandomState(4)
    a, b = rng.randn(600, 32).astype(np.float32), rng.randn(600, 32).astype(np.float32)
    same, _ = metrics.kid(a, b, subsets=20, subset_size=300)
    different, _ = metrics.kid(a, b + 1.0, subsets=20, subset_size=300)
    assert abs(same) < 0.01 and different > 0.1


def test_running_statistics_over_batches_equal_the_statistics_of_all_features():
    rng = np.random.RandomState(5)
    # a large common offset: the naive sum-of-squares covariance loses most digits here, the pairwise merge doesn't
    feats = rng.randn(1037, 12) @ rng.randn(12, 12) + 1e4
    running = metrics.RunningStatistics()
    for start, stop in [(0, 1), (1, 100), (100, 100), (100, 613), (613, 1037)]:  # uneven, one single, one empty
        running.update(feats[start:stop])
    got, expected = running.statistics(), metrics.feature_statistics(feats)
    assert running.count == 1037
    np.testing.assert_allclose(got["mu"], expected["mu"], rtol=1e-12)
    np.testing.assert_allclose(got["sigma"], expected["sigma"], rtol=1e-9, atol=1e-9)


def test_running_statistics_need_two_samples():
    running = metrics.RunningStatistics()
    running.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        running.statistics()
