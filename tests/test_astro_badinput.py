"""Bad survey input gets a clear error naming the sample and the survey; masked (NaN) pixels are handled by masks."""
import json
import shutil
import numpy as np
import pytest
import torch
from astropy.io import fits

from mmfm.modality import ModalityError
from mmfm.data import DataError, MultiSourceDataset
from mmfm.surveys import (SURVEYS, survey_info, cutout_header, write_survey_cutout, load_survey_cutout, SurveyDataError,
                          SurveyPreprocessor, LegacySurveyImage, HSCImage, GaiaImage, survey_image)
from mmfm.simulate import SimConfig, simulate_dataset, astro_sources
from mmfm.align import SurveyAligner, reproject_cube


def cube(survey, n=None, seed=0):
    info = survey_info(survey)
    n = n or info.stamp_size
    return np.random.default_rng(seed).normal(size=(info.n_bands, n, n)).astype(np.float32) * info.pixel_noise[:, None, None].astype(np.float32)


def write_raw(path, data, header):
    fits.PrimaryHDU(data, header=header).writeto(path, overwrite=True)
    return path


@pytest.mark.parametrize("survey", ["legacy", "hsc", "gaia"])
def test_good_cutout_loads(tmp_path, survey):
    c = cube(survey)
    p = write_survey_cutout(tmp_path / "ok.fits", c, survey, 150.0, 2.0, "g0")
    flux, header = load_survey_cutout(p, survey, sample_id="g0")
    np.testing.assert_array_equal(flux, c)


def test_wrong_number_of_bands(tmp_path):
    h = cutout_header("hsc", 150.0, 2.0, 50)
    p = write_raw(tmp_path / "four.fits", cube("hsc")[:4], h)
    with pytest.raises(SurveyDataError, match=r"sample 'g1', HSC-SSP Wide \(hsc\): expected a \[5, y, x\] cube \(g, r, i, z, y\), got data of shape \(4, 50, 50\)"):
        load_survey_cutout(p, "hsc", sample_id="g1")
    with pytest.raises(ModalityError, match=r"HSCImage.flux: expected Float tensor of shape \(batch, 5, height, width\)"):
        HSCImage(flux=torch.zeros(1, 4, 50, 50))
    with pytest.raises(ValueError, match="cannot|expected"):
        write_survey_cutout(tmp_path / "x.fits", cube("hsc")[:4], "hsc", 150.0, 2.0, "g1")


def test_bands_in_another_order(tmp_path):
    h = cutout_header("legacy", 150.0, 2.0, 32)
    h["BANDS"] = "z,i,r,g"
    p = write_raw(tmp_path / "swap.fits", cube("legacy"), h)
    with pytest.raises(SurveyDataError, match=r"sample 'g2', Legacy Surveys \(legacy\): header BANDS \('z', 'i', 'r', 'g'\) \(the same bands in another order\)"):
        load_survey_cutout(p, "legacy", sample_id="g2")
    h["BANDS"] = "u,g,r,i"
    write_raw(p, cube("legacy"), h)
    with pytest.raises(SurveyDataError, match=r"\(other bands\); expected \('g', 'r', 'i', 'z'\)"):
        load_survey_cutout(p, "legacy", sample_id="g2")
    with pytest.raises(ModalityError, match="the same bands in another order"):
        LegacySurveyImage(flux=torch.zeros(1, 4, 8, 8), bands=("z", "i", "r", "g"))
    with pytest.raises(ModalityError, match="GaiaImage.bands"):
        GaiaImage(flux=torch.zeros(1, 3, 8, 8), bands=("G", "BP", "RP"))


def test_fits_without_wcs(tmp_path):
    h = cutout_header("hsc", 150.0, 2.0, 50)
    for k in list(h):
        if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD", "PC", "CDELT", "CUNIT", "WCSAXES", "LONPOLE", "LATPOLE", "RADESYS", "MJDREF")):
            del h[k]
    p = write_raw(tmp_path / "nowcs.fits", cube("hsc"), h)
    with pytest.raises(SurveyDataError, match=r"sample 'g3', HSC-SSP Wide \(hsc\): no celestial TAN WCS in the header"):
        load_survey_cutout(p, "hsc", sample_id="g3")


