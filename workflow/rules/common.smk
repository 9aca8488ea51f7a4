# Config loading and validation: everything is checked and resolved here, before any job runs.
#
# Reruns follow the config: rules read no globals in their shell commands; every value a rule uses is one of its
# params (or an input file), so Snakemake's params trigger reruns exactly the rules a changed setting reaches.
# Paths are keyed by what determines their content where a rerun could otherwise reuse stale files:
#   shards   work/shards/<name>-<resolution>-<format>-<shard_size>/     (pixelgen shard keeps finished shards)
#   runs     work/runs/<grid>/<variant>/<run key>/   (digest of the resolved model config, less the settings a run
#            may change and still resume: pixelgen.config.RESUMABLE_CHANGES, tracking.*, sampling.*). Variants
#            whose training is the same (they differ in sampling.* or tracking.* only) share one run, named by
#            none of them: work/runs/<grid>/shared/<shared run key>/ (the run key's settings and train.steps; an
#            imported release's name), so a sampler grid trains once and samples that model each way, and
#            reordering the grid or removing a variant leaves the run where it is (SHARED, shared_run_key).
#            work/report-runs/<grid>/<variant> links each variant to its run.
#   samples  work/samples/<grid>/<variant>/<sample key>/   (digest of the checkpoint's config, sampling settings,
#            number and shard size of samples: pixelgen sample keeps finished shards)
import hashlib
import json
import os
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")


def _refuse_repeated_keys(paths):
    """Snakemake reads the config files with PyYAML, which keeps the last of a key written twice without a word:
    read each again with pixelgen's loader, which refuses it naming the key and both lines."""
    from pixelgen.config import read_config_file
    from pixelgen.errors import PixelgenError

    for path in paths:
        try:
            read_config_file(path)
        except PixelgenError as err:
            raise WorkflowError(str(err))


_refuse_repeated_keys(workflow.configfiles)
validate(config, "../schemas/config.schema.yaml")

# Rules call `pixelgen`: make the environment that runs Snakemake (e.g. .venv/bin) first on PATH, so the
# README's `.venv/bin/snakemake ...` works without activating the venv, locally and inside Slurm jobs.
# (Setting PATH, not reading a variable the workflow needs: no envvars entry.)
os.environ.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

# envvars: (Snakefile) passes these to every job, remote ones included; Snakemake refuses to start when one is
# unset, so an unset one gets the value pixelgen would use anyway (pixelgen.weights / pixelgen.tracking).
from pixelgen.tracking import DEFAULT_DB  # noqa: E402
from pixelgen.weights import WEIGHT_FILES, weights_dir  # noqa: E402

os.environ.setdefault("PIXELGEN_WEIGHTS", str(weights_dir()))
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{DEFAULT_DB.resolve()}")


def digest(obj):
    """A short, stable hash of a JSON-able value (a path key)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _load_grid(path):
    """The grid file, checked against workflow/schemas/grid.schema.yaml and by pixelgen's own loader."""
    from pixelgen.config import load_grid
    from pixelgen.errors import PixelgenError

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise WorkflowError(f"grid file {path}: {err}")
    try:
        validate(raw, "../schemas/grid.schema.yaml")
    except WorkflowError as err:
        raise WorkflowError(f"grid file {path} does not match workflow/schemas/grid.schema.yaml: {err}")
    try:
        return load_grid(Path(path))
    except PixelgenError as err:
        raise WorkflowError(str(err))


GRID_FILE = config["variants"]
VARIANTS = _load_grid(GRID_FILE)["variants"]
# Variants with `import: <release>` are official checkpoints converted by `pixelgen import-official`, not trained
IMPORTED = {name: v["import"] for name, v in VARIANTS.items() if v.get("import")}
TRAINED = [name for name in VARIANTS if name not in IMPORTED]


def names_pattern(names):
    """A wildcard constraint matching exactly these variant names (nothing when the list is empty)."""
    import re

    return "|".join(re.escape(n) for n in names) or "(?!x)x"


