"""Property tests of mmfm.masking: disjointness, exact budgets (shrunk where a sample is too small), presence per modality
and per token, per-key target rates, samples with a single token, the masking contract, determinism, and the budget
distribution."""
import math
import pytest
import torch
from mmfm.testing import per_row_mix_masking
from hypothesis import given, settings, strategies as st, HealthCheck, assume
from dataclasses import dataclass
from mmfm.masking import (apply_masking, sample_budget_masks, split_budget, sample_dirichlet, MaskingConfig, Masks,
                          ModalityMixMasking, MaskingError, batch_masks, token_level_presence, check_masking, masking_meta)
from mmfm.transformer import MultimodalTransformer, TransformerConfig

SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@st.composite
def token_batches(draw, min_present_tokens=2):
    "A random token dict with presence flags; every sample keeps at least `min_present_tokens` present tokens."
    n_keys = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(1, 12), min_size=n_keys, max_size=n_keys))
    if sum(sizes) < min_present_tokens: sizes[0] += min_present_tokens
    B = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    tokens = {f"tok_{i}": torch.randint(0, 50, (B, n), generator=g) for i, n in enumerate(sizes)}
    present = {k: torch.rand(B, generator=g) < 0.7 for k in tokens}
    for b in range(B):                       # top up samples that have too few present tokens
        for k in tokens:
            if sum(int(present[j][b]) * tokens[j].shape[1] for j in tokens) >= min_present_tokens: break
            present[k][b] = True
    for k in tokens: tokens[k][~present[k]] = 0
    return tokens, present


def n_present(tokens, present):
    return sum(present[k].long() * t.shape[1] for k, t in tokens.items())


def check_masks(tokens, present, masks: Masks):
    for k, t in tokens.items():
        i, o = masks.is_input[k], masks.is_target[k]
        assert i.dtype == torch.bool and i.shape == t.shape and o.shape == t.shape
        assert not (i & o).any(), f"{k}: input and target overlap"
        assert not (i | o)[~present[k]].any(), f"{k}: an absent row was chosen"


@SETTINGS
@given(token_batches(), st.floats(0.05, 0.95), st.integers(0, 1000))
def test_ratio_masking_properties(batch, ratio, seed):
    tokens, present = batch
    masks = apply_masking(tokens, ratio, present, torch.Generator().manual_seed(seed))
    check_masks(tokens, present, masks)
    n = n_present(tokens, present)
    n_in, n_tgt = masks.counts()
    assert torch.equal(n_in + n_tgt, n)                       # every present token is input or target
    expected = (n * ratio).round().long().clamp(min=1).minimum(n - 1)
    assert torch.equal(n_tgt, expected)
    again = apply_masking(tokens, ratio, present, torch.Generator().manual_seed(seed))
    assert all(torch.equal(again.is_target[k], masks.is_target[k]) for k in tokens)


@SETTINGS
@given(token_batches(), st.data())
def test_budget_masking_properties(batch, data):
    tokens, present = batch
    smallest = int(n_present(tokens, present).min())
    n_in = data.draw(st.integers(1, smallest - 1))
    n_tgt = data.draw(st.integers(1, smallest - n_in))
    conc = data.draw(st.sampled_from([0.05, 0.5, 1.0, 5.0]))
    p_one = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    seed = data.draw(st.integers(0, 1000))
    kw = dict(concentration=conc, mixture={"all-to-all": 1 - p_one, "one-to-all": p_one})
    masks = sample_budget_masks(tokens, n_in, n_tgt, present, generator=torch.Generator().manual_seed(seed), **kw)
    check_masks(tokens, present, masks)
    got_in, got_tgt = masks.counts()
    assert (got_tgt == n_tgt).all()                                  # target budget met exactly, per sample
    used = torch.stack([m.any(1) for m in masks.is_input.values()], 1)
    short = got_in != n_in                   # one-to-all: inputs from one modality only, fewer when it is smaller
    assert (got_in == n_in)[used.sum(1) > 1].all() and (got_in[short] < n_in).all()
    full = torch.stack([(m == present[k][:, None]).all(1) for k, m in masks.is_input.items()], 1)
    assert (used.sum(1) == 1)[short].all() and (full & used)[short].any(1).all()   # ... all of that modality
    again = sample_budget_masks(tokens, n_in, n_tgt, present, generator=torch.Generator().manual_seed(seed), **kw)
    assert all(torch.equal(again.is_input[k], masks.is_input[k]) and torch.equal(again.is_target[k], masks.is_target[k])
               for k in tokens)


