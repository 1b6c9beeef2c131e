"""Training throughput at the shapes the worked examples train at: today's path (reference) against the new one.

    python bench/train_speed.py              # full run (a few minutes on 2 cores)
    python bench/train_speed.py --quick      # fewer steps, tiny and small presets at a small batch (< 2 min)
    python bench/train_speed.py --threads 1  # one torch thread: steadier figures when other processes share the CPU
    python bench/train_speed.py --compile    # also the new path with compiled blocks (minutes of compiling per shape)

REFERENCE (kept inline below, so that it stays a fixed reference): masks drawn sample by sample, each from its own
seeded generator (the trainer's `per_sample_masks`, with the loop-over-rows `ModalityMixMasking` it used), the model's
token-wise layers run over the padding too (`skip_padding = False`), the whole batch through the blocks at once
(`group_cost = None`), `torch.optim.AdamW` with its defaults.
NEW: masks for the whole batch in one call from one generator (`mmfm.masking.batch_masks`), token-wise layers on the
real tokens only, the rows through the blocks in groups of similar length (`mmfm.transformer.row_groups`; both the
model's defaults), `AdamW(fused=True)`; "new, whole batch" is the same without the row groups. Both run the trainer's step (learning rate, forward to
the loss terms, backward, gradient clipping at 1, optimizer step) in float32, on the same batches, interleaved step by
step (on a shared CPU other processes only add time: the best and the median of the timed steps are reported).

Shapes (synthetic tokens with the examples' token counts, vocabularies and masking; presence rates approximate the
examples' data): astronomy demo (`nbs/examples/23_astro_pipeline.ipynb`, size 'demo': tiny preset, batch 64;
Legacy image 68 tokens, HSC image 86, Gaia image 39 (vocabularies 1000), Legacy catalog 7, Legacy and HSC moments 3
each, spectroscopic redshift 1 (vocabularies 64); presence as in the demo's 2000 galaxies (Legacy 89 %, HSC 53 %, Gaia
31 %, redshift 26 %); budgets of half the present tokens as inputs and half as targets, all-to-all / one-to-all
50/50, a quarter of the samples practising the evaluated directions, `DirectedMasking`); medical demo
(`nbs/examples/22_medical_pipeline.ipynb`: tiny preset, dropout 0.1, batch 32, `ModalityMixMasking`): the diabetes
folds (3 + 6 + 1 + 1 table tokens, 8 bins; 4000 of the demo's 5200 steps) and the cohort (3 + 3 + 4 table tokens,
16 bins, ECG 128 tokens of 512 codes, input-only).

Beside them, at the same shapes (same tokens per sample, same masking), other settings of the new path, each in
tokens/s and as a ratio to the reference at the demo's batch (tokens/s is what the throughput goal counts):
batches of 2x and 4x the demo's (learning rate scaled by sqrt(batch / demo batch), the square-root rule for Adam-type optimisers of
Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"; the rate does not change the
time of a step, and how many steps a larger batch needs to reach the same loss is not measured here); for the medical
shapes, `attn_dropout=0` (dropout 0.1 kept on the residual branches: attention dropout takes SDPA off its fused
flash kernel), at batch 32 and 128; with `--compile`, the blocks compiled (`MultimodalTransformer.compile_blocks`,
symbolic lengths), with the compile time of its warm-up steps.

Then the model alone (new path) at the astronomy shape for the tiny, small and base presets: tokens/s and the share
of a float32 / bfloat16 matmul peak measured in the same run (2048^3 matmul), under bf16 autocast and without.
FLOPs are model FLOPs on the real tokens (matmuls and attention, forward + 2x for backward), as in bench/transformer.py.
"""
import sys
from pathlib import Path
import argparse, math, os, time
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmfm.testing import per_row_mix_masking
from mmfm.masking import Masks, MaskingConfig, ModalityMixMasking, DirectedMasking, apply_masking, batch_masks
from mmfm.transformer import MultimodalTransformer, TransformerConfig, average_over_modalities, row_groups

N_DATA = 1024  # synthetic samples per shape


