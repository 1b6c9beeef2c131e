"""Bad input files and bad settings (issue 14, kinds 4-6): every case asserts the exception or warning type and what
its message names. Kind 4: damaged or mismatched model and codec files, class names from unregistered modules,
checkpoints of non-finite state. Kind 5: settings validated at construction, the resume rule of the schedule.
Kind 6: quantizers on degenerate batches, point masses and out-of-range values."""
import json, math, os, sys, warnings
from dataclasses import asdict
from pathlib import Path
import pytest
import torch

from mmfm.files import FileFormatError
from mmfm.codec import Codec, CodecManager, CodecConfigError, codec_class
from mmfm.testing import ToyTableCodec, toy_table, toy_manager
from mmfm.transformer import MultimodalTransformer, TransformerConfig
from mmfm.masking import MaskingConfig, ModalityMixMasking
from mmfm.codec_training import CodecTrainConfig
from mmfm.train import TrainConfig, Trainer, DistInfo, NonFiniteLossError, lr_at
from mmfm.tokens import synthetic_token_dataset
from mmfm.quantize import VectorQuantizer, QuantileScalarQuantizer, LinearScalarQuantizer, OutOfRangeWarning


# ---------------------------------------------------------------- kind 4: model and codec files
def flip(path: Path, offset: int):
    raw = bytearray(path.read_bytes()); raw[offset] ^= 0x01; path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", [-1, -5, 0.75])
def test_codec_weights_with_one_flipped_byte_are_refused(tmp_path, where):
    weights, _ = ToyTableCodec().save(tmp_path / "c")
    size = weights.stat().st_size
    flip(weights, int(size * where) if isinstance(where, float) else where)
    with pytest.raises(CodecConfigError, match="cannot read weights") as e: Codec.load(tmp_path / "c")
    assert str(weights) in str(e.value)


@pytest.mark.parametrize("where", [-1, -9, 0.8])
def test_model_file_with_one_flipped_byte_is_refused(tmp_path, where):
    torch.manual_seed(0)
    MultimodalTransformer.from_codecs(toy_manager(), "tiny").save(tmp_path)
    f = tmp_path / "model.safetensors"
    flip(f, int(f.stat().st_size * where) if isinstance(where, float) else where)
    with pytest.raises(FileFormatError, match="is corrupted") as e: MultimodalTransformer.load(tmp_path)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("stale", ["weights", "json"])
def test_codec_json_and_weights_of_different_saves_are_refused(tmp_path, stale):
    codec = ToyTableCodec()
    codec.save(tmp_path / "old")
    with torch.no_grad():
        for b in codec.buffers():
            if b.is_floating_point(): b.add_(1.0)
        for p in codec.parameters(): p.add_(1.0)
    weights, meta = codec.save(tmp_path / "new")
    os.replace(tmp_path / f"old.{'safetensors' if stale == 'weights' else 'json'}",
               weights if stale == "weights" else meta)
    with pytest.raises(CodecConfigError, match="do not belong together") as e: Codec.load(tmp_path / "new")
    assert str(weights) in str(e.value) and str(meta) in str(e.value)


def test_codec_json_without_a_weights_checksum_is_refused(tmp_path):
    _, meta = ToyTableCodec().save(tmp_path / "c")
    info = json.loads(meta.read_text()); info.pop("weights"); info["format_version"] = 1
    meta.write_text(json.dumps(info))
    with pytest.raises(CodecConfigError, match="records no checksum of c.safetensors"): Codec.load(tmp_path / "c")


def test_codec_class_from_an_unimported_module_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "sneaky_codec_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    _, meta = ToyTableCodec().save(tmp_path / "c")
    info = json.loads(meta.read_text()); info["class"] = "sneaky_codec_module:Codec"; meta.write_text(json.dumps(info))
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(CodecConfigError, match="import its module 'sneaky_codec_module' first") as e:
            Codec.load(tmp_path / "c")
    finally: sys.path.remove(str(tmp_path))
    assert not marker.exists() and "sneaky_codec_module" not in sys.modules
    assert str(meta) in str(e.value)


@pytest.mark.parametrize("name,message", [
    ("mmfm.testing:NoSuchCodec", "does not exist in mmfm.testing"),
    ("mmfm.no_such_module:X", "cannot import mmfm.no_such_module"),
    ("no-colon", "is not of the form 'module:QualName'"),
    ("os:path", "import its module 'os' first"),
])
def test_codec_class_names_resolve_only_from_the_registry(name, message):
    with pytest.raises(CodecConfigError, match=message.replace("(", r"\(")): codec_class(name, "f.json: ")


