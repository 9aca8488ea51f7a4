"""`pixelgen sample`: class-balanced EMA samples from a checkpoint, written as shards of PNGs (+ optional .npz).

Image i has label i % num_classes and noise drawn from a generator seeded by (seed, i) alone, so the sample set
is the same whatever the batch size, the number of GPUs, or how the work is split across jobs (--part i/n).
Work is done in shards of --shard-size images (samples-000000.tar, ...), each written atomically: a rerun
after a kill writes only the missing shards. When every shard exists, the job writes samples.json (and
samples.npz in the ADM evaluator's format with --npz); running the command again once all parts are done is
the "gather" step of a scattered sampling job. The folder's layout, writers and readers: sample_folder.py; how
the denoiser runs (precision, compile, noise device) and PNGs are written in threads: sampling_engine.py.
Temp files of killed runs are not swept here: parts on other hosts may be writing into the same folder.

A folder holds the samples of one checkpoint and one set of settings (sample_folder.check_settings): the
checkpoint is identified by its step and a sha256 of its EMA weights and model config, so a retrain that reaches
the same step is another checkpoint, and a copy of the file elsewhere is the same one. The digest is of the
weights already loaded for sampling (a pass over their bytes, ~1 s per GB), not of the file: it needs no cache,
and it holds for checkpoints without a training run (import-official). Each part holds a lock for its run.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from . import checkpoint, distributed, sample_folder
from .locks import exclusive_folder
from .config import check_ranges, merge, section_over
from .errors import PixelgenError
from .files import check_writable_folder
from .images import to_uint8
from .model import build_model
from .progress import progress as progress_bar
from .sampling_engine import (Engine, ShardWriter, build_engine, check_noise_device, image_noise, padded,
                              tf32_allowed)
from .solvers import evaluations, sample

def labels_for(indices: list[int], num_classes: int) -> torch.Tensor:
    """Class-balanced: image i gets class i % C, so any N that is a multiple of C has N / C per class."""
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long)


def parse_part(part: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in part.split("/"))
        assert 0 <= i < n
        return i, n
    except (ValueError, AssertionError):
        raise PixelgenError(f"--part must look like i/n with 0 <= i < n, got {part!r}", exit_code=2) from None


def load_ema_model(ckpt_path: Path):
    """The EMA network of a training checkpoint or of an EMA export (final_ema.pt), and the EMA export's state.
    The file is memory-mapped, so a training checkpoint's optimizer state and network are never read."""
    state = checkpoint.ema_only(checkpoint.load(ckpt_path, mmap=True))
    model = build_model(state["config"]["model"])
    model.load_state_dict(state["ema"]["shadow"])
    return model.eval().requires_grad_(False), state


