"""Spectra as modalities: the simulated DESI-like and Gaia-XP-like spectra are deterministic and agree with the
catalogs' photometry, their noise is what the model says, the spectrum codec round-trips within bounds, and a trained
model grown by a spectrum stream keeps its outputs where no spectrum is given and learns the new stream."""
import tempfile
import numpy as np
import pytest
import torch
import speclite.filters
import astropy.units as u
from mmfm.simulate import (SimConfig, SPECTRUM_SOURCES, simulate_dataset, draw_galaxies, has_spectrum, galaxy_spectrum,
                           noiseless_spectrum, load_spectra, noiseless_spectra)
from mmfm.surveys import spectrograph_info, DESISpectrum
from mmfm.spectrum_codecs import SpectrumCodec, spectrum_rms_sigma
from mmfm.codec import check_codec, CodecManager, Codec
from mmfm.codec_training import train_codec, CodecTrainConfig
from mmfm.testing import ToyTableCodec, ToyImageCodec, toy_table, toy_image
from mmfm.transformer import MultimodalTransformer
from mmfm.tokens import TokenDataset
from mmfm.train import Trainer, TrainConfig
from mmfm.masking import MaskingConfig, sample_budget_masks
from mmfm.grow import grow_model
from mmfm.examples.spectra import stream_loss

SMALL = {'legacy': 16, 'hsc': 20, 'gaia': 8}

@pytest.fixture(scope="module")
def spectra_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectra")
    cfg = SimConfig(n_galaxies=48, seed=7, stamp_sizes=SMALL, spectra=SPECTRUM_SOURCES)
    return root, cfg, simulate_dataset(root / "a", cfg)

def test_spectra_are_deterministic(spectra_set, tmp_path):
    root, cfg, summary = spectra_set
    assert summary["desi_spectra"] > 5 and summary["gaia_xp_spectra"] >= 1, summary
    simulate_dataset(tmp_path / "b", cfg, workers=2)
    simulate_dataset(tmp_path / "c", SimConfig(n_galaxies=48, seed=8, stamp_sizes=SMALL, spectra=SPECTRUM_SOURCES))
    simulate_dataset(tmp_path / "off", SimConfig(n_galaxies=48, seed=7, stamp_sizes=SMALL))
    for inst in SPECTRUM_SOURCES:
        for ext in (".npy", ".json"):
            a = (root / "a" / "spectra" / f"{inst}{ext}").read_bytes()
            assert a == (tmp_path / "b" / "spectra" / f"{inst}{ext}").read_bytes(), (inst, ext)
        assert ((root / "a" / "spectra" / f"{inst}.npy").read_bytes()
                != (tmp_path / "c" / "spectra" / f"{inst}.npy").read_bytes()), inst
    for path in ("catalogs/legacy_catalog.csv", "catalogs/hsc_moments.csv", "truth/truth.csv"):   # other streams
        assert (root / "a" / path).read_bytes() == (tmp_path / "off" / path).read_bytes(), path

def _nmgy(spec, inst, name):
    info = spectrograph_info(inst)
    unit = u.erg / u.s / u.cm ** 2 / u.AA
    filt = speclite.filters.load_filter(name)
    flam, wave = filt.pad_spectrum(spec * info.flux_unit.to(unit) * unit, info.wavelength * u.AA, method="edge")
    return float(filt.get_ab_maggies(flam, wave)) * 1e9

def test_synthetic_photometry_matches_the_catalog_truth():
    cfg = SimConfig(n_galaxies=300, seed=4, spectra=SPECTRUM_SOURCES)
    gals = draw_galaxies(cfg).to_dict("records")
    desi = [g for g in gals if has_spectrum(g, "desi", cfg)][:15]
    xp = [g for g in gals if has_spectrum(g, "gaia_xp", cfg)][:8]
    assert len(desi) == 15 and len(xp) >= 3
    rel = [_nmgy(noiseless_spectrum(g, "desi"), "desi", f"{f}-{b}") / g[f"flux_{s}_{b}"] - 1
           for g in desi for s, f, bands in (("legacy", "decamDR1", "gri"), ("hsc", "hsc2017", "griz")) for b in bands]
    rel += [_nmgy(noiseless_spectrum(g, "gaia_xp"), "gaia_xp", "gaiadr3-BP") / g["flux_gaia_BP"] - 1 for g in xp]
    assert np.max(np.abs(rel)) < 0.01, np.max(np.abs(rel))
    # a wrong redshift would not pass: the test can fail
    wrong = dict(desi[0], z=desi[0]["z"] + 0.2)
    off = [abs(_nmgy(noiseless_spectrum(wrong, "desi"), "desi", f"decamDR1-{b}") / desi[0][f"flux_legacy_{b}"] - 1)
           for b in "gri"]
    assert max(off) > 0.02, off

