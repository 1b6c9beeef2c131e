"""Attentive probes (`pool="attention"`) against what they must be: with one token per sample the attention has
nothing to choose and the probe is a linear map of that token (a least-squares oracle), the prediction does not
depend on the order of a sample's tokens nor on padding, and the token states of a model pool to its mean embedding."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from mmfm.probes import TokenStates, AttentiveProbe, embed_tokens, embed_samples, fit_probe
from mmfm.testing import toy_manager, toy_image, toy_table, ToyImage
from mmfm.transformer import MultimodalTransformer

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_one_token_is_a_linear_probe():
    "L = 1: the weight on the only token is 1, and a linear target is fitted as well as least squares fits it."
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 1, 8, generator=g) * torch.linspace(0.5, 4, 8) + 2
    y = X[:, 0] @ torch.randn(8, generator=g) + 0.01 * torch.randn(400, generator=g)
    T = TokenStates(X, torch.ones(400, 1, dtype=torch.bool))
    probe = fit_probe(T[:300], y[:300], pool="attention", n_heads=2)
    assert torch.equal(probe.attention(T[:5]), torch.ones(5, 1, 1))
    A = np.c_[X[:300, 0].numpy(), np.ones(300)]
    coef = np.linalg.lstsq(A, y[:300].numpy(), rcond=None)[0]
    oracle = np.c_[X[300:, 0].numpy(), np.ones(100)] @ coef
    ss = ((y[300:].numpy() - y[300:].numpy().mean()) ** 2).sum()
    r2_oracle = 1 - ((y[300:].numpy() - oracle) ** 2).sum() / ss
    assert probe.evaluate(T[300:], y[300:])["r2"] > r2_oracle - 0.01


@pytest.fixture(scope="module")
def fitted():
    g = torch.Generator().manual_seed(1)
    states = torch.randn(120, 6, 8, generator=g)
    valid = torch.rand(120, 6, generator=g) < 0.7
    valid[:, 0] = True
    T = TokenStates(torch.where(valid[..., None], states, 0.0), valid)
    y = (states[..., 0] * valid).sum(1)
    return fit_probe(T, y, "mlp", pool="attention", n_heads=2, n_queries=2, hidden=8, max_epochs=20), T


@SETTINGS
@given(seed=st.integers(0, 2 ** 16), extra=st.integers(1, 4))
def test_order_and_padding_do_not_matter(fitted, seed, extra):
    "Permuting a sample's tokens, or padding with garbage marked invalid, leaves its prediction unchanged."
    probe, T = fitted
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(T.shape[1], generator=g) for _ in range(len(T))])
    shuffled = TokenStates(torch.gather(T.states, 1, perm[..., None].expand_as(T.states)),
                           torch.gather(T.valid, 1, perm))
    torch.testing.assert_close(probe.predict(shuffled), probe.predict(T), atol=1e-4, rtol=1e-4)
    junk = torch.randn(len(T), extra, T.dim, generator=g) * 1e3
    padded = TokenStates(torch.cat([T.states, junk], 1),
                         torch.cat([T.valid, torch.zeros(len(T), extra, dtype=torch.bool)], 1))
    torch.testing.assert_close(probe.predict(padded), probe.predict(T), atol=1e-4, rtol=1e-4)
    w = probe.attention(padded)
    assert w.shape == (len(T), 2, T.shape[1] + extra)
    assert torch.all(w[~padded.valid[:, None, :].expand_as(w)] == 0)


def test_token_states_pool_to_the_mean_embedding():
    "embed_tokens keeps each present token's state; their mean is embed_samples' embedding, batch by batch."
    codecs = toy_manager()
    torch.manual_seed(0)
    model = MultimodalTransformer.from_codecs(codecs, "tiny").eval()
    batches = [[toy_image(b, seed=s), toy_table(b, seed=s)] for s, b in ((0, 3), (1, 5))]
    T = embed_tokens(model, batches, manager=codecs, progress=False)
    X = embed_samples(model, batches, manager=codecs, progress=False)
    assert T.shape[:2] == (8, codecs.num_tokens["tok_toy_image"] + codecs.num_tokens["tok_toy_table"])
    torch.testing.assert_close(T.pooled(), X, atol=1e-5, rtol=1e-5)
    image_only = embed_tokens(model, batches, keys=[ToyImage], manager=codecs, progress=False)
    assert (image_only.valid.sum(1) == codecs.num_tokens["tok_toy_image"]).all()


def test_probe_width_and_heads_checked():
    with pytest.raises(ValueError, match="n_heads=5 must divide the token width 8"): AttentiveProbe(8, 1, n_heads=5)
    with pytest.raises(ValueError, match="n_queries must be at least 1"): AttentiveProbe(8, 1, n_queries=0)