def weights_digest(state: dict) -> str:
    """sha256 of the model config and of every EMA tensor's name, dtype, shape and bytes, in name order."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(state["config"]["model"], sort_keys=True).encode())
    for name, tensor in sorted(state["ema"]["shadow"].items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(t.view(-1).view(torch.uint8).numpy())  # the bytes in place, no copy
    return digest.hexdigest()


def sampling_settings(state: dict, sc: dict, *, sampler, steps, guidance, interval, shift, seed, num,
                      shard_size, precision=None, compile=None) -> dict:
    """The checkpoint's (or config's) `sampling` section `sc` under the explicit arguments (the CLI's flags), which
    are checked like config values: a flag cannot bring in what --set would refuse."""
    flags = {"sampler": sampler, "steps": steps, "guidance": guidance, "shift": shift, "precision": precision,
             "compile": compile, "interval": None if interval is None else list(interval)}
    sc = merge({"sampling": sc}, {"sampling": {k: v for k, v in flags.items() if v is not None}})
    sc = check_ranges(sc)["sampling"]
    return {"precision": sc["precision"], "compile": sc["compile"], "noise_device": sc["noise_device"],
            "sampler": sc["sampler"], "steps": sc["steps"], "guidance": sc["guidance"], "interval": sc["interval"],
            "shift": sc["shift"], "seed": seed, "num": num,
            "shard_size": shard_size, "t_eps": state["config"]["flow"]["t_eps"],
            # the training noise scale is the sampling noise scale (official: both 1.0)
            "noise_scale": state["config"]["flow"]["noise_scale"],
            "corrector_interval_at": sc.get("corrector_interval_at", "t_cur"),
            "guidance_schedule": sc.get("guidance_schedule", "interval")}


def shard_indices(k: int, shard_size: int, num: int) -> list[int]:
    return list(range(k * shard_size, min((k + 1) * shard_size, num)))


def sample_images(engine: Engine, indices: list[int], settings: dict, batch_size: int, bar,
                  writer: ShardWriter) -> tuple[list, list]:
    """The PNGs (futures, encoded by `writer`) and labels of the given sample indices."""
    pngs, labels = [], []
    noise_on = engine.device if settings["noise_device"] == "cuda" else "cpu"  # cuda: this rank's GPU
    for b in range(0, len(indices), batch_size):
        batch = indices[b:b + batch_size]
        run = padded(batch, batch_size) if engine.static_batch else batch
        noise = torch.stack([image_noise(i, settings["seed"], (3, engine.image_size, engine.image_size),
                                         noise_on) for i in run]).to(engine.device)
        y = labels_for(run, engine.num_classes).to(engine.device)
        images = sample(engine.denoise, noise * settings["noise_scale"], y, sampler=settings["sampler"],
                        steps=settings["steps"], guidance=settings["guidance"], interval=tuple(settings["interval"]),
                        shift=settings["shift"], t_eps=settings["t_eps"], null_class=engine.null_class,
                        corrector_interval_at=settings["corrector_interval_at"],
                        guidance_schedule=settings["guidance_schedule"])
        pngs += writer.encode(to_uint8(images[:len(batch)]))  # encoded while the next batch samples
        labels += y[:len(batch)].tolist()
        bar.update(len(batch))
    return pngs, labels


def check_noise_gpu(out: Path, device: torch.device) -> None:
    """CUDA noise may depend on the GPU model (randn's launch shape follows the number of SMs), so the first part
    that samples records its GPU in the folder and a part on another model is refused (parts on the same model,
    on any number of GPUs, draw the same noise)."""
    mine = {"noise_gpu": torch.cuda.get_device_name(device)}
    recorded = sample_folder.record_once(Path(out) / "noise_gpu.json", mine)
    if recorded != mine:
        raise PixelgenError(f"{out} was sampled with CUDA noise on a {recorded.get('noise_gpu')}, this job runs on "
                            f"a {mine['noise_gpu']}: CUDA noise may differ between GPU models; sample on the same "
                            f"model, or into a new --out")


def part_shards(settings: dict, part_index: int, parts: int, d) -> list[int]:
    """The shards this part samples (k with k % parts == part_index), and of those this rank's."""
    n_shards = (settings["num"] + settings["shard_size"] - 1) // settings["shard_size"]
    return [k for k in range(n_shards) if k % parts == part_index][d.rank::d.world_size]


def sample_part(engine: Engine, state: dict, settings: dict, identity: dict, ckpt: Path, out: Path,
                part_index: int, parts: int, d, batch_size: int, npz: bool, progress: bool) -> dict | None:
    """Sample the missing shards of this part (and this rank); the manifest once every shard exists."""
    num, shard_size = settings["num"], settings["shard_size"]
    n_shards = (num + shard_size - 1) // shard_size
    mine = part_shards(settings, part_index, parts, d)
    done = [k for k in mine if sample_folder.shard_path(out, k).exists()]
    check_noise_device(settings["noise_device"], engine.device, sampling=len(done) < len(mine))
    if settings["noise_device"] == "cuda" and len(done) < len(mine):
        check_noise_gpu(out, engine.device)
    sizes = {k: len(shard_indices(k, shard_size, num)) for k in mine}
    with progress_bar(sum(sizes.values()), "sample", initial=sum(sizes[k] for k in done), every=0,
                      enabled=progress and d.is_main) as bar:
        with ShardWriter() as writer, tf32_allowed(engine.device, engine.precision == "bf16"):
            for n, k in enumerate([k for k in mine if k not in done], len(done) + 1):
                indices = shard_indices(k, shard_size, num)
                pngs, labels = sample_images(engine, indices, settings, batch_size, bar, writer)
                writer.write(sample_folder.shard_path(out, k), indices, pngs, labels)  # raises earlier failures
                bar.log(f"shard {n}/{len(mine)} done")  # sampled; its write (in a thread) fails the job if it fails
            writer.collect()
    distributed.barrier(d)
    if not d.is_main or not all(sample_folder.shard_path(out, k).exists() for k in range(n_shards)):
        return None
    shards = [sample_folder.SHARD.format(k) for k in range(n_shards)]
    manifest = {**identity, "ckpt": str(ckpt), "num_classes": engine.num_classes,
                "image_size": engine.image_size,
                "nfe_per_image": evaluations(settings["sampler"], settings["steps"]),
                "shards": shards, "shard_sha256": sample_folder.shard_digests(out, shards),
                "encoders_real": bool(state.get("encoders_real", False)),
                "run_dir": str(Path(ckpt).resolve().parent.parent),
                "tracking_uri": state["config"]["tracking"]["uri"]}
    if npz:
        manifest["npz"] = sample_folder.write_npz(out, [out / name for name in shards])
    sample_folder.write_manifest(out, manifest)
    return manifest


def run_sampling(ckpt: Path, num: int, out: Path, *, sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None, interval: tuple[float, float] | None = None, shift: float | None = None,
                 batch_size: int = 64, shard_size: int = 1000, part: str = "0/1", seed: int = 0, npz: bool = False,
                 device: str = "auto", progress: bool = True, config_file: str | Path | None = None,
                 overrides: tuple[str, ...] = (), reset: bool = False, precision: str | None = None,
                 compile: bool | None = None, compile_backend: str = "inductor") -> dict | str | None:
    """Sample this job's missing shards; write the manifest (and npz) once every shard exists.
    Settings: the checkpoint's `sampling` section, then `config_file`'s and `overrides` (sampling.* only), then
    the explicit arguments. With `reset`, only prepare the folder for them (sample_folder.reset) and return
    what was done."""
    if num < 1 or batch_size < 1 or shard_size < 1:
        raise PixelgenError("--num, --batch-size and --shard-size must be >= 1", exit_code=2)
    part_index, parts = parse_part(part)
    check_writable_folder(out, "--out")  # before any work, as a one-line refusal
    d = distributed.init(device)
    try:
        model, state = load_ema_model(Path(ckpt))
        sc = section_over(state["config"], "sampling", config_file, overrides)  # fills newer keys' defaults
        settings = sampling_settings(state, sc, sampler=sampler, steps=steps, guidance=guidance, interval=interval,
                                     shift=shift, seed=seed, num=num, shard_size=shard_size, precision=precision,
                                     compile=compile)
        engine = build_engine(model, d.device, settings["precision"], settings["compile"], compile_backend)
        out = Path(out)
        identity = {**settings, "ckpt_step": state["step"], "ckpt_digest": weights_digest(state)}
        # refused before the folder is touched (lock, settings.json): a refused run writes nothing there, so it
        # cannot make the corrected run's settings look like a change
        will_sample = not reset and any(not sample_folder.shard_path(out, k).exists()
                                        for k in part_shards(settings, part_index, parts, d))
        check_noise_device(settings["noise_device"], d.device, sampling=will_sample)
        if reset:
            return sample_folder.reset(out, {**identity, "ckpt": str(ckpt)}) if d.is_main else None
        # one job per part: the main process holds the part's lock (another job's main process is refused, and
        # torchrun then stops that job's other ranks)
        lock = (exclusive_folder(sample_folder.part_lock_folder(out, part_index, parts), f"sample --part {part}")
                if d.is_main else nullcontext())
        with lock:
            sample_folder.check_settings(out, {**identity, "ckpt": str(ckpt)}, write=d.is_main)
            return sample_part(engine, state, settings, identity, ckpt, out, part_index, parts, d, batch_size,
                               npz, progress)
    finally:
        distributed.shutdown()
