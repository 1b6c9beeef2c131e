"""Our quantizers against vector-quantize-pytorch (a dev dependency, used here only as a test oracle).

FSQ: the code <-> index mapping and the indices of quantized inputs agree exactly, incl. inputs at and next to
the rounding boundaries. VQ: the same nearest codes for the same codebook (oracle in eval mode, rotation trick off),
and one EMA training step gives the same codebook.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from vector_quantize_pytorch import FSQ, VectorQuantize

from mmfm.quantize import FiniteScalarQuantizer, VectorQuantizer

LEVELS = [[8, 5, 5, 5], [7, 5, 5, 5, 5], [8, 8, 8, 6, 5]]


def oracle_indices(oracle: FSQ, z: torch.Tensor) -> torch.Tensor:
    "Indices of the oracle for z [n, d] (its forward wants [batch, seq, d])."
    with torch.no_grad():
        _, idx = oracle(z.unsqueeze(0))
    return idx[0].long()


def boundary_inputs(fsq: FiniteScalarQuantizer) -> torch.Tensor:
    "Inputs z whose bounded value lies exactly at, and one float32 step on each side of, every rounding boundary."
    lv = torch.tensor(fsq.levels)
    half_l = (lv - 1) * (1 + fsq.eps) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    cols = []
    for d, L in enumerate(fsq.levels):
        half = L // 2
        b = torch.arange(-half, L - half - 1, dtype=torch.float64) + 0.5           # rounding boundaries k + 1/2
        z = torch.atanh((b + offset[d].double()) / half_l[d].double()) - shift[d].double()
        z = z.float()
        cols.append(torch.cat([z, torch.nextafter(z, z + 1), torch.nextafter(z, z - 1),
                               z + 1e-6, z - 1e-6, z + 1e-4, z - 1e-4]))
    g = torch.Generator().manual_seed(1)
    # each row: one dimension at a boundary-ish value, the others at random values (both varied)
    rows = []
    for d, c in enumerate(cols):
        block = torch.randn(len(c), len(cols), generator=g)
        block[:, d] = c
        rows.append(block)
    return torch.cat(rows)


@pytest.mark.parametrize("levels", LEVELS)
def test_fsq_codes_and_indices_match(levels):
    ours, oracle = FiniteScalarQuantizer(levels), FSQ(levels)
    assert ours.codebook_size == oracle.codebook_size
    all_idx = torch.arange(ours.codebook_size)
    codes = ours.indices_to_codes(all_idx)
    assert torch.equal(codes, oracle.indices_to_codes(all_idx))                 # bit for bit
    assert torch.equal(ours.codes_to_indices(codes), oracle.codes_to_indices(codes).long())
    assert torch.equal(ours.codes_to_indices(codes), all_idx)
    assert torch.equal(ours.decode(all_idx.reshape(-1, 5)), codes.reshape(-1, 5, len(levels)))


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 3.0, 30.0])
def test_fsq_random_inputs_match(levels, scale):
    g = torch.Generator().manual_seed(1000 * sum(levels) + int(100 * scale))
    ours, oracle = FiniteScalarQuantizer(levels), FSQ(levels)
    z = scale * torch.randn(20_000, len(levels), generator=g)
    idx = ours.encode(z)
    assert torch.equal(idx, oracle_indices(oracle, z))
    z_q, idx_f, _ = ours(z)
    assert torch.equal(idx_f, idx)
    with torch.no_grad():
        out, _ = oracle(z.unsqueeze(0))
    torch.testing.assert_close(z_q, out[0], atol=1e-6, rtol=0)  # the oracle's straight-through sum may differ by 1 ulp


@pytest.mark.parametrize("levels", LEVELS)
def test_fsq_boundary_inputs_match(levels):
    ours, oracle = FiniteScalarQuantizer(levels), FSQ(levels)
    z = boundary_inputs(ours)
    assert len(z) > 100
    ours_idx, oracle_idx = ours.encode(z), oracle_indices(oracle, z)
    assert torch.equal(ours_idx, oracle_idx)
    # the boundaries are really exercised: the nudged copies of a boundary do not all fall in one bin
    assert len(ours_idx.unique()) > 20


@pytest.mark.parametrize("levels", LEVELS)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_fsq_arbitrary_floats_match(levels, data):
    n = data.draw(st.integers(1, 8)) * len(levels)
    values = data.draw(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=n, max_size=n))
    z = torch.tensor(values, dtype=torch.float32).reshape(-1, len(levels))
    ours, oracle = FiniteScalarQuantizer(levels), FSQ(levels)
    assert torch.equal(ours.encode(z), oracle_indices(oracle, z))


def test_fsq_bf16_input_matches_oracle_fp32():
    "A bf16 latent: our indices (upcast to fp32 inside) equal the oracle's on the upcast values."
    g = torch.Generator().manual_seed(3)
    z = (2 * torch.randn(5000, 4, generator=g)).bfloat16()
    ours, oracle = FiniteScalarQuantizer([8, 5, 5, 5]), FSQ([8, 5, 5, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, idx, _ = ours(z)
    assert torch.equal(idx, oracle_indices(oracle, z.float()))


def make_pair(num_embeddings, dim, decay=0.99, seed=0):
    torch.manual_seed(seed)
    ours = VectorQuantizer(num_embeddings, dim, decay=decay, dead_code_threshold=0, init_from_data=False)
    oracle = VectorQuantize(dim=dim, codebook_size=num_embeddings, decay=decay, rotation_trick=False,
                            threshold_ema_dead_code=0, commitment_weight=0.25)
    with torch.no_grad():
        oracle.codebook = ours.codebook.clone()
        oracle._codebook.embed_avg.copy_(ours.ema_embed_sum.unsqueeze(0))   # same EMA start: N_i = 1, m_i = e_i
    return ours, oracle


@pytest.mark.parametrize("num_embeddings,dim", [(16, 2), (512, 8), (1024, 64)])
@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_vq_nearest_codes_match(num_embeddings, dim, scale):
    ours, oracle = make_pair(num_embeddings, dim)
    ours.eval(); oracle.eval()
    g = torch.Generator().manual_seed(num_embeddings + dim)
    z = scale * torch.randn(8, 256, dim, generator=g)
    with torch.no_grad():
        q_oracle, idx_oracle, _ = oracle(z)
    idx = ours.encode(z)
    assert torch.equal(idx, idx_oracle.long())
    z_q, idx_f, _ = ours(z)
    assert torch.equal(idx_f, idx)
    torch.testing.assert_close(z_q, q_oracle)
    assert torch.equal(oracle.codebook, ours.codebook)      # neither updated in eval mode


def test_vq_codes_as_inputs_match():
    "Inputs next to codes and halfway between pairs of codes (near ties) pick the same code."
    ours, oracle = make_pair(64, 4)
    ours.eval(); oracle.eval()
    e = ours.codebook
    g = torch.Generator().manual_seed(5)
    near = e + 1e-3 * torch.randn(e.shape, generator=g)
    pairs = torch.randint(0, 64, (500, 2), generator=g)
    halfway = (e[pairs[:, 0]] + e[pairs[:, 1]]) / 2 + 1e-3 * torch.randn(500, 4, generator=g)
    z = torch.cat([near, halfway]).unsqueeze(0)
    with torch.no_grad():
        _, idx_oracle, _ = oracle(z)
    assert torch.equal(ours.encode(z), idx_oracle.long())


def test_vq_one_ema_step_matches():
    ours, oracle = make_pair(32, 4, decay=0.9)
    ours.train(); oracle.train()
    z = torch.randn(4, 64, 4, generator=torch.Generator().manual_seed(7))
    _, idx, _ = ours(z)
    _, idx_oracle, _ = oracle(z)
    assert torch.equal(idx, idx_oracle.long())
    torch.testing.assert_close(ours.ema_cluster_size, oracle._codebook.cluster_size[0])
    torch.testing.assert_close(ours.ema_embed_sum, oracle._codebook.embed_avg[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.codebook, oracle.codebook, atol=1e-5, rtol=1e-5)
