"""Value embeddings (`TransformerConfig.value_embedding`, `Codec.token_values`) through the training and prediction
paths: a checkpointed run resumed gives the uninterrupted run's weights bit for bit, a checkpoint of other token values
is refused, the saved model predicts the same after `MultimodalTransformer.load`, and the default stays the old model."""
import json, shutil
import pytest
import torch
from mmfm.codec import CodecManager
from mmfm.masking import MaskingConfig
from mmfm.table_codecs import TableCodec
from mmfm.testing import ToyTable, toy_image, toy_manager, toy_series, toy_table
from mmfm.tokens import TokenDataset
from mmfm.train import TrainConfig, Trainer
from mmfm.transformer import MultimodalTransformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def codecs_fitted_on(seed: int) -> CodecManager:
    "The toy manager with a quantile-bin table codec fitted on toy rows of `seed` (its tokens have values)."
    m = toy_manager()
    m.register(TableCodec(ToyTable, num_bins=16).prepare(toy_table(64, seed=seed)), replace=True)
    return m


@pytest.fixture(scope="module")
def codecs(): return codecs_fitted_on(3)


@pytest.fixture(scope="module")
def data(codecs):
    n = 24
    tokens = codecs.encode(toy_table(n, 0), toy_image(n, seed=0), toy_series(n, seed=0))
    return TokenDataset(tokens, vocab_sizes=codecs.vocab_sizes, token_grids=codecs.token_grids)


def build(codecs, kind="periodic", seed=0):
    torch.manual_seed(seed)
    return MultimodalTransformer.from_codecs(codecs, TransformerConfig.preset("tiny", d_model=32, value_embedding=kind,
                                                                               dropout=0.1))


def train(model, data, out, steps, resume=False):
    cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=3, eval_every=0,
                      keep_checkpoints=5, progress=False, seed=0)
    t = Trainer(model, data, cfg, MaskingConfig(6, 6), out, resume=resume)
    t.fit()
    return t


@pytest.mark.parametrize("kind", ["periodic", "ple"])
def test_resumed_run_equals_uninterrupted_run(codecs, data, tmp_path, kind):
    ref = build(codecs, kind)
    train(ref, data, tmp_path / "ref", 8)                          # checkpoints at steps 3, 6 and 8
    shutil.copytree(tmp_path / "ref", tmp_path / "run")            # as if stopped after step 6's checkpoint
    ck = tmp_path / "run" / "checkpoints"
    for f in ck.glob("step-0000008.*"): f.unlink()
    (ck / "latest.json").write_text(json.dumps({"step": 6, "file": "step-0000006.safetensors"}))
    again = build(codecs, kind, seed=1)                            # other initial weights: all must come from the file
    train(again, data, tmp_path / "run", 8, resume=True)
    ref_state, again_state = ref.state_dict(), again.state_dict()
    assert any(k.startswith("value_embeddings.") for k in ref_state)
    assert all(torch.equal(ref_state[k], again_state[k]) for k in ref_state), kind
    moved = build(codecs, kind).value_embeddings["tok_toy_table"].linear.weight
    assert not torch.equal(moved, again.value_embeddings["tok_toy_table"].linear.weight)   # it trained


def test_checkpoint_of_other_token_values_is_refused(codecs, data, tmp_path):
    train(build(codecs), data, tmp_path / "run", 3)
    other = build(codecs_fitted_on(4))                             # same vocabularies, other bins
    with pytest.raises(ValueError, match="value_tables.tok_toy_table"):
        train(other, data, tmp_path / "run", 6, resume=True)


def test_saved_model_predicts_the_same_after_load(codecs, data, tmp_path):
    model = build(codecs, "ple")
    train(model, data, tmp_path / "run", 4)
    model.eval().save(tmp_path / "model")
    batch = {k: t[:5] for k, t in data.tokens.items()}
    present = {k: p[:5] for k, p in data.present.items()}
    inp = {k: torch.ones_like(t, dtype=torch.bool) for k, t in batch.items() if k != "tok_toy_table"}
    tgt = {"tok_toy_table": torch.ones_like(batch["tok_toy_table"], dtype=torch.bool)}
    ref = model(batch, inp, tgt, present)["tok_toy_table"]
    for loaded in (MultimodalTransformer.load(tmp_path / "model"),
                   MultimodalTransformer.load(tmp_path / "model", codecs=codecs)):
        assert torch.equal(loaded.eval()(batch, inp, tgt, present)["tok_toy_table"], ref)
    with pytest.raises(ValueError, match="token key 'tok_toy_table'"):     # the model records its codecs
        MultimodalTransformer.load(tmp_path / "model", codecs=codecs_fitted_on(4))
    model.codec_checksums = None; model.save(tmp_path / "bare")             # without that record: the value tables
    with pytest.raises(ValueError, match="differ from its codec's"):
        MultimodalTransformer.load(tmp_path / "bare", codecs=codecs_fitted_on(4))


def test_table_values_change_predictions_only_through_the_table_key(codecs, data):
    "Zeroing the value embedding's output layer gives the default model's logits exactly: it only adds to the input."
    on, off = build(codecs, "periodic"), build(codecs, None)
    with torch.no_grad():
        on.value_embeddings["tok_toy_table"].linear.weight.zero_()
        on.value_embeddings["tok_toy_table"].linear.bias.zero_()
    on.eval(); off.eval()
    batch = {k: t[:6] for k, t in data.tokens.items()}
    inp = {k: torch.ones_like(t, dtype=torch.bool) for k, t in batch.items() if k != "tok_toy_image"}
    tgt = {"tok_toy_image": torch.ones_like(batch["tok_toy_image"], dtype=torch.bool)}
    assert torch.equal(on(batch, inp, tgt)["tok_toy_image"], off(batch, inp, tgt)["tok_toy_image"])


def test_missing_cell_tokens_get_no_value_embedding():
    "A table codec with missing cells: the absent token stands for no number, so its value embedding is zero."
    codec = TableCodec(ToyTable, num_bins=8, missing_cells=True).prepare(toy_table(64, seed=0))
    m = toy_manager(); m.register(codec, replace=True)
    torch.manual_seed(0)
    model = MultimodalTransformer.from_codecs(m, "tiny", value_embedding="ple")
    table = model.value_embeddings["tok_toy_table"]().detach()
    assert table.shape == (3, 9, 64)
    assert table[:, 0].abs().sum() == 0 and torch.isnan(codec.token_values[:, 0]).all()


def test_checkpoint_with_absent_tokens_in_the_value_table(tmp_path):
    "A table codec with missing cells marks its absent token's value NaN by design: training still checkpoints."
    m = toy_manager()
    m.register(TableCodec(ToyTable, num_bins=16, missing_cells=True).prepare(toy_table(64, seed=3)), replace=True)
    assert torch.isnan(m.token_values["tok_toy_table"]).any()                       # the absent token (0)
    n = 16
    tokens = m.encode(toy_table(n, 0), toy_image(n, seed=0), toy_series(n, seed=0))
    data = TokenDataset(tokens, vocab_sizes=m.vocab_sizes, token_grids=m.token_grids)
    cfg = TrainConfig(steps=2, batch_size=8, eval_every=0, checkpoint_every=2, progress=False, warmup_steps=1)
    Trainer(build(m), data, cfg, MaskingConfig(8, 8), tmp_path / "run").fit()
    assert any((tmp_path / "run").rglob("step-0000002.safetensors"))
