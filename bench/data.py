"""Samples per second through MultiSourceDataset + collate + encode_batch, with 0 and 2 worker processes.

Data: N toy samples on disk (a CSV table, one .npy image and one .npy series per sample, ~30 % of each source missing),
encoded with the toy codecs of mmfm.testing (no learned weights, so the figure measures the data path).
Usage: python bench/data.py [--n 2000] [--batch-size 64]
"""
import argparse, json, tempfile, time
from pathlib import Path
import numpy as np, pandas as pd, torch
from torch.utils.data import DataLoader
from mmfm.data import MultiSourceDataset, Source, TableLoader, NpyLoader
from mmfm.tokens import encode_batch
from mmfm.testing import ToyTable, ToyImage, ToySeries, toy_table, toy_image, toy_series, toy_manager

def build(root: Path, n: int):
    tab, img, ser = toy_table(n=n), toy_image(n=n), toy_series(n=n)
    pd.DataFrame(tab.as_matrix().numpy(), columns=list(ToyTable.columns)).to_csv(root / "t.csv", index=False)
    rng, samples = np.random.default_rng(0), []
    for i in range(n):
        s = {"id": f"s{i}", "t_row": i}
        if rng.random() < 0.7: np.save(root / f"i{i}.npy", img.flux[i].numpy()); s["image"] = f"i{i}.npy"
        if rng.random() < 0.7: np.save(root / f"r{i}.npy", ser.signal[i].numpy()); s["series"] = f"r{i}.npy"
        samples.append(s)
    (root / "m.json").write_text(json.dumps({"samples": samples}))
    return MultiSourceDataset(root, "m.json", [Source("t_row", ToyTable, TableLoader("t.csv")),
                                               Source("image", ToyImage, NpyLoader("flux")),
                                               Source("series", ToySeries, NpyLoader("signal"))])

def run(ds, manager, workers, batch_size):
    dl = DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for batch in dl: n += len(encode_batch(manager, batch))
    return n / (time.perf_counter() - t0)

if __name__ == "__main__":
    p = argparse.ArgumentParser(); p.add_argument("--n", type=int, default=2000); p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        ds = build(Path(d), a.n)
        manager = toy_manager().freeze()
        rates = {w: run(ds, manager, w, a.batch_size) for w in (0, 2)}
    print(f"samples: {a.n}, batch size {a.batch_size}, sources: table + image (4x16x16) + series (64)")
    for w, r in rates.items(): print(f"workers={w}: {r:8.0f} samples/s")
    print(f"ratio 2 workers / 0 workers: {rates[2] / rates[0]:.2f}x")
