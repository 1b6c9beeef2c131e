"""The medical datasets: exact values of the real diabetes data, determinism, the command line, and bad input."""
import json, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.datasets import load_diabetes

from mmfm.data import DataError, MultiSourceDataset
from mmfm.medical import (DIABETES_COLUMNS, DIABETES_SOURCES, COHORT_SOURCES, SPLITS, CohortConfig, DiabetesConfig,
                          build_cohort, build_diabetes, check_medical_dataset, cohort_fields, cohort_sources,
                          diabetes_sources, ecgsyn_artifact, load_split, patient_ecg)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("medical") / "diabetes"
    build_diabetes(out)
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("medical") / "cohort"
    build_cohort(out, CohortConfig(n=30, seed=3))
    return out


def _manifest(root: Path) -> list[dict]:
    return json.loads((root / "manifest.json").read_text())["samples"]


def test_diabetes_values_equal_scikit_learn_exactly(diabetes):
    "Every value of every table, reached through the manifest, is scikit-learn's unscaled value, bit for bit."
    sk = load_diabetes(scaled=False, as_frame=True).frame
    samples = _manifest(diabetes)
    assert [s["id"] for s in samples] == [f"patient_{i:03d}" for i in range(442)]
    tables = {key: pd.read_csv(diabetes / file) for key, _, file in DIABETES_SOURCES}
    to_sk = {v: k for k, v in DIABETES_COLUMNS.items()}
    compared = 0
    for i, s in enumerate(samples):
        assert "demographics_row" in s and "outcome_row" in s, s
        for key, mod, _ in DIABETES_SOURCES:
            if key not in s: continue
            row = tables[key].iloc[s[key]]
            assert row["patient_id"] == s["id"]
            for c in mod.columns:
                ours, theirs = row[c], sk.iloc[i][to_sk[c]]
                assert type(ours) in (float, np.float64) and ours == theirs, (s["id"], c, ours, theirs)
                compared += 1
    # all 442 × 11 values of the patients that have every table, and the rest of each present table
    n_labs, n_vitals = len(tables["lab_results_row"]), len(tables["vitals_row"])
    assert compared == 442 * 3 + n_labs * 6 + n_vitals + 442
    assert sorted(tables["demographics_row"].sex.unique()) == [1.0, 2.0]      # scikit-learn's coding kept
    # tables hold only the patients that have them, nothing else
    for key, _, _ in DIABETES_SOURCES:
        assert len(tables[key]) == sum(key in s for s in samples)
        assert not tables[key].isna().any().any()


def test_diabetes_missing_tables_and_splits(diabetes):
    samples = _manifest(diabetes)
    no_labs = sum("lab_results_row" not in s for s in samples)
    no_vitals = sum("vitals_row" not in s for s in samples)
    assert 30 < no_labs < 100 and 15 < no_vitals < 75           # 15 % and 10 % of 442, drawn
    splits = json.loads((diabetes / "splits.json").read_text())
    assert [len(splits[k]) for k in SPLITS] == [309, 66, 67]
    assert sorted(sum(splits.values(), [])) == sorted(s["id"] for s in samples)   # disjoint and complete
    for s in samples: assert s["id"] in splits[s["split"]]
    info = json.loads((diabetes / "info.json").read_text())
    assert info["column_mapping"]["s3"] == "hdl" and info["counts"]["lab_results_row"] == 442 - no_labs


def test_diabetes_deterministic_and_seeded(diabetes, tmp_path):
    build_diabetes(tmp_path / "same")
    for f in ("manifest.json", "splits.json", "demographics.csv", "lab_results.csv", "vital_signs.csv", "outcome.csv"):
        assert (tmp_path / "same" / f).read_bytes() == (diabetes / f).read_bytes(), f
    build_diabetes(tmp_path / "other", DiabetesConfig(seed=1))
    assert (tmp_path / "other/manifest.json").read_bytes() != (diabetes / "manifest.json").read_bytes()


def test_multisource_dataset_reads_both(diabetes, cohort):
    ds = MultiSourceDataset(diabetes, "manifest.json", diabetes_sources(), split="val")
    assert len(ds) == 66
    sample = ds[0]
    assert set(sample.mods) <= {"demographics", "lab_results", "vitals", "outcome"}
    batch = load_split(cohort, "cohort")
    assert len(batch) == 30 and batch.mods["ecg"].ecg.shape[1:] == (1, 1024)
    assert int(batch.present["ecg"].sum()) == batch.mods["ecg"].batch_size
    assert batch.present["demographics"].all()


def test_cohort_tables_follow_the_fields_and_ecg_rate(cohort):
    fields = cohort_fields(30, seed=3)
    samples = _manifest(cohort)
    ecg = np.load(cohort / "ecg.npy")
    for key, mod, file in COHORT_SOURCES:
        if not file.endswith(".csv"): continue
        t = pd.read_csv(cohort / file)
        for s in samples:
            if key in s:
                assert t.iloc[s[key]]["patient_id"] == s["id"]
                assert (t.iloc[s[key]][list(mod.columns)].to_numpy(float) == fields.loc[s["id"], list(mod.columns)].to_numpy(float)).all()
    import neurokit2 as nk
    for s in samples:
        if "ecg_row" not in s: continue
        i = int(s["id"].split("_")[1])
        x = ecg[s["ecg_row"], 0]
        np.testing.assert_array_equal(x, patient_ecg(3, i, fields.heart_rate.iloc[i], fields.ecg_gain.iloc[i])[0])
        assert not ecgsyn_artifact(x)
        peaks = nk.ecg_peaks(x, sampling_rate=100)[1]["ECG_R_Peaks"]
        assert abs(6000 / np.diff(peaks).mean() - fields.heart_rate.iloc[i]) < 4, s["id"]


