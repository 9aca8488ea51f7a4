import math

import pytest
import torch

from pixelgen.errors import PixelgenError
from pixelgen.solvers import evaluations, guidance_scale, guided_x, sample, time_grid

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


def convergence_slope(sampler, steps, shift):
    """Least-squares slope of -log(error) against log(steps): the observed order of accuracy."""
    errors = [endpoint_error(sampler, n, shift) for n in steps]
    x, e = torch.tensor(steps, dtype=torch.float64).log(), -torch.tensor(errors).log()
    return (((x - x.mean()) * (e - e.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_multistep_solvers_are_second_order_where_euler_is_first(shift):
    steps = (64, 128, 256, 512)
    assert 0.9 < convergence_slope("euler", steps, shift) < 1.1
    # measured 1.9 (exp-ab2) and 1.7-1.8 (dpm++2m), rising with the steps: near t = 1 (sigma -> 0) a uniform t-grid
    # gives the last steps O(1) weight on an extrapolated x_hat, so the error is h^2 log(1/h) rather than h^2
    assert 1.8 < convergence_slope("exp-ab2", steps, shift) < 2.2
    assert 1.6 < convergence_slope("dpm++2m", steps, shift) < 2.2
    for sampler in ("exp-ab2", "dpm++2m"):
        assert endpoint_error(sampler, 128, shift) < endpoint_error("euler", 128, shift) / 4


@pytest.mark.parametrize("sampler", ["dpm++2m", "exp-ab2"])
def test_multistep_solvers_integrate_a_constant_prediction_exactly(sampler):
    # with x_hat constant every step is exact: the ODE's linear part is integrated in closed form, clamp included
    const = lambda z, t, y: torch.full_like(z, 0.3)
    noise, y = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    assert torch.allclose(sample(const, noise, y, sampler=sampler, steps=1, t_eps=0.0), torch.full_like(noise, 0.3))
    out = sample(const, noise, y, sampler=sampler, steps=3, shift=2.0, t_eps=0.05)
    # dz/dt = (0.3 - z) / max(1 - t, 0.05) from 0 to 1: z - 0.3 shrinks by 0.05 (to t = 0.95), then by e^-1
    assert torch.allclose(out - 0.3, (noise - 0.3) * 0.05 * math.exp(-1))


def test_exp_ab2_steps_are_exact_for_a_prediction_linear_in_t():
    # x_hat(t) = a + b t is what exp-ab2 extrapolates, so only its first (first-order) step errs, by b phi with
    # phi = t1 - (1 - t1) log(1 / (1 - t1)); the rest of the clamped ODE shrinks that by 0.05 e^-1 / (1 - t1)
    a, b, t1 = 0.2, 0.5, 0.2
    lin = lambda z, t, y: a + b * t.view(-1, 1, 1, 1).to(z.dtype) + 0 * z
    noise, y = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    fine = sample(lin, noise, y, sampler="heun", steps=20000, t_eps=0.05)
    coarse = sample(lin, noise, y, sampler="exp-ab2", steps=5, t_eps=0.05)
    phi = t1 - (1 - t1) * math.log(1 / (1 - t1))
    expected = b * phi * 0.05 * math.exp(-1) / (1 - t1)
    assert torch.allclose(fine - coarse, torch.full_like(noise, expected), atol=1e-7)


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


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm++2m"])
@pytest.mark.parametrize("schedule", ["interval", "linear", "cosine"])
def test_guidance_one_is_a_single_pass_for_every_solver_and_schedule(sampler, schedule):
    model = CountingModel()
    sample(model, torch.randn(5, 3, 4, 4), torch.arange(5), sampler=sampler, steps=7, guidance=1.0,
           interval=(0.0, 1.0), guidance_schedule=schedule, null_class=10)
    assert [c[0] for c in model.calls] == [5] * evaluations(sampler, 7)
    assert all((c[2] != model.null_class).all() for c in model.calls)


def test_dpmpp_2m_costs_one_evaluation_per_step():
    model = CountingModel()
    sample(model, torch.randn(2, 3, 4, 4), torch.arange(2), sampler="dpm++2m", steps=20)
    assert len(model.calls) == 20 == evaluations("dpm++2m", 20)
    assert [c[1] for c in model.calls] == pytest.approx(time_grid(20)[:-1].tolist())


def test_dpmpp_2m_guidance_interval_and_time_shift_are_respected():
    model = CountingModel()
    steps, interval, shift = 12, (0.3, 0.7), 2.0
    sample(model, torch.randn(3, 3, 4, 4), torch.tensor([1, 2, 3]), sampler="dpm++2m", steps=steps, guidance=2.0,
           interval=interval, shift=shift, null_class=10)
    grid = time_grid(steps, shift)[:-1]
    assert [c[1] for c in model.calls] == pytest.approx(grid.tolist())
    assert [c[0] for c in model.calls] == [6 if interval[0] < t <= interval[1] else 3 for t in grid]


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm++2m"])
def test_an_interval_that_excludes_every_step_equals_unguided(sampler):
    noise, y = torch.randn(3, 3, 4, 4), torch.tensor([1, 2, 3])
    kw = dict(sampler=sampler, steps=6, null_class=10)
    unguided = sample(CountingModel(), noise, y, guidance=1.0, **kw)
    empty = sample(CountingModel(), noise, y, guidance=3.0, interval=(0.95, 0.99), **kw)  # no grid t in (0.95, 0.99]
    guided = sample(CountingModel(), noise, y, guidance=3.0, interval=(0.0, 1.0), **kw)
    assert torch.equal(empty, unguided) and not torch.allclose(guided, unguided)


def test_guidance_schedule_values():
    g, full = 3.0, (0.0, 1.0)
    assert [guidance_scale(t, g, full, "interval") for t in (0.05, 0.5, 1.0)] == [3.0, 3.0, 3.0]
    assert [guidance_scale(t, g, full, "linear") for t in (0.0, 0.25, 0.5, 1.0)] == [1.0, 2.0, 3.0, 5.0]
    assert [guidance_scale(t, g, full, "cosine") for t in (0.5, 1.0)] == pytest.approx([3.0, 5.0])
    # the ramps average to the constant scale over t in [0, 1] (Wang et al. 2024's normalisation)
    ts = torch.linspace(0, 1, 10001).tolist()
    for schedule in ("linear", "cosine"):
        assert sum(guidance_scale(t, g, full, schedule) for t in ts) / len(ts) == pytest.approx(g, abs=1e-3)
    # every schedule is 1 outside the interval, with the official float32 comparison at its ends
    for schedule in ("interval", "linear", "cosine"):
        assert guidance_scale(0.1, g, (0.1, 0.9), schedule) == 1.0
        assert guidance_scale(0.95, g, (0.1, 0.9), schedule) == 1.0
    with pytest.raises(ValueError, match="guidance schedule"):
        guidance_scale(0.5, g, full, "quadratic")


def test_linear_schedule_guides_with_its_scale_and_skips_the_pass_where_it_is_one():
    model = CountingModel()
    z, y = torch.randn(2, 3, 4, 4), torch.tensor([4, 6])
    cond, uncond = model(z, torch.full((2,), 0.25), y), model(z, torch.full((2,), 0.25), torch.full_like(y, 10))
    model.calls.clear()
    out = guided_x(model, z, 0.25, y, guidance=3.0, null_class=10, schedule="linear")
    assert torch.allclose(out, uncond + 2.0 * (cond - uncond))
    guided_x(model, z, 0.0, y, guidance=3.0, interval=(-1.0, 1.0), null_class=10, schedule="linear")
    assert model.calls[-1][0] == 2  # scale 1 at t = 0: one pass on the batch


def test_interval_schedule_is_the_default_bit_for_bit():
    """The default schedule reproduces the constant-scale Euler loop (the official sampler's) exactly."""
    noise, y, g, lo, hi = torch.randn(3, 3, 4, 4), torch.tensor([1, 2, 3]), 2.5, 0.1, 0.9
    model, z, grid = CountingModel(), noise.clone(), time_grid(8)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        tt = t_cur.expand(3)
        x = model(z, tt, y)
        if lo < t_cur <= hi:
            x_uncond = model(z, tt, torch.full_like(y, 10))
            x = x_uncond + g * (x - x_uncond)
        z = z + (t_next - t_cur).item() * (x - z) / (1 - t_cur).clamp_min(0.05).item()
    out = sample(CountingModel(), noise, y, sampler="euler", steps=8, guidance=g, interval=(lo, hi), null_class=10)
    assert torch.equal(out, z)


def test_unknown_sampler_and_schedule_are_refused():
    with pytest.raises(ValueError, match="dpm\\+\\+2m"):
        sample(CountingModel(), torch.randn(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), sampler="rk4")
    with pytest.raises(ValueError, match="guidance schedule"):
        sample(CountingModel(), torch.randn(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), guidance_schedule="x")


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


def test_pixelgen_sample_passes_the_schedule_and_solver_through_and_records_them(tmp_path, monkeypatch):
    import json

    from pixelgen import sample_job
    from pixelgen.checkpoint import save_atomic
    from pixelgen.config import load_config
    from pixelgen.model import JiT, jit_config

    config = load_config(overrides=["model.image_size=16", "model.patch_size=4"])
    net = JiT(jit_config("tiny", image_size=16, patch_size=4))
    save_atomic({"ema": {"shadow": net.state_dict()}, "config": config, "step": 1}, tmp_path / "c.pt")
    seen = []
    monkeypatch.setattr(sample_job, "sample", lambda model, noise, y, **kw: seen.append(kw) or noise.clamp(-1, 1))
    manifest = sample_job.run_sampling(tmp_path / "c.pt", 2, tmp_path / "out", steps=4, progress=False, device="cpu",
                                       overrides=("sampling.guidance_schedule=linear", "sampling.sampler=dpm++2m"))
    assert seen[0]["guidance_schedule"] == "linear" and seen[0]["sampler"] == "dpm++2m"
    assert manifest["nfe_per_image"] == 4
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["guidance_schedule"] == "linear"
    for bad, key in [("sampling.sampler=rk4", "sampling.sampler"), ("sampling.guidance_schedule=ramp", "schedule")]:
        with pytest.raises(PixelgenError, match=key):
            sample_job.run_sampling(tmp_path / "c.pt", 2, tmp_path / "bad", steps=4, progress=False, device="cpu",
                                    overrides=(bad,))
        assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_the_cli_offers_every_solver():
    from pixelgen.cli import build_parser
    from pixelgen.solvers import SAMPLERS

    for sampler in SAMPLERS:
        args = build_parser().parse_args(["sample", "--ckpt", "c.pt", "--num", "1", "--out", "o", "--sampler", sampler])
        assert args.sampler == sampler


def test_a_checkpoint_from_before_the_schedule_key_samples_with_the_default_and_takes_the_setting():
    from pixelgen.config import load_config, section_over

    old = load_config()
    del old["sampling"]["guidance_schedule"]  # a checkpoint written before the key existed
    assert section_over(old, "sampling", None, [])["guidance_schedule"] == "interval"
    assert section_over(old, "sampling", None, ["sampling.guidance_schedule=cosine"])["guidance_schedule"] == "cosine"


@pytest.mark.parametrize("sampler", ["dpm++2m", "exp-ab2"])
def test_multistep_solvers_restart_where_guidance_switches_on_or_off(sampler):
    """x_hat constant per class jumps where guidance starts and stops; with a restart there every step extrapolates
    a zero slope, so the result is the first-order exponential step z <- rho z + (1 - rho) x_hat, step by step."""
    cond, uncond, g, interval, steps = 0.4, -0.2, 3.0, (0.3, 0.7), 10
    model = lambda z, t, y: torch.where((y == 10).view(-1, 1, 1, 1), uncond, cond).to(z.dtype).expand_as(z)
    noise = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    out = sample(model, noise, torch.tensor([1, 2]), sampler=sampler, steps=steps, guidance=g, interval=interval,
                 null_class=10)
    from pixelgen.solvers import log_decay

    z, grid = noise.clone(), time_grid(steps).tolist()
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x_hat = uncond + g * (cond - uncond) if interval[0] < torch.tensor(t_cur) <= interval[1] else cond
        rho = math.exp(log_decay(t_cur, 0.05) - log_decay(t_next, 0.05))
        z = rho * z + (1 - rho) * x_hat
    assert torch.allclose(out, z)
