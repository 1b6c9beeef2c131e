"""Alignment of multi-source batches (row b is sample b in every stream; "How mmfm works", nbs/design.ipynb),
for random patterns of missing sources.

Every sample writes its own index into its table row, image and series, so after collate and encode each token row
can be traced back to the sample it came from: row b of every token tensor must be the tokens of sample ids[b].
"""
import json
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st
from torch.utils.data import DataLoader

from mmfm.data import MultiSourceDataset, Source, TableLoader, NpyLoader, collate
from mmfm.tokens import encode_batch
from mmfm.testing import ToyTable, ToyImage, ToySeries, toy_table, toy_image, toy_series, toy_manager

N = 12

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    tab, img, ser = toy_table(n=N, seed=7), toy_image(n=N, seed=7), toy_series(n=N, seed=7)
    pd.DataFrame(tab.as_matrix().numpy(), columns=list(ToyTable.columns)).to_csv(root / "t.csv", index=False)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(N):
        np.save(root / f"i{i}.npy", img.flux[i].numpy()); np.save(root / f"s{i}.npy", ser.signal[i].numpy())
        s = {"id": f"id{i:02d}"}
        keep = rng.random(3) < 0.6
        if not keep.any(): keep[i % 3] = True
        if keep[0]: s["t_row"] = i
        if keep[1]: s["image"] = f"i{i}.npy"
        if keep[2]: s["series"] = f"s{i}.npy"
        samples.append(s)
    (root / "m.json").write_text(json.dumps({"samples": samples}))
    ds = MultiSourceDataset(root, "m.json", [Source("t_row", ToyTable, TableLoader("t.csv")),
                                              Source("image", ToyImage, NpyLoader("flux")),
                                              Source("series", ToySeries, NpyLoader("signal"))])
    return ds

@pytest.fixture(scope="module")
def manager(): return toy_manager()

def reference_tokens(ds, manager, sid):
    "Tokens of one sample encoded alone: {token_key: Long[N]} for the sources it has."
    alone = ds[ds.ids.index(sid)]
    return {type(m).token_key: manager.encode(m)[type(m).token_key][0] for m in alone.mods.values()}

def assert_aligned(ds, manager, tb):
    for b, sid in enumerate(tb.ids):
        ref = reference_tokens(ds, manager, sid)
        for key in tb.tokens:
            assert bool(tb.present[key][b]) == (key in ref), (sid, key)
            if key in ref: assert torch.equal(tb.tokens[key][b], ref[key]), (sid, key)

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.integers(0, N - 1), min_size=1, max_size=N, unique=True))
def test_any_subset_and_order_is_aligned(dataset, manager, order):
    batch = dataset.collate([dataset[i] for i in order])
    tb = encode_batch(manager, batch)
    assert tb.ids == [dataset.ids[i] for i in order]
    assert_aligned(dataset, manager, tb)

def test_samples_miss_different_sources(dataset):
    pattern = dataset.presence()
    assert pattern.any(axis=1).all()
    assert len({tuple(r) for r in pattern.to_numpy()}) >= 3, "the fixture should mix several presence patterns"

def test_batch_size_one(dataset, manager):
    for i in range(N):
        tb = encode_batch(manager, dataset.collate([dataset[i]]))
        assert all(t.shape[0] == 1 for t in tb.tokens.values())
        assert_aligned(dataset, manager, tb)

@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_workers(dataset, manager, workers):
    dl = DataLoader(dataset, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0),
                    collate_fn=dataset.collate, num_workers=workers)
    seen = []
    for batch in dl:
        assert_aligned(dataset, manager, encode_batch(manager, batch)); seen += batch.ids
    assert sorted(seen) == sorted(dataset.ids)

def test_plain_collate_infers_names(dataset):
    batch = collate([dataset[0], dataset[1]])
    for name, mask in batch.present.items():
        assert mask.shape == (2,) and name in batch.mods
