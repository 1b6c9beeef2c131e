"""`tokenize_dataset` holds nothing per shard: the same 32 samples cut into 8 or into 32 shards leave the main
process holding the same Python memory over the run (tracemalloc, read at each shard's progress line), with one
process and with a pool; and each process hands a unit's freed memory back to the operating system (glibc)."""
import contextlib, os, sys, tracemalloc
from pathlib import Path
import pytest
import mmfm.token_shards as ts
from mmfm.testing import toy_manager
from test_token_shards import toy_dataset

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def held_growth(root: Path, shard_size: int, workers: int, monkeypatch) -> tuple[int, int]:
    """Bytes of Python memory the main process gained from the 3rd shard's progress line to the last (the first
    lines still see the pool's queue filling), and the number of shards, tokenizing 32 toy samples in shards of
    `shard_size`."""
    data, held = toy_dataset(root / "data", n=32), []
    line = ts._progress_line
    def counted(*a):
        held.append(tracemalloc.get_traced_memory()[0]); return line(*a)
    monkeypatch.setattr(ts, "_progress_line", counted)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):   # captured lines would be held
        tracemalloc.start()
        try: ts.tokenize_dataset(data, toy_manager(), root / "tok", shard_size=shard_size, workers=workers,
                                 batch_size=1)
        finally: tracemalloc.stop()
    return held[-1] - held[2], len(held)


@pytest.mark.parametrize("workers", [1, 2])
def test_main_process_holds_nothing_per_shard(tmp_path, monkeypatch, workers):
    held_growth(tmp_path / "warm", 4, workers, monkeypatch)          # first-call caches (torch, pyarrow)
    (few, n_few), (many, n_many) = (held_growth(tmp_path / str(s), s, workers, monkeypatch) for s in (4, 1))
    assert (n_few, n_many) == (8, 32)
    per_shard = (many - few) / (n_many - n_few)     # the samples are the same: only the shards differ
    # measured: 200-730 bytes now (noise: the pool's queue, tracemalloc's own counting); 2500-3000 when each
    # shard's description and finished future were kept
    assert per_shard < 1200, (f"the main process keeps {per_shard:.0f} bytes per shard ({workers} process(es)): "
                             f"{few} bytes over {n_few} shards, {many} over {n_many}")


@pytest.mark.skipif(not sys.platform.startswith("linux") or ts._MALLOC_TRIM is None, reason="glibc only")
def test_a_unit_frees_its_memory_to_the_system():
    assert ts._fix_mmap_threshold()            # blocks of 1 MiB or more get their own mmap, whatever was freed before
    assert ts._release_memory()                # gc, then malloc_trim(0)