@SETTINGS
@given(token_batches(min_present_tokens=1), st.integers(1, 40), st.integers(1, 40), st.integers(0, 1000))
def test_budgets_too_large_shrink_per_sample(batch, n_in, n_tgt, seed):
    "Budgets a sample cannot hold shrink in proportion for it: never an error, at least one input, one target if n >= 2."
    tokens, present = batch
    n = n_present(tokens, present)
    masks = sample_budget_masks(tokens, n_in, n_tgt, present, generator=torch.Generator().manual_seed(seed))
    check_masks(tokens, present, masks)
    got_in, got_tgt = masks.counts()
    fits = n_in + n_tgt <= n
    assert (got_in[fits] == n_in).all() and (got_tgt[fits] == n_tgt).all()
    assert torch.equal((got_in + got_tgt)[~fits], n[~fits])             # a sample too small: all its tokens used
    assert (got_in >= 1).all() and torch.equal(got_tgt >= 1, n >= 2)
    expected_in = (n.double() * n_in / (n_in + n_tgt)).round().long().minimum(n - 1).clamp(min=1)
    assert torch.equal(got_in[~fits], expected_in[~fits])                # in proportion to the budgets


def test_all_absent_sample_raises():
    tokens = {"a": torch.zeros(3, 4, dtype=torch.long), "b": torch.zeros(3, 2, dtype=torch.long)}
    present = {"a": torch.tensor([True, False, True]), "b": torch.tensor([True, False, False])}
    with pytest.raises(ValueError, match="sample 1: every modality is absent"): sample_budget_masks(tokens, 1, 1, present)
    with pytest.raises(ValueError, match="sample 1: every modality is absent"): apply_masking(tokens, 0.5, present)
    cells = {"a": torch.tensor([[True] * 4, [False] * 4, [True] * 4]), "b": present["b"]}
    cells["a"][2] = False                                          # per token: sample 2 has no present token left
    with pytest.raises(ValueError, match="sample 1: every modality is absent"): MaskingConfig(1, 1)(tokens, cells)
    cells["a"][1] = True
    with pytest.raises(ValueError, match="sample 2: every modality is absent"): ModalityMixMasking()(tokens, cells)


@pytest.mark.parametrize("masking", [MaskingConfig(0.5, 0.5), MaskingConfig(1, 1), MaskingConfig(64, 64),
                                     MaskingConfig(0.5, 0.5, target_rates={"b": 1.0}), MaskingConfig(mask_ratio=0.5),
                                     ModalityMixMasking()])
def test_sample_with_one_token_gets_an_input_and_no_target(masking):
    "The report's reproduction: fractional or integer budgets on a batch where a sample has only a 1-token key."
    tokens = {"a": torch.zeros(3, 4, dtype=torch.long), "b": torch.zeros(3, 1, dtype=torch.long)}
    present = {"a": torch.tensor([True, False, True]), "b": torch.tensor([True, True, False])}
    masks = masking(tokens, present, torch.Generator().manual_seed(0))
    check_masks(tokens, present, masks)
    n_in, n_tgt = masks.counts()
    assert (n_in[1], n_tgt[1]) == (1, 0) and bool(masks.is_input["b"][1, 0])
    assert (n_in >= 1).all() and (n_tgt[[0, 2]] >= 1).all()


