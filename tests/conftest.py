import os

# The suite runs in two xdist workers on two cores, and many tests start pixelgen/snakemake processes: one torch
# thread per process (set before torch loads, inherited by every child), or the processes fight over the cores and
# small jobs get many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


# The longest files first. `-n 2 --dist loadfile` deals whole files to whichever worker is free, in collection
# order: a long file dealt last runs alone while the other core idles (longest-processing-time-first is the
# classic fix). Order from CI's --durations; files not named keep their order after these.
LONGEST_FILES_FIRST = [
    "test_workflow.py", "test_sample_score.py", "test_workflow_grids.py", "test_multinode.py", "test_dvc.py",
    "test_workflow_official.py", "test_train.py", "test_faults_training.py", "test_faults_sampling.py",
    "test_score_fast.py", "test_train_sync.py", "test_bench_gpu.py", "test_gating.py",
]


def pytest_configure(config):
    # xdist otherwise re-sorts the files by their number of tests, which deals the one-test end-to-end files
    # (the grid run, `dvc repro`) last: one of them then runs alone at the end
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: tests keep their file order


@pytest.fixture(scope="session")
def random_weights_dir(tmp_path_factory):
    """A weights directory holding randomly initialised VGG16 and DINOv2-B in the real files' formats."""
    from pixelgen import weights

    directory = tmp_path_factory.mktemp("weights")
    weights.init_random(directory, ["vgg16", "dinov2-b"], seed=0)
    return directory


@pytest.fixture(autouse=True)
def _isolate_weights_env(monkeypatch, tmp_path):
    # no test may read the user's real weights cache by accident
    monkeypatch.setenv("PIXELGEN_WEIGHTS", str(tmp_path / "no-weights-here"))
    torch.manual_seed(0)


def small_config(**sections):
    """A test config: random encoders and a cheap DINO input, overridable per section."""
    from pixelgen.config import load_config

    overrides = ["encoders.random_init=true"]
    for section, values in sections.items():
        overrides += [f"{section}.{k}={v}" for k, v in values.items()]
    return load_config(overrides=overrides)
