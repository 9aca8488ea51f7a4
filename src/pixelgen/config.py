"""Configuration as data: the packaged base YAML is both the defaults and the schema.

A job's config = base.yaml, then the user's `--config FILE` merged over it, then each `--set key.sub=value`.
Unknown keys, values of the wrong type and values out of range (ALLOWED, below) raise ConfigError naming the key,
before any work starts.
"""

from __future__ import annotations

import copy
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import yaml

from .errors import ConfigError, PixelgenError

# Keys whose default is null, and the type a non-null value must have.
NULLABLE_TYPES: dict[str, type | tuple[type, ...]] = {
    "model.patch_size": int,
    "model.proj_dropout": float,
    "loss.repa_block": int,
    "loss.repa_hidden": int,
    "encoders.dino_input_size": int,
    "encoders.weights_dir": str,
    "tracking.uri": str,
    "tracking.variant": str,
    "tracking.grid": str,
    "tracking.parent_run_id": str,
}


# Keys that may change between a run and its resumption without changing the trajectory (train refuses any
# other change; the workflow keeps them out of a run's key). Here, not in train.py, so that reading it (the
# workflow does, in every Snakemake process) does not import torch.
RESUMABLE_CHANGES = ("tracking.", "train.ckpt_every", "train.log_every", "train.preview_every", "train.steps",
                     "data.workers", "data.shards", "train.ddp_bucket_mb")


class RepeatedKeyError(yaml.constructor.ConstructorError):
    """A mapping that sets a key twice (`problem` names the key and both lines)."""


