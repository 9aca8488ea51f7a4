"""The objective against the official trainer executed (needs a checkout: PIXELGEN_OFFICIAL_SRC=/path/to/PixelGen).

The official `REPATrainer._impl_trainstep` (src/diffusion/flow_matching/training_repa_JiT_LPIPS_DINO_NoiseGating.py,
built with the trainer arguments of configs_c2i/PixelGen_Large.yaml) runs beside our PixelGenLoss on the same JiT
weights and REPA projector, batch, labels, t and noise. The frozen encoders are replaced by the same random-weight
modules on both sides: one lpips.LPIPS (random VGG16 trunk, the package's v0.1 heads) and one small timm DINOv2
ViT behind the official DINOv2 wrapper (its normalisation and resize run as they are). Each term (flow matching,
REPA, LPIPS, P-DINO, the total) and every trainable parameter's gradient of each term are compared in fp32.

What runs outside `_impl_trainstep` is not compared: the label drop (the official BaseTrainer.preproprocess draws
it with torch.rand, ours in the label embedder) and the t draw itself (ours draws t on the host, docs/parity.md);
the official module's torch.randn / randn_like are fed the same numbers ours draws.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from pixelgen import flow
from pixelgen.config import load_config
from pixelgen.denoiser import build_denoiser
from pixelgen.encoders import LPIPS, DINOFeatures
from pixelgen.losses import PixelGenLoss
from pixelgen.model import model_config
from pixelgen.official import convert_state, official_to_ours

OFFICIAL_SRC = os.environ.get("PIXELGEN_OFFICIAL_SRC")
pytestmark = pytest.mark.skipif(not OFFICIAL_SRC, reason="set PIXELGEN_OFFICIAL_SRC to a checkout of "
                                                         "Zehong-Ma/PixelGen to run the official trainer")

TRAINER_MODULE = "src.diffusion.flow_matching.training_repa_JiT_LPIPS_DINO_NoiseGating"
PAPER_CONFIG = Path(__file__).parents[1] / "config" / "pixelgen" / "imagenet256.yaml"
TOL = 1e-5
# the paper's layout at a CPU size: patch 16 (the official DINO resize, 14/16 of the image, is
# then ours, 14 px per model token, and LPIPS needs no rescale),
# REPA at the block where the class tokens join, as the official align_layer 8 = in_context_start 8 of L and XL
TINY = ["model.size=tiny", "model.image_size=64", "model.patch_size=16", "model.num_classes=10",
        "loss.repa_block=2", "encoders.random_init=true", "encoders.dino_model=vit_small_patch14_dinov2"]


# ---------------------------------------------------------------------------------------------------------------
# The official code, imported from the checkout with what it imports but does not use stubbed

@pytest.fixture(scope="module")
def official():
    """The official trainer and JiT modules, imported as the package `src` of the checkout (removed afterwards)."""
    pytest.importorskip("einops")
    saved_path, saved = list(sys.path), {k: v for k, v in sys.modules.items() if k == "src" or k.startswith("src.")}
    for name in saved:
        del sys.modules[name]
    stubbed = "transformers" not in sys.modules
    if stubbed:  # src/models/encoder.py imports CLIP/SigLIP classes from transformers at module level
        sys.modules["transformers"] = unused_module("transformers")
    sys.path.insert(0, str(OFFICIAL_SRC))
    try:
        with torch._dynamo.config.patch(disable=True):  # the official encoders and blocks carry @torch.compile
            yield types.SimpleNamespace(trainer=importlib.import_module(TRAINER_MODULE),
                                        jit=importlib.import_module("src.models.transformer.JiT"),
                                        encoder=importlib.import_module("src.models.encoder"),
                                        scheduling=importlib.import_module("src.diffusion.flow_matching.scheduling"))
    finally:
        sys.path[:] = saved_path
        for name in [k for k in sys.modules if k == "src" or k.startswith("src.")]:
            del sys.modules[name]
        sys.modules.update(saved)
        if stubbed:
            del sys.modules["transformers"]


def unused_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    def inert_class(attr):  # any `from name import X` gets an inert class; dunders stay missing (inspect asks)
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {})

    module.__getattr__ = inert_class
    return module


def official_recipe() -> dict:
    """The trainer arguments of the official Table-1 config, minus those naming modules or their sizes."""
    path = Path(OFFICIAL_SRC) / "configs_c2i" / "PixelGen_Large.yaml"
    args = yaml.safe_load(path.read_text())["model"]["diffusion_trainer"]["init_args"]
    return {k: v for k, v in args.items()
            if k not in ("encoder", "scheduler", "proj_denoiser_dim", "proj_hidden_dim", "proj_encoder_dim")}


class HubDINOv2(torch.nn.Module):
    """The torch.hub DINOv2 model's interface (what the official DINOv2 wrapper calls) over a timm ViT: hub's
    get_intermediate_layers normalises by default, timm's does not."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.vit = vit
        self.pos_embed, self.patch_embed, self.head = vit.pos_embed, vit.patch_embed, vit.head

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        return self.vit.get_intermediate_layers(x, n=n, reshape=reshape, return_prefix_tokens=return_class_token,
                                                norm=norm)


