"""Noise gates: how much the perceptual losses count for a sample at time t (t = 1 is clean).

The paper gates with a hard step, weight 1 for t >= 0.3 and 0 below, and asks (its Section 3.4) whether a
continuous or learned weighting would do better. `loss.gate_schedule` chooses one:

    step     w = [t >= gate]                                                      (the paper, the default)
    sigmoid  a logistic ramp centred on `gate`, rescaled to reach exactly 0 at gate - 3 * gate_width and
             exactly 1 at gate + 3 * gate_width (a plain logistic is never 0, so it would never skip work)
    linear   w = clamp((t - gate_start) / (gate_end - gate_start), 0, 1)
    power    w = max(0, (t - gate) / (1 - gate)) ** gate_power   (gate 0: a power of t)
    learned  every sample counts; the weight is learned per time bin (LearnedTimeWeighting, below)

A sample whose weight is exactly 0 never reaches the encoders, so every schedule but `learned` still saves the
encoder work below its zero point. Weights are computed from t on the host when t is a host tensor, so the
gated index is known without a device read (the training step draws t on the host).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import GATE_SCHEDULES as SCHEDULES
from .config import check_ranges
from .errors import ConfigError

_SIGMOID_REACH = 3.0  # the sigmoid ramp spans gate +- 3 widths: logistic(+-3) = 0.047 / 0.953 before rescaling


def check_schedule(cfg: dict) -> None:
    """One-line errors for a `loss:` section whose gate settings cannot work (the config's own range checks)."""
    check_ranges({"loss": cfg})


def gate_weights(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Per-sample weights in [0, 1], float32, on t's device, for the fixed schedules (learned: all ones)."""
    t = t.float()
    name = cfg["gate_schedule"]
    if name == "step":
        return (t >= cfg["gate"]).float()  # >= as the official trainer's mask
    if name == "sigmoid":
        reach = _SIGMOID_REACH
        lo, hi = torch.sigmoid(torch.tensor(-reach)), torch.sigmoid(torch.tensor(reach))
        ramp = (torch.sigmoid((t - cfg["gate"]) / cfg["gate_width"]) - lo) / (hi - lo)
        return ramp.clamp(0.0, 1.0)
    if name == "linear":
        return ((t - cfg["gate_start"]) / (cfg["gate_end"] - cfg["gate_start"])).clamp(0.0, 1.0)
    if name == "power":
        return ((t - cfg["gate"]) / (1 - cfg["gate"])).clamp_min(0.0).pow(cfg["gate_power"])
    if name == "learned":
        return torch.ones_like(t)
    raise ConfigError(f"loss.gate_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")


class LearnedTimeWeighting(nn.Module):
    """Uncertainty weighting over time for the perceptual terms, in the spirit of EDM2's learned loss weights:
    one learned log-variance u per (term, time bin), and a term's per-sample loss L becomes

        L / exp(u[bin(t)]) + u[bin(t)]

    so a bin whose loss stays large (hard to reduce) is weighted down, and the + u keeps the weights from
    collapsing to 0. The effective weight over t is exp(-u), logged as a curve. The log-variances start at 0
    (weight 1, the ungated loss) and train with the network: they live in the trainable Denoiser, so the
    optimizer, DDP and the checkpoint treat them like every other weight (resume is bit-exact with no extra code).
    """

    def __init__(self, terms: tuple[str, ...], bins: int):
        super().__init__()
        self.terms = tuple(terms)
        self.bins = bins
        self.log_variance = nn.Parameter(torch.zeros(len(self.terms), bins))

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        """Bin index of each time: bins of equal width over [0, 1]; t = 1 falls in the last bin."""
        return (t.float() * self.bins).long().clamp(0, self.bins - 1)

    def forward(self, term: str, per_sample: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """Per-sample weighted loss of `term` for samples in time bins `bins` (same device as the parameter)."""
        u = self.log_variance[self.terms.index(term)].index_select(0, bins)
        return per_sample.float() * torch.exp(-u) + u

    def curve(self) -> dict[str, list[float]]:
        """The effective weight exp(-u) per bin of each term (a host read: call it at log steps only)."""
        weights = torch.exp(-self.log_variance.detach().float()).cpu().tolist()
        return dict(zip(self.terms, weights))

    def bin_centres(self) -> list[float]:
        return [(b + 0.5) / self.bins for b in range(self.bins)]


def learned_weighting_for(cfg: dict) -> LearnedTimeWeighting | None:
    """The learned weighting a `loss:` section asks for (None unless gate_schedule is `learned`)."""
    if cfg["gate_schedule"] != "learned":
        return None
    terms = tuple(k for k in ("lpips", "pdino") if cfg[f"{k}_weight"] > 0)
    return LearnedTimeWeighting(terms, cfg["learned_weight_bins"]) if terms else None


def describe(cfg: dict) -> str:
    """A short human name of the schedule, for logs and plots."""
    name = cfg["gate_schedule"]
    return {"step": f"step at {cfg['gate']}", "sigmoid": f"sigmoid at {cfg['gate']} width {cfg['gate_width']}",
            "linear": f"linear {cfg['gate_start']}->{cfg['gate_end']}",
            "power": f"power {cfg['gate_power']} above {cfg['gate']}",
            "learned": f"learned, {cfg['learned_weight_bins']} bins"}.get(name, name)


def zero_below(cfg: dict) -> float:
    """The time below which the schedule's weight is exactly 0 (encoders skipped there)."""
    name = cfg["gate_schedule"]
    if name == "sigmoid":
        return cfg["gate"] - _SIGMOID_REACH * cfg["gate_width"]
    if name == "linear":
        return cfg["gate_start"]
    if name in ("step", "power"):
        return cfg["gate"]
    return -math.inf
