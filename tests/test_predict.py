"""Prediction (one-step and MaskGIT), embeddings and probes: properties over random batches, the absence contract,
chained decoding, a tiny trained model against chance and majority baselines, probes against scikit-learn oracles,
and bad input. Everything runs on the toy codecs on CPU in seconds; the 1000-step run needs MMFM_SLOW=1 (or CI)."""
import math
import os
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from torch.utils.data import DataLoader
from mmfm.data import Sample, collate
from mmfm.tokens import TokenBatch, as_token_batch
from mmfm.masking import apply_masking
from mmfm.predict import (PredictionError, commit_schedule, predict, predict_tokens, resolve_targets,
                          sample_logits)
from mmfm.probes import embed_batch, embed_samples, fit_probe, pool_states, regression_metrics, classification_metrics
from mmfm.testing import toy_manager, toy_image, toy_table, toy_series, ToyImage, ToyTable, ToySeries
from mmfm.transformer import MultimodalTransformer

CODECS = toy_manager()
TAB, IMG, SER = "tok_toy_table", "tok_toy_image", "tok_toy_series"
KEYS = [TAB, IMG, SER]
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = bool(os.environ.get("MMFM_SLOW") or os.environ.get("CI"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultimodalTransformer.from_codecs(CODECS, "tiny").eval()


def token_batch(B=4, seed=0, absent=((1, TAB), (2, SER))) -> TokenBatch:
    "Real toy tokens with some modalities absent (placeholder rows, as encode_batch leaves them)."
    tokens = CODECS.encode(toy_table(B, seed), toy_image(B, seed=seed), toy_series(B, seed))
    present = {k: torch.ones(B, dtype=torch.bool) for k in tokens}
    for b, k in absent:
        if b < B: present[k][b] = False
    for k in tokens: tokens[k][~present[k]] = 0
    return TokenBatch([f"s{seed}-{i}" for i in range(B)], tokens, present)


def random_batch(data) -> TokenBatch:
    "A random batch: random tokens, random presence with at least one modality per sample."
    B = data.draw(st.integers(1, 5))
    seed = data.draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    tokens = {k: torch.randint(0, CODECS.vocab_sizes[k], (B, CODECS.num_tokens[k]), generator=g) for k in KEYS}
    present = {k: torch.rand(B, generator=g) < 0.6 for k in KEYS}
    present[IMG] |= ~(present[TAB] | present[SER])                      # nobody without any modality
    for k in KEYS: tokens[k][~present[k]] = 0
    return TokenBatch([f"r{i}" for i in range(B)], tokens, present)


# ---------------------------------------------------------------- decoding properties

@SETTINGS
@given(data=st.data())
def test_decoding_properties(model, data):
    "Any batch, targets, steps, schedule, temperature: tokens in vocabulary, all committed, inputs untouched, seeded."
    tb = random_batch(data)
    targets = data.draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=2, unique=True))
    others = [k for k in KEYS if k not in targets]
    if not others: return
    has_input = torch.stack([tb.present[k] for k in others]).any(0)
    steps = data.draw(st.integers(1, 5))
    kw = dict(steps=steps, schedule=data.draw(st.sampled_from(["cosine", "linear"])),
              temperature=data.draw(st.sampled_from([0.0, 0.7, 1.5])), top_k=data.draw(st.sampled_from([None, 1, 5])),
              chain=data.draw(st.booleans()), ids=tb.ids)
    if not has_input.all():
        with pytest.raises(PredictionError, match="have nothing to predict"):
            predict_tokens(model, tb.tokens, tb.present, targets, **kw)
        return
    out = predict_tokens(model, tb.tokens, tb.present, targets, generator=torch.Generator().manual_seed(1), **kw)
    again = predict_tokens(model, tb.tokens, tb.present, targets, generator=torch.Generator().manual_seed(1), **kw)
    for k in targets:
        t = out.tokens[k]
        assert t.dtype == torch.long and t.shape == tb.tokens[k].shape
        assert int(t.min()) >= 0 and int(t.max()) < CODECS.vocab_sizes[k]
        assert (out.step[k] >= 0).all() and int(out.step[k].max()) < steps       # every token committed in time
        assert out.present[k].all()
        assert torch.equal(t, again.tokens[k])                                     # same seed, same tokens
    for k in others:
        assert torch.equal(out.tokens[k], tb.tokens[k]) and torch.equal(out.present[k], tb.present[k])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_maskgit_commits_by_the_schedule(model, schedule):
    tb = token_batch(absent=())
    seen = []
    out = predict_tokens(model, tb.tokens, tb.present, [IMG, SER], steps=5, schedule=schedule, temperature=1.0,
                         generator=torch.Generator().manual_seed(0), on_step=seen.append)
    plan = commit_schedule(torch.full((4,), 16 + 8), 5, schedule)
    for t in range(5):
        per_sample = sum((out.step[k] == t).sum(1) for k in (IMG, SER))
        assert torch.equal(per_sample, plan[:, t])
    # committed tokens become inputs of the next pass, and the last pass commits everything left
    for a, b in zip(seen, seen[1:]):
        for k in (IMG, SER): assert torch.equal(b.is_input[k], a.is_input[k] | a.committed[k])
    for k in (IMG, SER): assert ((seen[-1].is_input[k] | seen[-1].committed[k]) == True).all()


