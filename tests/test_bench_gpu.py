"""CPU smoke run of benchmarks/bench_gpu.py: the production Trainer, `pixelgen sample` and `pixelgen score` paths
it times, and the numbers it derives (FLOPs, 50K extrapolation). Speed itself is not asserted here."""

import json
import os
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SMOKE = ["--device", "cpu", "--sizes", "tiny", "--batch", "4", "--warmup", "1", "--steps", "1", "--sample-num", "8",
         "--sample-batch", "4", "--sample-steps", "2", "--workers", "0", "--no-record"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gpu

    return bench_gpu


def test_extrapolation_pays_the_start_up_once(bench):
    # 10 s start-up + 0.5 s per image, measured at 4 and 8 images
    assert bench.extrapolate((4, 12.0), (8, 14.0), target=50_000) == pytest.approx(10 + 25_000)


@pytest.mark.slow
def test_cpu_smoke_run_times_the_production_paths(bench, tmp_path, capsys, monkeypatch):
    from pixelgen.flops import jit_flops
    from pixelgen.model import SIZES

    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    monkeypatch.setattr(bench, "RESULTS", results)
    rows = bench.main(SMOKE + ["--image-size", "32", "--work", str(tmp_path)])
    (row,) = rows
    # the Trainer's denoiser: tiny JiT + REPA projector (width 128 -> 128 -> DINOv2-B's 768), forward + backward
    assert row.train.jit_flops_per_image == jit_flops(SIZES["tiny"], projector=(128, 768)).training
    assert row.train.encoder_flops_per_image > 0 and 0 <= row.train.gated_fraction <= 1
    assert row.train.world_size == 1 and row.train.images_per_s > 0
    for seconds in (row.euler_s, row.heun_s, row.ref_s, row.score_s):
        assert 0 < seconds < float("inf")
    # run_sampling wrote real sample folders with the benchmarked settings, and score read them
    manifest = json.loads((tmp_path / "samples-heun-8" / "samples.json").read_text())
    assert manifest["sampler"] == "heun" and manifest["steps"] == 2 and manifest["nfe_per_image"] == 3
    assert json.loads((tmp_path / "metrics-8.json").read_text())["samples"] == str(tmp_path / "samples-euler-8")
    table = capsys.readouterr().out
    assert "random-weight encoders" in table and "| tiny | 1 | 4 |" in table and "unknown part: no MFU" in table
    assert results.read_text() == "# results\n"  # --no-record


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PIXELGEN_OFFICIAL_SRC"),
                    reason="set PIXELGEN_OFFICIAL_SRC to a checkout of Zehong-Ma/PixelGen")
def test_cpu_smoke_run_of_the_official_side(bench, tmp_path, capsys):
    pytest.importorskip("einops")
    # the official REPA loss needs DINO's grid (14/16 of the image) to equal the JiT's: patch 16
    rows = bench.main(SMOKE + ["--image-size", "64", "--patch-size", "16", "--work", str(tmp_path),
                               "--official-src", os.environ["PIXELGEN_OFFICIAL_SRC"]])
    official = rows[0].official
    assert official["train_img_s"] > 0 and official["euler_s"] > 0 and official["heun_s"] > 0
    assert "ours / official (train)" in capsys.readouterr().out
