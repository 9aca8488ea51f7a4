"""Shared setup for job tests: a small demo shard set and a fast config (random small encoders)."""

from pathlib import Path

import yaml
from forked_cli import run_pixelgen

from pixelgen.demo_data import write_demo_dataset
from pixelgen.shards import ShardSettings, build_shards


def make_shards(root: Path, per_class: int = 12, classes: int = 10) -> Path:
    write_demo_dataset(root / "demo", resolution=32, per_class=per_class, num_classes=classes, progress=False)
    build_shards(root / "demo", root / "shards", ShardSettings(32, shard_size=30), progress=False)
    return root / "shards"


def fast_config(path: Path, shards: Path, tracking_uri: str, **sections) -> Path:
    config = {
        "model": {"image_size": 32, "patch_size": 8},
        "encoders": {"random_init": True, "dino_model": "vit_small_patch14_dinov2"},
        "data": {"shards": str(shards), "batch_size": 8, "workers": 1, "shuffle_buffer": 50},
        "train": {"steps": 6, "ckpt_every": 2, "log_every": 2, "preview_every": 0, "preview_count": 4,
                  "preview_steps": 3},
        "tracking": {"uri": tracking_uri, "system_metrics": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def pixelgen(*args, **kwargs):
    """`pixelgen ARGS` as its own process (forked from a preloaded one: see forked_cli.py)."""
    return run_pixelgen(*args, **kwargs)