def test_commit_most_confident_first(model):
    "At each step the committed tokens are the most confident ones among those still masked (per sample)."
    tb = token_batch()
    seen = []
    predict_tokens(model, tb.tokens, tb.present, [IMG], steps=4, on_step=seen.append)
    for s in seen:
        probs = s.logits[IMG].softmax(-1).max(-1).values                 # argmax decoding: confidence = max prob
        masked = ~s.is_input[IMG]
        for b in range(4):
            chosen, left = probs[b][s.committed[IMG][b]], probs[b][masked[b] & ~s.committed[IMG][b]]
            if len(left): assert chosen.min() >= left.max() - 1e-6


@SETTINGS
@given(n=st.integers(0, 300), steps=st.integers(1, 12), schedule=st.sampled_from(["cosine", "linear"]))
def test_commit_schedule_properties(n, steps, schedule):
    s = commit_schedule(n, steps, schedule)
    assert s.shape == (steps,) and int(s.sum()) == n and (s >= 0).all()
    done = s.cumsum(0)
    assert ((s > 0) | (done == n)).all()                          # a step commits nothing only once all are committed
    if schedule == "cosine" and n >= 4 * steps: assert s[0] <= s[-1]


def test_sample_logits_never_leaves_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 5
    for temperature in (0.0, 0.5, 1.0, 10.0):
        for top_k in (None, 1, 3, 50):
            ids, conf = sample_logits(logits, temperature, top_k, torch.Generator().manual_seed(1))
            assert ids.min() >= 0 and ids.max() < 7 and ((conf > 0) & (conf <= 1)).all()
            if top_k: assert (logits.topk(min(top_k, 7), -1).values[:, -1] <= logits.gather(1, ids[:, None])[:, 0]).all()


# ---------------------------------------------------------------- semantics

def test_target_tokens_never_leak_and_keep_present(model):
    tb = token_batch()
    base = predict_tokens(model, tb.tokens, tb.present, [IMG], steps=3).tokens[IMG]
    other = {**tb.tokens, IMG: torch.randint(0, 625, (4, 16), generator=torch.Generator().manual_seed(5))}
    assert torch.equal(predict_tokens(model, other, tb.present, [IMG], steps=3).tokens[IMG], base)
    present = {**tb.present, SER: torch.tensor([True, False, False, True])}
    kept = predict_tokens(model, tb.tokens, present, [SER], keep_present=True)
    assert torch.equal(kept.tokens[SER][[0, 3]], tb.tokens[SER][[0, 3]])
    assert (kept.step[SER][[0, 3]] == -1).all() and (kept.step[SER][[1, 2]] == 0).all()


def test_chained_prediction_uses_the_first(model):
    tb = token_batch(absent=((1, SER),))
    chained_steps, joint_steps = [], []
    chained = predict_tokens(model, tb.tokens, tb.present, [IMG, SER], steps=3, chain=True, on_step=chained_steps.append)
    predict_tokens(model, tb.tokens, tb.present, [IMG, SER], steps=3, on_step=joint_steps.append)
    first_ser = next(s for s in chained_steps if s.keys == [SER])
    assert first_ser.is_input[IMG].all()                                   # the whole predicted image is an input
    assert not torch.allclose(first_ser.logits[SER].nan_to_num(), joint_steps[0].logits[SER].nan_to_num())
    direct = predict_tokens(model, {**tb.tokens, IMG: chained.tokens[IMG]}, {**tb.present, IMG: torch.ones(4, dtype=torch.bool)},
                            [SER], steps=3)
    assert torch.equal(direct.tokens[SER], chained.tokens[SER])
    # the same through predict(), with classes for the chain order
    mods, out = predict(model, CODECS, tb, [ToySeries, ToyImage], steps=3, chain=[ToyImage, ToySeries], return_tokens=True)
    assert torch.equal(out.tokens[SER], chained.tokens[SER])


