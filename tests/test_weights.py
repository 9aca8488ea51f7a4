import pytest
import torch
from forked_cli import run_pixelgen as run_cli

from pixelgen import weights
from pixelgen.errors import PixelgenError


def test_weights_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("PIXELGEN_WEIGHTS", str(tmp_path / "w"))
    assert weights.weights_dir() == tmp_path / "w"
    assert weights.weights_dir(str(tmp_path / "other")) == tmp_path / "other"
    monkeypatch.delenv("PIXELGEN_WEIGHTS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert weights.weights_dir() == tmp_path / "cache" / "pixelgen" / "weights"


def test_missing_weight_is_one_clear_error(tmp_path):
    with pytest.raises(PixelgenError) as err:
        weights.weight_path("vgg16", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "vgg16-397923af.pth") in message and "pixelgen weights fetch" in message
    assert "\n" not in message


def test_check_reports_missing_random_and_corrupt(random_weights_dir, tmp_path):
    assert weights.status("vgg16", random_weights_dir)[0] == "random"
    assert weights.status("dinov2-b", random_weights_dir)[0] == "random"
    assert weights.status("inception", random_weights_dir)[0] == "missing"
    (tmp_path / "vgg16-397923af.pth").write_bytes(b"not a checkpoint")
    assert weights.status("vgg16", tmp_path)[0] == "corrupt"
    torch.save({"something": torch.zeros(1)}, tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    assert weights.status("inception", tmp_path)[0] == "corrupt"


def test_published_digest_marks_real_weights(tmp_path, monkeypatch):
    # a file whose digest matches the published prefix counts as real; we fake the registry's prefix
    path = tmp_path / "vgg16-397923af.pth"
    import torchvision

    torch.save(torchvision.models.vgg16(weights=None).features[:2].state_dict() | {"features.0.weight": torch.zeros(1)}, path)
    digest = weights.sha256(path)
    fake = weights.WeightFile("vgg16", path.name, "file://nowhere", digest[:8], "VGG16")
    monkeypatch.setitem(weights.WEIGHT_FILES, "vgg16", fake)
    assert weights.status("vgg16", tmp_path)[0] == "ok"


def test_fetch_downloads_atomically_and_records_digest(tmp_path, monkeypatch):
    source = tmp_path / "src.pth"
    torch.save({"patch_embed.proj.weight": torch.ones(2)}, source)
    fake = weights.WeightFile("dinov2-b", "dino.pth", source.as_uri(), None, "DINO")
    monkeypatch.setitem(weights.WEIGHT_FILES, "dinov2-b", fake)
    target = weights.fetch("dinov2-b", tmp_path / "w", progress=False)
    assert target.read_bytes() == source.read_bytes()
    assert not list((tmp_path / "w").glob("*.part"))
    # the digest recorded at fetch time makes a prefix-less file verifiable
    assert weights.status("dinov2-b", tmp_path / "w")[0] == "ok"
    target.write_bytes(target.read_bytes()[:-3] + b"xyz")
    assert weights.status("dinov2-b", tmp_path / "w")[0] != "ok"


def test_fetch_rejects_a_wrong_checksum(tmp_path, monkeypatch):
    source = tmp_path / "src.pth"
    torch.save({"features.0.weight": torch.ones(2)}, source)
    fake = weights.WeightFile("vgg16", "vgg.pth", source.as_uri(), "00000000", "VGG")
    monkeypatch.setitem(weights.WEIGHT_FILES, "vgg16", fake)
    with pytest.raises(PixelgenError, match="sha256"):
        weights.fetch("vgg16", tmp_path / "w", progress=False)
    assert not (tmp_path / "w" / "vgg.pth").exists()


def test_cli_weights_check(random_weights_dir):
    result = run_cli("weights", "check", "--dir", str(random_weights_dir))
    assert result.returncode == 1  # the inception file is missing
    assert "vgg16" in result.stdout and "random" in result.stdout and "missing" in result.stdout
    result = run_cli("weights", "check", "--dir", str(random_weights_dir), "--only", "vgg16")
    assert result.returncode == 0


def test_cli_fetch_without_network_is_one_line_error(tmp_path, monkeypatch, capsys):
    from pixelgen import cli

    # port 9 (discard) on loopback refuses connections: the same failure as an offline cluster node
    unreachable = weights.WeightFile("vgg16", "vgg16-397923af.pth", "http://127.0.0.1:9/vgg16-397923af.pth",
                                     "397923af", "VGG16")
    monkeypatch.setitem(weights.WEIGHT_FILES, "vgg16", unreachable)
    code = cli.main(["weights", "fetch", "--dir", str(tmp_path / "w"), "--only", "vgg16"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "cannot download" in err and "vgg16-397923af.pth" in err
    assert not list((tmp_path / "w").glob("*"))  # nothing half-written is left behind


def test_init_random_writes_loadable_inception(tmp_path):
    (path,) = weights.init_random(tmp_path, ["inception"])
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    features = net(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert features[0].shape == (2, 2048)
