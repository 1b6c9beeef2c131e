"""Physics checks of the simulated multi-survey data: fluxes agree across surveys in nanomaggies, HSC is deeper than
Legacy, headers and WCS match the survey facts, resampling conserves flux, and the moments catalogs measure the
galaxies' true shapes (diluted by the PSF, scattered by the noise)."""
import json
import numpy as np
import pandas as pd
import pytest
import galsim
import astropy.units as u
from astropy.wcs.utils import proj_plane_pixel_scales

from scipy.stats import norm

from mmfm.surveys import SURVEYS, survey_info, load_survey_cutout, to_nanomaggies, cutout_wcs, MOMENTS_BANDS
from mmfm.simulate import (SimConfig, simulate_dataset, load_truth, noiseless_cutouts, band_flux_ratios, IMAGE_SOURCES,
                           measure_moments, MomentsError, render_unit_images, survey_psf, TABLE_FILES)
from mmfm.align import SurveyAligner, reproject_cube


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("astro")
    simulate_dataset(root, SimConfig(n_galaxies=60, seed=11))
    manifest = json.loads((root / "manifest.json").read_text())
    truth, cfg = load_truth(root)
    return root, manifest["samples"], truth.set_index("id", drop=False), cfg


def aperture(flux, survey, radius_arcsec=3.9):
    "Sum inside a circle centred on the stamp centre, and its number of pixels."
    info, n = survey_info(survey), flux.shape[-1]
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(xx - (n - 1) / 2, yy - (n - 1) / 2) * info.pixel_scale_arcsec
    inside = r < radius_arcsec
    return flux[..., inside].sum(-1), inside.sum()


def test_flux_agrees_across_surveys(data):
    """Legacy and HSC cutouts differ in g, r, i, z (nanomaggies) by what their own filter curves make of the same galaxy
    (DECam's and HSC's filters differ: the truth table's fluxes per survey), within the noise."""
    root, samples, truth, _ = data
    both = [s for s in samples if "legacy_image" in s and "hsc_image" in s]
    assert len(both) >= 10
    z_scores = []
    for s in both:
        fl = {}
        for sv in ("legacy", "hsc"):
            img, _ = load_survey_cutout(root / s[f"{sv}_image"], sv, sample_id=s["id"])
            total, npix = aperture(to_nanomaggies(img.astype(np.float64), sv), sv)
            sigma = np.sqrt(npix) * survey_info(sv).pixel_noise_nmgy
            fl[sv] = (total[:4], sigma[:4])
        true_flux = np.array([truth.loc[s["id"], f"flux_legacy_{b}"] for b in "griz"])
        true_hsc = np.array([truth.loc[s["id"], f"flux_hsc_{b}"] for b in "griz"])
        diff = (fl["legacy"][0] - fl["hsc"][0]) - (true_flux - true_hsc)   # measured minus expected difference
        sigma = np.hypot(fl["legacy"][1], fl["hsc"][1])
        # noise, plus the PSF wings of the wider Legacy PSF outside the aperture (a few per cent for large galaxies)
        assert np.all(np.abs(diff) < 5 * sigma + 0.04 * true_flux), (s["id"], diff, sigma, true_flux)
        z_scores.append(diff / np.sqrt(sigma ** 2 + (0.01 * true_flux) ** 2))
    z = np.concatenate(z_scores)
    assert abs(np.median(z)) < 1.0 and np.std(z) < 3.0


def test_gaia_flux_matches_truth(data):
    "Gaia cutouts in nanomaggies carry the true BP, G, RP fluxes, within their (large) noise."
    root, samples, truth, _ = data
    gaia = [s for s in samples if "gaia_image" in s]
    assert gaia
    for s in gaia:
        img, _ = load_survey_cutout(root / s["gaia_image"], "gaia", sample_id=s["id"])
        total, npix = aperture(to_nanomaggies(img.astype(np.float64), "gaia"), "gaia", 4.2)
        sigma = np.sqrt(npix) * survey_info("gaia").pixel_noise_nmgy
        true_flux = np.array([truth.loc[s["id"], f"flux_gaia_{b}"] for b in ("BP", "G", "RP")])
        assert np.all(np.abs(total - true_flux) < 5 * sigma + 0.1 * true_flux), (s["id"], total, true_flux)


