import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from pixelgen import weights
from pixelgen.encoders import DINOFeatures, LPIPS, official_pos_interp
from pixelgen.errors import ConfigError, PixelgenError


@pytest.fixture(scope="module")
def lpips_from_file(random_weights_dir):
    return LPIPS(weights_dir=random_weights_dir)


def test_lpips_loads_the_vgg16_file(lpips_from_file, random_weights_dir):
    state = torch.load(random_weights_dir / "vgg16-397923af.pth", weights_only=True)
    vgg = lpips_from_file.net.net
    assert torch.equal(vgg.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(vgg.slice5, "28").bias, state["features.28.bias"])
    assert lpips_from_file.real is False  # random file, not the published digest


def test_lpips_is_a_per_sample_distance(lpips_from_file):
    a = torch.rand(3, 3, 32, 32) * 2 - 1
    same = lpips_from_file(a, a)
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-6)
    assert (lpips_from_file(a, a.flip(0))[[0, 2]] > 0).all()


@pytest.mark.parametrize("pos_interp", ["official", "timm"])
def test_dino_loads_the_safetensors_file(random_weights_dir, pos_interp):
    dino = DINOFeatures(input_size=56, weights_dir=random_weights_dir, pos_interp=pos_interp)
    state = load_file(str(random_weights_dir / "vit_base_patch14_dinov2.lvd142m.safetensors"))
    assert torch.equal(dino.net.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    assert dino.real is False and dino.depth == 12 and dino.embed_dim == 768
    # the 518 px position grid of the file is resampled to the configured input size
    assert dino.grid == 4 and dino.net.pos_embed.shape[1] in (16, 17)
    feats = dino(torch.rand(2, 3, 32, 32) * 2 - 1, [8, 12])
    assert [f.shape for f in feats] == [(2, 16, 768), (2, 16, 768)]
    assert not torch.allclose(feats[0], feats[1])


@pytest.mark.parametrize("factory", [lambda d: LPIPS(weights_dir=d), lambda d: DINOFeatures(input_size=56, weights_dir=d)])
def test_missing_weights_name_the_file_and_the_fix(tmp_path, factory):
    with pytest.raises(PixelgenError) as err:
        factory(tmp_path)
    assert str(tmp_path) in str(err.value) and "pixelgen weights fetch" in str(err.value)


def test_only_dinov2_b_has_real_weights(tmp_path):
    with pytest.raises(ConfigError, match="dino_model"):
        DINOFeatures("vit_small_patch14_dinov2", 56, weights_dir=tmp_path)


def test_random_init_reads_no_files(tmp_path):
    dino = DINOFeatures("vit_small_patch14_dinov2", 56, random_init=True, weights_dir=tmp_path / "absent")
    lp = LPIPS(random_init=True, weights_dir=tmp_path / "absent")
    assert dino.real is False and lp.real is False


def test_encoders_are_frozen_but_pass_gradients_to_inputs(lpips_from_file):
    dino = DINOFeatures("vit_small_patch14_dinov2", 56, random_init=True)
    parent = nn.ModuleDict({"lpips": lpips_from_file, "dino": dino})
    parent.train()  # a training loop calls this on everything it owns
    for enc in (lpips_from_file, dino):
        assert not enc.training and not any(m.training for m in enc.modules())
        assert not any(p.requires_grad for p in enc.parameters())
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    (lpips_from_file(x, torch.zeros_like(x)).sum() + dino(x, [12])[0].sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in parent.parameters())


def _hub_interp(pos_embed, grid):
    """DINOv2 hub's interpolation written out independently: scale_factor (grid + 0.1) / 37, no antialiasing."""
    patches = pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    out = F.interpolate(patches, scale_factor=((grid + 0.1) / 37, (grid + 0.1) / 37), mode="bicubic", antialias=False)
    assert out.shape[-2:] == (grid, grid)
    return torch.cat([pos_embed[:, :1], out.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def test_official_pos_interp_matches_dinov2_and_differs_from_timm():
    pos = torch.randn(1, 1 + 37 * 37, 768) * 0.02
    ours = official_pos_interp(pos, 16)
    assert ours.shape == (1, 257, 768)
    assert torch.equal(ours, _hub_interp(pos, 16))
    assert torch.equal(ours[:, 0], pos[:, 0])  # class-token row untouched
    timm_way = resample_abs_pos_embed(pos, new_size=[16, 16], num_prefix_tokens=1)
    # the option matters: the two resamples disagree by a sizeable fraction of the embedding's own scale
    assert (ours - timm_way).abs().mean() > 0.1 * timm_way.abs().mean()
    assert official_pos_interp(pos, 37) is pos  # 518 px input: DINOv2 uses the grid as is


def test_random_init_official_pos_embed_is_interpolated_from_37x37():
    torch.manual_seed(3)
    dino = DINOFeatures(input_size=224, random_init=True, pos_interp="official")
    torch.manual_seed(3)  # the same seed rebuilds the 518 px model (37x37 grid) DINOFeatures derived its weights from
    source = timm.create_model("vit_base_patch14_dinov2", num_classes=0)
    assert source.pos_embed.shape == (1, 1 + 37 * 37, 768)
    assert dino.net.pos_embed.shape == (1, 1 + 256, 768) and dino.grid == 16
    assert torch.equal(dino.net.blocks[5].mlp.fc1.weight, source.blocks[5].mlp.fc1.weight)
    assert torch.equal(dino.net.pos_embed, _hub_interp(source.pos_embed.detach(), 16))
    assert [f.shape for f in dino(torch.rand(1, 3, 256, 256) * 2 - 1, [12])] == [(1, 256, 768)]


def test_unknown_pos_interp_is_a_config_error():
    with pytest.raises(ConfigError, match="dino_pos_interp") as err:
        DINOFeatures("vit_small_patch14_dinov2", 56, random_init=True, pos_interp="bilinear")
    assert "official" in str(err.value) and "timm" in str(err.value)


def test_official_pos_interp_from_a_real_format_file(tmp_path):
    weights.init_random(tmp_path, ["dinov2-b"], seed=1)  # timm safetensors of a random 518 px model, as published
    state = load_file(str(tmp_path / weights.WEIGHT_FILES["dinov2-b"].filename))
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 768)
    dino = DINOFeatures(input_size=224, weights_dir=tmp_path, pos_interp="official")
    loaded = dino.net.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k != "pos_embed")
    assert torch.equal(loaded["pos_embed"], _hub_interp(state["pos_embed"], 16))


def test_lpips_in_channels_last_gives_the_same_distances(random_weights_dir):
    plain, fast = LPIPS(weights_dir=random_weights_dir), LPIPS(weights_dir=random_weights_dir).use_channels_last()
    conv = fast.net.net.slice1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    a, b = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(fast(a, b), plain(a, b), rtol=1e-4, atol=1e-6)
