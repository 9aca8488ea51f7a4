import math

import pytest
import torch

from pixelgen.solvers import evaluations, sample, time_grid

MU, S = 0.7, 0.5  # toy data: every pixel ~ N(MU, S^2), independent; noise N(0, 1)


def exact_x_hat(z, t, y):
    """E[x | z_t] for Gaussian data under z_t = t x + (1 - t) eps, in closed form."""
    t = t.view(-1, *[1] * (z.dim() - 1)).double()
    var = t ** 2 * S ** 2 + (1 - t) ** 2
    return (MU + t * S ** 2 / var * (z.double() - t * MU)).to(z.dtype)


def endpoint_error(sampler, steps, shift=1.0):
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 3, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.long)
    # the exact probability-flow ODE maps noise z0 to MU + S * z0 (a monotone linear transport)
    out = sample(exact_x_hat, noise, y, sampler=sampler, steps=steps, shift=shift, t_eps=1e-12)
    return (out - (MU + S * noise)).abs().max().item()


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_euler_is_first_order_and_heun_second_order(shift):
    euler = [endpoint_error("euler", n, shift) for n in (8, 16, 32, 64)]
    heun = [endpoint_error("heun", n, shift) for n in (8, 16, 32, 64)]
    euler_ratios = [a / b for a, b in zip(euler, euler[1:])]
    heun_ratios = [a / b for a, b in zip(heun, heun[1:])]
    assert all(1.6 < r < 2.5 for r in euler_ratios), euler_ratios
    assert all(3.0 < r < 5.0 for r in heun_ratios), heun_ratios
    assert heun[-1] < euler[-1] / 10


class CountingModel:
    def __init__(self, null_class=10):
        self.calls = []
        self.null_class = null_class

    def __call__(self, z, t, y):
        self.calls.append((z.shape[0], float(t[0]), y.clone()))
        # class-dependent prediction so guidance has something to amplify
        return torch.tanh(z) * 0.5 + (y.float() / 10).view(-1, 1, 1, 1)


def test_guidance_one_runs_the_model_once_per_step_on_the_batch():
    model = CountingModel()
    sample(model, torch.randn(6, 3, 4, 4), torch.arange(6), sampler="euler", steps=10, guidance=1.0, interval=(0.0, 1.0))
    assert [c[0] for c in model.calls] == [6] * 10
    assert all((c[2] != model.null_class).all() for c in model.calls)


def test_heun_50_costs_99_evaluations():
    model = CountingModel()
    sample(model, torch.randn(2, 3, 4, 4), torch.arange(2), sampler="heun", steps=50)
    assert len(model.calls) == 99 == evaluations("heun", 50)
    assert evaluations("euler", 50) == 50


def test_guidance_doubles_the_batch_only_inside_the_interval():
    model = CountingModel()
    steps, interval = 20, (0.1, 0.9)
    sample(model, torch.randn(3, 3, 4, 4), torch.tensor([1, 2, 3]), sampler="euler", steps=steps, guidance=1.5,
           interval=interval, null_class=10)
    grid = time_grid(steps)[:-1]  # float32, compared in float32 as the official sampler does
    expected = [6 if (t > interval[0] and t <= interval[1]) else 3 for t in grid]
    assert [c[0] for c in model.calls] == expected
    doubled = [c for c in model.calls if c[0] == 6]
    assert all((c[2][3:] == 10).all() and (c[2][:3] != 10).all() for c in doubled)


def test_guidance_formula():
    from pixelgen.solvers import guided_x

    model = CountingModel()
    z, y = torch.randn(2, 3, 4, 4), torch.tensor([4, 6])
    cond = model(z, torch.full((2,), 0.5), y)
    uncond = model(z, torch.full((2,), 0.5), torch.full_like(y, 10))
    out = guided_x(model, z, 0.5, y, guidance=2.0, interval=(0.0, 1.0), null_class=10)
    assert torch.allclose(out, uncond + 2.0 * (cond - uncond))
    with pytest.raises(ValueError, match="null class"):
        guided_x(model, z, 0.5, y, guidance=2.0, interval=(0.0, 1.0))


def test_time_grid():
    grid = time_grid(4)
    assert grid.dtype == torch.float32 and torch.allclose(grid, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    shifted = time_grid(4, shift=2.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted[1:-1] < grid[1:-1])
    with pytest.raises(ValueError):
        time_grid(0)


def test_sampling_a_jit_end_to_end():
    from pixelgen.model import JiT, jit_config

    model = JiT(jit_config("tiny", image_size=16, patch_size=4)).eval()
    out = sample(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), sampler="heun", steps=3, guidance=1.5,
                 interval=(0.0, 1.0), null_class=model.null_class)
    # a freshly initialised JiT predicts x_hat = 0, so the last step lands on exactly 0
    assert out.shape == (2, 3, 16, 16) and out.abs().max() < 1e-6