def test_noise_follows_depth_and_hsc_is_deeper(data):
    "The noise in the cutouts is the stated σ per pixel, and HSC's noise per arcsec² is lower than Legacy's."
    root, samples, _, _ = data
    measured = {}
    for sv in ("legacy", "hsc", "gaia"):
        ids = [s["id"] for s in samples if f"{sv}_image" in s][:10]
        clean = noiseless_cutouts(root, ids, sv)
        noisy = np.stack([load_survey_cutout(root / f"images/{sv}/{i}.fits", sv, sample_id=i)[0] for i in ids])
        sd = (noisy - clean).std(axis=(0, 2, 3))
        np.testing.assert_allclose(sd, survey_info(sv).pixel_noise, rtol=0.1)
        # noise of the flux in one arcsec², in nanomaggies: comparable across pixel scales
        measured[sv] = sd * survey_info(sv).nmgy_per_unit / survey_info(sv).pixel_scale_arcsec
    assert np.all(measured["hsc"][:4] < measured["legacy"]), measured
    assert measured["gaia"].min() > measured["legacy"].max()


@pytest.mark.parametrize("survey", IMAGE_SOURCES)
def test_headers_and_wcs_match_survey_facts(data, survey):
    root, samples, truth, cfg = data
    info = survey_info(survey)
    for s in [s for s in samples if f"{survey}_image" in s][:5]:
        cut = load_survey_cutout(root / s[f"{survey}_image"], survey, sample_id=s["id"])
        h, w = cut.header, cut.wcs
        assert h["SURVEY"] == survey and h["BANDS"] == ",".join(info.bands) and h["BUNIT"] == info.flux_unit
        assert h["PIXSCALE"] == pytest.approx(info.pixel_scale_arcsec)
        for b, zp, fwhm in zip(info.bands, info.zeropoint.to_value(u.mag), info.psf_fwhm.to_value(u.arcsec)):
            assert h[f"MAGZP_{b}"] == pytest.approx(zp) and h[f"PSF_{b}"] == pytest.approx(fwhm)
        np.testing.assert_allclose(np.array(proj_plane_pixel_scales(w)) * 3600, info.pixel_scale_arcsec, rtol=1e-9)
        assert w.wcs.ctype[0] == "RA---TAN" and w.wcs.ctype[1] == "DEC--TAN"
        assert w.pixel_scale_matrix[0, 0] < 0 < w.pixel_scale_matrix[1, 1]       # north up, east left
        n = cfg.stamp_size(survey)
        assert cut.flux.shape == (info.n_bands, n, n)
        centre = w.pixel_to_world((n - 1) / 2, (n - 1) / 2)
        assert centre.ra.deg == pytest.approx(truth.loc[s["id"], "ra"], abs=1e-9)
        assert centre.dec.deg == pytest.approx(truth.loc[s["id"], "dec"], abs=1e-9)


def test_galaxy_sits_at_its_true_offset(data):
    "The light-weighted centre of a bright galaxy is at its true sky offset in every survey (WCS and drawing agree)."
    root, samples, truth, cfg = data
    g = truth.sort_values("mag_r").iloc[0]
    for sv in IMAGE_SOURCES:
        img = noiseless_cutouts(root, [g["id"]], sv)[0].sum(0)
        n = img.shape[-1]
        yy, xx = np.mgrid[:n, :n]
        w = cutout_wcs(sv, g["ra"], g["dec"], n)
        c = w.pixel_to_world((img * xx).sum() / img.sum(), (img * yy).sum() / img.sum())
        east = (c.ra.deg - g["ra"]) * np.cos(np.radians(g["dec"])) * 3600
        north = (c.dec.deg - g["dec"]) * 3600
        assert east == pytest.approx(g["dx"], abs=0.05) and north == pytest.approx(g["dy"], abs=0.05), sv


