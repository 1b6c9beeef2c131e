"""Encode throughput of mmfm's FSQ and VQ against vector-quantize-pytorch's FSQ and VectorQuantize, same run.

    .venv/bin/python bench/quantize.py [--threads N]

vector-quantize-pytorch has no encode-only call: its forward (no_grad, eval mode) computes the codes and the indices.
We time our `encode` (indices only, after the NaN/shape checks) and our `forward` (codes, indices, aux loss) against it.
Each figure is the median of several timed repeats after warmup; ratio > 1 means ours is faster.
"""
import argparse, statistics, time
import torch
from vector_quantize_pytorch import FSQ, VectorQuantize
from mmfm.quantize import FiniteScalarQuantizer, VectorQuantizer

WARMUP, REPEATS = 3, 15


def median_rates(n: int, fns: dict) -> dict:
    """Vectors/s of each function: warmup, then REPEATS rounds that time every function once (round-robin, so that
    a change of machine load hits all of them alike); the median per function."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(WARMUP): fn()
        for _ in range(REPEATS):
            for name, fn in fns.items():
                t0 = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t0)
    return {name: n / statistics.median(ts) for name, ts in times.items()}


def report(title: str, n: int, reference: tuple, ours: dict):
    ref_name = reference[0]
    rates = median_rates(n, {ref_name: reference[1], **ours})
    print(f"\n{title} ({n} vectors per call)")
    print(f"  {ref_name:<40s} {rates[ref_name] / 1e6:8.3f} M vectors/s   (reference)")
    for name in ours:
        print(f"  {name:<40s} {rates[name] / 1e6:8.3f} M vectors/s   ratio {rates[name] / rates[ref_name]:5.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, warmup {WARMUP}, median of {REPEATS}")

    levels, n = [8, 5, 5, 5], 65_536
    z = 2 * torch.randn(n, len(levels))
    ours, oracle = FiniteScalarQuantizer(levels), FSQ(levels)
    assert torch.equal(ours.encode(z), oracle(z.unsqueeze(0))[1][0].long())
    report(f"FSQ levels={levels}", n, ("vector-quantize-pytorch FSQ.forward", lambda: oracle(z.unsqueeze(0))),
           {"mmfm FiniteScalarQuantizer.encode": lambda: ours.encode(z),
            "mmfm FiniteScalarQuantizer.forward": lambda: ours(z)})

    k, d, n = 512, 64, 8_192
    z = torch.randn(n, d)
    ours = VectorQuantizer(k, d).eval()
    oracle = VectorQuantize(dim=d, codebook_size=k, rotation_trick=False).eval()
    with torch.no_grad(): oracle.codebook = ours.codebook.clone()
    assert torch.equal(ours.encode(z), oracle(z.unsqueeze(0))[1][0].long())
    report(f"VQ {k} codes x {d} dims", n, ("vector-quantize-pytorch VectorQuantize.forward", lambda: oracle(z.unsqueeze(0))),
           {"mmfm VectorQuantizer.encode": lambda: ours.encode(z),
            "mmfm VectorQuantizer.forward": lambda: ours(z)})


if __name__ == "__main__":
    main()
