"""Tokenizing once and streaming the tokens: throughput against the number of processes, and peak memory at two data sizes.

    .venv/bin/python bench/tokenize_shards.py [--quick] [--sizes 200 1600] [--workers 2] [--shard-size 20]
    .venv/bin/python bench/tokenize_shards.py --trend 24 --shard-size 250 [--workers 2]

Data: galaxies simulated by `mmfm.simulate` (Legacy, HSC and Gaia cutouts as FITS, two catalogs), read through
`astro_dataset` with the Legacy and HSC image codecs of `mmfm.image_codecs` (untrained: the encoding cost does not
depend on the weights). For each data size, in fresh processes (so each peak resident memory is its own):
  * `tokenize` with 1 process and with `--workers` processes: token shards per second, galaxies per second, peak
    resident memory of the main process and of the largest worker (getrusage, both measured in the same run) and
    their sum; the ratio of the parallel run to 1 process;
  * streaming training: `Trainer` on a `TokenStream` over the token set (tiny model, `--steps` steps, batch 16):
    steps per second and peak resident memory.
Memory must not grow with the data set: the script prints the ratio of the peaks at the larger size to the smaller
(the default sizes differ 8x in galaxies and in token shards).
With `--trend K` it measures instead whether a worker's memory grows with the number of shards it has written:
K token shards of `--shard-size` galaxies each are tokenized by `--workers` pool processes while the parent samples
each worker's resident memory (Linux `/proc/<pid>/status`, VmRSS, every 20 ms) and the number of shards written so
far; it prints the workers' largest and smallest resident memory for each tenth of the shards and the ratio of the late
shards' peak to the early ones' (flat memory: about 1).
The machine may be shared: figures vary with its load, ratios within one run much less.
"""
import os, sys
import argparse, json, resource, shutil, subprocess, tempfile, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024          # Linux: KiB


def codecs():
    import torch
    from mmfm.codec import CodecManager
    from mmfm.image_codecs import LegacySurveyImageCodec, HSCImageCodec
    torch.manual_seed(0)
    return CodecManager([LegacySurveyImageCodec(), HSCImageCodec()]).freeze()


def child_tokenize(data: str, out: str, workers: int, shard_size: int) -> dict:
    import torch
    from mmfm.simulate import astro_dataset
    from mmfm.token_shards import tokenize_dataset
    torch.set_num_threads(1)
    ds = astro_dataset(data, images=("legacy", "hsc"), tables=())
    t0 = time.perf_counter()
    shards = tokenize_dataset(ds, codecs(), out, shard_size=shard_size, workers=workers, batch_size=32, verbose=False)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "galaxies": len(shards), "shards": len(shards.shards), "peak_main_mib": peak_mib(),
            "peak_worker_mib": peak_mib(resource.RUSAGE_CHILDREN) if workers > 1 else None}


def _children_rss_mib(pid: int) -> list[float]:
    "Resident memory (MiB) of the live child processes of `pid` (Linux /proc)."
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit(): continue
        try:
            stat = (d / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[1]) != pid: continue
            rss = [l for l in (d / "status").read_text().splitlines() if l.startswith("VmRSS:")]
            if rss: out.append(int(rss[0].split()[1]) / 1024)
        except (OSError, ValueError, IndexError): continue     # the process ended between listing and reading
    return out


def child_trend(data: str, out: str, workers: int, shard_size: int) -> dict:
    "Tokenize with a pool of `workers` while sampling their resident memory against the number of shards written."
    import torch
    from mmfm.simulate import astro_dataset
    from mmfm.token_shards import tokenize_dataset
    torch.set_num_threads(1)
    ds = astro_dataset(data, images=("legacy", "hsc"), tables=())
    samples, stop, out_dir = [], threading.Event(), Path(out)

    def sample():
        while not stop.is_set():
            rss = _children_rss_mib(os.getpid())
            done = len(list(out_dir.glob("shard-*.json"))) if out_dir.is_dir() else 0
            if rss: samples.append((done, max(rss), min(rss)))
            time.sleep(0.02)
    th = threading.Thread(target=sample, daemon=True); th.start()
    t0 = time.perf_counter()
    try: shards = tokenize_dataset(ds, codecs(), out, shard_size=shard_size, workers=workers, batch_size=32, verbose=False)
    finally: stop.set(); th.join()
    return {"seconds": time.perf_counter() - t0, "shards": len(shards.shards), "galaxies": len(shards),
            "samples": samples}


