"""JiT ("Just image Transformer"): a plain DiT on pixel patches that predicts the clean image (x-prediction).

Pieces, as in the JiT paper and the official JiT/PixelGen code (docs/science.md, docs/parity.md): bottleneck patch embedding (patch -> low-rank -> width), fixed 2-D
sin-cos position embedding plus 2-D RoPE inside attention, RMSNorm, qk-norm, SwiGLU MLP, adaLN-Zero conditioning
on (t, class), in-context class tokens prepended from a middle block on, and a linear head back to patches.
Class index `num_classes` is the null class used for classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class JiTConfig:
    depth: int
    width: int
    heads: int
    bottleneck: int | None  # None: a plain linear patch embedding
    in_context_len: int = 32
    in_context_start: int = 8
    patch_size: int = 16
    image_size: int = 256
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    proj_dropout: float = 0.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# The paper's sizes (docs/science.md) and `tiny`, which trains on a CPU in minutes.
SIZES: dict[str, JiTConfig] = {
    "tiny": JiTConfig(depth=6, width=128, heads=4, bottleneck=32, in_context_len=4, in_context_start=2,
                      patch_size=4, image_size=32, num_classes=10),
    "B/16": JiTConfig(depth=12, width=768, heads=12, bottleneck=128, in_context_start=4),
    "L/16": JiTConfig(depth=24, width=1024, heads=16, bottleneck=128, in_context_start=8),
    "XL/16": JiTConfig(depth=28, width=1152, heads=16, bottleneck=None, in_context_start=8, proj_dropout=0.1),
    "H/16": JiTConfig(depth=32, width=1280, heads=16, bottleneck=256, in_context_start=10),
}


def jit_config(size: str, **overrides) -> JiTConfig:
    """The registered size with `overrides` (None values are ignored), e.g. jit_config('B/16', image_size=64)."""
    if size not in SIZES:
        from .errors import ConfigError

        raise ConfigError(f"unknown model size '{size}' (model.size must be one of {', '.join(SIZES)})")
    cfg = replace(SIZES[size], **{k: v for k, v in overrides.items() if v is not None})
    if cfg.image_size % cfg.patch_size:
        from .errors import ConfigError

        raise ConfigError(f"model.image_size {cfg.image_size} is not a multiple of the patch size {cfg.patch_size}")
    return cfg


def model_config(model_cfg: dict) -> JiTConfig:
    """The JiTConfig that the `model:` section of a pixelgen config describes (nothing is built)."""
    return jit_config(model_cfg["size"], image_size=model_cfg["image_size"], patch_size=model_cfg["patch_size"],
                      num_classes=model_cfg["num_classes"], proj_dropout=model_cfg["proj_dropout"])


def build_model(model_cfg: dict, class_dropout: float = 0.0) -> "JiT":
    """A JiT from the `model:` section of a pixelgen config; `class_dropout` is train.class_dropout when training."""
    return JiT(model_config(model_cfg), class_dropout=class_dropout)


# ---------------------------------------------------------------------------------------------------------------
# Position encodings


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, (grid*grid, width), tokens in row-major order.

    As the official JiT/MAE code: the first half of the channels encodes the *column* index, the second half the
    row index (their meshgrid puts w first); each half is [sin, cos] of the position times 1/10000^(2k/half).
    """
    def one_axis(dim: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([one_axis(width // 2, cols.flatten()), one_axis(width // 2, rows.flatten())], dim=1)
    return emb.float()


def rope_2d(head_dim: int, grid: int, prefix: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (prefix + grid*grid, head_dim) for axial 2-D RoPE, laid out as the official JiT does.

    The first half of each head's channels rotates with the row index, the second half with the column index;
    inside each half, adjacent channels (2k, 2k + 1) form a rotating pair with frequency theta^(-k / (head_dim/4)).
    The `prefix` in-context tokens get the identity rotation (cos 1, sin 0): they have no position.
    Computed in float32 like the official tables, so imported weights see the same numbers.
    """
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(0, 2 * quarter, 2)[:quarter].float() / (2 * quarter))
    per_axis = torch.arange(grid, dtype=torch.float32)[:, None] * freqs[None]  # (grid, quarter)
    per_axis = per_axis.repeat_interleave(2, dim=1)                           # pairs share a frequency
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.cat([per_axis[rows.flatten()], per_axis[cols.flatten()]], dim=1)  # (N, head_dim)
    cos = torch.cat([torch.ones(prefix, head_dim), angles.cos()], dim=0)
    sin = torch.cat([torch.zeros(prefix, head_dim), angles.sin()], dim=0)
    return cos, sin


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the 90-degree turn of each adjacent channel pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, N, D) by the (N, D) tables."""
    return x * cos + rotate_pairs(x) * sin


# ---------------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32: bf16 sums of squares lose too much precision
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, proj_dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(width // heads)
        self.k_norm = RMSNorm(width // heads)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class SwiGLU(nn.Module):
    def __init__(self, width: int, mlp_ratio: float, proj_dropout: float = 0.0):
        super().__init__()
        # 2/3 of the usual hidden width keeps the parameter count of a GELU MLP with the same ratio
        hidden = int(width * mlp_ratio * 2 / 3)
        self.gate_up = nn.Linear(width, 2 * hidden)
        self.down = nn.Linear(hidden, width)
        self.drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.drop(F.silu(gate) * up))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: the conditioning sets shift, scale and a zero-initialised gate."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, proj_dropout: float):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, heads, proj_dropout)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, mlp_ratio, proj_dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        # t in [0, 1] goes in as it is (the official JiT/PixelGen convention; DiT would scale it by 1000)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class LabelEmbedder(nn.Embedding):
    """Class labels -> width vectors, with one extra row for the null class, as DiT's LabelEmbedder.

    It also owns classifier-free guidance's label dropout: `drop(labels, generator)` replaces each label by the
    null class with probability `dropout_prob`. A subclass of nn.Embedding, so the table stays `y_embed.weight`
    in state dicts (checkpoints and the official-name map are unchanged).
    """

    def __init__(self, num_classes: int, width: int, dropout_prob: float = 0.0):
        super().__init__(num_classes + 1, width)
        self.null_class = num_classes
        self.dropout_prob = dropout_prob

    def drop(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.dropout_prob <= 0:
            return labels  # draws nothing: the generator's stream is the same as with no dropout at all
        drop = torch.rand(labels.shape, generator=generator, device=generator.device) < self.dropout_prob
        return torch.where(drop.to(labels.device), torch.full_like(labels, self.null_class), labels)


class PatchEmbed(nn.Module):
    """p x p x 3 patches -> width, through a low-rank bottleneck when `bottleneck` is set."""

    def __init__(self, patch: int, width: int, bottleneck: int | None, channels: int = 3):
        super().__init__()
        if bottleneck:
            self.proj = nn.Sequential(nn.Conv2d(channels, bottleneck, patch, stride=patch, bias=False),
                                      nn.Conv2d(bottleneck, width, 1))
        else:
            self.proj = nn.Conv2d(channels, width, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch: int, channels: int = 3):
        super().__init__()
        self.norm = RMSNorm(width)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch * patch * channels)

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ---------------------------------------------------------------------------------------------------------------


class JiT(nn.Module):
    def __init__(self, cfg: JiTConfig, class_dropout: float = 0.0):
        super().__init__()
        self.cfg = cfg
        w, grid = cfg.width, cfg.grid
        self.t_embed = TimestepEmbedder(w)
        self.y_embed = LabelEmbedder(cfg.num_classes, w, class_dropout)
        self.x_embed = PatchEmbed(cfg.patch_size, w, cfg.bottleneck)
        self.register_buffer("pos_embed", sincos_2d(w, grid)[None], persistent=False)
        self.in_context_pos = nn.Parameter(torch.zeros(1, cfg.in_context_len, w))
        head_dim = w // cfg.heads
        cos, sin = rope_2d(head_dim, grid, prefix=0)
        cos_ic, sin_ic = rope_2d(head_dim, grid, prefix=cfg.in_context_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rope_cos_ic", cos_ic, persistent=False)
        self.register_buffer("rope_sin_ic", sin_ic, persistent=False)
        # dropout only in the middle half of the blocks, with the official JiT's bounds (depth // 4 * 3, not
        # depth * 3 // 4: they differ for depths that are not multiples of 4)
        self.blocks = nn.ModuleList(
            Block(w, cfg.heads, cfg.mlp_ratio,
                  cfg.proj_dropout if cfg.depth // 4 <= i < cfg.depth // 4 * 3 else 0.0)
            for i in range(cfg.depth)
        )
        self.final = FinalLayer(w, cfg.patch_size)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.y_embed.null_class

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for conv in self.x_embed.modules():  # initialise patch embeddings like linear layers
            if isinstance(conv, nn.Conv2d):
                nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.in_context_pos, std=0.02)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero, so the network starts as identity-ish
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        nn.init.zeros_(self.final.ada[-1].weight)
        nn.init.zeros_(self.final.ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B, p, g = x.shape[0], self.cfg.patch_size, self.cfg.grid
        x = x.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, 3, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, feature_block: int | None = None):
        """Predict the clean image from z_t (B,3,H,W), t (B,) in [0,1] (1 = clean) and labels y (B,).

        With `feature_block=k`, also return the image tokens after the first k blocks (B, N, width), for REPA.
        """
        c = self.t_embed(t) + self.y_embed(y)
        h = self.x_embed(x)
        # As the official `x += self.pos_embed`: the sum in fp32, rounded once to the embedding's dtype, so under
        # bf16 autocast the stream stays bf16 until the fp32 class tokens join (the cat below promotes it)
        h = (h + self.pos_embed).to(h.dtype)
        n_ctx = self.cfg.in_context_len
        features = None
        for i, block in enumerate(self.blocks):
            if i == feature_block:
                features = h[:, n_ctx:] if i > self.cfg.in_context_start else h
            if i == self.cfg.in_context_start and n_ctx > 0:
                ctx = self.y_embed(y).unsqueeze(1) + self.in_context_pos
                h = torch.cat([ctx, h], dim=1)  # promotes to the wider dtype, as the official cat does
            if i < self.cfg.in_context_start or n_ctx == 0:
                h = block(h, c, self.rope_cos, self.rope_sin)
            else:
                h = block(h, c, self.rope_cos_ic, self.rope_sin_ic)
        if feature_block is not None and feature_block >= len(self.blocks):
            features = h[:, n_ctx:] if len(self.blocks) > self.cfg.in_context_start else h
        if len(self.blocks) > self.cfg.in_context_start:
            h = h[:, n_ctx:]
        out = self.unpatchify(self.final(h, c))
        return (out, features) if feature_block is not None else out
