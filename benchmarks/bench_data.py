"""Training-stream throughput: pixelgen's shard stream against torchvision's ImageFolder (issue 4).

Both sides produce the same thing, batches of (B, 3, R, R) float images in [-1, 1] with labels and random
horizontal flips, through a DataLoader with the same number of workers. ImageFolder decodes each JPEG with PIL
and applies the same ADM center crop every time; the stream reads images that were cropped once at shard time.
Run on tiny-imagenet-20 (64 px photos) at 64 px and upscaled to 256 px, and (--imagenet-like) on the same
photos re-saved as 500x375 JPEGs, the typical size of an ImageNet training image, sharded at 256 px.

Usage: python benchmarks/bench_data.py --src ../shared/data/tiny-imagenet-20/train [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pixelgen.data import StreamLoader
from pixelgen.shards import ShardSettings, adm_center_crop, build_shards


def crop_flip_tensor(image, resolution):
    import torchvision.transforms.v2.functional as TF

    tensor = TF.pil_to_tensor(adm_center_crop(image, resolution))
    return tensor.flip(-1) if torch.rand(()) < 0.5 else tensor


def collate(batch):
    images = torch.stack([b[0] for b in batch]).float().div_(127.5).sub_(1.0)
    return images, torch.tensor([b[1] for b in batch])


def images_per_second(batches, batch_size, warmup=3, count=40):
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    n = 0
    for x, _ in itertools.islice(iterator, count):
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="an ImageFolder (tiny-imagenet-20/train)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--formats", nargs="+", default=["png", "jpeg", "npy"])
    parser.add_argument("--imagenet-like", type=int, default=2000, metavar="N",
                        help="also benchmark N photos re-saved at ImageNet's typical 500x375 (0: skip)")
    args = parser.parse_args()
    print(f"# data benchmark: {args.src}, batch {args.batch}, {args.workers} workers, {args.batches} batches")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(args.src, r, f"{r:4d} px") for r in args.resolutions]
        if args.imagenet_like:
            cases.append((make_imagenet_like(Path(args.src), Path(tmp) / "imagenet-like", args.imagenet_like), 256,
                          "500x375 -> 256 px"))
        for src, resolution, label in cases:
            bench_one(src, resolution, label, args, Path(tmp))


def make_imagenet_like(src: Path, out: Path, count: int) -> str:
    """The first `count` photos (round-robin over classes) upscaled to 500x375 and saved as JPEG quality 90."""
    from PIL import Image

    classes = sorted(d for d in src.iterdir() if d.is_dir())
    files = [sorted(c.iterdir()) for c in classes]
    for i in range(count):
        path = files[i % len(classes)][i // len(classes)]
        target = out / path.parent.name / (path.stem + ".JPEG")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC).save(target, quality=90)
    return str(out)


def bench_one(src, resolution, label, args, tmp: Path):
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(src, transform=partial(crop_flip_tensor, resolution=resolution))
    baseline = images_per_second(
        DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                   collate_fn=collate, persistent_workers=False), args.batch, count=args.batches)
    print(f"{label:18s} torchvision ImageFolder + PIL + ADM crop    : {baseline:6.0f} img/s")
    for fmt in args.formats:
        out = tmp / f"{label.replace(' ', '')}-{fmt}"
        build_shards(Path(src), out, ShardSettings(resolution, 1000, image_format=fmt), workers=args.workers,
                     progress=False)
        size_mb = sum(p.stat().st_size for p in out.glob("*.tar")) / 1e6
        stream = images_per_second(StreamLoader(out, args.batch, num_workers=args.workers), args.batch,
                                   count=args.batches)
        print(f"{label:18s} pixelgen stream ({fmt:4s}, {size_mb:5.0f} MB of shards) : {stream:6.0f} img/s"
              f"   ratio {stream / baseline:4.1f}x")


if __name__ == "__main__":
    main()
