"""MultimodalTransformer: the loss is exactly the masked cross-entropy, absent tokens change nothing, padding never
leaks between samples, a tiny model overfits, and bad input raises clear errors. Uses the real toy CodecManager."""
import copy
import math
import os
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
from mmfm.masking import sample_budget_masks, apply_masking
from torch._dynamo.utils import counters
from mmfm.transformer import Attention, MultimodalTransformer, TransformerConfig
from mmfm.testing import toy_manager, toy_table, toy_image, toy_series
from mmfm.tokens import TokenBatch, encode_batch

CODECS = toy_manager()
SETTINGS = settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def token_batch(B=4, seed=0, absent=((1, "tok_toy_table"), (2, "tok_toy_series"))) -> TokenBatch:
    "Real tokens from the toy codecs, with some modalities absent (placeholder rows, as encode_batch leaves them)."
    tokens = CODECS.encode(toy_table(B, seed), toy_image(B, seed=seed), toy_series(B, seed))
    present = {k: torch.ones(B, dtype=torch.bool) for k in tokens}
    for b, k in absent:
        if b < B: present[k][b] = False
    for k in tokens: tokens[k][~present[k]] = 0
    return TokenBatch([f"s{i}" for i in range(B)], tokens, present)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultimodalTransformer.from_codecs(CODECS, "tiny")


def test_built_from_the_codec_manager(model):
    assert model.vocab_sizes == CODECS.vocab_sizes and model.num_tokens == CODECS.num_tokens
    assert model.token_grids["tok_toy_image"] == (4, 4)
    for k in CODECS.token_keys:
        assert model.token_embeddings[k].num_embeddings == CODECS.vocab_sizes[k]
        assert model.heads[k].out_features == CODECS.vocab_sizes[k]
    same = MultimodalTransformer(vocab_sizes=CODECS.vocab_sizes, num_tokens=CODECS.num_tokens, codecs=CODECS, d_model=32, nhead=2, num_layers=1)
    assert same.config.n_encoder_layers == same.config.n_decoder_layers == 1
    with pytest.raises(ValueError, match="num_tokens\\['tok_toy_series'\\] = 9"):
        MultimodalTransformer(CODECS.vocab_sizes, {**CODECS.num_tokens, "tok_toy_series": 9}, codecs=CODECS)


def hand_loss(logits, tokens, is_target):
    per_key = [F.cross_entropy(logits[k][is_target[k]].float(), tokens[k][is_target[k]]) for k in tokens if is_target[k].any()]
    return torch.stack(per_key).mean()


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(["budget", "ratio"]))
def test_loss_equals_hand_computed_cross_entropy(model, seed, how):
    batch = token_batch(4, seed % 7)
    g = torch.Generator().manual_seed(seed)
    masks = (sample_budget_masks(batch.tokens, 6, 5, batch.present, generator=g) if how == "budget"
             else apply_masking(batch.tokens, 0.4, batch.present, g))
    logits = model(batch.tokens, *masks, batch.present)
    for k in batch.tokens:                                      # logits exist exactly at the targets
        assert torch.equal(torch.isfinite(logits[k]).all(-1), masks.is_target[k])
    out = model.loss(batch.tokens, *masks, batch.present)
    torch.testing.assert_close(out.loss, hand_loss(logits, batch.tokens, masks.is_target), rtol=1e-5, atol=1e-6)
    assert sum(out.n_targets.values()) == int(sum(m.sum() for m in masks.is_target.values()))


def test_loss_averages_over_modalities_with_targets(model):
    "A modality without targets does not dilute the loss (losses average over what exists)."
    batch = token_batch(3)
    masks = sample_budget_masks(batch.tokens, 6, 5, batch.present, generator=torch.Generator().manual_seed(0))
    only_image = {k: (v if k == "tok_toy_image" else torch.zeros_like(v)) for k, v in masks.is_target.items()}
    if not only_image["tok_toy_image"].any(1).all():
        only_image["tok_toy_image"][:, -1] = ~masks.is_input["tok_toy_image"][:, -1]
    out = model.loss(batch.tokens, masks.is_input, only_image, batch.present)
    assert list(out.losses) == ["tok_toy_image"]
    torch.testing.assert_close(out.loss, out.losses["tok_toy_image"])