def test_colours_carry_redshift():
    "Colours in the survey bands change with redshift (what makes photometric redshifts possible)."
    t = np.linspace(0, 3, 7)
    z = np.linspace(0.05, 1.5, 30)
    tt, zz = np.meshgrid(t, z)
    f = band_flux_ratios(tt.ravel(), zz.ravel(), "hsc")
    colours = -2.5 * np.log10(f[:, :-1] / f[:, 1:])
    # within a type, colours move by more than the typical photometric error (0.05 mag) across the redshift range
    per_type = colours.reshape(len(z), len(t), 4)
    assert (np.ptp(per_type, axis=0).max(axis=-1) > 0.5).all()


def _point_source(survey, flux=100.0, dx=0.11, dy=-0.17, fwhm=None):
    info = survey_info(survey)
    fwhm = fwhm or float(info.psf_fwhm[0].to_value(u.arcsec))
    psf = galsim.Moffat(beta=3.5, fwhm=fwhm) if info.psf_beta else galsim.Gaussian(fwhm=fwhm)
    img = psf.shift(-dx, dy).withFlux(flux).drawImage(nx=info.stamp_size, ny=info.stamp_size, scale=info.pixel_scale_arcsec)
    return img.array[None].astype(np.float64)


@pytest.mark.parametrize("src,dst,method", [
    ("hsc", "legacy", "interp"), ("hsc", "legacy", "adaptive"), ("hsc", "legacy", "exact"),
    ("legacy", "hsc", "interp"), ("legacy", "hsc", "exact"),
    ("gaia", "legacy", "adaptive"), ("gaia", "legacy", "exact"), ("legacy", "gaia", "exact"), ("legacy", "gaia", "adaptive"),
])
def test_resampled_point_source_keeps_flux(src, dst, method):
    "In the flux-conserving mode a resampled point source keeps its flux within 1 %."
    img = _point_source(src)
    aligner = SurveyAligner(dst, method=method, flux_conserving=True)
    out = aligner.align(img, cutout_wcs(src, 150.2, 2.1))
    assert out.valid.all()
    assert out.flux.sum() == pytest.approx(img.sum(), rel=0.01)


def test_surface_brightness_mode_keeps_a_flat_sky():
    "Without flux conservation, a flat surface brightness stays flat (the pixel values do not change)."
    flat = np.full((1, 50, 50), 3.0)
    out = SurveyAligner("legacy", flux_conserving=False).align(flat, cutout_wcs("hsc", 150.2, 2.1))
    np.testing.assert_allclose(out.flux[out.valid], 3.0, rtol=1e-6)
    cons = SurveyAligner("legacy", flux_conserving=True).align(flat, cutout_wcs("hsc", 150.2, 2.1))
    np.testing.assert_allclose(cons.flux[cons.valid], 3.0 * (0.262 / 0.168) ** 2, rtol=1e-6)


def test_alignment_follows_the_wcs():
    "A target grid shifted on the sky sees the source shifted by the same angle."
    img = _point_source("hsc", dx=0.0, dy=0.0)
    w_in = cutout_wcs("hsc", 150.0, 2.0)
    shifted = cutout_wcs("legacy", 150.0, 2.0 + 5 * 0.262 / 3600)      # target centre 5 Legacy pixels north
    out = reproject_cube(img, w_in, shifted, (32, 32), method="exact")
    peak = np.unravel_index(np.nanargmax(out.flux[0]), (32, 32))
    assert peak[0] in (10, 11) and peak[1] in (15, 16)                   # 5 pixels below the centre (15.5)


# ---- measured shapes (the moments catalogs) ----

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    "A data set large enough for shape statistics: the moments catalogs, the truth, and the summary."
    root = tmp_path_factory.mktemp("shapes")
    summary = simulate_dataset(root, SimConfig(n_galaxies=160, seed=21))
    truth, cfg = load_truth(root)
    cats = {s: pd.read_csv(root / TABLE_FILES[f"{s}_moments"]).set_index("id") for s in MOMENTS_BANDS}
    return root, summary, truth.set_index("id", drop=False), cfg, cats


