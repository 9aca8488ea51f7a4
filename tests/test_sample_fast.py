"""Fast sampling: bf16, torch.compile without recompiles, threaded PNG writes, device noise, EMA-only loading."""

import json

import numpy as np
import pytest
import torch

from pixelgen import checkpoint, sample_folder, sample_job
from pixelgen.checkpoint import save_atomic
from pixelgen.config import load_config
from pixelgen.errors import PixelgenError
from pixelgen.model import JiT, jit_config
from pixelgen.progress import progress as progress_bar
from pixelgen.sampling_engine import ShardWriter, build_engine, image_noise

# bf16 keeps 8 bits of mantissa: over 3 Euler steps this small random model differs by 1 level (measured)
BF16_MAX_PIXEL_DIFFERENCE = 3


def random_model(seed: int = 0) -> JiT:
    """A tiny JiT whose zero-initialised layers (adaLN, head) are randomised too, so its output depends on all."""
    torch.manual_seed(seed)
    net = JiT(jit_config("tiny", image_size=16, patch_size=4))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net.eval().requires_grad_(False)


SETTINGS = {"seed": 0, "noise_scale": 1.0, "sampler": "euler", "steps": 3, "guidance": 2.0, "interval": [0.1, 0.9],
            "shift": 1.0, "t_eps": 0.05, "corrector_interval_at": "t_cur", "noise_device": "cpu",
            "guidance_schedule": "interval"}


def images_of(engine, indices, batch_size):
    with ShardWriter() as writer, progress_bar(len(indices), "t", enabled=False) as bar:
        pngs, labels = sample_job.sample_images(engine, indices, SETTINGS, batch_size, bar, writer)
        return [f.result() for f in pngs], labels


def decoded(pngs):
    import io

    from PIL import Image

    return np.stack([np.array(Image.open(io.BytesIO(p))) for p in pngs])


def test_bf16_sampling_runs_in_bf16_and_stays_close_to_fp32():
    cpu = torch.device("cpu")
    fp32 = build_engine(random_model(), cpu, "fp32")
    bf16_model = random_model()
    bf16 = build_engine(bf16_model, cpu, "bf16")
    seen = []
    bf16_model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
    a, _ = images_of(fp32, list(range(6)), 6)
    b, _ = images_of(bf16, list(range(6)), 6)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert bf16_model.blocks[0].norm1.weight.dtype == torch.float32  # norms stay fp32, as under autocast
    x = torch.randn(2, 3, 16, 16)
    assert bf16.denoise(x, torch.full((2,), 0.5), torch.zeros(2, dtype=torch.long)).dtype == torch.float32
    diff = np.abs(decoded(a).astype(int) - decoded(b).astype(int))
    assert 0 < diff.max() <= BF16_MAX_PIXEL_DIFFERENCE


def test_compiled_sampling_compiles_once_whatever_the_last_batch():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    engine = build_engine(random_model(), torch.device("cpu"), "fp32", compile=True, compile_backend="aot_eager")
    images_of(engine, [0, 1, 2, 3], 4)  # guidance: the doubled batch is the first batch's second shape
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    images_of(engine, list(range(4, 14)), 4)  # 4 + 4 + a short last batch of 2, padded to 4
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["recompiles"].values()) <= 1  # the doubled batch only, in the first batch


def test_padded_compiled_batches_give_the_images_of_unpadded_eager_ones():
    eager = build_engine(random_model(), torch.device("cpu"), "fp32")
    compiled = build_engine(random_model(), torch.device("cpu"), "fp32", compile=True, compile_backend="aot_eager")
    a, labels_a = images_of(eager, list(range(5)), 4)
    b, labels_b = images_of(compiled, list(range(5)), 4)
    assert labels_a == labels_b == [0, 1, 2, 3, 4]
    assert np.abs(decoded(a).astype(int) - decoded(b).astype(int)).max() <= 1


def test_threaded_shards_are_the_bytes_of_serial_encoding(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    sample_folder.write_shard(tmp_path / "serial.tar", list(range(5)), images, [1, 2, 3, 4, 5])
    with ShardWriter(encoders=3) as writer:
        pngs = writer.encode(images[:2]) + writer.encode(images[2:])
        writer.write(tmp_path / "threaded.tar", list(range(5)), pngs, [1, 2, 3, 4, 5])
        assert writer.collect() == [tmp_path / "threaded.tar"]
    assert (tmp_path / "threaded.tar").read_bytes() == (tmp_path / "serial.tar").read_bytes()


def test_a_failed_shard_write_is_raised_not_lost(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with ShardWriter() as writer:
        writer.write(tmp_path / "a-file" / "s.tar", [0], writer.encode(np.zeros((1, 4, 4, 3), np.uint8)),
                     [0])
        with pytest.raises(OSError):
            writer.collect()


def test_cpu_noise_is_the_per_image_cpu_generator_of_earlier_versions():
    gen = torch.Generator().manual_seed(7 * 1_000_003 + 12)
    assert torch.equal(image_noise(12, 7, (3, 4, 4), "cpu"), torch.randn((3, 4, 4), generator=gen))


def write_checkpoints(tmp_path):
    """last.pt (network, EMA, optimizer state) and its EMA export final_ema.pt, of one tiny run."""
    config = load_config(overrides=["model.image_size=16", "model.patch_size=4", "model.size=tiny"])
    net = random_model()
    ema = random_model(seed=1)
    last = {"model": {f"net.{k}": v for k, v in net.state_dict().items()}, "ema": {"shadow": ema.state_dict()},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(1000)}}}, "config": config, "step": 5,
            "encoders_real": False}
    save_atomic(last, tmp_path / "last.pt")
    save_atomic(checkpoint.ema_only(last), tmp_path / "final_ema.pt")
    return tmp_path / "last.pt", tmp_path / "final_ema.pt"