def test_wcs_with_wrong_pixel_scale(tmp_path):
    h = cutout_header("legacy", 150.0, 2.0, 32)
    for k in ("PC1_1", "PC2_2", "CD1_1", "CD2_2"):
        if k in h: h[k] = h[k] * 2
    p = write_raw(tmp_path / "scale.fits", cube("legacy"), h)
    with pytest.raises(SurveyDataError, match=r"sample 'g4', Legacy Surveys \(legacy\): WCS pixel scale 0.5240″ × 0.5240″ \(x × y\), but Legacy Surveys has square pixels of 0.262″ × 0.262″ \[.*scale.fits\]"):
        load_survey_cutout(p, "legacy", sample_id="g4")


def test_unexpected_units(tmp_path):
    h = cutout_header("hsc", 150.0, 2.0, 50)
    h["BUNIT"] = "nanomaggy"
    p = write_raw(tmp_path / "units.fits", cube("hsc"), h)
    with pytest.raises(SurveyDataError, match=r"sample 'g5', HSC-SSP Wide \(hsc\): unexpected flux unit BUNIT='nanomaggy'; expected 'count'"):
        load_survey_cutout(p, "hsc", sample_id="g5")
    h["BUNIT"] = "count"
    h["MAGZP_i"] = 22.5
    write_raw(p, cube("hsc"), h)
    with pytest.raises(SurveyDataError, match=r"MAGZP_i=22.5 but HSC-SSP Wide has zeropoint 27.0 in i"):
        load_survey_cutout(p, "hsc", sample_id="g5")


def test_wrong_survey_in_header(tmp_path):
    p = write_survey_cutout(tmp_path / "gaia.fits", cube("gaia"), "gaia", 150.0, 2.0, "g6")
    with pytest.raises(SurveyDataError, match=r"sample 'g6', Legacy Surveys \(legacy\): the header says survey 'gaia'"):
        load_survey_cutout(p, "legacy", sample_id="g6")


def test_wrong_size(tmp_path):
    p = write_survey_cutout(tmp_path / "small.fits", cube("legacy", n=30), "legacy", 150.0, 2.0, "g7")
    with pytest.raises(SurveyDataError, match=r"sample 'g7', Legacy Surveys \(legacy\): expected 32×32 pixels, got 30×30"):
        load_survey_cutout(p, "legacy", sample_id="g7")
    assert load_survey_cutout(p, "legacy", sample_id="g7", size=30).flux.shape == (4, 30, 30)
    assert load_survey_cutout(p, "legacy", sample_id="g7", size=0).flux.shape == (4, 30, 30)


def test_not_fits_and_missing(tmp_path):
    p = tmp_path / "junk.fits"
    p.write_bytes(b"this is not a FITS file" * 200)
    with pytest.raises(SurveyDataError, match=r"sample 'g8', Gaia \(image stand-in\) \(gaia\): not a readable FITS file"):
        load_survey_cutout(p, "gaia", sample_id="g8")
    with pytest.raises(FileNotFoundError, match=r"sample 'g9', Gaia \(image stand-in\) \(gaia\): cutout file not found"):
        load_survey_cutout(tmp_path / "absent.fits", "gaia", sample_id="g9")


def test_infinite_pixels(tmp_path):
    c = cube("gaia"); c[1, 3, 3] = np.inf
    p = write_survey_cutout(tmp_path / "inf.fits", c, "gaia", 150.0, 2.0, "g10")
    with pytest.raises(SurveyDataError, match=r"sample 'g10', .*infinite pixel values"):
        load_survey_cutout(p, "gaia", sample_id="g10")
    with pytest.raises(ModalityError, match=r"GaiaImage.flux: infinite pixel values \(band G of sample 'g10'\)"):
        survey_image("gaia", c, metadata={"id": "g10"})


