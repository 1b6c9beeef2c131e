"""Token shards end to end: `tokenize` equals `TokenDataset.encode` (also in parallel and through `mmfm tokenize`), an
interrupted tokenize resumes to the same bytes (and
refuses to resume on other input data), Hugging Face `datasets` reads the shards, a `TokenStream` epoch covers
every training row once (2 ranks, 2 DataLoader workers), training on a stream killed and resumed ends with the
uninterrupted run's weights, and tokens of other codecs are refused."""
import json, os, subprocess, sys, warnings
from pathlib import Path
import numpy as np, pandas as pd
import pytest
import torch
from mmfm.data import MultiSourceDataset, Source, TableLoader, NpyLoader
from mmfm.files import sha256_file
from mmfm.masking import MaskingConfig
from mmfm.testing import ToyTable, ToyImage, ToyImageCodec, toy_manager, toy_table, toy_image
from mmfm.tokens import TokenDataset, CodecMismatchError
from mmfm.fit_codecs import training_sample
from mmfm.token_shards import tokenize_dataset, TokenShards, TokenStream, main as tokenize_main
from mmfm.train import Trainer, TrainConfig, DistInfo, MetricsLog
from mmfm.transformer import MultimodalTransformer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def toy_dataset(root: Path, n: int = 30, seed: int = 0) -> MultiSourceDataset:
    "n samples: a toy table row each, a toy image for two in three, splits train/train/val/test in turn."
    (root / "img").mkdir(parents=True, exist_ok=True)
    tab, img = toy_table(n=n, seed=seed), toy_image(n=n, seed=seed)
    pd.DataFrame(tab.as_matrix().numpy(), columns=list(ToyTable.columns)).to_csv(root / "t.csv", index=False)
    man = []
    for i in range(n):
        s = {"id": f"s{i:03d}", "split": ["train", "train", "val", "test"][i % 4], "table_row": i}
        if i % 3: np.save(root / "img" / f"{i}.npy", img.flux[i].numpy()); s["image"] = f"img/{i}.npy"
        man.append(s)
    return MultiSourceDataset(root, man, [Source("table_row", ToyTable, TableLoader("t.csv")),
                                          Source("image", ToyImage, NpyLoader("flux"))])


def digests(folder: Path) -> dict:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return toy_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tokens(data, tmp_path_factory):
    return tokenize_dataset(data, toy_manager(), tmp_path_factory.mktemp("tok") / "t", shard_size=4, verbose=False)


def test_shards_equal_token_dataset_encode_with_an_uneven_last_shard(data, tokens):
    ref = TokenDataset.encode(data, toy_manager(), batch_size=4, progress_bar=False)
    assert [s["rows"] for s in tokens.shards] == [4] * 7 + [2]
    mem = tokens.to_token_dataset()
    assert mem.ids == ref.ids and mem.splits == ref.splits and len(tokens) == 30
    for k in ref.tokens:
        assert torch.equal(mem.tokens[k], ref.tokens[k]) and torch.equal(mem.present[k], ref.present[k])
    starts = [int(tokens.read_shard(k).index[0]) for k in range(8)]
    assert starts == list(range(0, 30, 4))                      # shard k holds rows 4k, 4k+1, ...
    assert tokens.splits == {"test": 7, "train": 16, "val": 7}
    assert tokens.info["dtypes"] == {"tok_toy_table": "int16", "tok_toy_image": "int16"}


def test_parallel_tokenize_writes_the_same_bytes(data, tokens, tmp_path):
    two = tokenize_dataset(data, toy_manager(), tmp_path / "two", shard_size=4, workers=2, verbose=False)
    assert digests(two.root) == digests(tokens.root)


class Dies:
    "The data set, but reading sample `at` raises (a crash in the middle of tokenize)."
    def __init__(self, ds, at): self.ds, self.at = ds, at
    def __len__(self): return len(self.ds)
    def __getitem__(self, i):
        if i == self.at: raise KeyboardInterrupt(f"simulated crash at sample {i}")
        return self.ds[i]
    def __getattr__(self, name): return getattr(self.ds, name)


