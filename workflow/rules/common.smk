# Config loading and validation: everything is checked here, before any job runs.
import os
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

validate(config, "../schemas/config.schema.yaml")

# Rules call `pixelgen`: make the environment that runs Snakemake (e.g. .venv/bin) first on PATH, so the
# README's `.venv/bin/snakemake ...` works without activating the venv, locally and inside Slurm jobs.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _load_variants(path):
    from pixelgen.errors import PixelgenError
    from pixelgen.report import load_grid

    try:
        return load_grid(Path(path))["variants"]
    except PixelgenError as err:
        raise WorkflowError(str(err))


VARIANTS = _load_variants(config["variants"])
# Variants with `import: <release>` are official checkpoints converted by `pixelgen import-official`, not trained
IMPORTED = {name: v["import"] for name, v in VARIANTS.items() if isinstance(v, dict) and v.get("import")}
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
SHARDS = f"{WORK}/shards/{DATASET['name']}-{DATASET['resolution']}"


def weights_file(name):
    """A `pixelgen weights` key (its file in the weights directory) or a path, as given."""
    from pixelgen.weights import WEIGHT_FILES, weights_dir

    return str(weights_dir() / WEIGHT_FILES[name].filename) if name in WEIGHT_FILES else name


# Scoring reference: the ADM reference batch (paper configs) or Inception statistics of our own training shards
REF = weights_file(config["reference"]) if config.get("reference") else \
    f"{WORK}/ref/{DATASET['name']}-{DATASET['resolution']}.npz"
LOGS = f"{WORK}/logs/{GRID}"
RUNS = f"{WORK}/runs/{GRID}"
SAMPLES = f"{WORK}/samples/{GRID}"
RES = config["resources"]


def variant_overrides(name):
    """--set items of a variant: the workflow's overrides, the variant's own, then what the DAG fixes."""
    variant = VARIANTS[name] or {}
    items = list(config.get("pixelgen_overrides", [])) + list(variant.get("set", []))
    items += [f"data.shards={SHARDS}", f"tracking.experiment={GRID}", f"tracking.grid={GRID}",
              f"tracking.variant={name}"]
    if config.get("mlflow_uri"):
        items.append(f"tracking.uri={config['mlflow_uri']}")
    return items


def _check_variants():
    """Resolve every variant's pixelgen config now: a typo fails the whole run before any job, naming the key."""
    from pixelgen.config import load_config
    from pixelgen.errors import PixelgenError

    for name in TRAINED:
        try:
            resolved = load_config(config["pixelgen"], variant_overrides(name))
        except PixelgenError as err:
            raise WorkflowError(f"variant '{name}' of {config['variants']}: {err}")
        if resolved["model"]["image_size"] != DATASET["resolution"]:
            raise WorkflowError(f"variant '{name}': model.image_size {resolved['model']['image_size']} differs "
                                f"from dataset.resolution {DATASET['resolution']}")


_check_variants()
if TRAINED and not DATASET["generate_demo"] and not Path(RAW).exists():
    raise WorkflowError(f"raw dataset not found: {RAW} (run `dvc pull`, or link your ImageFolder there; "
                        f"see README, Data)")


def sets(name):
    return " ".join(f"--set {shlex.quote(s)}" for s in variant_overrides(name))


def sample_setting(name, key):
    variant = VARIANTS[name] or {}
    return {**config["sample"], **variant.get("sample", {})}[key]


def random_flag():
    return "--allow-random-weights" if config.get("allow_random_weights") else ""
