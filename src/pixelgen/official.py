"""`pixelgen import-official`: a released PixelGen class-to-image checkpoint -> a pixelgen checkpoint.

The official release (Zehong-Ma/PixelGen: PixelGen_XL_80ep.ckpt, PixelGen_XL_160ep.ckpt) is a PyTorch Lightning
checkpoint whose `state_dict` holds `denoiser.*`, `ema_denoiser.*` and `diffusion_trainer.proj.*`. We take the
EMA weights (what the paper samples from), rename them to this project's module names, check the fixed
position embedding against ours, and write a checkpoint that `pixelgen sample` reads like one of our own, with
the official sampler settings as its `sampling` section.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from .errors import PixelgenError
from .model import SIZES, JiTConfig, sincos_2d

EMA_PREFIX = "ema_denoiser."

# official name (regex, after the prefix) -> ours; {b} marks the bottleneck-dependent patch embedding
_RENAMES = [
    (r"t_embedder\.mlp\.(\d)\.(weight|bias)", r"t_embed.mlp.\1.\2"),
    (r"y_embedder\.embedding_table\.weight", r"y_embed.weight"),
    (r"x_embedder\.proj2\.(weight|bias)", r"x_embed.proj.1.\1"),
    (r"in_context_posemb", r"in_context_pos"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.weight", r"blocks.\1.\2.weight"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.attn\.(q_norm|k_norm)\.weight", r"blocks.\1.attn.\2.weight"),
    (r"blocks\.(\d+)\.mlp\.w12\.(weight|bias)", r"blocks.\1.mlp.gate_up.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"blocks.\1.mlp.down.\2"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"blocks.\1.ada.1.\2"),
    (r"final_layer\.norm_final\.weight", r"final.norm.weight"),
    (r"final_layer\.linear\.(weight|bias)", r"final.linear.\1"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"final.ada.1.\1"),
]
# Official state entries that are not weights here: the fixed sin-cos table (a buffer we compute, checked below)
DERIVED = {"pos_embed"}

# What every refusal names: the only kind of release this converts
KNOWN_RELEASES = ("import-official converts the official class-to-image JiT releases (PixelGen_XL_80ep.ckpt, "
                  "PixelGen_XL_160ep.ckpt)")
CLASS_TABLE = "y_embedder.embedding_table.weight"
# The entries infer_config reads the model's size from, with their number of dimensions
SIZE_ENTRIES = {CLASS_TABLE: 2, "x_embedder.proj1.weight": 4, "blocks.0.attn.q_norm.weight": 1}
# Entries only the text-to-image JiT (src/models/transformer/JiT_T2I.py) has
TEXT_TO_IMAGE_ENTRIES = ("text_refine_blocks.", "y_pos_embedding")

# The official XL/16 sampler (configs_c2i/PixelGen_XL*.yaml): Heun-50, shift 2, guidance in (0.1, 0.9]; and how it
# runs: under Lightning's `precision: bf16-mixed` (autocast over fp32 weights), with the EMA denoiser compiled
# (`ema_denoiser.compile()` in configure_model), and each image's noise drawn by its own CPU generator
# (ClassLabelRandomNDataset). A CPU run keeps bf16 (CPU autocast) and can skip the compile (`--no-compile`).
OFFICIAL_SAMPLING = {"sampler": "heun", "steps": 50, "guidance": 1.0, "interval": [0.1, 0.9], "shift": 2.0,
                     "corrector_interval_at": "t_cur", "precision": "bf16", "compile": True, "noise_device": "cpu"}


def release_sampling(config_file: str | Path | None = None, overrides=()) -> dict:
    """The sampling section an imported release samples with: the official sampler's settings over the base
    config's, then `config_file`'s sampling section and `overrides` (sampling.* items) over them. One place for
    `pixelgen import-official` and the workflow's imported variants."""
    from .config import base_config, section_over

    return section_over({"sampling": {**base_config()["sampling"], **OFFICIAL_SAMPLING}}, "sampling", config_file,
                        overrides)


def official_to_ours(name: str, bottleneck: bool) -> str:
    """Our parameter name for an official JiT parameter name (without the ema_denoiser. prefix)."""
    if name.startswith("x_embedder.proj1."):
        # with a bottleneck, proj1 is the first of two convolutions; without, the only one
        return ("x_embed.proj.0." if bottleneck else "x_embed.proj.") + name.rsplit(".", 1)[1]
    for pattern, target in _RENAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise PixelgenError(f"official parameter '{name}' has no counterpart here: is this a class-to-image JiT "
                        f"checkpoint?")