def test_all_nan_is_an_error(tmp_path):
    c = np.full_like(cube("hsc"), np.nan)
    p = write_survey_cutout(tmp_path / "nan.fits", c, "hsc", 150.0, 2.0, "g11")
    with pytest.raises(SurveyDataError, match=r"sample 'g11', HSC-SSP Wide \(hsc\): every pixel is NaN \(masked\) in every band"):
        load_survey_cutout(p, "hsc", sample_id="g11")
    with pytest.raises(SurveyDataError, match=r"every pixel is NaN \(masked\) in every band of sample\(s\) \['g11'\]"):
        SurveyPreprocessor("hsc")(torch.from_numpy(c)[None], ids=["g11"])


def test_partly_nan_is_masked_end_to_end(tmp_path):
    "Partly masked cutouts load, keep NaN (never 0), preprocess with a mask, invert with NaN, and align with a mask."
    c = cube("hsc"); c[:, 10:20, 30:40] = np.nan; c[4] = np.nan          # a masked block, and a whole missing band
    p = write_survey_cutout(tmp_path / "part.fits", c, "hsc", 150.0, 2.0, "g12")
    flux, header = load_survey_cutout(p, "hsc", sample_id="g12")
    assert np.isnan(flux).sum() == np.isnan(c).sum()
    img = survey_image("hsc", flux, metadata={"id": "g12"})
    assert (~img.valid).sum() == np.isnan(c).sum()
    pre = SurveyPreprocessor("hsc")
    x, valid = pre(img.flux)
    assert torch.equal(valid, img.valid) and torch.isfinite(x).all() and (x[~valid] == 0).all()
    back = pre.inverse(x, valid)
    assert torch.equal(torch.isnan(back), ~valid)
    torch.testing.assert_close(back[valid], img.flux[valid], rtol=1e-5, atol=1e-7)
    out = SurveyAligner("legacy").align(flux, load_survey_cutout(p, "hsc").wcs)
    assert np.array_equal(np.isnan(out.flux), ~out.valid)
    assert not out.valid[4].any() and out.valid[0].sum() > 0.8 * out.valid[0].size
    assert (~out.valid[0]).sum() > 0


def test_preprocessing_never_modifies_input():
    x = torch.from_numpy(cube("legacy"))[None].clone()
    x[0, 0, 0, 0] = float("nan")
    before = x.clone()
    pre = SurveyPreprocessor("legacy")
    out = pre(x)
    pre.inverse(out.x, out.valid)
    assert torch.equal(torch.nan_to_num(x, 123.0), torch.nan_to_num(before, 123.0))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("astro_bad")
    simulate_dataset(root, SimConfig(n_galaxies=12, seed=5))
    return root


def test_manifest_entry_pointing_to_missing_cutout(small_set, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(small_set, root)
    samples = json.loads((root / "manifest.json").read_text())["samples"]
    victim = next(s for s in samples if "hsc_image" in s)
    (root / victim["hsc_image"]).unlink()
    with pytest.raises(DataError, match=rf"sample '{victim['id']}', source 'hsc_image': missing file"):
        MultiSourceDataset(root, "manifest.json", astro_sources())
    with pytest.warns(UserWarning, match=rf"skipped 1 bad sample.*{victim['id']}"):
        ds = MultiSourceDataset(root, "manifest.json", astro_sources(), on_error="skip")
    assert victim["id"] not in ds.ids and len(ds) == len(samples) - 1


def test_manifest_entry_with_a_corrupt_cutout(small_set, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(small_set, root)
    samples = json.loads((root / "manifest.json").read_text())["samples"]
    i, victim = next((i, s) for i, s in enumerate(samples) if "legacy_image" in s)
    h = cutout_header("legacy", 150.0, 2.0, 32); h["BUNIT"] = "count"
    write_raw(root / victim["legacy_image"], cube("legacy"), h)
    ds = MultiSourceDataset(root, "manifest.json", astro_sources())
    with pytest.raises(DataError, match=rf"sample '{victim['id']}', source 'legacy_image': .*Legacy Surveys \(legacy\): unexpected flux unit"):
        ds[i]
