"""Table and time-series codecs: properties over many random tables, missing cells, persistence, the medical codecs."""
import tempfile, warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmfm.codec import Codec, CodecConfigError, check_codec
from mmfm.modality import table_modality
from mmfm.quantize import OutOfRangeWarning
from mmfm.table_codecs import MissingCellError, TableCodec, table_codec_class, table_reconstruction_errors
from mmfm.series_codecs import SeriesCodec, series_correlation
from mmfm.medical import (MEDICAL_CODECS, CohortEcg, CohortEcgCodec, CohortLabs, DiabetesLabs, DiabetesLabsCodec,
                          medical_codecs)

Lab3 = table_modality("Lab3", ["a", "b", "c"], "tok_test_lab3")
Lab3Codec = table_codec_class(Lab3)


def _table(kind: str, n: int, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    cols = {"normal": lambda: g.normal(100, 15, n), "integer": lambda: g.integers(18, 90, n).astype(float),
            "binary": lambda: g.integers(0, 2, n).astype(float), "skewed": lambda: g.lognormal(4, 0.4, n),
            "rounded": lambda: g.normal(5, 1.3, n).round(1)}
    return torch.tensor(np.stack([cols[kind]() for _ in range(3)], 1), dtype=torch.float32)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["normal", "integer", "binary", "skewed", "rounded"]), n=st.integers(2, 600),
       seed=st.integers(0, 10_000))
def test_per_column_gives_training_values_back_exactly(kind, n, seed):
    "With fewer distinct training values than bins, every training value decodes to itself, bit for bit."
    x = _table(kind, n, seed)
    codec = TableCodec(Lab3, num_bins=1024).prepare(Lab3.from_matrix(x))
    back = codec.decode(codec.encode(Lab3.from_matrix(x))).as_matrix()
    assert torch.equal(back, x)


@pytest.mark.parametrize("kind", ["normal", "integer", "binary", "skewed", "rounded"])
@pytest.mark.parametrize("n_train", [60, 300, 3000])
def test_per_column_held_out_error_small(kind, n_train):
    """Held-out rows (another draw of the same distribution) inside the fitted (padded) range come back within
    0.05 sd per column with 1024 bins (0.15 sd with the default 64); the rare values beyond it (a skewed tail after
    60 training rows) are counted, not hidden."""
    train, test = _table(kind, n_train, 1), _table(kind, 500, 2)
    coarse = TableCodec(Lab3).prepare(Lab3.from_matrix(train))
    codec = TableCodec(Lab3, num_bins=1024).prepare(Lab3.from_matrix(train))
    low, high = codec.quantizer.range_low, codec.quantizer.range_high
    inside = ((test >= low) & (test <= high)).all(1)
    codec.quantizer.reset_out_of_range()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfRangeWarning)
        rep = table_reconstruction_errors(codec, Lab3.from_matrix(test[inside]))
        codec.encode(Lab3.from_matrix(test))
    assert (rep.rmse_sd <= 0.05).all(), rep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfRangeWarning)
        rep64 = table_reconstruction_errors(coarse, Lab3.from_matrix(test[inside]))
    assert (rep64.rmse_sd <= 0.15).all() and (rep64.rmse_sd >= rep.rmse_sd - 1e-9).all(), rep64
    oor = codec.quantizer.out_of_range()
    assert sum(oor["below"]) + sum(oor["above"]) == int(((test < low) | (test > high)).sum())
    assert inside.float().mean() > (0.98 if kind == "skewed" and n_train == 60 else 0.999)


def test_out_of_range_is_reported_not_silent():
    codec = TableCodec(Lab3).prepare(Lab3.from_matrix(_table("normal", 200, 0)))
    far = Lab3.from_matrix(torch.tensor([[1e4, 100.0, 100.0]]))
    with pytest.warns(OutOfRangeWarning, match="outside the range"):
        codec.encode(far)
    assert codec.quantizer.out_of_range()["above"] == [1, 0, 0]


