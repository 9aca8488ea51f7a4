"""Shared by the workflow tests: a fresh-clone copy of the project, Snakemake and its dry-run plan, MLflow look-ups."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def package_writes_final_ema() -> bool:
    """Whether `pixelgen train` writes checkpoints/final_ema.pt (the EMA-only export sampling reads)."""
    import pixelgen.train

    return "final_ema" in Path(pixelgen.train.__file__).read_text()


def _stand_in_final_ema(root: Path) -> None:
    """Until the installed package exports final_ema.pt, the copy's train rule copies final.pt there (it has every
    key `pixelgen sample --ckpt` reads). Noted in the test output; gone once train writes the file itself."""
    rules = root / "workflow/rules/train.smk"
    text = rules.read_text()
    old = '--run-dir {params.run_dir} --quiet >> {log} 2>&1"'
    assert old in text
    rules.write_text(text.replace(old, old[:-1] + ' && cp {output.final} {output.ema}"'))


def project_copy(dest: Path) -> Path:
    """The files a fresh clone has (no work/, results/, .snakemake/), as a git repo for DVC."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["config", "workflow", "src", "pyproject.toml", "dvc.yaml", ".dvcignore", "README.md"]:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, dest / name)
    shutil.copytree(REPO / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    os.symlink("workflow/profiles/slurm", dest / "slurm")
    (dest / ".gitignore").write_text((REPO / ".gitignore").read_text())
    if not package_writes_final_ema():
        _stand_in_final_ema(dest)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def snakemake(cwd, *args, timeout=1800):
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def planned(root: Path, configfile: str = "config/test.yaml") -> dict[str, int]:
    """The jobs a dry run plans, per rule (Snakemake's 'Job stats' table); {} when there is nothing to do."""
    result = snakemake(root, "-n", "--cores", "2", "all", "--configfile", configfile, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    if "Nothing to be done" in out:
        return {}
    lines = out.split("Job stats:")[1].splitlines()
    jobs = {}
    for line in lines[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def edit_yaml(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


DOWNSTREAM_OF_SAMPLES = {"score": 2, "report": 1, "all": 1}


def run_grid(root: Path, grid_file: str, grid: str) -> str:
    """`snakemake all` of a grid in the test config (one sampling part per variant: fewer processes); its log."""
    result = snakemake(root, "--cores", "2", "all", "--configfile", "config/test.yaml", "--set-scatter",
                       "sample_parts=1", "--config", f"variants={grid_file}", f"grid={grid}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'results/mlflow.db'}")


def runs_by_name(client, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=500)}


def grid_sets(variant: dict) -> dict:
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in variant.get("set", []))}
