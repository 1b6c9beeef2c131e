"""DDP on CPU (gloo) with torchrun: gradients equal those of one process on the concatenated batch, and the training
command under torchrun is deterministic (the same run twice: losses, gradient norms, weights). Masks are drawn for
each process's part of the batch at once (seeded by its rows), so a 2-process run draws other masks than a 1-process
run on the same data: its mathematics are the first test's, its draws are its own."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file
from mmfm.train import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(cmd, timeout=240):
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_ddp_gradients_equal_single_process_on_the_concatenated_batch(tmp_path):
    out = tmp_path / "grads.json"
    run(TORCHRUN + [str(ROOT / "tests" / "ddp_worker.py"), str(out)])
    r = json.loads(out.read_text())
    assert r["max_abs_diff"] <= 1e-5 * r["grad_scale"] + 1e-7, r
    assert abs(r["loss"] - r["ref_loss"]) < 1e-5, r
    # the test has teeth: normalising by each process's own target counts would not match
    assert r["naive_max_abs_diff"] > 100 * max(r["max_abs_diff"], 1e-8), r


def test_torchrun_training_is_deterministic(tmp_path):
    args = ["--synthetic", "64", "--preset", "tiny", "--steps", "6", "--batch-size", "8", "--input-budget", "6",
            "--target-budget", "6", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "3", "--checkpoint-every", "3",
            "--no-progress"]
    run(TORCHRUN + ["-m", "mmfm.train", *args, "--out", str(tmp_path / "one")])
    run(TORCHRUN + ["-m", "mmfm.train", *args, "--out", str(tmp_path / "two")])
    for kind in ("step", "val"):
        one = MetricsLog(tmp_path / "one", [], enabled=False).rows(kind)
        two = MetricsLog(tmp_path / "two", [], enabled=False).rows(kind)
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):
            for k in a:
                if k.startswith(("loss", "acc")) or k in ("grad_norm", "targets", "lr"):
                    assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (kind, a["step"], k, a[k], b[k])
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert (tmp_path / "two" / "checkpoints" / "latest.json").exists()          # rank 0 checkpointed


def test_torchrun_on_a_token_stream_resumes_exactly(tmp_path):
    "Two processes stream disjoint shards of a token set; a run cut after its step-3 checkpoint and resumed ends as the whole run."
    import shutil
    from mmfm.testing import toy_manager
    from mmfm.token_shards import tokenize_dataset
    from mmfm.train import read_checkpoint
    from test_token_shards import toy_dataset
    tokenize_dataset(toy_dataset(tmp_path / "data", n=40), toy_manager(), tmp_path / "tok", shard_size=4, verbose=False)
    toy_manager().save(tmp_path / "codecs")
    args = ["--data", str(tmp_path / "tok"), "--codecs", str(tmp_path / "codecs"), "--preset", "tiny", "--steps", "6",
            "--batch-size", "8", "--input-budget", "2", "--target-budget", "1", "--lr", "3e-3", "--warmup-steps", "2",
            "--checkpoint-every", "3", "--eval-every", "3", "--no-progress"]
    run(TORCHRUN + ["-m", "mmfm.train", *args, "--out", str(tmp_path / "a")])
    _, meta = read_checkpoint(tmp_path / "a")
    assert [s["rank"] for s in meta["stream"]] == [0, 1] and meta["world_size"] == 2
    cut = tmp_path / "b"
    shutil.copytree(tmp_path / "a", cut)                    # as if killed right after the step-3 checkpoint
    shutil.rmtree(cut / "model")
    for p in (cut / "checkpoints").glob("step-0000006.*"): p.unlink()
    (cut / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "file": "step-0000003.safetensors"}))
    run(TORCHRUN + ["-m", "mmfm.train", *args, "--out", str(cut), "--resume"])
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(cut / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = lambda d: [{k: v for k, v in r.items() if k not in ("step_s", "tokens_per_s")}
                      for r in MetricsLog(d, [], enabled=False).rows("step")]
    assert keep(cut) == keep(tmp_path / "a") and len(keep(cut)) == 6
