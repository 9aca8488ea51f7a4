"""ODE samplers for x-prediction flow models: Euler, Heun, DPM-Solver++(2M) and exponential AB2; time shift, guidance.

The model is any callable `model(z, t, y) -> x_hat`. Integration runs from t = 0 (pure noise) to t = 1 (clean).
Classifier-free guidance mixes conditional and unconditional predictions, x_u + s(t) (x_c - x_u), only while
interval[0] < t <= interval[1]; `schedule` shapes s(t) inside the interval (`guidance_scale`). Guidance on x and
on v is the same thing here: v is affine in x_hat for fixed z. Where s(t) = 1 (scale 1, or outside the interval)
the model runs once on the batch, never on a doubled one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import GUIDANCE_SCHEDULES, SAMPLERS  # the names a config may choose, checked there
from .flow import time_shift, x_to_v

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 0 to 1, uniformly spaced then time-shifted; float32 and built like the official
    sampler's (linspace(0, 1 - 1/steps, steps), then 1), so both evaluate the model at the same t."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    grid = torch.cat([torch.linspace(0.0, 1.0 - 1.0 / steps, steps), torch.ones(1)])
    return time_shift(grid, shift).to(device)


def _float32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def guided_at(t: float, guidance: float, interval: tuple[float, float]) -> bool:
    """Whether guidance applies at t: a scale other than 1 and interval[0] < t <= interval[1]."""
    # compare in float32 as the official sampler does (its t is a float32 tensor): t = 0.1 on the grid is
    # 0.1f, which is not > 0.1f, whereas it is > the double 0.1
    lo, hi = (_float32(v) for v in interval)
    return guidance != 1.0 and lo < _float32(t) <= hi


def guidance_scale(t: float, guidance: float, interval: tuple[float, float] = (0.0, 1.0),
                   schedule: str = "interval") -> float:
    """The guidance scale s(t); 1 (no guidance) outside interval[0] < t <= interval[1].

    interval: s = guidance, constant inside the interval (Kynkaanniemi et al. 2024; the official sampler).
    linear:   s = 1 + 2 (guidance - 1) t, rising from 1 at the noise to 2 guidance - 1 at the image;
    cosine:   s = 1 + (guidance - 1) (1 - cos(pi t)). Both are the increasing schedules of Wang et al. 2024
    (arXiv 2404.13040), scaled so the mean of s over t in [0, 1] is `guidance`.
    """
    if not guided_at(t, guidance, interval):
        return 1.0
    if schedule == "interval":
        return guidance  # exactly the given scale: the default is bit for bit the official formula
    if schedule == "linear":
        return 1.0 + 2.0 * (guidance - 1.0) * t
    if schedule == "cosine":
        return 1.0 + (guidance - 1.0) * (1.0 - math.cos(math.pi * t))
    raise ValueError(f"guidance schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {schedule!r}")


def guided_x(model: Model, z: torch.Tensor, t: float, y: torch.Tensor, *, guidance: float = 1.0,
             interval: tuple[float, float] = (0.0, 1.0), null_class: int | None = None,
             guide_t: float | None = None, schedule: str = "interval") -> torch.Tensor:
    """x_hat at time t, guided with the scale of `schedule` at `guide_t` (default t)."""
    tt = torch.full((z.shape[0],), float(t), device=z.device, dtype=z.dtype)
    scale = guidance_scale(t if guide_t is None else guide_t, guidance, interval, schedule)
    if scale == 1.0:
        return model(z, tt, y)
    if null_class is None:
        raise ValueError("guidance scale != 1 needs the model's null class")
    both = model(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]))
    x_cond, x_uncond = both.chunk(2)
    return x_uncond + scale * (x_cond - x_uncond)


def log_decay(t: float, t_eps: float) -> float:
    """L(t) = integral of dt / max(1 - t, t_eps) from 0: the velocity (x_hat - z) / max(1 - t, t_eps) pulls z
    towards x_hat at rate dL/dt, so exp(L(t_cur) - L(t_next)) is how much of z survives a step exactly.
    Without the clamp L = -log(1 - t) = -log sigma_t; infinite at t = 1 when t_eps = 0."""
    clamp_from = 1.0 - t_eps
    if t <= clamp_from:
        return math.inf if t >= 1.0 else -math.log1p(-t)
    return -math.log(t_eps) + (t - clamp_from) / t_eps


def _euler_heun(velocity, z: torch.Tensor, grid: list[float], heun: bool, corrector_at_next: bool) -> torch.Tensor:
    steps = len(grid) - 1
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur
        v = velocity(z, t_cur, t_cur)
        if heun and i < steps - 1:
            z_euler = z + dt * v
            v_next = velocity(z_euler, t_next, t_next if corrector_at_next else t_cur)
            z = z + dt * 0.5 * (v + v_next)
        else:
            z = z + dt * v
    return z


def _dpmpp_2m(x_pred, z: torch.Tensor, grid: list[float], t_eps: float, switches) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, data prediction) on the sampler's ODE dz/dt = (x_hat - z) / max(1 - t, t_eps).

    Each step integrates the linear part exactly, z_next = rho z + (1 - rho) D with rho = exp(L_cur - L_next);
    D = x_hat, or from the second step on x_hat extrapolated linearly in L from the previous step's:
    D = x_cur + (x_cur - x_prev) h / (2 h_prev), h = L_next - L_cur. Without the clamp, rho = sigma_next / sigma_cur
    and 1 - rho = alpha_next (1 - e^-h_lambda) since alpha + sigma = 1: DPM-Solver++'s weights, with step ratios
    measured in L = -log sigma instead of log-SNR (finite at t = 0, so the second step is second order too).
    The last step is first order (as in DPM-Solver++): without the clamp it lands on x_hat, and extrapolating over
    its long, sometimes infinite, L-interval would overshoot. So is a step where guidance has just switched on or
    off (`switches(t_prev, t_cur)`): x_hat jumps there, and a slope through the jump would overshoot too.
    One evaluation per step.
    """
    steps = len(grid) - 1
    x_prev, h_prev = None, None
    for i in range(steps):
        l_cur, l_next = log_decay(grid[i], t_eps), log_decay(grid[i + 1], t_eps)
        h = l_next - l_cur
        x_cur = x_pred(z, grid[i])
        d = x_cur
        if x_prev is not None and i < steps - 1 and not switches(grid[i - 1], grid[i]):
            d = x_cur + (h / (2.0 * h_prev)) * (x_cur - x_prev)
        rho = math.exp(-h)  # 0 when h is infinite (t_eps = 0 at t = 1): z_next = D
        z = rho * z + (1.0 - rho) * d
        x_prev, h_prev = x_cur, h
    return z


