"""Property tests of mmfm.masking: disjointness, exact budgets, presence, determinism, and the budget distribution."""
import math
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from mmfm.masking import (apply_masking, sample_budget_masks, split_budget, sample_dirichlet, MaskingConfig, Masks,
                          ModalityMixMasking, MaskingError, batch_masks)

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
    assert (got_in == n_in).all() and (got_tgt == n_tgt).all()       # budgets met exactly, per sample
    again = sample_budget_masks(tokens, n_in, n_tgt, present, generator=torch.Generator().manual_seed(seed), **kw)
    assert all(torch.equal(again.is_input[k], masks.is_input[k]) and torch.equal(again.is_target[k], masks.is_target[k])
               for k in tokens)


@SETTINGS
@given(token_batches(min_present_tokens=3), st.integers(0, 100))
def test_budget_too_large_raises_naming_the_sample(batch, extra):
    tokens, present = batch
    n = n_present(tokens, present)
    request = 1 + int(n.min()) + extra                               # more than the smallest sample holds
    b = int((n < request).nonzero()[0])                              # the first sample that cannot hold it
    with pytest.raises(ValueError, match=f"sample {b}: input_budget 1 \\+ target_budget"):
        sample_budget_masks(tokens, 1, request - 1, present)


def test_all_absent_sample_raises():
    tokens = {"a": torch.zeros(3, 4, dtype=torch.long), "b": torch.zeros(3, 2, dtype=torch.long)}
    present = {"a": torch.tensor([True, False, True]), "b": torch.tensor([True, False, False])}
    with pytest.raises(ValueError, match="sample 1: every modality is absent"): sample_budget_masks(tokens, 1, 1, present)
    with pytest.raises(ValueError, match="sample 1: every modality is absent"): apply_masking(tokens, 0.5, present)
    with pytest.raises(ValueError, match="sample 2: only 1 token"):
        apply_masking({"a": tokens["a"], "b": tokens["b"][:, :1]}, 0.5,
                      {"a": torch.tensor([True, True, False]), "b": torch.tensor([True, False, True])})


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

def per_row_mix(mm: ModalityMixMasking, tokens, present, generator) -> Masks:
    "The loop-over-rows ModalityMixMasking that the vectorised one replaced: the reference for its distribution."
    keys = list(tokens); B = next(iter(tokens.values())).shape[0]
    probs = torch.tensor([mm.p_random, mm.p_leave_one_out, mm.p_one_in], dtype=torch.float64)
    is_input = {k: torch.zeros_like(t, dtype=torch.bool) for k, t in tokens.items()}
    is_target = {k: torch.zeros_like(t, dtype=torch.bool) for k, t in tokens.items()}
    for b in range(B):
        have = [k for k in keys if bool(present[k][b])]
        can_target = [k for k in have if k not in mm.input_only]
        u = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(probs.sum())
        strategy = 0 if (u < probs[0] or len(have) < 2 or not can_target) else 1 if u < probs[:2].sum() else 2
        if strategy == 0:
            ratio = mm.min_ratio + (mm.max_ratio - mm.min_ratio) * float(torch.rand((), generator=generator, dtype=torch.float64))
            m = apply_masking({k: tokens[k][b:b + 1] for k in keys}, ratio, {k: present[k][b:b + 1] for k in keys}, generator)
            for k in keys: is_input[k][b], is_target[k][b] = m.is_input[k][0], m.is_target[k][0]
        else:
            pool = can_target if strategy == 1 else have
            pick = pool[int(torch.randint(len(pool), (), generator=generator))]
            for k in have:
                is_input[k][b] = (k == pick) == (strategy == 2)
                is_target[k][b] = (k == pick) == (strategy == 1)
        for k in mm.input_only:
            if k in have: is_input[k][b] |= is_target[k][b]; is_target[k][b] = False
    return Masks(is_input, is_target)


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
    old = per_row_mix(mm, tokens, present, torch.Generator().manual_seed(1))
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
    assert torch.equal(whole.counts()[0], one_by_one.counts()[0]) and torch.equal(whole.counts()[1], one_by_one.counts()[1])
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


@pytest.mark.parametrize("masking, pattern", [(MaskingConfig(3, 2), "every modality is absent"),
                                              (MaskingConfig(mask_ratio=0.4), "every modality is absent"),
                                              (ModalityMixMasking(), "every modality is absent"),
                                              (MaskingConfig(5, 5), "input_budget 5 \\+ target_budget 5")])
def test_batch_masks_errors_name_the_sample_id(masking, pattern):
    tokens, present = repeated_batch(2)
    ids = [f"id{i}" for i in range(8)]
    if "absent" in pattern:
        for p in present.values(): p[5] = False
        bad = "id5"
    else:                                                        # the first row holding fewer than 5 + 5 tokens
        n = sum(p.long() * t.shape[1] for p, t in zip(present.values(), tokens.values()))
        bad = ids[int((n < 10).nonzero()[0])]
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