def test_bad_arguments():
    tokens = {"a": torch.zeros(2, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="mask_ratio"): apply_masking(tokens, 0.0)
    with pytest.raises(ValueError, match="input_budget"): sample_budget_masks(tokens, 0, 1)
    with pytest.raises(TypeError, match="target_budget"): sample_budget_masks(tokens, 1, "2")
    with pytest.raises(KeyError, match="tok_zzz"): sample_budget_masks(tokens, 1, 1, concentration={"tok_zzz": 2.0})
    with pytest.raises(ValueError, match="unknown masking"): sample_budget_masks(tokens, 1, 1, mixture={"one-to-one": 1.0})
    with pytest.raises(KeyError, match="present"): apply_masking(tokens, 0.5, {"b": torch.ones(2, dtype=torch.bool)})


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 8), st.data())
def test_split_budget_sums_and_caps(B, K, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    capacity = torch.randint(0, 10, (B, K), generator=g)
    capacity[:, 0] += 1
    weights = torch.rand(B, K, generator=g) * (torch.rand(B, K, generator=g) < 0.7)
    budget = torch.stack([torch.randint(1, int(c.sum()) + 1, (1,), generator=g)[0] for c in capacity])
    out = split_budget(weights, capacity, budget)
    assert torch.equal(out.sum(1), budget)
    assert (out >= 0).all() and (out <= capacity).all()
    # where no modality is capped, the split is the proportional one, rounded (within one token)
    ideal = budget[:, None] * weights / weights.sum(1, keepdim=True).clamp(min=1e-12)
    free = (ideal <= capacity).all(1) & (weights.sum(1) > 0)
    assert ((out - ideal).abs()[free] < 1 + 1e-9).all()


def shares(masks: Masks, which: str, budget: int) -> torch.Tensor:
    m = masks.is_input if which == "input" else masks.is_target
    return torch.stack([v.sum(1) for v in m.values()], 1).double() / budget


def test_budget_shares_follow_the_dirichlet():
    "Mean and variance of each modality's share of the budget match Dirichlet(alpha) when no modality is capped."
    B, budget = 4000, 200
    alpha = {"tok_a": 3.0, "tok_b": 1.0, "tok_c": 0.5, "tok_d": 0.5}
    tokens = {k: torch.zeros(B, 1000, dtype=torch.long) for k in alpha}
    masks = sample_budget_masks(tokens, budget, budget, concentration=alpha, target_concentration=2.0,
                                generator=torch.Generator().manual_seed(0))
    a = torch.tensor(list(alpha.values()), dtype=torch.float64)
    a0 = a.sum()
    s_in = shares(masks, "input", budget)
    assert torch.allclose(s_in.mean(0), a / a0, atol=0.01), s_in.mean(0)
    assert torch.allclose(s_in.var(0), a * (a0 - a) / (a0**2 * (a0 + 1)), atol=0.004), s_in.var(0)
    s_tgt = shares(masks, "target", budget)                           # symmetric concentration 2 for targets
    assert torch.allclose(s_tgt.mean(0), torch.full((4,), 0.25, dtype=torch.float64), atol=0.01)
    assert torch.allclose(s_tgt.var(0), torch.full((4,), 0.25 * 0.75 / 9, dtype=torch.float64), atol=0.004)


def test_budget_shares_with_absent_modalities():
    "Absent modalities get nothing; the present ones share the budget as a Dirichlet over the present ones."
    B = 3000
    tokens = {k: torch.zeros(B, 500, dtype=torch.long) for k in ("a", "b", "c")}
    present = {"a": torch.ones(B, dtype=torch.bool), "b": torch.arange(B) % 2 == 0, "c": torch.ones(B, dtype=torch.bool)}
    masks = sample_budget_masks(tokens, 90, 30, present, generator=torch.Generator().manual_seed(1))
    s = shares(masks, "input", 90)
    assert (s[~present["b"], 1] == 0).all()
    assert torch.allclose(s[present["b"]].mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015)
    assert torch.allclose(s[~present["b"]][:, [0, 2]].mean(0), torch.full((2,), 0.5, dtype=torch.float64), atol=0.015)


def test_one_to_all_picks_each_present_modality_uniformly():
    B = 3000
    tokens = {k: torch.zeros(B, 16, dtype=torch.long) for k in ("a", "b", "c")}
    present = {"a": torch.ones(B, dtype=torch.bool), "b": torch.ones(B, dtype=torch.bool), "c": torch.arange(B) % 3 != 0}
    masks = sample_budget_masks(tokens, 8, 8, present, mixture={"one-to-all": 1.0}, generator=torch.Generator().manual_seed(2))
    used = torch.stack([m.any(1) for m in masks.is_input.values()], 1)
    assert (used.sum(1) == 1).all()                                   # one modality holds all inputs
    both = present["c"]
    freq_all = used[both].double().mean(0)
    freq_two = used[~both].double().mean(0)
    assert torch.allclose(freq_all, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03)
    assert torch.allclose(freq_two[:2], torch.full((2,), 0.5, dtype=torch.float64), atol=0.04) and freq_two[2] == 0


def test_mixture_proportions():
    B = 4000
    tokens = {k: torch.zeros(B, 16, dtype=torch.long) for k in ("a", "b", "c", "d")}
    masks = sample_budget_masks(tokens, 6, 6, concentration=50.0, mixture={"all-to-all": 0.7, "one-to-all": 0.3},
                                generator=torch.Generator().manual_seed(3))
    single = (torch.stack([m.any(1) for m in masks.is_input.values()], 1).sum(1) == 1).double().mean()
    assert abs(single - 0.3) < 0.03                          # with concentration 50, all-to-all nearly never uses one modality


def test_dirichlet_sampler_moments_small_concentration():
    a = torch.tensor([0.05, 0.1, 0.3])
    w = sample_dirichlet(a.expand(40000, 3), torch.Generator().manual_seed(0))
    a0 = a.sum()
    assert torch.isfinite(w).all() and torch.allclose(w.sum(1), torch.ones(40000, dtype=torch.float64))
    assert torch.allclose(w.mean(0), (a / a0).double(), atol=0.01)
    assert torch.allclose(w.var(0), (a * (a0 - a) / (a0**2 * (a0 + 1))).double(), atol=0.01)


def test_masking_config_dispatch():
    tokens = {"a": torch.zeros(4, 10, dtype=torch.long)}
    assert MaskingConfig(3, 2)(tokens, None, torch.Generator().manual_seed(0)).counts()[1].tolist() == [2] * 4
    assert MaskingConfig(mask_ratio=0.5)(tokens).counts()[1].tolist() == [5] * 4
    with pytest.raises(ValueError, match="input_budget"): MaskingConfig(None, 3)(tokens)


# --- whole-batch masks (batch_masks) against draws made sample by sample ------------------------------------------



def repeated_batch(n_repeats: int):
    "Four presence patterns (one with a single modality), each repeated: rows 4r..4r+3 are copies of rows 0..3."
    base_present = {"tok_a": [True, True, True, False], "tok_b": [True, False, True, True], "tok_c": [True, True, False, False]}
    sizes = {"tok_a": 6, "tok_b": 3, "tok_c": 4}
    present = {k: torch.tensor(v * n_repeats) for k, v in base_present.items()}
    tokens = {k: torch.zeros(4 * n_repeats, n, dtype=torch.long) for k, n in sizes.items()}
    return tokens, present


def marginals(masks: Masks, n_patterns: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per presence pattern (rows of one pattern are every n_patterns-th row): proportions (the chance each token is
    an input / a target, the chance a key is wholly input / target) and mean counts (inputs / targets per key)."""
    props, counts = [], []
    for m in (masks.is_input, masks.is_target):
        for v in m.values():
            v = v.reshape(-1, n_patterns, v.shape[1])
            props += [v.double().mean(0).flatten(), v.all(2).double().mean(0)]
            counts.append(v.sum(2).double().mean(0))
    return torch.cat(props), torch.cat(counts)


def check_batch_masks(tokens, present, masks: Masks, input_only=()):
    for k, t in tokens.items():
        i, o = masks.is_input[k], masks.is_target[k]
        assert i.shape == o.shape == t.shape and i.dtype == o.dtype == torch.bool
        assert not (i & o).any(), f"{k}: a target that is also an input"
        assert not (i | o)[~present[k]].any(), f"{k}: an absent modality was chosen"
        if k in input_only: assert not o.any(), f"{k} is input-only but has targets"


@pytest.mark.parametrize("mm", [ModalityMixMasking(), ModalityMixMasking(input_only=("tok_a",)),
                                ModalityMixMasking(0.2, 0.2, 0.6, min_ratio=0.3, max_ratio=0.5)])
def test_mix_masking_batch_matches_per_row_marginals(mm):
    "The vectorised ModalityMixMasking draws each row from the same distribution as the loop over rows did."
    tokens, present = repeated_batch(1500)
    new = mm(tokens, present, torch.Generator().manual_seed(0))
    old = per_row_mix_masking(mm, tokens, present, torch.Generator().manual_seed(1))
    check_batch_masks(tokens, present, new, mm.input_only)
    check_batch_masks(tokens, present, old, mm.input_only)
    (p_new, c_new), (p_old, c_old) = marginals(new), marginals(old)
    # 1500 rows per pattern: a proportion has sd <= 0.013 (difference of two: <= 0.018), a mean count of <= 6 tokens
    # sd <= 0.08 (difference <= 0.11); 4.5 sd apart fails
    assert (p_new - p_old).abs().max() < 0.08, (p_new - p_old).abs().max()
    assert (c_new - c_old).abs().max() < 0.5, (c_new - c_old).abs().max()


def test_mix_masking_strategies_respected_per_row():
    "Leave-one-out and one-in act on whole present modalities; a single-modality row falls back to random masking."
    tokens, present = repeated_batch(200)
    loo = ModalityMixMasking(p_random=0, p_one_in=0)(tokens, present, torch.Generator().manual_seed(3))
    one_in = ModalityMixMasking(p_random=0, p_leave_one_out=0)(tokens, present, torch.Generator().manual_seed(3))
    for m, whole in ((loo, loo.is_target), (one_in, one_in.is_input)):
        check_batch_masks(tokens, present, m)
        whole_keys = torch.stack([v.all(1) for v in whole.values()], 1)
        partial = torch.stack([v.any(1) & ~v.all(1) for v in whole.values()], 1)
        multi = torch.stack([p for p in present.values()], 1).sum(1) >= 2
        assert (whole_keys[multi].sum(1) == 1).all() and not partial[multi].any()
        n_in, n_tgt = m.counts()
        assert (n_in[~multi] >= 1).all() and (n_tgt[~multi] >= 1).all()   # random masking of the one modality


def test_budget_batch_matches_per_sample_marginals():
    "sample_budget_masks over a whole batch gives each row the distribution of a draw for that sample alone."
    tokens, present = repeated_batch(400)
    mc = MaskingConfig(input_budget=0.5, target_budget=0.4, mixture={"all-to-all": 0.5, "one-to-all": 0.5})
    whole = batch_masks(mc, tokens, present, torch.Generator().manual_seed(0))
    rows = [mc({k: t[b:b + 1] for k, t in tokens.items()}, {k: p[b:b + 1] for k, p in present.items()},
               torch.Generator().manual_seed(10_000 + b)) for b in range(len(present["tok_a"]))]
    one_by_one = Masks({k: torch.cat([r.is_input[k] for r in rows]) for k in tokens},
                       {k: torch.cat([r.is_target[k] for r in rows]) for k in tokens})
    for m in (whole, one_by_one): check_batch_masks(tokens, present, m)
    assert torch.equal(whole.counts()[1], one_by_one.counts()[1])     # target budgets met exactly (inputs: one-to-all
    # rows have fewer when their input modality is smaller than the budget; compared through the marginals below)
    (p_a, c_a), (p_b, c_b) = marginals(whole), marginals(one_by_one)
    # 400 rows per pattern: a difference of two proportions has sd <= 0.035, of two mean counts (<= 6 tokens) <= 0.21
    assert (p_a - p_b).abs().max() < 0.16, (p_a - p_b).abs().max()
    assert (c_a - c_b).abs().max() < 0.95, (c_a - c_b).abs().max()


@pytest.mark.parametrize("masking", [MaskingConfig(2, 1), MaskingConfig(mask_ratio=0.4), ModalityMixMasking(),
                                     ModalityMixMasking(input_only=("tok_b",))])
def test_batch_masks_deterministic_and_seed_sensitive(masking):
    tokens, present = repeated_batch(8)
    a = batch_masks(masking, tokens, present, torch.Generator().manual_seed(7))
    b = batch_masks(masking, tokens, present, torch.Generator().manual_seed(7))
    c = batch_masks(masking, tokens, present, torch.Generator().manual_seed(8))
    assert all(torch.equal(a.is_input[k], b.is_input[k]) and torch.equal(a.is_target[k], b.is_target[k]) for k in tokens)
    assert any(not torch.equal(a.is_target[k], c.is_target[k]) for k in tokens)
    check_batch_masks(tokens, present, a, getattr(masking, "input_only", ()))


@pytest.mark.parametrize("masking", [MaskingConfig(3, 2), MaskingConfig(mask_ratio=0.4), ModalityMixMasking(),
                                     MaskingConfig(5, 5)])
def test_batch_masks_errors_name_the_sample_id(masking):
    tokens, present = repeated_batch(2)
    ids = [f"id{i}" for i in range(8)]
    for p in present.values(): p[5] = False
    bad, pattern = "id5", "every modality is absent"
    with pytest.raises(MaskingError, match=f"sample '{bad}': {pattern}") as e:
        batch_masks(masking, tokens, present, torch.Generator().manual_seed(0), ids)
    assert e.value.sample == bad and ids[e.value.row] == bad
    with pytest.raises(ValueError, match="sample \\d: "): batch_masks(masking, tokens, present, None)  # no ids: the row


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_batches(), st.integers(0, 10_000), st.sampled_from([(), ("tok_0",)]))
def test_mix_masking_properties(batch, seed, input_only):
    tokens, present = batch
    mm = ModalityMixMasking(input_only=input_only)
    masks = mm(tokens, present, torch.Generator().manual_seed(seed))
    check_batch_masks(tokens, present, masks, input_only)
    n_in, _ = masks.counts()
    assert (n_in >= 1).all()                                     # every row shows the encoder something


def test_mix_masking_strategy_frequencies_and_ratios():
    """Against the definition, on many rows (cheap: one vectorised call): strategy frequencies, the target ratio of
    random masking uniform in [min_ratio, max_ratio], and the modality picked uniformly among the present ones."""
    B, p = 20_000, (0.5, 0.3, 0.2)
    tokens = {k: torch.zeros(B, 8, dtype=torch.long) for k in ("tok_a", "tok_b", "tok_c")}
    mm = ModalityMixMasking(*p, min_ratio=0.2, max_ratio=0.7)
    m = mm(tokens, None, torch.Generator().manual_seed(4))
    check_batch_masks(tokens, {k: torch.ones(B, dtype=torch.bool) for k in tokens}, m)
    whole_in = torch.stack([v.all(1) for v in m.is_input.values()], 1)
    whole_tgt = torch.stack([v.all(1) for v in m.is_target.values()], 1)
    loo = (whole_tgt.sum(1) == 1) & (whole_in.sum(1) == 2)      # random masking of 24 tokens all but never does this
    one_in = (whole_in.sum(1) == 1) & (whole_tgt.sum(1) == 2)
    rand = ~loo & ~one_in
    freq = torch.stack([rand, loo, one_in]).double().mean(1)
    assert torch.allclose(freq, torch.tensor(p, dtype=torch.float64), atol=0.015), freq   # sd <= 0.0036
    ratio = m.counts()[1][rand].double() / 24
    assert ratio.min() >= 0.2 - 1 / 48 and ratio.max() <= 0.7 + 1 / 48
    assert abs(ratio.mean() - 0.45) < 0.006 and abs(ratio.std() - 0.5 / 12**0.5) < 0.006   # uniform on [0.2, 0.7]
    for picked in (whole_tgt[loo], whole_in[one_in]):           # each modality picked about a third of the time
        assert torch.allclose(picked.double().mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.025)


# --- per-key target rates, small modalities, per-token presence, the masking contract (issue 17) -------------------

ASTRO = {"tok_image_legacy": 68, "tok_image_hsc": 86, "tok_catalog_legacy": 7, "tok_spec_z": 1}


def astro_batch(B, seed=0, all_present=False):
    "The astronomy demo's token counts and presence patterns: Legacy image + catalog 75 %, HSC 45 % (or when no Legacy), redshift 30 %."
    g = torch.Generator().manual_seed(seed)
    tokens = {k: torch.zeros(B, n, dtype=torch.long) for k, n in ASTRO.items()}
    if all_present: return tokens, {k: torch.ones(B, dtype=torch.bool) for k in ASTRO}
    legacy = torch.rand(B, generator=g) < 0.75
    present = {"tok_image_legacy": legacy, "tok_image_hsc": (torch.rand(B, generator=g) < 0.45) | ~legacy,
               "tok_catalog_legacy": legacy.clone(), "tok_spec_z": torch.rand(B, generator=g) < 0.3}
    return tokens, present


@pytest.mark.parametrize("mixture", [{"all-to-all": 1.0}, {"one-to-all": 1.0}, {"all-to-all": 0.5, "one-to-all": 0.5}])
@pytest.mark.parametrize("rate", [0.1, 0.3, 0.8])
def test_one_token_modality_is_a_target_at_its_rate(mixture, rate):
    "A 1-token redshift among modalities of 68, 86 and 7 tokens: a target in `rate` of the samples that have it, within 3 sd."
    tokens, present = astro_batch(30_000, seed=int(rate * 10))
    masking = MaskingConfig(0.5, 0.5, mixture=mixture, target_rates={"tok_spec_z": rate})
    masks = masking(tokens, present, torch.Generator().manual_seed(1))
    check_masks(tokens, present, masks)
    has_z = present["tok_spec_z"]
    share = masks.is_target["tok_spec_z"][has_z].double().mean()
    sd = math.sqrt(rate * (1 - rate) / int(has_z.sum()))
    assert abs(share - rate) < 3 * sd, (float(share), rate, sd)
    assert (masks.counts()[0] >= 1).all()


@pytest.mark.parametrize("mixture", [{"all-to-all": 1.0}, {"one-to-all": 1.0}])
def test_small_modality_not_starved_by_a_larger_one(mixture):
    """The report: with a spectrum and a redshift, one-to-all made the redshift a target half the time; adding a 5-token
    table made it (nearly) never one, the input budget's overflow filling the 1-token modality first. Now a rate holds
    whatever else the sample has, and without a rate the redshift stays a target in a fair share of the samples."""
    B = 20_000
    spec, tab, z = (torch.zeros(B, n, dtype=torch.long) for n in (40, 5, 1))
    def z_share(tokens, **kw):
        m = MaskingConfig(0.5, 0.5, mixture=mixture, **kw)(tokens, None, torch.Generator().manual_seed(2))
        check_masks(tokens, {k: torch.ones(B, dtype=torch.bool) for k in tokens}, m)
        return float(m.is_target["tok_z"].any(1).double().mean())
    two, three = {"tok_spec": spec, "tok_z": z}, {"tok_spec": spec, "tok_table": tab, "tok_z": z}
    sd = math.sqrt(0.25 / B)
    for tokens in (two, three):
        assert abs(z_share(tokens, target_rates={"tok_z": 0.5}) - 0.5) < 3 * sd
        assert z_share(tokens) > 0.4                         # budget rule alone: was 0.03 (all-to-all) / 0.35 (one-to-all)
        assert z_share(tokens, input_only=("tok_z",)) == 0


def test_rated_key_not_drawn_is_no_target_and_others_follow_the_budgets():
    tokens, present = astro_batch(4000, all_present=True)
    m = MaskingConfig(0.5, 0.5, target_rates={"tok_catalog_legacy": 0.25})(tokens, present, torch.Generator().manual_seed(3))
    cat = m.is_target["tok_catalog_legacy"].sum(1)
    assert abs(float((cat > 0).double().mean()) - 0.25) < 3 * math.sqrt(0.25 * 0.75 / 4000)
    assert torch.equal(m.counts()[1], torch.full((4000,), 81))      # the target budget (162 // 2) is met exactly
    assert (m.is_target["tok_image_hsc"].any(1)).double().mean() > 0.95   # the rest follows the Dirichlet split


def test_input_only_in_budget_masking():
    tokens, present = astro_batch(500)
    m = MaskingConfig(0.5, 0.5, input_only=("tok_image_hsc",), mixture={"all-to-all": 0.5, "one-to-all": 0.5})(
        tokens, present, torch.Generator().manual_seed(4))
    check_masks(tokens, present, m)
    assert not m.is_target["tok_image_hsc"].any() and m.is_input["tok_image_hsc"].any()
    only_hsc = present["tok_image_hsc"] & ~present["tok_image_legacy"] & ~present["tok_spec_z"]
    assert only_hsc.any() and (m.counts()[1][only_hsc] == 0).all()      # nothing else to predict: no target
    assert (m.counts()[1][~only_hsc] >= 1).all()


@st.composite
def cell_presence(draw):
    "A token batch with presence per token (missing cells) for some keys and per modality for the others."
    tokens, present = draw(token_batches(min_present_tokens=1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    out = {}
    for k, t in tokens.items():
        if draw(st.booleans()): out[k] = present[k]
        else: out[k] = present[k][:, None] & (torch.rand(t.shape, generator=g) < 0.6)
    keep = torch.stack([p if p.dim() == 1 else p.any(1) for p in out.values()], 1).any(1)
    assume(bool(keep.all()))
    return tokens, out



@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cell_presence(), st.sampled_from([MaskingConfig(0.5, 0.5), MaskingConfig(3, 2), MaskingConfig(mask_ratio=0.4),
                                         ModalityMixMasking(), MaskingConfig(0.4, 0.6, target_rates={"tok_0": 0.5},
                                                                             mixture={"one-to-all": 1.0})]),
       st.integers(0, 1000))
def test_token_level_presence(batch, masking, seed):
    "Absent tokens are never inputs nor targets; budgets count present tokens; the masking contract holds."
    tokens, present = batch
    token_present = token_level_presence(tokens, present)
    masks = masking(tokens, present, torch.Generator().manual_seed(seed))
    for k in tokens:
        assert not ((masks.is_input[k] | masks.is_target[k]) & ~token_present[k]).any()
        assert not (masks.is_input[k] & masks.is_target[k]).any()
    n = sum(p.sum(1) for p in token_present.values())
    n_in, n_tgt = masks.counts()
    assert (n_in >= 1).all() and (n_in + n_tgt <= n).all()
    if isinstance(masking, MaskingConfig) and masking.input_budget == 3:
        fits = n >= 5
        assert (n_in[fits] == 3).all() and (n_tgt[fits] == 2).all()         # counted over present tokens only
    check_masking(masking, tokens, present)


def test_sample_with_one_token_trains_through_the_loss():
    "A batch where a sample holds only a 1-token key: masks, then a finite loss and finite gradients through the model."
    B = 6
    tokens = {"tok_spec": torch.randint(0, 30, (B, 12)), "tok_table": torch.randint(0, 8, (B, 5)),
              "tok_z": torch.randint(0, 16, (B, 1))}
    present = {"tok_spec": torch.tensor([False, True, True, False, True, True]),
               "tok_table": torch.tensor([False, True, False, False, True, True]),
               "tok_z": torch.tensor([True, True, True, True, False, True])}
    for k in tokens: tokens[k][~present[k]] = 0
    torch.manual_seed(0)
    model = MultimodalTransformer({"tok_spec": 30, "tok_table": 8, "tok_z": 16}, {"tok_spec": 12, "tok_table": 5, "tok_z": 1},
                                  TransformerConfig.preset("tiny"))
    for masking in (MaskingConfig(0.5, 0.5), MaskingConfig(8, 8), MaskingConfig(0.5, 0.5, target_rates={"tok_z": 0.9}),
                    MaskingConfig(mask_ratio=0.5), ModalityMixMasking()):
        masks = batch_masks(masking, tokens, present, torch.Generator().manual_seed(5), [f"g{i}" for i in range(B)])
        n_in, n_tgt = masks.counts()
        assert n_in[[0, 3]].tolist() == [1, 1] and n_tgt[[0, 3]].tolist() == [0, 0]
        model.zero_grad()
        out = model.loss(tokens, *masks, present)
        out.loss.backward()
        assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_plain_function_refused_with_how_to():
    "What the report hit: a plain function as masking; the trainer calls check_masking when it is built."
    def my_masking(tokens, present=None, generator=None): return apply_masking(tokens, 0.3, present, generator)
    for bad in (my_masking, lambda t, p, g: None, "all-to-all", {"input_budget": 8}):
        with pytest.raises(TypeError, match="dataclass") as e: check_masking(bad)
        assert "__call__(self, tokens, present=None, generator=None)" in str(e.value)
        with pytest.raises(TypeError, match="dataclass"): masking_meta(bad)
    with pytest.raises(TypeError, match="pass ModalityMixMasking\\(\\.\\.\\.\\)"): check_masking(ModalityMixMasking)

    @dataclass
    class TwoArgs:
        def __call__(self, tokens): return None
    with pytest.raises(TypeError, match="cannot be called as masking\\(tokens, present, generator\\)"): check_masking(TwoArgs())

    @dataclass
    class HoldsATensor:
        w: object = None
        def __call__(self, tokens, present=None, generator=None): return apply_masking(tokens, 0.3, present, generator)
    with pytest.raises(TypeError, match="JSON"): check_masking(HoldsATensor(torch.ones(2)))

    @dataclass
    class Ratio:                                                   # the documented way: accepted, runs, recorded
        ratio: float = 0.3
        def __call__(self, tokens, present=None, generator=None): return apply_masking(tokens, self.ratio, present, generator)
    tokens, present = repeated_batch(3)
    check_masking(Ratio(), tokens, present)
    assert masking_meta(Ratio(0.4)) == {"ratio": 0.4}


def test_masking_meta_keeps_old_checkpoints_resumable():
    "Settings recorded before target_rates / input_only existed compare equal while those are at their defaults."
    before = {"input_budget": 8, "target_budget": 8, "mask_ratio": None, "concentration": 1.0,
              "target_concentration": None, "mixture": {"all-to-all": 1.0}}
    assert masking_meta(MaskingConfig(8, 8)) == before
    assert masking_meta(MaskingConfig(8, 8, input_only=("tok_a",)))["input_only"] == ("tok_a",)


@pytest.mark.parametrize("masking", [MaskingConfig(0.5, 0.5, target_rates={"tok_spec_z": 0.3}, input_only=("tok_image_hsc",),
                                                   mixture={"all-to-all": 0.5, "one-to-all": 0.5}),
                                     ModalityMixMasking(input_only=("tok_spec_z",))])
def test_deterministic_with_a_seed_per_token_presence(masking):
    tokens, present = astro_batch(64, seed=5)
    present = {**present, "tok_catalog_legacy": present["tok_catalog_legacy"][:, None] & (torch.arange(7) % 3 != 0)}
    a, b, c = (masking(tokens, present, torch.Generator().manual_seed(s)) for s in (11, 11, 12))
    assert all(torch.equal(a.is_input[k], b.is_input[k]) and torch.equal(a.is_target[k], b.is_target[k]) for k in tokens)
    assert any(not torch.equal(a.is_target[k], c.is_target[k]) for k in tokens)
    assert not (a.is_input["tok_catalog_legacy"] | a.is_target["tok_catalog_legacy"])[:, ::3].any()
