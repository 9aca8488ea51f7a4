"""Exponential moving average of model weights, kept as a frozen copy of the model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weights, after each optimizer step.

    With `warmup=True` the decay ramps as min(decay, (1 + n) / (10 + n)) over the first updates, so an early
    EMA is not dominated by the random initialisation (useful for short runs such as the CPU demo).

    One update is one fused `torch._foreach_lerp_` over all parameters (the weights are read in place when their
    dtype is the shadow's, converted only where it differs) and at most one `torch._foreach_copy_` for the
    buffers that can change. Non-persistent buffers (JiT's positional embedding and RoPE tables) are derived from
    the architecture and never change: they are copied once, here, by the deepcopy, and skipped per step.
    Persistent buffers (e.g. BatchNorm running statistics) are copied every step, as before.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self._shadow_params = list(self.shadow.parameters())
        self._shadow_buffers = _persistent_buffers(self.shadow)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        params = [p if p.dtype == e.dtype else p.to(e.dtype)
                  for p, e in zip(model.parameters(), self._shadow_params)]
        torch._foreach_lerp_(self._shadow_params, params, weight)
        if self._shadow_buffers:
            torch._foreach_copy_(self._shadow_buffers, _persistent_buffers(model))
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.state_dict(), "num_updates": self.num_updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.num_updates = state["num_updates"]
        self.decay = state["decay"]
        self.warmup = state["warmup"]


def _persistent_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a state_dict holds: those that may change in training (non-persistent ones are constants)."""
    saved = model.state_dict(keep_vars=True)
    return [b for name, b in model.named_buffers() if name in saved]
