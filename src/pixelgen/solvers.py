"""ODE samplers for x-prediction flow models: Euler and Heun, with time shift and interval guidance.

The model is any callable `model(z, t, y) -> x_hat`. Integration runs from t = 0 (pure noise) to t = 1 (clean).
Classifier-free guidance mixes conditional and unconditional predictions, x_u + s (x_c - x_u), only while
interval[0] < t <= interval[1]. Guidance on x and on v is the same thing here: v is affine in x_hat for fixed z.
At scale 1, or outside the interval, the model runs once on the batch, never on a doubled one.
"""

from __future__ import annotations

from typing import Callable

import torch

from .flow import time_shift, x_to_v

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 0 to 1, uniformly spaced then time-shifted; float32 and built like the official
    sampler's (linspace(0, 1 - 1/steps, steps), then 1), so both evaluate the model at the same t."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    grid = torch.cat([torch.linspace(0.0, 1.0 - 1.0 / steps, steps), torch.ones(1)])
    return time_shift(grid, shift).to(device)


def guided_x(model: Model, z: torch.Tensor, t: float, y: torch.Tensor, *, guidance: float = 1.0,
             interval: tuple[float, float] = (0.0, 1.0), null_class: int | None = None,
             guide_t: float | None = None) -> torch.Tensor:
    """x_hat at time t, with guidance when `guide_t` (default t) lies in the interval."""
    tt = torch.full((z.shape[0],), float(t), device=z.device, dtype=z.dtype)
    # compare in float32 as the official sampler does (its t is a float32 tensor): t = 0.1 on the grid is
    # 0.1f, which is not > 0.1f, whereas it is > the double 0.1
    lo, hi = (float(torch.tensor(v, dtype=torch.float32)) for v in interval)
    guide_t = float(torch.tensor(t if guide_t is None else guide_t, dtype=torch.float32))
    if guidance == 1.0 or not (lo < guide_t <= hi):
        return model(z, tt, y)
    if null_class is None:
        raise ValueError("guidance scale != 1 needs the model's null class")
    both = model(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]))
    x_cond, x_uncond = both.chunk(2)
    return x_uncond + guidance * (x_cond - x_uncond)


@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, y: torch.Tensor, *, sampler: str = "euler", steps: int = 50,
           guidance: float = 1.0, interval: tuple[float, float] = (0.1, 0.9), shift: float = 1.0, t_eps: float = 0.05,
           null_class: int | None = None, corrector_interval_at: str = "t_cur") -> torch.Tensor:
    """Integrate dz/dt = v_hat(z, t) from the noise at t = 0 to t = 1 and return the final image.

    Heun uses two evaluations per step except the last, which is an Euler step: Heun-50 costs 99 evaluations.
    Its corrector evaluates the model at t_next but, as the official sampler does, decides whether guidance
    applies from t_cur (`corrector_interval_at="t_next"` tests t_next instead).
    """
    if sampler not in ("euler", "heun"):
        raise ValueError(f"sampler must be 'euler' or 'heun', got {sampler!r}")
    if corrector_interval_at not in ("t_cur", "t_next"):
        raise ValueError(f"corrector_interval_at must be 't_cur' or 't_next', got {corrector_interval_at!r}")
    grid = time_grid(steps, shift).tolist()
    z = noise

    def velocity(z_: torch.Tensor, t_: float, guide_t: float) -> torch.Tensor:
        x_hat = guided_x(model, z_, t_, y, guidance=guidance, interval=tuple(interval), null_class=null_class, guide_t=guide_t)
        return x_to_v(x_hat, z_, torch.full((z_.shape[0],), t_, device=z_.device), t_eps)

    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur
        v = velocity(z, t_cur, t_cur)
        if sampler == "heun" and i < steps - 1:
            z_euler = z + dt * v
            v_next = velocity(z_euler, t_next, t_cur if corrector_interval_at == "t_cur" else t_next)
            z = z + dt * 0.5 * (v + v_next)
        else:
            z = z + dt * v
    return z


def evaluations(sampler: str, steps: int) -> int:
    """Model evaluations per image at guidance 1 (NFE): Euler = steps, Heun = 2 * steps - 1."""
    return steps if sampler == "euler" else 2 * steps - 1
