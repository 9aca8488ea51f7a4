"""The PixelGen objective: flow matching + REPA + noise-gated LPIPS and P-DINO.

    L = L_FM + w_repa * L_REPA + lambda1 * gate(t) * L_LPIPS + lambda2 * gate(t) * L_PDINO,   gate(t) = [t > gate]

Every term is computed per sample as a (B,) vector before anything is gated, and the gate *selects* samples
(indexing) rather than multiplying a mask in: the perceptual encoders then run only on the gated samples
(none at all when no sample passes), and a shape mistake such as the official code's (B, N) x (B, 1, 1) mask,
which broadcasts to (B, B, N) and gates nothing, cannot happen (`gated_reduce` refuses anything but (B,)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import flow
from .encoders import DINOFeatures, LPIPS


@dataclass
class LossOutput:
    total: torch.Tensor                 # the scalar to backpropagate
    terms: dict[str, float] = field(default_factory=dict)  # every term, detached, for logging
    t: torch.Tensor | None = None
    x_hat: torch.Tensor | None = None


def repa_block_for(depth: int, configured: int | None) -> int:
    """The block after which REPA aligns features: the configured one, else min(8, depth // 3) as in the paper."""
    block = configured if configured is not None else max(1, min(8, depth // 3))
    if not 1 <= block <= depth:
        from .errors import ConfigError

        raise ConfigError(f"loss.repa_block {block} is outside the model's 1..{depth} blocks")
    return block


def gated_reduce(per_sample: torch.Tensor, index: torch.Tensor, batch: int, reduction: str) -> torch.Tensor:
    """Reduce a per-gated-sample loss vector to a scalar.

    `per_sample` holds one value per *gated* sample (shape (G,)), computed only on those samples.
    gated_mean divides by G (the official code's normalisation), batch_mean by the batch size B.
    """
    if per_sample.dim() != 1 or per_sample.shape[0] != index.shape[0]:
        raise ValueError(f"gated losses must be one value per gated sample, shape ({index.shape[0]},); "
                         f"got {tuple(per_sample.shape)}")
    if index.numel() == 0:
        return per_sample.new_zeros(())
    denominator = index.numel() if reduction == "gated_mean" else batch
    return per_sample.sum() / denominator


class PixelGenLoss(nn.Module):
    """Owns the REPA projector (trainable) and the frozen encoders; `forward` runs the model itself.

    Built from a pixelgen config dict (sections flow, loss, encoders) and the model's depth/width/grid.
    """

    def __init__(self, config: dict, model_depth: int, model_width: int, model_grid: int,
                 lpips: LPIPS | None = None, dino: DINOFeatures | None = None):
        super().__init__()
        self.flow_cfg = dict(config["flow"])
        self.cfg = dict(config["loss"])
        enc = config["encoders"]
        if self.cfg["perceptual_reduction"] not in ("gated_mean", "batch_mean"):
            from .errors import ConfigError

            raise ConfigError("loss.perceptual_reduction must be 'gated_mean' or 'batch_mean', "
                              f"got {self.cfg['perceptual_reduction']!r}")
        self.repa_block = repa_block_for(model_depth, self.cfg["repa_block"])
        self.model_grid = model_grid
        need_dino = self.cfg["repa_weight"] > 0 or self.cfg["pdino_weight"] > 0
        if lpips is None and self.cfg["lpips_weight"] > 0:
            lpips = LPIPS(random_init=enc["random_init"], weights_dir=enc["weights_dir"])
        if dino is None and need_dino:
            # 14 x the model's token grid by default, so each DINO patch covers one JiT patch (224 px at 256/16)
            size = enc["dino_input_size"] or 14 * model_grid
            dino = DINOFeatures(enc["dino_model"], size, random_init=enc["random_init"],
                                weights_dir=enc["weights_dir"])
        self.lpips = lpips
        self.dino = dino
        if dino is not None and not 1 <= self.cfg["pdino_layer"] <= dino.depth:
            from .errors import ConfigError

            raise ConfigError(f"loss.pdino_layer {self.cfg['pdino_layer']} is outside DINO's 1..{dino.depth} blocks")
        self.projector = None
        if self.cfg["repa_weight"] > 0:
            hidden = self.cfg["repa_hidden"] or model_width
            self.projector = nn.Sequential(nn.Linear(model_width, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                           nn.SiLU(), nn.Linear(hidden, dino.embed_dim))

    @property
    def encoders_real(self) -> bool:
        """False if any encoder in use has random (or unpublished) weights: results are then not comparable."""
        return all(e.real for e in (self.lpips, self.dino) if e is not None)

    def trainable_state_dict(self) -> dict:
        """What a checkpoint needs from the loss: the REPA projector (encoders are frozen and come from files)."""
        return self.projector.state_dict() if self.projector is not None else {}

    def load_trainable_state_dict(self, state: dict) -> None:
        if self.projector is not None:
            self.projector.load_state_dict(state)

    # -------------------------------------------------------------------------------------------------------
    def _dino_layers(self) -> list[int]:
        # REPA aligns with the encoder's last block (as REPA does); P-DINO compares the configured block
        return sorted({self.dino.depth, self.cfg["pdino_layer"]})

    def _to_model_grid(self, feats: torch.Tensor) -> torch.Tensor:
        """Resample DINO patch tokens (B, M, C) onto the model's token grid when the two grids differ."""
        B, M, C = feats.shape
        g = int(round(M ** 0.5))
        if g == self.model_grid:
            return feats
        grid = feats.transpose(1, 2).reshape(B, C, g, g)
        grid = F.interpolate(grid, size=(self.model_grid, self.model_grid), mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def repa(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample 1 - cosine between projected hidden tokens and the clean image's DINO tokens -> (B,)."""
        projected = self.projector(hidden)
        target = self._to_model_grid(target).to(projected.dtype)
        return (1 - F.cosine_similarity(projected.float(), target.float(), dim=-1)).mean(1)

    def perceptual(self, x_hat: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                   clean_pdino: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LPIPS and P-DINO on the gated samples only.

        Returns (index of gated samples (G,), lpips (G,), pdino (G,)); the encoders never see the other samples.
        `clean_pdino` optionally gives the clean images' P-DINO features for the whole batch (already computed
        for REPA); otherwise they are computed here for the gated samples.
        """
        index = torch.nonzero(t > self.cfg["gate"], as_tuple=False).flatten()
        empty = x_hat.new_zeros(0, dtype=torch.float32)
        lp, pd = empty, empty
        if index.numel() == 0:
            return index, lp, pd
        xg_hat, xg = x_hat.index_select(0, index), x.index_select(0, index)
        if self.lpips is not None and self.cfg["lpips_weight"] > 0:
            lp = self.lpips(xg_hat.float(), xg.float())
        if self.dino is not None and self.cfg["pdino_weight"] > 0:
            layer = self.cfg["pdino_layer"]
            pred = self.dino(xg_hat, [layer])[0]
            if clean_pdino is None:
                with torch.no_grad():
                    clean = self.dino(xg, [layer])[0]
            else:
                clean = clean_pdino.index_select(0, index)
            pd = (1 - F.cosine_similarity(pred.float(), clean.float(), dim=-1)).mean(1)
        return index, lp, pd

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None = None) -> LossOutput:
        """One training objective evaluation on clean images x (B,3,H,W) in [-1,1] with labels y (B,)."""
        fc, lc = self.flow_cfg, self.cfg
        B = x.shape[0]
        t = flow.sample_t(B, fc["P_mean"], fc["P_std"], shift=fc["train_shift"], device=x.device, generator=generator)
        eps = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype) * fc["noise_scale"]
        z = flow.interpolate(x, eps, t)
        if self.projector is not None:
            x_hat, hidden = model(z, t, y, feature_block=self.repa_block)
        else:
            x_hat, hidden = model(z, t, y), None
        fm = flow.velocity_loss(flow.x_to_v(x_hat, z, t, fc["t_eps"]), flow.velocity_target(x, eps))

        clean = {}
        if self.projector is not None:  # REPA needs the clean features of the whole batch; P-DINO reuses them
            with torch.no_grad():
                layers = self._dino_layers()
                clean = dict(zip(layers, self.dino(x, layers)))
        repa = self.repa(hidden, clean[self.dino.depth]) if hidden is not None else fm.new_zeros(B)
        index, lp, pd = self.perceptual(x_hat, x, t, clean.get(lc["pdino_layer"]))
        lpips_term = gated_reduce(lp, index, B, lc["perceptual_reduction"]) if lp.numel() else fm.new_zeros(())
        pdino_term = gated_reduce(pd, index, B, lc["perceptual_reduction"]) if pd.numel() else fm.new_zeros(())

        total = (fm.mean() + lc["repa_weight"] * repa.mean() + lc["lpips_weight"] * lpips_term
                 + lc["pdino_weight"] * pdino_term)
        terms = {
            "loss": total.item(), "fm": fm.mean().item(), "repa": repa.mean().item(),
            "lpips": lpips_term.item(), "pdino": pdino_term.item(), "gated_fraction": index.numel() / B,
        }
        return LossOutput(total=total, terms=terms, t=t, x_hat=x_hat)