class ConfigLoader(yaml.SafeLoader):
    """YAML as people write numbers: PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent,
    so `1e-4`, `1E-4` or `3e-4` would be read as text and refused. Here every float spelling Python reads
    (`1e-4`, `3.e-4`, `.5`, `1_000.0`, `.inf`, `.nan`) is a float. A key set twice in one mapping (a copy-pasted
    variant, two `loss:` sections) is refused: PyYAML would keep the last silently. All other rules are PyYAML's."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._refuse_repeated_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_repeated_keys(self, node: yaml.MappingNode) -> None:
        # the mapping's own keys, before `<<` merges are flattened in: a key after `<<: *anchor` overrides the
        # anchor's on purpose
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line
            try:
                repeated = key in first_line
            except TypeError:  # an unhashable key: PyYAML refuses it itself
                continue
            if repeated:
                raise RepeatedKeyError(None, None, f"key {key!r} at line {line + 1} repeats the one at line "
                                       f"{first_line[key] + 1}: keep one (YAML would silently use the last)",
                                       key_node.start_mark)
            first_line[key] = line


FLOAT_TAG = "tag:yaml.org,2002:float"
FLOAT_PATTERN = re.compile(r"""^[-+]?(?:
      [0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?   # 1.0, 3., 3.e-4, 1_000.0
    | \.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?          # .5, .5e-3
    | [0-9][0-9_]*[eE][-+]?[0-9]+                 # 1e-4, 1E4
    | \.(?:inf|Inf|INF) | \.(?:nan|NaN|NAN))$""", re.X)
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(FLOAT_TAG, FLOAT_PATTERN, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)


def base_config() -> dict:
    """The packaged defaults (a fresh copy each call)."""
    text = resources.files("pixelgen").joinpath("configs/base.yaml").read_text()
    return parse_yaml(text)


def _as_float(key: str, value: Any) -> float:
    """A number for a float key: ints widen; non-finite values are refused (no setting means 'unlimited' by inf,
    and a nan would only surface as a non-finite loss many steps later)."""
    if not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_value(key: str, value: Any, default: Any) -> Any:
    """Return `value` if it has the default's type (ints widen to floats), else raise ConfigError."""
    if default is None:
        if value is None:
            return None
        want = NULLABLE_TYPES.get(key)
        if want is None:
            return value
        if want is float and _is_number(value):
            return _as_float(key, value)
        if want is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, want) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be null or {getattr(want, '__name__', want)}, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if _is_number(value):
            return _as_float(key, value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 4e5 steps: a whole number in exponent form
            return int(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list) and len(value) == len(default):
            return [_check_value(f"{key}[{i}]", v, d) for i, (v, d) in enumerate(zip(value, default))]
        if isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list of {len(default)} values, got {value!r}")
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return merge(default, value, prefix=key + ".")
    raise ConfigError(
        f"config key '{key}' must be {_type_name(default)} (like the default {default!r}), got {value!r}"
    )


# old name -> new name, for a refusal that says so
RENAMED_KEYS = {"sampling.cfg": "sampling.guidance", "train.sample_every": "train.preview_every",
                "train.sample_count": "train.preview_count", "train.sample_steps": "train.preview_steps"}


def merge(base: dict, override: dict, prefix: str = "") -> dict:
    """`override` merged over `base`, checking every key and type against `base`."""
    out = copy.deepcopy(base)
    if not isinstance(override, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {override!r}")
    for key, value in override.items():
        full = f"{prefix}{key}"
        if key not in base and full in RENAMED_KEYS:
            raise ConfigError(f"config key '{full}' is now '{RENAMED_KEYS[full]}'; rename it")
        if key not in base:
            known = ", ".join(sorted(base)) if isinstance(base, dict) else ""
            raise ConfigError(f"unknown config key '{full}' (known here: {known})")
        out[key] = _check_value(full, value, base[key])
    return out


# --- allowed values ----------------------------------------------------------------------------------------
# The types come from base.yaml; what a job can use of each type is here, in one table that every way a config is
# assembled goes through (check_ranges: load_config, section_over, apply_overrides, the sample job's flags), so
# the jobs, `pixelgen config` and the workflow's up-front check refuse the same values. Solver and gate names
# live here too (solvers.py and gating.py take them from here) so checking a config needs no torch.
SAMPLERS = ("euler", "heun", "dpm++2m", "exp-ab2")
GUIDANCE_SCHEDULES = ("interval", "linear", "cosine")
GATE_SCHEDULES = ("step", "sigmoid", "linear", "power", "learned")


class Allowed(NamedTuple):
    ok: Callable[[Any], bool]
    text: str  # the allowed values in words: "must be {text}"


def _at_least(low: float) -> Allowed:
    return Allowed(lambda v: v >= low, f">= {low}")


def _above(low: float) -> Allowed:
    return Allowed(lambda v: v > low, f"> {low}")


def _within(low: float, high: float, *, high_open: bool = False, why: str = "") -> Allowed:
    if high_open:
        return Allowed(lambda v: low <= v < high, f"in [{low}, {high}){why}")
    return Allowed(lambda v: low <= v <= high, f"in [{low}, {high}]{why}")


def _one_of(*names: str) -> Allowed:
    return Allowed(lambda v: v in names, f"one of {', '.join(names)}")


def _ordered_times() -> Allowed:
    return Allowed(lambda v: 0 <= v[0] < v[1] <= 1, "two times [lo, hi] with 0 <= lo < hi <= 1")


ALLOWED: dict[str, Allowed] = {
    "model.image_size": _at_least(1), "model.patch_size": _at_least(1), "model.num_classes": _at_least(1),
    "model.proj_dropout": _within(0, 1, high_open=True),
    "flow.P_std": _above(0), "flow.t_eps": _within(0, 1, high_open=True), "flow.noise_scale": _above(0),
    "flow.train_shift": _above(0),
    "loss.repa_weight": _at_least(0), "loss.repa_block": _at_least(1), "loss.repa_hidden": _at_least(1),
    "loss.lpips_weight": _at_least(0), "loss.pdino_weight": _at_least(0), "loss.pdino_layer": _at_least(1),
    "loss.gate": _within(0, 1),  # a time; step and power need < 1 (GATE_ALLOWED)
    "loss.gate_schedule": _one_of(*GATE_SCHEDULES), "loss.gate_width": _above(0),
    "loss.gate_start": _within(0, 1), "loss.gate_end": _within(0, 1), "loss.gate_power": _above(0),
    "loss.learned_weight_bins": _at_least(1), "loss.perceptual_reduction": _one_of("gated_mean", "batch_mean"),
    "loss.adaptive_weight_start": _at_least(0), "loss.adaptive_weight_every": _at_least(1),
    "encoders.dino_input_size": _at_least(1), "encoders.dino_pos_interp": _one_of("official", "timm"),
    "sampling.sampler": _one_of(*SAMPLERS), "sampling.steps": _at_least(1), "sampling.guidance": _at_least(0),
    "sampling.interval": _ordered_times(), "sampling.corrector_interval_at": _one_of("t_cur", "t_next"),
    "sampling.shift": _above(0), "sampling.precision": _one_of("fp32", "bf16"),
    "sampling.noise_device": _one_of("cpu", "cuda"), "sampling.guidance_schedule": _one_of(*GUIDANCE_SCHEDULES),
    "data.batch_size": _at_least(1), "data.workers": _at_least(0), "data.shuffle_buffer": _at_least(0),
    "train.steps": _at_least(1), "train.lr": _at_least(0), "train.weight_decay": _at_least(0),
    "train.betas": Allowed(lambda v: all(0 <= b < 1 for b in v), "two values in [0, 1)"),
    "train.grad_clip": _at_least(0),  # 0: no clipping
    "train.class_dropout": _within(0, 1), "train.ema_decay": _within(0, 1, high_open=True),
    "train.device": _one_of("auto", "cpu", "cuda"), "train.precision": _one_of("auto", "bf16", "fp32"),
    "train.ddp_bucket_mb": _above(0), "train.ckpt_every": _at_least(1), "train.log_every": _at_least(1),
    "train.preview_every": _at_least(0),  # 0: a preview at the end only
    "train.preview_count": _at_least(0),  # 0: no previews
    "train.preview_steps": _at_least(1),
}
# the step gate weighs [t >= gate] and the power gate divides by 1 - gate: at 1 neither ever runs the perceptual losses
GATE_ALLOWED = {name: _within(0, 1, high_open=True, why=f" for the {name} gate (at 1 the perceptual losses never run)")
                for name in ("step", "power")}


def _allowed(key: str, section: dict) -> Allowed | None:
    if key == "loss.gate":
        return GATE_ALLOWED.get(section.get("gate_schedule"), ALLOWED[key])
    return ALLOWED.get(key)


def check_ranges(config: dict) -> dict:
    """`config` (whole, or some of its sections) as it is, if every value with a limit is within it; else a
    one-line ConfigError naming the key, the value and what is allowed."""
    for section, values in config.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            allowed = _allowed(f"{section}.{key}", values)
            if allowed is not None and value is not None and not allowed.ok(value):
                raise ConfigError(f"config key '{section}.{key}' must be {allowed.text}, got {value!r}")
        if section == "loss" and values.get("gate_schedule") == "linear" \
                and not values["gate_start"] < values["gate_end"]:
            raise ConfigError(f"config key 'loss.gate_start' must be below loss.gate_end for the linear gate, got "
                              f"{values['gate_start']!r} and {values['gate_end']!r}")
    return config


def parse_override(item: str) -> tuple[list[str], Any]:
    """'loss.gate=0.6' -> (['loss', 'gate'], 0.6); the value is parsed as YAML, so 'null', '[0.1, 0.9]' work."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set '{item}' has an empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Apply `--set key.sub=value` items, validated like a config file, then range-check the result (whole or
    a section: load_config and section_over end here, so each refuses what the other does)."""
    for item in overrides:
        path, value = parse_override(item)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        config = merge(config, nested)
    return check_ranges(config)


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        return parse_yaml(path.read_text()) or {}
    except RepeatedKeyError as err:
        raise ConfigError(f"config file {path}: {err.problem}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Resolve a job's config: base, then the YAML file at `path` (if any), then `overrides`."""
    config = base_config()
    if path is not None:
        config = merge(config, read_config_file(path))
    return apply_overrides(config, overrides)


def section_over(config: dict, section: str, path: str | Path | None, overrides: Iterable[str]) -> dict:
    """One section of a resolved config (a checkpoint's, say) with a --config FILE's same section and
    `--set section.key=value` items over it. The file is checked whole, so a typo anywhere in it still fails;
    a --set outside the section fails too, because it would be silently ignored."""
    # keys added to base.yaml after the checkpoint was written take their defaults (the behaviour it was made with)
    result = {section: {**copy.deepcopy(base_config()[section]), **copy.deepcopy(config[section])}}
    if path is not None:
        user = read_config_file(path)
        merge(base_config(), user)  # validates the whole file
        result = merge(result, {section: user.get(section) or {}})  # only the keys the file sets
    overrides = list(overrides)
    for item in overrides:
        key = parse_override(item)[0]
        if key[0] != section:
            raise ConfigError(f"--set '{item}': only {section}.* settings apply here, "
                              f"'{'.'.join(key)}' is fixed by the checkpoint")
    return apply_overrides(result, overrides)[section]


# Keys added to base.yaml after runs, checkpoints and sample folders existed. Their defaults are the behaviour
# from before they existed, so a saved config without one is read as holding the default (with_added_keys), and
# workflow keys leave one out while it holds the default (without_added_defaults): an upgrade neither refuses a
# resume nor retrains or resamples anything that did not change.
ADDED_KEYS = ("loss.gate_schedule", "loss.gate_width", "loss.gate_start", "loss.gate_end", "loss.gate_power",
              "loss.learned_weight_bins", "train.ddp_bucket_mb", "sampling.precision", "sampling.compile",
              "sampling.noise_device", "sampling.guidance_schedule")


def with_added_keys(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened saved config with every ADDED_KEYS key it lacks at its base.yaml default."""
    base = flatten(base_config())
    return {**{k: base[k] for k in ADDED_KEYS if k not in flat}, **flat}


def without_added_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config less the ADDED_KEYS keys that hold their default (what a key digest should see)."""
    base = flatten(base_config())
    return {k: v for k, v in flat.items() if not (k in ADDED_KEYS and v == base[k])}


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; for logging params."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# A grid file (config/grids/*.yaml): `title` and named `variants`. The workflow also checks grids against
# workflow/schemas/grid.schema.yaml; these constants are the same rules for `pixelgen report` (a test keeps
# them in step with the schema).
GRID_KEYS = ("title", "variants")
VARIANT_KEYS = ("description", "set", "sample", "import", "paper")
VARIANT_SAMPLE_KEYS = ("num", "batch_size")  # how many samples, not how: sampler settings are `set: sampling.*`
PAPER_KEYS = ("fid", "sfid", "is", "prec", "rec")  # report.COLUMNS' labels, lower-cased
# a variant's name names its folders (runs, samples, report links): a plain folder name, never `.`, `..` or hidden
VARIANT_NAME = re.compile(r"^(?!shared$)[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # `shared`: the folder of shared runs


def _unknown(what: str, keys: Iterable[str], known: Iterable[str]) -> None:
    bad = [k for k in keys if k not in known]
    if bad:
        raise PixelgenError(f"{what}: unknown key '{bad[0]}' (allowed: {', '.join(known)})")


def load_grid(path: str | Path) -> dict:
    """A grid file, checked: unknown keys (a `sets:` typo, a misspelled `paper:` metric) are named, never dropped."""
    path = Path(path)
    if not path.is_file():
        raise PixelgenError(f"grid file not found: {path}")
    try:
        grid = parse_yaml(path.read_text())
    except RepeatedKeyError as err:
        raise PixelgenError(f"grid file {path}: {err.problem}") from None
    except yaml.YAMLError:
        raise PixelgenError(f"grid file {path} is not valid YAML") from None
    if not isinstance(grid, dict) or not isinstance(grid.get("variants"), dict) or not grid["variants"]:
        raise PixelgenError(f"{path} must have a 'variants' mapping (name -> overrides)")
    _unknown(str(path), grid, GRID_KEYS)
    for name, variant in grid["variants"].items():
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            raise PixelgenError(f"{path}: variant name {str(name)!r} must be letters, digits, _, . and - and not "
                                f"start with a dot, nor be 'shared' (it names the variant's folders); rename it")
        variant = {} if variant is None else variant
        where = f"{path}, variant '{name}'"
        if not isinstance(variant, dict):
            raise PixelgenError(f"{where}: must be a mapping (description, set, sample, import, paper)")
        _unknown(where, variant, VARIANT_KEYS)
        if not isinstance(variant.get("set", []), list) or not all(isinstance(s, str) for s in variant.get("set", [])):
            raise PixelgenError(f"{where}: 'set' must be a list of key.sub=value strings")
        for section, known in (("sample", VARIANT_SAMPLE_KEYS), ("paper", PAPER_KEYS)):
            value = variant.get(section) or {}
            if not isinstance(value, dict):
                raise PixelgenError(f"{where}: '{section}' must be a mapping")
            _unknown(f"{where}, {section}", value, known)
        grid["variants"][name] = variant
    return grid
