"""Physics checks of the simulated multi-survey data: fluxes agree across surveys in nanomaggies, HSC is deeper than
Legacy, headers and WCS match the survey facts, and resampling conserves flux."""
import json
import numpy as np
import pandas as pd
import pytest
import galsim
import astropy.units as u
from astropy.wcs.utils import proj_plane_pixel_scales

from mmfm.surveys import SURVEYS, survey_info, load_survey_cutout, to_nanomaggies, cutout_wcs
from mmfm.simulate import SimConfig, simulate_dataset, load_truth, noiseless_cutouts, band_flux_ratios, IMAGE_SOURCES
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
