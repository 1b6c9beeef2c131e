"""A user's own DataFrame, end to end across processes: codecs fitted once encode new data made later (in the same
process or another), their checksums do not depend on where a factory-made modality class was made, and a sample
without a split keeps the others' splits."""
import json, subprocess, sys, textwrap
import numpy as np, pandas as pd, pytest, torch
from mmfm.frames import frame_dataset
from mmfm.fit_codecs import fit_codecs
from mmfm.tokens import TokenDataset, codec_checksums

TABLES = {"OwnFeat": ["a", "b"], "OwnOut": ["y"]}

def _frame(n, seed, split=True):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "y": rng.normal(size=n)},
                      index=[f"p{seed}_{i}" for i in range(n)])
    if split: df["split"] = ["train"] * (n - 4) + ["val"] * 4
    return df

@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    ds = frame_dataset(_frame(40, 0), TABLES, split_column="split")
    m = fit_codecs(ds, table=dict(num_bins=8), verbose=False)
    d = tmp_path_factory.mktemp("own") / "codecs"; m.save(d)
    return ds, m, d

def test_new_data_encodes_with_fitted_codecs(fitted):
    ds, m, _ = fitted
    new = frame_dataset(_frame(6, 1, split=False), TABLES)           # later patients, no splits
    assert new.modalities["OwnFeat"] is ds.modalities["OwnFeat"]
    toks = TokenDataset.encode(new, m, progress_bar=False)
    assert toks.ids == new.ids and toks.splits is None

def test_other_definition_is_named(fitted):
    _, m, _ = fitted
    other = frame_dataset(_frame(6, 2, split=False), {"OwnFeat": ["a"], "OwnOut": ["y"]})   # one column dropped
    with pytest.raises(Exception, match="another class of that name"):
        TokenDataset.encode(other, m, progress_bar=False)
    frame_dataset(_frame(6, 2, split=False), TABLES)                  # the fitted definition registered again

def test_checksums_do_not_depend_on_the_process(fitted):
    ds, m, d = fitted
    code = textwrap.dedent(f"""
        import json, numpy as np, pandas as pd
        from mmfm.codec import CodecManager
        from mmfm.frames import frame_dataset
        from mmfm.tokens import TokenDataset, codec_checksums
        m = CodecManager.load({str(d)!r})
        df = pd.DataFrame({{"a": [0.1, 0.2], "b": [0.0, 1.0], "y": [np.nan, 0.5]}}, index=["n1", "n2"])
        toks = TokenDataset.encode(frame_dataset(df, {TABLES!r}), m, progress_bar=False)
        print(json.dumps([codec_checksums(m), toks.codec_checksums]))""")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    there, recorded = json.loads(out.stdout.strip().splitlines()[-1])
    assert there == codec_checksums(m) == recorded

def test_a_sample_without_split_keeps_the_others(fitted):
    _, m, _ = fitted
    df = _frame(8, 3); df["split"] = df["split"].astype(object); df.iloc[0, df.columns.get_loc("split")] = None
    toks = TokenDataset.encode(frame_dataset(df, TABLES, split_column="split"), m, progress_bar=False)
    assert toks.splits[0] is None and toks.splits[1:] == ["train"] * 3 + ["val"] * 4
    assert len(toks.split("train")) == 3 and len(toks.split("val")) == 4

def test_fitting_without_splits_says_so():
    with pytest.raises(ValueError, match="the data set records no splits"):
        fit_codecs(frame_dataset(_frame(10, 4, split=False), TABLES), table=dict(num_bins=8), verbose=False)
