"""Fault injection for `python -m mmfm.train`: SIGKILL mid-run then --resume gives the uninterrupted run's losses step
for step; a non-finite loss stops naming the step and keeps the last good checkpoint; corrupted, truncated or foreign
checkpoints are refused; a half-written checkpoint never counts."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file
from mmfm.tokens import synthetic_token_dataset, TokenDataset, TokenBatch
from mmfm.train import Trainer, TrainConfig, read_checkpoint, MetricsLog, NonFiniteLossError, DistInfo
from mmfm.files import atomic_write
from mmfm.transformer import MultimodalTransformer
from mmfm.masking import MaskingConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
STEPS = 40


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    synthetic_token_dataset(80, seed=0).save(d / "train.safetensors")
    synthetic_token_dataset(24, seed=1).save(d / "val.safetensors")
    return d


def cli(data, out, *extra):
    return [sys.executable, "-m", "mmfm.train", "--data", str(data / "train.safetensors"), "--val-data",
            str(data / "val.safetensors"), "--preset", "tiny", "--steps", str(STEPS), "--batch-size", "8",
            "--input-budget", "6", "--target-budget", "6", "--lr", "3e-3", "--warmup-steps", "5", "--dropout", "0.1",
            "--checkpoint-every", "5", "--eval-every", "10", "--out", str(out), "--no-progress", *extra]


def rows(out, kind):
    keep = lambda r: {k: v for k, v in r.items() if k not in ("step_s", "tokens_per_s")}   # timings differ
    return [keep(r) for r in MetricsLog(out, [], enabled=False).rows(kind)]


def test_sigkill_then_resume_matches_uninterrupted_run(data, tmp_path):
    ref = subprocess.run(cli(data, tmp_path / "ref"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(cli(data, run), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and sum('"kind": "step"' in l for l in log.read_text().splitlines()) >= 13: break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(rows(run, "step"))
    assert 13 <= done < STEPS
    ckpt = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    assert ckpt < done or ckpt == done                  # killed after its last checkpoint
    # a half-written checkpoint left by a kill during the write must be ignored
    (run / "checkpoints" / ".step-0000099.safetensors.abc.tmp").write_bytes(b"\x00" * 10)
    resumed = subprocess.run(cli(data, run, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert rows(run, "step") == rows(tmp_path / "ref", "step")          # every step: loss, per-modality, lr, grad norm
    assert rows(run, "val") == rows(tmp_path / "ref", "val")
    assert rows(run, "epoch") == rows(tmp_path / "ref", "epoch")
    a, b = load_file(str(run / "model" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)                      # bit for bit
    csv_lines = (run / "steps.csv").read_text().splitlines()
    assert len(csv_lines) == STEPS + 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "nan"
    r = subprocess.run(cli(data, out, "--lr", "1e30", "--warmup-steps", "1", "--checkpoint-every", "1"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "non-finite loss" in r.stderr and "at step 2" in r.stderr, r.stderr
    tensors, meta = read_checkpoint(out)
    assert meta["step"] == 1 and (out / "checkpoints" / "step-0000001.safetensors").exists()
    assert not (out / "checkpoints" / "step-0000002.safetensors").exists()


def tiny_trainer(out, data, resume=False, **cfg):
    torch.manual_seed(0)
    model = MultimodalTransformer(data.vocab_sizes, data.num_tokens, cfg.pop("preset", "tiny"), token_grids=data.token_grids)
    c = TrainConfig(**{**dict(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=3, progress=False), **cfg})
    return Trainer(model, data, c, MaskingConfig(6, 6), out, resume=resume, dinfo=DistInfo())


def test_corrupted_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    data = synthetic_token_dataset(32, seed=0)
    tiny_trainer(tmp_path, data).fit()
    ck = tmp_path / "checkpoints" / "step-0000006.safetensors"
    good = ck.read_bytes()
    with pytest.raises(ValueError, match="checkpoint was made with a different configuration: .*d_model"):
        torch.manual_seed(0)
        other = MultimodalTransformer(data.vocab_sizes, data.num_tokens, "tiny", token_grids=data.token_grids, d_model=32)
        Trainer(other, data, TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=3, progress=False),
                MaskingConfig(6, 6), tmp_path, resume=True, dinfo=DistInfo())
    with pytest.raises(ValueError, match="masking.input_budget"):
        torch.manual_seed(0)
        m = MultimodalTransformer(data.vocab_sizes, data.num_tokens, "tiny", token_grids=data.token_grids)
        Trainer(m, data, TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=3, progress=False),
                MaskingConfig(5, 6), tmp_path, resume=True, dinfo=DistInfo())
    flipped = bytearray(good); flipped[len(good) // 2] ^= 0x01
    ck.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"): tiny_trainer(tmp_path, data, resume=True)
    ck.write_bytes(good[: len(good) - 1000]); ck.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match="truncated or corrupted"): tiny_trainer(tmp_path, data, resume=True)
    with pytest.raises(FileExistsError, match="already holds a run"): tiny_trainer(tmp_path, data)


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    def half_then_die(p):
        Path(p).write_bytes(b"new, half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): atomic_write(target, half_then_die)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_resume_with_an_iterable_of_token_batches(tmp_path):
    "Batches from a plain iterable (no indices): masks come from the trainer's generator, which is checkpointed too."
    data = synthetic_token_dataset(48, seed=0)
    batches = [TokenBatch(b.ids, b.tokens, b.present) for b in (data.batch(range(i, i + 8)) for i in range(0, 48, 8))]
    torch.manual_seed(0)
    model = MultimodalTransformer(data.vocab_sizes, data.num_tokens, "tiny", token_grids=data.token_grids)
    cfg = TrainConfig(steps=9, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=4, progress=False)
    Trainer(model, batches, cfg, MaskingConfig(6, 6), tmp_path / "a", dinfo=DistInfo()).fit()
    torch.manual_seed(0)
    model = MultimodalTransformer(data.vocab_sizes, data.num_tokens, "tiny", token_grids=data.token_grids)
    crashing = Trainer(model, batches, cfg, MaskingConfig(6, 6), tmp_path / "b", dinfo=DistInfo())
    step = crashing.train_step
    def crash_at_7(*a):
        if crashing.step == 6: raise KeyboardInterrupt("simulated crash")
        return step(*a)
    crashing.train_step = crash_at_7
    with pytest.raises(KeyboardInterrupt): crashing.fit()              # dies after step 6; last checkpoint: step 4
    torch.manual_seed(123)                                   # the resumed run must not depend on fresh init
    model = MultimodalTransformer(data.vocab_sizes, data.num_tokens, "tiny", token_grids=data.token_grids)
    Trainer(model, batches, cfg, MaskingConfig(6, 6), tmp_path / "b", resume=True, dinfo=DistInfo()).fit()
    assert rows(tmp_path / "b", "step") == rows(tmp_path / "a", "step")
