"""Atomic checkpoints, what they hold (declared once for save and load), and the random state for an exact resume."""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .files import temp_path, write_atomic


def save_atomic(obj, path: Path) -> None:
    """torch.save through files.write_atomic: temp file, fsync, rename; a kill never leaves a torn file."""
    write_atomic(path, lambda f: torch.save(obj, f))


def link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes a second name of the written file `source` (final.pt of last.pt), without writing the
    state again: a hard link made under a temp name and renamed over `target`. Later saves of `source` rename a new
    file over its name, so the link keeps this content. Where links are not supported, a copy (atomic as well)."""
    tmp = temp_path(Path(target))
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # EPERM, EXDEV, ENOTSUP...: a file system without hard links
        with open(source, "rb") as src:
            write_atomic(target, lambda f: shutil.copyfileobj(src, f, 1 << 24))
        return
    os.replace(tmp, target)


@dataclass(frozen=True)
class Entry:
    """One named item of a checkpoint: how to read its state, and how to put it back (None: saved for readers
    and checks only, e.g. the config). A per-rank entry is saved as a list with one state per rank, and each
    rank restores its own."""

    name: str
    get: Callable[[], Any]
    restore: Callable[[Any], None] | None = None
    per_rank: bool = False
    optional: bool = False  # absent from checkpoints written before the entry existed: then not restored


class CheckpointIO:
    """The contents of a checkpoint, declared once: `state()` builds the dict to save, `restore()` reads one back."""

    def __init__(self, *entries: Entry):
        self.entries = entries

    def per_rank_states(self, gather: Callable[[dict], list[dict]] = lambda mine: [mine]) -> dict[str, list]:
        """Each per-rank entry as a list over ranks; `gather` collects one dict from every rank (all_gather)."""
        ranks = gather({e.name: e.get() for e in self.entries if e.per_rank})
        return {e.name: [r[e.name] for r in ranks] for e in self.entries if e.per_rank}

    def state(self, per_rank: dict[str, list]) -> dict:
        return {e.name: per_rank[e.name] if e.per_rank else e.get() for e in self.entries}

    def shared_state(self) -> dict:
        """The entries that are not per rank, read live (e.g. for the EMA export): no gather, no copy."""
        return {e.name: e.get() for e in self.entries if not e.per_rank}

    def restore(self, state: dict, rank: int) -> None:
        for e in self.entries:
            if e.restore is not None and not (e.optional and e.name not in state):
                e.restore(state[e.name][rank] if e.per_rank else state[e.name])


def ema_only(state: dict) -> dict:
    """The EMA export of a training checkpoint: exactly what `pixelgen sample` reads (sample_job.load_ema_model),
    without the optimizer, the projector, or the per-rank resume state."""
    return {"ema": {"shadow": state["ema"]["shadow"]}, "config": state["config"], "step": state["step"],
            "encoders_real": state.get("encoders_real", False), "init_from": state.get("init_from"),
            **({"source": state["source"]} if "source" in state else {})}  # an imported release's provenance


def network_weights(state: dict, path: Path) -> tuple[dict, dict]:
    """The weights to start a new run from, out of any checkpoint pixelgen writes: a training checkpoint (the
    trained denoiser: network and REPA projector), an EMA export (final_ema.pt) or an imported official release
    (the EMA network). Returns (denoiser state, EMA network state); an EMA-only file gives its EMA network for both."""
    from .errors import PixelgenError

    ema = state.get("ema", {}).get("shadow") if isinstance(state, dict) else None
    model = state.get("model") if isinstance(state, dict) else None
    if model is None and ema is None:
        raise PixelgenError(f"{path} holds no network weights (neither 'model' nor 'ema'); pass a checkpoint "
                            f"written by pixelgen train or pixelgen import-official")
    if model is None:
        model = {f"net.{k}": v for k, v in ema.items()}
    if ema is None:
        ema = {k[len("net."):]: v for k, v in model.items() if k.startswith("net.")}
    return model, ema


def first_mismatch(have: dict, want: dict) -> str | None:
    """The first key that is missing from `have`, left over in it, or of another shape than in `want`."""
    for key, tensor in want.items():
        if key not in have:
            return f"{key} is missing there"
        if tuple(have[key].shape) != tuple(tensor.shape):
            return f"{key} has shape {list(have[key].shape)} there, {list(tensor.shape)} here"
    extra = next((k for k in have if k not in want), None)
    return f"{extra} is there but not in this model" if extra else None


def load(path: Path, mmap: bool = False) -> dict:
    """`mmap`: map the file instead of reading it, so tensors that are never used are never read."""
    from .errors import PixelgenError

    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise PixelgenError(f"checkpoint not found: {path}") from None
    except Exception as err:  # a torn or foreign file
        raise PixelgenError(f"checkpoint {path} cannot be read ({type(err).__name__}); "
                            f"delete it to restart, or point to another checkpoint") from None


@torch.no_grad()
def fingerprint(module: torch.nn.Module) -> str:
    """A short digest of every parameter's exact bits, computed on the parameters' own device (one float64 sum
    of the bits, weighted by position, per tensor): equal weights give equal strings, any flipped bit changes it."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        bits = p.detach().contiguous().view(-1).view(torch.uint8).to(torch.float64)
        weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.float64).remainder_(65521) + 1
        digest.update(f"{name}:{(bits * weights).sum().item()!r}:{bits.sum().item()!r};".encode())
    return digest.hexdigest()


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
