"""The `pixelgen` command line: one subcommand per job. The jobs with a model config (train, sample, config) take
--config FILE and repeatable --set key.sub=value, validated against the packaged schema; ref-stats and score
measure images and have no config to override, only flags."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from .errors import PixelgenError


QUIET_HELP = "no progress: neither the bar (terminal) nor the timestamped progress lines (log file)"


def _int_at_least(minimum: int, wording: str):
    """An argparse type for whole numbers >= `minimum`; `wording` says the bound in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wording}, got {value}")
        return value
    return parse


# counts and sizes: a batch of 0 images would divide by zero or loop forever later
positive_int = _int_at_least(1, "at least 1")
non_negative_int = _int_at_least(0, "0 or more")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config merged over the packaged defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override one config value (repeatable), e.g. --set loss.gate=0.6")


def add_sampling_section_args(parser: argparse.ArgumentParser, base: str) -> None:
    """--config/--set for jobs that take only a `sampling` section over `base` (sample, import-official)."""
    parser.add_argument("--config", metavar="FILE", help=f"YAML whose sampling section overrides {base}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="sampling.KEY=VALUE",
                        help="override one sampling value (repeatable), e.g. --set sampling.shift=2.0")


def add_inception_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=positive_int, default=100, help="images per Inception pass (default 100)")
    parser.add_argument("--weights-dir", help="weights directory (default: $PIXELGEN_WEIGHTS or ~/.cache/pixelgen/weights)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="without the Inception file, use a random Inception (demo/tests); results are labelled")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)


# --- pixelgen demo-data --------------------------------------------------------------------------
def add_demo_data(sub) -> None:
    d = sub.add_parser("demo-data", help="write the built-in demo ImageFolder (procedural, no download)",
                       description="Write a small class-conditional ImageFolder (a coloured shape per class) that "
                                   "needs no download; deterministic for a seed. Existing files are kept.")
    d.add_argument("out", help="output folder (OUT/<class>/<image>.png)")
    d.add_argument("--resolution", type=int, default=32, choices=[32, 64], help="image size (default 32)")
    d.add_argument("--per-class", type=positive_int, default=300, help="images per class (default 300)")
    d.add_argument("--classes", type=positive_int, default=10, help="number of classes, at most 10 (default 10)")
    d.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    d.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    d.set_defaults(func=run_demo_data)


def run_demo_data(args) -> int:
    from .demo_data import write_demo_dataset

    counts = write_demo_dataset(Path(args.out), resolution=args.resolution, per_class=args.per_class,
                                num_classes=args.classes, seed=args.seed, progress=not args.quiet)
    print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {args.out}")
    return 0


# --- pixelgen shard ------------------------------------------------------------------------------
def add_shard(sub) -> None:
    s = sub.add_parser("shard", help="ImageFolder -> WebDataset shards + manifest (ADM center crop, RGB)",
                       description="Center-crop every image of an ImageFolder once (ADM: box halvings, bicubic, "
                                   "center crop), convert to RGB and write WebDataset tar shards plus "
                                   "OUT/manifest.json. Unreadable files are rejected and listed. Rerunning after "
                                   "a kill finishes only the missing shards.")
    s.add_argument("src", nargs="?", help="ImageFolder root: SRC/<class>/<image> (ImageNet's train folder works as is)")
    s.add_argument("out", nargs="?", help="output folder for shard-*.tar and manifest.json")
    s.add_argument("--verify", metavar="OUT", help="only check the shards in OUT against its manifest "
                   "(presence, counts, sha256) and exit non-zero naming the first bad shard")
    s.add_argument("--resolution", type=int, help="output size in pixels (e.g. 256); required to shard")
    s.add_argument("--min-images", type=int, default=1,
                   help="fail (after writing the manifest) with fewer usable images (default 1: an empty set fails)")
    s.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard (default 1000)")
    s.add_argument("--workers", type=positive_int, default=1, help="parallel processes (default 1)")
    s.add_argument("--format", choices=["png", "jpeg", "npy"], default="png",
                   help="png (lossless, default), jpeg (smaller, lossy) or npy (lossless raw pixels, fastest to read)")
    s.add_argument("--quality", type=positive_int, default=95, help="JPEG quality with --format jpeg (default 95)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    s.add_argument("--strict", action="store_true", help="stop at the first unreadable file instead of rejecting")
    s.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    s.set_defaults(func=run_shard)


def run_shard(args) -> int:
    from .shards import ShardSettings, build_shards, verify_shards

    if args.verify:
        manifest = verify_shards(Path(args.verify), digests=True)
        print(f"{args.verify}: {len(manifest['shards'])} shards, {manifest['num_samples']} samples, all digests match")
        return 0
    if not (args.src and args.out and args.resolution):
        raise PixelgenError("pixelgen shard needs SRC OUT --resolution N (or --verify OUT)", exit_code=2)
    settings = ShardSettings(resolution=args.resolution, shard_size=args.shard_size, image_format=args.format,
                             quality=args.quality, seed=args.seed)
    manifest = build_shards(Path(args.src), Path(args.out), settings, workers=args.workers, strict=args.strict,
                            progress=not args.quiet, min_images=args.min_images)
    print(f"{manifest['num_samples']} images in {len(manifest['shards'])} shards -> {args.out}/manifest.json; "
          f"{len(manifest['rejected'])} rejected")
    for rejected in manifest["rejected"][:10]:
        print(f"  rejected {rejected['path']}: {rejected['reason']}")
    if len(manifest["rejected"]) > 10:
        print(f"  ... and {len(manifest['rejected']) - 10} more (see manifest.json)")
    return 0


# --- pixelgen train ------------------------------------------------------------------------------
def add_train(sub) -> None:
    t = sub.add_parser("train", help="train a model (resumable: rerun the same command; DDP under torchrun)",
                       description="Train one model. State lives in --run-dir: config.yaml, checkpoints/last.pt "
                                   "(every train.ckpt_every steps and on SIGTERM) and checkpoints/final.pt. Rerunning "
                                   "the same command resumes exactly. Multi-GPU: torchrun --nproc-per-node N "
                                   "-m pixelgen.cli train ...")
    add_config_args(t)
    t.add_argument("--run-dir", required=True, help="where config, checkpoints and sample grids go (one job at a "
                                                    "time: a second is refused)")
    t.add_argument("--init-from", metavar="CKPT",
                   help="start a new run from this checkpoint's weights (a training checkpoint, final_ema.pt or "
                        "an imported official one); step, optimizer and data start over")
    t.add_argument("--stop-at-step", type=int, help=argparse.SUPPRESS)  # tests: behave as if preempted here
    t.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    t.set_defaults(func=run_train)


def run_train(args) -> int:
    from .config import load_config
    from .train import train

    config = load_config(args.config, args.overrides)
    try:
        final = train(config, Path(args.run_dir), stop_at_step=args.stop_at_step, progress=not args.quiet,
                      init_from=args.init_from)
    except OSError as err:  # a full disk outside the atomic writes (MLflow's store, a sample grid library)
        if err.errno != errno.ENOSPC:
            raise
        raise PixelgenError(f"no space left on device writing {err.filename or args.run_dir}; free space and "
                            f"rerun (the last checkpoint is intact)") from None
    print(f"done: {final}")
    return 0


# --- pixelgen sample -----------------------------------------------------------------------------
def add_sample(sub) -> None:
    from .config import SAMPLERS  # a light module: names only

    # argparse %-formats help= strings but prints a description as written: a single % here
    sp = sub.add_parser("sample", help="class-balanced EMA samples from a checkpoint, as PNG shards (resumable)",
                        description="Sample --num class-balanced images (image i has class i % C and noise "
                                    "seeded by i) with the checkpoint's EMA weights. Settings: the checkpoint's "
                                    "sampling section, then --config's, then --set sampling.*, then the explicit "
                                    "flags. Resumable; split across jobs with --part; multi-GPU under torchrun. "
                                    "A folder holds the samples of one checkpoint with one set of settings: a "
                                    "rerun that differs is refused, naming what differs; one job per part.")
    sp.add_argument("--ckpt", required=True, help="a checkpoint written by pixelgen train")
    sp.add_argument("--num", type=positive_int, required=True, help="number of images (50000 for the ImageNet evaluation)")
    sp.add_argument("--out", required=True, help="output folder (samples-*.tar, samples.json)")
    add_sampling_section_args(sp, "the checkpoint's")
    sp.add_argument("--sampler", choices=SAMPLERS,
                    help="ODE solver (default: from the checkpoint config)")
    sp.add_argument("--steps", type=positive_int, help="solver steps (Heun-50 = 99 evaluations)")
    sp.add_argument("--guidance", type=float, help="guidance scale (1.0 = no unconditional pass)")
    sp.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"),
                    help="guidance only for LO < t <= HI (0 <= LO < HI <= 1)")
    sp.add_argument("--shift", type=float, help="time shift of the sampling grid (> 0)")
    sp.add_argument("--precision", choices=["fp32", "bf16"],
                    help="denoiser precision: fp32, or bf16 (bf16 matmul weights under autocast, as the official "
                         "bf16-mixed sampler; the ODE state stays fp32) (default: sampling.precision)")
    sp.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the denoiser with static shapes (one compile per run; pays off for "
                         "large --num on a GPU) (default: sampling.compile)")
    sp.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    sp.add_argument("--shard-size", type=positive_int, default=1000, help="images per output shard (default 1000)")
    sp.add_argument("--part", default="0/1", help="i/n: do only shards k with k %% n == i (scatter across jobs)")
    sp.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sp.add_argument("--npz", action="store_true", help="also write samples.npz in the ADM evaluator's format")
    sp.add_argument("--reset", action="store_true",
                    help="only prepare OUT for this checkpoint and these settings: keep it if it matches, else "
                         "delete its samples (of another checkpoint or other settings) and record the new ones; "
                         "for a folder a workflow owns (run once before the parts, whenever the checkpoint changes)")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    sp.set_defaults(func=run_sample)


def run_sample(args) -> int:
    from .sample_job import run_sampling

    manifest = run_sampling(Path(args.ckpt), args.num, Path(args.out), sampler=args.sampler, steps=args.steps,
                            guidance=args.guidance, interval=tuple(args.interval) if args.interval else None,
                            shift=args.shift, batch_size=args.batch_size, shard_size=args.shard_size,
                            part=args.part, seed=args.seed, npz=args.npz, device=args.device,
                            progress=not args.quiet, config_file=args.config, overrides=tuple(args.overrides),
                            reset=args.reset, precision=args.precision, compile=args.compile)
    if args.reset:
        print(f"{args.out}: {manifest} (samples of this checkpoint with these settings)")
    elif manifest is not None:
        print(f"{manifest['num']} samples complete in {args.out} ({manifest['sampler']}-{manifest['steps']}, "
              f"guidance {manifest['guidance']})")
    else:
        print(f"this part is done; {args.out}/samples.json is written when every part has finished")
    return 0


# --- pixelgen ref-stats --------------------------------------------------------------------------
def add_ref_stats(sub) -> None:
    r = sub.add_parser("ref-stats", help="reference Inception statistics (FID/sFID mu/sigma + features) of a shard set",
                       description="Inception pool3 features of the images in a shard folder: mean, covariance "
                                   "and up to 10,000 features (for precision/recall and KID), and the mean and "
                                   "covariance of the spatial mixed_6/conv features (sFID), saved as .npz.")
    r.add_argument("shards", help="a folder made by pixelgen shard")
    r.add_argument("--out", required=True, help="output .npz")
    r.add_argument("--max", type=positive_int, help="use at most this many images")
    add_inception_args(r)
    r.set_defaults(func=run_ref_stats)


def run_ref_stats(args) -> int:
    from .score import ref_stats

    info = ref_stats(Path(args.shards), Path(args.out), batch_size=args.batch_size, limit=args.max,
                     weights_dir=args.weights_dir, allow_random=args.allow_random_weights, device=args.device,
                     progress=not args.quiet)
    label = "" if info["weights_real"] else " (RANDOM Inception weights: not comparable)"
    print(f"reference statistics of {info['num']} images -> {args.out}{label}")
    return 0


# --- pixelgen score ------------------------------------------------------------------------------
def add_score(sub) -> None:
    sc = sub.add_parser("score", help="FID, sFID, IS, KID, precision/recall of samples against reference statistics",
                        description="Score a sample folder (or an ADM-format .npz) against pixelgen ref-stats or "
                                    "the ADM reference batch (VIRTUAL_imagenet256_labeled.npz). Writes metrics.json "
                                    "and logs the numbers to the training run in MLflow.")
    sc.add_argument("samples", help="a folder written by pixelgen sample, or an .npz with arr_0")
    sc.add_argument("--ref", required=True, help="ref-stats .npz or the ADM reference batch")
    sc.add_argument("--out", required=True, help="metrics.json to write")
    sc.add_argument("--mlflow-run-id", help="log to this run (default: the training run of the checkpoint)")
    sc.add_argument("--eval-run", metavar="NAME",
                    help="log to an evaluation run of its own named NAME, a child of --parent-run-id-file's run, "
                         "instead of the training run (the workflow does this for a variant that samples a run "
                         "another variant trained, or an imported release)")
    sc.add_argument("--parent-run-id-file", help="the file `pixelgen track-parent` wrote (with --eval-run)")
    sc.add_argument("--uri", help="MLflow tracking URI for --eval-run (default: MLFLOW_TRACKING_URI, else "
                                  "sqlite:///results/mlflow.db)")
    sc.add_argument("--is-splits", choices=["adm", "torch-fidelity"], default="adm",
                    help="Inception Score splits: adm = contiguous 5,000-image splits as the ADM evaluator "
                         "(default, the paper's numbers); torch-fidelity = its 10 splits")
    sc.add_argument("--pr-distance", choices=["adm", "exact"], default="adm",
                    help="precision/recall distances: adm = squared distances in float16 with a float32 fallback, "
                         "as the ADM evaluator (default); exact = float64")
    sc.add_argument("--fid-sqrt", choices=["adm", "eigh"], default="adm",
                    help="FID/sFID's tr sqrt(sigma_a sigma_b): adm = scipy's sqrtm, as the ADM evaluator (default); "
                         "eigh = the same trace from symmetric eigenvalues, 4-5x faster on a CPU (equal to 1e-10 or "
                         "better on full-rank covariances, to 1e-5 on singular ones; the test config's choice)")
    sc.add_argument("--workers", type=non_negative_int,
                    help="processes decoding the sample shards (default: one per core but one, at most 8; "
                         "0 = in this process); the images and numbers are the same for any count")
    sc.add_argument("--ref-cache", help="folder for the ADM reference batch's cached Inception features "
                                        "(default: beside --ref); a cache of another file, network or setup is "
                                        "recomputed, never reused")
    add_inception_args(sc)
    sc.set_defaults(func=run_score)


def run_score(args) -> int:
    from .score import score

    if bool(args.eval_run) != bool(args.parent_run_id_file):
        raise PixelgenError("--eval-run and --parent-run-id-file go together: name the evaluation run and the "
                            "workflow's parent run file", exit_code=2)
    eval_run = (args.eval_run, Path(args.parent_run_id_file)) if args.eval_run else None
    result = score(Path(args.samples), Path(args.ref), Path(args.out), batch_size=args.batch_size,
                   weights_dir=args.weights_dir, allow_random=args.allow_random_weights, device=args.device,
                   mlflow_run_id=args.mlflow_run_id, eval_run=eval_run, tracking_uri=args.uri,
                   progress=not args.quiet, is_mode=args.is_splits,
                   pr_distance=args.pr_distance, workers=args.workers, fid_sqrt=args.fid_sqrt,
                   ref_cache=Path(args.ref_cache) if args.ref_cache else None)
    label = "" if result["comparable"] else "  [random weights: NOT comparable to published numbers]"
    sfid = "n/a (remake the ref-stats)" if result["sfid"] is None else f"{result['sfid']:.2f}"
    print(f"FID {result['fid']:.2f}  sFID {sfid}  IS {result['inception_score']:.2f}  precision {result['precision']:.3f}  "
          f"recall {result['recall']:.3f}  KID {result['kid']:.4f}  ({result['num_samples']} samples){label}")
    return 0


# --- pixelgen import-official --------------------------------------------------------------------
def add_import_official(sub) -> None:
    io = sub.add_parser("import-official", help="convert an official PixelGen release checkpoint into a pixelgen one",
                        description="Read an official class-to-image release (PixelGen_XL_80ep.ckpt or "
                                    "PixelGen_XL_160ep.ckpt: a Lightning checkpoint), take its EMA weights, rename "
                                    "them to this project's layout and write a checkpoint that `pixelgen sample` "
                                    "reads. Its sampling section is the official one (Heun-50, shift 2, guidance "
                                    "interval (0.1, 0.9], guidance 1.0), changeable with --config/--set. The result "
                                    "is labelled comparable only for a released file whose sha256 matches the "
                                    "digest `pixelgen weights fetch` recorded.")
    io.add_argument("ckpt", help="the official checkpoint (.ckpt)")
    io.add_argument("--out", required=True, help="the pixelgen checkpoint to write")
    add_sampling_section_args(io, "the official one")
    io.set_defaults(func=run_import_official)


def run_import_official(args) -> int:
    from .official import import_official

    info = import_official(Path(args.ckpt), Path(args.out), config_file=args.config, overrides=tuple(args.overrides))
    label = "" if info["verified"] else "  [not a verified release file: results are labelled NOT comparable]"
    print(f"imported {info['size']} ({info['params'] / 1e6:.1f}M parameters, step {info['step']}) -> {args.out}; "
          f"sampling {info['sampling']}{label}")
    return 0


# --- pixelgen report -----------------------------------------------------------------------------
def add_report(sub) -> None:
    rp = sub.add_parser("report", help="results table (ours beside the paper's), plots and sample grids of a grid",
                        description="Collect a grid's metrics.json files and training logs into table.csv/.md "
                                    "(the shape of the paper's Table 1), loss_curves.png, fid_recall.png, gate_weights.png and "
                                    "samples/<variant>.png.")
    rp.add_argument("--grid", required=True, help="the grid YAML (variants, with the paper's numbers)")
    rp.add_argument("--metrics", required=True, help="folder of <variant>.json metrics")
    rp.add_argument("--runs", required=True, help="folder of <variant>/ training run dirs")
    rp.add_argument("--out", required=True, help="output folder")
    rp.add_argument("--title", help="table title")
    rp.set_defaults(func=run_report)


def run_report(args) -> int:
    from .report import build_report

    info = build_report(Path(args.grid), Path(args.metrics), Path(args.runs), Path(args.out), title=args.title)
    print(f"report of {info['rows']} variants -> {info['out']}/table.md")
    return 0


# --- pixelgen track-parent -----------------------------------------------------------------------
def add_track_parent(sub) -> None:
    tp = sub.add_parser("track-parent", help="create (once) the MLflow parent run of a workflow run",
                        description="Create the parent MLflow run that the variants of a grid nest under, and "
                                    "write its id to --out; if --out exists, reuse that run.")
    tp.add_argument("--experiment", required=True, help="experiment (the grid name)")
    tp.add_argument("--name", required=True, help="run name")
    tp.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///results/mlflow.db)")
    tp.add_argument("--out", required=True, help="file that receives the run id")
    tp.set_defaults(func=run_track_parent)


def run_track_parent(args) -> int:
    from .tracking import start_parent_run

    run_id = start_parent_run(args.experiment, args.name, args.uri, Path(args.out))
    print(f"MLflow parent run {run_id} -> {args.out}")
    return 0


# --- pixelgen finish-parent ----------------------------------------------------------------------
def add_finish_parent(sub) -> None:
    fp = sub.add_parser("finish-parent", help="end the workflow's MLflow parent run, attaching the report",
                        description="Attach a report folder (table.md, plots, summary.json) and its metrics to the "
                                    "parent run that track-parent created, and end that run.")
    fp.add_argument("--run-id-file", required=True, help="the file track-parent wrote")
    fp.add_argument("--report", help="report folder to attach")
    fp.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///results/mlflow.db)")
    fp.set_defaults(func=run_finish_parent)


def run_finish_parent(args) -> int:
    from .tracking import finish_parent

    run_id = finish_parent(Path(args.run_id_file), args.report, args.uri)
    print(f"MLflow parent run {run_id} finished with {args.report}")
    return 0


# --- pixelgen weights ----------------------------------------------------------------------------
def add_weights(sub) -> None:
    w = sub.add_parser("weights", help="fetch or check pretrained weights (VGG16, DINOv2-B, FID Inception)",
                       description="Pretrained weights live in one directory ($PIXELGEN_WEIGHTS, default "
                                   "~/.cache/pixelgen/weights) and are never downloaded at run time.")
    w.add_argument("action", choices=["fetch", "check", "init-random"],
                   help="fetch: download with checksums; check: report present/missing/corrupt/random; "
                        "init-random: write random weights in the same formats (tests, offline demos)")
    w.add_argument("--dir", help="weights directory (default: $PIXELGEN_WEIGHTS or ~/.cache/pixelgen/weights)")
    from .weights import WEIGHT_FILES  # a light module: names only

    w.add_argument("--only", action="append", choices=list(WEIGHT_FILES),
                   help="limit to one file (repeatable); the official checkpoints and the ADM reference batch "
                        "are handled only when named here")
    w.add_argument("--force", action="store_true", help="fetch: download again even if present")
    w.add_argument("--seed", type=int, default=0, help="init-random: seed")
    w.set_defaults(func=run_weights)


def run_weights(args) -> int:
    from . import weights

    directory = weights.weights_dir(args.dir)
    keys = args.only or weights.DEFAULT_KEYS
    if args.action == "fetch":
        for key, outcome in weights.fetch_missing(keys, directory, force=args.force):
            print(f"{key:10s} {outcome}")
        return 0
    if args.action == "init-random":
        for path in weights.init_random(directory, keys, seed=args.seed):
            print(f"random weights -> {path}")
        print("these are NOT the published weights: every metric made with them is marked not comparable")
        return 0
    print(f"weights directory: {directory}")
    rows, usable = weights.check_all(keys, directory)
    for key, state, detail in rows:
        print(f"{key:10s} {state:8s} {detail}")
    return 0 if usable else 1


# --- pixelgen config -----------------------------------------------------------------------------
def add_config(sub) -> None:
    c = sub.add_parser("config", help="print the resolved config (defaults + --config + --set), validated",
                       description="Resolve and validate a config (keys, types and value ranges) exactly as the jobs "
                                   "do, and print it as YAML.")
    add_config_args(c)
    c.set_defaults(func=run_config)


def run_config(args) -> int:
    import yaml

    from .config import load_config

    config = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    return 0


COMMANDS = (add_demo_data, add_shard, add_train, add_sample, add_ref_stats, add_score, add_import_official, add_report, add_track_parent, add_finish_parent, add_weights, add_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelgen",
        description="Train, sample and score pixel-space diffusion models with perceptual losses (PixelGen).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
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
