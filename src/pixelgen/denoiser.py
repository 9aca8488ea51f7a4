"""Everything trainable in one module: the JiT network, the REPA projector (and a learned loss weighting).

One module, as the official code holds them, so that DDP broadcasts and all-reduces both, the optimizer,
checkpoint and resume see one state dict, and every rank trains the same projector. The EMA tracks the network
only (the projector is not needed to sample), as the official code does.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .gating import LearnedTimeWeighting, learned_weighting_for
from .model import JiT, build_model


def repa_block_for(depth: int, configured: int | None) -> int:
    """The block after which REPA aligns features: the configured one, else min(8, depth // 3) (8 for L and XL,
    the official align_layer)."""
    block = configured if configured is not None else max(1, min(8, depth // 3))
    if not 1 <= block <= depth:
        raise ConfigError(f"loss.repa_block {block} is outside the model's 1..{depth} blocks")
    return block


def repa_projector(width: int, hidden: int, encoder_dim: int) -> nn.Sequential:
    """Linear-SiLU-Linear-SiLU-Linear from the network's width to the encoder's (official proj, default init)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, encoder_dim))


class Denoiser(nn.Module):
    """`forward(z, t, y) -> (x_hat, projected REPA tokens or None)`."""

    def __init__(self, net: JiT, repa_block: int | None = None, encoder_dim: int | None = None,
                 repa_hidden: int | None = None, loss_weighting: LearnedTimeWeighting | None = None):
        super().__init__()
        self.net = net
        # the learned perceptual weighting over t (loss.gate_schedule learned): trained with the network, so it
        # lives here, though only the loss uses it
        self.loss_weighting = loss_weighting
        self.repa_block = repa_block if encoder_dim else None
        self.projector = (repa_projector(net.cfg.width, repa_hidden or net.cfg.width, encoder_dim)
                          if self.repa_block is not None else None)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        if self.projector is None:
            return self.net(z, t, y), None
        x_hat, tokens = self.net(z, t, y, feature_block=self.repa_block)
        return x_hat, self.projector(tokens)

    @property
    def last_layer(self) -> torch.Tensor:
        """The output projection's weight: the adaptive perceptual weight compares gradients there."""
        return self.net.final.linear.weight


def build_denoiser(config: dict, encoder_dim: int | None, class_dropout: float = 0.0) -> Denoiser:
    """The network from `model:` (its label embedder dropping labels with probability `class_dropout`), plus a
    projector to `encoder_dim` when loss.repa_weight > 0."""
    net = build_model(config["model"], class_dropout)
    loss = config["loss"]
    weighting = learned_weighting_for(loss)
    if loss["repa_weight"] <= 0 or encoder_dim is None:
        return Denoiser(net, loss_weighting=weighting)
    return Denoiser(net, repa_block_for(net.cfg.depth, loss["repa_block"]), encoder_dim, loss["repa_hidden"],
                    loss_weighting=weighting)
