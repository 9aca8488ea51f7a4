"""Fast scoring: shard decoding in DataLoader workers, statistics and precision/recall on the scoring device
(torch, float64 where FID needs it), and the cache of the ADM reference batch's Inception features."""

import json

import numpy as np
import pytest
import torch

from pixelgen import metrics, sample_folder, score
from pixelgen.inception import build_inception


def write_folder(out, sizes, side=8, seed=0):
    """A sample folder of shards holding `sizes` images each, indices running on across shards."""
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, (sum(sizes), side, side, 3), dtype=np.uint8)
    shards, start = [], 0
    for k, n in enumerate(sizes):
        path = sample_folder.shard_path(out, k)
        sample_folder.write_shard(path, list(range(start, start + n)), images[start:start + n], [0] * n)
        shards.append(path)
        start += n
    return images, shards


@pytest.mark.parametrize("batch_size", [1, 5, 7, 100])
def test_worker_decoding_gives_the_serial_batches_in_the_serial_order(tmp_path, batch_size):
    sizes = [7, 7, 3]  # batch sizes that split shards, join them, and take everything at once
    images, shards = write_folder(tmp_path, sizes)
    serial = list(sample_folder.batches(tmp_path, batch_size, shards, sizes))
    for workers in (0, 2):
        got = list(score.decoded_batches(tmp_path, shards, sizes, batch_size, workers, pin_memory=False))
        assert [len(b) for b in got] == [len(b) for b in serial]
        assert torch.equal(torch.cat(got), torch.cat(serial))
    assert torch.equal(torch.cat(serial), torch.from_numpy(images).permute(0, 3, 1, 2))


def test_a_damaged_shard_decoded_in_a_worker_is_a_one_line_error(tmp_path):
    _, shards = write_folder(tmp_path, [4, 4])
    with pytest.raises(score.PixelgenError, match=r"samples-000001.tar holds 4 images where .* expects 5") as err:
        list(score.decoded_batches(tmp_path, shards, [4, 5], 3, workers=2, pin_memory=False))
    assert "\n" not in str(err.value)


def test_torch_statistics_equal_numpys_float64_mean_and_covariance():
    rng = np.random.RandomState(1)
    feats = (rng.randn(700, 64) @ rng.randn(64, 64) + 3.0).astype(np.float32)
    for given in (feats, torch.from_numpy(feats)):
        stats = metrics.feature_statistics(given)
        np.testing.assert_allclose(stats["mu"], feats.astype(np.float64).mean(0), rtol=1e-10)
        np.testing.assert_allclose(stats["sigma"], np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-10,
                                   atol=1e-12)
    running = metrics.RunningStatistics()
    for part in torch.from_numpy(feats).split(128):  # float32 tensor batches, as Inception gives them
        running.update(part)
    assert running.mean.dtype == torch.float64
    np.testing.assert_allclose(running.statistics()["sigma"], np.cov(feats.astype(np.float64), rowvar=False),
                               rtol=1e-10, atol=1e-12)


def test_fid_of_torch_statistics_equals_fid_of_numpy_statistics():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.RandomState(2)
    a, b = rng.randn(300, 48).astype(np.float32), (rng.randn(300, 48) * 1.2 + 0.3).astype(np.float32)

    def numpy_stats(f):
        f = f.astype(np.float64)
        return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}

    expected = fid_statistics_to_metric(numpy_stats(a), numpy_stats(b), False)[KEY_METRIC_FID]
    got = metrics.fid(metrics.feature_statistics(torch.from_numpy(a)), metrics.feature_statistics(b))
    assert got == pytest.approx(expected, rel=1e-9) and got > 0.1


@pytest.mark.parametrize("distance", ["adm", "exact"])
def test_precision_recall_of_tensors_equals_that_of_numpy_arrays(distance):
    rng = np.random.RandomState(3)
    real, fake = rng.randn(150, 16).astype(np.float32), (rng.randn(170, 16) * 1.3).astype(np.float32)
    expected = metrics.precision_recall(real, fake, chunk=64, distance=distance)
    assert metrics.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), chunk=64,
                                    distance=distance) == expected
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1


def test_precision_recall_runs_in_ieee_float32_and_restores_the_matmul_setting():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        with metrics.exact_float32_matmul():
            assert matmul.allow_tf32 is False
        assert matmul.allow_tf32 is True
    finally:
        matmul.allow_tf32 = before


