"""ACTG 175 (Hammer et al. 1996) from the table lifelines ships: the loader keeps the trial's own gaps, the tables leave
out what would leak, the folds are deterministic, and the worked example runs at its tiny size with finite figures
for the model and its baselines."""
import configparser, csv, json, math, shlex, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_lifelines_is_in_the_medical_extra():
    cfg = configparser.ConfigParser(delimiters=["="]); cfg.read(ROOT / "settings.ini", encoding="utf-8")
    names = lambda s: {r.split(">")[0].split("<")[0].split("=")[0].lower() for r in shlex.split(s)}
    s = cfg["DEFAULT"]
    assert "lifelines" in names(s["medical_requirements"]) and "lifelines" not in names(s["requirements"])


def test_the_library_module_imports_without_lifelines():
    code = ("import importlib.abc, sys\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'lifelines': raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import mmfm.actg175 as a\n"
            "try: a.actg175_path()\n"
            "except ModuleNotFoundError as e: print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "refused:" in r.stdout and "mmfm[medical]" in r.stdout, r.stdout + r.stderr[-2000:]


def test_loader_keeps_the_files_gaps():
    from mmfm.actg175 import load_actg175, actg175_path
    df = load_actg175()
    assert df.shape == (2139, 27)
    with open(actg175_path(), newline="") as f: rows = list(csv.DictReader(f))
    missing = sum(r["cd496"] == "NA" for r in rows)
    assert missing > 0 and int(df.cd496.isna().sum()) == missing
    assert int(df.isna().sum().sum()) == missing                      # nothing else is missing, nothing is filled
    assert ((df.r == 1) == df.cd496.notna()).all()


def test_tables_leave_out_r_and_mark_the_week96_table_absent():
    from mmfm.actg175 import load_actg175, actg175_dataset, ACTG175_TABLES
    df = load_actg175()
    assert not any("r" in cols for cols in ACTG175_TABLES.values())
    ds = actg175_dataset(df)
    assert (ds.presence()["ActgWeek96Labs"].to_numpy() == df.cd496.notna().to_numpy()).all()
    with pytest.raises(ValueError, match="not modelled"): actg175_dataset(df, tables={"T": ["cd40", "r"]})


def test_folds_are_deterministic_and_balanced():
    from mmfm.actg175 import load_actg175, patient_folds
    ids = load_actg175().index
    a, b = patient_folds(ids, 5, 7), patient_folds(list(ids)[::-1], 5, 7)[::-1]
    assert (a == b).all() and np.bincount(a).max() - np.bincount(a).min() <= 1
    assert (a != patient_folds(ids, 5, 8)).any()


def test_tiny_run_has_finite_metrics_with_baselines(tmp_path):
    from mmfm.examples.actg import run
    res = run("tiny", tmp_path, seed=0)
    recs = {k: v for k, v in res.items() if k != "config"}
    assert {"cd420_rmse", "cd496_rmse", "cd420_crps", "cens_auc", "cens_brier", "cens_log_loss"} <= set(recs)
    for name, r in recs.items():
        assert math.isfinite(r["model"]) and math.isfinite(r["baseline"]) and r["baseline_name"], name
    assert 0 <= recs["cens_auc"]["model"] <= 1 and recs["cd420_rmse"]["train_mean"] > 0
    json.dumps(res)                                                   # the demo writes it as JSON
    assert (tmp_path / "actg_event_roc.png").exists()

def test_too_few_patients_for_the_linear_baseline_is_named(tmp_path):
    """A fold with fewer training patients than the linear baseline's features cannot give its residual σ: the
    error says so, naming the task and fold (it used to be a NaN σ refused far downstream)."""
    from mmfm.actg175 import load_actg175, patient_folds
    from mmfm.examples.actg import example_config, fold_predictions
    df = load_actg175().iloc[:40]
    cfg = example_config("tiny", steps=2, n_patients=40)
    fold = patient_folds(df.index, 2, cfg.seed)
    with pytest.raises(ValueError, match=r"task 'cd496', fold 0: \d+ training patients with cd496 for \d+ features"):
        fold_predictions(df, fold, 0, cfg, tmp_path)
