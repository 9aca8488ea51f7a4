import numpy as np
import pytest
import scipy.linalg

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
    mean, std = metrics.inception_score(confident_uniform, splits=1)
    assert mean == pytest.approx(classes, rel=1e-6) and std == 0
    # ten shuffled splits see slightly unbalanced marginals: a little below 20, never above
    mean, std = metrics.inception_score(confident_uniform, splits=10)
    assert 18.5 < mean < 20 and std < 0.5
    uninformative = np.zeros((2000, 1008))
    assert metrics.inception_score(uninformative)[0] == pytest.approx(1.0)
    one_class = np.eye(1008)[np.zeros(2000, dtype=int)] * 50.0  # confident but always the same class
    assert metrics.inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-3)


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