def run(ckpt, out, **kw):
    return sample_job.run_sampling(ckpt, 6, out, steps=2, batch_size=4, shard_size=4, progress=False, device="cpu",
                                   **kw)


def test_a_training_checkpoint_is_memory_mapped_and_samples_like_its_ema_export(tmp_path, monkeypatch):
    last, export = write_checkpoints(tmp_path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    run(last, tmp_path / "a")
    run(export, tmp_path / "b")
    assert len(calls) == 2 and all(kw.get("mmap") is True for kw in calls)
    for name in ("samples-000000.tar", "samples-000001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_precision_compile_and_noise_device_are_in_the_folder_identity(tmp_path):
    _, export = write_checkpoints(tmp_path)
    run(export, tmp_path / "s")
    recorded = json.loads((tmp_path / "s/settings.json").read_text())
    assert (recorded["precision"], recorded["compile"], recorded["noise_device"]) == ("fp32", False, "cpu")
    with pytest.raises(PixelgenError, match="precision fp32.*precision bf16"):
        run(export, tmp_path / "s", precision="bf16")
    with pytest.raises(PixelgenError, match="noise_device cpu.*noise_device cuda"):  # CPU noise, a CUDA-noise run
        run(export, tmp_path / "s", overrides=("sampling.noise_device=cuda",))


def test_cuda_noise_needs_a_gpu_to_sample_but_not_to_reset_a_folder(tmp_path):
    _, export = write_checkpoints(tmp_path)
    cuda_noise = ("sampling.noise_device=cuda",)
    assert run(export, tmp_path / "s", overrides=cuda_noise, reset=True) == "new"  # a workflow's CPU reset job
    assert json.loads((tmp_path / "s/settings.json").read_text())["noise_device"] == "cuda"
    with pytest.raises(PixelgenError, match="noise_device is cuda but this job samples on cpu"):
        run(export, tmp_path / "s", overrides=cuda_noise)
    assert not list((tmp_path / "s").glob("samples-*.tar"))


def test_folders_recorded_before_these_settings_count_as_cpu_fp32_eager(tmp_path):
    _, export = write_checkpoints(tmp_path)
    run(export, tmp_path / "s")
    path = tmp_path / "s/settings.json"
    added = ("precision", "compile", "noise_device", "guidance_schedule")
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in added}
    path.write_text(json.dumps(old))
    run(export, tmp_path / "s")  # accepted: the same settings
    with pytest.raises(PixelgenError, match="noise_device cpu; this run asks noise_device cuda"):
        sample_folder.check_settings(tmp_path / "s", {**old, "precision": "fp32", "compile": False,
                                                      "noise_device": "cuda"}, write=False)


def test_a_bad_precision_is_one_line(tmp_path):
    _, export = write_checkpoints(tmp_path)
    with pytest.raises(PixelgenError, match="precision' must be one of fp32, bf16"):
        run(export, tmp_path / "s", overrides=("sampling.precision=fp16",))


def test_cli_precision_and_compile_flags_reach_the_job(monkeypatch):
    from pixelgen import cli

    seen = {}
    monkeypatch.setattr(sample_job, "run_sampling", lambda *a, **kw: seen.update(kw) or "kept")
    common = ["sample", "--ckpt", "c.pt", "--num", "4", "--out", "o", "--reset"]
    assert cli.main([*common, "--precision", "bf16", "--compile"]) == 0
    assert (seen["precision"], seen["compile"]) == ("bf16", True)
    assert cli.main([*common, "--no-compile"]) == 0
    assert (seen["precision"], seen["compile"]) == (None, False)  # None: the checkpoint's sampling.precision
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    assert "--precision {fp32,bf16}" in help_text and "--compile, --no-compile" in help_text


def test_cuda_noise_parts_on_another_gpu_model_are_refused(tmp_path, monkeypatch):
    """CUDA noise may depend on the GPU model: the first sampling part records it, another model is refused."""
    from pixelgen import sample_job

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    sample_job.check_noise_gpu(tmp_path, torch.device("cpu"))
    sample_job.check_noise_gpu(tmp_path, torch.device("cpu"))  # the same model: fine
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(PixelgenError, match="CUDA noise on a NVIDIA H100 80GB HBM3, this job runs on a NVIDIA A100"):
        sample_job.check_noise_gpu(tmp_path, torch.device("cpu"))
