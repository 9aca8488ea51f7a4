"""Runs several variants share, and variant names, as the workflow plans them: common.smk's functions called for a
grid in-process (fast), and `snakemake -n` on a project copy for what the DAG really does."""

import os
import re

import pytest
import yaml

from workflow_helpers import REPO, project_copy, snakemake

# a, b and d differ in sampling only: one training run; c trains differently (its own run)
GRID = {"a": {"set": ["sampling.steps=3"]}, "b": {"set": ["sampling.sampler=heun"]},
        "c": {"set": ["loss.gate=0.5"]}, "d": {"set": ["sampling.steps=2", "loss.gate=0.3"]}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return project_copy(tmp_path_factory.mktemp("sharing") / "pixelgen")


def workflow_functions(monkeypatch, tmp_path, variants: dict) -> dict:
    """common.smk's namespace (run_dir, the train rule's params, ...) for config/test.yaml with this grid, as
    Snakemake builds it (the config checked against its schema here; the dry-run tests check the schemas)."""
    from types import SimpleNamespace

    from snakemake.utils import validate

    grid_file = tmp_path / f"grid-{len(list(tmp_path.glob('grid-*')))}.yaml"
    grid_file.write_text(yaml.safe_dump({"variants": variants}, sort_keys=False))
    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    config.update(variants=str(grid_file), pixelgen=str(REPO / config["pixelgen"]), grid="s")
    validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))  # (and sets the schema's defaults)
    for name in ("PATH", "PIXELGEN_WEIGHTS", "MLFLOW_TRACKING_URI"):  # common.smk sets them for the jobs
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    workflow = SimpleNamespace(configfiles=[], modifier=SimpleNamespace(skip_validation=True))
    namespace = {"config": config, "workflow": workflow}
    exec(compile((REPO / "workflow/rules/common.smk").read_text(), "common.smk", "exec"), namespace)
    return namespace


def train_params(common: dict, variant: str) -> tuple:
    """What the train rule of the variant's run passes (its params: config digest, --set items, run dir), looked
    up as the rule does, from the run dir's wildcards."""
    from types import SimpleNamespace

    owner, runkey = common["run_dir"](variant).split("/")[-2:]
    wc = SimpleNamespace(variant=owner, runkey=runkey)
    member = common["run_variant"](wc)
    return common["train_digest"](member), common["train_sets"](member), common["run_dir"](member)


def orderings(grid: dict) -> dict[str, dict]:
    """The grid as written, reversed, without its first variant, and with the first variant's training edited."""
    names = list(grid)
    return {"as written": grid, "reversed": {n: grid[n] for n in reversed(names)},
            "first removed": {n: grid[n] for n in names[1:]},
            "first's training edited": {**grid, names[0]: {"set": ["loss.gate=0.6"]}}}


def test_a_shared_run_stays_put_when_its_variants_are_reordered_removed_or_edited(monkeypatch, tmp_path):
    grids = {label: workflow_functions(monkeypatch, tmp_path, grid) for label, grid in orderings(GRID).items()}
    assert {label: common["run_dir"]("b") for label, common in grids.items()} == \
        dict.fromkeys(grids, grids["as written"]["run_dir"]("b"))
    seen = {}
    for label, common in grids.items():
        seen[label] = {v: train_params(common, v) for v in common["VARIANTS"]}
        assert common["run_dir"]("c") == "work/runs/s/c/" + common["RUN_KEYS"]["c"]  # trains alone: as before
    shared = seen["as written"]["b"]
    assert shared == seen["as written"]["a"] == seen["as written"]["d"]  # one run, one train job
    assert "/a/" not in shared[2] and "tracking.variant=a" not in shared[1]  # named by no variant
    for label, params in seen.items():
        for variant in set(params) & {"b", "d"}:  # the run's folder and the train job's params never move
            assert params[variant] == shared, (label, variant)
        assert params["c"] == seen["as written"]["c"], label
    # the shared run's --set items resolve to the training config every variant of it resolves to
    common = grids["as written"]
    from pixelgen.config import flatten, load_config, without_added_defaults

    sets = [s.strip("'") for s in re.findall(r"--set ('[^']*'|\S+)", shared[1])]
    run = without_added_defaults(flatten(load_config(common["config"]["pixelgen"], sets)))
    assert {k: v for k, v in run.items() if not k.startswith(("tracking.", "sampling."))} == common["RESOLVED"]["a"][0]