def ema_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The EMA denoiser's weights of a Lightning checkpoint (or a bare state dict), prefixes removed."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict):
        raise PixelgenError(f"the file holds a {type(state).__name__}, not a checkpoint's state dict: "
                            f"{KNOWN_RELEASES}")
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(EMA_PREFIX)}
    if not ema:
        raise PixelgenError("no 'ema_denoiser.*' weights in the checkpoint: expected an official PixelGen "
                            "class-to-image release (PixelGen_XL_80ep.ckpt or PixelGen_XL_160ep.ckpt)")
    not_tensor = next((k for k, v in ema.items() if not isinstance(v, torch.Tensor)), None)
    if not_tensor is not None:
        raise PixelgenError(f"'{EMA_PREFIX}{not_tensor}' holds a {type(ema[not_tensor]).__name__}, not a tensor: "
                            f"{KNOWN_RELEASES}")
    # a torch.compile'd module saves its weights under _orig_mod.
    return {k.replace("_orig_mod.", ""): v for k, v in ema.items()}


def shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def check_release_kind(state: dict[str, torch.Tensor]) -> None:
    """Refuse, in one line, a release of another kind (text-to-image) or one without what its size is read from."""
    if CLASS_TABLE not in state and any(k.startswith(TEXT_TO_IMAGE_ENTRIES) for k in state):
        raise PixelgenError(f"a text-to-image (JiT_T2I) release: its text embedding and text refiner have no "
                            f"counterpart in this class-to-image model; {KNOWN_RELEASES}")
    for name, dims in SIZE_ENTRIES.items():
        if name not in state:
            raise PixelgenError(f"'{EMA_PREFIX}{name}' is missing from the release; {KNOWN_RELEASES}")
        if state[name].dim() != dims:
            raise PixelgenError(f"'{EMA_PREFIX}{name}' has shape {shape_text(state[name].shape)}, not the "
                                f"{dims}-D tensor of a class-to-image JiT; {KNOWN_RELEASES}")
    if "pos_embed" in state:
        pos = state["pos_embed"]
        tokens = pos.shape[1] if pos.dim() == 3 else 0
        if pos.dim() != 3 or int(round(tokens ** 0.5)) ** 2 != tokens:
            raise PixelgenError(f"'{EMA_PREFIX}pos_embed' has shape {shape_text(pos.shape)}, not (1, tokens, width) "
                                f"over a square grid of patches; {KNOWN_RELEASES}")