def test_cohort_deterministic_across_workers_and_chunks(cohort, tmp_path):
    "Same seed → the same bytes, whether ECGs are simulated in one process or two, in chunks of 4 or 256."
    build_cohort(tmp_path / "two", CohortConfig(n=30, seed=3, workers=2, chunk_size=4))
    for f in ("manifest.json", "splits.json", "demographics.csv", "lab_results.csv", "vital_signs.csv", "ecg.npy"):
        assert (tmp_path / "two" / f).read_bytes() == (cohort / f).read_bytes(), f


@settings(max_examples=15, deadline=None)
@given(n=st.integers(10, 400), extra=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_cohort_fields_prefix_stable_and_plausible(n, extra, seed):
    a, b = cohort_fields(n, seed), cohort_fields(n + extra, seed)
    pd.testing.assert_frame_equal(a, b.iloc[:n])
    assert a.age.between(18, 90).all() and a.sex.isin([0.0, 1.0]).all() and a.bmi.between(16, 55).all()
    assert a.heart_rate.between(45, 120).all() and (a.blood_pressure_dia <= a.blood_pressure_sys - 20).all()
    assert a.notna().all().all()


def test_neurokit2_infinite_loop_is_avoided():
    "This call never returns with plain neurokit2 0.3.0 (an RR series ending in 0); run it in a child with a timeout."
    code = "from mmfm.medical import cohort_ecg; x = cohort_ecg(90, 90); assert x.shape == (1024,); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmfm.medical", "--out", str(tmp_path / "m"), "--n-cohort", "12",
                        "--seed", "0", "--quiet"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for d, n in (("diabetes", 442), ("cohort", 12)):
        assert len(_manifest(tmp_path / "m" / d)) == n
        assert check_medical_dataset(tmp_path / "m" / d, d)["demographics_row"] == n
    bad = subprocess.run([sys.executable, "-m", "mmfm.medical", "--out", str(tmp_path / "x"), "--n-cohort", "3", "--only", "cohort"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "at least 10" in bad.stderr


# ---- bad input: every error names the sample, the source and the problem ----------------------------------------

def _corrupt(src: Path, dst: Path, file: str, edit) -> Path:
    shutil.copytree(src, dst)
    df = pd.read_csv(dst / file, dtype=str, keep_default_na=False)
    edit(df)
    df.to_csv(dst / file, index=False)
    return dst


@pytest.mark.parametrize("cell, problem", [("abc", "non-numeric cell 'abc' in column 'glucose'"),
                                           ("", "empty (missing) cell '' in column 'glucose'"),
                                           ("NaN", "empty (missing) cell 'NaN' in column 'glucose'"),
                                           ("inf", "non-finite cell 'inf' in column 'glucose'")])
def test_bad_cell_names_sample_source_and_problem(diabetes, tmp_path, cell, problem):
    samples = _manifest(diabetes)
    victim = next(s for s in samples if s.get("lab_results_row") == 7)
    def edit(df): df.loc[7, "glucose"] = cell
    root = _corrupt(diabetes, tmp_path / "bad", "lab_results.csv", edit)
    with pytest.raises(DataError) as e: check_medical_dataset(root, "diabetes")
    msg = str(e.value)
    assert f"sample {victim['id']!r}" in msg and "lab_results_row (lab_results.csv)" in msg and problem in msg, msg
    with pytest.raises(DataError) as e: load_split(root, "diabetes")
    assert victim["id"] in str(e.value)


def test_missing_declared_column(cohort, tmp_path):
    root = _corrupt(cohort, tmp_path / "bad", "vital_signs.csv", lambda df: df.__delitem__("temperature"))
    first = next(s for s in _manifest(cohort) if s.get("vitals_row") == 0)
    with pytest.raises(DataError, match=r"missing declared column\(s\) \['temperature'\]") as e:
        check_medical_dataset(root, "cohort")
    assert f"sample {first['id']!r}" in str(e.value) and "vitals_row (vital_signs.csv)" in str(e.value)


def test_row_out_of_range_and_bad_ecg(cohort, tmp_path):
    root = tmp_path / "bad"; shutil.copytree(cohort, root)
    m = json.loads((root / "manifest.json").read_text())
    s = next(s for s in m["samples"] if "lab_results_row" in s); s["lab_results_row"] = 10_000
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"sample '{s['id']}'.*row 10000 out of range"): check_medical_dataset(root, "cohort")
    root2 = tmp_path / "bad2"; shutil.copytree(cohort, root2)
    ecg = np.load(root2 / "ecg.npy"); ecg[2, 0, 100] = np.nan; np.save(root2 / "ecg.npy", ecg)
    victim = next(s for s in _manifest(cohort) if s.get("ecg_row") == 2)
    with pytest.raises(DataError, match=f"sample '{victim['id']}', source 'ecg_row \\(ecg.npy\\)': row 2 holds NaN"):
        check_medical_dataset(root2, "cohort")
