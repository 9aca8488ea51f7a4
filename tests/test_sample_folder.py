import json

import numpy as np
import pytest

from pixelgen import sample_folder
from pixelgen.errors import PixelgenError


def write_folder(out, num=7, shard_size=3):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num, 8, 8, 3), dtype=np.uint8)
    for k in range(0, num, shard_size):
        indices = list(range(k, min(k + shard_size, num)))
        sample_folder.write_shard(sample_folder.shard_path(out, k // shard_size), indices, images[indices],
                                  [i % 2 for i in indices])
    return images


def test_shards_read_back_in_index_order_as_images_batches_and_npz(tmp_path):
    images = write_folder(tmp_path)
    read, labels = sample_folder.read_images(tmp_path)
    assert np.array_equal(read, images) and labels.tolist() == [i % 2 for i in range(7)]
    batches = list(sample_folder.batches(tmp_path, 4))
    assert [len(b) for b in batches] == [4, 3] and batches[0].shape == (4, 3, 8, 8)
    assert np.array_equal(np.concatenate([b.permute(0, 2, 3, 1).numpy() for b in batches]), images)
    assert sample_folder.write_npz(tmp_path) == "samples.npz"
    from_npz = list(sample_folder.batches(tmp_path / "samples.npz", 5))
    assert [len(b) for b in from_npz] == [5, 2] and np.array_equal(from_npz[1].permute(0, 2, 3, 1).numpy(),
                                                                   images[5:])
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_shard_bytes_depend_on_the_content_only(tmp_path):
    write_folder(tmp_path / "a")
    write_folder(tmp_path / "b")
    for tar in (tmp_path / "a").glob("samples-*.tar"):
        assert tar.read_bytes() == (tmp_path / "b" / tar.name).read_bytes()


def test_manifest_settings_and_count(tmp_path):
    assert sample_folder.read_manifest(tmp_path) == {} and sample_folder.count(tmp_path) is None
    sample_folder.write_manifest(tmp_path, {"num": 7, "steps": 3})
    assert sample_folder.count(tmp_path) == 7
    assert json.loads((tmp_path / "samples.json").read_text()) == {"num": 7, "steps": 3}
    sample_folder.check_settings(tmp_path, {"steps": 3}, write=False)
    assert not (tmp_path / "settings.json").exists()  # only the main process records them
    sample_folder.check_settings(tmp_path, {"steps": 3}, write=True)
    sample_folder.check_settings(tmp_path, {"steps": 3}, write=True)
    with pytest.raises(PixelgenError, match="other settings"):
        sample_folder.check_settings(tmp_path, {"steps": 4}, write=True)


def test_a_folder_without_shards_is_a_clear_error(tmp_path):
    with pytest.raises(PixelgenError, match="pixelgen sample"):
        next(sample_folder.batches(tmp_path, 4))