@SETTINGS
@given(st.integers(0, 10_000))
def test_absent_and_unused_tokens_change_nothing(model, seed):
    batch = token_batch(4, seed % 5)
    masks = sample_budget_masks(batch.tokens, 6, 5, batch.present, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    scribbled = {}
    for k, t in batch.tokens.items():
        noise = torch.randint(0, CODECS.vocab_sizes[k], t.shape, generator=g)
        unused = ~(masks.is_input[k] | masks.is_target[k])          # absent rows and tokens neither shown nor asked
        scribbled[k] = torch.where(unused, noise, t)
    a = model(batch.tokens, *masks, batch.present)
    b = model(scribbled, *masks, batch.present)
    for k in a: assert torch.equal(a[k].nan_to_num(), b[k].nan_to_num())
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    m1.loss(batch.tokens, *masks, batch.present).loss.backward()
    m2.loss(scribbled, *masks, batch.present).loss.backward()
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert (p1.grad is None and p2.grad is None) or torch.equal(p1.grad, p2.grad), n


def test_padding_never_leaks_between_samples(model):
    "Each sample's logits are the same in a batch (with padding) as alone (ratio masks give different lengths)."
    batch = token_batch(4, 3)
    masks = apply_masking(batch.tokens, 0.3, batch.present, torch.Generator().manual_seed(0))
    assert len(set(masks.counts()[0].tolist())) > 1                 # samples have different input counts
    together = model(batch.tokens, *masks, batch.present)
    for b in range(4):
        sl = slice(b, b + 1)
        alone = model({k: v[sl] for k, v in batch.tokens.items()}, {k: v[sl] for k, v in masks.is_input.items()},
                      {k: v[sl] for k, v in masks.is_target.items()}, {k: v[sl] for k, v in batch.present.items()})
        for k in together:
            torch.testing.assert_close(alone[k].nan_to_num(), together[k][sl].nan_to_num(), rtol=1e-4, atol=1e-5)


def test_sample_without_targets_keeps_gradients_finite(model):
    "A sample with no target tokens has an all-padding decoder row: no NaN anywhere, forward or backward."
    batch = token_batch(3)
    masks = sample_budget_masks(batch.tokens, 6, 5, batch.present, generator=torch.Generator().manual_seed(0))
    for k in masks.is_target: masks.is_target[k][1] = False
    m = copy.deepcopy(model)
    out = m.loss(batch.tokens, *masks, batch.present)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_tiny_model_overfits_a_small_batch():
    torch.manual_seed(0)
    m = MultimodalTransformer.from_codecs(CODECS, "tiny")
    batch = token_batch(4, 1)
    masks = sample_budget_masks(batch.tokens, 10, 8, batch.present, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(120):
        loss = m.loss(batch.tokens, *masks, batch.present).loss
        opt.zero_grad(); loss.backward(); opt.step()
    out = m.loss(batch.tokens, *masks, batch.present)
    assert out.loss.item() < 0.02, out.loss.item()
    assert all(a == 1.0 for a in out.accuracy.values())


def test_bf16_autocast_forward_and_backward(model):
    batch = token_batch(4)
    masks = sample_budget_masks(batch.tokens, 6, 5, batch.present, generator=torch.Generator().manual_seed(0))
    m = copy.deepcopy(model)
    ref = m.loss(batch.tokens, *masks, batch.present).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.loss(batch.tokens, *masks, batch.present)
        logits = m(batch.tokens, *masks, batch.present)
    assert logits["tok_toy_image"].dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert abs(out.loss.item() - ref.item()) < 0.05


def test_embed_returns_encoder_states_of_present_tokens(model):
    batch = token_batch(3)
    enc = model.embed(batch.tokens, batch.present)
    assert enc.valid.sum(1).tolist() == [27, 24, 19]
    keys = [enc.token_keys[i] for i in enc.key_index[1][enc.valid[1]].tolist()]
    assert "tok_toy_table" not in keys                              # sample 1 has no table
    assert torch.isfinite(enc.states).all()


def test_bad_input_errors(model):
    batch = token_batch(3)
    tok, pres = batch.tokens, batch.present
    masks = sample_budget_masks(tok, 6, 5, pres, generator=torch.Generator().manual_seed(0))
    with pytest.raises(KeyError, match="tok_unknown"):
        model({**tok, "tok_unknown": tok["tok_toy_table"]}, *masks, {**pres, "tok_unknown": pres["tok_toy_table"]})
    bad = {**tok, "tok_toy_series": tok["tok_toy_series"].clone()}
    bad["tok_toy_series"][0, 3] = 32
    with pytest.raises(ValueError, match=r"tokens\['tok_toy_series'\] sample 0 position 3 holds 32, outside the vocabulary \[0, 32\)"):
        model(bad, *masks, pres)
    bad["tok_toy_series"][0, 3] = -1
    with pytest.raises(ValueError, match="holds -1"): model(bad, *masks, pres)
    nobody = {k: v.clone() for k, v in pres.items()}
    for k in nobody: nobody[k][2] = False
    with pytest.raises(ValueError, match="sample 2: every modality is absent"): model(tok, None, None, nobody)
    with pytest.raises(ValueError, match="no target tokens"):
        model.loss(tok, masks.is_input, {k: torch.zeros_like(v) for k, v in masks.is_target.items()}, pres)
    with pytest.raises(TypeError, match="is_target\\['tok_toy_image'\\]"):
        model(tok, masks.is_input, {**masks.is_target, "tok_toy_image": masks.is_target["tok_toy_image"].long()}, pres)


def test_save_load_roundtrip_and_corruption(model, tmp_path):
    batch = token_batch(3)
    masks = sample_budget_masks(batch.tokens, 6, 5, batch.present, generator=torch.Generator().manual_seed(0))
    model.save(tmp_path)
    back = MultimodalTransformer.load(tmp_path, codecs=CODECS)
    a, b = model(batch.tokens, *masks, batch.present), back(batch.tokens, *masks, batch.present)
    assert all(torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:100])
    with pytest.raises(ValueError, match="truncated or corrupted"): MultimodalTransformer.load(tmp_path)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_skipping_padding_gives_the_same_loss_and_gradients(dropout):
    """The token-wise layers run on real tokens only (skip_padding, the default): loss and every gradient equal
    those of the plain path that runs them over the padding too (with dropout: in eval mode; in train mode both stay
    finite and the same parameters get gradients)."""
    torch.manual_seed(1)
    fast = MultimodalTransformer.from_codecs(CODECS, "tiny", dropout=dropout)
    plain = copy.deepcopy(fast)
    plain.skip_padding = False
    assert fast.skip_padding
    batch = token_batch(6, 2)
    masks = apply_masking(batch.tokens, 0.4, batch.present, torch.Generator().manual_seed(3))
    assert len(set(masks.counts()[0].tolist())) > 1 and len(set(masks.counts()[1].tolist())) > 1   # padding
    for m in (fast, plain): m.train(dropout == 0).zero_grad()
    out = [m.loss(batch.tokens, *masks, batch.present) for m in (fast, plain)]
    for o in out: o.loss.backward()
    torch.testing.assert_close(out[0].loss, out[1].loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None: torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    if dropout:
        for m in (fast, plain): m.train().zero_grad()
        for m in (fast, plain):
            loss = m.loss(batch.tokens, *masks, batch.present).loss
            loss.backward()
            assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_skipping_padding_matches_logits_and_embeddings(model):
    "Forward logits and packed encoder states of the real tokens are those of the plain path."
    batch = token_batch(5, 4)
    masks = sample_budget_masks(batch.tokens, 0.5, 0.3, batch.present, generator=torch.Generator().manual_seed(2))
    plain = copy.deepcopy(model)
    plain.skip_padding = False
    with torch.no_grad():
        a, b = model(batch.tokens, *masks, batch.present), plain(batch.tokens, *masks, batch.present)
        for k in a: torch.testing.assert_close(a[k].nan_to_num(), b[k].nan_to_num(), rtol=1e-5, atol=1e-6)
        ea, eb = model.embed(batch.tokens, batch.present, masks.is_input), plain.embed(batch.tokens, batch.present, masks.is_input)
    assert not ea.valid.all()                                     # there is padding to skip
    torch.testing.assert_close(ea.states[ea.valid], eb.states[eb.valid], rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):              # the skipped half under bf16 autocast too
        la, lb = model.loss(batch.tokens, *masks, batch.present).loss, plain.loss(batch.tokens, *masks, batch.present).loss
    torch.testing.assert_close(la, lb, rtol=2e-2, atol=1e-3)


# --- compiled blocks (MultimodalTransformer.compile_blocks) and attention dropout (TransformerConfig.attn_dropout) ---
SLOW = bool(os.environ.get("MMFM_SLOW"))
# "eager" captures the stacks as torch.compile does (guards, symbolic lengths, no graph break) in seconds; "aot_eager"
# adds the traced backward, "inductor" (torch.compile's default) generates code: tens of seconds to minutes on 2 cores
BACKENDS = ["eager"] + [pytest.param(b, marks=pytest.mark.skipif(not SLOW, reason=f"compiling with {b} takes "
                                                                  "minutes on 2 cores; set MMFM_SLOW=1"))
                        for b in ("aot_eager", "inductor")]


@pytest.fixture
def fresh_dynamo():
    "An empty torch.compile cache and graph counters before the test, and no compiled graphs left after it."
    torch._dynamo.reset(); counters.clear()
    yield counters
    torch._dynamo.reset()


def varied_batches():
    "Fixed batches whose sizes and packed input / target lengths all differ (padding in each)."
    for seed, (B, ratio) in enumerate([(3, 0.3), (4, 0.45), (5, 0.6), (4, 0.2)]):
        batch = token_batch(B, seed)
        yield batch, apply_masking(batch.tokens, ratio, batch.present, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_blocks_give_the_same_loss_and_gradients(backend, fresh_dynamo):
    torch.manual_seed(0)
    plain = MultimodalTransformer.from_codecs(CODECS, "tiny")
    comp = copy.deepcopy(plain).compile_blocks(backend=backend)
    assert list(comp.state_dict()) == list(plain.state_dict())
    lengths = set()
    for m in (plain, comp): m.train()
    for batch, masks in varied_batches():
        lengths.add(tuple(int(c.max()) for c in masks.counts()))
        out = [m.loss(batch.tokens, *masks, batch.present).loss for m in (plain, comp)]
        torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)
        grads = [torch.autograd.grad(o, list(m.parameters()), allow_unused=True) for o, m in zip(out, (plain, comp))]
        for (name, _), a, b in zip(plain.named_parameters(), *grads):
            assert (a is None) == (b is None), name
            if a is not None: torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    assert len(lengths) == 4                                          # four packed lengths ...
    assert fresh_dynamo["stats"]["unique_graphs"] == 2                # ... one graph per stack (symbolic lengths)
    comp.eval()
    with torch.no_grad(): comp(batch.tokens, *masks, batch.present)  # evaluation runs the eager blocks
    assert fresh_dynamo["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_trained_compiled_load_into_a_plain_model(backend, fresh_dynamo, tmp_path):
    torch.manual_seed(0)
    comp = MultimodalTransformer.from_codecs(CODECS, "tiny").compile_blocks(backend=backend)
    twin = copy.deepcopy(comp).compile_blocks(enable=False)          # the same weights, trained eagerly
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (comp, twin)]
    for batch, masks in varied_batches():
        for m, opt in zip((comp, twin), opts):
            m.train()
            loss = m.loss(batch.tokens, *masks, batch.present).loss
            opt.zero_grad(); loss.backward(); opt.step()
    assert fresh_dynamo["stats"]["unique_graphs"] == 2                # the compiled path did train
    comp.save(tmp_path)
    back = MultimodalTransformer.load(tmp_path, codecs=CODECS)
    assert back.compile_options is None and list(back.state_dict()) == list(twin.state_dict())
    for (name, a), b, c in zip(comp.state_dict().items(), back.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5, msg=name)   # compiled training = eager training
    back.eval(); comp.eval()
    a, b = comp(batch.tokens, *masks, batch.present), back(batch.tokens, *masks, batch.present)
    assert all(torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)


def test_compile_blocks_rejects_unknown_options():
    m = MultimodalTransformer.from_codecs(CODECS, "tiny")
    with pytest.raises(TypeError, match="no_such_option"): m.compile_blocks(no_such_option=1)
    assert m.compile_options is None


def test_attention_dropout_is_its_own_setting_and_old_specs_load(tmp_path):
    x = torch.randn(2, 5, 64)
    for attn_dropout, random in ((None, True), (0.0, False), (0.3, True)):
        cfg = TransformerConfig.preset("tiny", dropout=0.5, attn_dropout=attn_dropout)
        att = Attention(cfg).train()
        assert (not torch.equal(att(x, None), att(x, None))) == random, attn_dropout
        torch.manual_seed(0)
        m = MultimodalTransformer.from_codecs(CODECS, cfg)
        assert {b.drop.p for b in [*m.encoder, *m.decoder]} == {0.5}          # residual dropout unchanged
    m.save(tmp_path)
    assert MultimodalTransformer.load(tmp_path).config.attn_dropout == 0.3
    old = MultimodalTransformer.from_codecs(CODECS, "tiny", dropout=0.1)
    assert "attn_dropout" not in old.spec()["config"]         # unset: the spec is the one written before the field
    old.save(tmp_path)
    back = MultimodalTransformer.load(tmp_path, codecs=CODECS)
    assert back.config == old.config and back.config.attn_dropout is None
    assert {a.dropout for a in back.modules() if isinstance(a, Attention)} == {0.1}


def test_row_groups_train_like_the_whole_batch(tmp_path):
    """Twenty optimizer steps of the Trainer on samples of very different lengths (modalities absent at random):
    the losses of a model that runs each batch in row groups (`group_cost=0`: as many groups as the lengths allow)
    follow those of the same model run whole (`group_cost=None`), and the weights end up the same."""
    from mmfm.tokens import TokenDataset
    from mmfm.train import Trainer, TrainConfig
    from mmfm.masking import MaskingConfig
    from mmfm.transformer import row_groups
    g = torch.Generator().manual_seed(0)
    n = 48
    tokens = CODECS.encode(toy_table(n, 1), toy_image(n, seed=1), toy_series(n, 1))
    present = {k: torch.rand(n, generator=g) < 0.6 for k in tokens}
    present["tok_toy_table"] |= ~(present["tok_toy_image"] | present["tok_toy_series"])     # no sample empty
    data = TokenDataset(tokens, present, CODECS.vocab_sizes, CODECS.token_grids)
    runs = {}
    for name, cost in (("whole", None), ("grouped", 0.0)):
        torch.manual_seed(0)
        m = MultimodalTransformer.from_codecs(CODECS, "tiny")
        m.group_cost = cost
        cfg = TrainConfig(steps=20, batch_size=16, lr=2e-3, warmup_steps=2, seed=0, eval_every=0, checkpoint_every=0,
                          progress=False)
        masking = MaskingConfig(input_budget=0.5, target_budget=0.5)
        trainer = Trainer(m, data, cfg, masking, tmp_path / name)
        batch = next(trainer.batches())
        if cost is not None:                                  # the batches really split into several groups
            ids, inp, tgt = m.check_batch(batch[2].tokens, *batch[3], batch[2].present)
            assert len(row_groups(inp.sum(1), tgt.sum(1), cost)) > 1
        trainer.fit()
        runs[name] = ([r["loss"] for r in trainer.log.rows("step")], m.state_dict())
    torch.testing.assert_close(torch.tensor(runs["grouped"][0]), torch.tensor(runs["whole"][0]), rtol=1e-4, atol=1e-5)
    for k, v in runs["whole"][1].items(): torch.testing.assert_close(runs["grouped"][1][k], v, rtol=1e-3, atol=1e-4, msg=k)
