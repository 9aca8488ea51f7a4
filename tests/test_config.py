import pytest
import yaml
from forked_cli import run_pixelgen as run_cli

from pixelgen.config import apply_overrides, base_config, flatten, load_config
from pixelgen.errors import ConfigError


def test_defaults_are_the_paper_values():
    cfg = base_config()
    assert cfg["flow"]["P_mean"] == -0.8 and cfg["flow"]["P_std"] == 0.8 and cfg["flow"]["t_eps"] == 0.05
    assert cfg["loss"]["repa_weight"] == 0.5 and cfg["loss"]["lpips_weight"] == 0.1
    assert cfg["loss"]["pdino_weight"] == 0.01 and cfg["loss"]["gate"] == 0.3 and cfg["loss"]["pdino_layer"] == 12


def test_set_overrides_nested_values_with_yaml_types():
    cfg = apply_overrides(base_config(), ["loss.gate=0.6", "model.size=B/16", "sampling.interval=[0.0, 1.0]",
                                          "encoders.random_init=true", "loss.repa_block=4"])
    assert cfg["loss"]["gate"] == 0.6 and cfg["model"]["size"] == "B/16"
    assert cfg["sampling"]["interval"] == [0.0, 1.0] and cfg["encoders"]["random_init"] is True
    assert cfg["loss"]["repa_block"] == 4


def test_int_widens_to_float_but_float_does_not_narrow():
    assert apply_overrides(base_config(), ["sampling.shift=2"])["sampling"]["shift"] == 2.0  # (loss.gate=1: refused)
    with pytest.raises(ConfigError, match="model.image_size"):
        apply_overrides(base_config(), ["model.image_size=32.5"])


@pytest.mark.parametrize("item, key", [("loss.gatee=0.1", "loss.gatee"), ("modle.size=tiny", "modle"),
                                       ("loss.gate.x=1", "loss.gate")])
def test_unknown_or_misplaced_keys_are_named(item, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(base_config(), [item])


def test_wrong_types_are_named():
    for item, key in [("loss.gate=abc", "loss.gate"), ("encoders.random_init=3", "encoders.random_init"),
                      ("model.patch_size=big", "model.patch_size"), ("sampling.interval=[0.1]", "sampling.interval")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            apply_overrides(base_config(), [item])


def test_config_file_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"loss": {"gate": 0.0, "lpips_weight": 0.2}}))
    cfg = load_config(path, ["loss.gate=0.6"])
    assert cfg["loss"]["gate"] == 0.6 and cfg["loss"]["lpips_weight"] == 0.2
    assert cfg["loss"]["pdino_weight"] == 0.01  # untouched defaults survive


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {gate: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("loss:\n  lpips_wieght: 0.1\n")
    with pytest.raises(ConfigError, match=r"loss\.lpips_wieght"):
        load_config(typo)


def test_flatten():
    flat = flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3})
    assert flat == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_cli_config_errors_exit_2_with_one_line_naming_the_key():
    result = run_cli("config", "--set", "loss.gatee=0.1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "loss.gatee" in lines[0]
    result = run_cli("config", "--set", "loss.gate=high")
    assert result.returncode == 2 and "loss.gate" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_config_prints_resolved_yaml():
    result = run_cli("config", "--set", "loss.gate=0.6")
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["loss"]["gate"] == 0.6


def _grid(tmp_path, variants):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"title": "t", "variants": variants}))
    return path


@pytest.mark.parametrize("variants, key", [({"v": {"sets": ["loss.gate=0.5"]}}, "sets"),
                                           ({"v": {"paper": {"fid": 1.0, "recall": 0.5}}}, "recall"),
                                           ({"v": {"sample": {"sampler": "heun"}}}, "sampler"),
                                           ({"v": {"set": "loss.gate=0.5"}}, "set")])
def test_grid_typos_are_named(tmp_path, variants, key):
    from pixelgen.config import load_grid
    from pixelgen.errors import PixelgenError

    with pytest.raises(PixelgenError, match=f"'{key}'"):
        load_grid(_grid(tmp_path, variants))


def test_grid_loader_lives_in_config_and_matches_the_workflow_schema(tmp_path):
    from pathlib import Path

    from pixelgen import config, report

    assert report.load_grid is config.load_grid
    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/grid.schema.yaml").read_text())
    variant = schema["properties"]["variants"]["additionalProperties"]["properties"]
    assert tuple(variant) == config.VARIANT_KEYS
    assert tuple(variant["paper"]["properties"]) == config.PAPER_KEYS
    assert tuple(variant["sample"]["properties"]) == config.VARIANT_SAMPLE_KEYS
    assert set(config.PAPER_KEYS) == {label.lower() for _, label, _ in report.COLUMNS}
    grid = config.load_grid(_grid(tmp_path, {"a": None, "b": {"set": ["loss.gate=0.5"], "paper": {"fid": 2.0}}}))
    assert grid["variants"]["a"] == {} and grid["variants"]["b"]["paper"] == {"fid": 2.0}


@pytest.mark.parametrize("old, new", [("sampling.cfg", "sampling.guidance"), ("train.sample_every", "train.preview_every")])
def test_a_renamed_key_is_refused_naming_the_new_one(old, new):
    with pytest.raises(ConfigError, match=rf"'{old}' is now '{new}'"):
        load_config(overrides=[f"{old}=2"])
    assert load_config(overrides=["sampling.guidance=2.0"])["sampling"]["guidance"] == 2.0


def test_a_config_saved_before_newer_keys_existed_resumes_and_keeps_its_workflow_key():
    import copy

    from pixelgen.config import ADDED_KEYS, flatten, without_added_defaults
    from pixelgen.train import config_differences

    current = load_config()
    saved = copy.deepcopy(current)
    for key in ADDED_KEYS:
        section, name = key.split(".")
        del saved[section][name]
    assert config_differences(saved, current) == []  # read at the defaults: the behaviour it was trained with
    changed = load_config(overrides=["loss.gate_schedule=sigmoid"])
    assert config_differences(saved, changed) == ["loss.gate_schedule"]
    # the workflow's run and sample keys digest a config less the added keys at their defaults
    assert without_added_defaults(flatten(current)) == flatten(saved)
    assert without_added_defaults(flatten(changed))["loss.gate_schedule"] == "sigmoid"
