"""The PixelGen objective: flow matching + REPA + noise-gated LPIPS and P-DINO.

    L = L_FM + w_repa * L_REPA + a * (lambda1 * gate(t) * L_LPIPS + lambda2 * gate'(t) * L_PDINO),   gate(t) = [t >= gate]

Every term is computed per sample as a (B,) vector before anything is gated, and the gate *selects* samples
(indexing) rather than multiplying a mask in: the perceptual encoders then run only on the gated samples
(none at all when no sample passes), and a shape mistake such as the official code's (B, N) x (B, 1, 1) mask,
which broadcasts to (B, B, N) and gates nothing, cannot happen (`gated_reduce` refuses anything but (B,)).

`gate'` is the P-DINO gate: with `loss.pdino_gated: false` (the official code's effective behaviour, which
made the published tables) P-DINO averages over the whole batch whenever at least one sample passes the gate;
with `true` it is gated like LPIPS. `a` is 1, or the adaptive weight (`loss.adaptive_weight_start`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import flow, gating
from .encoders import DINOFeatures, LPIPS
from .errors import ConfigError


@dataclass
class LossOutput:
    total: torch.Tensor                 # the scalar to backpropagate
    # every term for logging: detached device tensors (reading one would sync the device) or host floats
    terms: dict[str, torch.Tensor | float] = field(default_factory=dict)
    t: torch.Tensor | None = None
    x_hat: torch.Tensor | None = None

    def read_terms(self, *extra: torch.Tensor) -> tuple[dict[str, float], list[float]]:
        """The terms as floats, and `extra` device scalars read along with them, in one device->host copy."""
        return read_scalars(self.terms, *extra)


def read_scalars(values: dict[str, torch.Tensor | float], *extra: torch.Tensor) -> tuple[dict[str, float], list[float]]:
    """One `stack().tolist()` for every tensor in `values` and `extra` (the only sync a log step needs)."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    tensors = [values[k] for k in keys] + list(extra)
    device = tensors[0].device if tensors else None  # a restored adaptive weight may still be a host tensor
    read = torch.stack([v.detach().float().reshape(()).to(device) for v in tensors]).tolist() if tensors else []
    out = {k: float(v) for k, v in values.items()}
    out.update(zip(keys, read))
    return out, read[len(keys):]


def gate_index(t: torch.Tensor, gate: float) -> torch.Tensor:
    """Indices of the samples with t >= gate, on the host. From host times (the trainer draws t there) this
    reads nothing from the device; device times are copied to the host first (one sync)."""
    return torch.nonzero(t.cpu() >= gate, as_tuple=False).flatten()


@dataclass
class Gate:
    """Which samples the perceptual losses see, and with what weight; decided on the host from t.

    `index` (G,): samples with a non-zero weight (the only ones the encoders run on); `weights` (G,) on the
    device, None for the step schedule (all ones: nothing to multiply); `bins` (B,) on the device, the time
    bin of every sample, for the learned weighting only."""

    index: torch.Tensor
    weights: torch.Tensor | None = None
    bins: torch.Tensor | None = None