class TorchWithFixedDraws:
    """Stands in for `torch` inside the official trainer module: randn (the logit-normal's normals) and randn_like
    (the noise) return given values, everything else is torch."""

    def __init__(self, normals: torch.Tensor, noise: torch.Tensor):
        self.normals, self.noise = normals, noise

    def randn(self, *size, **kwargs):
        assert tuple(size) == tuple(self.normals.shape), size
        return self.normals.clone()

    def randn_like(self, x, **kwargs):
        assert x.shape == self.noise.shape
        return self.noise.clone()

    def __getattr__(self, name):
        return getattr(torch, name)


# ---------------------------------------------------------------------------------------------------------------
# Both sides, built on the same weights

def paper_config() -> dict:
    return load_config(PAPER_CONFIG, overrides=TINY)


@pytest.fixture(scope="module")
def encoders():
    """One random LPIPS and one random small DINOv2, built once: each side gets its own copy of the same weights."""
    torch.manual_seed(0)
    shape = model_config(paper_config()["model"])
    with pytest.MonkeyPatch.context() as m:
        m.setattr("lpips.pretrained_networks.tv", vgg16_features_only())
        lpips = LPIPS(random_init=True)
    dino = DINOFeatures("vit_small_patch14_dinov2", 14 * shape.grid, random_init=True)
    with torch.no_grad():  # timm's DINOv2 layer scales start at 1e-5 (blocks ~ identity): make every block count
        for p in dino.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return lpips, dino


def vgg16_features_only() -> types.SimpleNamespace:
    """torchvision for lpips' VGG16 trunk: the 13 convolutions at PyTorch's default init, without building (and
    initialising, ~10 s on a CPU) the 120M-weight classifier that lpips throws away."""
    from torchvision.models.vgg import cfgs, make_layers

    return types.SimpleNamespace(vgg16=lambda **kwargs: types.SimpleNamespace(features=make_layers(cfgs["D"])))


def build_official(official, encoders):
    """A perturbed tiny official JiT and the official trainer (Table-1 recipe) over copies of the shared encoders."""
    lpips, dino = encoders
    cfg = model_config(paper_config()["model"])
    torch.manual_seed(1)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # its RoPE tables call .cuda()
        net = official_jit(official, cfg)
    with torch.no_grad():  # the adaLN-zero start would make the output 0 and most gradients vanish
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.hub, "load", lambda *a, **k: HubDINOv2(copy.deepcopy(dino.net)))
        encoder = official.encoder.DINOv2(weight_path=None)
        m.setattr(official.trainer, "lpips", types.SimpleNamespace(LPIPS=lambda net: copy.deepcopy(lpips.net)))
        recipe = official_recipe()
        trainer = official.trainer.REPATrainer(
            scheduler=official.scheduling.LinearScheduler(), encoder=encoder, num_classes=cfg.num_classes,
            proj_denoiser_dim=cfg.width, proj_hidden_dim=cfg.width, proj_encoder_dim=dino.embed_dim,
            **{**recipe, "align_layer": cfg.in_context_start})
    return net.train(), trainer


def official_jit(official, cfg):
    return official.jit.JiT(input_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                            depth=cfg.depth, num_heads=cfg.heads, num_classes=cfg.num_classes,
                            bottleneck_dim=cfg.bottleneck, use_bottleneck=True, in_context_len=cfg.in_context_len,
                            in_context_start=cfg.in_context_start)


def build_ours(official_net, trainer, encoders):
    """Our Denoiser and PixelGenLoss from the paper config, holding the official network's and projector's weights."""
    lpips, dino = encoders
    config = paper_config()
    cfg = model_config(config["model"])
    criterion = PixelGenLoss(config, cfg.grid, cfg.patch_size, lpips=copy.deepcopy(lpips), dino=copy.deepcopy(dino))
    denoiser = build_denoiser(config, criterion.repa_dim)
    denoiser.net.load_state_dict(convert_state(official_net.state_dict(), cfg))
    denoiser.projector.load_state_dict(trainer.proj[0].state_dict())
    return denoiser.train(), criterion


