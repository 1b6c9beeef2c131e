"""The medical example end to end at the tiny size: every metric has a finite value and baseline, figures are written,
and a second run gives the same numbers (contract 8)."""
import json, math
from pathlib import Path

import pytest

from mmfm.examples.results import results_table
from mmfm.examples.medical import example_config, prepare_datasets, run

FIGURES = ["cohort_vitals.png", "diabetes_calibration.png", "diabetes_lab_imputation.png", "diabetes_progression.png",
           "reconstruction.png"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("medical_example")
    first = run("tiny", root / "out1", root / "data", seed=0)
    second = run("tiny", root / "out2", root / "data", seed=0)
    return root, first, second


def test_every_metric_is_finite_with_its_baseline(runs):
    _, metrics, _ = runs
    expected = {"diabetes_reconstruction_rmse_sd", "cohort_reconstruction_rmse_sd", "ecg_correlation_median",
                "ecg_heart_rate_within_2bpm", "diabetes_progression_r2", "diabetes_progression_probe_r2",
                "diabetes_lab_imputation_rmse_sd", "diabetes_lab_imputation_rmse_sd_vs_mean",
                "cohort_heart_rate_from_ecg_mae_bpm", "cohort_heart_rate_from_ecg_mae_bpm_vs_mean",
                "cohort_vitals_from_demographics_ecg_rmse_sd", "cohort_vitals_from_demographics_ecg_rmse_sd_vs_mean"}
    expected |= {f"diabetes_{t}_{c}" for t in ("progression", "lab_imputation")      # calibration of the distributions
                 for c in ("pit_ks", "coverage68_error", "coverage95_error", "crps_sd")}
    assert set(metrics) == expected
    for name, m in metrics.items():
        assert math.isfinite(m["model"]), name
        assert m["baseline"] is not None and math.isfinite(m["baseline"]), name
        assert m["baseline_name"] and m["description"], name
        assert isinstance(m["higher_is_better"], bool), name
    json.dumps(metrics, allow_nan=False)                    # strict JSON: no NaN hides in the extra fields
    assert "diabetes_progression_r2" in results_table({"medical": metrics})


def test_figures_tables_and_timing_are_written(runs):
    root, _, _ = runs
    out = root / "out1"
    assert sorted(p.name for p in out.glob("*.png")) == FIGURES
    for p in out.glob("*.png"): assert p.stat().st_size > 5_000, p
    assert {"diabetes_progression.csv", "diabetes_labs.csv", "cohort_vitals.csv", "reconstruction.csv"} <= {p.name for p in out.iterdir()}
    timing = json.loads((out / "timing.json").read_text())
    assert timing["size"] == "tiny" and timing["seconds"]["total"] > 0


def same_metrics(a, b, rel=1e-6):
    "Equal structure and text, floats equal to `rel` (threaded float reductions may differ in the last bits)."
    if isinstance(a, dict): return a.keys() == b.keys() and all(same_metrics(a[k], b[k], rel) for k in a)
    if isinstance(a, (list, tuple)): return len(a) == len(b) and all(same_metrics(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float): return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
    return a == b


def test_second_run_gives_identical_metrics(runs):
    _, first, second = runs
    assert same_metrics(first, second), (first, second)


def test_datasets_are_reused_and_never_overwritten(runs, tmp_path):
    root, _, _ = runs
    cfg = example_config("tiny")
    folders = prepare_datasets(root / "data", cfg)
    assert folders["cohort"].name == "cohort_n40_seed0_simple"            # not data/medical/cohort, the demo's
    stamp = (folders["cohort"] / "manifest.json").stat().st_mtime_ns
    assert prepare_datasets(root / "data", cfg) == folders
    assert (folders["cohort"] / "manifest.json").stat().st_mtime_ns == stamp
    other = prepare_datasets(root / "data", example_config("tiny", seed=1))
    assert other["cohort"].name == "cohort_n40_seed1_simple" and other["diabetes"].name == "diabetes_seed1"


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown size 'medium'"):
        run("medium", tmp_path / "out", tmp_path / "data")
