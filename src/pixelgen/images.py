"""Tensor <-> picture helpers shared by training, sampling and reports."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from .files import write_atomic


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 as the official code converts: floor(127.5 (x + 1) + 0.5)
    clipped to [0, 255] (halves round up, where torch.round would round them to even)."""
    x = ((images.float() + 1) * 127.5 + 0.5).clamp(0, 255).floor().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Save (B, 3, H, W) in [-1, 1] as one PNG grid with a 2-pixel gutter."""
    from PIL import Image

    arrays = to_uint8(images)
    b, h, w, _ = arrays.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    pad = 2
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i, a in enumerate(arrays):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a
    return write_atomic(path, lambda f: Image.fromarray(canvas).save(f, format="PNG"))
