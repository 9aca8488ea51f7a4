"""FLOPs of the JiT and of the training step's encoders, and the dense bf16 peak of the GPU they run on (for MFU).

FLOPs here follow `torch.utils.flop_counter.FlopCounterMode`'s definition, so the formula can be checked against
it exactly: 2 x multiply-accumulates of every matmul and convolution, and QK^T + AV of attention (4 T^2 C per
block of T tokens and width C). Elementwise work (norms, RoPE, SiLU, modulation, softmax, bias adds, the
optimizer, the EMA) and embedding look-ups count as zero. The JiT's cost splits into work done once per sample
(time/label conditioning and each block's adaLN modulation, which act on one vector per sample, not per token)
and work per token; from block `in_context_start` on, the block runs on the image tokens plus `in_context_len`
class tokens.

Encoder FLOPs (DINOv2 for REPA and P-DINO, LPIPS-VGG16) are measured, not modelled: FlopCounterMode over one
image on the meta device (no memory, no compute), with the gradients the training step really takes (inputs
only: the encoders are frozen). Nothing here runs at import.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import JiTConfig

TIME_FREQ_DIM = 256  # TimestepEmbedder's sinusoid width (model.TimestepEmbedder.freq_dim)


def mlp_hidden(cfg: JiTConfig) -> int:
    """SwiGLU's hidden width, as model.SwiGLU computes it."""
    return int(cfg.width * cfg.mlp_ratio * 2 / 3)


def block_tokens(cfg: JiTConfig) -> list[int]:
    """Tokens each block runs on: the image tokens, plus the in-context tokens from `in_context_start` on."""
    n = cfg.grid ** 2
    with_context = cfg.in_context_len > 0
    return [n + cfg.in_context_len if with_context and i >= cfg.in_context_start else n for i in range(cfg.depth)]


@dataclass(frozen=True)
class JiTFlops:
    """Forward FLOPs of one sample, by part. `per_sample` parts act on one vector per sample, the others on tokens."""
    conditioning: int      # per sample: timestep MLP (the label embedding is a look-up: 0)
    modulation: int        # per sample: adaLN of every block and of the final layer
    patch_embed: int       # per image token
    block_linear: int      # per token of each block: qkv, proj, SwiGLU
    attention: int         # per block: QK^T and AV on its T tokens (4 T^2 C)
    final: int             # per image token: the linear head back to patches
    projector: int = 0     # per image token: the REPA projector (training only)
    first_patch_layer: int = 0  # part of patch_embed: the layer applied to z_t itself
    first_time_layer: int = 0   # part of conditioning: the timestep MLP's layer on the sinusoid

    @property
    def forward(self) -> int:
        return (self.conditioning + self.modulation + self.patch_embed + self.block_linear + self.attention
                + self.final + self.projector)

    @property
    def no_input_grad(self) -> int:
        """Forward FLOPs of the layers whose input needs no gradient (the patch embedding's first layer on z_t and
        the timestep MLP's first layer on the sinusoid): the backward computes only their weight gradient."""
        return self.first_patch_layer + self.first_time_layer

    @property
    def training(self) -> int:
        """Forward + backward: backward is twice the forward (input and weight gradients) except for the layers
        whose input needs no gradient, which take one weight-gradient pass."""
        return 3 * self.forward - self.no_input_grad


def jit_flops(cfg: JiTConfig, projector: tuple[int, int] | None = None) -> JiTFlops:
    """Forward FLOPs of one sample through the JiT (`projector=(hidden, encoder_dim)`: plus the REPA projector on
    the image tokens, as the Denoiser runs it in training)."""
    w, n, patch_values = cfg.width, cfg.grid ** 2, 3 * cfg.patch_size ** 2
    hidden = mlp_hidden(cfg)
    tokens = block_tokens(cfg)
    if cfg.bottleneck:
        first_patch = 2 * n * patch_values * cfg.bottleneck
        patch_embed = first_patch + 2 * n * cfg.bottleneck * w
    else:
        first_patch = patch_embed = 2 * n * patch_values * w
    per_token_linear = 2 * (3 * w * w + w * w + w * 2 * hidden + hidden * w)
    proj = 0
    if projector is not None:
        p_hidden, enc_dim = projector
        proj = 2 * n * (w * p_hidden + p_hidden * p_hidden + p_hidden * enc_dim)
    return JiTFlops(
        conditioning=2 * (TIME_FREQ_DIM * w + w * w),
        modulation=cfg.depth * 2 * w * 6 * w + 2 * w * 2 * w,
        patch_embed=patch_embed,
        block_linear=sum(per_token_linear * t for t in tokens),
        attention=sum(4 * t * t * w for t in tokens),
        final=2 * n * w * patch_values,
        projector=proj,
        first_patch_layer=first_patch,
        first_time_layer=2 * TIME_FREQ_DIM * w,
    )