def test_noise_is_what_the_model_says(spectra_set):
    root, cfg, _ = spectra_set
    for inst in SPECTRUM_SOURCES:
        x, ids = load_spectra(root / "a", inst)
        truth = noiseless_spectra(root / "a", ids, inst)
        z = (x.flux.double().numpy() - truth) * np.sqrt(x.ivar.double().numpy())
        assert 0.85 < z.std() < 1.15 and abs(z.mean()) < 0.1, (inst, z.std(), z.mean())
        assert spectrum_rms_sigma(x.flux, truth, x.sigma) == pytest.approx(float(np.sqrt((z ** 2).mean())), rel=1e-5)

@pytest.fixture(scope="module")
def desi_codec(spectra_set):
    root, _, _ = spectra_set
    x, _ = load_spectra(root / "a", "desi")
    torch.manual_seed(0)
    codec = SpectrumCodec(modality=DESISpectrum, channels=(8, 8, 16))
    untrained = spectrum_rms_sigma(codec.prepare(x).decode(codec.encode(x)).flux,
                                   noiseless_spectra(root / "a", load_spectra(root / "a", "desi")[1], "desi"), x.sigma)
    train_codec(codec, x, None, CodecTrainConfig(epochs=25, batch_size=8, lr=3e-3, patience=None, progress=False))
    return codec.eval(), x, untrained

def test_codec_round_trip_and_bounds(desi_codec, spectra_set, tmp_path):
    codec, x, untrained = desi_codec
    root, _, _ = spectra_set
    check_codec(codec, x.select(range(4)), check_default=False)
    tok = codec.encode(x)
    assert tok.shape == (x.batch_size, 65) and codec.vocab_size == 1000
    truth = noiseless_spectra(root / "a", load_spectra(root / "a", "desi")[1], "desi")
    floor = spectrum_rms_sigma(codec.decode(tok).flux, truth, x.sigma)
    assert np.isfinite(floor) and floor < untrained, (floor, untrained)
    codec.reset_fit_range_report()
    V, N = codec.vocab_size, codec.num_tokens
    extreme = torch.stack([torch.zeros(N, dtype=torch.long), torch.full((N,), V - 1)])
    dec = codec.decode(extreme).flux.double()
    lv = codec.amplitude_levels()[extreme[:, 0]]
    top = torch.sinh(codec.fit_range.double()[1] + codec.fit_margin) * codec.normaliser(lv)[:, None, None]
    assert torch.isfinite(dec).all() and (dec.abs() <= top * (1 + 1e-5)).all()
    assert int(codec.fit_range_report().values_decoded.iloc[0]) == 2 * 256
    assert not codec.allowed_targets[0].all() and codec.allowed_targets[0, tok[:, 0]].all()
    codec.save(tmp_path / "desi")
    again = Codec.load(tmp_path / "desi").eval()
    assert torch.equal(again.encode(x), tok)
    assert torch.equal(again.decode(tok).flux, codec.decode(tok).flux)

def test_growth_keeps_old_outputs_and_learns_the_new_stream(desi_codec):
    codec, x, _ = desi_codec
    n = x.batch_size
    two = CodecManager([ToyTableCodec(), ToyImageCodec()])
    three = CodecManager([ToyTableCodec(), ToyImageCodec(), codec])
    torch.manual_seed(0)
    small = MultimodalTransformer.from_codecs(two, "tiny").eval()
    grown, report = grow_model(small, three)
    grown.eval()
    assert report["new"] == ["tok_spectrum_desi"]
    tok = {**two.encode(toy_table(n, 0), toy_image(n, seed=0)), "tok_spectrum_desi": codec.encode(x)}
    present = {k: torch.ones(n, dtype=torch.bool) for k in tok}
    present["tok_spectrum_desi"][:] = False
    old = {k: v for k, v in tok.items() if k != "tok_spectrum_desi"}
    m = sample_budget_masks(old, 10, 10, {k: present[k] for k in old}, generator=torch.Generator().manual_seed(0))
    none = torch.zeros_like(tok["tok_spectrum_desi"], dtype=torch.bool)
    with torch.no_grad():
        a = small(old, m.is_input, m.is_target, {k: present[k] for k in old})
        b = grown(tok, {**m.is_input, "tok_spectrum_desi": none}, {**m.is_target, "tok_spectrum_desi": none}, present)
    for k in old: assert torch.equal(a[k].nan_to_num(), b[k].nan_to_num()), k
    # the new stream is learned: its tokens' cross-entropy falls with training
    data = TokenDataset(tok, None, three.vocab_sizes, three.token_grids)
    rows = np.arange(n)
    before = stream_loss(grown, data, rows, "tok_spectrum_desi")
    cfg = TrainConfig(steps=40, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=4, eval_every=0, checkpoint_every=0,
                      progress=False)
    with tempfile.TemporaryDirectory() as d: Trainer(grown, data, cfg, MaskingConfig(40, 40), d).fit()
    after = stream_loss(grown.eval(), data, rows, "tok_spectrum_desi")
    assert after < before - 0.5, (before, after)
