"""Masking time per batch as a share of the training step it feeds, at the astronomy demo's shapes.

    python bench/masking.py               # batch 32 and 128, 20 timed steps each (about a minute on 2 cores)
    python bench/masking.py --steps 5     # quicker
    python bench/masking.py --threads 2   # torch threads (default 1: steadier figures on a shared CPU)

Shapes: the astronomy demo (`nbs/examples/23_astro_pipeline.ipynb`, size 'demo'): tiny preset; Legacy image 68 tokens,
HSC image 86, Legacy catalog 7, spectroscopic redshift 1 (vocabularies 1000 / 1000 / 1024 / 1024); presence as in its
data: Legacy image and catalog 75 %, HSC 45 % (and whenever Legacy is missing: every galaxy has an image), redshift 30 %;
here the catalog also has each of its cells missing with probability 0.1 (per-token presence).

Maskings timed (`mmfm.masking.batch_masks`, one call per batch from one seeded generator, as the trainer draws them):
the demo's `MaskingConfig(0.5, 0.5, mixture={"all-to-all": 0.5, "one-to-all": 0.5})`, the same with
`target_rates={"tok_spec_z": 0.3}`, and `ModalityMixMasking()`.

REFERENCE, measured in the same run on the same batches: the trainer's step on those masks (`Trainer.train_step`
without the logging: forward to the loss terms, the loss averaged over modalities, backward, gradient clipping at 1,
fused AdamW step), float32. Masking and steps are interleaved batch by batch; medians of the timed batches are
reported, and the ratio median(mask) / median(step). Goal: under 10 % at batch 128.
"""
import sys
from pathlib import Path
import argparse, time
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmfm.masking import MaskingConfig, ModalityMixMasking, batch_masks
from mmfm.transformer import MultimodalTransformer, TransformerConfig, average_over_modalities

KEYS = {"tok_image_legacy": (68, 1000, ((4,), (8, 8))), "tok_image_hsc": (86, 1000, ((5,), (9, 9))),
        "tok_catalog_legacy": (7, 1024, (7,)), "tok_spec_z": (1, 1024, (1,))}
MIX = {"all-to-all": 0.5, "one-to-all": 0.5}
MASKINGS = {"budgets (demo)": MaskingConfig(0.5, 0.5, mixture=MIX),
            "budgets + target_rates": MaskingConfig(0.5, 0.5, mixture=MIX, target_rates={"tok_spec_z": 0.3}),
            "ModalityMixMasking": ModalityMixMasking()}


def batch(B: int, seed: int):
    "Random tokens and presence patterns like the demo's data (catalog presence per cell)."
    g = torch.Generator().manual_seed(seed)
    tokens = {k: torch.randint(0, v, (B, n), generator=g) for k, (n, v, _) in KEYS.items()}
    legacy = torch.rand(B, generator=g) < 0.75
    present = {"tok_image_legacy": legacy, "tok_image_hsc": (torch.rand(B, generator=g) < 0.45) | ~legacy,
               "tok_catalog_legacy": legacy[:, None] & (torch.rand(B, 7, generator=g) > 0.1),
               "tok_spec_z": torch.rand(B, generator=g) < 0.3}
    for k, p in present.items(): tokens[k][~(p if p.dim() == 2 else p[:, None].expand_as(tokens[k]))] = 0
    return tokens, present


def model_step(model, opt):
    "The trainer's step on one batch and its masks; the model takes presence per modality."
    def step(tokens, present, masks):
        rows = {k: p.any(1) if p.dim() == 2 else p for k, p in present.items()}
        model.train()
        terms = model(tokens, *masks, rows, loss_terms=True)
        loss = average_over_modalities(terms.ce_sum, terms.n_targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if not torch.isfinite(loss): raise RuntimeError("non-finite loss")
    return step


def run(B: int, steps: int, warmup: int = 2) -> dict:
    torch.manual_seed(0)
    model = MultimodalTransformer({k: v for k, (_, v, _) in KEYS.items()}, {k: n for k, (n, _, _) in KEYS.items()},
                                  TransformerConfig.preset("tiny"), token_grids={k: g for k, (_, _, g) in KEYS.items()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    step = model_step(model, opt)
    times = {name: [] for name in MASKINGS} | {"step": []}
    for i in range(warmup + steps):
        tokens, present = batch(B, seed=i)
        for name, masking in MASKINGS.items():
            t0 = time.perf_counter()
            masks = batch_masks(masking, tokens, present, torch.Generator().manual_seed(i))
            if i >= warmup: times[name].append(time.perf_counter() - t0)
        masks = batch_masks(MASKINGS["budgets (demo)"], tokens, present, torch.Generator().manual_seed(i))
        t0 = time.perf_counter()
        step(tokens, present, masks)            # the reference: the step on the demo masking's masks
        if i >= warmup: times["step"].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians over {args.steps} batches")
    print(f"{'batch':>5}  {'masking':<24} {'mask ms':>8} {'step ms':>8} {'mask / step':>11}")
    for B in args.batches:
        t = run(B, args.steps)
        for name in MASKINGS:
            print(f"{B:>5}  {name:<24} {1e3 * t[name]:>8.2f} {1e3 * t['step']:>8.1f} {t[name] / t['step']:>10.1%}")


if __name__ == "__main__": main()