def test_predict_decodes_in_units_and_is_seeded(model):
    sample = [toy_image(5, seed=3), toy_series(5, seed=3)]
    a = predict(model, CODECS, sample, [ToyTable, "tok_toy_series"], steps=2, temperature=1.0, top_k=10, seed=7)
    b = predict(model, CODECS, sample, [ToyTable, "tok_toy_series"], steps=2, temperature=1.0, top_k=10, seed=7)
    c = predict(model, CODECS, sample, [ToyTable, "tok_toy_series"], steps=2, temperature=1.0, top_k=10, seed=8)
    assert set(a) == {ToyTable, ToySeries}
    table = a[ToyTable]
    assert type(table) is ToyTable and table.batch_size == 5
    assert ((table.age >= 0) & (table.age <= 100)).all() and ((table.sex >= 0) & (table.sex <= 1)).all()
    assert ((table.bmi >= 10) & (table.bmi <= 50)).all()
    assert a[ToySeries].signal.shape == (5, 1, 64) and a[ToySeries].signal.abs().max() <= 1.5
    assert torch.equal(a[ToyTable].as_matrix(), b[ToyTable].as_matrix())
    assert not torch.equal(torch.cat([a[ToyTable].as_matrix().flatten(), a[ToySeries].signal.flatten()]),
                           torch.cat([c[ToyTable].as_matrix().flatten(), c[ToySeries].signal.flatten()]))


def test_predict_from_a_collated_batch_names_ids(model):
    batch = collate([Sample("gal-a", {"img": toy_image(1)}), Sample("gal-b", {"tab": toy_table(1)}),
                     Sample("gal-c", {"img": toy_image(1, seed=2), "tab": toy_table(1, seed=2)})])
    preds = predict(model, CODECS, batch, [ToySeries])
    assert preds[ToySeries].batch_size == 3
    with pytest.raises(PredictionError, match=r"samples \['gal-b'\] have nothing to predict"):
        predict(model, CODECS, batch, [ToyTable, ToySeries])
    kept = predict(model, CODECS, batch, [ToyTable], keep_present=True)
    assert torch.allclose(kept[ToyTable].as_matrix()[1], CODECS.decode(CODECS.encode(toy_table(1)), ToyTable).as_matrix()[0])


def test_bad_requests(model):
    tb = token_batch()
    no_table = type(CODECS)([CODECS.codec_for(ToyImage), CODECS.codec_for(ToySeries)])
    cases = [
        (lambda: predict(model, CODECS, tb, ["NoSuchModality"]), "unknown target 'NoSuchModality'"),
        (lambda: predict(model, CODECS, tb, []), "no targets given"),
        (lambda: predict(model, no_table, tb, [ToyTable]), "ToyTable ('tok_toy_table') has no codec"),
        (lambda: predict(model, CODECS, [], [ToyTable]), "empty input"),
        (lambda: predict(model, CODECS, {}, [ToyTable]), "empty input"),
        (lambda: predict(model, CODECS, [toy_image(2), toy_table(3)], [ToySeries]), "different batch sizes"),
        (lambda: predict(model, CODECS, tb, [ToyTable], steps=0), "steps"),
        (lambda: predict(model, CODECS, tb, [ToyTable], temperature=-1.0), "temperature"),
        (lambda: predict(model, CODECS, tb, [ToyTable, ToySeries], chain=[ToyTable]), "chain order"),
        (lambda: predict(model, CODECS, tb, [ToyTable, ToyTable]), "given twice"),
    ]
    for f, message in cases:                                          # PredictionError is a ValueError
        with pytest.raises(ValueError) as e: f()
        assert message in str(e.value), (message, str(e.value))
    small = MultimodalTransformer({IMG: 625, SER: 32}, {IMG: 16, SER: 8}, "tiny", token_grids={IMG: (4, 4), SER: (8,)})
    with pytest.raises(PredictionError, match="the model was not built for it"):
        resolve_targets([ToyTable], small, CODECS)
    with pytest.raises(PredictionError, match="not ones the model was built for"):
        predict_tokens(small, tb.tokens, tb.present, [SER])


# ---------------------------------------------------------------- a trained model

def table_from_image(img):
    "The toy table of an image, from its central flux per band as the image codec sees it."
    c = CODECS.decode(CODECS.encode(img), ToyImage).flux[:, :, 6:10, 6:10].mean((2, 3))
    return ToyTable(age=20 + 12 * c.sum(1, keepdim=True), sex=(c[:, 3:4] >= 0.5).float(), bmi=18 + 16 * c[:, 2:3])