def _snr(truth, ids, survey, cfg):
    "Matched-filter S/N ν of each galaxy in the survey's moments band: true flux over the optimal flux error."
    info = survey_info(survey)
    k = info.band_index(MOMENTS_BANDS[survey])
    unit = np.stack([render_unit_images(truth.loc[i], survey, cfg)[k] for i in ids])
    sigma_flux = info.pixel_noise[k] / np.sqrt((unit ** 2).sum((1, 2)))                 # survey unit
    return truth.loc[ids, f"flux_{survey}_{MOMENTS_BANDS[survey]}"].to_numpy() / info.nmgy_per_unit[k] / sigma_flux


def _moments(images, survey):
    info = survey_info(survey)
    out = [measure_moments(im, info.pixel_scale_arcsec) for im in images]
    return np.array([[m["moments_e1"], m["moments_e2"]] for m in out]), np.array([m["moments_sigma"] for m in out])


@pytest.mark.parametrize("survey", list(MOMENTS_BANDS))
def test_noiseless_moments_are_the_truth_made_rounder(shapes, survey):
    """Without noise, the measured shape is the true shear made rounder by the PSF (convolution with a round PSF
    adds isotropic second moments), never rounder than the PSF-convolved image allows: same signs as the truth,
    |e_measured| <= |e_true|, and a size larger than the PSF's own adaptive-moments σ."""
    root, _, truth, cfg, cats = shapes
    info, band = survey_info(survey), MOMENTS_BANDS[survey]
    ids = list(cats[survey].index[:40])
    e_clean, size = _moments(noiseless_cutouts(root, ids, survey)[:, info.band_index(band)], survey)
    e_true = truth.loc[ids, ["e1", "e2"]].to_numpy()
    big = np.abs(e_true) > 0.02                                  # components not lost in pixelisation
    assert (np.sign(e_clean[big]) == np.sign(e_true[big])).all()
    assert (np.hypot(*e_clean.T) <= np.hypot(*e_true.T) + 1e-3).all()
    psf = survey_psf(survey, band).drawImage(nx=64, ny=64, scale=info.pixel_scale_arcsec).array
    assert (size > measure_moments(psf, info.pixel_scale_arcsec)["moments_sigma"]).all()


@pytest.mark.parametrize("survey", list(MOMENTS_BANDS))
def test_measured_shapes_follow_the_truth(shapes, survey):
    """For bright galaxies (matched-filter S/N ν > 30 in the moments band) the catalog's ellipticities agree in sign
    with the truth's, and correlate with them, as well as the noise allows. The expectation is derived, not fixed:
    the signal is the noiseless measurement e₀ (the truth made rounder by the PSF), the noise per component is
    c/ν (Bernstein & Jarvis 2002: σ_e ∝ 1/ν, c = 1 for a Gaussian), with c calibrated on fresh noise realisations
    of the same galaxies (independent of the catalog's own noise). Then P(sign agrees) = Φ(|e₀|/σ) per component
    (Φ(−|e₀|/σ) should e₀ and the truth differ in sign) and corr = cov(e₀, e)/sqrt((var e₀ + ⟨σ²⟩) var e); the
    thresholds are these expectations less 3 standard errors (binomial; Fisher z)."""
    root, _, truth, cfg, cats = shapes
    info, cat = survey_info(survey), cats[survey]
    k = info.band_index(MOMENTS_BANDS[survey])
    nu_all = _snr(truth, list(cat.index), survey, cfg)
    ids = list(cat.index[nu_all > 30]); nu = nu_all[nu_all > 30]
    assert len(ids) >= 30, f"only {len(ids)} bright {survey} galaxies"
    clean = noiseless_cutouts(root, ids, survey)[:, k]
    e0, _ = _moments(clean, survey)
    rng, dev = np.random.default_rng(99), []
    for _ in range(2):                                           # fresh noise: calibrate c in σ = c/ν
        for j, im in enumerate(clean + rng.standard_normal(clean.shape) * info.pixel_noise[k]):
            try: m = measure_moments(im, info.pixel_scale_arcsec)
            except MomentsError: continue
            dev += [((m["moments_e1"] - e0[j, 0]) * nu[j]) ** 2, ((m["moments_e2"] - e0[j, 1]) * nu[j]) ** 2]
    c = np.sqrt(np.mean(dev))
    sigma = np.repeat(c / nu, 2)
    e_true = truth.loc[ids, ["e1", "e2"]].to_numpy().ravel()
    e_cat = cat.loc[ids, ["moments_e1", "moments_e2"]].to_numpy().ravel()
    e0 = e0.ravel()
    p = norm.cdf(np.where(np.sign(e0) == np.sign(e_true), 1, -1) * np.abs(e0) / sigma)
    agree, p_min = np.mean(np.sign(e_cat) == np.sign(e_true)), p.mean() - 3 * np.sqrt((p * (1 - p)).sum()) / len(p)
    rho = np.cov(e0, e_true)[0, 1] / np.sqrt((np.var(e0, ddof=1) + np.mean(sigma ** 2)) * np.var(e_true, ddof=1))
    rho_min = np.tanh(np.arctanh(rho) - 3 / np.sqrt(len(e_true) - 3))
    r = np.corrcoef(e_cat, e_true)[0, 1]
    assert agree >= p_min, (survey, agree, p.mean(), p_min, c)
    assert r >= rho_min, (survey, r, rho, rho_min, c)


