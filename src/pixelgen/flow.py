"""Flow-matching math for x-prediction (pure tensor functions). Convention: t = 1 is the clean image.

    z_t = t * x + (1 - t) * eps          eps ~ N(0, noise_scale^2)
    v   = x - eps                        (dz_t/dt)
    v_hat = (x_hat - z_t) / max(1 - t, t_eps)
    target = (x - z_t) / max(1 - t, t_eps)   (the official trainer's: v up to rounding where 1 - t >= t_eps)
"""

from __future__ import annotations

import torch


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) to broadcast against images."""
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = _bcast(t, x)
    return t * x + (1 - t) * eps


def velocity_target(x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """The flow-matching target as the official trainer computes it: the velocity the clean image implies,
    through the same clamp as the prediction's. Where 1 - t >= t_eps it is x - eps up to rounding; above
    1 - t_eps it is (1 - t) / t_eps * (x - eps), so an exact x_hat has zero loss at every t (with x - eps as the
    target, x_hat = x would be penalised there)."""
    return x_to_v(x, z, t, t_eps)


def x_to_v(x_hat: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """Velocity implied by a clean-image prediction; t_eps keeps the division finite near t = 1."""
    return (x_hat - z) / (1 - _bcast(t, z)).clamp_min(t_eps)


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution time shift: shift > 1 moves t towards 0 (more time at high noise). shift = 1 is the identity."""
    if shift == 1.0:
        return t
    return t / (t + (1 - t) * shift)


def sample_t(n: int, P_mean: float, P_std: float, *, shift: float = 1.0, device=None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal training times t = sigmoid(N(P_mean, P_std)), optionally time-shifted."""
    normal = torch.randn(n, device=device, generator=generator)
    return time_shift(torch.sigmoid(normal * P_std + P_mean), shift)


def velocity_loss(v_hat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching loss: mean squared velocity error over C, H, W -> (B,)."""
    return (v_hat.float() - v.float()).pow(2).flatten(1).mean(1)