# --- the shapes -------------------------------------------------------------------------------------------------
def astronomy():
    keys = {"tok_image_legacy": (68, 1000, ((4,), (8, 8))), "tok_image_hsc": (86, 1000, ((5,), (9, 9))),
            "tok_image_gaia": (39, 1000, ((3,), (6, 6))), "tok_catalog_legacy": (7, 64, (7,)),
            "tok_moments_legacy": (3, 64, (3,)), "tok_moments_hsc": (3, 64, (3,)), "tok_z_spec": (1, 64, (1,))}
    masking = MaskingConfig(input_budget=0.5, target_budget=0.5, mixture={"all-to-all": 0.5, "one-to-all": 0.5})
    images = ["tok_image_legacy", "tok_image_hsc", "tok_image_gaia", "tok_catalog_legacy"]
    masking = DirectedMasking(masking, {"legacy→hsc": [["tok_image_legacy"], ["tok_image_hsc"]],
                                        "images+catalog→z": [images, ["tok_z_spec"]]}, share=0.25)
    def presence(g, n):
        legacy = torch.rand(n, generator=g) < 0.89
        hsc = (torch.rand(n, generator=g) < 0.53) | ~legacy            # each galaxy has an image
        return {"tok_image_legacy": legacy, "tok_image_hsc": hsc, "tok_image_gaia": torch.rand(n, generator=g) < 0.31,
                "tok_catalog_legacy": legacy.clone(), "tok_moments_legacy": legacy.clone(),
                "tok_moments_hsc": hsc.clone(), "tok_z_spec": torch.rand(n, generator=g) < 0.26}
    return keys, presence, masking, {}


def diabetes():
    keys = {"tok_diabetes_demographics": (3, 8, (3,)), "tok_diabetes_labs": (6, 8, (6,)),
            "tok_diabetes_vitals": (1, 8, (1,)), "tok_diabetes_progression": (1, 8, (1,))}
    def presence(g, n):
        return {k: (torch.rand(n, generator=g) < 0.9) | (k == "tok_diabetes_demographics") for k in keys}
    return keys, presence, ModalityMixMasking(), dict(dropout=0.1, embedding_std=0.5)


def cohort():
    keys = {"tok_cohort_demographics": (3, 16, (3,)), "tok_cohort_labs": (3, 16, (3,)),
            "tok_cohort_vitals": (4, 16, (4,)), "tok_cohort_ecg": (128, 512, (128,))}
    def presence(g, n):
        return {k: (torch.rand(n, generator=g) < 0.8) | (k == "tok_cohort_demographics") for k in keys}
    return keys, presence, ModalityMixMasking(input_only=("tok_cohort_ecg",)), dict(dropout=0.1, embedding_std=0.5)


SHAPES = {"astronomy": astronomy, "medical-diabetes": diabetes, "medical-cohort": cohort}
DEMO_BATCHES = {"astronomy": 64, "medical-diabetes": 32, "medical-cohort": 32}   # the batch each demo trains at


def dataset(keys, presence, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = {k: torch.randint(0, v, (N_DATA, n), generator=g) for k, (n, v, _) in keys.items()}
    present = presence(g, N_DATA)
    for k in tokens: tokens[k][~present[k]] = 0
    return tokens, present


# --- the reference path (today's), kept inline -------------------------------------------------------------------
def sample_seed(seed, stream, epoch, index):
    return int(np.random.SeedSequence([seed, stream, epoch, index]).generate_state(1)[0])




def reference_masks(masking, tokens, present, index, seed=0, epoch=0):
    "The trainer's per_sample_masks: one seeded generator and one masking call per row."
    call = (lambda t, p, g: per_row_mix_masking(masking, t, p, g)) if isinstance(masking, ModalityMixMasking) else masking
    rows = []
    for b, i in enumerate(index):
        rows.append(call({k: t[b:b + 1] for k, t in tokens.items()}, {k: p[b:b + 1] for k, p in present.items()},
                         torch.Generator().manual_seed(sample_seed(seed, 0, epoch, int(i)))))
    return Masks({k: torch.cat([r.is_input[k] for r in rows]) for k in tokens},
                 {k: torch.cat([r.is_target[k] for r in rows]) for k in tokens})


def new_masks(masking, tokens, present, position, seed=0, epoch=0):
    "One call for the batch, from a generator seeded by (run seed, stream, epoch, batch position)."
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0, epoch, position, 0]).generate_state(1)[0]))
    return batch_masks(masking, tokens, present, g)


