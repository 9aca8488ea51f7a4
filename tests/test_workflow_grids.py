"""The grids beyond the paper (config/grids/solvers.yaml, gate_schedule.yaml, components.yaml), end to end.

One workflow run of one sub-grid cut from the shipped grids pays for every solver and for the loss weighting
with a code path of its own in the workflow (the learned weighting: its own metrics and plot), not for every
point of the shipped sweeps: those resolve in the dry runs of test_workflow_checks.py, each gate schedule's weights
are tested in test_gating.py, and the other loss settings (P-DINO gated like LPIPS among them) in test_losses.py."""

import json

import pandas as pd
import pytest
import yaml
from workflow_helpers import (
    grid_sets,
    mlflow_client,
    project_copy,
    run_grid,
    runs_by_name,
    snakemake,
)

pytestmark = pytest.mark.slow  # end-to-end: in the full suite (CI), not in `-m "not slow"`


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return project_copy(tmp_path_factory.mktemp("grids") / "pixelgen")


def sub_grid(root, name: str, variants: dict) -> str:
    """A grid file in the copy holding these variants (in this order); its path relative to the copy."""
    path = f"config/grids/{name}.yaml"
    (root / path).write_text(yaml.safe_dump({"title": name, "variants": variants}, sort_keys=False))
    return path


def planned_rules(root, grid_file: str, grid: str) -> dict[str, int]:
    """The jobs a dry run of this grid plans, per rule (Snakemake's 'Job stats' table)."""
    dry = snakemake(root, "-n", "--cores", "2", "all", "--configfile", "config/test.yaml", "--set-scatter",
                    "sample_parts=1", "--config", f"variants={grid_file}", f"grid={grid}")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    jobs = {}
    for line in dry.stdout.split("Job stats:")[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def test_solvers_and_loss_weightings_train_sample_score_and_log_end_to_end(project):
    from pixelgen.config import flatten, load_grid
    from pixelgen.solvers import evaluations

    shipped = load_grid(project / "config/grids/solvers.yaml")["variants"]
    assert {grid_sets(v)["sampling.sampler"] for v in shipped.values()} == {"euler", "heun", "dpm++2m", "exp-ab2"}
    # the first (fewest-evaluation) variant of each solver, in the shipped order: four samplings of one model
    first = {}
    for name, variant in shipped.items():
        first.setdefault(grid_sets(variant)["sampling.sampler"], name)
    solvers = {name: shipped[name] for name in first.values()}
    weightings = {"learned": load_grid(project / "config/grids/gate_schedule.yaml")["variants"]["learned"]}
    variants = solvers | weightings
    log = run_grid(project, sub_grid(project, "grids-ci", variants), "ci-grids")
    assert log.count("rule train:") == 1 + len(weightings)  # the four solvers share one training run
    results = project / "results/ci-grids"
    metrics = {name: json.loads((results / f"metrics/{name}.json").read_text()) for name in variants}
    table = pd.read_csv(results / "table.csv").set_index("variant")
    assert all(f"| {name} †" in (results / "table.md").read_text() for name in variants)  # scored, random-weight

    # solvers: each sampled the shared model with its own solver and step count, into different images
    for name, variant in solvers.items():
        sampling, sets = metrics[name]["sampling"], grid_sets(variant)
        assert (sampling["sampler"], sampling["steps"]) == (sets["sampling.sampler"], sets["sampling.steps"])
        nfe = evaluations(sampling["sampler"], sampling["steps"])
        assert table.loc[name, "NFE"] == sampling["nfe_per_image"] == nfe == int(name.rsplit("nfe", 1)[1])
    assert len({metrics[name]["sampling"]["ckpt_digest"] for name in solvers}) == 1
    assert len({round(metrics[name]["fid"], 6) for name in solvers}) == len(solvers)
    assert (results / "fid_vs_nfe.png").stat().st_size > 10_000

    # loss weightings: each variant's settings reached a run of its own; the learned curve over t reaches
    # metrics.jsonl and the plot
    runs = project / "work/runs/ci-grids"
    trained = {p.parent: flatten(yaml.safe_load(p.read_text())) for p in runs.rglob("config.yaml")}
    assert len(trained) == 1 + len(weightings)
    for name, variant in weightings.items():
        assert sum(all(t[k] == v for k, v in grid_sets(variant).items()) for t in trained.values()) == 1, name
    [learned] = [folder for folder, t in trained.items() if t["loss.gate_schedule"] == "learned"]
    last = json.loads((learned / "metrics.jsonl").read_text().splitlines()[-1])
    assert len([k for k in last if k.startswith("gate_weight/")]) >= 10
    assert (results / "gate_weights.png").stat().st_size > 10_000

    # MLflow: the shared training run holds the training; every solver's scores are an evaluation run of its own
    # (unless it trained the run itself), linked to the training run and the workflow's parent run
    client = mlflow_client(project)
    mlruns = runs_by_name(client, "ci-grids")
    evals = {name: r for name, r in mlruns.items() if r.data.tags.get("kind") == "eval"}
    shared_train = {r.data.tags["train_run_id"] for r in evals.values()}
    assert len(shared_train) == 1 and set(evals) | {client.get_run(*shared_train).info.run_name} >= set(solvers)
    parent = mlruns["workflow-ci-grids"].info.run_id
    for name, r in evals.items():
        assert r.data.tags["mlflow.parentRunId"] == parent
        assert r.data.metrics["eval/fid"] == pytest.approx(metrics[name]["fid"])
        assert r.data.params["sampling.sampler"] == metrics[name]["sampling"]["sampler"]
    # rescoring a variant logs into its evaluation run again, not into a new run
    rescored = next(name for name in solvers if name in evals)
    (results / f"metrics/{rescored}.json").unlink()
    (results / "table.md").unlink()  # (Snakemake remakes a missing intermediate file only for a target it needs)
    run_grid(project, "config/grids/grids-ci.yaml", "ci-grids")
    experiment = client.get_experiment_by_name("ci-grids").experiment_id
    assert len(client.search_runs([experiment], max_results=500)) == len(mlruns)
    again = runs_by_name(client, "ci-grids")
    assert again[rescored].info.run_id == evals[rescored].info.run_id
    assert len(client.get_metric_history(evals[rescored].info.run_id, "eval/fid")) == 2

    # the grid reordered and its first variant removed: the shared run stays where it is (issue 20, row 1), so
    # nothing trains, samples or scores again; only the report, whose grid changed
    names = list(variants)[::-1][:-1]
    sub_grid(project, "grids-ci", {name: variants[name] for name in names})
    assert planned_rules(project, "config/grids/grids-ci.yaml", "ci-grids") == {"report": 1, "all": 1}