def denoiser_flops(denoiser) -> JiTFlops:
    """jit_flops of a built Denoiser (denoiser.py): the network plus its REPA projector when it has one."""
    projector = None
    if denoiser.projector is not None:
        first, last = denoiser.projector[0], denoiser.projector[-1]
        projector = (first.out_features, last.out_features)
    return jit_flops(denoiser.net.cfg, projector)


# ---------------------------------------------------------------------------------------------------------------
# Counting with FlopCounterMode (the reference the formula is checked against; the encoders' cost)


def counted(fn) -> int:
    """FLOPs FlopCounterMode counts while `fn()` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def on_meta(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` on the meta device: FlopCounterMode sees the same ops with no memory or compute."""
    return copy.deepcopy(module).to("meta")


def meta_images(batch: int, size: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.empty(batch, 3, size, size, device="meta", requires_grad=requires_grad)


@dataclass(frozen=True)
class EncoderFlops:
    """FLOPs per image of the frozen encoders in one training step (loss.py's PixelGenLoss)."""
    dino_clean: int       # DINOv2 forward on a clean image (REPA target, and P-DINO's clean features), no grad
    pdino_prediction: int  # DINOv2 forward + input-gradient backward on a predicted image (P-DINO)
    lpips: int            # LPIPS-VGG16 on one (prediction, clean) pair, forward of both + backward of the prediction

    def per_step(self, batch: int, gated: int, pdino_rows: int, repa: bool = True) -> int:
        """A step of `batch` samples of which `gated` pass the noise gate; P-DINO runs on `pdino_rows` of them
        (the whole batch when loss.pdino_gated is false and any sample is gated, else the gated ones). The clean
        DINO pass runs on the whole batch for REPA, else only on P-DINO's rows."""
        clean_rows = batch if repa else pdino_rows
        return clean_rows * self.dino_clean + pdino_rows * self.pdino_prediction + gated * self.lpips


def encoder_flops(criterion, image_size: int) -> EncoderFlops:
    """Measured per-image encoder FLOPs of a PixelGenLoss at `image_size` (a copy of it on meta, called the way
    its forward calls the encoders, LPIPS's resize to patch-16 scale included)."""
    meta = on_meta(criterion)
    cfg = meta.cfg
    dino_clean = pdino = lpips = 0
    if meta.dino is not None:
        layers = meta._dino_layers() if cfg["repa_weight"] > 0 else [cfg["pdino_layer"]]
        dino_clean = counted(lambda: meta.dino(meta_images(1, image_size), layers))
        if cfg["pdino_weight"] > 0:
            pdino = counted(lambda: meta.dino(meta_images(1, image_size, True), [cfg["pdino_layer"]])[0]
                            .sum().backward())
    if meta.lpips is not None and cfg["lpips_weight"] > 0:
        lpips = counted(lambda: meta._lpips(meta_images(1, image_size, True), meta_images(1, image_size))
                        .sum().backward())
    return EncoderFlops(dino_clean, pdino, lpips)


# ---------------------------------------------------------------------------------------------------------------
# Dense bf16 peaks (tensor cores, no sparsity), from the vendors' data sheets

PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "H200 NVL": 835.0,
    "A100": 312.0,
}
# H100 board -> its streaming multiprocessor count, for names that do not say the form factor
H100_SM_COUNTS = {132: "H100 SXM", 114: "H100 PCIe"}


def detect_part(name: str, sm_count: int | None = None) -> str | None:
    """The PEAK_BF16_TFLOPS key of a CUDA device name (torch.cuda.get_device_name), or None when unknown.
    "NVIDIA H100 80GB HBM3" is the SXM board; a bare H100 name is told apart by its SM count."""
    upper = name.upper()
    if "H200" in upper:
        return "H200 NVL" if "NVL" in upper else "H200"
    if "H100" in upper:
        if "PCIE" in upper:
            return "H100 PCIe"
        if "NVL" in upper:
            return "H100 NVL"
        if "SXM" in upper or "HBM3" in upper:
            return "H100 SXM"
        return H100_SM_COUNTS.get(sm_count)
    if "A100" in upper:
        return "A100"
    return None


def device_peak(device: torch.device) -> tuple[str, str | None, float | None]:
    """(device name, part, dense bf16 peak in FLOP/s) of `device`; part and peak are None off CUDA or for an
    unknown part (then no MFU is reported)."""
    if device.type != "cuda":
        return "CPU", None, None
    props = torch.cuda.get_device_properties(device)
    part = detect_part(props.name, props.multi_processor_count)
    return props.name, part, PEAK_BF16_TFLOPS[part] * 1e12 if part else None
