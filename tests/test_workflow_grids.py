"""The grids beyond the paper (config/grids/solvers.yaml, gate_schedule.yaml, components.yaml), end to end.

One fresh project copy serves both tests (the demo data, shards and reference statistics are made once). Each
test runs a sub-grid cut from the shipped grid, one variant per distinct code path, so the suite pays for every
solver and every loss weighting once, not for every point of the shipped sweeps (those resolve in the dry runs of
test_workflow_checks.py)."""

import json

import pandas as pd
import pytest
import yaml

from workflow_helpers import grid_sets, mlflow_client, project_copy, run_grid, runs_by_name, snakemake


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return project_copy(tmp_path_factory.mktemp("grids") / "pixelgen")


def sub_grid(root, name: str, variants: dict) -> str:
    """A grid file in the copy holding these variants (in this order); its path relative to the copy."""
    path = f"config/grids/{name}.yaml"
    (root / path).write_text(yaml.safe_dump({"title": name, "variants": variants}, sort_keys=False))
    return path


def test_solvers_grid_trains_once_and_scores_every_solver_in_its_own_mlflow_run(project):
    from pixelgen.config import load_grid
    from pixelgen.solvers import evaluations

    shipped = load_grid(project / "config/grids/solvers.yaml")["variants"]
    assert {grid_sets(v)["sampling.sampler"] for v in shipped.values()} == {"euler", "heun", "dpm++2m", "exp-ab2"}
    # the first (fewest-evaluation) variant of each solver, in the shipped order
    first = {}
    for name, variant in shipped.items():
        first.setdefault(grid_sets(variant)["sampling.sampler"], name)
    variants = {name: shipped[name] for name in first.values()}
    log = run_grid(project, sub_grid(project, "solvers-ci", variants), "ci-solvers")
    assert log.count("rule train:") == 1  # four sampling variants, one trained model
    results = project / "results/ci-solvers"
    metrics = {name: json.loads((results / f"metrics/{name}.json").read_text()) for name in variants}
    table = pd.read_csv(results / "table.csv").set_index("variant")
    for name, variant in variants.items():
        sampling, sets = metrics[name]["sampling"], grid_sets(variant)
        assert (sampling["sampler"], sampling["steps"]) == (sets["sampling.sampler"], sets["sampling.steps"])
        nfe = evaluations(sampling["sampler"], sampling["steps"])
        assert table.loc[name, "NFE"] == sampling["nfe_per_image"] == nfe == int(name.rsplit("nfe", 1)[1])
    assert len({m["sampling"]["ckpt_digest"] for m in metrics.values()}) == 1  # every variant sampled one model
    assert len({round(m["fid"], 6) for m in metrics.values()}) == len(variants)  # ... into different images
    assert (results / "fid_vs_nfe.png").stat().st_size > 10_000
    # MLflow: the shared training run holds the training; every variant's scores are an evaluation run of its own
    # unless it trained the run itself
    client = mlflow_client(project)
    runs = runs_by_name(client, "ci-solvers")
    evals = {name: r for name, r in runs.items() if r.data.tags.get("kind") == "eval"}
    trained = [r for r in runs.values() if r.data.tags.get("kind") != "eval" and not r.info.run_name.startswith("workflow-")]
    assert len(trained) == 1
    train_id = trained[0].info.run_id
    assert set(evals) | {trained[0].info.run_name} >= set(variants)
    parent = runs["workflow-ci-solvers"].info.run_id
    for name, r in evals.items():
        assert r.data.tags["train_run_id"] == train_id and r.data.tags["mlflow.parentRunId"] == parent
        assert r.data.metrics["eval/fid"] == pytest.approx(metrics[name]["fid"])
        assert r.data.params["sampling.sampler"] == metrics[name]["sampling"]["sampler"]
    # rescoring a variant logs into its evaluation run again, not into a new run
    rescored = next(name for name in variants if name in evals)
    (results / f"metrics/{rescored}.json").unlink()
    (results / "table.md").unlink()  # (Snakemake remakes a missing intermediate file only for a target it needs)
    run_grid(project, "config/grids/solvers-ci.yaml", "ci-solvers")
    experiment = client.get_experiment_by_name("ci-solvers").experiment_id
    assert len(client.search_runs([experiment], max_results=500)) == len(runs)
    again = runs_by_name(client, "ci-solvers")
    assert again[rescored].info.run_id == evals[rescored].info.run_id
    assert len(client.get_metric_history(evals[rescored].info.run_id, "eval/fid")) == 2
    # the grid reordered and its first variant removed: the shared run stays where it is (issue 20, row 1), so
    # nothing trains, samples or scores again; only the report, whose grid changed
    names = list(variants)[::-1][:-1]
    sub_grid(project, "solvers-ci", {name: variants[name] for name in names})
    dry = snakemake(project, "-n", "--cores", "2", "all", "--configfile", "config/test.yaml", "--set-scatter",
                    "sample_parts=1", "--config", "variants=config/grids/solvers-ci.yaml", "grid=ci-solvers")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    plan = dry.stdout.split("Job stats:")[1]
    assert {line.split()[0] for line in plan.splitlines()[3:] if len(line.split()) == 2} == {"report", "all", "total"}


def test_loss_weighting_grids_train_every_variant_end_to_end(project):
    """Every gate schedule (gate_schedule.yaml) and the component ablation's distinct loss paths (one perceptual
    term alone, ungated, and P-DINO gated like LPIPS: components.yaml) in one workflow run."""
    from pixelgen.config import flatten, load_grid

    schedules = load_grid(project / "config/grids/gate_schedule.yaml")["variants"]
    components = load_grid(project / "config/grids/components.yaml")["variants"]
    variants = {**schedules, **{name: components[name] for name in ("lpips_nogate", "pdino_gate0.3")}}
    log = run_grid(project, sub_grid(project, "weighting-ci", variants), "ci-weighting")
    assert log.count("rule train:") == len(variants)
    runs = project / "work/runs/ci-weighting"
    trained = [flatten(yaml.safe_load(path.read_text())) for path in runs.rglob("config.yaml")]
    assert len(trained) == len(variants)
    for name, variant in variants.items():  # each variant's settings reached a run of its own
        assert sum(all(t[k] == v for k, v in grid_sets(variant).items()) for t in trained) >= 1, name
    results = project / "results/ci-weighting"
    table = (results / "table.md").read_text()
    assert all(f"| {name} †" in table for name in variants)  # every row scored, labelled random-weight
    assert (results / "gate_weights.png").stat().st_size > 10_000
    # the learned weighting's curve over t reaches metrics.jsonl (and the plot)
    [learned] = [p.parent for p in runs.rglob("config.yaml")
                 if flatten(yaml.safe_load(p.read_text()))["loss.gate_schedule"] == "learned"]
    last = json.loads((learned / "metrics.jsonl").read_text().splitlines()[-1])
    assert len([k for k in last if k.startswith("gate_weight/")]) >= 10
