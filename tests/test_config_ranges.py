"""Config values range-checked in one place (pixelgen.config): every entry point refuses the same values with one
line naming the key, the value and the allowed range; a key written twice in a YAML file is refused too."""

import pytest
import yaml
from workflow_helpers import REPO, project_copy, snakemake

from pixelgen.cli import build_parser, main
from pixelgen.config import ConfigLoader, load_config, load_grid
from pixelgen.errors import ConfigError, PixelgenError

# (--set items, the key the refusal names, the value as it names it)
OUT_OF_RANGE = [
    (["train.ckpt_every=0"], "train.ckpt_every", "0"),
    (["train.log_every=0"], "train.log_every", "0"),
    (["train.steps=0"], "train.steps", "0"),
    (["train.ema_decay=1.5"], "train.ema_decay", "1.5"),
    (["data.workers=-1"], "data.workers", "-1"),
    (["data.batch_size=0"], "data.batch_size", "0"),
    (["loss.gate=1.5"], "loss.gate", "1.5"),
    (["loss.gate=-0.5"], "loss.gate", "-0.5"),
    (["loss.gate_schedule=sigmoid", "loss.gate=3"], "loss.gate", "3"),
    (["loss.gate_width=-1"], "loss.gate_width", "-1"),
    (["sampling.steps=0"], "sampling.steps", "0"),
    (["sampling.shift=0"], "sampling.shift", "0"),
    (["sampling.interval=[0.9, 0.1]"], "sampling.interval", "[0.9, 0.1]"),
    (["sampling.sampler=huen"], "sampling.sampler", "huen"),
    (["sampling.guidance=-1"], "sampling.guidance", "-1"),
]


def one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


@pytest.mark.parametrize("items, key, value", OUT_OF_RANGE, ids=[" ".join(c[0]) for c in OUT_OF_RANGE])
def test_pixelgen_config_refuses_out_of_range_values_naming_key_value_and_range(capsys, items, key, value):
    line = one_line_error(capsys, ["config", *[a for item in items for a in ("--set", item)]])
    assert f"'{key}'" in line and value in line and "must be" in line, line


def test_values_at_their_documented_limits_and_every_shipped_setting_still_load():
    # 0 keeps its documented meaning where it has one: no mid-run previews, no preview, no clipping, lr 0 (the
    # weights as given), a step gate at 0 (no gate), data read in the main process, guidance over all of [0, 1]
    load_config(overrides=["train.preview_every=0", "train.preview_count=0", "train.grad_clip=0", "train.lr=0",
                           "data.workers=0", "loss.gate=0", "loss.adaptive_weight_start=0", "train.ema_decay=0",
                           "sampling.interval=[0.0, 1.0]", "sampling.guidance=0"])
    for config in sorted((REPO / "config/pixelgen").glob("*.yaml")):
        for grid in sorted((REPO / "config/grids").glob("*.yaml")):
            for variant in load_grid(grid)["variants"].values():
                load_config(config, variant.get("set", []))


def test_the_train_job_refuses_them_before_any_work(tmp_path, capsys):
    line = one_line_error(capsys, ["train", "--run-dir", str(tmp_path / "run"), "--quiet", "--set",
                                   "data.batch_size=0", "--set", f"data.shards={tmp_path / 'none'}"])
    assert "'data.batch_size'" in line and ">= 1" in line, line
    assert not (tmp_path / "run").exists()


def tiny_ema_checkpoint(path):
    from pixelgen.checkpoint import save_atomic
    from pixelgen.model import build_model

    config = load_config(overrides=["model.image_size=8", "model.patch_size=4", "model.num_classes=2"])
    save_atomic({"ema": {"shadow": build_model(config["model"]).state_dict()}, "config": config, "step": 1,
                 "encoders_real": False}, path)
    return path