def test_missing_cells_are_refused_with_column_rows_and_ids():
    x = _table("normal", 6, 0); x[2, 1] = float("nan"); x[4, 1] = float("inf")
    m = Lab3.from_matrix(x, metadata={"per_sample": [{"id": f"p{i}"} for i in range(6)]})
    for layout in ("per_column", "per_table"):
        codec = TableCodec(Lab3, layout=layout).prepare(Lab3.from_matrix(_table("normal", 6, 1)))
        with pytest.raises(MissingCellError, match=r"column\(s\) 'b' \(rows \[2, 4\]\); sample ids \['p2', 'p4'\]"):
            codec.encode(m)
        with pytest.raises(MissingCellError, match="prepare"):
            TableCodec(Lab3, layout=layout).prepare(m)


def test_input_not_modified_and_batch_of_one():
    x = _table("normal", 8, 0); m = Lab3.from_matrix(x.clone())
    for layout in ("per_column", "per_table"):
        codec = TableCodec(Lab3, layout=layout).prepare(m)
        tokens = codec.encode(m)
        assert torch.equal(m.as_matrix(), x)
        assert torch.equal(codec.encode(m.select([3])), tokens[3:4])


def test_save_load_and_config_mismatch(tmp_path):
    m = Lab3.from_matrix(_table("rounded", 100, 0))
    codec = Lab3Codec(num_bins=256).prepare(m)
    codec.save(tmp_path / "lab3")
    again = Codec.load(tmp_path / "lab3")
    assert type(again) is Lab3Codec and torch.equal(again.encode(m), codec.encode(m))
    with pytest.raises(CodecConfigError, match="num_bins: file 256 vs codec 64"):
        Lab3Codec().load_weights(tmp_path / "lab3")
    generic = TableCodec(Lab3, layout="per_table")
    assert generic.config["modality"] == f"{Lab3.__module__}:Lab3"


def test_contract_numbers_come_from_the_codecs():
    "One source of truth: token counts and vocabularies are the codecs' (the ECG codec's 128 tokens, 512 codes)."
    m = medical_codecs("cohort")
    assert m.num_tokens == {"tok_cohort_demographics": 3, "tok_cohort_labs": 3, "tok_cohort_vitals": 4, "tok_cohort_ecg": 128}
    assert m.vocab_sizes == {"tok_cohort_demographics": 64, "tok_cohort_labs": 64, "tok_cohort_vitals": 64, "tok_cohort_ecg": 512}
    assert set(medical_codecs("cohort", "per_table").num_tokens.values()) == {1, 128}
    assert DiabetesLabsCodec().columns == DiabetesLabs.columns
    assert len(MEDICAL_CODECS) == 8


def test_every_medical_codec_default_constructible_and_checked():
    g = torch.Generator().manual_seed(0)
    for mod, cls in MEDICAL_CODECS.items():
        if mod is CohortEcg: sample = CohortEcg(ecg=torch.randn(3, 1, 1024, generator=g))
        else: sample = mod.from_matrix(50 + 10 * torch.randn(3, len(mod.columns), generator=g))
        codec = cls().prepare(sample)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OutOfRangeWarning)   # the default, unprepared codec of check_codec
            check_codec(codec, sample)


def test_series_codec_rejects_nan_and_is_deterministic():
    codec = CohortEcgCodec().prepare(CohortEcg(ecg=torch.randn(4, 1, 1024)))
    x = torch.randn(2, 1, 1024); x[1, 0, 3] = float("nan")
    with pytest.raises(Exception, match=r"NaN or infinite samples in rows \[1\]"):
        codec.encode(CohortEcg(ecg=x))
    ok = CohortEcg(ecg=torch.randn(2, 1, 1024))
    assert torch.equal(codec.encode(ok), codec.encode(ok))
    assert codec.encode(ok).shape == (2, 128)


def test_series_correlation_batch_of_one():
    x = torch.randn(1, 1, 50)
    assert series_correlation(x, 2 * x).shape == (1,)