def decay_integral(t_cur: float, t_next: float, t_eps: float) -> float:
    """Integral over s in [t_cur, t_next] of exp(L(s) - L(t_next)), in closed form on both sides of the clamp."""
    clamp_from, total = 1.0 - t_eps, 0.0
    if t_cur < clamp_from:  # unclamped part: exp(L(s) - L(t_next)) = exp(-L(t_next)) / (1 - s)
        survive = math.exp(-log_decay(t_next, t_eps))
        if survive > 0.0:  # else sigma_next log(1 / sigma_next) -> 0
            total += survive * math.log((1.0 - t_cur) / (1.0 - min(t_next, clamp_from)))
    if t_next > clamp_from:  # clamped part: exp((s - t_next) / t_eps)
        total += t_eps * -math.expm1((max(t_cur, clamp_from) - t_next) / t_eps)
    return total


def _exp_ab2(x_pred, z: torch.Tensor, grid: list[float], t_eps: float, switches) -> torch.Tensor:
    """Exponential Adams-Bashforth 2 on x_hat (DEIS's tAB, Zhang & Chen 2023, in data prediction).

    x_hat is extrapolated linearly in t through the last two predictions, x(s) = x_cur + (s - t_cur) slope, and the
    ODE dz/dt = (x(s) - z) / max(1 - t, t_eps) is integrated exactly over the step:
    z_next = rho z + (1 - rho) x_cur + phi slope, with E(s) = exp(L(s) - L(t_next)) and
    phi = integral of (s - t_cur) dE(s) = (t_next - t_cur) - integral of E (by parts). The first step is first
    order (no previous prediction), and so is a step where guidance has just switched on or off (`switches`, as
    in _dpmpp_2m). One evaluation per step.
    """
    x_prev = None
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x_cur = x_pred(z, t_cur)
        rho = math.exp(log_decay(t_cur, t_eps) - log_decay(t_next, t_eps))
        z = rho * z + (1.0 - rho) * x_cur
        if x_prev is not None and not switches(t_prev, t_cur):
            phi = (t_next - t_cur) - decay_integral(t_cur, t_next, t_eps)
            z = z + (phi / (t_cur - t_prev)) * (x_cur - x_prev)
        x_prev, t_prev = x_cur, t_cur
    return z


@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, y: torch.Tensor, *, sampler: str = "euler", steps: int = 50,
           guidance: float = 1.0, interval: tuple[float, float] = (0.1, 0.9), shift: float = 1.0, t_eps: float = 0.05,
           null_class: int | None = None, corrector_interval_at: str = "t_cur",
           guidance_schedule: str = "interval") -> torch.Tensor:
    """Integrate dz/dt = v_hat(z, t) from the noise at t = 0 to t = 1 and return the final image.

    Heun uses two evaluations per step except the last, which is an Euler step: Heun-50 costs 99 evaluations.
    Its corrector evaluates the model at t_next but, as the official sampler does, decides whether guidance
    applies from t_cur (`corrector_interval_at="t_next"` tests t_next instead). Euler and dpm++2m cost one
    evaluation per step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if corrector_interval_at not in ("t_cur", "t_next"):
        raise ValueError(f"corrector_interval_at must be 't_cur' or 't_next', got {corrector_interval_at!r}")
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {guidance_schedule!r}")
    grid = time_grid(steps, shift).tolist()

    def x_pred(z_: torch.Tensor, t_: float, guide_t: float | None = None) -> torch.Tensor:
        return guided_x(model, z_, t_, y, guidance=guidance, interval=tuple(interval), null_class=null_class,
                        guide_t=guide_t, schedule=guidance_schedule)

    def velocity(z_: torch.Tensor, t_: float, guide_t: float) -> torch.Tensor:
        return x_to_v(x_pred(z_, t_, guide_t), z_, torch.full((z_.shape[0],), t_, device=z_.device), t_eps)

    def switches(t_prev: float, t_cur: float) -> bool:
        return guided_at(t_prev, guidance, interval) != guided_at(t_cur, guidance, interval)

    if sampler == "dpm++2m":
        return _dpmpp_2m(x_pred, noise, grid, t_eps, switches)
    if sampler == "exp-ab2":
        return _exp_ab2(x_pred, noise, grid, t_eps, switches)
    return _euler_heun(velocity, noise, grid, sampler == "heun", corrector_interval_at == "t_next")


def evaluations(sampler: str, steps: int) -> int:
    """Model evaluations per image at guidance 1 (NFE): Euler and dpm++2m = steps, Heun = 2 * steps - 1."""
    return 2 * steps - 1 if sampler == "heun" else steps