def test_moments_deterministic_with_the_seed(tmp_path):
    "The same seed writes the same moments catalogs, byte for byte; another seed other ones."
    cfg = SimConfig(n_galaxies=12, seed=8, stamp_sizes={"legacy": 24, "hsc": 32, "gaia": 8})
    for d, c in (("a", cfg), ("b", cfg), ("c", SimConfig(**{**cfg.__dict__, "seed": 9}))):
        simulate_dataset(tmp_path / d, c)
    for s in MOMENTS_BANDS:
        path = TABLE_FILES[f"{s}_moments"]
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
        assert (tmp_path / "a" / path).read_bytes() != (tmp_path / "c" / path).read_bytes()


def test_failed_fits_are_absent_and_counted(tmp_path):
    """Galaxies near the Legacy depth make HSM fail: such a galaxy has no moments row (no NaN, no invented value),
    the summary counts it, and its written cutout fails `measure_moments` again; every row present is the
    measurement of the written cutout."""
    summary = simulate_dataset(tmp_path, SimConfig(n_galaxies=30, seed=4, mag_range=(24.5, 25.5)))
    samples = json.loads((tmp_path / "manifest.json").read_text())["samples"]
    for s in MOMENTS_BANDS:
        info, k = survey_info(s), survey_info(s).band_index(MOMENTS_BANDS[s])
        cat = pd.read_csv(tmp_path / TABLE_FILES[f"{s}_moments"])
        assert np.isfinite(cat[["moments_e1", "moments_e2", "moments_sigma"]].to_numpy()).all()
        with_image = [x for x in samples if f"{s}_image" in x]
        absent = [x for x in with_image if f"{s}_moments_row" not in x]
        assert summary[f"{s}_moments_failed"] == len(absent) == len(with_image) - len(cat)
        for x in with_image:
            img = load_survey_cutout(tmp_path / x[f"{s}_image"], s, sample_id=x["id"]).flux[k]
            if x in absent:
                with pytest.raises(MomentsError, match="adaptive moments failed"): measure_moments(img, info.pixel_scale_arcsec)
            else:
                row = cat.iloc[x[f"{s}_moments_row"]]
                assert row["id"] == x["id"]
                m = measure_moments(img, info.pixel_scale_arcsec)
                np.testing.assert_allclose([row[c] for c in m], list(m.values()), rtol=1e-12)
    assert summary["legacy_moments_failed"] > 0               # the test exercised a failure
