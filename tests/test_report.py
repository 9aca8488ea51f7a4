"""The report's own logic: runs shared by sampling-only variants drawn once, and the sampler/NFE columns."""

import json

import pandas as pd

from pixelgen.report import distinct_runs, results_table, to_markdown


def test_variants_sharing_a_run_are_one_curve_labelled_by_the_first(tmp_path):
    (tmp_path / "store/a").mkdir(parents=True)
    (tmp_path / "store/c").mkdir()
    runs = tmp_path / "links"
    runs.mkdir()
    for name, target in [("euler_nfe10", "a"), ("heun_nfe9", "a"), ("dpmpp2m_nfe10", "a"), ("other", "c")]:
        (runs / name).symlink_to(tmp_path / "store" / target)
    grid = {"variants": {"euler_nfe10": {}, "heun_nfe9": {}, "dpmpp2m_nfe10": {}, "other": {}, "missing": {}}}
    assert distinct_runs(grid, runs) == {"euler_nfe10 (+2 sharing its run)": runs / "euler_nfe10",
                                         "other": runs / "other", "missing": runs / "missing"}


def test_table_gives_each_variant_its_sampler_and_model_evaluations(tmp_path):
    rows = {"heun_nfe9": {"sampler": "heun", "steps": 5, "nfe_per_image": 9},
            "old_heun": {"sampler": "heun", "steps": 50},  # written before nfe_per_image was recorded
            "dpm": {"sampler": "dpm++2m", "steps": 20, "nfe_per_image": 20}}
    for name, sampling in rows.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"fid": 3.0, "num_samples": 8, "weights": "random",
                                                           "sampling": sampling}))
    # written before the sampling settings were recorded (an unscored variant is an error: test_faults_report_eval)
    (tmp_path / "unrecorded.json").write_text(json.dumps({"fid": 3.0, "weights": "random"}))
    table = results_table({"variants": {**{n: {} for n in rows}, "unrecorded": {}}}, tmp_path).set_index("variant")
    assert table.loc["heun_nfe9", "NFE"] == 9 and table.loc["old_heun", "NFE"] == 99
    assert table.loc["dpm", "sampler"] == "dpm++2m" and pd.isna(table.loc["unrecorded", "sampler"])
    markdown = to_markdown(table.reset_index(), "t")
    assert "| sampler | NFE | samples |" in markdown and "| heun | 99 | 8 |" in markdown
    assert markdown.splitlines()[-1].endswith("|  |  |  |") and "nan" not in markdown  # unrecorded: empty cells