def decide_gate(t_host: torch.Tensor, cfg: dict, device: torch.device,
                weighting: gating.LearnedTimeWeighting | None) -> Gate:
    if cfg["gate_schedule"] == "step":
        return Gate(gate_index(t_host, cfg["gate"]))
    if cfg["gate_schedule"] == "learned":
        bins = to_device(weighting.bin_of(t_host), device) if weighting is not None else None
        return Gate(torch.arange(len(t_host)), bins=bins)
    weights = gating.gate_weights(t_host.cpu(), cfg)
    index = torch.nonzero(weights > 0, as_tuple=False).flatten()
    return Gate(index, weights=to_device(weights.index_select(0, index), device))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without waiting for the device: a copy from pageable memory would
    synchronise the stream first, so the tensor is pinned."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def gated_reduce(per_sample: torch.Tensor, index: torch.Tensor, batch: int, reduction: str,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a per-gated-sample loss vector to a scalar.

    `per_sample` holds one value per *gated* sample (shape (G,)), computed only on those samples, and
    `weights` (G,) their gate weights (None: all 1, the step gate). gated_mean divides the weighted sum by G
    (the official code's normalisation), batch_mean by the batch size B.
    """
    if per_sample.dim() != 1 or per_sample.shape[0] != index.shape[0]:
        raise ValueError(f"gated losses must be one value per gated sample, shape ({index.shape[0]},); "
                         f"got {tuple(per_sample.shape)}")
    if index.numel() == 0:
        return per_sample.new_zeros(())
    if weights is not None:
        per_sample = per_sample * weights
    denominator = index.numel() if reduction == "gated_mean" else batch
    return per_sample.sum() / denominator


class AdaptivePerceptualWeight:
    """The official late-training balance (VQGAN style): every `every` steps from step `start` on,
    w = clamp(|grad L_FM| / (|grad L_perc| + 1e-4), 0, 100) at the output layer's weight, and the applied
    weight follows it as a running average a <- 0.8 a + 0.2 w (a starts at 1). start = 0 switches it off."""

    def __init__(self, start: int, every: int):
        self.start, self.every = start, every
        self.weight: torch.Tensor | float = 1.0  # a device tensor once updated: read only when saved or logged

    @property
    def value(self) -> float:
        return float(self.weight)

    @value.setter
    def value(self, value: float) -> None:
        # restored as the float32 tensor it was saved from (float32 -> float is exact), so the updates after a
        # resume run the same float32 arithmetic as an uninterrupted run (a Python float would round otherwise)
        self.weight = torch.tensor(float(value), dtype=torch.float32)

    def due(self, step: int | None) -> bool:
        return self.start > 0 and step is not None and step >= self.start and step % self.every == 0

    def update(self, rec: torch.Tensor, percept: torch.Tensor, last_layer: torch.Tensor) -> None:
        g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        # no gated sample: the perceptual term is a constant, its gradient zero (the official mask gives the same)
        g_per = (torch.autograd.grad(percept, last_layer, retain_graph=True)[0] if percept.requires_grad
                 else torch.zeros_like(last_layer))
        w = (g_rec.float().norm() / (g_per.float().norm() + 1e-4)).clamp(0.0, 100.0).detach()
        self.weight = 0.8 * torch.as_tensor(self.weight, dtype=torch.float32, device=w.device) + 0.2 * w


class PixelGenLoss(nn.Module):
    """Owns the frozen encoders; `forward` runs the trainable Denoiser (model + REPA projector) itself.

    Built from a pixelgen config dict (sections flow, loss, encoders) and the model's patch size and grid.
    """

    def __init__(self, config: dict, model_grid: int, patch_size: int = 16,
                 lpips: LPIPS | None = None, dino: DINOFeatures | None = None):
        super().__init__()
        self.flow_cfg = dict(config["flow"])
        self.cfg = dict(config["loss"])
        enc = config["encoders"]
        if self.cfg["perceptual_reduction"] not in ("gated_mean", "batch_mean"):
            raise ConfigError("loss.perceptual_reduction must be 'gated_mean' or 'batch_mean', "
                              f"got {self.cfg['perceptual_reduction']!r}")
        gating.check_schedule(self.cfg)
        self.model_grid, self.patch_size = model_grid, patch_size
        need_dino = self.cfg["repa_weight"] > 0 or self.cfg["pdino_weight"] > 0
        if lpips is None and self.cfg["lpips_weight"] > 0:
            lpips = LPIPS(random_init=enc["random_init"], weights_dir=enc["weights_dir"])
        if dino is None and need_dino:
            # 14 x the model's token grid by default, so each DINO patch covers one JiT patch (224 px at 256/16)
            size = enc["dino_input_size"] or 14 * model_grid
            dino = DINOFeatures(enc["dino_model"], size, random_init=enc["random_init"],
                                weights_dir=enc["weights_dir"], pos_interp=enc["dino_pos_interp"])
        self.lpips = lpips
        self.dino = dino
        if dino is not None and not 1 <= self.cfg["pdino_layer"] <= dino.depth:
            raise ConfigError(f"loss.pdino_layer {self.cfg['pdino_layer']} is outside DINO's 1..{dino.depth} blocks")
        self.adaptive = AdaptivePerceptualWeight(self.cfg["adaptive_weight_start"], self.cfg["adaptive_weight_every"])

    @property
    def encoders_real(self) -> bool:
        """False if any encoder in use has random (or unpublished) weights: results are then not comparable."""
        return all(e.real for e in (self.lpips, self.dino) if e is not None)

    @property
    def repa_dim(self) -> int | None:
        """Width of the REPA target features (the projector's output), None when REPA is off."""
        return self.dino.embed_dim if self.cfg["repa_weight"] > 0 else None

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

    def repa(self, projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample 1 - cosine between projected hidden tokens and the clean image's DINO tokens -> (B,)."""
        target = self._to_model_grid(target)
        return (1 - F.cosine_similarity(projected.float(), target.float(), dim=-1)).mean(1)

    def _lpips(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.cfg["lpips_rescale_to_p16"] and self.patch_size != 16:
            # the official code feeds LPIPS images scaled as if the model had 16-pixel patches
            size = a.shape[-1] * 16 // self.patch_size
            a, b = (F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                    for v in (a, b))
        return self.lpips(a.float(), b.float())

    def compile_encoders(self, backend: str = "inductor") -> None:
        """torch.compile the frozen encoders in place (train.compile). The gated batch's size changes every step,
        so they are compiled with dynamic shapes: one graph for all gated counts (plus one for a count of 1,
        which torch specialises), not one per count. VGG runs channels_last (faster convolutions on GPUs)."""
        if self.lpips is not None:
            self.lpips.use_channels_last()
            self.lpips.compile(backend=backend, dynamic=True)
        if self.dino is not None:
            self.dino.compile(backend=backend, dynamic=True)

    def perceptual(self, x_hat: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                   clean_pdino: torch.Tensor | None = None,
                   index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LPIPS on the gated samples only (weight > 0 under loss.gate_schedule; t >= loss.gate for the
        step); P-DINO on the gated ones, or with pdino_gated false on the whole batch as soon as one sample
        is gated.

        Returns (index of gated samples (G,) on the host, lpips (G,), pdino (G,) or (B,)).
        `clean_pdino` optionally gives the clean images' P-DINO features for the whole batch (already computed
        for REPA); otherwise they are computed here. `index`: the host-side gate index when the caller has it
        (then nothing here waits for the device), else it is computed from t with the step gate.
        """
        index = gate_index(t, self.cfg["gate"]) if index is None else index
        empty = x_hat.new_zeros(0, dtype=torch.float32)
        lp, pd = empty, empty
        if index.numel() == 0:
            return index, lp, pd
        rows = to_device(index, x.device)
        if self.lpips is not None and self.cfg["lpips_weight"] > 0:
            lp = self._lpips(x_hat.index_select(0, rows), x.index_select(0, rows))
        if self.dino is not None and self.cfg["pdino_weight"] > 0:
            layer = self.cfg["pdino_layer"]
            pred_in, clean_in = (x_hat.index_select(0, rows), x.index_select(0, rows)) if self.cfg["pdino_gated"] \
                else (x_hat, x)
            pred = self.dino(pred_in, [layer])[0]
            if clean_pdino is None:
                with torch.no_grad():
                    clean = self.dino(clean_in, [layer])[0]
            else:
                clean = clean_pdino.index_select(0, rows) if self.cfg["pdino_gated"] else clean_pdino
            pd = (1 - F.cosine_similarity(pred.float(), clean.float(), dim=-1)).mean(1)
        return index, lp, pd

    def draw_times(self, batch: int, device: torch.device, generator: torch.Generator | None,
                   host_generator: torch.Generator | None,
                   weighting: gating.LearnedTimeWeighting | None = None) -> tuple[torch.Tensor, Gate]:
        """Training times t on `device` and the gate decided on the host. t is drawn on the host (from
        `host_generator`, or `generator` when that is a CPU one) so the gate needs no device read;
        the official code draws t on the device: same distribution, another random stream (docs/parity.md)."""
        fc = self.flow_cfg
        host = host_generator if host_generator is not None else generator
        if host is not None and host.device.type != "cpu":  # only a device generator given: t on the device
            t = flow.sample_t(batch, fc["P_mean"], fc["P_std"], shift=fc["train_shift"], device=device,
                              generator=host)
            return t, decide_gate(t.cpu(), self.cfg, device, weighting)
        t_host = flow.sample_t(batch, fc["P_mean"], fc["P_std"], shift=fc["train_shift"], generator=host)
        return to_device(t_host, device), decide_gate(t_host, self.cfg, device, weighting)

    def perceptual_terms(self, lp: torch.Tensor, pd: torch.Tensor, gate: Gate, batch: int,
                         weighting: gating.LearnedTimeWeighting | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(LPIPS term, P-DINO term) as they enter the loss: gated and weighted by the schedule, or by the
        learned weighting (every sample then has both terms, and the bins of its t)."""
        lc, zero = self.cfg, lp.new_zeros(())  # lp is on the batch's device even when empty
        if weighting is not None and gate.bins is not None:
            return tuple(weighting(name, values, gate.bins).mean() if values.numel() else zero
                         for name, values in (("lpips", lp), ("pdino", pd)))
        reduction = lc["perceptual_reduction"]
        lpips_term = gated_reduce(lp, gate.index, batch, reduction, gate.weights) if lp.numel() else zero
        if not pd.numel():
            pdino_term = zero
        elif lc["pdino_gated"]:
            pdino_term = gated_reduce(pd, gate.index, batch, reduction, gate.weights)
        else:  # the official behaviour: the whole batch's mean, unweighted, once any sample passes the gate
            pdino_term = pd.mean()
        return lpips_term, pdino_term

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None = None, step: int | None = None,
                last_layer: torch.Tensor | None = None,
                host_generator: torch.Generator | None = None,
                weighting: gating.LearnedTimeWeighting | None = None) -> LossOutput:
        """One objective evaluation on clean images x (B,3,H,W) in [-1,1] with labels y (B,).

        `model(z, t, y) -> (x_hat, projected REPA tokens or None)` is the (possibly DDP-wrapped) Denoiser;
        `step` and `last_layer` drive the adaptive perceptual weight when it is on. `generator` draws the
        noise, `host_generator` (a CPU one) the times; nothing here reads a value back from the device
        (the terms stay device tensors), except the adaptive weight's steps. `weighting`: the Denoiser's
        learned weighting over t (loss.gate_schedule learned), which the loss trains along with the network.
        """
        fc, lc = self.flow_cfg, self.cfg
        B = x.shape[0]
        t, gate = self.draw_times(B, x.device, generator, host_generator, weighting)
        eps = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype) * fc["noise_scale"]
        z = flow.interpolate(x, eps, t)
        x_hat, projected = model(z, t, y)
        fm = flow.velocity_loss(flow.x_to_v(x_hat, z, t, fc["t_eps"]), flow.velocity_target(x, z, t, fc["t_eps"]))

        clean = {}
        if projected is not None:  # REPA's target: clean features of the whole batch, reused by P-DINO
            with torch.no_grad():
                layers = self._dino_layers()
                clean = dict(zip(layers, self.dino(x, layers)))
        repa = self.repa(projected, clean[self.dino.depth]) if projected is not None else fm.new_zeros(B)
        index, lp, pd = self.perceptual(x_hat, x, t, clean.get(lc["pdino_layer"]), index=gate.index)
        lpips_term, pdino_term = self.perceptual_terms(lp, pd, gate, B, weighting)
        percept = lc["lpips_weight"] * lpips_term + lc["pdino_weight"] * pdino_term
        if self.adaptive.due(step) and last_layer is not None:
            self.adaptive.update(fm.mean(), percept, last_layer)

        total = fm.mean() + lc["repa_weight"] * repa.mean() + self.adaptive.weight * percept
        terms = {
            "loss": total.detach(), "fm": fm.mean().detach(), "repa": repa.mean().detach(),
            "lpips": lpips_term.detach(), "pdino": pdino_term.detach(), "gated_fraction": index.numel() / B,
            "perceptual_weight": self.adaptive.weight,
        }
        return LossOutput(total=total, terms=terms, t=t, x_hat=x_hat)