def train_tiny(steps, n=512, seed=0, B=32):
    img = toy_image(n, seed=seed)
    tokens = CODECS.encode(img, table_from_image(img))
    g = torch.Generator().manual_seed(seed); torch.manual_seed(seed)
    net = MultimodalTransformer({k: CODECS.vocab_sizes[k] for k in tokens}, {k: CODECS.num_tokens[k] for k in tokens}, "tiny",
                                token_grids={k: CODECS.token_grids[k] for k in tokens}, d_model=32, num_layers=1)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        rows = torch.randint(0, n, (B,), generator=g)
        tk = {k: v[rows] for k, v in tokens.items()}
        if step % 2 == 0: masks = apply_masking(tk, 0.2 + 0.6 * float(torch.rand((), generator=g)), generator=g)
        else:
            shown = torch.rand(B, 3, generator=g) < 0.7 * torch.rand(B, 1, generator=g)
            masks = ({IMG: torch.ones(B, 16, dtype=torch.bool), TAB: shown}, {IMG: torch.zeros(B, 16, dtype=torch.bool), TAB: ~shown})
        loss = net.loss(tk, *masks).loss
        opt.zero_grad(); loss.backward(); opt.step()
    return net.eval()


def check_trained(steps, min_mean_accuracy, every_column_beats_majority):
    net = train_tiny(steps)
    test_img = toy_image(256, seed=1)
    true = CODECS.encode(table_from_image(test_img))[TAB]
    train_tab = CODECS.encode(table_from_image(toy_image(512, seed=0)))[TAB]
    majority = torch.stack([(true[:, j] == train_tab[:, j].mode().values).float().mean() for j in range(3)])
    mods, out = predict(net, CODECS, test_img, [ToyTable], return_tokens=True)
    iterative = predict(net, CODECS, test_img, [ToyTable], steps=3, return_tokens=True)[1]
    acc = (out.tokens[TAB] == true).float().mean(0)
    acc_it = (iterative.tokens[TAB] == true).float().mean(0)
    chance = 1 / CODECS.vocab_sizes[TAB]
    assert acc.mean() > min_mean_accuracy and acc.mean() > 10 * chance, (acc, chance)
    assert acc.mean() > majority.mean() + 0.05 and acc[0] > majority[0] + 0.1, (acc, majority)   # uses the image
    assert acc_it.mean() > majority.mean() + 0.05, (acc_it, majority)
    if every_column_beats_majority: assert (acc > majority).all() and (acc_it > majority).all(), (acc, acc_it, majority)
    assert isinstance(mods[ToyTable], ToyTable)
    return acc, majority


def test_trained_model_beats_chance_and_majority():
    "300 steps (~3 s on an idle core): the table is predicted from the image far better than chance and than majority tokens."
    check_trained(300, 0.5, False)


@pytest.mark.skipif(not SLOW, reason="1000 training steps (~10 s); set MMFM_SLOW=1")
def test_trained_model_longer():
    check_trained(1000, 0.85, True)


# ---------------------------------------------------------------- embeddings

@SETTINGS
@given(data=st.data())
def test_absent_modalities_and_padding_never_contribute(model, data):
    tb = random_batch(data)
    e = embed_batch(model, tb)
    per_key = embed_batch(model, tb, "per_key")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    scribbled = {k: torch.where(tb.present[k][:, None], t, torch.randint(0, CODECS.vocab_sizes[k], t.shape, generator=g))
                 for k, t in tb.tokens.items()}
    assert torch.equal(embed_batch(model, TokenBatch(tb.ids, scribbled, tb.present)), e)   # exactly unchanged
    for b in range(len(tb)):
        alone = embed_batch(model, tb.select([b]))                                          # no padding at all
        assert torch.allclose(alone[0], e[b], atol=1e-5)
        for i, k in enumerate(KEYS):
            block = per_key[b, 64 * i: 64 * (i + 1)]
            assert block.isnan().all() if not tb.present[k][b] else torch.isfinite(block).all()


