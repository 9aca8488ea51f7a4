import math

import torch

from pixelgen import flow


def test_interpolation_endpoints_t1_is_clean():
    x, eps = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    assert torch.equal(flow.interpolate(x, eps, torch.ones(3)), x)
    assert torch.equal(flow.interpolate(x, eps, torch.zeros(3)), eps)
    t = torch.tensor([0.25, 0.5, 0.75])
    assert torch.allclose(flow.interpolate(x, eps, t)[1], 0.5 * x[1] + 0.5 * eps[1])


def test_exact_x_prediction_gives_the_velocity_target():
    x, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.0, 0.3, 0.6, 0.9])  # all with 1 - t >= t_eps
    z = flow.interpolate(x, eps, t)
    v_hat = flow.x_to_v(x, z, t, t_eps=0.05)
    assert torch.allclose(v_hat, x - eps, atol=1e-5)
    assert torch.equal(flow.velocity_loss(v_hat, flow.velocity_target(x, z, t, 0.05)), torch.zeros(4))


def test_t_eps_clamps_the_division_near_clean():
    x, z = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    v = flow.x_to_v(x, z, torch.tensor([0.99, 1.0]), t_eps=0.05)
    assert torch.allclose(v, torch.full_like(v, 1 / 0.05))


def test_logit_normal_t_matches_the_paper():
    gen = torch.Generator().manual_seed(0)
    t = flow.sample_t(200_000, -0.8, 0.8, generator=gen)
    assert 0 < t.min() and t.max() < 1
    # P(t < 0.3) = Phi((logit(0.3) + 0.8) / 0.8) = 0.476 (docs/science.md: about 52% lie above, 47.6% below)
    expected = 0.5 * (1 + math.erf((math.log(0.3 / 0.7) + 0.8) / 0.8 / math.sqrt(2)))
    assert abs((t < 0.3).float().mean().item() - expected) < 0.005
    assert abs(expected - 0.476) < 0.001
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.8) < 0.01 and abs(logit.std().item() - 0.8) < 0.01


def test_time_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(flow.time_shift(t, 1.0), t)
    shifted = flow.time_shift(t, 2.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert torch.all(shifted[1:-1] < t[1:-1]) and torch.all(shifted.diff() > 0)
    assert torch.isclose(flow.time_shift(torch.tensor(0.5), 3.0), torch.tensor(0.25))


def test_velocity_loss_is_per_sample_mean_square():
    v_hat, v = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    v[1] *= 2
    assert torch.allclose(flow.velocity_loss(v_hat, v), torch.tensor([1.0, 4.0]))
