"""Frozen perceptual encoders: LPIPS (VGG16 backbone) and DINOv2 patch features.

Weights come only from the weights directory (see weights.py). With `random_init=True` the networks are
randomly initialised and `real` is False, which every caller must carry into its labels.
Images come in as (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Frozen(nn.Module):
    """A module that stays in eval mode with no gradient to its own weights (gradients still flow to inputs)."""

    def freeze(self) -> "Frozen":
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "Frozen":
        # a parent's .train() must not switch dropout/batch-norm on inside a frozen encoder
        return super().train(False)


class LPIPS(Frozen):
    """LPIPS v0.1 with the VGG16 backbone; returns one distance per sample, shape (B,)."""

    def __init__(self, random_init: bool = False, weights_dir: str | Path | None = None):
        super().__init__()
        import lpips

        # The linear heads (v0.1) ship inside the lpips package; the VGG16 backbone comes from our weights dir,
        # never from a download: pnet_rand=True builds VGG16 without fetching torchvision's weights.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        self.real = not random_init
        if not random_init:
            path = weights.weight_path("vgg16", weights_dir)
            self.real = weights.is_published("vgg16", path)
            self._load_vgg(torch.load(path, map_location="cpu", weights_only=True))
        self.channels_last = False
        self.freeze()

    def use_channels_last(self) -> "LPIPS":
        """VGG's weights and inputs in channels_last memory format: the layout GPU convolution kernels
        (cuDNN, bf16 tensor cores) run fastest in; the same numbers, another layout."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def _load_vgg(self, state: dict) -> None:
        # lpips keeps torchvision's layer indices inside slice1..slice5, so features.{i} maps to slice*.{i}
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        for slice_ in (self.net.net.slice1, self.net.net.slice2, self.net.net.slice3, self.net.net.slice4,
                       self.net.net.slice5):
            own = {f"{idx}.{name}": p for idx, mod in slice_.named_children() for name, p in mod.state_dict().items()}
            slice_.load_state_dict({k: features[k] for k in own})

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            a, b = (v.contiguous(memory_format=torch.channels_last) for v in (a, b))
        return self.net(a, b, normalize=False).flatten(1).mean(1)


POS_INTERP = ("official", "timm")


def official_pos_interp(pos_embed: torch.Tensor, grid: int, interpolate_offset: float = 0.1) -> torch.Tensor:
    """The DINOv2 hub model's run-time position-embedding interpolation (class token first, then an M x M grid).

    Unlike timm's load-time resample (size=grid, antialiased), DINOv2 passes scale_factor=(grid + 0.1) / M without
    antialiasing, so the sampling positions differ slightly; the official PixelGen code gets exactly this.
    """
    cls_row, patches = pos_embed[:, :1], pos_embed[:, 1:]
    m = int(round(patches.shape[1] ** 0.5))
    if grid == m:  # e.g. 518 px input: DINOv2 uses the embedding as is
        return pos_embed
    dim = patches.shape[-1]
    scale = (grid + interpolate_offset) / m
    patches = patches.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, mode="bicubic", antialias=False, scale_factor=(scale, scale))
    assert patches.shape[-2:] == (grid, grid), f"interpolated grid {tuple(patches.shape[-2:])} != {grid}"
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_row, patches], dim=1)


class DINOFeatures(Frozen):
    """Patch-token features of a DINOv2 ViT (timm), from chosen blocks, after the final norm.

    `pos_interp` says how the file's 37x37 (518 px) position grid reaches `input_size`: "official" = the DINOv2 hub
    model's bicubic interpolation with the 0.1 offset (what the official PixelGen code runs), "timm" = timm's
    antialiased resample at load time.
    """

    def __init__(self, model_name: str = "vit_base_patch14_dinov2", input_size: int = 224, random_init: bool = False,
                 weights_dir: str | Path | None = None, pos_interp: str = "official"):
        super().__init__()
        if pos_interp not in POS_INTERP:
            from .errors import ConfigError

            raise ConfigError(f"encoders.dino_pos_interp must be one of {', '.join(POS_INTERP)}; got {pos_interp!r}")
        self.input_size = input_size
        self.real = False
        load = {}
        if not random_init:
            path = self._weight_file(model_name, weights_dir)
            load = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
            self.real = weights.is_published("dinov2-b", path)
        self.net = self._build(model_name, input_size, pos_interp, load)
        self.depth = len(self.net.blocks)
        self.embed_dim = self.net.embed_dim
        self.patch_size = self.net.patch_embed.patch_size[0]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @staticmethod
    def _weight_file(model_name: str, weights_dir: str | Path | None) -> Path:
        if model_name != "vit_base_patch14_dinov2":
            from .errors import ConfigError

            raise ConfigError(f"encoders.dino_model '{model_name}' has no weight file; real weights exist for "
                              f"vit_base_patch14_dinov2 only (or set encoders.random_init=true)")
        return weights.weight_path("dinov2-b", weights_dir)

    @staticmethod
    def _build(model_name: str, input_size: int, pos_interp: str, load: dict) -> nn.Module:
        import timm

        if pos_interp == "timm":  # timm resamples the file's grid to input_size while loading
            return timm.create_model(model_name, num_classes=0, img_size=input_size, **load)
        # Build at the model's native 518 px so the file's 37x37 grid loads untouched (random_init: a random 37x37
        # grid, the same path), then shrink the input size and replace timm's resample with DINOv2's interpolation.
        net = timm.create_model(model_name, num_classes=0, **load)
        source = net.pos_embed.detach().clone()
        net.set_input_size(img_size=input_size)
        grid = net.patch_embed.grid_size[0]
        net.pos_embed = nn.Parameter(official_pos_interp(source, grid))
        return net

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    def forward(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> [(B, grid*grid, embed_dim) for each 1-based block in `layers`]."""
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        return list(self.net.get_intermediate_layers(x, n=[layer - 1 for layer in layers], norm=True))
