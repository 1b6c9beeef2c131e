"""Decoded values stay within what a codec was fitted on: for every codec class the library exports, the most
extreme tokens it allows as targets (and, for the scalar and table codecs, tokens 0 and V-1 at every position) decode
inside the recorded range ± the codec's stated margin. The image codecs also keep a real galaxy brighter than their
training set encodable and decodable (its own tokens round-trip: only predictions are bounded), keep their ranges
through save → load, and load codecs saved before the ranges existed (unbounded, as they were). Seconds on a CPU."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfm.codec import CODEC_CLASSES, Codec, CodecManager
from mmfm.files import load_safetensors, read_json, save_safetensors, sha256_file, write_json
from mmfm.modality import table_modality
from mmfm.predict import allowed_targets, predict_tokens
from mmfm.series_codecs import SeriesCodec
from mmfm.table_codecs import TableCodec
from mmfm.testing import ToyImageCodec, ToySeries, ToySeriesCodec, ToyTableCodec, toy_series, toy_table
from mmfm.transformer import MultimodalTransformer

pytest.importorskip("astropy")          # the image codecs need the [astro] extra
from mmfm.image_codecs import (GaiaImageCodec, HSCImageCodec, ImageCodecBase, LegacySurveyImageCodec,
                               MULTISURVEY_BANDS, MultiSurveyImage, SharedImageCodec, SurveyImageCodec,
                               multisurvey_softening, survey_band_slice)
from mmfm.surveys import image_modality, survey_info

BoundLab = table_modality("BoundLab", ["glucose", "age", "crp"], "tok_test_bound_lab")
TOL = 1e-3            # asinh units / series units: float32 rounding of the decoded values, far below any margin


# ------------------------------------------------------------------------------------------------- helpers

def _blobs(n: int, n_bands: int, size: int, pixel_scale: float, noise: np.ndarray, seed: int) -> torch.Tensor:
    "`n` round galaxies (peak S/N 3–100 per pixel, 0.4–1.2″ wide) plus Gaussian noise of σ `noise` per band."
    g = torch.Generator().manual_seed(seed)
    r = (torch.arange(size) - (size - 1) / 2) * pixel_scale
    r2 = r[:, None] ** 2 + r[None] ** 2                                              # arcsec²
    width = 0.4 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    peak = 10 ** (0.5 + 1.5 * torch.rand(n, n_bands, 1, 1, generator=g))
    sigma = torch.as_tensor(noise, dtype=torch.float32).view(1, -1, 1, 1)
    return sigma * (peak * torch.exp(-r2 / (2 * width ** 2)) + torch.randn(n, n_bands, size, size, generator=g))


def _survey_images(survey: str, n: int = 6, seed: int = 0):
    info = survey_info(survey)
    return image_modality(survey)(flux=_blobs(n, info.n_bands, info.stamp_size, info.pixel_scale_arcsec,
                                              info.pixel_noise, seed))


def _multisurvey_images(n: int = 6, seed: int = 0) -> MultiSurveyImage:
    flux = _blobs(n, len(MULTISURVEY_BANDS), 32, survey_info("legacy").pixel_scale_arcsec, multisurvey_softening(),
                  seed)
    flux[0, survey_band_slice("gaia")] = float("nan")                                 # one galaxy without Gaia
    return MultiSurveyImage(flux=flux)


IMAGE_CASES = {            # codec class → (tiny codec, seeded training images)
    LegacySurveyImageCodec: (lambda **kw: LegacySurveyImageCodec(hidden=8, depth=1, **kw),
                             lambda seed=0: _survey_images("legacy", seed=seed)),
    HSCImageCodec: (lambda **kw: HSCImageCodec(hidden=8, depth=1, **kw), lambda seed=0: _survey_images("hsc", seed=seed)),
    GaiaImageCodec: (lambda **kw: GaiaImageCodec(hidden=8, depth=1, **kw),
                     lambda seed=0: _survey_images("gaia", seed=seed)),
    SharedImageCodec: (lambda **kw: SharedImageCodec(hidden=8, depth=1, **kw), _multisurvey_images),
}


def _asinh_aperture_snr(codec: ImageCodecBase, images) -> torch.Tensor:
    "asinh of each band's aperture S/N, measured on decoded images as `encode` measures it."
    return torch.asinh(codec.aperture_snr(codec._signal(codec.stretch(images.flux).x)))


def _inside(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor, tol: float = TOL) -> bool:
    return bool(((values >= low - tol) & (values <= high + tol)).all())


def _extreme_image_tokens(codec: ImageCodecBase, seed: int = 1) -> torch.Tensor:
    "Rows of the lowest / highest allowed flux tokens (and a mix), each with image tokens 0, V-1 and random ones."
    b, V = codec.flux_token_bounds(), codec.vocab_size
    n_image = codec.num_tokens - codec.n_flux_tokens
    g = torch.Generator().manual_seed(seed)
    mixed = torch.where(torch.arange(codec.n_bands) % 2 == 0, b[:, 0], b[:, 1])
    images = [torch.zeros(n_image, dtype=torch.long), torch.full((n_image,), V - 1),
              torch.randint(0, V, (n_image,), generator=g)]
    return torch.stack([torch.cat([f, i]) for f in (b[:, 0], b[:, 1], mixed) for i in images])


def _saved_before_ranges(path: Path, config_keys, state_keys):
    "Rewrite a saved codec as one saved before the fitted ranges existed: no such settings, no such tensors."
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    state, _ = load_safetensors(weights)
    save_safetensors(weights, {k: v for k, v in state.items() if k not in state_keys})
    info = read_json(meta)
    for k in config_keys: del info["config"][k]
    for k in state_keys: info["tensors"].pop(k)
    info["weights"]["sha256"] = sha256_file(weights)
    write_json(meta, info)


# ---------------------------------------------------------------------------------------- every codec class

def _exported_codec_classes() -> set:
    "The codec classes mmfm's modules export (`__all__`), as registered in CODEC_CLASSES."
    return {c for c in CODEC_CLASSES.values() if c.__module__.startswith("mmfm.")
            and c.__name__ in getattr(sys.modules[c.__module__], "__all__", ())}


from mmfm.spectrum_codecs import SpectrumCodec
from mmfm.surveys import DESISpectrum
COVERED = set(IMAGE_CASES) | {TableCodec, SeriesCodec, SpectrumCodec, ToyTableCodec, ToyImageCodec, ToySeriesCodec}
BASES = {ImageCodecBase, SurveyImageCodec}          # abstract: covered through the classes above


def _inherits_bound(c) -> bool:
    "A subclass of a covered codec that overrides none of its decoding methods keeps the bound tested here."
    return any(issubclass(c, base) and all(getattr(c, m) is getattr(base, m)
                                           for m in ("decode", "_decode", "decode_distribution")) for base in COVERED)


def test_every_exported_codec_class_is_covered():
    """A codec class added to the library without a bound test here fails this test (whichever mmfm modules the test
    session imported: the medical codecs are one-line subclasses of TableCodec and SeriesCodec)."""
    import mmfm.medical                                    # noqa: F401  (its codec classes must pass as well)
    exported = _exported_codec_classes()
    uncovered = {c for c in exported if c not in COVERED | BASES and not _inherits_bound(c)}
    assert not uncovered, sorted(c.__name__ for c in uncovered)
    assert COVERED | BASES <= exported, sorted(c.__name__ for c in (COVERED | BASES) - exported)


# ------------------------------------------------------------------------------------------- image codecs

@pytest.fixture(scope="module", params=list(IMAGE_CASES), ids=lambda c: c.__name__)
def prepared(request):
    make, data = IMAGE_CASES[request.param]
    torch.manual_seed(0)
    train = data()
    return make().prepare(train).eval(), train


def test_image_training_tokens_are_allowed(prepared):
    "The recorded range holds the training galaxies: every flux token of theirs is one a prediction may take."
    codec, train = prepared
    assert codec.fit_range_recorded and torch.isfinite(codec.flux_fit_range).all()
    flux = codec.encode(train)[:, :codec.n_bands]
    allowed = codec.allowed_targets[:codec.n_bands]
    seen = flux != 0                                                     # observed bands
    assert bool(allowed[torch.arange(codec.n_bands).expand_as(flux)[seen], flux[seen]].all())
    b = codec.flux_token_bounds()
    assert (b[:, 0] > 1).all() and (b[:, 1] < codec.vocab_size - 1).all()   # the range is narrower than the tokens'


def test_image_extreme_allowed_tokens_decode_inside(prepared):
    codec, _ = prepared
    r, m, nf = codec.flux_fit_range, codec.fit_margin, codec.n_flux_tokens
    b, allowed = codec.flux_token_bounds(), codec.allowed_targets
    band = torch.arange(codec.n_bands)
    assert allowed[band, b[:, 0]].all() and allowed[band, b[:, 1]].all()
    assert not allowed[band, b[:, 0] - 1].any() and not allowed[band, b[:, 1] + 1].any()   # nothing beyond
    level = codec.flux_levels()[b]
    assert _inside(level, (r - m)[:, :1], (r + m)[:, 1:], 1e-9)
    tokens = _extreme_image_tokens(codec)
    assert allowed[torch.arange(codec.num_tokens), tokens].all()
    got = _asinh_aperture_snr(codec, codec.decode(tokens))
    assert _inside(got, r[:, 0] - m, r[:, 1] + m), (got, r)


def test_image_predicted_distributions_decode_inside(prepared):
    "Distributions over the allowed tokens only (what a prediction gives): every summary stays inside."
    codec, _ = prepared
    r, m = codec.flux_fit_range, codec.fit_margin
    allowed = codec.allowed_targets.float()
    uniform = (allowed / allowed.sum(-1, keepdim=True))[None]
    b = codec.flux_token_bounds()
    ends = uniform.clone()                                            # half at the lowest, half at the highest level
    ends[0, :codec.n_bands] = 0
    ends[0, torch.arange(codec.n_bands), b[:, 0]] = 0.5; ends[0, torch.arange(codec.n_bands), b[:, 1]] = 0.5
    for probs in (uniform, ends):
        for point in ("mean", 0.02, 0.98):
            got = _asinh_aperture_snr(codec, codec.decode_distribution(probs, point))
            assert _inside(got, r[:, 0] - m, r[:, 1] + m), (point, got, r)


def test_image_decoder_output_is_clamped_and_counted():
    "A decoder gone wild (its output far above anything seen) is clamped to the pixel range + margin, and counted."
    make, data = IMAGE_CASES[LegacySurveyImageCodec]
    torch.manual_seed(0)
    codec = make().prepare(data()).eval()
    with torch.no_grad(): codec.decoder.out.bias.add_(5.0)             # +15 in asinh units: a factor of 10⁶
    p, m, nf = codec.pixel_fit_range, codec.fit_margin, codec.n_flux_tokens
    tokens = _extreme_image_tokens(codec)
    codec.reset_fit_range_report()
    codec.flux_tokens = False                                          # the image tokens alone: pixels as decoded
    try: out = codec.decode(tokens[:, nf:])
    finally: codec.flux_tokens = True
    pixels = codec.stretch(out.flux).x * codec.stretch.scale           # asinh(flux / σ)
    assert _inside(pixels.transpose(0, 1).flatten(1), (p - m)[:, :1], (p + m)[:, 1:])
    torch.testing.assert_close(pixels.amax((0, 2, 3)), p[:, 1] + m, atol=TOL, rtol=0)   # it was clamped there
    report = codec.fit_range_report()
    assert (report.pixels_clamped_high == report.pixels_decoded).all() and (report.pixels_decoded > 0).all()
    got = _asinh_aperture_snr(codec, codec.decode(tokens))             # with flux tokens: still inside
    r = codec.flux_fit_range
    assert _inside(got, r[:, 0] - m, r[:, 1] + m)


@pytest.mark.parametrize("cls", list(IMAGE_CASES), ids=lambda c: c.__name__)
def test_image_brighter_than_training_still_round_trips(cls):
    "A galaxy 1000 × brighter than any training one encodes, is out of reach of predictions, and round-trips."
    make, data = IMAGE_CASES[cls]
    torch.manual_seed(0)
    train = data()
    codec = make().prepare(train).eval()
    brightest = torch.where(torch.isnan(train.flux), -math.inf, train.flux).amax(0, keepdim=True)
    bright = train.replace(flux=brightest * 1000)
    tokens = codec.encode(bright)
    flux = tokens[0, :codec.n_bands]
    assert (flux > codec.flux_token_bounds()[:, 1]).all()
    assert not codec.allowed_targets[torch.arange(codec.n_bands), flux].any()
    codec.reset_fit_range_report()
    again = codec.encode(codec.decode(tokens))
    assert torch.equal(again[:, :codec.n_bands], tokens[:, :codec.n_bands])
    assert (codec.fit_range_report().fluxes_outside == 1).all()       # counted, not clamped


def test_image_save_load_keeps_the_range(tmp_path):
    make, data = IMAGE_CASES[GaiaImageCodec]
    torch.manual_seed(0)
    codec = make(fit_margin=0.5).prepare(data()).eval()
    codec.save(tmp_path / "gaia")
    again = Codec.load(tmp_path / "gaia").eval()
    assert again.fit_margin == 0.5
    assert torch.equal(again.flux_fit_range, codec.flux_fit_range)
    assert torch.equal(again.pixel_fit_range, codec.pixel_fit_range)
    assert torch.equal(again.allowed_targets, codec.allowed_targets)
    narrower = make().prepare(data()).flux_token_bounds()              # the default margin, 1, is wider
    b = codec.flux_token_bounds()
    assert (b[:, 0] > narrower[:, 0]).all() and (b[:, 1] < narrower[:, 1]).all()


def test_image_codec_saved_before_the_ranges_loads_unbounded(tmp_path):
    make, data = IMAGE_CASES[LegacySurveyImageCodec]
    torch.manual_seed(0)
    codec = make().prepare(data()).eval()
    with torch.no_grad(): codec.decoder.out.bias.add_(5.0)
    codec.save(tmp_path / "old")
    _saved_before_ranges(tmp_path / "old", ["fit_margin"], ["flux_fit_range", "pixel_fit_range"])
    old = Codec.load(tmp_path / "old").eval()
    assert not old.fit_range_recorded and old.fit_margin == 1.0
    assert torch.equal(old.allowed_targets, make().allowed_targets)     # every flux level, as before
    old.flux_tokens = False
    pixels = old.stretch(old.decode(_extreme_image_tokens(old)[:, old.n_bands:]).flux).x * old.stretch.scale
    assert (pixels.amax((0, 2, 3)) > codec.pixel_fit_range[:, 1] + 5).all()   # the wild decoder, unclamped


def test_image_predictions_stay_inside():
    """A model that wants the lowest or highest flux token everywhere predicts, through `allowed_targets`, only
    tokens inside the range: argmax, MaskGIT sampling and the expected level of the kept distributions."""
    torch.manual_seed(0)
    codec = LegacySurveyImageCodec(hidden=8, depth=1, patch=8).prepare(_survey_images("legacy")).eval()
    manager = CodecManager([codec, ToyTableCodec()])
    model = MultimodalTransformer.from_codecs(manager, "tiny").eval()
    key, tab = codec.token_key, "tok_toy_table"
    with torch.no_grad():
        model.heads[key].bias[1] += 50.0; model.heads[key].bias[codec.vocab_size - 1] += 60.0
    B = 4
    tokens = {tab: manager.encode(toy_table(B))[tab], key: torch.zeros(B, codec.num_tokens, dtype=torch.long)}
    present = {tab: torch.ones(B, dtype=torch.bool), key: torch.zeros(B, dtype=torch.bool)}
    free = predict_tokens(model, tokens, present, [key])
    assert (free.tokens[key][:, :4] == codec.vocab_size - 1).all()     # unbounded, the model goes to the top
    b, r, m = codec.flux_token_bounds(), codec.flux_fit_range, codec.fit_margin
    g = torch.Generator().manual_seed(0)
    for kw in (dict(), dict(steps=4, temperature=1.0, choice_temperature=1.0, generator=g)):
        out = predict_tokens(model, tokens, present, [key], allowed=allowed_targets(manager, [key]),
                             keep_probs=True, **kw)
        flux = out.tokens[key][:, :4]
        assert ((flux >= b[:, 0]) & (flux <= b[:, 1])).all(), (flux, b)
        for decoded in (codec.decode(out.tokens[key]), codec.decode_distribution(out.probs[key], "mean")):
            assert _inside(_asinh_aperture_snr(codec, decoded), r[:, 0] - m, r[:, 1] + m)


# ------------------------------------------------------------------------------------------- table codecs

def _lab(n: int, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.tensor(np.stack([g.lognormal(1.6, 0.3, n), g.integers(18, 90, n), g.gamma(0.8, 4, n)], 1),
                        dtype=torch.float32)


@pytest.mark.parametrize("missing_cells", [False, True])
def test_table_codec_decodes_inside_the_padded_training_range(missing_cells, tmp_path):
    x = _lab(200, 0)
    if missing_cells: x[::7, 2] = float("nan")
    codec = TableCodec(BoundLab, num_bins=32, missing_cells=missing_cells).prepare(BoundLab.from_matrix(x))
    q, m = codec.quantizer, codec.range_margin
    lo, hi = torch.from_numpy(np.nanmin(x.numpy(), 0)), torch.from_numpy(np.nanmax(x.numpy(), 0))
    # the recorded range is the training range ± range_margin × its width
    torch.testing.assert_close(q.range_low, lo - m * (hi - lo)); torch.testing.assert_close(q.range_high, hi + m * (hi - lo))
    V, F = codec.vocab_size, len(codec.columns)
    first = 1 if missing_cells else 0
    ends = torch.tensor([[0] * F, [first] * F, [V - 1] * F])
    got = codec.decode(ends).as_matrix()
    assert torch.isnan(got[0]).all() == missing_cells                  # token 0 with missing cells: not measured
    assert _inside(got[int(missing_cells):], q.range_low, q.range_high, 0.0)
    mask = codec.allowed_targets
    allowed = torch.ones(F, V) if mask is None else mask.float()
    probs = torch.zeros(1, F, V); probs[0, :, first] = probs[0, :, V - 1] = 0.5
    for p in (probs, (allowed / allowed.sum(-1, keepdim=True))[None]):
        for point in ("mean", "median", 0.01, 0.99):
            assert _inside(codec.decode_distribution(p, point).as_matrix(), q.range_low, q.range_high, 1e-4)
    codec.save(tmp_path / "lab")
    again = Codec.load(tmp_path / "lab")
    assert torch.equal(again.quantizer.range_low, q.range_low) and torch.equal(again.quantizer.range_high, q.range_high)


# ------------------------------------------------------------------------------------------ series codecs

@pytest.fixture(scope="module")
def series_codec():
    torch.manual_seed(0)
    codec = SeriesCodec(ToySeries, levels=(5, 5, 5), channels=(8, 8, 8, 8)).prepare(toy_series(64, seed=0))
    with torch.no_grad(): codec.decoder[-1].bias.add_(10.0)            # a decoder far off the training data
    return codec.eval()


def test_series_codec_decodes_inside_the_training_range(series_codec):
    codec, train = series_codec, toy_series(64, seed=0).signal
    lo, hi, m = train.amin(), train.amax(), codec.range_margin
    torch.testing.assert_close(codec.fit_range[0], torch.stack([lo, hi]))
    torch.testing.assert_close(codec.value_bounds()[0], torch.stack([lo - m * (hi - lo), hi + m * (hi - lo)]))
    V, N = codec.vocab_size, codec.num_tokens
    g = torch.Generator().manual_seed(0)
    tokens = torch.stack([torch.zeros(N, dtype=torch.long), torch.full((N,), V - 1), torch.randint(0, V, (N,), generator=g)])
    low, high = codec.value_bounds()[0]
    codec.reset_fit_range_report()
    got = codec.decode(tokens).signal
    assert _inside(got, low, high, 0.0)
    assert int(codec.fit_range_report().values_clamped_high[0]) > 0   # the wild decoder was clamped, and counted
    probs = torch.zeros(1, N, V); probs[0, :, 0] = probs[0, :, V - 1] = 0.5
    assert _inside(codec.decode_distribution(probs).signal, low, high, 0.0)
    raw, _, _ = codec(toy_series(2, seed=1))                           # training sees the raw output
    assert raw.signal.max() > high


def test_series_codec_save_load(series_codec, tmp_path):
    series_codec.save(tmp_path / "s")
    again = Codec.load(tmp_path / "s")
    assert torch.equal(again.fit_range, series_codec.fit_range) and again.range_margin == series_codec.range_margin
    _saved_before_ranges(tmp_path / "s", ["range_margin"], ["fit_range"])
    old = Codec.load(tmp_path / "s").eval()
    assert torch.isnan(old.fit_range).all() and torch.isinf(old.value_bounds()).all()
    tokens = torch.full((1, old.num_tokens), old.vocab_size - 1)
    assert old.decode(tokens).signal.max() > series_codec.value_bounds()[0, 1]   # unbounded, as before


# ---------------------------------------------------------------------------- the toy codecs (fixed ranges)

@pytest.mark.parametrize("codec, field, low, high", [
    (ToyTableCodec(), None, torch.tensor([0.0, 0.0, 10.0]), torch.tensor([100.0, 1.0, 50.0])),
    (ToySeriesCodec(), "signal", torch.tensor(-1.5), torch.tensor(1.5)),
    (ToyImageCodec(), "flux", torch.tensor(-1.0), torch.tensor(1.0)),
], ids=["ToyTableCodec", "ToySeriesCodec", "ToyImageCodec"])
def test_toy_codecs_decode_inside_their_fixed_range(codec, field, low, high):
    "The toy codecs are not fitted: their range is fixed when they are built, and tokens 0 and V-1 stay inside it."
    V, N = codec.vocab_size, codec.num_tokens
    tokens = torch.stack([torch.zeros(N, dtype=torch.long), torch.full((N,), V - 1)])
    out = codec.decode(tokens)
    values = out.as_matrix() if field is None else getattr(out, field).flatten(1)
    assert _inside(values, low, high, 0.0)
    probs = torch.full((1, N, V), 1.0 / V)
    back = codec.decode_distribution(probs)
    assert _inside(back.as_matrix() if field is None else getattr(back, field), low, high, 1e-6)


# ------------------------------------------------------------------------------------------- spectra

def test_spectrum_codec_extreme_tokens_stay_in_the_fitted_range():
    "A spectrum's decoded shape stays within the fitted range ± fit_margin; predictions take only fitted amplitudes."
    g = torch.Generator().manual_seed(0)
    n, L = 12, DESISpectrum.length
    flux = (torch.rand(n, 1, 1, generator=g) * 20 + 1) * (1 + 0.3 * torch.rand(n, 1, L, generator=g))
    x = DESISpectrum(flux=flux, ivar=torch.ones(n, 1, L))
    torch.manual_seed(0)
    codec = SpectrumCodec(modality=DESISpectrum, channels=(8, 8, 16)).prepare(x).eval()
    with torch.no_grad():
        for p in codec.decoder.parameters(): p.add_(5.0)          # a decoder pushed far off
    allowed = codec.allowed_targets
    amp = allowed[0].nonzero().flatten()
    assert 0 < len(amp) < codec.vocab_size                         # amplitudes beyond the fitted range are ruled out
    V, N = codec.vocab_size, codec.num_tokens
    tokens = torch.stack([torch.cat([a.view(1), torch.full((N - 1,), t)]) for a in (amp[0], amp[-1]) for t in (0, V - 1)])
    out = codec.decode(tokens).flux.double()
    level = codec.amplitude_levels()[tokens[:, 0]]
    y = torch.asinh(out / codec.normaliser(level)[:, None, None])
    lo, hi = float(codec.fit_range[0]) - codec.fit_margin, float(codec.fit_range[1]) + codec.fit_margin
    assert float(y.min()) >= lo - 1e-5 and float(y.max()) <= hi + 1e-5
    rep = codec.fit_range_report()
    assert int(rep.filter(like="decoded").iloc[0, 0]) > 0
