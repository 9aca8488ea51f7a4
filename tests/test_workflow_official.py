"""config/official.yaml end to end on random stand-ins of the releases."""

import json
import subprocess

import pytest
import yaml

from workflow_helpers import (BIN, ENV, mlflow_client, project_copy, runs_by_name)

pytestmark = pytest.mark.slow  # end-to-end: in the full suite (CI), not in `-m "not slow"`


def test_official_config_imports_samples_and_scores_against_the_reference_batch(tmp_path):
    """config/official.yaml end to end, on tiny random stand-ins for the releases and the ADM reference batch."""
    import numpy as np
    import torch

    from pixelgen.model import SIZES, JiT
    from pixelgen.official import release_format

    root = project_copy(tmp_path / "p")
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("PixelGen_XL_80ep.ckpt", "PixelGen_XL_160ep.ckpt"):
        torch.save(release_format(JiT(SIZES["tiny"])), weights / name)
    rng = np.random.default_rng(0)
    np.savez(weights / "VIRTUAL_imagenet256_labeled.npz", arr_0=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    config = yaml.safe_load((root / "config/official.yaml").read_text())
    # the releases sample in bf16 compiled (the official sampler); bf16 runs on the CPU, the compile is skipped
    config.update(sample={"num": 20, "parts": 2, "batch_size": 10},
                  pixelgen_overrides=["sampling.steps=3", "sampling.compile=false"],
                  allow_random_weights=True, fid_sqrt="eigh", dataset={**config["dataset"], "resolution": 32},
                  resources={k: {"cpus": 1, "mem_mb": 2000, "runtime": 10} for k in ("train", "sample", "other")})
    (root / "config/official-test.yaml").write_text(yaml.safe_dump(config))
    env = {**ENV, "PIXELGEN_WEIGHTS": str(weights), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(BIN / "snakemake"), "--cores", "2", "all", "--configfile",
                             "config/official-test.yaml"], cwd=root, capture_output=True, text=True, env=env,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "import_official" in log and "rule train" not in log and "ref_stats" not in log and "shard" not in log
    results = root / "results/imagenet256-official"
    for variant in ("xl_80ep", "xl_160ep"):
        metrics = json.loads((results / f"metrics/{variant}.json").read_text())
        assert metrics["reference_kind"] == "ADM reference batch" and metrics["num_samples"] == 20
        assert metrics["comparable"] is False  # stand-ins: labelled, never mistaken for the paper's numbers
        assert metrics["sampling"]["sampler"] == "heun" and metrics["sampling"]["precision"] == "bf16"
    assert json.loads((results / "metrics/xl_160ep.json").read_text())["sampling"]["guidance"] == 2.25
    table = (results / "table.md").read_text()
    assert "5.11" in table and "1.83" in table
    # no training run to attach them to: each imported variant's metrics are an evaluation run of their own
    runs = runs_by_name(mlflow_client(root), "imagenet256-official")
    for variant in ("xl_80ep", "xl_160ep"):
        fid = json.loads((results / f"metrics/{variant}.json").read_text())["fid"]
        tags = runs[variant].data.tags
        assert tags["kind"] == "eval" and tags["train_run_id"] == "none"
        assert runs[variant].data.metrics["eval/fid"] == pytest.approx(fid)