def test_tokenize_interrupted_then_rerun_equals_uninterrupted(data, tokens, tmp_path, capsys):
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt): tokenize_dataset(Dies(data, 13), toy_manager(), out, shard_size=4)
    done = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert done == [f"shard-0000{k}.parquet" for k in range(3)]          # shards 0-2 finished, 3 never written
    assert not (out / "tokens.json").exists() and not list(out.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="tokenize has not finished"): TokenShards(out)
    capsys.readouterr()
    tokenize_dataset(data, toy_manager(), out, shard_size=4)
    assert "3 of 8 shards already done" in capsys.readouterr().out
    assert digests(out) == digests(tokens.root)


@pytest.mark.parametrize("kind", ["manifest", "sample shards"])
def test_a_rerun_on_other_input_data_is_refused(kind, tmp_path):
    "Tokens written from one data set are not reused for another with the same ids and layout (another seed)."
    from mmfm.shards import write_shards, ShardDataset
    def dataset(seed):
        ds = toy_dataset(tmp_path / f"data{seed}", n=12, seed=seed)
        if kind == "manifest": return ds
        write_shards(tmp_path / f"shards{seed}", ds, shard_size=4, progress_bar=False)
        return ShardDataset(tmp_path / f"shards{seed}")
    first, second = dataset(0), dataset(1)
    out = tmp_path / "tok"
    tokenize_dataset(first, toy_manager(), out, shard_size=4, verbose=False)
    before = digests(out)
    with pytest.raises(ValueError, match="made from other input data"):
        tokenize_dataset(second, toy_manager(), out, shard_size=4, verbose=False)
    assert digests(out) == before                                   # nothing of the first token set was touched
    again = tokenize_dataset(first, toy_manager(), out, shard_size=4, verbose=False)   # the same data: all reused
    assert digests(out) == before and len(again) == 12
    fresh = tokenize_dataset(second, toy_manager(), tmp_path / "tok2", shard_size=4, verbose=False)
    assert not torch.equal(fresh.to_token_dataset().tokens["tok_toy_table"], again.to_token_dataset().tokens["tok_toy_table"])


def test_hugging_face_datasets_reads_the_shards(tokens, tmp_path):
    datasets = pytest.importorskip("datasets")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    files = [str(tokens.root / s["file"]) for s in tokens.shards]
    hf = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(hf) == 30 and hf[0]["id"] == "s000" and hf[29]["index"] == 29
    mem = tokens.to_token_dataset()
    assert hf[5]["tok_toy_image"] == mem.tokens["tok_toy_image"][5].tolist()
    assert hf[3]["tok_toy_image.present"] is False and hf[4]["tok_toy_image.present"] is True


