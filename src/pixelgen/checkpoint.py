"""Atomic checkpoints and the random state they must carry for an exact resume."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a kill never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    from .errors import PixelgenError

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
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
