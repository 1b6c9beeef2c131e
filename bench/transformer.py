"""Training throughput of MultimodalTransformer vs PyTorch's nn.TransformerEncoder/Decoder at the same shapes.

    python bench/transformer.py            # full run (a few minutes on 2 cores)
    python bench/transformer.py --quick    # one timed step per configuration, shorter sweep
    python bench/transformer.py --threads 1   # one thread: much steadier figures when other processes share the CPU
    python bench/transformer.py --compile     # also both models under torch.compile, fp32 (adds minutes of compiling)

Reference shape: d_model 256, 4 heads, MLP 4x, 4 encoder + 4 decoder layers, batch 32, 256 input + 256 target tokens
(4 image-like modalities of 16x16 tokens, vocabulary 1024 each, 4M-style budgets). One training step = forward,
cross-entropy on the targets, backward, AdamW. Both models are timed interleaved (best of n steps: on a shared CPU
other processes only ever add time), in float32 and under bfloat16 autocast (skipped where the CPU has no native bf16 matmul),
and reported against a matmul peak measured in the same run. Then the step time at a fixed budget (128 + 128 tokens,
batch 8) as the number of modalities grows. Memory: peak resident memory during each configuration's first step
(Linux VmHWM of a fresh process that builds the configuration and runs one step), and its rise during that step.
FLOP/s are model FLOPs (analytical matmul + attention count, forward + 2x for backward), the same for both models.
With --compile, two more fp32 rows: ours with its block stacks compiled (`MultimodalTransformer.compile_blocks`,
symbolic lengths, as training would use it) and PyTorch's layers with the whole module compiled (`torch.compile`),
each with its compile time (the warm-up step), and the ratios against PyTorch's layers in eager mode.
"""
import sys
from pathlib import Path
import argparse, os, resource, subprocess, time
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmfm.transformer import MultimodalTransformer, TransformerConfig
from mmfm.masking import sample_budget_masks

D, HEADS, LAYERS, B, N_IN, N_TGT, VOCAB = 256, 4, 4, 32, 256, 256, 1024
SWEEP_BATCH = 8


def matmul_peak(dtype, n=2048, reps=6) -> float:
    "FLOP/s of the best of `reps` n×n matmuls (n drops to 512 where the dtype has no native kernel: see `native`)."
    if dtype == torch.bfloat16 and not native_bf16(): n = 512
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best


_NATIVE = {}
def native_bf16() -> bool:
    "Whether bf16 matmuls run a native kernel here (a CPU without AVX-512 BF16 / AMX emulates them, 50-200x slower)."
    if "bf16" not in _NATIVE:
        a = torch.randn(256, 256)
        t32 = min(_time(lambda: a @ a) for _ in range(3))
        b = a.bfloat16()
        _NATIVE["bf16"] = min(_time(lambda: b @ b) for _ in range(3)) < 4 * t32
    return _NATIVE["bf16"]


def _time(fn) -> float:
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def model_flops(n_in=N_IN, n_tgt=N_TGT, d=D, layers=LAYERS, batch=B, vocab=VOCAB) -> float:
    "Analytical FLOPs of one training step (forward + backward = 3x forward): matmuls and attention."
    enc = layers * (24 * d * d * n_in + 4 * n_in * n_in * d)
    dec = layers * (28 * d * d * n_tgt + 4 * d * d * n_in + 4 * n_tgt * n_tgt * d + 4 * n_tgt * n_in * d)
    head = 2 * d * vocab * n_tgt
    return 3 * batch * (enc + dec + head)


