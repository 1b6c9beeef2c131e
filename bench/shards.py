"""Sharded simulation (`mmfm simulate --shards`): galaxies per second against the number of processes, and peak
memory against the number of galaxies.

    .venv/bin/python bench/shards.py            # speed at 1 … os.cpu_count() processes, memory at 2,000 and 20,000
    .venv/bin/python bench/shards.py --quick    # a minute: smaller sizes
    .venv/bin/python bench/shards.py --full     # memory at 10,000 and 100,000 galaxies (long)

Each measurement runs `simulate_shards` in a fresh child process (so one run's memory does not carry into the
next) with one torch/OpenMP thread per process, and prints:
  * speed: galaxies per second with 1, 2, … processes, and the ratio to 1 process measured in the same run;
  * memory: the peak resident set (VmHWM, from `getrusage`) of the parent process and of its largest worker at two
    sizes; flat in `--n` means the two agree within a few MiB, whatever the ratio of the sizes.
The machine may be shared: figures vary with its load, ratios much less.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile

CHILD = r"""
import json, resource, sys, time
from mmfm.simulate import SimConfig, simulate_shards
n, workers, shard_size, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = simulate_shards(out, SimConfig(n_galaxies=n, seed=0), shard_size=shard_size, workers=workers, progress_bar=False)
peak = lambda who: resource.getrusage(who).ru_maxrss / 1024          # KiB on Linux -> MiB
print(json.dumps({"seconds": s["seconds"], "galaxies_per_second": s["galaxies_per_second"],
                  "parent_MiB": peak(resource.RUSAGE_SELF), "worker_MiB": peak(resource.RUSAGE_CHILDREN)}))
"""


def run(n: int, workers: int, shard_size: int) -> dict:
    "One sharded simulation in a fresh process; its figures."
    out = tempfile.mkdtemp(prefix="bench_shards_")
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", CHILD, str(n), str(workers), str(shard_size), out], env=env,
                           capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally: shutil.rmtree(out, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (about a minute on two cores)")
    p.add_argument("--full", action="store_true", help="memory at 10,000 and 100,000 galaxies")
    p.add_argument("--n", type=int, help="galaxies per speed measurement")
    p.add_argument("--shard-size", type=int, help="galaxies per shard")
    a = p.parse_args()
    n_speed = a.n or (400 if a.quick else 2000)
    shard_size = a.shard_size or (100 if a.quick else 250 if not a.full else 1000)
    sizes = (500, 2000) if a.quick else (10_000, 100_000) if a.full else (2000, 20_000)
    cpus = os.cpu_count() or 1
    procs = sorted({1, *range(2, cpus + 1, max(1, cpus // 4))} | {cpus})
    print(f"speed: {n_speed} galaxies, shards of {shard_size}, {cpus} CPUs")
    base = None
    for w in procs:
        r = run(n_speed, w, shard_size)
        base = base or r["galaxies_per_second"]
        print(f"  {w:3d} process(es): {r['galaxies_per_second']:7.1f} galaxies/s  "
              f"({r['galaxies_per_second'] / base:.2f}x 1 process)  {r['seconds']:.1f} s")
    workers = min(2, cpus)
    print(f"memory: peak resident set, {workers} worker(s), shards of {shard_size}")
    peaks = []
    for n in sizes:
        r = run(n, workers, shard_size); peaks.append(r)
        print(f"  --n {n:7d}: parent {r['parent_MiB']:6.0f} MiB, largest worker {r['worker_MiB']:6.0f} MiB  "
              f"({r['galaxies_per_second']:.1f} galaxies/s)")
    print(f"  ratio {sizes[1] // sizes[0]}x the galaxies: parent {peaks[1]['parent_MiB'] / peaks[0]['parent_MiB']:.2f}x, "
          f"worker {peaks[1]['worker_MiB'] / peaks[0]['worker_MiB']:.2f}x the memory")


if __name__ == "__main__": main()
