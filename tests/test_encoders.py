import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pixelgen.encoders import DINOFeatures, LPIPS
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


def test_dino_loads_the_safetensors_file(random_weights_dir):
    dino = DINOFeatures(input_size=56, weights_dir=random_weights_dir)
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
