"""The official PixelGen code's training step and samplers, timed for bench_gpu.py --official-src PATH.

Built as the official configs_c2i/PixelGen_*.yaml build them, at our config's size, batch and loss settings: its
JiT, its REPATrainer (noise-gated LPIPS + P-DINO + REPA loss, label drop), AdamW over the network and projector,
and its SimpleEMA update (foreach mul/add), under bf16 autocast (Lightning's bf16-mixed) with the official
torch.compile decorators in place. Two stand-ins, because the GPU machines reach no network: LPIPS's VGG16
and DINOv2-B are random-weight (lpips with pnet_rand; DINOv2 from timm through our DINOFeatures, called the way
the official DINOv2 wrapper calls the hub model). Batches come from our StreamLoader over the same shards, so
the data path is the same on both sides and the ratio is the model + loss + optimizer. Sampling: its
EulerSamplerJiT / HeunSamplerJiT (which always run the conditional and unconditional halves) on the EMA net,
no I/O, at the same two image counts as ours, extrapolated to 50K the same way.
On CPU (a smoke test) the official compile decorators are switched off and its RoPE's `.cuda()` is a no-op.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench_gpu import extrapolate, timed
from pixelgen.data import StreamLoader
from pixelgen.encoders import IMAGENET_MEAN, IMAGENET_STD, DINOFeatures
from pixelgen.model import model_config


class OfficialDINOStandIn(nn.Module):
    """The official src.models.encoder.DINOv2's get_intermediate_feats (normalise [0, 1] images, bicubic resize
    to 14/16 of the size, hub get_intermediate_layers with its final norm), on a random-weight timm DINOv2-B."""

    def __init__(self, dino: DINOFeatures, compile_: bool):
        super().__init__()
        self.encoder = dino.net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._feats = torch.compile(self._intermediate) if compile_ else self._intermediate  # official: @torch.compile

    def _intermediate(self, x, n):
        h, w = x.shape[-2:]
        x = F.interpolate((x - self.mean) / self.std, (int(14 * h / 16), int(14 * w / 16)), mode="bicubic")
        return self.encoder.get_intermediate_layers(x, n=n, norm=True)

    def get_intermediate_feats(self, x, resize=True, n=(11,), **_):
        return self._feats(x, list(n))


@contextlib.contextmanager
def official_code(src: Path, device: torch.device):
    """The official package importable as `src`, its VGG16 random (no download), and on CPU no compile/.cuda()."""
    import lpips

    sys.path.insert(0, str(src))
    original_lpips = lpips.LPIPS
    lpips.LPIPS = lambda *a, **k: original_lpips(*a, **{**k, "pnet_rand": True, "verbose": False})
    with contextlib.ExitStack() as stack:
        if device.type != "cuda":
            import torch._dynamo

            stack.enter_context(torch._dynamo.config.patch(disable=True))
            original_cuda = torch.Tensor.cuda
            torch.Tensor.cuda = lambda self, *a, **k: self
            stack.callback(setattr, torch.Tensor, "cuda", original_cuda)
        try:
            yield
        finally:
            lpips.LPIPS = original_lpips
            sys.path.remove(str(src))


def build_official(config: dict, device: torch.device):
    from src.diffusion.flow_matching.scheduling import LinearScheduler
    from src.diffusion.flow_matching.training_repa_JiT_LPIPS_DINO_NoiseGating import REPATrainer
    from src.models.transformer.JiT import JiT

    cfg, loss, flow = model_config(config["model"]), config["loss"], config["flow"]
    net = JiT(input_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width, depth=cfg.depth,
              num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, proj_drop=cfg.proj_dropout, num_classes=cfg.num_classes,
              bottleneck_dim=cfg.bottleneck or 128, use_bottleneck=cfg.bottleneck is not None,
              in_context_len=cfg.in_context_len, in_context_start=cfg.in_context_start).to(device)
    # the official wrapper resizes to 14/16 of the image (its hub model interpolates positions at any size); its
    # REPA loss then needs that DINO grid to equal the JiT's, i.e. patch 16 (true of every official config)
    dino = DINOFeatures(config["encoders"]["dino_model"], int(14 * cfg.image_size / 16), random_init=True)
    trainer = REPATrainer(scheduler=LinearScheduler(), lognorm_t=True,
                          encoder=OfficialDINOStandIn(dino, device.type == "cuda"),
                          align_layer=loss["repa_block"], proj_denoiser_dim=cfg.width, proj_hidden_dim=cfg.width,
                          proj_encoder_dim=dino.embed_dim, P_mean=flow["P_mean"], P_std=flow["P_std"],
                          t_eps=flow["t_eps"], num_classes=cfg.num_classes, lpips_weight=loss["lpips_weight"],
                          dino_weight=loss["pdino_weight"], percept_t_threshold=loss["gate"],
                          noise_scale=flow["noise_scale"], patch_size=cfg.patch_size,
                          null_condition_p=config["train"]["class_dropout"]).to(device)
    return net, trainer


def time_official_training(net, trainer, config: dict, device: torch.device, warmup: int,
                           steps: int) -> tuple[float, nn.Module]:
    """Official training img/s (REPATrainer step, backward, AdamW, EMA as SimpleEMA) and the EMA network."""
    data, s = config["data"], config["train"]
    ema = copy.deepcopy(net).requires_grad_(False)
    params = [p for m in (net, trainer) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["lr"], betas=tuple(s["betas"]), weight_decay=s["weight_decay"])
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    uncondition = torch.full((data["batch_size"],), net.num_classes, device=device)
    loader = StreamLoader(data["shards"], data["batch_size"], num_workers=data["workers"], seed=s["seed"],
                          shuffle_buffer=data["shuffle_buffer"], flip=False, device=device,
                          pin_memory=device.type == "cuda")
    batches = iter(loader)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int):
        x, y = next(batches)
        with autocast:
            out = trainer(net, ema, None, x, y, uncondition, {"raw_image": (x + 1) / 2, "global_step": i})
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema_params, s["ema_decay"])
            torch._foreach_add_(ema_params, net_params, alpha=1 - s["ema_decay"])

    for i in range(warmup):
        step(i)
    seconds = timed(lambda: [step(warmup + i) for i in range(steps)], device)
    return steps * data["batch_size"] / seconds, ema


def official_sampler(kind: str, steps: int, sampling: dict):
    from src.diffusion.base.guidance import simple_guidance_fn
    from src.diffusion.flow_matching.sampling import EulerSamplerJiT, HeunSamplerJiT, ode_step_fn
    from src.diffusion.flow_matching.scheduling import LinearScheduler

    common = dict(scheduler=LinearScheduler(), w_scheduler=LinearScheduler(), guidance_fn=simple_guidance_fn,
                  num_steps=steps, guidance=sampling["guidance"], timeshift=sampling["shift"],
                  guidance_interval_min=sampling["interval"][0], guidance_interval_max=sampling["interval"][1],
                  step_fn=ode_step_fn)
    return HeunSamplerJiT(exact_henu=True, **common) if kind == "heun" else EulerSamplerJiT(**common)


@torch.no_grad()
def time_official_sampling(ema, config: dict, kind: str, device: torch.device, args) -> float:
    """Seconds for 50K images (extrapolated) with the official sampler, bf16 autocast, uint8 output, no I/O."""
    sampler = official_sampler(kind, args.sample_steps, config["sampling"])
    size, classes = config["model"]["image_size"], config["model"]["num_classes"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(num: int):
        for start in range(0, num, args.sample_batch):
            n = min(args.sample_batch, num - start)
            noise = torch.randn(n, 3, size, size, device=device)
            y = torch.arange(start, start + n, device=device) % classes
            with autocast:
                images = sampler(ema, noise, y, torch.full_like(y, classes))
            ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # official fp2uint8

    return extrapolate(*[(num, timed(lambda: run(num), device)) for num in (args.sample_batch, args.sample_num)])


def time_official(src: Path, config: dict, args) -> dict:
    device = torch.device(args.device)
    with official_code(Path(src).resolve(), device):
        net, trainer = build_official(config, device)
        img_s, ema = time_official_training(net, trainer, config, device, args.warmup, args.steps)
        ema.eval()
        result = {"train_img_s": img_s, "euler_s": time_official_sampling(ema, config, "euler", device, args),
                  "heun_s": time_official_sampling(ema, config, "heun", device, args)}
    del net, trainer, ema
    return result