# --- one training step, as Trainer.train_step does it -------------------------------------------------------------
DEMO_LR = 1e-3


def make_path(kind, shape, preset="tiny", batch=None, bf16=False, seed=0, compile=False, groups=True, **config):
    """A training step of `kind` ('reference' or 'new') at `shape` (`batch` None: the demo's); `groups`: the new path's
    row groups (`group_cost`); `config`: TransformerConfig fields to change."""
    batch = batch or DEMO_BATCHES[shape]
    keys, presence, masking, overrides = SHAPES[shape]()
    tokens, present = dataset(keys, presence, seed)
    torch.manual_seed(seed)
    model = MultimodalTransformer({k: v for k, (_, v, _) in keys.items()}, {k: n for k, (n, _, _) in keys.items()},
                                  TransformerConfig.preset(preset, **{**overrides, **config}),
                                  token_grids={k: g for k, (_, _, g) in keys.items()})
    model.skip_padding = kind == "new"
    if kind == "reference" or not groups: model.group_cost = None
    if compile: model.compile_blocks()
    lr = DEMO_LR * math.sqrt(batch / DEMO_BATCHES[shape])        # square-root scaling (Malladi et al. 2022)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05,
                            **({"fused": True} if kind == "new" else {}))
    def step(position):
        "One step on batch `position`; returns (mask seconds, step seconds, tokens, model FLOPs)."
        t0 = time.perf_counter()
        index = torch.arange(position * batch, (position + 1) * batch) % N_DATA
        tok = {k: v[index] for k, v in tokens.items()}; pres = {k: v[index] for k, v in present.items()}
        masks = (reference_masks(masking, tok, pres, index) if kind == "reference"
                 else new_masks(masking, tok, pres, position))
        t1 = time.perf_counter()
        model.train()
        for g in opt.param_groups: g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            terms = model(tok, *masks, pres, loss_terms=True)
        loss = average_over_modalities(terms.ce_sum, terms.n_targets)
        if not math.isfinite(float(loss.detach())): raise RuntimeError(f"{kind} {shape}: non-finite loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0, *work(model, masks)
    return step


def work(model, masks):
    "Input + target tokens of a batch, and the model FLOPs of one training step on its real tokens."
    d, cfg = model.config.d_model, model.config
    n_in = sum(m.sum(1) for m in masks.is_input.values()).double()
    n_tgt = sum(m.sum(1) for m in masks.is_target.values()).double()
    enc = cfg.n_encoder_layers * (24 * d * d * n_in + 4 * n_in ** 2 * d)
    dec = cfg.n_decoder_layers * (28 * d * d * n_tgt + 4 * d * d * n_in + 4 * n_tgt ** 2 * d + 4 * n_tgt * n_in * d)
    head = sum(2 * d * model.vocab_sizes[k] * m.sum() for k, m in masks.is_target.items())
    return int((n_in + n_tgt).sum()), float(3 * ((enc + dec).sum() + head))


def matmul_peak(dtype, reps=4) -> tuple[float, int]:
    "FLOP/s of the best of `reps` n×n matmuls: n = 2048, or 512 where a 512 one is slow (no native kernel)."
    def best(n):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        dt = math.inf
        for _ in range(reps):
            t = time.perf_counter(); a @ b; dt = min(dt, time.perf_counter() - t)
        return 2 * n ** 3 / dt
    small = best(512)
    return (small, 512) if small < 20e9 else (max(small, best(2048)), 2048)


# --- the benchmark -----------------------------------------------------------------------------------------------
def variants(shape, compile=False):
    "{name: (kind, batch, TransformerConfig changes, compile, row groups)}: the paths timed at `shape`."
    b0 = DEMO_BATCHES[shape]
    out = {"reference": ("reference", b0, {}, False, False), "new": ("new", b0, {}, False, True),
           "new, whole batch": ("new", b0, {}, False, False)}
    out.update({f"new b{b}": ("new", b, {}, False, True) for b in (2 * b0, 4 * b0)})
    if SHAPES[shape]()[3].get("dropout"):                          # the medical demos train with dropout 0.1
        out.update({f"new attn-drop 0{'' if b == b0 else f' b{b}'}": ("new", b, {"attn_dropout": 0.0}, False, True)
                    for b in (b0, 4 * b0)})
    if compile: out["new compiled"] = ("new", b0, {}, True, True)
    return out


def compare(shape, steps, warmup=2, compile=False, preset="tiny"):
    "Time every variant at `shape`, interleaved step by step (order rotating); also the time of the warm-up steps."
    spec = variants(shape, compile)
    paths = {name: make_path(kind, shape, preset, batch=b, compile=c, groups=g, **cfg)
             for name, (kind, b, cfg, c, g) in spec.items()}
    names, warm = list(paths), {}
    for name in names:
        t = time.perf_counter()
        for p in range(warmup): paths[name](p)
        warm[name] = time.perf_counter() - t
    out = {name: [] for name in names}
    for p in range(warmup, warmup + steps):
        for name in names[p % len(names):] + names[:p % len(names)]: out[name].append(paths[name](p))
    return out, warm, {name: spec[name][1] for name in names}


def padding(shape, batches=16):
    """Real / packed tokens and real / packed self-attention scores (inputs, targets) over the new path's batches at
    the demo's batch: the whole batch packed to its longest row, and in the row groups of `row_groups`."""
    keys, presence, masking, _ = SHAPES[shape]()
    tokens, present = dataset(keys, presence)
    b0, out = DEMO_BATCHES[shape], np.zeros((2, 4))
    for pos in range(batches):
        index = torch.arange(pos * b0, (pos + 1) * b0) % N_DATA
        m = new_masks(masking, {k: v[index] for k, v in tokens.items()}, {k: v[index] for k, v in present.items()}, pos)
        n_in, n_tgt = (sum(f.sum(1) for f in flags.values()) for flags in (m.is_input, m.is_target))
        rows = torch.arange(b0)[n_tgt > 0]                          # rows without targets are skipped
        for w, groups in enumerate(([rows], [rows[g] for g in row_groups(n_in[rows], n_tgt[rows])])):
            for i, n in enumerate((n_in, n_tgt)):
                n = n.double()
                real, sq = float(n[rows].sum()), float((n[rows] ** 2).sum())
                out[w, i] += real / sum(len(g) * float(n[g].max()) for g in groups)
                out[w, 2 + i] += sq / sum(len(g) * float(n[g].max()) ** 2 for g in groups)
    return out / batches


def summarise(rows):
    mask, step, tok, _ = map(np.array, zip(*rows))
    return {"best": step.min(), "median": float(np.median(step)), "tokens": tok.mean(),
            "mask_share": float(np.median(mask / step))}


def model_alone(quick):
    "The model alone (new path) at the astronomy shape, per preset, in float32 and bf16, against a matmul peak."
    (p32, n32), (p16, n16) = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    peak = {"fp32": p32, "bf16": p16}
    print(f"\nmatmul peak: fp32 {p32 / 1e9:.0f} GFLOP/s ({n32}^3), bf16 {p16 / 1e9:.1f} GFLOP/s ({n16}^3)"
          + ("; no native bf16 matmul on this CPU (emulated): bf16 autocast only slows training here" if p16 < p32 else ""))
    presets = {"tiny": 32, "small": 8} if quick else {"tiny": 32, "small": 16, "base": 4}
    n = 1 if quick else 3
    print(f"model alone (new path) at the astronomy shape; best of {n} timed steps after 1 warm-up")
    print(f"{'preset':<8}{'batch':>6}{'prec':>6}{'step s':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'of peak':>9}")
    fp32_step = {}
    for preset, batch in presets.items():
        for prec in ("fp32", "bf16"):
            if prec == "bf16" and fp32_step[preset] * peak["fp32"] / peak["bf16"] > (10 if quick else 60):
                print(f"{preset:<8}{batch:>6}{prec:>6}  skipped: about {fp32_step[preset] * peak['fp32'] / peak['bf16']:.0f} s "
                      "a step at the measured bf16 matmul rate")
                continue
            step = make_path("new", "astronomy", preset, batch, bf16=prec == "bf16")
            step(0)
            rows = [step(i + 1) for i in range(n)]
            best = min(rows, key=lambda r: r[1] - r[0])
            dt = best[1] - best[0]                                   # model step, without the masks
            if prec == "fp32": fp32_step[preset] = dt
            print(f"{preset:<8}{batch:>6}{prec:>6}{dt:>9.3f}{best[2] / dt:>10.0f}{best[3] / dt / 1e9:>9.1f}"
                  + (f"{best[3] / dt / peak[prec]:>9.1%}" if peak[prec] >= peak["fp32"] or prec == "fp32" else f"{'-':>9}"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer steps; presets tiny and small only, small batches")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also time the new path with compiled blocks (slow to start)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="shapes to time")
    p.add_argument("--preset", default="tiny", choices=list(TransformerConfig.presets),
                   help="model size of the comparison (the demos train 'tiny')")
    p.add_argument("--no-model-alone", action="store_true", help="skip the model-alone table")
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    steps = 4 if a.quick else 24
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          f"(a shared CPU adds noise; reference and new are timed interleaved in this run)")
    print(f"\ntraining step at the examples' shapes, preset {a.preset!r}, float32, {steps} timed steps per path after 2 warm-up steps; "
          f"tokens/s from the best (and the median) step; 'x ref': tokens/s over the reference's at the demo's batch")
    print(f"{'shape':<18}{'path':<22}{'batch':>6}{'steps/s':>9}{'tokens/s':>10}{'(median)':>10}{'x ref':>7}{'(median)':>9}"
          f"{'masks':>7}{'warm-up s':>11}")
    ratios, best_variant = {}, {}
    for shape in a.shapes:
        rows, warm, batch = compare(shape, steps, compile=a.compile, preset=a.preset)
        res = {k: summarise(v) for k, v in rows.items()}
        ref = res["reference"]
        x = {k: ((r["tokens"] / r["best"]) / (ref["tokens"] / ref["best"]),
                 (r["tokens"] / r["median"]) / (ref["tokens"] / ref["median"])) for k, r in res.items()}
        for kind, r in res.items():
            print(f"{shape:<18}{kind:<22}{batch[kind]:>6}{1 / r['best']:>9.2f}{r['tokens'] / r['best']:>10.0f}"
                  f"{r['tokens'] / r['median']:>10.0f}{x[kind][0]:>6.2f}x{x[kind][1]:>8.2f}x{r['mask_share']:>7.0%}"
                  f"{warm[kind]:>11.1f}")
        ratios[shape] = (ref["best"] / res["new"]["best"], ref["median"] / res["new"]["median"])
        best_variant[shape] = max(x, key=lambda k: x[k][0]), x
        label = f"new / reference (steps/s, batch {batch['new']})"
        print(f"{shape:<18}{label:<40} "
              f"{ratios[shape][0]:.2f}x best, {ratios[shape][1]:.2f}x median")
        pad = padding(shape)
        for w, name in enumerate(("whole batch", "row groups")):
            print(f"{shape:<18}{name}: real / packed tokens: inputs {pad[w, 0]:.0%}, targets {pad[w, 1]:.0%}; real / packed "
                  f"self-attention scores: inputs {pad[w, 2]:.0%}, targets {pad[w, 3]:.0%} (batch {DEMO_BATCHES[shape]})")

    if not a.no_model_alone: model_alone(a.quick)
    print("\nnew / reference (best step, the demo's batch): " + ", ".join(f"{s} {r[0]:.2f}x" for s, r in ratios.items())
          + "  (goal: >= 2x)")
    print("fastest setting in tokens/s / reference: " + ", ".join(f"{s} {k!r} {x[k][0]:.2f}x (median {x[k][1]:.2f}x)"
                                                                for s, (k, x) in best_variant.items()))


if __name__ == "__main__":
    main()