def test_registered_library_codec_resolves():
    assert codec_class("mmfm.testing:ToyTableCodec") is ToyTableCodec


@pytest.mark.parametrize("change,message", [
    ({"class": "os:Whatever"}, "import its module 'os' first"),
    ({"file": "../elsewhere"}, "names file '../elsewhere'"),
    ({"class": "mmfm.testing:ToyImageCodec"}, "but .* holds mmfm.testing:ToyTableCodec"),
])
def test_codec_manager_index_is_checked(tmp_path, change, message):
    manager = toy_manager()
    manager.save(tmp_path)
    index = json.loads((tmp_path / "codecs.json").read_text())
    index["codecs"]["tok_toy_table"].update(change)
    (tmp_path / "codecs.json").write_text(json.dumps(index))
    with pytest.raises(CodecConfigError, match=message) as e: CodecManager.load(tmp_path)
    assert "codecs.json" in str(e.value)


def small_trainer(out, steps=2, **cfg):
    torch.manual_seed(0)
    data = synthetic_token_dataset(32, seed=0)
    model = MultimodalTransformer(data.vocab_sizes, data.num_tokens, "tiny", token_grids=data.token_grids)
    c = TrainConfig(**{**dict(steps=steps, batch_size=8, lr=3e-3, warmup_steps=1, checkpoint_every=1,
                              progress=False), **cfg})
    return Trainer(model, data, c, MaskingConfig(6, 6), out, dinfo=DistInfo())


@pytest.mark.parametrize("what", ["parameter", "optimizer"])
def test_non_finite_state_is_never_checkpointed(tmp_path, what):
    t = small_trainer(tmp_path); t.fit()
    files = sorted(p.name for p in t.ckpt_dir.iterdir()); latest = (t.ckpt_dir / "latest.json").read_text()
    if what == "parameter":
        name, p = list(t.model.named_parameters())[-1]
        with torch.no_grad(): p.view(-1)[0] = float("nan")
        expected = f"step 2: model parameter {name} holds 1 non-finite"
    else:
        next(iter(t.optimizer.state.values()))["exp_avg_sq"].view(-1)[:2] = float("inf")
        expected = "step 2: optimizer state optim/"
    with pytest.raises(NonFiniteLossError, match=expected.replace("(", r"\(")) as e: t.save_checkpoint()
    assert "step-0000002.safetensors" in str(e.value)                 # names the last good checkpoint
    assert sorted(p.name for p in t.ckpt_dir.iterdir()) == files
    assert (t.ckpt_dir / "latest.json").read_text() == latest


# ---------------------------------------------------------------- kind 5: settings
@pytest.mark.parametrize("field,value,exc,message", [
    ("steps", -5, ValueError, "TrainConfig.steps must be >= 1, got -5"),
    ("steps", 0, ValueError, "TrainConfig.steps must be >= 1, got 0"),
    ("steps", 10.0, TypeError, "TrainConfig.steps must be an int, got 10.0"),
    ("steps", True, TypeError, "TrainConfig.steps must be an int, got True"),
    ("batch_size", 0, ValueError, "TrainConfig.batch_size must be >= 1"),
    ("lr", 0.0, ValueError, "TrainConfig.lr must be > 0, got 0.0"),
    ("lr", float("nan"), ValueError, "TrainConfig.lr must be finite"),
    ("min_lr", 1.0, ValueError, r"TrainConfig.min_lr must be in \[0, 0.0003\], got 1.0"),
    ("min_lr", -1e-5, ValueError, r"TrainConfig.min_lr must be in \[0, 0.0003\]"),
    ("warmup_steps", -1, ValueError, "TrainConfig.warmup_steps must be >= 0, got -1"),
    ("weight_decay", -0.1, ValueError, "TrainConfig.weight_decay must be >= 0"),
    ("beta1", 1.0, ValueError, r"TrainConfig.beta1 must be in \[0, 1\), got 1.0"),
    ("beta2", -0.5, ValueError, r"TrainConfig.beta2 must be in \[0, 1\)"),
    ("grad_clip", -1.0, ValueError, "TrainConfig.grad_clip must be >= 0"),
    ("eval_every", -1, ValueError, "TrainConfig.eval_every must be >= 0"),
    ("checkpoint_every", 2.5, TypeError, "TrainConfig.checkpoint_every must be an int"),
    ("keep_checkpoints", 0, ValueError, "TrainConfig.keep_checkpoints must be >= 1"),
    ("seed", -1, ValueError, "TrainConfig.seed must be >= 0"),
    ("bf16", 1, TypeError, "TrainConfig.bf16 must be True or False"),
])
def test_train_config_is_validated(field, value, exc, message):
    with pytest.raises(exc, match=message): TrainConfig(**{field: value})