def test_sample_flags_that_bypass_the_config_are_checked_like_it(tmp_path, capsys):
    ckpt = tiny_ema_checkpoint(tmp_path / "final_ema.pt")
    out = tmp_path / "samples"
    base = ["sample", "--ckpt", str(ckpt), "--num", "2", "--out", str(out), "--device", "cpu", "--quiet"]
    for flags, key in [(["--shift", "0"], "sampling.shift"),
                       (["--interval", "0.9", "0.1", "--guidance", "3"], "sampling.interval"),
                       (["--guidance", "-1"], "sampling.guidance"),
                       (["--set", "sampling.shift=0"], "sampling.shift")]:
        line = one_line_error(capsys, base + flags)
        assert f"'{key}'" in line and "must be" in line, (flags, line)
    assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: --steps takes whole numbers >= 1
        build_parser().parse_args(base + ["--steps", "0"])
    from pixelgen.sample_job import run_sampling

    with pytest.raises(ConfigError, match=r"'sampling\.steps'.*>= 1"):  # never silently the checkpoint's steps
        run_sampling(ckpt, 2, out, steps=0, device="cpu", progress=False)
    assert not out.exists()


def test_a_key_twice_in_a_yaml_file_is_refused_naming_the_key_and_its_line(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("loss:\n  gate: 0.3\ntrain:\n  steps: 4\nloss:\n  lpips_weight: 0\n")
    with pytest.raises(ConfigError, match=r"'loss'.*line 5.*line 1"):
        load_config(config)
    config.write_text("loss:\n  gate: 0.3\n  gate: 0.5\n")
    line = one_line_error(capsys, ["config", "--config", str(config)])
    assert "'gate'" in line and "line 3" in line, line
    grid = tmp_path / "grid.yaml"
    grid.write_text("variants:\n  baseline:\n    set: []\n  pixelgen:\n    set: []\n"
                    "  baseline:\n    set: [loss.gate=0.5]\n")
    with pytest.raises(PixelgenError, match=r"'baseline'.*line 6"):
        load_grid(grid)
    # a YAML merge key (<<) followed by an own value is an override, not a repeated key
    config.write_text("common: &c {gate: 0.3, lpips_weight: 0.1}\nloss:\n  <<: *c\n  gate: 0.5\n")
    assert yaml.load(config.read_text(), Loader=ConfigLoader)["loss"] == {"gate": 0.5, "lpips_weight": 0.1}


def test_bad_variant_settings_and_repeated_keys_stop_the_workflow_before_any_job(tmp_path):
    """Each variant's sampling and loss settings are range-checked in the up-front resolution (a dry run), and the
    workflow config file itself is read with the same repeated-key check."""
    root = project_copy(tmp_path / "p")
    config = yaml.safe_load((root / "config/test.yaml").read_text())
    (root / "config/bad.yaml").write_text(yaml.safe_dump({**config, "variants": "config/grids/bad.yaml"}))
    for name, item, key in [("typo-solver", "sampling.sampler=huen", "sampling.sampler"),
                            ("no-steps", "sampling.steps=0", "sampling.steps"),
                            ("never-gated", "loss.gate=1.5", "loss.gate")]:
        grid = {"variants": {"fine": {"set": []}, name: {"set": [item]}}}
        (root / "config/grids/bad.yaml").write_text(yaml.safe_dump(grid))
        result = snakemake(root, "-n", "--cores", "1", "all", "--configfile", "config/bad.yaml")
        output = result.stdout + result.stderr
        assert result.returncode != 0 and f"variant '{name}'" in output and f"'{key}'" in output, output[-2000:]
        assert not (root / "work").exists()
    text = (root / "config/test.yaml").read_text()
    (root / "config/twice.yaml").write_text(text + "grid: ci-again\n")
    result = snakemake(root, "-n", "--cores", "1", "all", "--configfile", "config/twice.yaml")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "'grid'" in output and "config/twice.yaml" in output, output[-2000:]
    assert not (root / "work").exists()


def test_sample_help_says_image_i_has_class_i_mod_c(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "class i % C" in text and "%%" not in text


def test_the_allowed_names_are_the_ones_the_code_runs():
    from pixelgen.config import ALLOWED
    from pixelgen.encoders import POS_INTERP
    from pixelgen.sampling_engine import NOISE_DEVICES, PRECISIONS

    for key, names in [("sampling.precision", PRECISIONS), ("sampling.noise_device", NOISE_DEVICES),
                       ("encoders.dino_pos_interp", POS_INTERP)]:
        assert all(ALLOWED[key].ok(name) for name in names) and not ALLOWED[key].ok("other"), key