GRID = config["grid"]
WORK = config["work_dir"]
RESULTS = f"{config['results_dir']}/{GRID}"
DATASET = config["dataset"]
RAW = DATASET["raw"]
SHARDS = f"{WORK}/shards/{DATASET['name']}-{DATASET['resolution']}-{DATASET['format']}-{DATASET['shard_size']}"
LOGS = f"{WORK}/logs/{GRID}"
BENCH = f"{WORK}/benchmarks/{GRID}"
RUNS = f"{WORK}/runs/{GRID}"
SAMPLES = f"{WORK}/samples/{GRID}"
RES = config["resources"]
ENV = "../envs/pixelgen.yaml"


def weights_file(name):
    """A `pixelgen weights` key (its file in the weights directory) or a path, as given."""
    return str(weights_dir() / WEIGHT_FILES[name].filename) if name in WEIGHT_FILES else name


# Scoring reference: the ADM reference batch (paper configs) or Inception statistics of our own training shards
REF = weights_file(config["reference"]) if config.get("reference") else \
    f"{WORK}/ref/{DATASET['name']}-{DATASET['resolution']}.npz"


def gpus(n=1):
    """GPUs for a job that uses one when the workflow runs on GPUs (train_gpus > 0); none on CPU runs."""
    return n if config.get("train_gpus", 0) > 0 else 0


def train_launcher(nodes, gpus_per_node, resources=None, threads=1):
    """What starts `pixelgen train ...`: itself (one process), torchrun on one node, or for nodes > 1 one torchrun
    per Slurm task (`srun`, one task per node) meeting at a c10d rendezvous on the first node (pixelgen.launch).
    The step takes the job's node count (resources.nodes: N, or 1 where a test cluster squeezes the tasks onto one
    node with --set-resources train:nodes=1) and its threads per task. (The jobstep plugin runs the rule without
    the allocation's SLURM_* settings, so srun is told everything.)"""
    if nodes > 1:
        # outside an allocation srun would ask for a new one: stop with one line instead (the local executor)
        return (f": \"${{SLURM_JOB_ID:?train_nodes: {nodes} runs under Slurm only: use --profile slurm}}\" && "
                f"srun --nodes {resources.nodes} --ntasks {nodes} --cpus-per-task {threads} --kill-on-bad-exit=1 "
                f"python -m pixelgen.launch --nnodes {nodes} --nproc-per-node {max(1, gpus_per_node)} --")
    if gpus_per_node <= 1:
        return "pixelgen"
    return f"torchrun --standalone --nproc-per-node {gpus_per_node} -m pixelgen.cli"


def train_placement(nodes, gpus_per_node):
    """Slurm resources of the train job beyond memory and time. One node: `gpu` GPUs (--gpus). N nodes: an N-node
    allocation with one task per node that runs its own srun (`mpi`: the jobstep plugin then runs the rule's shell
    as is, not under `srun -n1`), and G GPUs on every node (gres is per node; tasks_per_gpu=0 keeps the plugin from
    turning `tasks` into --ntasks-per-gpu)."""
    if nodes == 1:
        return {"gpu": gpus(gpus_per_node)}
    placement = {"nodes": nodes, "tasks": nodes, "mpi": "srun"}
    if gpus_per_node > 0:
        placement.update(gres=f"gpu:{gpus_per_node}", tasks_per_gpu=0)
    return placement


def random_flag():
    return "--allow-random-weights" if config.get("allow_random_weights") else ""


def variant_overrides(name):
    """--set items of a variant: the workflow's overrides, the variant's own, then what the DAG fixes."""
    items = list(config.get("pixelgen_overrides", [])) + list(VARIANTS[name].get("set", []))
    return items + dag_overrides(name)