def parameter_pairs(official_net, trainer, denoiser) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every trainable parameter of ours with its official counterpart, by our name."""
    ours = dict(denoiser.named_parameters())
    pairs = {f"net.{official_to_ours(k, bottleneck=True)}": p for k, p in official_net.named_parameters()
             if p.requires_grad}
    pairs.update({f"projector.{k[2:]}": p for k, p in trainer.proj.named_parameters()})  # "0.2.weight" -> "2.weight"
    assert set(pairs) == set(ours)  # nothing trained on one side only
    return {k: (pairs[k], ours[k]) for k in ours}


# ---------------------------------------------------------------------------------------------------------------
# One step on each side

NOISE_SEED = 7


def batch(n: int):
    """Images as the official PixImageNet gives them: raw = uint8 / 255 in metadata, x = Normalize(0.5, 0.5)(raw)."""
    gen = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (n, 3, 64, 64), generator=gen).float() / 255
    y = torch.tensor([3, 10, 7, 0, 5, 10][:n])  # 10: the null class
    return (raw - 0.5) / 0.5, raw, y


def normals_for(times: list[float], P_mean: float, P_std: float) -> torch.Tensor:
    """The standard normals the logit-normal turns into (about) these times."""
    return torch.tensor([(math.log(t / (1 - t)) - P_mean) / P_std for t in times], dtype=torch.float32)


def noise_like(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(NOISE_SEED))


def run_official(official, net, trainer, x, raw, y, normals, step: int):
    """The official `_impl_trainstep` with its random draws fed; returns its output dict and the z, t and
    prediction of its network."""
    seen = []
    hook = net.register_forward_hook(lambda module, args, out: seen.append((args[0], args[1], out[0].detach())))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(official.trainer, "torch", TorchWithFixedDraws(normals, noise_like(x)))
        out = trainer._impl_trainstep(net, None, None, x, y, metadata={"raw_image": raw, "global_step": step})
    hook.remove()
    (z, t, pred), = seen
    return out, z.detach(), t.detach(), pred


def run_ours(denoiser, criterion, x, y, t, step: int):
    """PixelGenLoss as the trainer calls it, with t fed and the noise drawn from the seed the official side got;
    returns the output, the terms before they are detached, and the z the network saw."""
    captured, seen = {}, []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            captured[name] = fn(*args, **kwargs)
            return captured[name]
        return wrapped

    hook = denoiser.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(flow, "sample_t", lambda n, *a, **k: t.clone())
        m.setattr(flow, "velocity_loss", spy("fm", flow.velocity_loss))
        m.setattr(criterion, "repa", spy("repa", criterion.repa))
        m.setattr(criterion, "perceptual_terms", spy("perceptual", criterion.perceptual_terms))
        out = criterion(denoiser, x, y, generator=torch.Generator().manual_seed(NOISE_SEED), step=step,
                        last_layer=denoiser.last_layer)
    hook.remove()
    lpips_term, pdino_term = captured["perceptual"]
    terms = {"fm": captured["fm"].mean(), "repa": captured["repa"].mean(), "lpips": lpips_term,
             "pdino": pdino_term, "loss": out.total}
    return out, terms, seen[0]


OFFICIAL_TERM = {"fm": "fm_loss", "repa": "cos_loss", "lpips": "lpips_loss", "pdino": "dino_percept_loss",
                 "loss": "loss"}


def gradients(term: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def compare_step(official, encoders, times: list[float], step: int = 0) -> dict:
    """Both sides on one batch at (about) `times`; returns, per term, the two values and the largest gradient
    difference over every parameter, plus what each side saw."""
    net, trainer = build_official(official, encoders)
    denoiser, criterion = build_ours(net, trainer, encoders)
    pairs = parameter_pairs(net, trainer, denoiser)
    x, raw, y = batch(len(times))
    recipe = official_recipe()
    theirs, z_theirs, t, pred = run_official(official, net, trainer, x, raw, y,
                                             normals_for(times, recipe["P_mean"], recipe["P_std"]), step)
    out, ours, z_ours = run_ours(denoiser, criterion, x, y, t, step)
    assert torch.equal(z_ours, z_theirs)  # the same t and noise reached both networks
    result = {"t": t, "x": x, "z": z_theirs, "pred": pred, "out": out, "official": theirs, "terms": {}}
    names = list(pairs)
    for term, key in OFFICIAL_TERM.items():
        g_theirs = gradients(theirs[key], [pairs[n][0] for n in names])
        g_ours = gradients(ours[term], [pairs[n][1] for n in names])
        diffs = {n: (a - b).abs().max().item() for n, a, b in zip(names, g_theirs, g_ours)}
        worst = max(diffs, key=diffs.get)
        result["terms"][term] = {"official": theirs[key].item(), "ours": ours[term].item(), "grad_diff": diffs[worst],
                                 "worst": worst, "grad_scale": max(g.abs().max().item() for g in g_theirs)}
    return result


def report(result: dict) -> str:
    return "\n".join(f"{k}: official {v['official']:.7f} ours {v['ours']:.7f} diff {abs(v['official'] - v['ours']):.1e}"
                     f"; max grad diff {v['grad_diff']:.1e} ({v['worst']}, grads up to {v['grad_scale']:.1e})"
                     for k, v in result["terms"].items())


# ---------------------------------------------------------------------------------------------------------------

def test_our_paper_config_is_the_official_trainer_recipe():
    recipe, ours = official_recipe(), load_config(PAPER_CONFIG)
    assert (recipe["lognorm_t"], recipe["P_mean"], recipe["P_std"], recipe["t_eps"]) == \
        (True, ours["flow"]["P_mean"], ours["flow"]["P_std"], ours["flow"]["t_eps"])
    assert (recipe["align_layer"], recipe["lpips_weight"], recipe["dino_weight"], recipe["percept_t_threshold"]) == \
        (ours["loss"]["repa_block"], ours["loss"]["lpips_weight"], ours["loss"]["pdino_weight"], ours["loss"]["gate"])
    assert ours["loss"]["repa_weight"] == 0.5 and ours["loss"]["pdino_layer"] == 12  # REPATrainer's defaults:
    # feat_loss_weight=0.5 and dino_layers=[11] (0-based: DINOv2-B's last of 12 blocks)


def assert_same_terms_and_gradients(result: dict) -> None:
    """Every term equal to 1e-5 (relative above 1: fp32 sums in another order), and every parameter's gradient of
    every term equal to 1e-5 of that term's largest gradient (and to 1e-5 absolute); no term without a gradient."""
    for term, r in result["terms"].items():
        assert abs(r["official"] - r["ours"]) <= TOL * max(1.0, abs(r["official"])), (term, r)
        assert 0 < r["grad_scale"] and r["grad_diff"] <= TOL * min(1.0, r["grad_scale"]), (term, r)


