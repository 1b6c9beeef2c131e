"""Encode throughput of mmfm's FSQ and VQ against vector-quantize-pytorch's FSQ and VectorQuantize, same run.

    .venv/bin/python bench/quantize.py

vector-quantize-pytorch has no encode-only call: its forward (no_grad, eval mode) computes the codes and the indices.
We time our `encode` (indices only, after the NaN/shape checks) and our `forward` (codes, indices, aux loss) against it.
Each figure is the median of several timed repeats after warmup; ratio > 1 means ours is faster.
"""
import statistics, time
import torch
from vector_quantize_pytorch import FSQ, VectorQuantize
from mmfm.quantize import FiniteScalarQuantizer, VectorQuantizer

WARMUP, REPEATS = 3, 11


def median_seconds(fn) -> float:
    with torch.no_grad():
        for _ in range(WARMUP): fn()
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(title: str, n: int, ours: dict, reference: tuple):
    ref_name, ref_fn = reference
    ref_rate = n / median_seconds(ref_fn)
    print(f"\n{title} ({n} vectors per call)")
    print(f"  {ref_name:<38s} {ref_rate / 1e6:8.2f} M vectors/s   (reference)")
    for name, fn in ours.items():
        rate = n / median_seconds(fn)
        print(f"  {name:<38s} {rate / 1e6:8.2f} M vectors/s   ratio {rate / ref_rate:5.2f}")


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, warmup {WARMUP}, median of {REPEATS}")

    levels, n = [8, 5, 5, 5], 65_536
    z = 2 * torch.randn(n, len(levels))
    ours, oracle = FiniteScalarQuantizer(levels), FSQ(levels)
    assert torch.equal(ours.encode(z), oracle(z.unsqueeze(0))[1][0].long())
    report(f"FSQ levels={levels}", n,
           {"mmfm FiniteScalarQuantizer.encode": lambda: ours.encode(z),
            "mmfm FiniteScalarQuantizer.forward": lambda: ours(z)},
           ("vector-quantize-pytorch FSQ.forward", lambda: oracle(z.unsqueeze(0))))

    k, d, n = 1024, 64, 16_384
    z = torch.randn(n, d)
    ours = VectorQuantizer(k, d).eval()
    oracle = VectorQuantize(dim=d, codebook_size=k, rotation_trick=False).eval()
    with torch.no_grad(): oracle.codebook = ours.codebook.clone()
    assert torch.equal(ours.encode(z), oracle(z.unsqueeze(0))[1][0].long())
    report(f"VQ {k} codes x {d} dims", n,
           {"mmfm VectorQuantizer.encode": lambda: ours.encode(z),
            "mmfm VectorQuantizer.forward": lambda: ours(z)},
           ("vector-quantize-pytorch VectorQuantize", lambda: oracle(z.unsqueeze(0))))


if __name__ == "__main__":
    main()
