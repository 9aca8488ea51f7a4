"""Pins for the official behaviours listed in docs/parity.md (model conventions, sampler, loss, recipe).

The official source itself stays outside the project: these tests state each convention directly, and
tests/test_official_import.py checks the whole model against the official code when a checkout is given.
"""

import math

import pytest
import torch

from pixelgen.config import base_config, load_config
from pixelgen.model import JiT, apply_rope, jit_config, rope_2d, sincos_2d
from pixelgen.solvers import sample, time_grid

from test_solvers import CountingModel


def test_time_embedding_takes_t_in_0_1_unscaled():
    model = JiT(jit_config("tiny", image_size=16, patch_size=4))
    emb = model.t_embed
    t = torch.tensor([0.25])
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128) / 128)
    expected = emb.mlp(torch.cat([(0.25 * freqs).cos(), (0.25 * freqs).sin()])[None])
    assert torch.allclose(emb(t), expected, atol=1e-6)


def test_position_embedding_encodes_the_column_in_the_first_half():
    grid, width = 4, 16
    emb = sincos_2d(width, grid)
    first, second = emb[:, : width // 2], emb[:, width // 2:]
    token = lambda row, col: row * grid + col
    # moving along a row (column changes) changes only the first half; moving down a column only the second
    assert torch.equal(second[token(1, 0)], second[token(1, 3)]) and not torch.equal(first[token(1, 0)], first[token(1, 3)])
    assert torch.equal(first[token(0, 2)], first[token(3, 2)]) and not torch.equal(second[token(0, 2)], second[token(3, 2)])
    # each half is [sin, cos] of position x 1/10000^(2k/half)
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    assert torch.allclose(first[token(0, 3)], torch.cat([(3 * omega).sin(), (3 * omega).cos()]).float())


def test_rope_rotates_adjacent_channel_pairs_row_half_then_column_half():
    head_dim, grid = 16, 3
    cos, sin = rope_2d(head_dim, grid, prefix=2)
    assert torch.equal(cos[:2], torch.ones(2, head_dim)) and torch.equal(sin[:2], torch.zeros(2, head_dim))
    x = torch.randn(1, 1, 2 + grid * grid, head_dim)
    out = apply_rope(x, cos, sin)
    row, col, tok = 2, 1, 2 + 2 * grid + 1
    freqs = 1.0 / 10000 ** (torch.arange(4).float() / 4)
    for half, pos in ((0, row), (1, col)):
        for k in range(4):
            a, b = half * 8 + 2 * k, half * 8 + 2 * k + 1  # an adjacent pair, rotated by pos * freq_k
            angle = pos * freqs[k]
            xa, xb = x[0, 0, tok, a], x[0, 0, tok, b]
            assert torch.allclose(out[0, 0, tok, a], xa * angle.cos() - xb * angle.sin(), atol=1e-6)
            assert torch.allclose(out[0, 0, tok, b], xb * angle.cos() + xa * angle.sin(), atol=1e-6)
    assert torch.equal(out[..., :2, :], x[..., :2, :])  # in-context tokens are not rotated


def test_sampling_grid_is_the_official_float32_grid():
    grid = time_grid(50, shift=2.0)
    official = torch.cat([torch.linspace(0.0, 1 - 1 / 50, 50), torch.tensor([1.0])])
    official = official / (official + (1 - official) * 2.0)
    assert torch.equal(grid, official)


@pytest.mark.parametrize("where", ["t_cur", "t_next"])
def test_heun_corrector_tests_the_guidance_interval_at_t_cur(where):
    model = CountingModel()
    steps, interval = 10, (0.15, 0.85)
    sample(model, torch.randn(2, 3, 4, 4), torch.tensor([1, 2]), sampler="heun", steps=steps, guidance=2.0,
           interval=interval, null_class=10, corrector_interval_at=where)
    grid = time_grid(steps).tolist()
    inside = lambda t: interval[0] < t <= interval[1]
    sizes = [c[0] for c in model.calls]
    expected = []
    for i in range(steps):
        expected.append(4 if inside(grid[i]) else 2)  # predictor at t_cur
        if i < steps - 1:  # corrector evaluated at t_next, guided by t_cur (official) or t_next
            expected.append(4 if inside(grid[i] if where == "t_cur" else grid[i + 1]) else 2)
    assert sizes == expected
    # the two rules differ at the interval's edges (t_cur = 0.1 -> t_next = 0.2, t_cur = 0.8 -> t_next = 0.9)
    assert (where == "t_cur") == (sizes[3] == 2)


def test_guidance_interval_is_tested_in_float32_like_the_official_sampler():
    # t = 0.1 on the float32 grid is 0.100000001...; the official code compares float32 tensors, so t = 0.1 is
    # not inside (0.1, 0.9] there, and must not be here either
    model = CountingModel()
    sample(model, torch.randn(2, 3, 4, 4), torch.tensor([1, 2]), sampler="euler", steps=10, guidance=2.0,
           interval=(0.1, 0.9), null_class=10)
    grid = time_grid(10)
    official = [4 if (t > 0.1 and t <= 0.9) else 2 for t in grid[:-1]]  # float32 tensor comparisons
    assert [c[0] for c in model.calls] == official
    assert model.calls[1][0] == 2  # t = 0.1 itself: unguided


def test_paper_configs_follow_the_official_recipe():
    cfg = load_config("config/pixelgen/imagenet256.yaml")
    assert cfg["train"]["grad_clip"] == 0 and cfg["data"]["flip"] is False
    assert cfg["train"]["lr"] == 1e-4 and cfg["train"]["betas"] == [0.9, 0.999] and cfg["train"]["weight_decay"] == 0
    assert cfg["train"]["ema_decay"] == 0.9999 and cfg["train"]["class_dropout"] == 0.1
    assert cfg["flow"] == {"P_mean": -0.8, "P_std": 0.8, "t_eps": 0.05, "noise_scale": 1.0, "train_shift": 1.0}
    assert cfg["loss"]["gate"] == 0.3 and cfg["loss"]["pdino_gated"] is False
    assert (cfg["loss"]["repa_weight"], cfg["loss"]["lpips_weight"], cfg["loss"]["pdino_weight"]) == (0.5, 0.1, 0.01)
    assert cfg["loss"]["adaptive_weight_start"] == 400000 and cfg["loss"]["adaptive_weight_every"] == 50
    assert cfg["encoders"]["dino_pos_interp"] == "official" and cfg["encoders"]["dino_model"] == "vit_base_patch14_dinov2"
    assert cfg["data"]["batch_size"] == 32  # per GPU, x 8 GPUs = 256
    assert base_config()["sampling"]["corrector_interval_at"] == "t_cur"


def test_uint8_conversion_rounds_halves_up_like_the_official_code():
    from pixelgen.images import to_uint8

    # 127.5 * (x + 1) = 126.5 exactly: the official floor(v + 0.5) gives 127, torch.round (half to even) 126
    x = torch.tensor([126.5 / 127.5 - 1, -1.2, 1.3, 0.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert to_uint8(x)[0, :, :, 0].flatten().tolist() == [127, 0, 255, 128]


def test_sampling_noise_is_scaled_by_the_training_noise_scale(tmp_path, monkeypatch):
    from pixelgen import sample_job
    from pixelgen.checkpoint import save_atomic
    from pixelgen.config import load_config

    config = load_config(overrides=["flow.noise_scale=2.0", "model.image_size=16", "model.patch_size=4"])
    net = JiT(jit_config("tiny", image_size=16, patch_size=4))
    save_atomic({"ema": {"shadow": net.state_dict()}, "config": config, "step": 1}, tmp_path / "c.pt")
    seen = []
    monkeypatch.setattr(sample_job, "sample", lambda model, noise, y, **kw: seen.append(noise) or noise.clamp(-1, 1))
    sample_job.run_sampling(tmp_path / "c.pt", 2, tmp_path / "out", steps=2, progress=False, device="cpu")
    expected = torch.stack([sample_job.image_noise(i, 0, (3, 16, 16)) for i in range(2)]) * 2.0
    assert torch.equal(seen[0], expected)


def test_lpips_inputs_are_rescaled_to_patch_16_only_when_asked():
    from pixelgen.losses import PixelGenLoss
    from conftest import small_config

    sizes = []
    for rescale in ("false", "true"):
        cfg = small_config(loss={"lpips_rescale_to_p16": rescale, "pdino_weight": 0, "repa_weight": 0},
                           encoders={"dino_model": "vit_small_patch14_dinov2"})
        criterion = PixelGenLoss(cfg, model_grid=4, patch_size=4)
        criterion.lpips.net.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[-1]))
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        criterion.perceptual(x, x.flip(0), torch.tensor([0.5, 0.9]))
    assert sizes == [16, 64]  # 16 px at patch 4 is seen as 16 * 16 / 4 = 64 px, as the official code does
