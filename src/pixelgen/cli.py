"""The `pixelgen` command line: one subcommand per job. Every job takes --config FILE and repeatable --set k=v."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import PixelgenError

# Subcommands whose issue has not landed yet: they say where they belong and exit 2.
NOT_BUILT = {
    "ref-stats": ("reference Inception statistics of a shard set", "jobs: train/sample/score (issue 5)"),
    "sample": ("sample images from a checkpoint", "jobs: train/sample/score (issue 5)"),
    "score": ("FID/IS/KID/precision/recall of samples", "jobs: train/sample/score (issue 5)"),
    "report": ("results tables, plots and grids", "workflow (issue 6)"),
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config merged over the packaged defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override one config value (repeatable), e.g. --set loss.gate=0.6")


def cmd_config(args) -> int:
    import yaml

    from .config import load_config

    config = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    return 0


def cmd_weights(args) -> int:
    from . import weights

    directory = weights.weights_dir(args.dir)
    keys = args.only or list(weights.WEIGHT_FILES)
    if args.action == "fetch":
        for key in keys:
            state, _ = weights.status(key, directory)
            if state == "ok" and not args.force:
                print(f"{key:10s} ok (already present)")
                continue
            path = weights.fetch(key, directory)
            print(f"{key:10s} fetched -> {path}")
        return 0
    if args.action == "init-random":
        for path in weights.init_random(directory, keys, seed=args.seed):
            print(f"random weights -> {path}")
        print("these are NOT the published weights: every metric made with them is marked not comparable")
        return 0
    worst = 0
    print(f"weights directory: {directory}")
    for key in keys:
        state, detail = weights.status(key, directory)
        print(f"{key:10s} {state:8s} {detail}")
        worst = max(worst, {"ok": 0, "random": 0, "missing": 1, "corrupt": 1}[state])
    return worst


def cmd_demo_data(args) -> int:
    from .demo_data import write_demo_dataset

    counts = write_demo_dataset(Path(args.out), resolution=args.resolution, per_class=args.per_class,
                                num_classes=args.classes, seed=args.seed, progress=not args.quiet)
    print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {args.out}")
    return 0


def cmd_shard(args) -> int:
    from .shards import ShardSettings, build_shards

    settings = ShardSettings(resolution=args.resolution, shard_size=args.shard_size, image_format=args.format,
                             quality=args.quality, seed=args.seed)
    manifest = build_shards(Path(args.src), Path(args.out), settings, workers=args.workers, strict=args.strict,
                            progress=not args.quiet)
    print(f"{manifest['num_samples']} images in {len(manifest['shards'])} shards -> {args.out}/manifest.json; "
          f"{len(manifest['rejected'])} rejected")
    for rejected in manifest["rejected"][:10]:
        print(f"  rejected {rejected['path']}: {rejected['reason']}")
    if len(manifest["rejected"]) > 10:
        print(f"  ... and {len(manifest['rejected']) - 10} more (see manifest.json)")
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    config = load_config(args.config, args.overrides)
    final = train(config, Path(args.run_dir), stop_at_step=args.stop_at_step, progress=not args.quiet)
    print(f"done: {final}")
    return 0


def cmd_not_built(args) -> int:
    what, area = NOT_BUILT[args.command]
    print(f"pixelgen {args.command}: not built yet ({what}; belongs to the {area} issue)", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelgen",
        description="Train, sample and score pixel-space diffusion models with perceptual losses (PixelGen).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (what, area) in NOT_BUILT.items():
        p = sub.add_parser(name, help=f"{what} [not built yet: {area}]", description=f"{what} (not built yet)")
        add_config_args(p)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=cmd_not_built)

    d = sub.add_parser("demo-data", help="write the built-in demo ImageFolder (procedural, no download)",
                       description="Write a small class-conditional ImageFolder (a coloured shape per class) that "
                                   "needs no download; deterministic for a seed. Existing files are kept.")
    d.add_argument("out", help="output folder (OUT/<class>/<image>.png)")
    d.add_argument("--resolution", type=int, default=32, choices=[32, 64], help="image size (default 32)")
    d.add_argument("--per-class", type=int, default=300, help="images per class (default 300)")
    d.add_argument("--classes", type=int, default=10, help="number of classes, at most 10 (default 10)")
    d.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo_data)

    s = sub.add_parser("shard", help="ImageFolder -> WebDataset shards + manifest (ADM center crop, RGB)",
                       description="Center-crop every image of an ImageFolder once (ADM: box halvings, bicubic, "
                                   "center crop), convert to RGB and write WebDataset tar shards plus "
                                   "OUT/manifest.json. Unreadable files are rejected and listed. Rerunning after "
                                   "a kill finishes only the missing shards.")
    s.add_argument("src", help="ImageFolder root: SRC/<class>/<image> (ImageNet's train folder works as is)")
    s.add_argument("out", help="output folder for shard-*.tar and manifest.json")
    s.add_argument("--resolution", type=int, required=True, help="output size in pixels (e.g. 256)")
    s.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    s.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    s.add_argument("--format", choices=["png", "jpeg", "npy"], default="png",
                   help="png (lossless, default), jpeg (smaller, lossy) or npy (lossless raw pixels, fastest to read)")
    s.add_argument("--quality", type=int, default=95, help="JPEG quality with --format jpeg (default 95)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    s.add_argument("--strict", action="store_true", help="stop at the first unreadable file instead of rejecting")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_shard)

    t = sub.add_parser("train", help="train a model (resumable: rerun the same command; DDP under torchrun)",
                       description="Train one model. State lives in --run-dir: config.yaml, checkpoints/last.pt "
                                   "(every train.ckpt_every steps and on SIGTERM) and checkpoints/final.pt. Rerunning "
                                   "the same command resumes exactly. Multi-GPU: torchrun --nproc-per-node N "
                                   "$(which pixelgen) train ...")
    add_config_args(t)
    t.add_argument("--run-dir", required=True, help="where config, checkpoints and sample grids go")
    t.add_argument("--stop-at-step", type=int, help=argparse.SUPPRESS)  # tests: behave as if preempted here
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    w = sub.add_parser("weights", help="fetch or check pretrained weights (VGG16, DINOv2-B, FID Inception)",
                       description="Pretrained weights live in one directory ($PIXELGEN_WEIGHTS, default "
                                   "~/.cache/pixelgen/weights) and are never downloaded at run time.")
    w.add_argument("action", choices=["fetch", "check", "init-random"],
                   help="fetch: download with checksums; check: report present/missing/corrupt/random; "
                        "init-random: write random weights in the same formats (tests, offline demos)")
    w.add_argument("--dir", help="weights directory (default: $PIXELGEN_WEIGHTS or ~/.cache/pixelgen/weights)")
    w.add_argument("--only", action="append", choices=["vgg16", "dinov2-b", "inception"],
                   help="limit to one file (repeatable)")
    w.add_argument("--force", action="store_true", help="fetch: download again even if present")
    w.add_argument("--seed", type=int, default=0, help="init-random: seed")
    w.set_defaults(func=cmd_weights)

    c = sub.add_parser("config", help="print the resolved config (defaults + --config + --set), validated",
                       description="Resolve and validate a config exactly as the jobs do, and print it as YAML.")
    add_config_args(c)
    c.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PixelgenError as err:
        print(f"pixelgen {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"pixelgen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
