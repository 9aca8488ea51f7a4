"""The `pixelgen` command line: one subcommand per job. Every job takes --config FILE and repeatable --set k=v."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import PixelgenError

# Subcommands whose issue has not landed yet: they say where they belong and exit 2.
NOT_BUILT = {
    "demo-data": ("write the built-in demo ImageFolder", "data (issue 4)"),
    "shard": ("ImageFolder -> WebDataset shards + manifest", "data (issue 4)"),
    "ref-stats": ("reference Inception statistics of a shard set", "jobs: train/sample/score (issue 5)"),
    "train": ("train a model (resumable, DDP, MLflow)", "jobs: train/sample/score (issue 5)"),
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