# --- the reference batch's feature cache -------------------------------------------------------------------
def adm_batch(path, seed, n=6, side=16):
    rng = np.random.RandomState(seed)
    np.savez(path, arr_0=rng.randint(0, 256, (n, side, side, 3), dtype=np.uint8), mu=rng.randn(2048),
             sigma=np.eye(2048), mu_s=rng.randn(2023), sigma_s=np.eye(2023))


@pytest.fixture
def counted(monkeypatch):
    """The `desc` of every Inception run score makes ("reference batch", "score")."""
    calls = []
    real = score.inception_outputs

    def counting(net, batches, device, total=None, progress=True, desc="inception", **kw):
        calls.append(desc)
        return real(net, batches, device, total, progress, desc, **kw)

    monkeypatch.setattr(score, "inception_outputs", counting)
    return calls


def score_against(tmp_path, ref, name, **kw):
    samples = tmp_path / "samples.npz"
    if not samples.exists():
        np.savez(samples, arr_0=np.random.RandomState(9).randint(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / f"{name}.json"
    kw.setdefault("fid_sqrt", "eigh")  # (what is tested here is not the FID formula: the faster trace)
    score.score(samples, ref, out, batch_size=4, allow_random=True, device="cpu", progress=False, **kw)
    return json.loads(out.read_text())


def cache_files(folder):
    return sorted(folder.glob("*.inception-*.npz"))


def test_the_second_score_reads_the_reference_features_from_the_cache_with_the_same_numbers(tmp_path, counted):
    ref = tmp_path / "ref" / "VIRTUAL.npz"
    ref.parent.mkdir()
    adm_batch(ref, seed=0)
    first = score_against(tmp_path, ref, "first")
    assert counted == ["reference batch", "score"] and len(cache_files(ref.parent)) == 1
    second = score_against(tmp_path, ref, "second")
    assert counted[2:] == ["score"]  # Inception ran on the samples only
    uncached = score_against(tmp_path, ref, "elsewhere", ref_cache=tmp_path / "other-cache")
    assert counted[3:] == ["reference batch", "score"] and len(cache_files(tmp_path / "other-cache")) == 1
    assert first == second == uncached


def test_a_changed_reference_file_is_measured_again(tmp_path, counted):
    ref = tmp_path / "VIRTUAL.npz"
    adm_batch(ref, seed=0)
    first = score_against(tmp_path, ref, "first")
    adm_batch(ref, seed=1)  # same name, other images
    second = score_against(tmp_path, ref, "second")
    assert counted == ["reference batch", "score"] * 2
    assert first["precision"] != second["precision"] or first["kid"] != second["kid"]
    assert len(cache_files(tmp_path)) == 2  # one per reference content: never the other's


def test_another_network_does_not_use_the_cache(tmp_path, counted):
    ref = tmp_path / "VIRTUAL.npz"
    adm_batch(ref, seed=0)
    images = np.load(ref)["arr_0"]
    net, _ = build_inception(None, True, "cpu")
    first = score.cached_batch_features(ref, images, net, "cpu", 4, False, None)
    with torch.no_grad():
        net.Conv2d_1a_3x3.conv.weight.mul_(1.5)
    other = score.cached_batch_features(ref, images, net, "cpu", 4, False, None)
    again = score.cached_batch_features(ref, images, net, "cpu", 4, False, None)
    assert counted == ["reference batch"] * 2
    assert not torch.equal(first, other) and torch.equal(other, again)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key"])
def test_a_damaged_or_foreign_cache_file_is_recomputed(tmp_path, counted, capsys, damage):
    ref = tmp_path / "VIRTUAL.npz"
    adm_batch(ref, seed=0)
    first = score_against(tmp_path, ref, "first")
    (cache,) = cache_files(tmp_path)
    if damage == "garbage":
        cache.write_bytes(b"not an npz")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:1000])
    else:  # a well-formed file under this key's name holding another key's features
        with np.load(cache) as c:
            key = json.loads(str(c["key"])) | {"inception_sha256": "0" * 64}
            np.savez(cache, key=json.dumps(key), features=c["features"] + 1)
    second = score_against(tmp_path, ref, "second")
    assert counted == ["reference batch", "score"] * 2 and first == second
    assert "recomputing" in capsys.readouterr().err
    score_against(tmp_path, ref, "third")  # the recomputed cache was written back and is used
    assert counted[4:] == ["score"]
