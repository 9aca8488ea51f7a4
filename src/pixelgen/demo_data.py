"""The built-in demo dataset: a procedural, class-conditional ImageFolder that needs no download.

Each class is a shape in a colour (a red disc, a green square, ...) drawn at a random position, size and
rotation over a random soft background, so a small model can visibly learn the classes in minutes on a CPU.
The output is deterministic for a seed: the same bytes on every machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .files import write_atomic
from .progress import progress as progress_bar

# (class name, shape, RGB colour): shapes and colours both differ, so both must be learned
CLASSES = [
    ("red_disc", "disc", (220, 40, 40)),
    ("green_square", "square", (40, 180, 60)),
    ("blue_triangle", "triangle", (40, 80, 220)),
    ("yellow_ring", "ring", (235, 200, 30)),
    ("magenta_cross", "cross", (210, 50, 200)),
    ("cyan_stripes", "stripes", (40, 200, 210)),
    ("orange_checker", "checker", (245, 140, 30)),
    ("purple_diamond", "diamond", (130, 60, 190)),
    ("white_star", "star", (245, 245, 245)),
    ("brown_dots", "dots", (140, 90, 40)),
]

SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges without per-pixel maths


def _polygon(cx, cy, r, sides, rotation, inner=None):
    points = []
    count = sides * (2 if inner else 1)
    for k in range(count):
        radius = r if (inner is None or k % 2 == 0) else r * inner
        angle = rotation + 2 * math.pi * k / count
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_example(shape: str, colour: tuple[int, int, int], size: int, rng: np.random.RandomState) -> Image.Image:
    big = size * SUPERSAMPLE
    # soft two-colour background gradient, darker or lighter than the object
    top, bottom = rng.randint(0, 120, 3), rng.randint(0, 120, 3)
    ramp = np.linspace(0, 1, big)[:, None, None]
    background = (top[None, None] * (1 - ramp) + bottom[None, None] * ramp).repeat(big, axis=1)
    img = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    jitter = rng.randint(-25, 26, 3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter))
    r = big * rng.uniform(0.22, 0.36)
    cx, cy = rng.uniform(r, big - r, 2)
    rot = rng.uniform(0, 2 * math.pi)
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, int(r * 0.35)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rot), fill=fill)
    elif shape == "diamond":
        # rotation 0 puts the corners on the axes: a diamond, kept near upright so it stays unlike the square
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rng.uniform(-0.2, 0.2)), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.25, 5, rot, inner=0.45), fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "stripes":
        period = big / rng.uniform(3, 5)
        offset = rng.uniform(0, period)
        for k in range(-2, int(big / period) + 3):
            x0 = k * period + offset
            draw.polygon([(x0, 0), (x0 + period / 2, 0), (x0 + period / 2 + big / 3, big), (x0 + big / 3, big)],
                         fill=fill)
    elif shape == "checker":
        cells = rng.randint(3, 6)
        step = big / cells
        for i in range(cells):
            for j in range(cells):
                if (i + j) % 2 == 0:
                    draw.rectangle([i * step, j * step, (i + 1) * step, (j + 1) * step], fill=fill)
    elif shape == "dots":
        for _ in range(rng.randint(5, 9)):
            dr = big * rng.uniform(0.06, 0.1)
            dx, dy = rng.uniform(dr, big - dr, 2)
            draw.ellipse([dx - dr, dy - dr, dx + dr, dy + dr], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    img = img.filter(ImageFilter.GaussianBlur(radius=SUPERSAMPLE * 0.3))
    return img.resize((size, size), Image.Resampling.BOX)


def write_demo_dataset(out: Path, resolution: int = 32, per_class: int = 300, num_classes: int = 10,
                       seed: int = 0, progress: bool = True) -> dict[str, int]:
    """Write OUT/<class>/<class>_<index>.png; returns the count per class. Existing identical files are kept."""
    if not 1 <= num_classes <= len(CLASSES):
        from .errors import PixelgenError

        raise PixelgenError(f"--classes must be between 1 and {len(CLASSES)}, got {num_classes}", exit_code=2)
    counts = {}
    total = per_class * num_classes
    with progress_bar(total, "demo-data", enabled=progress) as bar:
        for class_index, (name, shape, colour) in enumerate(CLASSES[:num_classes]):
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                # one RNG per image: any single image can be regenerated, and the order of work does not matter
                rng = np.random.RandomState([seed, class_index, i])
                path = folder / f"{name}_{i:05d}.png"
                if not path.exists():
                    image = draw_example(shape, colour, resolution, rng)
                    write_atomic(path, lambda f: image.save(f, format="PNG"))
                bar.update(1)
            counts[name] = per_class
    return counts