def child_train(tokens: str, out: str, steps: int) -> dict:
    import torch
    from mmfm.masking import MaskingConfig
    from mmfm.token_shards import TokenShards, TokenStream
    from mmfm.train import Trainer, TrainConfig, DistInfo
    from mmfm.transformer import MultimodalTransformer
    torch.set_num_threads(1)
    shards = TokenShards(tokens)
    torch.manual_seed(0)
    model = MultimodalTransformer(shards.vocab_sizes, shards.num_tokens, "tiny", token_grids=shards.token_grids)
    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-3, warmup_steps=5, checkpoint_every=steps, progress=False)
    split = "train" if "train" in shards.splits else None
    t = Trainer(model, TokenStream(shards, 16, split, window=2), cfg, MaskingConfig(0.3, 0.3), out, dinfo=DistInfo())
    t0 = time.perf_counter(); t.fit(); dt = time.perf_counter() - t0
    return {"seconds": dt, "steps_per_s": steps / dt, "peak_main_mib": peak_mib()}


def run_child(*args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], env=env, capture_output=True, text=True)
    if r.returncode: raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (80 and 640 galaxies, shards of 10), few steps")
    p.add_argument("--sizes", type=int, nargs=2, default=[200, 1600], help="two data sizes (galaxies)")
    p.add_argument("--workers", type=int, default=2, help="processes of the parallel tokenize")
    p.add_argument("--shard-size", type=int, default=20, help="galaxies per token shard")
    p.add_argument("--steps", type=int, default=60, help="training steps on the stream")
    p.add_argument("--trend", type=int, metavar="K", help="instead: worker memory against K shards written (see above)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "tokenize": print(json.dumps(child_tokenize(rest[0], rest[1], int(rest[2]), int(rest[3]))))
        elif kind == "trend": print(json.dumps(child_trend(rest[0], rest[1], int(rest[2]), int(rest[3]))))
        else: print(json.dumps(child_train(rest[0], rest[1], int(rest[2]))))
        return
    if a.trend is not None: return trend(a)
    if a.quick: a.sizes, a.steps, a.shard_size = [80, 640], 30, 10
    from mmfm.simulate import SimConfig, simulate_dataset
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    results = {}
    try:
        for n in a.sizes:
            data = tmp / f"astro-{n}"
            t0 = time.perf_counter()
            simulate_dataset(data, SimConfig(n_galaxies=n, seed=1), workers=a.workers)
            print(f"simulated {n} galaxies in {time.perf_counter() - t0:.1f} s", flush=True)
            one = run_child("tokenize", data, tmp / f"tok-{n}-1", 1, a.shard_size)
            par = run_child("tokenize", data, tmp / f"tok-{n}-{a.workers}", a.workers, a.shard_size)
            same = all((tmp / f"tok-{n}-1" / f).read_bytes() == (tmp / f"tok-{n}-{a.workers}" / f).read_bytes()
                       for f in os.listdir(tmp / f"tok-{n}-1"))
            train = run_child("train", tmp / f"tok-{n}-1", tmp / f"run-{n}", a.steps)
            results[n] = {"one": one, "par": par, "train": train, "identical": same}
    finally: shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntokenize (Legacy + HSC image codecs, untrained, {a.shard_size} galaxies per shard; one torch thread per process)")
    print(f"{'galaxies':>9} {'shards':>6} {'procs':>5} {'shards/s':>9} {'galaxies/s':>11} {'ratio':>6} "
          f"{'peak main MiB':>14} {'peak worker MiB':>16} {'main+worker MiB':>16}")
    for n, r in results.items():
        for procs, x in ((1, r["one"]), (a.workers, r["par"])):
            ratio = x["galaxies"] / x["seconds"] / (r["one"]["galaxies"] / r["one"]["seconds"])
            worker = f"{x['peak_worker_mib']:.0f}" if x["peak_worker_mib"] else "-"
            print(f"{n:>9} {x['shards']:>6} {procs:>5} {x['shards'] / x['seconds']:>9.2f} "
                  f"{x['galaxies'] / x['seconds']:>11.1f} {ratio:>5.2f}x {x['peak_main_mib']:>14.0f} {worker:>16} "
                  f"{x['peak_main_mib'] + (x['peak_worker_mib'] or 0):>16.0f}")
        print(f"{'':>9} token shards of 1 and {a.workers} processes byte-identical: {r['identical']}")
    print(f"\nstreaming training (tiny model, batch 16, {a.steps} steps, window 2 shards)")
    print(f"{'galaxies':>9} {'steps/s':>8} {'peak MiB':>9}")
    for n, r in results.items(): print(f"{n:>9} {r['train']['steps_per_s']:>8.2f} {r['train']['peak_main_mib']:>9.0f}")
    small, big = (results[n] for n in a.sizes)
    total = lambda x: x["peak_main_mib"] + (x["peak_worker_mib"] or 0)
    print(f"\npeak memory, {a.sizes[1]} vs {a.sizes[0]} galaxies ({a.sizes[1] / a.sizes[0]:.1f}x the data, "
          f"{big['one']['shards']} vs {small['one']['shards']} token shards): "
          f"tokenize 1 process {big['one']['peak_main_mib'] / small['one']['peak_main_mib']:.2f}x, "
          f"tokenize {a.workers} processes: main {big['par']['peak_main_mib'] / small['par']['peak_main_mib']:.2f}x, "
          f"worker {(big['par']['peak_worker_mib'] or 0) / max(small['par']['peak_worker_mib'] or 1, 1):.2f}x, "
          f"main+worker {total(big['par']) / total(small['par']):.2f}x; "
          f"streaming training {big['train']['peak_main_mib'] / small['train']['peak_main_mib']:.2f}x")


def trend(a):
    "The `--trend` measurement: worker memory for each tenth of the shards written."
    if a.trend < 10 or a.workers < 2: raise SystemExit("--trend needs K >= 10 shards and --workers >= 2 (a pool)")
    from mmfm.simulate import SimConfig, simulate_dataset
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-trend-"))
    n = a.trend * a.shard_size
    try:
        t0 = time.perf_counter()
        simulate_dataset(tmp / "astro", SimConfig(n_galaxies=n, seed=1), workers=a.workers)
        print(f"simulated {n} galaxies in {time.perf_counter() - t0:.1f} s", flush=True)
        r = run_child("trend", tmp / "astro", tmp / "tok", a.workers, a.shard_size)
    finally: shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntokenize the {r['galaxies']} of {n} simulated galaxies with a Legacy or HSC image into {r['shards']} "
          f"shards of {a.shard_size} with {a.workers} processes in {r['seconds']:.1f} s; workers' resident memory "
          f"(VmRSS, sampled every 20 ms) by shards written")
    print(f"{'shards written':>15} {'samples':>8} {'peak MiB':>9} {'lowest MiB':>11}")
    tenth = max(1, r["shards"] // 10); rows = []          # (peak, lowest) MiB per tenth of the shards written
    for lo in range(0, r["shards"], tenth):
        hi = min(lo + tenth, r["shards"])
        window = [x for x in r["samples"] if lo <= x[0] < hi]  # x: (shards written, largest worker, smallest worker)
        if not window: continue
        rows.append((max(x[1] for x in window), min(x[2] for x in window)))
        print(f"{f'{lo}-{hi - 1}':>15} {len(window):>8} {rows[-1][0]:>9.0f} {rows[-1][1]:>11.0f}")
    if len(rows) < 3: raise SystemExit("too few samples to compare the early and late shards")
    late_peak, late_low = max(row[0] for row in rows[-3:]), min(row[1] for row in rows[-3:])
    print(f"\nworker peak over the last three rows / over the second row (the first includes the workers' start-up): "
          f"{late_peak / rows[1][0]:.2f}x (lowest: {late_low / rows[1][1]:.2f}x); flat memory gives about 1")


if __name__ == "__main__": main()