def test_embed_samples_over_a_dataloader(model):
    samples = [Sample(f"p{i}", {"img": toy_image(1, seed=i), **({"tab": toy_table(1, seed=i)} if i % 2 else {})}) for i in range(7)]
    loader = DataLoader(samples, batch_size=3, collate_fn=lambda s: collate(s, names={"img": ToyImage, "tab": ToyTable}))
    X, ids = embed_samples(model, loader, manager=CODECS, progress=False, return_ids=True)
    assert X.shape == (7, 64) and ids == [f"p{i}" for i in range(7)]
    one = embed_batch(model, collate(samples[3:4]), manager=CODECS)
    assert torch.allclose(X[3], one[0], atol=1e-5)
    image_only = embed_samples(model, loader, keys=[ToyImage], manager=CODECS, progress=False)
    assert torch.allclose(image_only[0], X[0], atol=1e-5) and not torch.allclose(image_only[1], X[1], atol=1e-5)
    with pytest.raises(PredictionError, match=r"samples \['p0', 'p2'\] have no present tokens"):
        embed_samples(model, loader, keys=[ToyTable], manager=CODECS, progress=False)


# ---------------------------------------------------------------- probes

def test_probe_metrics_match_sklearn():
    from sklearn.metrics import r2_score, mean_squared_error, mean_absolute_error, accuracy_score
    g = torch.Generator().manual_seed(0)
    y, p = torch.randn(50, 3, generator=g), torch.randn(50, 3, generator=g)
    m = regression_metrics(y, p)
    assert math.isclose(m["r2"], r2_score(y.numpy(), p.numpy()), rel_tol=1e-6)
    assert math.isclose(m["rmse"], math.sqrt(mean_squared_error(y.numpy(), p.numpy())), rel_tol=1e-6)
    assert math.isclose(m["mae"], mean_absolute_error(y.numpy(), p.numpy()), rel_tol=1e-6)
    a, b = np.array([0, 1, 2, 2, 1]), np.array([0, 2, 2, 2, 1])
    assert classification_metrics(a, b)["accuracy"] == accuracy_score(a, b)


def test_linear_probe_matches_least_squares():
    from sklearn.linear_model import LinearRegression
    g = torch.Generator().manual_seed(1)
    X = torch.randn(400, 8, generator=g) * torch.logspace(-1, 2, 8)
    y = X @ torch.randn(8, generator=g) + 5 + 0.1 * torch.randn(400, generator=g)
    probe = fit_probe(X[:300], y[:300], "linear")
    oracle = LinearRegression().fit(X[:300].numpy(), y[:300].numpy())
    ours, theirs = probe.predict(X[300:]), torch.as_tensor(oracle.predict(X[300:].numpy()))
    assert probe.evaluate(X[300:], y[300:])["r2"] > 0.999
    assert torch.allclose(ours, theirs.float(), atol=0.05 * float(y.std()))


def test_classification_probe_close_to_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    g = torch.Generator().manual_seed(2)
    X = torch.randn(600, 5, generator=g)
    labels = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long() * 2    # 4 classes, linearly separable parts
    probe = fit_probe(X[:450], labels[:450], "linear", "classification", lr=0.05)
    oracle = LogisticRegression(max_iter=2000).fit(X[:450].numpy(), labels[:450].numpy())
    ours = probe.evaluate(X[450:], labels[450:])["accuracy"]
    theirs = float((oracle.predict(X[450:].numpy()) == labels[450:].numpy()).mean())
    assert ours > theirs - 0.05 and ours > 0.9, (ours, theirs)
    assert isinstance(probe.predict(X[:3]), torch.Tensor) and set(probe.predict(X).tolist()) <= set(labels.tolist())


def test_probe_explicit_validation_set_and_early_stopping():
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(300, 20, generator=g), torch.randn(300, generator=g)         # pure noise: stops early
    probe = fit_probe(X[:200], y[:200], "mlp", X_val=X[200:], y_val=y[200:], patience=5)
    assert probe.metrics["val"]["n"] == 100 and probe.metrics["train"]["n"] == 200
    assert len(probe.history) < 100 and probe.best_epoch == min(range(len(probe.history)), key=lambda i: probe.history[i]["val_loss"])
    with pytest.raises(ValueError, match="X_val has 3 features"):
        fit_probe(X[:200], y[:200], X_val=X[200:, :3], y_val=y[200:])


def test_part_of_a_target_a_sample_lacks_is_refused_without_a_not_measured_token():
    "Sample 1 has no table: predicting its first cell only would leave the others as placeholders read as values."
    model = MultimodalTransformer.from_codecs(CODECS, "tiny").eval()
    with pytest.raises(PredictionError, match=r"have no 'tok_toy_table': predicting only some of its tokens"):
        predict(model, CODECS, token_batch(4), {ToyTable: [0]})
    full = predict(model, CODECS, token_batch(4), {ToyTable: None})            # every position: fine
    assert torch.isfinite(full[ToyTable].as_matrix()).all()
