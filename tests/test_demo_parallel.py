"""`mmfm demo` with jobs at once (`run_demo(workers=...)`, nbs/examples/90_demo.ipynb): a job's results do not
depend on whether it ran in a worker process or in this one, a failing job's error names its example, seed and log,
and the command line passes `--workers` and `--resume` on."""
import json, os, random, textwrap

import numpy as np
import pytest
import torch

import mmfm.examples.demo as demo


def _without_seconds(x):
    "The results without their `seconds` entries (ACTG 175 reports its run time among its results)."
    if isinstance(x, dict): return {k: _without_seconds(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list): return [_without_seconds(v) for v in x]
    return x


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    "A stand-in example in a module file (a spawned worker imports it): seed 1 fails, the others score 1 + seed."
    name = f"mmfm_demo_stand_in_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        from mmfm.examples.results import metric
        def run(size, out_dir, data_dir, seed):
            print(f"stand-in running, seed {seed}")
            if seed == 1: raise ValueError("no galaxies for seed 1")
            return {"score": metric(1.0 + seed, 0.5, "chance", True, "a score")}
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(demo.EXAMPLES, "stand_in", name)
    return tmp_path


def test_a_job_gives_the_same_results_in_a_worker_and_here(tmp_path):
    "ACTG 175 (the fastest example at the tiny size) at one torch thread, here after other draws, and in a worker."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(123); np.random.seed(123); random.seed(123)   # the example must not lean on global state
    try: here = demo.run_demo("tiny", tmp_path / "here", tmp_path / "data", examples=["actg"], workers=1)
    finally: torch.set_num_threads(before)
    workers = max(2, os.cpu_count() or 1)                      # one job: one process of cpus // workers = 1 thread
    there = demo.run_demo("tiny", tmp_path / "there", tmp_path / "data", examples=["actg"], workers=workers)
    assert (there["machine"]["workers"], there["machine"]["threads"]) == (workers, 1)
    assert here["machine"]["workers"] == 1
    a, b = _without_seconds(here["results"]), _without_seconds(there["results"])
    assert a == b, json.dumps([a, b])[:3000]
    assert isinstance(a["actg"]["cd420_rmse"]["model"], float)
    saved = json.loads((tmp_path / "there" / "actg" / "result.json").read_text())
    assert (saved["example"], saved["size"], saved["seed"]) == ("actg", "tiny", 0)
    assert _without_seconds(saved["results"]) == b["actg"]
    assert "== actg example (tiny, seed 0)" in (tmp_path / "there" / "actg" / "demo.log").read_text()


def test_a_failing_job_is_named_with_its_seed_and_log(stand_in, capsys):
    out = stand_in / "out"
    with pytest.raises(RuntimeError) as e:
        demo.run_demo("tiny", out, stand_in / "data", examples=["stand_in"], seeds=[0, 1], workers=2)
    log = out / "seed1" / "stand_in" / "demo.log"
    msg = str(e.value)
    assert "stand_in example, seed 1" in msg and str(log) in msg and "ValueError: no galaxies for seed 1" in msg, msg
    assert "seed 0" not in msg, msg                                       # the other job ended well
    assert "Traceback" in log.read_text() and "stand-in running, seed 1" in log.read_text()
    assert json.loads((out / "seed0" / "stand_in" / "result.json").read_text())["results"]["score"]["model"] == 1.0
    assert not (out / "metrics.json").exists()
    printed = capsys.readouterr().out
    assert "(tiny, seed 0): done in" in printed and "(tiny, seed 1): failed after" in printed, printed


def test_the_command_line_passes_workers_and_resume_on(stand_in, capsys):
    out, data = str(stand_in / "out"), str(stand_in / "data")
    args = ["--size", "tiny", "--only", "stand_in", "--seeds", "0", "2", "--out", out, "--data", data]
    first = demo.main(args + ["--workers", "2"])
    assert first["machine"]["workers"] == 2 and set(first["seconds"]) == {"stand_in", "wall"}
    assert first["per_seed"]["2"]["stand_in"]["score"]["model"] == 3.0
    capsys.readouterr()
    again = demo.main(args + ["--resume"])
    printed = capsys.readouterr().out
    assert printed.count(": reusing ") == 2 and "done in" not in printed, printed
    assert again["results"] == first["results"]
    with pytest.raises(SystemExit): demo.main(args + ["--workers", "0"])     # argparse: a count >= 1
    assert "argument --workers: expected a whole number >= 1, got 0" in capsys.readouterr().err
