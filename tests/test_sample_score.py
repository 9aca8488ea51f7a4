import json

import numpy as np
import pytest
import torch

from jobs_helpers import fast_config, make_shards, pixelgen

pytestmark = pytest.mark.slow  # end-to-end: in the full suite (CI), not in `-m "not slow"`


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    shards = make_shards(root, per_class=4)  # 40 images in 2 shards: every Inception pass here is over 40 or fewer
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = fast_config(root / "config.yaml", shards, uri, train={"steps": 2})
    result = pixelgen("train", "--config", str(config), "--run-dir", str(root / "run"), "--quiet")
    assert result.returncode == 0, result.stderr
    return root, root / "run/checkpoints/final.pt", shards, uri


def sample(ckpt, out, *extra):
    result = pixelgen("sample", "--ckpt", str(ckpt), "--num", "20", "--out", str(out), "--steps", "3",
                      "--shard-size", "8", "--quiet", *extra)
    assert result.returncode == 0, result.stderr
    return result


def test_sample_set_is_identical_whatever_the_batch_size_or_split(trained, tmp_path):
    _, ckpt, _, _ = trained
    sample(ckpt, tmp_path / "a", "--batch-size", "4")
    sample(ckpt, tmp_path / "b", "--batch-size", "7", "--part", "1/2")
    assert not (tmp_path / "b/samples.json").exists()  # the other part is still missing
    sample(ckpt, tmp_path / "b", "--batch-size", "20", "--part", "0/2")
    assert (tmp_path / "b/samples.json").exists()
    for tar in sorted((tmp_path / "a").glob("samples-*.tar")):
        assert tar.read_bytes() == (tmp_path / "b" / tar.name).read_bytes()
    assert len(list((tmp_path / "a").glob("samples-*.tar"))) == 3  # 8 + 8 + 4


def test_class_balance_npz_format_and_manifest(trained, tmp_path):
    _, ckpt, _, _ = trained
    sample(ckpt, tmp_path / "s", "--npz", "--sampler", "heun")
    data = np.load(tmp_path / "s/samples.npz")
    assert data["arr_0"].shape == (20, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    assert np.bincount(data["arr_1"]).tolist() == [2] * 10  # 20 images over 10 classes
    manifest = json.loads((tmp_path / "s/samples.json").read_text())
    assert manifest["sampler"] == "heun" and manifest["steps"] == 3 and manifest["nfe_per_image"] == 5
    assert manifest["encoders_real"] is False


def test_rerun_after_a_kill_writes_only_the_missing_shards(trained, tmp_path):
    _, ckpt, _, _ = trained
    out = tmp_path / "r"
    sample(ckpt, out)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("samples-*.tar")}
    reference = (out / "samples-000001.tar").read_bytes()
    (out / "samples-000001.tar").unlink()
    (out / "samples.json").unlink()
    (out / "samples-000002.tar.part").write_bytes(b"torn")  # what a kill mid-write leaves
    sample(ckpt, out)
    assert (out / "samples-000001.tar").read_bytes() == reference
    assert (out / "samples-000000.tar").stat().st_mtime_ns == kept["samples-000000.tar"]
    assert (out / "samples.json").exists()


def test_sampling_option_errors(trained, tmp_path):
    _, ckpt, _, _ = trained
    result = pixelgen("sample", "--ckpt", str(ckpt), "--num", "4", "--out", str(tmp_path / "x"), "--part", "3/2")
    assert result.returncode == 2 and "--part" in result.stderr
    sample(ckpt, tmp_path / "y")
    result = pixelgen("sample", "--ckpt", str(ckpt), "--num", "20", "--out", str(tmp_path / "y"), "--steps", "9",
                      "--shard-size", "8", "--quiet")
    assert result.returncode == 1 and "other settings" in result.stderr
    result = pixelgen("sample", "--ckpt", str(tmp_path / "missing.pt"), "--num", "4", "--out", str(tmp_path / "z"))
    assert result.returncode == 1 and "checkpoint not found" in result.stderr