def dag_overrides(run_name):
    """The --set items the DAG fixes: the shards, and the MLflow names of the run (`run_name`, its run's name)."""
    items = [f"data.shards={SHARDS}", f"tracking.experiment={GRID}", f"tracking.grid={GRID}",
             f"tracking.variant={run_name}"]
    if config.get("mlflow_uri"):
        items.append(f"tracking.uri={config['mlflow_uri']}")
    return items


def _resolve_variants():
    """Resolve every variant now: a typo fails the whole run before any job, naming the variant and the key.
    Returns {variant: (checkpoint identity, sampling settings)}, and the run keys of trained variants."""
    from pixelgen.config import RESUMABLE_CHANGES, flatten, load_config, section_over, without_added_defaults
    from pixelgen.errors import PixelgenError

    resolved, run_keys = {}, {}
    sampling_items = [s for s in config.get("pixelgen_overrides", []) if s.startswith("sampling.")]
    for name, variant in VARIANTS.items():
        try:
            if name in IMPORTED:
                # an imported release samples with the official settings, then the workflow's and the variant's
                # sampling.* items (nothing else applies: nothing is trained)
                from pixelgen.official import release_sampling

                sampling = release_sampling(None, sampling_items + list(variant.get("set", [])))
                identity = {"import": IMPORTED[name], "file": weights_file(IMPORTED[name])}
                run_keys[name] = IMPORTED[name]
            else:
                cfg = load_config(config["pixelgen"], variant_overrides(name))
                if cfg["model"]["image_size"] != DATASET["resolution"]:
                    raise WorkflowError(f"variant '{name}': model.image_size {cfg['model']['image_size']} "
                                        f"differs from dataset.resolution {DATASET['resolution']}")
                flat = without_added_defaults(flatten(cfg))  # keys added since hold what runs did before them
                identity = {k: v for k, v in flat.items() if not k.startswith(("tracking.", "sampling."))}
                run_keys[name] = digest({k: v for k, v in identity.items() if not k.startswith(RESUMABLE_CHANGES)})
                sampling = cfg["sampling"]
        except PixelgenError as err:
            raise WorkflowError(f"variant '{name}' of {GRID_FILE}: {err}")
        resolved[name] = (identity, sampling)
    return resolved, run_keys


RESOLVED, RUN_KEYS = _resolve_variants()


def _shared_runs():
    """The variants that share their run with another: the same checkpoint identity (the whole resolved training
    config, resumable settings included, or the same imported release), so two variants never train in one
    folder with different settings."""
    groups = {}
    for name in VARIANTS:
        groups.setdefault(digest(RESOLVED[name][0]), []).append(name)
    return {name for names in groups.values() if len(names) > 1 for name in names}


SHARED = _shared_runs()


def shared_run_key(name):
    """The folder key of a run several variants share, from the run alone (never from which variants share it, or
    their order): an imported release's name; for training, the resolved training config less the settings that
    leave the weights alone (RESUMABLE_CHANGES but train.steps): a changed log or checkpoint interval resumes the
    run, and runs that train for different lengths never meet."""
    from pixelgen.config import RESUMABLE_CHANGES

    if name in IMPORTED:
        return IMPORTED[name]
    keep = tuple(k for k in RESUMABLE_CHANGES if k != "train.steps")
    return digest({k: v for k, v in RESOLVED[name][0].items() if not k.startswith(keep)})


def _refuse_shared_runs_that_meet():
    """Two shared runs with one folder key differ only in settings that leave the weights alone: one line."""
    first = {}
    for name in sorted(SHARED - set(IMPORTED), key=list(VARIANTS).index):
        other = first.setdefault(shared_run_key(name), name)
        if RESOLVED[other][0] != RESOLVED[name][0]:
            a, b = RESOLVED[other][0], RESOLVED[name][0]
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise WorkflowError(f"variants '{other}' and '{name}' of {GRID_FILE} train the same weights but differ "
                                f"in {', '.join(keys)}: give them the same values, so that they share one run")


