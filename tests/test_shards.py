"""Sample shards beyond the notebook: a real `mmfm simulate --shards` process killed (SIGKILL) in the middle of
its run and resumed by the same command gives the same shards as an uninterrupted run; a torch DataLoader with
worker processes reads a ShardDataset; a shard that disappears between opening and reading is named; shards of
modalities made at run time (a data frame's tables) are read by another process."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from torch.utils.data import DataLoader
from mmfm.shards import ShardDataset, read_shard_index, write_shards, JOURNAL_DIR
from mmfm.data import Sample
from mmfm.testing import ToyTable, ToyImage, toy_table, toy_image

ROOT = Path(__file__).resolve().parents[1]
# small stamps: a galaxy takes a few milliseconds, a shard of 4 about a tenth of a second
ARGS = ["--n", "40", "--seed", "2", "--shards", "--shard-size", "4", "--quiet",
        "--legacy-size", "12", "--hsc-size", "12", "--gaia-size", "6"]


def simulate(out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "mmfm.cli", "simulate", "--out", str(out), *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait: return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_killed_simulate_resumes_to_the_same_shards(tmp_path):
    whole = simulate(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    proc = simulate(tmp_path / "killed", wait=False)
    journal = tmp_path / "killed" / JOURNAL_DIR
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(journal.glob("*.json"))) < 3:
        if proc.poll() is not None: break
        time.sleep(0.02)
    finished_before_kill = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    n_done = len(list(journal.glob("*.json")))
    if finished_before_kill or n_done == 10: pytest.skip("the run finished before it could be killed")
    assert n_done >= 3, n_done
    assert not (tmp_path / "killed" / "shards.json").exists()          # the index is written last
    for p in (tmp_path / "killed").glob("shard-*.parquet"):          # what the kill left is complete
        assert p.read_bytes() == (tmp_path / "whole" / p.name).read_bytes(), p.name
    with pytest.raises(FileNotFoundError, match="rerun it to resume"): ShardDataset(tmp_path / "killed")
    resumed = simulate(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert list((tmp_path / "killed").rglob("*.tmp")) == []             # temp files of the kill are removed
    assert shard_bytes(tmp_path / "killed") == shard_bytes(tmp_path / "whole")
    assert read_shard_index(tmp_path / "killed") == read_shard_index(tmp_path / "whole")
    assert len(ShardDataset(tmp_path / "killed")) == 40


def toy_items(n):
    for i in range(n):
        mods = {"table": toy_table(1, seed=i)}
        if i % 2: mods["image"] = toy_image(1, seed=i)
        yield Sample(f"t{i:03d}", mods), ("train" if i % 4 else "test")


def test_dataloader_workers_read_shards(tmp_path, one_thread):
    write_shards(tmp_path, toy_items(30), {"table": ToyTable, "image": ToyImage}, shard_size=7, progress_bar=False)
    ds = ShardDataset(tmp_path)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=ds.collate,
                        multiprocessing_context="fork")
    batches = list(loader)
    assert sum((b.ids for b in batches), []) == ds.ids
    assert torch.cat([b.present["image"] for b in batches]).tolist() == [i % 2 == 1 for i in range(30)]
    images = torch.cat([b.mods["image"].flux for b in batches if "image" in b.mods])
    assert torch.equal(images, torch.cat([toy_image(1, seed=i).flux for i in range(1, 30, 2)]))


def test_shard_removed_after_opening_is_named(tmp_path):
    write_shards(tmp_path, toy_items(10), {"table": ToyTable, "image": ToyImage}, shard_size=4, progress_bar=False)
    ds = ShardDataset(tmp_path)
    (tmp_path / "shard-00002.parquet").unlink()
    assert ds[0].id == "t000"
    with pytest.raises(FileNotFoundError, match="shard-00002.parquet"): ds[9]


def test_index_of_another_format_is_refused(tmp_path):
    (tmp_path / "shards.json").write_text(json.dumps({"format": "something-else"}))
    from mmfm.files import FileFormatError
    with pytest.raises(FileFormatError, match="not an mmfm-shards shard index"): ShardDataset(tmp_path)


def test_shards_of_a_data_frame_are_read_by_another_process(tmp_path):
    "Modalities made at run time (`frame_dataset`) are made again from their recorded definition in a new process."
    import numpy as np, pandas as pd
    from mmfm.frames import frame_dataset
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=12), "b": rng.normal(size=12), "c": rng.normal(size=12)})
    df.loc[3, ["a", "b"]] = np.nan                                   # sample 3 has no LabA
    ds = frame_dataset(df, {"LabA": ["a", "b"], "LabB": ["c"]})
    write_shards(tmp_path / "fr", ds, sources=ds.modalities, shard_size=5, progress_bar=False)
    index = read_shard_index(tmp_path / "fr")
    assert index["sources"]["LabA"]["definition"]["columns"] == ["a", "b"]
    code = ("import sys; from mmfm.shards import ShardDataset; ds = ShardDataset(sys.argv[1]); "
            "s = ds[3]; print(len(ds), sorted(s.mods), float(ds[0].mods['LabB'].as_matrix()[0, 0]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fr")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    n, mods, c0 = r.stdout.split(" ", 1)[0], r.stdout.split("[", 1)[1].split("]")[0], float(r.stdout.split()[-1])
    assert n == "12" and mods == "'LabB'" and abs(c0 - df.c[0]) < 1e-6, r.stdout


def test_an_edited_dtype_never_truncates_values(tmp_path):
    "shards.json's dtype is trusted only while it keeps the stored values (int64 over float32 redshifts used to give 0)."
    import json
    from mmfm.data import DataError
    from mmfm.simulate import SimConfig, simulate_dataset
    from mmfm.shards import ShardDataset
    simulate_dataset(tmp_path / "s", SimConfig(n_galaxies=12, seed=1), shards=True, shard_size=6)
    ix = json.loads((tmp_path / "s" / "shards.json").read_text())
    ix["sources"]["spec_z"]["fields"]["z"]["dtype"] = "int64"
    (tmp_path / "s" / "shards.json").write_text(json.dumps(ix))
    ds = ShardDataset(tmp_path / "s")
    with pytest.raises(DataError, match="the index gives dtype int64, which changes the stored float32 values"):
        for i in range(len(ds)): ds[i]