def modality_setup(n_keys, tokens_per_key, n_in, n_tgt, batch=None, vocab=VOCAB, seed=0):
    batch = batch or B
    side = int(tokens_per_key ** 0.5)
    grid = (side, side) if side * side == tokens_per_key else (tokens_per_key,)
    keys = [f"tok_m{i}" for i in range(n_keys)]
    torch.manual_seed(seed)
    model = MultimodalTransformer({k: vocab for k in keys}, {k: tokens_per_key for k in keys},
                                  TransformerConfig(d_model=D, n_heads=HEADS, n_encoder_layers=LAYERS, n_decoder_layers=LAYERS),
                                  token_grids={k: grid for k in keys})
    g = torch.Generator().manual_seed(seed)
    tokens = {k: torch.randint(0, vocab, (batch, tokens_per_key), generator=g) for k in keys}
    masks = sample_budget_masks(tokens, n_in, n_tgt, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, tokens, masks, opt


class Reference(nn.Module):
    "The same computation with PyTorch's layers: embeddings, nn.TransformerEncoder/Decoder (pre-norm, GELU), a head."
    def __init__(self, n_keys=4, vocab=VOCAB):
        super().__init__()
        self.embed = nn.Embedding(n_keys * vocab, D)
        self.pos = nn.Parameter(torch.zeros(n_keys * 256, D))
        layer = lambda cls: cls(D, HEADS, 4 * D, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer(nn.TransformerEncoderLayer), LAYERS, norm=nn.LayerNorm(D), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(layer(nn.TransformerDecoderLayer), LAYERS, norm=nn.LayerNorm(D))
        self.query = nn.Parameter(torch.zeros(D))
        self.head = nn.Linear(D, vocab)
    def forward(self, ids_in, pos_in, pos_tgt, targets):
        memory = self.encoder(self.embed(ids_in) + self.pos[pos_in])
        h = self.decoder(self.query + self.pos[pos_tgt], memory)
        return F.cross_entropy(self.head(h).float().flatten(0, 1), targets.flatten())


def reference_setup(seed=0):
    torch.manual_seed(seed)
    ref = Reference()
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(B, 4 * 256, generator=g).argsort(1)
    batch = (torch.randint(0, 4 * VOCAB, (B, N_IN), generator=g), perm[:, :N_IN], perm[:, N_IN:N_IN + N_TGT],
             torch.randint(0, VOCAB, (B, N_TGT), generator=g))
    return ref, batch, torch.optim.AdamW(ref.parameters(), lr=1e-4)


def step_fn(kind, bf16):
    "A training step of 'ours' or 'reference' (PyTorch's layers); a kind ending in ' compiled': under torch.compile."
    if kind.startswith("ours"):
        model, tokens, masks, opt = modality_setup(4, 256, N_IN, N_TGT)
        if kind.endswith(" compiled"): model.compile_blocks()
        loss = lambda: model.loss(tokens, *masks).loss
    else:
        model, batch, opt = reference_setup()
        run = torch.compile(model) if kind.endswith(" compiled") else model
        loss = lambda: run(*batch)
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            l = loss()
        opt.zero_grad(set_to_none=True); l.backward(); opt.step()
    return step


def _status_mib(field: str) -> float:
    "A memory figure of this process from /proc/self/status (VmHWM: peak resident, VmRSS: resident now), MiB."
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"): return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(config: str) -> str:
    "In a fresh process: build one configuration, run one step; peak RSS and its rise over the RSS before the step."
    kind, prec = config.split(":")
    if kind.startswith("sweep"):
        n = int(kind[5:]); model, tokens, masks, opt = modality_setup(n, 128, 128, 128, batch=SWEEP_BATCH)
        def step():
            l = model.loss(tokens, *masks).loss; opt.zero_grad(); l.backward(); opt.step()
    else: step = step_fn(kind, prec == "bf16")
    before = _status_mib("VmRSS")
    step()
    return f"{_status_mib('VmHWM'):.0f} {_status_mib('VmHWM') - before:.0f}"


def measure_memory(config: str) -> tuple[float, float]:
    "Peak RSS (MiB) of a fresh process running one step of `config`, and the rise during the step."
    out = subprocess.run([sys.executable, __file__, "--memory", config, "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True)
    peak, rise = out.stdout.split()[-2:]
    return float(peak), float(rise)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="one timed step per configuration and a shorter sweep")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is far less sensitive to a busy CPU")
    p.add_argument("--compile", action="store_true", help="also both models under torch.compile (fp32)")
    p.add_argument("--memory", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    if a.memory: print(memory_probe(a.memory)); return
    rounds = 1 if a.quick else 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          f"(the CPU is shared: figures are noisy; ratios are measured interleaved in the same run)")
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}

    precs = ("fp32", "bf16") if native_bf16() else ("fp32",)
    if not native_bf16(): print("no native bf16 matmul on this CPU (emulated, far slower): bf16 configurations skipped")
    configs = [(k, prec) for prec in precs for k in ("ours", "reference")]
    if a.compile: configs += [("ours compiled", "fp32"), ("reference compiled", "fp32")]
    steps = {c: step_fn(c[0], c[1] == "bf16") for c in configs}
    warm = {c: _time(steps[c]) for c in configs}                  # warm-up (allocations, oneDNN primitives, compiling)
    times = {c: [] for c in configs}
    for r in range(rounds):                                       # interleaved, order rotated: noise hits all alike
        for c in configs[r % len(configs):] + configs[:r % len(configs)]: times[c].append(_time(steps[c]))
        for prec, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)): peak[prec] = max(peak[prec], matmul_peak(dt, reps=2))
    mem = {c: (measure_memory(f"{c[0]}:{c[1]}") if "compiled" not in c[0] else (float("nan"), float("nan")))
           for c in configs}                                      # compiled: not probed (it would compile again)
    print(f"matmul peak (2048^3, best over the run): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    flops = model_flops()
    tok = B * (N_IN + N_TGT)
    print(f"\nreference shape: d_model {D}, {LAYERS}+{LAYERS} layers, batch {B}, {N_IN} input + {N_TGT} target tokens, "
          f"vocab {VOCAB}; {flops / 1e9:.0f} GFLOP per step; best of {rounds} timed steps after 1 warm-up")
    print(f"{'config':<25}{'step s':>9}{'tokens/s':>11}{'GFLOP/s':>9}{'of peak':>9}{'peak RSS MiB':>14}{'step +MiB':>11}"
          f"{'warm-up s':>11}")
    med = {c: min(t) for c, t in times.items()}                  # other processes only ever add time: take the best
    for c in configs:
        print(f"{c[0] + ' ' + c[1]:<25}{med[c]:>9.3f}{tok / med[c]:>11.0f}{flops / med[c] / 1e9:>9.0f}"
              f"{flops / med[c] / peak[c[1]]:>9.1%}{mem[c][0]:>14.0f}{mem[c][1]:>11.0f}{warm[c]:>11.1f}")
    for prec in precs:
        print(f"ours / PyTorch layers, speed ({prec}): {med[('reference', prec)] / med[('ours', prec)]:.2f}x  (goal: >= 1.2x)")
    if a.compile:
        eager_ref = med[("reference", "fp32")]
        for k in ("ours compiled", "reference compiled"):
            print(f"{k} / PyTorch layers eager, speed (fp32): {eager_ref / med[(k, 'fp32')]:.2f}x"
                  + ("  (goal: >= 1.2x)" if k == "ours compiled" else ""))
        print(f"ours compiled / PyTorch layers compiled (fp32): {med[('reference compiled', 'fp32')] / med[('ours compiled', 'fp32')]:.2f}x")
    if "bf16" in precs:
        print(f"bf16 / fp32 speed: ours {med[('ours', 'fp32')] / med[('ours', 'bf16')]:.2f}x, "
              f"PyTorch layers {med[('reference', 'fp32')] / med[('reference', 'bf16')]:.2f}x")
    del steps

    sweep, sb = ([2, 6, 12] if a.quick else [2, 4, 6, 8, 10, 12]), SWEEP_BATCH
    print(f"\nfixed budget 128 input + 128 target tokens, batch {sb}, fp32, modalities of 128 tokens each:")
    print(f"{'modalities':>10}{'tokens held':>13}{'step s':>9}{'peak RSS MiB':>14}{'step +MiB':>11}")
    setups = {n: modality_setup(n, 128, 128, 128, batch=sb) for n in sweep}
    def sweep_step(n):
        model, tokens, masks, opt = setups[n]
        l = model.loss(tokens, *masks).loss; opt.zero_grad(); l.backward(); opt.step()
    for n in sweep: sweep_step(n)
    smem = {n: measure_memory(f"sweep{n}:fp32") for n in sweep}
    st = {n: [] for n in sweep}
    for r in range(2 * rounds + 1):
        for n in sweep[r % len(sweep):] + sweep[:r % len(sweep)]: st[n].append(_time(lambda: sweep_step(n)))
    for n in sweep:
        print(f"{n:>10}{n * 128:>13}{min(st[n]):>9.3f}{smem[n][0]:>14.0f}{smem[n][1]:>11.0f}")
    ts = [min(st[n]) for n in sweep]
    print(f"step time at {sweep[-1]} vs {sweep[0]} modalities: {ts[-1] / ts[0]:.2f}x (max/min over the sweep {max(ts) / min(ts):.2f}x)")


if __name__ == "__main__":
    main()
