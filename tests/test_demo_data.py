import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelgen.demo_data import CLASSES, write_demo_dataset

REPO = Path(__file__).resolve().parents[1]


def test_demo_dataset_is_deterministic_and_class_structured(tmp_path):
    write_demo_dataset(tmp_path / "a", resolution=32, per_class=6, num_classes=4, seed=1, progress=False)
    write_demo_dataset(tmp_path / "b", resolution=32, per_class=6, num_classes=4, seed=1, progress=False)
    write_demo_dataset(tmp_path / "c", resolution=32, per_class=6, num_classes=4, seed=2, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 24 and sorted({f.parts[0] for f in files}) == sorted(c[0] for c in CLASSES[:4])
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_classes_differ_in_colour(tmp_path):
    # the object colour dominates the brightest pixels: class means must separate (a learnable signal)
    write_demo_dataset(tmp_path, resolution=32, per_class=20, num_classes=10, progress=False)
    means = {}
    for name, _, colour in CLASSES:
        arrays = [np.asarray(Image.open(p), dtype=float) for p in sorted((tmp_path / name).glob("*.png"))]
        means[name] = np.mean([a.reshape(-1, 3)[a.sum(-1).reshape(-1).argsort()[-60:]].mean(0) for a in arrays], 0)
        assert np.abs(means[name] - np.array(colour)).max() < 70, (name, means[name], colour)
    assert arrays[0].shape == (32, 32, 3)


@pytest.mark.slow
def test_cli_demo_data_matches_the_committed_dvc_lock(tmp_path):
    """`pixelgen demo-data data/demo` must reproduce exactly what dvc.lock records of it, so `dvc status` is clean."""
    import yaml

    [demo] = [d for d in yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]["shard"]["deps"]
              if d["path"] == "data/demo"]
    (tmp_path / "demo.dvc").write_text(yaml.safe_dump({"outs": [{**demo, "cache": False}]}))
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    result = subprocess.run([sys.executable, "-m", "pixelgen.cli", "demo-data", "data/demo", "--quiet"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    status = subprocess.run([str(bin_dir / "dvc"), "status", "demo.dvc"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
