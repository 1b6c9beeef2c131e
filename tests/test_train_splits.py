"""`mmfm train` reads the train split of its data and validates on the val split, whether the data are a file or a
token-shard folder; data that record splits but not the one needed are refused (no silent leakage)."""
import argparse
import pytest
from mmfm.tokens import synthetic_token_dataset, TokenDataset
from mmfm.train import _token_data, _budget, TrainConfig, main
from mmfm.train import DistInfo


def _file(tmp_path, name, splits):
    ds = synthetic_token_dataset(len(splits), seed=0)
    ds = TokenDataset(ds.tokens, ds.present, ds.vocab_sizes, ds.token_grids, ds.ids, splits)
    ds.save(tmp_path / name); return tmp_path / name


def _args(data, val=None):
    return argparse.Namespace(data=str(data), val_data=None if val is None else str(val), window=4, data_workers=0)


def test_a_file_trains_on_its_train_split_and_validates_on_val(tmp_path):
    f = _file(tmp_path, "t.safetensors", ["train"] * 6 + ["val"] * 3 + ["test"] * 3)
    data, val = _token_data(_args(f), TrainConfig(batch_size=2), DistInfo())
    assert set(data.splits) == {"train"} and len(data) == 6 and set(val.splits) == {"val"} and len(val) == 3


def test_data_without_the_needed_split_are_refused(tmp_path):
    only_val = _file(tmp_path, "v.safetensors", ["val"] * 4)
    with pytest.raises(ValueError, match=r"records the splits \['val'\] but no 'train' split for training"):
        _token_data(_args(only_val), TrainConfig(batch_size=2), DistInfo())
    mixed = _file(tmp_path, "m.safetensors", ["train"] * 4 + ["test"] * 2)
    with pytest.raises(ValueError, match="no 'val' split for validation"):
        _token_data(_args(mixed, mixed), TrainConfig(batch_size=2), DistInfo())
    whole = _file(tmp_path, "w.safetensors", [None] * 5)                # no splits: every row
    data, val = _token_data(_args(whole), TrainConfig(batch_size=2), DistInfo())
    assert len(data) == 5 and val is None


@pytest.mark.parametrize("bad", [2.7, float("inf"), 0.0, -1.0])
def test_budgets_are_fractions_or_whole_numbers(bad):
    with pytest.raises(ValueError, match="a budget is a fraction in"):
        _budget(bad)
    assert _budget(0.5) == 0.5 and _budget(64.0) == 64


def test_bad_counts_are_refused_by_the_parser(capsys):
    for args in (["--synthetic", "-4"], ["--synthetic", "0"], ["--window", "0"]):
        with pytest.raises(SystemExit): main(args)
        assert "expected a whole number >= 1" in capsys.readouterr().err