def test_an_existing_run_is_kept_where_it_is_when_variants_join_or_leave_it(monkeypatch, tmp_path):
    """A run trained alone, then a sampler variant added beside it; a shared run, then all but one of its variants
    removed: the existing run is sampled where it is, by the same train command (no retraining)."""
    monkeypatch.chdir(tmp_path)  # the run dirs are relative to the working directory, as in a project
    alone = {"a": {"set": ["sampling.steps=3"]}}
    before = workflow_functions(monkeypatch, tmp_path, alone)
    (tmp_path / before["run_dir"]("a") / "checkpoints").mkdir(parents=True)
    joined = workflow_functions(monkeypatch, tmp_path, {**alone, "b": {"set": ["sampling.sampler=heun"]}})
    assert joined["run_dir"]("a") == joined["run_dir"]("b") == before["run_dir"]("a")
    assert train_params(joined, "b") == train_params(before, "a")  # the command that trained it: nothing reruns
    assert not joined["uses_eval_run"]("a") and joined["uses_eval_run"]("b")  # a trained it: its MLflow run
    pair = {"c": {"set": ["loss.gate=0.5"]}, "d": {"set": ["loss.gate=0.5", "sampling.steps=2"]}}
    shared = workflow_functions(monkeypatch, tmp_path, pair)
    assert "/shared/" in shared["run_dir"]("d")
    (tmp_path / shared["run_dir"]("d") / "checkpoints").mkdir(parents=True)
    left = workflow_functions(monkeypatch, tmp_path, {"d": pair["d"]})
    assert left["run_dir"]("d") == shared["run_dir"]("d") and train_params(left, "d") == train_params(shared, "d")


def test_variants_of_a_shared_run_score_into_evaluation_runs_and_link_to_it(monkeypatch, tmp_path):
    common = workflow_functions(monkeypatch, tmp_path, GRID)
    assert {v for v in GRID if common["uses_eval_run"](v)} == {"a", "b", "d"}  # c logs into its training run
    assert {common["checkpoint"](v) for v in "abd"} == {common["run_dir"]("a") + "/checkpoints/final_ema.pt"}
    assert len({common["sample_dir"](v) for v in GRID}) == 4  # a sample folder per variant, as before
    links = common["report_links"]()
    for v in GRID:
        assert f"{os.path.relpath(common['run_dir'](v), common['REPORT_RUNS'])} {common['REPORT_RUNS']}/{v}" in links


def test_shared_runs_that_train_the_same_weights_in_two_ways_are_refused(monkeypatch, tmp_path):
    from snakemake.exceptions import WorkflowError

    steps = {"x": {"set": ["sampling.steps=3"]}, "y": {"set": ["sampling.steps=5"]}}
    longer = {f"{n}8": {"set": v["set"] + ["train.steps=8"]} for n, v in steps.items()}
    common = workflow_functions(monkeypatch, tmp_path, {**steps, **longer})  # another length: another run
    assert len({common["run_dir"](v) for v in common["VARIANTS"]}) == 2
    logged = {f"{n}l": {"set": v["set"] + ["train.log_every=1"]} for n, v in steps.items()}
    with pytest.raises(WorkflowError, match="variants 'x' and 'xl' .* differ in train.log_every"):
        workflow_functions(monkeypatch, tmp_path, {**steps, **logged})


def planned_train_dirs(root, grid: dict, name: str) -> set[str]:
    """The run dirs of the train jobs a dry run of this grid plans."""
    (root / f"config/grids/{name}.yaml").write_text(yaml.safe_dump({"variants": grid}, sort_keys=False))
    result = snakemake(root, "-n", "--cores", "2", "all", "--configfile", "config/test.yaml",
                       "--config", f"variants=config/grids/{name}.yaml", "grid=s", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = (result.stdout + result.stderr).split("rule ")
    return {re.search(r"output: (\S+)/checkpoints/final.pt", job)[1] for job in jobs if job.startswith("train:")}


def test_the_dag_trains_a_shared_run_where_any_order_of_its_grid_puts_it(project, monkeypatch, tmp_path):
    reordered = {n: GRID[n] for n in ["d", "c", "b"]}  # reversed, a removed
    common = workflow_functions(monkeypatch, tmp_path, GRID)
    assert planned_train_dirs(project, reordered, "reordered") == {common["run_dir"](v) for v in ("a", "c")}


# --- variant names name folders: none may leave the grid's folder ---


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "shared"])
def test_load_grid_refuses_a_variant_name_that_is_not_a_plain_folder_name(tmp_path, name):
    from pixelgen.config import VARIANT_NAME, load_grid
    from pixelgen.errors import PixelgenError

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"variants": {"ok": {}, name: {"set": ["loss.gate=0.5"]}}}))
    with pytest.raises(PixelgenError, match=re.escape(f"variant name '{name}'")):
        load_grid(grid)
    schema = yaml.safe_load((REPO / "workflow/schemas/grid.schema.yaml").read_text())
    assert schema["properties"]["variants"]["propertyNames"]["pattern"] == VARIANT_NAME.pattern  # one rule


def test_the_workflow_refuses_a_variant_named_dot_dot(project):
    (project / "config/grids/dots.yaml").write_text(yaml.safe_dump({"variants": {"..": {"set": ["loss.gate=0.5"]}}}))
    result = snakemake(project, "-n", "--cores", "2", "all", "--configfile", "config/test.yaml",
                       "--config", "variants=config/grids/dots.yaml", "grid=dots", timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "grid.schema.yaml" in out and "'..'" in out, out[-3000:]
    assert not (project / "work/runs").exists()


# --- end to end: for a finished run (tests/test_workflow.py's `finished` fixture) ---
