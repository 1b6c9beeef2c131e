"""The medical pipeline's calibration records (PIT uniformity, 68 %/95 % coverage, CRPS) for the diabetes progression
and the hidden labs, at the tiny size, with and without value embeddings: every record finite and within its range, the
per-cell columns consistent, a second run identical."""
import math
import numpy as np
import pytest
from mmfm.examples.medical import (example_config, load_medical, diabetes_cross_validation, diabetes_metrics,
                                   pit_coverage, train_transformer, transformer_codecs, encode_tokens)
from mmfm.medical import build_diabetes, DiabetesConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

NAMES = [f"{t}_{m}" for t in ("diabetes_progression", "diabetes_lab_imputation")
         for m in ("pit_ks", "coverage68_error", "coverage95_error", "crps_sd")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("medical") / "diabetes"
    build_diabetes(folder, DiabetesConfig(seed=0))
    return load_medical({"diabetes": folder})


@pytest.fixture(scope="module")
def cv(data, tmp_path_factory):
    cfg = example_config("tiny", value_embedding={"diabetes": "periodic", "cohort": None})
    out = tmp_path_factory.mktemp("cv")
    return cfg, diabetes_cross_validation(data, cfg, out / "a"), diabetes_cross_validation(data, cfg, out / "b")


def test_calibration_records_are_finite_and_in_range(cv):
    cfg, first, _ = cv
    metrics = diabetes_metrics(first, cfg)
    assert set(NAMES) <= set(metrics)
    for name in NAMES:
        m = metrics[name]
        assert math.isfinite(m["model"]) and math.isfinite(m["baseline"]) and not m["higher_is_better"], name
        assert m["model"] >= 0 and m["baseline"] >= 0, name
        if "coverage" in name:
            for who in ("coverage_model", "coverage_baseline"): assert 0 <= m[who] <= 1, (name, who)
            assert math.isclose(m["model"], abs(m["coverage_model"] - m["nominal"]))
        if name.endswith("pit_ks"): assert m["model"] <= 1 and len(m["pit_hist_model"]) == 10
    assert metrics["diabetes_progression_pit_ks"]["n_cells"] == 442          # every patient predicted once
    assert metrics["diabetes_lab_imputation_crps_sd"]["n_cells"] == len(first["labs"])


def test_per_cell_columns_agree(cv):
    "Intervals nest, PIT and coverage tell the same story for the baselines' normal distributions, CRPS is positive."
    _, first, _ = cv
    for table, base in ((first["progression"], "linear_regression"), (first["labs"], "iterative_imputer")):
        y = table["true"].to_numpy()
        for who in ("model", base):
            pit = table[f"{who}_pit"].to_numpy()
            assert ((0 <= pit) & (pit <= 1)).all() and (table[f"{who}_crps"] > 0).all()
            assert (table[f"{who}_lo95"] <= table[f"{who}_lo68"]).all()
            assert (table[f"{who}_lo68"] <= table[f"{who}_hi68"]).all()
            assert (table[f"{who}_hi68"] <= table[f"{who}_hi95"]).all()
        inside = ((y >= table[f"{base}_lo68"]) & (y <= table[f"{base}_hi68"])).mean()
        assert math.isclose(inside, pit_coverage(table[f"{base}_pit"], 0.68), abs_tol=1e-9)


def test_second_run_is_identical(cv):
    _, first, second = cv
    for name in first:
        a, b = first[name].drop(columns=["id"]), second[name].drop(columns=["id"])
        assert list(a.columns) == list(b.columns)
        num = a.select_dtypes("number").columns
        assert np.allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-6, atol=1e-9), name


def test_value_embedding_setting_reaches_the_model(data, tmp_path):
    cfg = example_config("tiny", value_embedding={"diabetes": "ple", "cohort": None}, value_features=4)
    batch = data["diabetes"]["all"]
    manager = transformer_codecs("diabetes", batch, cfg)
    model = train_transformer(manager, encode_tokens(manager, batch), cfg, 2, tmp_path / "run")
    assert model.config.value_embedding == "ple" and model.config.value_features == 4
    assert sorted(model.value_embeddings) == sorted(manager.token_keys)      # every diabetes table has values
    off = example_config("tiny", value_embedding={"diabetes": None, "cohort": "ple"})
    assert len(train_transformer(manager, encode_tokens(manager, batch), off, 2, tmp_path / "plain").value_embeddings) == 0
