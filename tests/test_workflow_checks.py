"""The workflow's up-front checks: schemas, grids, lint, rule conventions (dry runs, no jobs)."""


import yaml

from workflow_helpers import (REPO, project_copy, snakemake)


def test_typo_in_workflow_config_fails_before_any_job(tmp_path):
    root = project_copy(tmp_path / "p")
    config = yaml.safe_load((root / "config/test.yaml").read_text())
    config["sample"]["nmu"] = 3
    (root / "config/typo.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(root, "-n", "--cores", "1", "all", "--configfile", "config/typo.yaml")
    assert result.returncode != 0 and "nmu" in result.stdout + result.stderr
    assert not (root / "work").exists()


def test_typo_in_a_variant_fails_before_any_job_naming_variant_and_key(tmp_path):
    root = project_copy(tmp_path / "p")
    grid = {"variants": {"broken": {"set": ["loss.gatee=0.2"]}}}
    (root / "config/grids/broken.yaml").write_text(yaml.safe_dump(grid))
    config = yaml.safe_load((root / "config/test.yaml").read_text())
    config["variants"] = "config/grids/broken.yaml"
    (root / "config/broken.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(root, "-n", "--cores", "1", "all", "--configfile", "config/broken.yaml")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "broken" in output and "loss.gatee" in output


def test_typo_in_a_grid_fails_before_any_job_naming_the_key(tmp_path):
    root = project_copy(tmp_path / "p")
    config = yaml.safe_load((root / "config/test.yaml").read_text())
    for bad, key in [({"v": {"sets": ["loss.gate=0.5"]}}, "sets"),
                     ({"v": {"set": [], "paper": {"fid": 7.5, "recall": 0.6}}}, "recall"),
                     ({"v": {"sample": {"sampler": "heun"}}}, "sampler")]:
        (root / "config/grids/bad.yaml").write_text(yaml.safe_dump({"variants": bad}))
        (root / "config/bad.yaml").write_text(yaml.safe_dump({**config, "variants": "config/grids/bad.yaml"}))
        result = snakemake(root, "-n", "--cores", "1", "all", "--configfile", "config/bad.yaml")
        output = result.stdout + result.stderr
        assert result.returncode != 0 and f"'{key}'" in output and "grid" in output, output[-2000:]
        assert not (root / "work").exists()


def test_lint_is_clean():
    result = snakemake(REPO, "--lint", timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Congratulations, your workflow is in a good condition" in output, output


def test_every_grid_and_config_resolves():
    """Each shipped workflow config with each grid it names dry-runs (schemas, variants, sampling settings)."""
    from pixelgen.config import load_grid

    for grid in sorted((REPO / "config/grids").glob("*.yaml")):
        assert load_grid(grid)["variants"]
    result = snakemake(REPO, "-n", "--cores", "1", "all", "--configfile", "config/test.yaml", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_rule_has_a_log_and_calls_pixelgen():
    rules = (REPO / "workflow/rules").glob("*.smk")
    text = "\n" + "\n".join(p.read_text() for p in rules)
    blocks = [b for b in text.split("\nrule ")[1:]] + [b for b in text.split("\n    rule ")[1:]]
    assert len(blocks) >= 9
    for block in blocks:
        name = block.split(":")[0]
        assert "log:" in block, name
        shell = block.split("shell:")[1]
        assert "pixelgen" in shell or "{params.launcher}" in shell, name  # launcher: pixelgen, or torchrun of it
        assert "conda:" in block and "ENV" in block.split("conda:")[1], name  # workflow/envs/pixelgen.yaml
        if name in ("train", "sample_part", "score", "ref_stats"):
            assert "benchmark:" in block, name


def test_the_rule_environment_installs_this_project():
    # `--software-deployment-method conda` builds workflow/envs/pixelgen.yaml; conda runs its pip section from
    # the file's folder, so `-e ../..` must be this project (conda itself is not installable here to run it)
    env = yaml.safe_load((REPO / "workflow/envs/pixelgen.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    target = (REPO / "workflow/envs" / pip[0].split()[-1]).resolve()
    assert pip[0].startswith("-e ") and target == REPO.resolve()
    assert 'name = "pixelgen"' in (target / "pyproject.toml").read_text()
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])