@pytest.mark.parametrize("make,exc,message", [
    (lambda: TransformerConfig(d_model=0), ValueError, "TransformerConfig.d_model must be >= 1"),
    (lambda: TransformerConfig(n_heads=2.0), TypeError, "TransformerConfig.n_heads must be an int"),
    (lambda: TransformerConfig(mlp_ratio=-1.0), ValueError, "TransformerConfig.mlp_ratio must be > 0"),
    (lambda: TransformerConfig(dropout=1.0), ValueError, r"TransformerConfig.dropout must be in \[0, 1\)"),
    (lambda: TransformerConfig(norm_eps=0.0), ValueError, "TransformerConfig.norm_eps must be > 0"),
    (lambda: TransformerConfig(embedding_std=float("inf")), ValueError, "embedding_std must be finite"),
    (lambda: MaskingConfig(0, 4), ValueError, "MaskingConfig.input_budget must be at least 1 token"),
    (lambda: MaskingConfig(4, 1.5), ValueError, r"MaskingConfig.target_budget as a fraction must be in \(0, 1\)"),
    (lambda: MaskingConfig(4, "4"), TypeError, "MaskingConfig.target_budget must be an int"),
    (lambda: MaskingConfig(mask_ratio=0.0), ValueError, r"MaskingConfig.mask_ratio must be in \(0, 1\)"),
    (lambda: MaskingConfig(None, None), ValueError, "needs input_budget and target_budget, or mask_ratio"),
    (lambda: MaskingConfig(4, 4, concentration=-1.0), ValueError, "MaskingConfig.concentration"),
    (lambda: MaskingConfig(4, 4, target_concentration={"tok_a": 0}), ValueError,
     "MaskingConfig.target_concentration"),
    (lambda: MaskingConfig(4, 4, mixture={"two-to-one": 1.0}), ValueError, "unknown masking strategies"),
    (lambda: ModalityMixMasking(min_ratio=0.9, max_ratio=0.5), ValueError,
     r"ModalityMixMasking.max_ratio must be in \[0.9, 1\)"),
    (lambda: ModalityMixMasking(0, 0, 0), ValueError, "positive sum"),
    (lambda: CodecTrainConfig(epochs=0), ValueError, "CodecTrainConfig.epochs must be >= 1, got 0"),
    (lambda: CodecTrainConfig(lr=-1e-3), ValueError, "CodecTrainConfig.lr must be > 0"),
    (lambda: CodecTrainConfig(patience=0), ValueError, "CodecTrainConfig.patience must be >= 1"),
    (lambda: CodecTrainConfig(grad_clip=-1.0), ValueError, "CodecTrainConfig.grad_clip must be >= 0"),
    (lambda: CodecTrainConfig(batch_size=32.0), TypeError, "CodecTrainConfig.batch_size must be an int"),
])
def test_other_settings_are_validated(make, exc, message):
    with pytest.raises(exc, match=message): make()


def test_resumed_learning_rate_continues_the_uninterrupted_schedule(tmp_path):
    whole = small_trainer(tmp_path / "whole", steps=8, checkpoint_every=4); whole.fit()
    ref = [r["lr"] for r in whole.log.rows("step")]
    part = small_trainer(tmp_path / "part", steps=8, checkpoint_every=4)
    part.cfg.steps = 4; part.fit()                                  # as if killed right after step 4's checkpoint
    torch.manual_seed(0)
    data = synthetic_token_dataset(32, seed=0)
    model = MultimodalTransformer(data.vocab_sizes, data.num_tokens, "tiny", token_grids=data.token_grids)
    cfg = TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=1, checkpoint_every=4, progress=False)
    with pytest.warns(UserWarning, match="steps=12.*schedule_steps=8"):
        resumed = Trainer(model, data, cfg, MaskingConfig(6, 6), tmp_path / "part", resume=True, dinfo=DistInfo())
    resumed.fit()
    lrs = [r["lr"] for r in resumed.log.rows("step")]
    assert lrs[4:8] == ref[4:8]                                       # exactly where it was
    assert lrs[8:] == [cfg.min_lr] * 4 and lr_at(4, cfg) != ref[4]    # the old rule would have jumped


