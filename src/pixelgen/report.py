"""`pixelgen report`: a grid's results as a table in the shape of the paper's Table 1 (ours beside the paper's),
plots (loss terms vs step per variant; FID vs recall across variants) and a sample grid per variant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from .config import load_grid
from .errors import PixelgenError

# (metrics.json key, column label, decimals); a grid's `paper:` numbers use the lower-cased label as key
COLUMNS = [("fid", "FID", 2), ("sfid", "sFID", 2), ("inception_score", "IS", 1), ("precision", "Prec", 2),
           ("recall", "Rec", 2)]


def read_metrics_log(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return pd.DataFrame()
    frame = pd.read_json(path, lines=True)
    # a resumed run re-logs the steps after its last checkpoint: keep the latest record of each step
    return frame.drop_duplicates("step", keep="last").sort_values("step")


def sampler_and_nfe(sampling: dict) -> tuple[str | None, int | None]:
    """The sampler of a metrics.json and its model evaluations per image (at guidance 1; metrics written before
    `nfe_per_image` was recorded get it from the sampler and its steps)."""
    from .solvers import evaluations

    if "sampler" not in sampling:
        return None, None
    return sampling["sampler"], sampling.get("nfe_per_image", evaluations(sampling["sampler"], sampling["steps"]))


def read_scores(path: Path) -> dict:
    """A variant's metrics.json, or a one-line error naming it: a row is never blank or made of a file that is
    not `pixelgen score`'s (empty, truncated by a full disk, another tool's)."""
    fix = f"score the variant again (`pixelgen score ... --out {path}`)"
    try:
        scores = json.loads(path.read_text())
    except OSError as err:  # a folder under the name, no permission
        raise PixelgenError(f"cannot read the metrics file {path} ({err.strerror or err}); {fix}") from None
    except ValueError as err:  # empty, truncated, not text (JSONDecodeError and UnicodeDecodeError alike)
        raise PixelgenError(f"{path} is not a metrics file of `pixelgen score` (empty or not JSON: "
                            f"{str(err)[:80]}); {fix}") from None
    if not isinstance(scores, dict) or "fid" not in scores:
        raise PixelgenError(f"{path} is not a metrics file of `pixelgen score` (no \"fid\" in it); {fix}")
    return scores


def read_all_scores(grid: dict, metrics_dir: Path) -> dict[str, dict]:
    """{variant: metrics.json} of every variant of the grid. The workflow (Snakemake's report rule, DVC's report
    stage) scores every variant before the report, so a missing file is an error, naming each one missing."""
    metrics_dir = Path(metrics_dir)
    if not metrics_dir.is_dir():
        raise PixelgenError(f"metrics folder not found: {metrics_dir} (it holds `pixelgen score`'s "
                            f"<variant>.json files)")
    paths = {name: metrics_dir / f"{name}.json" for name in grid["variants"]}
    missing = [str(path) for path in paths.values() if not path.exists()]
    if missing:
        raise PixelgenError(f"no metrics for {len(missing)} of the grid's {len(paths)} variants: "
                            f"{', '.join(missing)}; score them first (`pixelgen score ... --out <that file>`)")
    return {name: read_scores(path) for name, path in paths.items()}


def results_table(grid: dict, metrics_dir: Path) -> pd.DataFrame:
    scores = read_all_scores(grid, metrics_dir)
    rows = []
    for name, variant in grid["variants"].items():
        ours = scores[name]
        paper = (variant or {}).get("paper", {}) if isinstance(variant, dict) else {}
        row = {"variant": name, "description": (variant or {}).get("description", "")}
        for key, label, _ in COLUMNS:
            row[label] = ours.get(key)
            row[f"{label} (paper)"] = paper.get(label.lower())
        row["sampler"], row["NFE"] = sampler_and_nfe(ours.get("sampling", {}))
        row["samples"] = ours.get("num_samples")
        row["weights"] = ours.get("weights", "missing")
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, title: str) -> str:
    def fmt(v, digits):
        return "" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.{digits}f}"

    lines = [f"# {title}", ""]
    random = (table["weights"] == "random").any()
    if random:
        lines += ["**Metrics marked with † were computed with randomly initialised encoder/Inception weights: "
                  "they show the pipeline works, and are not comparable to the paper's numbers.**", ""]
    labels = [cell for _, label, _ in COLUMNS for cell in (label, f"{label} (paper)")]
    header = "| " + " | ".join(["variant", *labels, "sampler", "NFE", "samples"]) + " |"
    lines += [header, "|" + "---|" * (len(labels) + 4)]
    for _, r in table.iterrows():
        mark = " †" if r["weights"] == "random" else ""
        cells = [f"{r['variant']}{mark}"]
        for _, label, digits in COLUMNS:
            cells += [fmt(r[label], digits), fmt(r[f"{label} (paper)"], digits)]
        cells.append("" if pd.isna(r["sampler"]) else r["sampler"])
        cells += ["" if pd.isna(r[key]) else str(int(r[key])) for key in ("NFE", "samples")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def distinct_runs(grid: dict, runs_dir: Path) -> dict[str, Path]:
    """{label: run dir} with each training run once: variants that share a run (they differ in sampling only,
    e.g. a sampler grid) are one curve, labelled by the first of them and how many more share it."""
    sharing: dict[Path, list[str]] = {}
    for name in grid["variants"]:
        run = Path(runs_dir) / name
        sharing.setdefault(run.resolve() if run.exists() else run, []).append(name)
    return {names[0] + (f" (+{len(names) - 1} sharing its run)" if len(names) > 1 else ""): Path(runs_dir) / names[0]
            for names in sharing.values()}


def plot_losses(grid: dict, runs_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = ["loss/loss", "loss/fm", "loss/repa", "loss/lpips", "loss/pdino"]
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2))
    for name, run in distinct_runs(grid, runs_dir).items():
        frame = read_metrics_log(run)
        for ax, term in zip(axes, terms):
            if not frame.empty and term in frame:
                ax.plot(frame["step"], frame[term], label=name)
    for ax, term in zip(axes, terms):
        ax.set_title(term.split("/")[1])
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_fid_recall(table: pd.DataFrame, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for _, r in table.iterrows():
        if pd.notna(r["FID"]) and pd.notna(r["Rec"]):  # pd.notna(None) is False too
            ax.scatter(r["Rec"], r["FID"])
            ax.annotate(r["variant"], (r["Rec"], r["FID"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("recall (higher is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID vs recall" + (" (random weights)" if (table["weights"] == "random").any() else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_fid_vs_nfe(table: pd.DataFrame, out: Path) -> Path:
    """FID against model evaluations per image (log x), one line per sampler: the sampler grid's answer to
    "how few steps are enough" (a grid with one setting per variant shows points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = table[table["FID"].notna() & table["NFE"].notna()]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for sampler, rows in scored.groupby("sampler", sort=True):
        rows = rows.sort_values("NFE")
        ax.plot(rows["NFE"], rows["FID"], marker="o", label=sampler)
    ax.set_xscale("log")
    ax.set_xlabel("model evaluations per image at guidance 1 (NFE)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID vs NFE" + (" (random weights)" if (table["weights"] == "random").any() else ""))
    if len(scored):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def gate_curves(run_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{label: (t, weight)} of a run's perceptual-loss weighting over t: a fixed schedule from the run's
    config.yaml, a learned one from the last `gate_weight/<term>/<bin>` record of its metrics.jsonl."""
    import torch
    import yaml

    from .gating import gate_weights

    config_file = Path(run_dir) / "config.yaml"
    if not config_file.exists():
        return {}
    loss = yaml.safe_load(config_file.read_text())["loss"]
    if loss.get("gate_schedule", "step") != "learned":
        t = torch.linspace(0, 1, 201)
        return {"": (t.tolist(), gate_weights(t, {"gate_schedule": "step", **loss}).tolist())}
    frame = read_metrics_log(run_dir)
    curves: dict[str, dict[int, float]] = {}
    for column in frame.columns if not frame.empty else []:
        parts = column.split("/")
        if parts[0] == "gate_weight" and len(parts) == 3:
            curves.setdefault(parts[1], {})[int(parts[2])] = float(frame[column].dropna().iloc[-1])
    bins = loss["learned_weight_bins"]
    return {f" {term}": ([(b + 0.5) / bins for b in sorted(w)], [w[b] for b in sorted(w)])
            for term, w in curves.items()}


def plot_gate_weights(grid: dict, runs_dir: Path, out: Path) -> Path:
    """Each variant's perceptual-loss weight over t (learned ones as trained so far), on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, run in distinct_runs(grid, runs_dir).items():
        for label, (t, w) in gate_curves(run).items():
            ax.plot(t, w, marker="o" if label else None, markersize=3, label=f"{name}{label}")
    ax.set_xlabel("t (0 = noise, 1 = clean)")
    ax.set_ylabel("perceptual loss weight")
    ax.set_title("noise gate over t")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def build_report(grid_file: Path, metrics_dir: Path, runs_dir: Path, out: Path, title: str | None = None) -> dict:
    grid = load_grid(grid_file)
    out = Path(out)
    table = results_table(grid, metrics_dir)  # first: a refused report writes nothing
    (out / "samples").mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(to_markdown(table, title or grid.get("title", Path(grid_file).stem)))
    plot_losses(grid, runs_dir, out / "loss_curves.png")
    plot_fid_recall(table, out / "fid_recall.png")
    plot_gate_weights(grid, runs_dir, out / "gate_weights.png")
    plot_fid_vs_nfe(table, out / "fid_vs_nfe.png")
    for run in distinct_runs(grid, runs_dir).values():  # a shared run's training preview once, by its owner
        grid_png = run / "previews" / "final.png"
        if grid_png.exists():
            shutil.copyfile(grid_png, out / "samples" / f"{run.name}.png")
    write_dvc_files(grid, table, runs_dir, out)
    return {"rows": len(table), "out": str(out)}


def write_dvc_files(grid: dict, table: pd.DataFrame, runs_dir: Path, out: Path) -> dict[str, Path]:
    """What `dvc metrics show` and `dvc plots show` read (dvc.yaml declares them):

    - summary.json: {variant: {fid, sfid, is, precision, recall, samples}} (numbers only, null when missing)
    - plots/loss_<variant>.csv: step and every loss term of the run's metrics.jsonl (the loss curves)
    - plots/fid_recall.csv: variant, fid, recall, precision (the FID vs recall scatter)
    """
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)

    def number(v):
        return None if v is None or pd.isna(v) else float(v)

    summary = {}
    for _, r in table.iterrows():
        row = {key if key != "inception_score" else "is": number(r[label]) for key, label, _ in COLUMNS}
        row["samples"] = None if pd.isna(r["samples"]) else int(r["samples"])
        summary[r["variant"]] = row
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    scatter = pd.DataFrame([{"variant": name, "fid": m["fid"], "recall": m["recall"], "precision": m["precision"]}
                            for name, m in summary.items() if m["fid"] is not None])
    scatter.to_csv(plots / "fid_recall.csv", index=False)
    written = {"summary": out / "summary.json", "fid_recall": plots / "fid_recall.csv"}
    for name in grid["variants"]:
        frame = read_metrics_log(Path(runs_dir) / name)
        columns = ["step"] + [c for c in frame.columns if c.startswith("loss/")]
        frame = frame[columns] if not frame.empty else pd.DataFrame(columns=["step"])
        frame = frame.rename(columns=lambda c: c.split("/", 1)[-1])
        frame.to_csv(plots / f"loss_{name}.csv", index=False)
        written[name] = plots / f"loss_{name}.csv"
    return written