def test_ref_stats_and_score_end_to_end_with_random_inception(trained, tmp_path):
    root, ckpt, shards, uri = trained
    ref = tmp_path / "ref.npz"
    result = pixelgen("ref-stats", str(shards), "--out", str(ref), "--allow-random-weights", "--quiet")
    assert result.returncode == 0 and "RANDOM" in result.stdout, result.stderr
    stats = np.load(ref)
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and int(stats["num"]) == 40
    assert stats["mu_s"].shape == (2023,) and stats["sigma_s"].shape == (2023, 2023)  # sFID: 7 x 17 x 17
    sample(ckpt, tmp_path / "s")
    out = tmp_path / "metrics.json"
    result = pixelgen("score", str(tmp_path / "s"), "--ref", str(ref), "--out", str(out), "--allow-random-weights",
                      "--quiet")
    assert result.returncode == 0, result.stderr
    assert "NOT comparable" in result.stdout
    m = json.loads(out.read_text())
    assert m["weights"] == "random" and m["comparable"] is False and m["num_samples"] == 20
    # IS >= 1 up to rounding: a random Inception's near-uniform predictions give exp(-1e-16) in one ADM split
    assert m["fid"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["inception_score"] > 1 - 1e-9
    # ADM's protocols by default, precision/recall over every sample
    assert m["is_mode"] == "adm" and m["pr_distance"] == "adm" and m["pr_num_samples"] == 20
    assert m["sfid"] > 0 and "sFID" in result.stdout
    assert m["sampling"]["steps"] == 3
    from mlflow import MlflowClient

    run_id = (root / "run/mlflow_run_id").read_text()
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.metrics["eval/fid"] == pytest.approx(m["fid"]) and run.data.tags["eval_weights"] == "random"
    assert run.data.metrics["eval/sfid"] == pytest.approx(m["sfid"])


def test_the_reference_images_score_fid_zero_against_their_own_stats(trained, tmp_path):
    # (the eigh trace: this test is about which statistics are compared; the sqrtm is pinned in test_metrics.py)
    _, _, shards, _ = trained
    ref = tmp_path / "ref.npz"
    # the first 16 images in shard order, on both sides (Inception at 299 px costs ~0.5 s an image on CI's cores)
    assert pixelgen("ref-stats", str(shards), "--out", str(ref), "--allow-random-weights", "--quiet",
                    "--max", "16").returncode == 0
    from pixelgen.data import ShardStream

    images = torch.cat([x for x, _ in ShardStream(shards, 16, epochs=1, flip=False, shuffle_buffer=1)])[:16]
    np.savez(tmp_path / "same.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    out = tmp_path / "m.json"
    assert pixelgen("score", str(tmp_path / "same.npz"), "--ref", str(ref), "--out", str(out),
                    "--allow-random-weights", "--quiet", "--fid-sqrt", "eigh").returncode == 0
    m = json.loads(out.read_text())
    assert abs(m["fid"]) < 1e-3 and abs(m["sfid"]) < 1e-3 and m["precision"] == 1.0 and m["recall"] == 1.0

    # the same images as an ADM-format reference batch (arr_0 + mu/sigma + mu_s/sigma_s): its own statistics are
    # used for FID and sFID, so both are ~0 only if our spatial features line up with the batch's element by element
    stats = np.load(ref)
    adm = tmp_path / "VIRTUAL_like.npz"
    np.savez(adm, arr_0=images.permute(0, 2, 3, 1).numpy(), mu=stats["mu"], sigma=stats["sigma"],
             mu_s=stats["mu_s"], sigma_s=stats["sigma_s"])
    assert pixelgen("score", str(tmp_path / "same.npz"), "--ref", str(adm), "--out", str(out),
                    "--allow-random-weights", "--quiet", "--fid-sqrt", "eigh").returncode == 0
    m = json.loads(out.read_text())
    assert m["reference_kind"] == "ADM reference batch" and abs(m["fid"]) < 1e-3 and abs(m["sfid"]) < 1e-3
    # a spatial layout off by a transpose is a different feature order: sFID against it is clearly not zero
    side = 17
    order = np.arange(side * side * 7).reshape(side, side, 7).transpose(1, 0, 2).reshape(-1)
    np.savez(adm, arr_0=images.permute(0, 2, 3, 1).numpy(), mu=stats["mu"], sigma=stats["sigma"],
             mu_s=stats["mu_s"][order], sigma_s=stats["sigma_s"][np.ix_(order, order)])
    assert pixelgen("score", str(tmp_path / "same.npz"), "--ref", str(adm), "--out", str(out),
                    "--allow-random-weights", "--quiet", "--fid-sqrt", "eigh").returncode == 0
    assert json.loads(out.read_text())["sfid"] > 1e-2


def test_spatial_features_are_the_first_channels_of_mixed_6d_in_tf_order():
    from pixelgen.inception import build_inception, spatial_features

    net, _ = build_inception("/nonexistent", True, torch.device("cpu"))
    blocks = []
    handle = net.Mixed_6d.register_forward_hook(lambda module, inputs, output: blocks.append(output))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad(), spatial_features(net) as maps:
        net(images)
    handle.remove()
    block, feats = blocks[0], maps[0]
    assert block.shape[1:] == (768, 17, 17) and feats.shape == (2, 2023)
    # Mixed_6d concatenates [branch1x1, ...]: the first 7 block channels are the 1x1 branch ("mixed_6/conv")
    n, c, h, w = 1, 5, 3, 11
    assert feats[n, (h * 17 + w) * 7 + c] == block[n, c, h, w]
    torch.testing.assert_close(feats, block[:, :7].permute(0, 2, 3, 1).reshape(2, -1))


def test_a_reference_without_spatial_statistics_scores_everything_but_sfid(trained, tmp_path):
    root, ckpt, shards, _ = trained
    ref = tmp_path / "ref.npz"
    assert pixelgen("ref-stats", str(shards), "--out", str(ref), "--allow-random-weights", "--quiet",
                    "--max", "40").returncode == 0
    old = {k: v for k, v in np.load(ref).items() if k not in ("mu_s", "sigma_s")}  # a file from before sFID
    np.savez(ref, **old)
    sample(ckpt, tmp_path / "s")
    out = tmp_path / "metrics.json"
    result = pixelgen("score", str(tmp_path / "s"), "--ref", str(ref), "--out", str(out), "--allow-random-weights",
                      "--quiet", "--fid-sqrt", "eigh")
    assert result.returncode == 0, result.stderr
    m = json.loads(out.read_text())
    assert m["sfid"] is None and m["fid"] > 0 and "remake the ref-stats" in result.stdout


def test_missing_inception_weights_is_a_one_line_error(trained, tmp_path):
    _, _, shards, _ = trained
    result = pixelgen("ref-stats", str(shards), "--out", str(tmp_path / "r.npz"), "--weights-dir", str(tmp_path),
                      "--quiet")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "weights-inception-2015-12-05-6726825d.pth" in result.stderr and "pixelgen weights fetch" in result.stderr


def test_inception_from_a_weight_file_is_used(trained, tmp_path):
    _, _, shards, _ = trained
    from pixelgen import weights

    weights.init_random(tmp_path / "w", ["inception"], seed=0)
    result = pixelgen("ref-stats", str(shards), "--out", str(tmp_path / "r.npz"), "--weights-dir",
                      str(tmp_path / "w"), "--quiet", "--max", "40")
    assert result.returncode == 0, result.stderr
    assert "RANDOM" in result.stdout  # a file, but not the published one
    assert int(np.load(tmp_path / "r.npz")["num"]) == 40


def test_sample_takes_sampling_overrides_over_the_checkpoint_config(trained, tmp_path):
    _, ckpt, _, _ = trained
    config = tmp_path / "sampling.yaml"
    config.write_text("model: {size: tiny}\nsampling: {sampler: heun, shift: 2.0}\n")
    result = pixelgen("sample", "--ckpt", str(ckpt), "--num", "4", "--out", str(tmp_path / "s"), "--quiet",
                      "--config", str(config), "--set", "sampling.steps=2", "--set", "sampling.guidance=1.5")
    assert result.returncode == 0, result.stderr
    settings = json.loads((tmp_path / "s/samples.json").read_text())
    assert (settings["sampler"], settings["steps"], settings["guidance"], settings["shift"]) == ("heun", 2, 1.5, 2.0)
    # an explicit flag wins over --set
    result = pixelgen("sample", "--ckpt", str(ckpt), "--num", "4", "--out", str(tmp_path / "t"), "--quiet",
                      "--set", "sampling.steps=5", "--steps", "2")
    assert result.returncode == 0 and json.loads((tmp_path / "t/samples.json").read_text())["steps"] == 2
    for bad, named in [("sampling.stepz=3", "sampling.stepz"), ("sampling.steps=many", "sampling.steps"),
                       ("loss.gate=0.5", "loss.gate")]:
        result = pixelgen("sample", "--ckpt", str(ckpt), "--num", "4", "--out", str(tmp_path / "u"), "--quiet",
                          "--set", bad)
        assert result.returncode == 2 and named in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "u").exists() or not list((tmp_path / "u").glob("samples-*.tar"))
    config.write_text("sampling: {sampler: heun}\nloss: {gatee: 0.1}\n")  # a typo elsewhere in the file still fails
    result = pixelgen("sample", "--ckpt", str(ckpt), "--num", "4", "--out", str(tmp_path / "v"), "--quiet",
                      "--config", str(config))
    assert result.returncode == 2 and "loss.gatee" in result.stderr


STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def test_logs_without_a_terminal_are_timestamped_lines(trained, tmp_path):
    """Run as Slurm does (stderr a file, not a TTY) without --quiet: readable lines instead of tqdm bars."""
    import re

    _, ckpt, shards, _ = trained
    result = pixelgen("sample", "--ckpt", str(ckpt), "--num", "20", "--out", str(tmp_path / "s"), "--steps", "2",
                      "--shard-size", "8")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "\r" not in result.stderr and len(lines) == 3, result.stderr  # one line per shard, no bar
    for k, (line, images) in enumerate(zip(lines, (8, 16, 20)), 1):
        assert re.fullmatch(rf"{STAMP} sample shard {k}/3 done, {images}/20 images, [\d.]+ img/s, "
                            rf"eta \d+:\d\d:\d\d", line), line

    ref = tmp_path / "ref.npz"
    result = pixelgen("ref-stats", str(shards), "--out", str(ref), "--allow-random-weights", "--batch-size", "10",
                      "--max", "40")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "\r" not in result.stderr and len(lines) == 4, result.stderr  # every 10% of 40, in batches of 10
    assert re.fullmatch(rf"{STAMP} ref-stats 40/40 images \(100%\), [\d.]+ img/s, eta 0:00:00", lines[-1])

    result = pixelgen("score", str(tmp_path / "s"), "--ref", str(ref), "--out", str(tmp_path / "m.json"),
                      "--allow-random-weights", "--batch-size", "5", "--fid-sqrt", "eigh")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if re.match(STAMP, line)]
    assert "\r" not in result.stderr and len(lines) == 4, result.stderr
    assert re.fullmatch(rf"{STAMP} score 5/20 images \(25%\), [\d.]+ img/s, eta \d+:\d\d:\d\d", lines[0])