# ---------------------------------------------------------------- kind 6: quantizers
@pytest.mark.parametrize("first", [torch.tensor([[3.0]]), torch.full((6, 1), -2.0), torch.zeros(0, 1)],
                         ids=["one vector", "identical vectors", "empty"])
def test_vq_degenerate_first_batch_never_makes_nan(first):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, embedding_dim=1).train()
    _, _, aux = vq(first)
    assert torch.isfinite(vq.codebook).all() and torch.isfinite(aux)
    g = torch.Generator().manual_seed(0)
    for _ in range(500): vq(torch.rand(32, 1, generator=g) * 10)   # dead-code restarts need ~350 steps
    assert torch.isfinite(vq.codebook).all()
    assert vq.eval().encode(torch.linspace(0, 10, 40)[:, None]).unique().numel() >= 4


def test_vq_ema_with_zero_counts_stays_finite():
    vq = VectorQuantizer(4, 2, decay=0.0, dead_code_threshold=0, init_from_data=False).train()
    before = vq.codebook.clone()
    vq(torch.full((3, 2), 0.1))
    assert torch.isfinite(vq.codebook).all()
    used = vq.encode(torch.full((1, 2), 0.1)).item()
    assert all(torch.equal(vq.codebook[i], before[i]) for i in range(4) if i != used)


@pytest.fixture
def mostly_zero():
    g = torch.Generator().manual_seed(2)
    return torch.cat([torch.zeros(800), 1 + 99 * torch.rand(200, generator=g)])


def test_quantile_point_mass_gets_one_bin_and_the_rest_small_errors(mostly_zero):
    q = QuantileScalarQuantizer(16).fit(mostly_zero[:, None])
    assert q.centres[0].unique().numel() == 16 and int((q.centres[0] == 0).sum()) == 1
    back = q.decode(q.encode(mostly_zero[:, None]))[:, 0]
    assert back[mostly_zero == 0].abs().max() == 0
    assert (back - mostly_zero)[mostly_zero > 0].abs().max() < 99 / 15


@pytest.mark.parametrize("values,bins,expected", [
    ([0.0] * 6 + [1.0] * 4, 4, 4),             # two point masses, spare bins split the gap
    ([5.0] * 3 + [7.0] * 3 + [9.0] * 4, 16, 16),
    ([2.0] * 10, 4, 1),                        # a constant column has one value to give
])
def test_quantile_centres_are_distinct_and_keep_each_value(values, bins, expected):
    v = torch.tensor(values)
    q = QuantileScalarQuantizer(bins).fit(v[:, None])
    assert q.centres[0].unique().numel() == expected and (q.centres[0].diff() >= 0).all()
    assert torch.equal(q.decode(q.encode(v[:, None]))[:, 0], v)        # every value decodes exactly


def test_out_of_range_warns_each_call_naming_the_column():
    q = QuantileScalarQuantizer(8, num_features=2, names=["age", "bmi"])
    q.fit(torch.stack([torch.linspace(20, 80, 50), torch.linspace(15, 40, 50)], 1)[..., None])
    older = torch.tensor([[95.0, 20.0], [99.0, 50.0], [50.0, 30.0]])[..., None]
    with pytest.warns(OutOfRangeWarning) as caught:
        q.encode(older); q.encode(older[:1])
    messages = [str(w.message) for w in caught if w.category is OutOfRangeWarning]
    assert len(messages) == 2
    assert "column 'age': 2 (0 below, 2 above" in messages[0] and "column 'bmi': 1 (0 below, 1 above" in messages[0]
    assert "column 'age': 1" in messages[1] and "bmi" not in messages[1]


def test_out_of_range_raise_names_the_column():
    q = LinearScalarQuantizer(4, 0.0, 1.0, on_out_of_range="raise", names="fraction")
    with pytest.raises(ValueError, match=r"column 'fraction': 2 \(1 below, 1 above \[0, 1\]\)"):
        q.encode(torch.tensor([[-1.0], [0.5], [3.0]]))


def test_names_must_match_the_features():
    with pytest.raises(ValueError, match=r"QuantileScalarQuantizer: 1 names \['a'\] for 2 feature"):
        QuantileScalarQuantizer(8, num_features=2, names=["a"])
