import itertools

import pytest
import torch

from pixelgen.data import ShardStream, StreamLoader, decode_image
from pixelgen.demo_data import write_demo_dataset
from pixelgen.errors import PixelgenError
from pixelgen.shards import ShardSettings, build_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """120 demo images in 8 uneven shards (7 x 16 + 8)."""
    root = tmp_path_factory.mktemp("stream")
    write_demo_dataset(root / "src", resolution=32, per_class=12, num_classes=10, progress=False)
    build_shards(root / "src", root / "shards", ShardSettings(32, shard_size=16), progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory, shard_dir):
    root = tmp_path_factory.mktemp("few")
    build_shards(shard_dir.parent / "src", root, ShardSettings(32, shard_size=50), progress=False)  # 3 shards
    return root


def keys_seen(shard_dir, rank, world_size, workers, batch_size=8, epochs=1, **kw):
    loader = StreamLoader(shard_dir, batch_size, num_workers=workers, rank=rank, world_size=world_size,
                          epochs=epochs, with_keys=True, **kw)
    return [k for _, _, keys in loader for k in keys]


@pytest.mark.parametrize("fixture", ["shard_dir", "few_shards"])
def test_two_ranks_two_workers_see_disjoint_samples_covering_the_set(fixture, request):
    directory = request.getfixturevalue(fixture)
    seen = [keys_seen(directory, rank, 2, 2) for rank in range(2)]
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(seen[0]) == len(set(seen[0])) and len(seen[1]) == len(set(seen[1]))
    assert len(seen[0]) + len(seen[1]) == 120
    assert len(seen[0]) > 0 and len(seen[1]) > 0


def test_batches_are_images_in_range_with_labels(shard_dir):
    x, y = next(iter(StreamLoader(shard_dir, 16, num_workers=0)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    assert y.dtype == torch.long and 0 <= y.min() and y.max() < 10


def test_labels_match_the_images(shard_dir):
    import tarfile

    stored = {}
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                stored.setdefault(key, {})[ext] = tar.extractfile(m).read()
    for x, y, keys in StreamLoader(shard_dir, 10, num_workers=0, epochs=1, with_keys=True, flip=False):
        for image, label, key in zip(x, y, keys):
            assert int(stored[key]["cls"]) == label
            expected = decode_image(stored[key]["png"], "png").float() / 127.5 - 1
            assert torch.allclose(image, expected)


def test_flip_is_seeded_and_mirrors_images(shard_dir):
    plain = {k: img for x, _, keys in StreamLoader(shard_dir, 10, num_workers=0, epochs=1, with_keys=True,
                                                  flip=False) for k, img in zip(keys, x)}
    flipped = 0
    for x, _, keys in StreamLoader(shard_dir, 10, num_workers=0, epochs=1, with_keys=True, flip=True):
        for k, img in zip(keys, x):
            if torch.equal(img, plain[k]):
                continue
            assert torch.equal(img, plain[k].flip(-1))
            flipped += 1
    assert 30 < flipped < 90  # about half


def test_stream_is_infinite_and_rolls_over_epochs(shard_dir):
    loader = StreamLoader(shard_dir, 16, num_workers=2)
    keys = []
    loader.kwargs["with_keys"] = True
    for _, _, k in itertools.islice(loader, 20):  # 320 samples from a 120-sample set
        keys += k
    assert len(keys) == 320 and set(keys) <= set(keys_seen(shard_dir, 0, 1, 0))
    assert len(set(keys)) > 100 and max(keys.count(k) for k in set(keys)) >= 3  # samples came back in later epochs


def test_uneven_shards_never_leave_a_rank_dry(few_shards):
    # 3 shards over 2 ranks x 2 workers: every rank still yields as many batches as asked (no DDP hang)
    for rank in range(2):
        batches = list(itertools.islice(StreamLoader(few_shards, 8, num_workers=2, rank=rank, world_size=2), 40))
        assert len(batches) == 40


def test_save_and_restore_reproduces_the_batches(shard_dir):
    def run(n):
        loader = StreamLoader(shard_dir, 12, num_workers=2, seed=3)
        return loader, list(itertools.islice(loader, n))

    _, uninterrupted = run(14)
    first, head = run(5)
    state = first.state_dict()
    assert state["batches_consumed"] == 5
    resumed = StreamLoader(shard_dir, 12, num_workers=2, seed=3)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, 9))
    for (xa, ya), (xb, yb) in zip(uninterrupted, head + tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert resumed.state_dict()["batches_consumed"] == 14


def test_restoring_into_a_different_setup_is_refused(shard_dir):
    state = StreamLoader(shard_dir, 12, num_workers=2).state_dict()
    other = StreamLoader(shard_dir, 10, num_workers=2)
    with pytest.raises(PixelgenError, match="batch_size"):
        other.load_state_dict(state)


def test_different_seeds_give_different_orders(shard_dir):
    a = keys_seen(shard_dir, 0, 1, 0, seed=0)
    b = keys_seen(shard_dir, 0, 1, 0, seed=1)
    assert sorted(a) == sorted(b) and a != b


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(PixelgenError, match="pixelgen shard"):
        ShardStream(tmp_path, 4)