_refuse_shared_runs_that_meet()
if TRAINED and not DATASET["generate_demo"] and not Path(RAW).exists():
    raise WorkflowError(f"raw dataset not found: {RAW} (run `dvc pull`, or link your ImageFolder there; "
                        f"see README, Data)")

# How many samples (the workflow's sample section, a variant's `sample:` over it); how to sample is the model
# config's `sampling` section (variant `set: sampling.*`), resolved above and passed to every sample job.
PARTS = config["sample"]["parts"]


def sample_count(name, key):
    return {**config["sample"], **VARIANTS[name].get("sample", {})}[key]


def sample_shard_size(name):
    return max(1, -(-sample_count(name, "num") // (4 * PARTS)))


def train_digest(name):
    """The resolved training config of a variant (less tracking and sampling): a param of train."""
    return digest(RESOLVED[name][0])


def _home_run_dir(name):
    """Where a variant's run goes when none exists yet: its own folder (RUNS/<variant>/<run key>), or where several
    variants share it, RUNS/shared/<shared run key>, named by no variant."""
    if name in SHARED:
        return f"{RUNS}/shared/{shared_run_key(name)}"
    return f"{RUNS}/{name}/{RUN_KEYS[name]}"


def _run_started(folder):
    return Path(folder, "checkpoints").is_dir()


def run_dir(name):
    """The run a variant samples, trained or imported once. A run that exists already with the same weights is
    kept wherever it is: the shared folder, or the own folder of a variant of the grid that trains the same way
    (a variant that trained alone before a sampler variant joined it, or the first variant of a shared run
    written before shared folders). So reordering the grid, removing a variant, editing one variant's training or
    adding a sampler variant never trains an existing model again. (Run dirs are looked up when the DAG is built.)"""
    home = _home_run_dir(name)
    if name in IMPORTED or _run_started(home):
        return home
    same = [m for m in VARIANTS if RESOLVED[m][0] == RESOLVED[name][0]]
    candidates = [f"{RUNS}/shared/{shared_run_key(name)}"] + [f"{RUNS}/{m}/{RUN_KEYS[m]}" for m in same]
    return next((folder for folder in candidates if _run_started(folder)), home)


def _run_folder_owner(name):
    """The variant whose own folder holds the variant's run, or None for a shared folder."""
    folder = run_dir(name)
    return None if folder.startswith(f"{RUNS}/shared/") else folder.split("/")[-2]


# {run dir: a variant that samples it}: the train and import rules find their run from their output's wildcards
RUN_VARIANT = {run_dir(name): name for name in reversed(list(VARIANTS))}


def run_variant(wc):
    """A variant the run of the train or import job with these wildcards (variant, runkey or release) belongs to:
    every value the rule takes from it is the same for each variant sharing the run."""
    return RUN_VARIANT[f"{RUNS}/{wc.variant}/{getattr(wc, 'runkey', None) or wc.release}"]


def run_folders(names):
    """The first level of the run dirs of these variants (a wildcard constraint of the train or import rule)."""
    return names_pattern(sorted({run_dir(name).split("/")[-2] for name in names}))


def uses_eval_run(name):
    """`pixelgen score` logs a variant's metrics to its training run when the variant trained that run alone;
    any other variant (it shares its run with others, or samples an imported release) gets an evaluation run of
    its own under the workflow's parent run, so several variants' FIDs never land as one metric of one run."""
    return not (name in TRAINED and _run_folder_owner(name) == name)


PARENT_FILE = f"{WORK}/mlflow/{GRID}.parent"


def score_options(name):
    """The score rule's options: the random-weights flag, and for a variant with an evaluation run its name and
    the parent run file. (Only that variant's command changes: a variant that trained its run keeps the command
    it always had, so finished workflows are not rescored.)"""
    options = [random_flag()]
    if config.get("fid_sqrt", "adm") != "adm":  # left out at the default: finished workflows are not rescored
        options.append(f"--fid-sqrt {config['fid_sqrt']}")
    if uses_eval_run(name):
        options += [f"--eval-run {name} --parent-run-id-file {PARENT_FILE}"]
        if config.get("mlflow_uri"):
            options.append(f"--uri {config['mlflow_uri']}")
    return " ".join(o for o in options if o)


def checkpoint(name):
    """What sampling loads: the EMA-only export next to final.pt (an imported release is EMA-only already)."""
    return f"{run_dir(name)}/checkpoints/final_ema.pt"


def sample_settings(name):
    """Everything that determines a variant's samples, passed to every sample job (params) and keying its folder."""
    identity, sampling = RESOLVED[name]
    return {"checkpoint": digest(identity), "sampling": sampling, "num": sample_count(name, "num"),
            "batch_size": sample_count(name, "batch_size"), "shard_size": sample_shard_size(name)}


def sample_dir(name):
    from pixelgen.config import without_added_defaults

    settings = sample_settings(name)
    # the batch size changes nothing in the images: not part of the key; sampling keys added since hold what
    # folders were sampled with before them while at their defaults: left out, so old folders keep their key
    sampling = without_added_defaults({f"sampling.{k}": v for k, v in settings["sampling"].items()})
    keyed = {**settings, "sampling": {k.removeprefix("sampling."): v for k, v in sampling.items()}}
    return f"{SAMPLES}/{name}/{digest({k: v for k, v in keyed.items() if k != 'batch_size'})}"


def sample_args(name):
    """The `pixelgen sample` arguments of a variant: every sampling setting explicit, so the checkpoint's own
    (possibly older) sampling section is never what decides."""
    import shlex

    s = sample_settings(name)
    sets = " ".join(f"--set {shlex.quote(f'sampling.{k}={json.dumps(v)}')}" for k, v in s["sampling"].items())
    return f"--num {s['num']} --batch-size {s['batch_size']} --shard-size {s['shard_size']} {sets}"


def train_sets(name):
    """The train job's --set items: in a variant's own folder that variant's overrides (the command it always had,
    also once other variants sample its run); in the shared folder, the same items whichever variants share it
    (shared_run_overrides)."""
    import shlex

    owner = _run_folder_owner(name)  # the command that made the folder's run, whichever variant asks
    items = shared_run_overrides(name) if owner is None else variant_overrides(owner)
    return " ".join(f"--set {shlex.quote(s)}" for s in items)


def shared_run_overrides(name):
    """--set items of a run several variants share, from the run alone: the workflow's overrides, then every
    training setting in which the run's resolved config differs from them (sorted), then what the DAG fixes, with
    `shared-<key>` as its MLflow name. A variant's own items would name it, or repeat a default one variant
    writes out and another leaves implicit: the command, a param, would change with the first variant, and
    Snakemake would train again."""
    from pixelgen.config import flatten, load_config

    base = list(config.get("pixelgen_overrides", [])) + dag_overrides(name)
    plain = flatten(load_config(config["pixelgen"], base))
    run = flatten(load_config(config["pixelgen"], variant_overrides(name)))
    differs = [f"{k}={json.dumps(v)}" for k, v in sorted(run.items())
               if not k.startswith(("tracking.", "sampling.")) and (k not in plain or plain[k] != v)]
    return list(config.get("pixelgen_overrides", [])) + differs + dag_overrides(f"shared-{shared_run_key(name)}")


def part_arg(wc):
    """scatteritem 'i-of-n' -> pixelgen's --part (i-1)/n."""
    i, n = wc.scatteritem.split("-of-")
    return f"{int(i) - 1}/{n}"


REPORT_RUNS = f"{WORK}/report-runs/{GRID}"


def report_links():
    """`pixelgen report --runs` reads <runs>/<variant>/: a folder of links to each variant's current run dir."""
    links = " && ".join(f"ln -s {os.path.relpath(run_dir(v), REPORT_RUNS)} {REPORT_RUNS}/{v}" for v in VARIANTS)
    return f"rm -rf {REPORT_RUNS} && mkdir -p {REPORT_RUNS} && {links}"