def check_weights(converted: dict[str, torch.Tensor], cfg: JiTConfig) -> None:
    """Every weight of the model `cfg` describes is in `converted`, with its shape; the first fault, named."""
    from .model import JiT

    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: tuple(v.shape) for k, v in JiT(cfg).state_dict().items()}
    missing = [k for k in expected if k not in converted]
    if missing:
        names = ", ".join(EMA_PREFIX + ours_to_official(k) for k in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PixelgenError(f"the release is missing {names}{more} (of a depth-{cfg.depth}, width-{cfg.width} JiT): "
                            f"a damaged or partial file; {KNOWN_RELEASES}")
    for name, shape in expected.items():
        if tuple(converted[name].shape) != shape:
            raise PixelgenError(f"'{EMA_PREFIX}{ours_to_official(name)}' has shape "
                                f"{shape_text(converted[name].shape)}, where a depth-{cfg.depth}, width-{cfg.width} "
                                f"JiT has {shape_text(shape)}; {KNOWN_RELEASES}")


def infer_config(state: dict[str, torch.Tensor]) -> JiTConfig:
    """The registered size these weights belong to, read from the shapes (heads from the qk-norm width)."""
    classes, width = state["y_embedder.embedding_table.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    proj1 = state["x_embedder.proj1.weight"]
    bottleneck = proj1.shape[0] if "x_embedder.proj2.weight" in state else None
    heads = width // state["blocks.0.attn.q_norm.weight"].shape[0]
    patch = proj1.shape[-1]
    grid = int(round(state["pos_embed"].shape[1] ** 0.5)) if "pos_embed" in state else 256 // patch
    for cfg in SIZES.values():
        if (cfg.depth, cfg.width, cfg.heads, cfg.bottleneck) == (depth, width, heads, bottleneck):
            return replace(cfg, patch_size=patch, image_size=grid * patch, num_classes=classes - 1,
                           in_context_len=state["in_context_posemb"].shape[1] if "in_context_posemb" in state else 0)
    raise PixelgenError(f"no registered model size has depth {depth}, width {width}, {heads} heads and bottleneck "
                        f"{bottleneck} (sizes: {', '.join(SIZES)})")


def convert_state(state: dict[str, torch.Tensor], cfg: JiTConfig) -> dict[str, torch.Tensor]:
    """Rename every official weight to ours; the position table must equal the one we compute."""
    if "pos_embed" in state:
        ours = sincos_2d(cfg.width, cfg.grid)[None]
        if state["pos_embed"].shape != ours.shape:
            raise PixelgenError(f"'{EMA_PREFIX}pos_embed' has shape {shape_text(state['pos_embed'].shape)}, where "
                                f"a width-{cfg.width} JiT has {shape_text(ours.shape)}; {KNOWN_RELEASES}")
        if not torch.allclose(state["pos_embed"].float(), ours, atol=1e-5):
            raise PixelgenError("the checkpoint's position embedding differs from the official sin-cos table: "
                                "not a JiT checkpoint of this layout")
    bottleneck = cfg.bottleneck is not None
    return {official_to_ours(k, bottleneck): v.float() for k, v in state.items() if k not in DERIVED}


def release_key(path: Path) -> str | None:
    """The weights-directory key of a released checkpoint file name, if it is one."""
    from .weights import WEIGHT_FILES

    return next((k for k, w in WEIGHT_FILES.items() if w.filename == path.name and k.startswith("pixelgen-")), None)


def import_official(src: Path, out: Path, *, config_file: str | Path | None = None,
                    overrides: tuple[str, ...] = ()) -> dict:
    """Convert `src` and write `out`; returns a summary. The result is labelled comparable only when `src` is a
    released file whose sha256 matches the digest `pixelgen weights fetch` recorded beside it."""
    from . import checkpoint, weights
    from .config import load_config
    from .model import JiT

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise PixelgenError(f"official checkpoint not found: {src} (`pixelgen weights fetch pixelgen-xl-80ep` "
                            f"downloads the release into the weights directory)")
    try:
        raw = torch.load(src, map_location="cpu", weights_only=False)  # Lightning stores non-tensor state too
    except Exception as err:
        raise PixelgenError(f"{src} cannot be read as a PyTorch checkpoint ({type(err).__name__})") from None
    state = ema_state(raw)
    check_release_kind(state)
    cfg = infer_config(state)
    converted = convert_state(state, cfg)
    check_weights(converted, cfg)
    net = JiT(cfg)
    net.load_state_dict(converted)  # strict: every weight of ours must come from the file
    size = next(name for name, c in SIZES.items() if (c.depth, c.width) == (cfg.depth, cfg.width))
    config = load_config(overrides=[f"model.size={size}", f"model.image_size={cfg.image_size}",
                                    f"model.patch_size={cfg.patch_size}", f"model.num_classes={cfg.num_classes}"])
    config["sampling"] = release_sampling(config_file, overrides)
    key = release_key(src)
    verified = key is not None and weights.is_published(key, src)
    shadow = net.state_dict()
    step = int(raw.get("global_step", 0)) if isinstance(raw, dict) else 0
    ckpt = {"model": {f"net.{k}": v for k, v in shadow.items()},  # the same tensors: saved once
            "ema": {"shadow": shadow, "num_updates": step, "decay": 0.9999, "warmup": False},
            "step": step, "config": config, "encoders_real": verified,
            "source": {"official": str(src), "release": key, "verified": verified}}
    checkpoint.save_atomic(ckpt, out)
    return {"size": size, "step": step, "verified": verified, "params": sum(v.numel() for v in shadow.values()),
            "sampling": config["sampling"]}


_INVERSE = [  # ours -> official, applied in order (the first matching prefix wins)
    ("t_embed.", "t_embedder."), ("y_embed.weight", "y_embedder.embedding_table.weight"),
    ("x_embed.proj.0.", "x_embedder.proj1."), ("x_embed.proj.1.", "x_embedder.proj2."),
    ("x_embed.proj.", "x_embedder.proj1."), ("in_context_pos", "in_context_posemb"),
    ("final.norm.", "final_layer.norm_final."), ("final.linear.", "final_layer.linear."),
    ("final.ada.", "final_layer.adaLN_modulation."),
]


def ours_to_official(name: str) -> str:
    """The official JiT name of one of our parameters (the inverse of official_to_ours)."""
    for ours, official in _INVERSE:
        if name.startswith(ours):
            return official + name[len(ours):]
    name = re.sub(r"\.mlp\.gate_up\.", ".mlp.w12.", name)
    name = re.sub(r"\.mlp\.down\.", ".mlp.w3.", name)
    return re.sub(r"\.ada\.", ".adaLN_modulation.", name)


def release_format(net) -> dict:
    """`net`'s weights as an official release checkpoint (Lightning layout, EMA under ema_denoiser.): random
    stand-ins for tests and benchmarks, since the real files cannot be downloaded everywhere."""
    state = {f"{EMA_PREFIX}{ours_to_official(k)}": v for k, v in net.state_dict().items()}
    state[f"{EMA_PREFIX}pos_embed"] = sincos_2d(net.cfg.width, net.cfg.grid)[None]
    return {"state_dict": state, "global_step": 0, "pytorch-lightning_version": "2.4.0"}