def epoch_rows(stream, epoch=0, batches=60):
    "Row numbers of `epoch` among the first batches of a stream (through its DataLoader when it has workers)."
    it, rows = iter(stream.loader()), []
    for _ in range(batches):
        b = next(it); rows += [int(i) for i, e in zip(b.index, b.epoch) if e == epoch]
    return rows


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_epoch_covers_every_train_row_once_over_ranks_and_workers(tokens, workers):
    mem = tokens.to_token_dataset()
    train = sorted(i for i, s in enumerate(mem.splits) if s == "train")
    ranks = [epoch_rows(TokenStream(tokens, 3, window=2, seed=5, rank=r, world_size=2, num_workers=workers))
             for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == train                  # each train row once: disjoint and covering
    assert ranks[0] and ranks[1]
    make = lambda: TokenStream(tokens, 3, window=2, seed=5, num_workers=workers)
    first, second = epoch_rows(make(), 0), epoch_rows(make(), 1)
    assert sorted(first) == sorted(second) == train and first != second      # every epoch, in a new order


def test_a_stream_reads_only_a_window_of_shards_at_a_time(tokens, monkeypatch):
    reads = []
    real = TokenShards.read_shard
    monkeypatch.setattr(TokenShards, "read_shard", lambda self, k, split=None: reads.append(k) or real(self, k, split))
    it = iter(TokenStream(tokens, 2, window=2, seed=0))
    next(it)
    assert len(reads) == 2                                     # the first window only


def stream_trainer(tokens, out, workers, resume=False, crash_after=None):
    torch.manual_seed(0)
    m = MultimodalTransformer(tokens.vocab_sizes, tokens.num_tokens, "tiny", token_grids=tokens.token_grids)
    cfg = TrainConfig(steps=10, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=3, eval_every=5, progress=False)
    t = Trainer(m, TokenStream(tokens, 4, window=2, seed=0, num_workers=workers), cfg, MaskingConfig(2, 1), out,
                val_data=tokens, resume=resume, dinfo=DistInfo(), codecs=toy_manager())
    if crash_after is not None:
        step = t.train_step
        def crash(*a):
            if t.step == crash_after: raise KeyboardInterrupt("simulated crash")
            return step(*a)
        t.train_step = crash
    return t


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_training_killed_and_resumed_equals_uninterrupted(tokens, tmp_path, workers):
    whole = stream_trainer(tokens, tmp_path / "whole", workers); whole.fit()
    cut = stream_trainer(tokens, tmp_path / "cut", workers, crash_after=7)
    with pytest.raises(KeyboardInterrupt): cut.fit()                  # after step 7; last checkpoint: step 6
    torch.manual_seed(123)                                            # nothing may depend on a fresh init
    resumed = stream_trainer(tokens, tmp_path / "cut", workers, resume=True); resumed.fit()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                    # bit for bit
    rows = lambda d: [{k: v for k, v in r.items() if k not in ("step_s", "tokens_per_s")}
                      for r in MetricsLog(d, [], enabled=False).rows("step")]
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole") and len(rows(tmp_path / "whole")) == 10


def test_tokens_of_other_codecs_are_refused(tokens, tmp_path):
    other = toy_manager(); other.register(ToyImageCodec(patch=2), replace=True)
    with pytest.raises(CodecMismatchError, match="token key 'tok_toy_image'"): tokens.check_codecs(other)
    with pytest.raises(CodecMismatchError, match="token key 'tok_toy_image'"):
        Trainer(MultimodalTransformer(tokens.vocab_sizes, tokens.num_tokens, "tiny", token_grids=tokens.token_grids),
            TokenStream(tokens, 4), TrainConfig(steps=1, batch_size=4, progress=False), MaskingConfig(2, 1),
            tmp_path / "no", dinfo=DistInfo(), codecs=other)
    other.save(tmp_path / "other")
    r = subprocess.run([sys.executable, "-m", "mmfm.train", "--data", str(tokens.root), "--codecs", str(tmp_path / "other"),
                        "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--input-budget", "2",
                        "--target-budget", "1", "--out", str(tmp_path / "cli"), "--no-progress"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "token key 'tok_toy_image'" in r.stderr, r.stderr


def test_mmfm_tokenize_on_the_diabetes_data(tmp_path):
    from mmfm.medical import build_diabetes, medical_codecs, diabetes_sources
    build_diabetes(tmp_path / "dia")
    codecs = medical_codecs("diabetes")
    dia = MultiSourceDataset(tmp_path / "dia", "manifest.json", diabetes_sources())
    for m in training_sample(dia, [s.name for s in dia.sources]).values(): codecs.codec_for(type(m)).prepare(m)
    codecs.save(tmp_path / "codecs")
    args = ["--data", str(tmp_path / "dia"), "--codecs", str(tmp_path / "codecs"), "--out", str(tmp_path / "tok"),
            "--shard-size", "100", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # codecs prepared on train: test values outside their ranges
        assert tokenize_main(args + ["--workers", "2"]) == 0
        ref = TokenDataset.encode(MultiSourceDataset(tmp_path / "dia", "manifest.json", diabetes_sources()), codecs,
                                  progress_bar=False)
    tok = TokenShards(tmp_path / "tok")
    assert [s["rows"] for s in tok.shards] == [100] * 4 + [42]
    mem = tok.to_token_dataset()
    assert mem.ids == ref.ids and mem.splits == ref.splits
    for k in ref.tokens: assert torch.equal(mem.tokens[k], ref.tokens[k]) and torch.equal(mem.present[k], ref.present[k])
    tok.check_codecs(codecs)


def test_the_trainer_epoch_never_goes_back_with_several_workers(tmp_path):
    "Two DataLoader workers end their passes at different batches; the step log's epoch still only grows."
    ts = tokenize_dataset(toy_dataset(tmp_path / "d", n=20), toy_manager(), tmp_path / "tok", shard_size=4,
                          verbose=False)
    m = MultimodalTransformer(ts.vocab_sizes, ts.num_tokens, "tiny", token_grids=ts.token_grids)
    cfg = TrainConfig(steps=14, batch_size=2, warmup_steps=1, checkpoint_every=0, eval_every=0, progress=False)
    t = Trainer(m, TokenStream(ts, 2, window=1, shuffle=False, num_workers=2), cfg, MaskingConfig(2, 1),
                tmp_path / "run", dinfo=DistInfo())
    t.fit()
    epochs = [r["epoch"] for r in t.log.rows("step")]
    assert epochs == sorted(epochs) and epochs[-1] >= 1, epochs
    ended = [r["epoch"] for r in t.log.rows("epoch")]
    assert ended == sorted(set(ended)), ended


def test_a_workers_data_error_reaches_the_caller_whole(tmp_path):
    "A sample's DataError raised in a tokenize worker process arrives as that DataError (it used to break the pool)."
    from mmfm.data import DataError
    made = toy_dataset(tmp_path / "d", n=12)
    t = pd.read_csv(tmp_path / "d" / "t.csv"); t.iloc[9, 1] = np.nan; t.to_csv(tmp_path / "d" / "t.csv", index=False)
    ds = MultiSourceDataset(tmp_path / "d", [dict(s) for s in made.samples],          # read the edited table
                            [Source("table_row", ToyTable, TableLoader("t.csv")), Source("image", ToyImage, NpyLoader("flux"))])
    with pytest.raises(DataError, match="sample 's009', source 'table_row'"):
        tokenize_dataset(ds, toy_manager(), tmp_path / "tok", shard_size=4, workers=2, verbose=False)


def test_tokenize_never_writes_into_a_sample_shard_folder(data, tmp_path):
    "Both formats name their files shard-NNNNN.parquet: a token set written over sample shards would destroy them."
    from mmfm.shards import write_shards
    write_shards(tmp_path / "samples", data, shard_size=8, progress_bar=False)
    before = digests(tmp_path / "samples")
    with pytest.raises(FileExistsError, match="already holds sample shards"):
        tokenize_dataset(data, toy_manager(), tmp_path / "samples", shard_size=4, verbose=False)
    assert digests(tmp_path / "samples") == before


def test_samples_a_manifest_leaves_out_are_counted(tmp_path):
    "A sample with none of the codecs' modalities is left out and counted, in manifest mode as in shard mode."
    made = toy_dataset(tmp_path / "d", n=8)
    man = [dict(s) for s in made.samples]
    del man[3]["table_row"]; man[3].pop("image", None)                  # sample s003: nothing to encode
    ds = MultiSourceDataset(tmp_path / "d", man, [Source("table_row", ToyTable, TableLoader("t.csv")),
                                                 Source("image", ToyImage, NpyLoader("flux"))], drop_empty=True)
    assert ds.dropped == ["s003"]
    tok = tokenize_dataset(ds, toy_manager(), tmp_path / "tok", shard_size=4, verbose=False)
    assert len(tok) == 7 and tok.info["left_out"] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_pool_workers_ask_to_die_with_their_parent():
    "A tokenize pool process asks the kernel for SIGTERM when its parent dies (a SIGKILLed tokenize left them running)."
    code = ("import ctypes, os, signal; from mmfm.token_shards import _die_with_parent\n"
            "assert _die_with_parent(os.getppid())\n"
            "v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); print(v.value == signal.SIGTERM)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-1000:]
