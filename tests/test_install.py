"""`pip install .` (not editable) into a fresh virtual environment gives a working package: every subpackage is in the
wheel (the examples included), the `mmfm` command is on the path, and `mmfm demo --size tiny` runs end to end.

The new environment installs mmfm alone (`--no-deps --no-index`): its dependencies come from the running environment
through a `.pth` file, so the test needs no network and installs in seconds. `--ignore-installed` keeps pip from
touching the running environment's own (editable) mmfm, which the `.pth` file makes visible."""
import json, os, shutil, subprocess, sys, sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "data", "reports", "runs", "_docs", "_proc", "build", "*.egg-info",
                              "__pycache__", ".pytest_cache", "nbs", "tests", "bench")


def _run(args, cwd, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("install")
    src, venv = work / "src", work / "venv"
    shutil.copytree(ROOT, src, ignore=SKIP)                     # build from a copy: the checkout stays untouched
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work).stdout.strip()
    Path(site, "_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", "--ignore-installed",
              src], work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, venv, Path(site)


def test_the_installed_copy_is_imported_with_its_examples(installed):
    work, venv, site = installed
    r = _run([venv / "bin" / "python", "-c", "import mmfm, mmfm.examples.demo, mmfm.cli; print(mmfm.__file__)"], work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()).is_relative_to(site), f"imported {r.stdout.strip()}, not the copy installed in {site}"


def test_mmfm_help_lists_every_command(installed):
    work, venv, _ = installed
    r = _run([venv / "bin" / "mmfm", "--help"], work)
    assert r.returncode == 0, r.stderr
    for command in ("simulate", "medical", "codecs", "tokenize", "train", "predict", "demo"):
        assert f"  {command}" in r.stdout, r.stdout
        h = _run([venv / "bin" / "mmfm", command, "--help"], work)
        assert h.returncode == 0 and f"usage: mmfm {command}" in h.stdout, (command, h.stdout[-500:], h.stderr[-500:])


def test_mmfm_demo_tiny_runs_end_to_end(installed):
    work, venv, _ = installed
    r = _run([venv / "bin" / "mmfm", "demo", "--size", "tiny", "--out", "reports", "--data", "data"], work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((work / "reports" / "metrics.json").read_text())
    from mmfm.examples.demo import EXAMPLES
    assert set(report["results"]) == set(EXAMPLES) and report["size"] == "tiny"
    assert "== astronomy example (tiny, seed 0): done in" in r.stdout, r.stdout[-2000:]  # a line per stage, with its time


ROUND_TRIP = r'''
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):     # the extras are not installed: astropy, reproject, GalSim, ...
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"astropy", "reproject", "galsim", "speclite", "neurokit2"}:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
import numpy as np, pandas as pd, torch
from mmfm.frames import frame_dataset
from mmfm.fit_codecs import fit_codecs
from mmfm.tokens import TokenDataset
from mmfm.transformer import MultimodalTransformer
from mmfm.train import Trainer, TrainConfig
from mmfm.masking import MaskingConfig
from mmfm.predict import predict
from mmfm.codec import CodecManager
rng = np.random.default_rng(0); n = 200
x = rng.normal(size=n)
df = pd.DataFrame({"a": x, "b": 2 * x + 0.1 * rng.normal(size=n), "y": x + 0.1 * rng.normal(size=n)})
df.loc[::7, "b"] = np.nan                                   # a gap in one cell of the input table
df["split"] = np.where(np.arange(n) < 160, "train", "test")
ds = frame_dataset(df, {"Inputs": ["a", "b"], "Target": ["y"]}, split_column="split")
codecs = fit_codecs(ds, table=dict(num_bins=16, missing_cells=True), verbose=False)
codecs.save(sys.argv[1] + "/codecs")
codecs = CodecManager.load(sys.argv[1] + "/codecs")           # saved by definition, loaded back
tokens = TokenDataset.encode(ds, codecs, progress_bar=False)
torch.manual_seed(0)
model = MultimodalTransformer.from_codecs(codecs, "tiny")
Trainer(model, tokens.split("train"), TrainConfig(steps=30, batch_size=32, eval_every=0, checkpoint_every=0,
        progress=False), MaskingConfig(2, 1), out_dir=sys.argv[1] + "/run", codecs=codecs).fit()
test = tokens.split("test")
y = predict(model, codecs, test.batch(range(len(test))), [ds.modalities["Target"]], point="mean")
y = y[ds.modalities["Target"]].y
assert y.shape == (40, 1) and torch.isfinite(y).all(), y
assert not any(k.split(".")[0] in {"astropy", "galsim", "reproject", "neurokit2"} for k in sys.modules)
print("round trip ok", float(y.mean()))
'''


def test_core_without_extras_dataframe_to_prediction(installed, tmp_path):
    "The installed package, with the [astro] and [medical] stacks unimportable: a DataFrame with a gap → codecs "
    "(saved and loaded) → tokens → training → predicted means."
    work, venv, _ = installed
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    r = _run([venv / "bin" / "python", script, tmp_path], work, timeout=600)
    assert r.returncode == 0 and "round trip ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
