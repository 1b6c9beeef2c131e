"""Run under `torchrun --nproc_per_node=2`: DDP gradients on half batches vs one process on the whole batch.

Each rank takes its half of one global batch through DistributedDataParallel with the trainer's loss (`global_loss`);
rank 0 also computes the single-process gradient on the concatenated batch, and the naive DDP gradient (each rank
normalising by its own target counts) to show that the comparison can fail. Results go to the JSON file argv[1].
"""
import copy, json, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from mmfm.tokens import synthetic_token_dataset
from mmfm.train import per_sample_masks, sample_seed, global_loss, init_distributed, DistInfo
from mmfm.transformer import MultimodalTransformer
from mmfm.masking import MaskingConfig

dinfo = init_distributed()
assert dinfo.world_size == 2, dinfo
ds = synthetic_token_dataset(16, seed=0)
torch.manual_seed(0)
model = MultimodalTransformer(ds.vocab_sizes, ds.num_tokens, "tiny", token_grids=ds.token_grids)
reference, naive = copy.deepcopy(model), copy.deepcopy(model)
full = ds.batch(range(8))
masks = per_sample_masks(full, MaskingConfig(6, 6, concentration=0.3), [sample_seed(0, 0, 0, i) for i in range(8)])
rows = slice(4 * dinfo.rank, 4 * dinfo.rank + 4)
cut = lambda d: {k: v[rows] for k, v in d.items()}
half = (cut(full.tokens), cut(masks.is_input), cut(masks.is_target), cut(full.present))

ddp = DDP(model)
share, metrics = global_loss(ddp(*half, loss_terms=True), dinfo)
share.backward()
grads = {n: p.grad.clone() for n, p in model.named_parameters()}

naive.loss(*half).loss.backward()                      # the naive way: local normalisation, then DDP-style averaging
for p in naive.parameters():
    if p.grad is None: p.grad = torch.zeros_like(p)
    dist.all_reduce(p.grad); p.grad /= 2

if dinfo.rank == 0:
    terms = reference(full.tokens, *masks, full.present, loss_terms=True)
    ref_share, ref_metrics = global_loss(terms, DistInfo())
    ref_share.backward()
    ref = {n: p.grad for n, p in reference.named_parameters()}
    scale = max(float(g.abs().max()) for g in ref.values())
    diff = max(float((grads[n] - ref[n]).abs().max()) for n in ref)
    naive_diff = max(float((p.grad - ref[n]).abs().max()) for n, p in naive.named_parameters())
    counts = {k: [int(masks.is_target[k][:4].sum()), int(masks.is_target[k][4:].sum())] for k in masks.is_target}
    json.dump({"max_abs_diff": diff, "naive_max_abs_diff": naive_diff, "grad_scale": scale, "loss": metrics["loss"],
               "ref_loss": ref_metrics["loss"], "target_counts_per_rank": counts}, open(sys.argv[1], "w"))
dist.destroy_process_group()