def test_every_term_and_gradient_match_the_official_trainstep_at_a_gate_that_splits_the_batch(official, encoders):
    # t below 1 - t_eps (0.95), two samples under the 0.3 gate and two over, interleaved
    result = compare_step(official, encoders, [0.15, 0.62, 0.24, 0.87])
    print(report(result))
    assert (result["t"] >= 0.3).tolist() == [False, True, False, True] and result["out"].terms["gated_fraction"] == 0.5
    assert_same_terms_and_gradients(result)


def test_above_1_minus_t_eps_the_official_target_runs_and_the_adaptive_weight_matches_at_step_400k(official,
                                                                                                   encoders):
    """For 1 - t < t_eps the official target is (x - z_t) / max(1 - t, t_eps) = (1 - t) / t_eps * (x - eps), not
    x - eps: ours computes the same (flow.velocity_target). At step 400K the adaptive perceptual weight runs too."""
    result = compare_step(official, encoders, [0.2, 0.97, 0.5, 0.99], step=400_000)
    print(report(result))
    t, x, z, pred = result["t"], result["x"], result["z"], result["pred"]
    assert (t > 0.95).tolist() == [False, True, False, True] and result["out"].terms["gated_fraction"] == 0.75
    assert_same_terms_and_gradients(result)
    # the case tells the two targets apart: x - eps would give another flow-matching loss
    clamp = (1 - t.view(-1, 1, 1, 1)).clamp_min(0.05)
    x_minus_eps = (((pred - z) / clamp - (x - noise_like(x))) ** 2).mean().item()
    assert abs(x_minus_eps - result["terms"]["fm"]["official"]) > 1e3 * TOL
    official_weight, ours_weight = float(result["official"]["percept_weight"]), result["out"].terms["perceptual_weight"]
    assert official_weight != 1.0 and abs(official_weight - float(ours_weight)) <= TOL * official_weight
