"""One strictness for survey images whatever the loader, and a band that was never observed carried as absent.

Every fault names the sample, the survey, the band or header key and the file; a wholly NaN band is accepted as
"not observed" and stays NaN through preprocessing, the image codecs and the metrics; an image with no observed
band is refused, from a file and in memory alike."""
import re
import numpy as np
import pytest
import torch
from astropy.io import fits

from mmfm.codec import CodecError
from mmfm.data import DataError, MultiSourceDataset, Source
from mmfm.modality import ModalityError
from mmfm.surveys import (SURVEY_IMAGES, SurveyDataError, SurveyImageLoader, SurveyPreprocessor, cutout_header,
                          image_modality, load_survey_cutout, survey_image, survey_info, write_survey_cutout)
from mmfm.image_codecs import (ABSENT_FLUX_TOKEN, SURVEY_IMAGE_CODECS, MultiSurveyImage, SharedImageCodec,
                               image_metrics)

SURVEYS3 = ("legacy", "hsc", "gaia")


def cube(survey, seed=0):
    "A noise cube of the survey's stamp, with a bright source in the centre (finite aperture flux)."
    info = survey_info(survey)
    n = info.stamp_size
    sig = info.pixel_noise.astype(np.float32)[:, None, None]
    c = np.random.default_rng(seed).normal(size=(info.n_bands, n, n)).astype(np.float32) * sig
    c[:, n // 2 - 1:n // 2 + 1, n // 2 - 1:n // 2 + 1] += 50 * sig
    return c


def cd_header(survey, cd_arcsec):
    "A cutout header whose WCS is the CD matrix `cd_arcsec` (arcsec per pixel) instead of PC + CDELT."
    h = cutout_header(survey, 150.0, 2.0, survey_info(survey).stamp_size)
    for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2"):
        if k in h: del h[k]
    for (i, j), v in np.ndenumerate(np.asarray(cd_arcsec, dtype=float) / 3600):
        h[f"CD{i + 1}_{j + 1}"] = v
    return h


def _rot(scale, a_deg, b_deg):
    "CD matrix whose pixel axes point at angles a and b (degrees from west, on the sky), each `scale` arcsec long."
    a, b = np.radians(a_deg), np.radians(b_deg)
    return scale * np.array([[np.cos(a), np.cos(b)], [np.sin(a), np.sin(b)]])


def _edit(**keys):
    def f(h):
        for k, v in keys.items():
            if v is None: del h[k]
            else: h[k] = v
    return f


def _nan_all(c): c[:] = np.nan


def _inf_in(band):
    def f(c, survey):
        c[survey_info(survey).band_index(band), 3, 4] = np.inf
    return f


# (case id, survey, header or header edit, data edit, exception, fragments the message must hold)
FILE_FAULTS = [
    ("legacy-area-right-axes-wrong", "legacy", cd_header("legacy", [[-0.393, 0], [0, 0.175]]), None,
     SurveyDataError, ["WCS pixel scale 0.3930″ × 0.1750″ (x × y)", "square pixels of 0.262″ × 0.262″"]),
    ("hsc-one-axis-off", "hsc", cd_header("hsc", [[-0.168, 0], [0, 0.170]]), None,
     SurveyDataError, ["WCS pixel scale 0.1680″ × 0.1700″", "0.168″ × 0.168″"]),
    ("gaia-twice-the-scale", "gaia", cd_header("gaia", [[-1.4, 0], [0, 1.4]]), None,
     SurveyDataError, ["WCS pixel scale 1.4000″ × 1.4000″", "0.7″ × 0.7″"]),
    ("legacy-sheared-cd", "legacy", cd_header("legacy", _rot(0.262, 180, 80)), None,
     SurveyDataError, ["WCS pixel axes at 100.000° instead of 90°", "sheared CD matrix"]),
    ("hsc-skewed-cd", "hsc", cd_header("hsc", _rot(0.168, 190, 95)), None,
     SurveyDataError, ["WCS pixel axes at 95.000° instead of 90°"]),
    ("gaia-wrong-bunit", "gaia", _edit(BUNIT="nanomaggy"), None,
     SurveyDataError, ["unexpected flux unit BUNIT='nanomaggy'; expected 'electron/s'"]),
    ("legacy-missing-bunit", "legacy", _edit(BUNIT=None), None,
     SurveyDataError, ["missing flux unit BUNIT; expected 'nanomaggy'"]),
    ("hsc-other-bands", "hsc", _edit(BANDS="g,r,i,z,N921"), None,
     SurveyDataError, ["header BANDS ('g', 'r', 'i', 'z', 'N921') (other bands)"]),
    ("gaia-bands-reordered", "gaia", _edit(BANDS="G,BP,RP"), None,
     SurveyDataError, ["(the same bands in another order); expected ('BP', 'G', 'RP')"]),
    ("legacy-wrong-zeropoint", "legacy", _edit(MAGZP_z=27.0), None,
     SurveyDataError, ["MAGZP_z=27.0 but Legacy Surveys has zeropoint 22.5 in z"]),
    ("hsc-says-legacy", "hsc", _edit(SURVEY="legacy"), None,
     SurveyDataError, ["the header says survey 'legacy'"]),
    ("legacy-all-nan", "legacy", None, lambda c, s: _nan_all(c),
     SurveyDataError, ["every pixel is NaN (masked) in every band of sample(s) ['{sid}']"]),
    ("hsc-inf-in-i", "hsc", None, _inf_in("i"),
     SurveyDataError, ["infinite pixel values (band i of sample '{sid}')"]),
    ("gaia-inf-in-RP", "gaia", None, _inf_in("RP"),
     SurveyDataError, ["infinite pixel values (band RP of sample '{sid}')"]),
]


@pytest.mark.parametrize("case, survey, header, edit, exc, fragments", FILE_FAULTS, ids=[f[0] for f in FILE_FAULTS])
def test_bad_cutout_file_names_sample_survey_fault_and_file(tmp_path, case, survey, header, edit, exc, fragments):
    info, sid = survey_info(survey), f"s-{case}"
    data = cube(survey)
    h = cutout_header(survey, 150.0, 2.0, info.stamp_size)
    if isinstance(header, fits.Header): h = header.copy()
    elif header is not None: header(h)
    if edit is not None: edit(data, survey)
    path = tmp_path / f"{case}.fits"
    fits.PrimaryHDU(data, header=h).writeto(path)
    with pytest.raises(exc) as e:
        load_survey_cutout(path, survey, sample_id=sid)
    msg = str(e.value)
    assert msg.startswith(f"sample '{sid}', {info.title} ({survey}): "), msg
    assert msg.endswith(f"[{path}]"), msg
    for frag in fragments: assert frag.format(sid=sid) in msg, (frag, msg)


def test_wrong_band_count_in_the_data(tmp_path):
    path = tmp_path / "three.fits"
    fits.PrimaryHDU(cube("legacy")[:3], header=cutout_header("legacy", 150.0, 2.0, 32)).writeto(path)
    with pytest.raises(SurveyDataError, match=re.escape("sample 'b1', Legacy Surveys (legacy): expected a [4, y, x] "
                                                        "cube (g, r, i, z), got data of shape (3, 32, 32)")):
        load_survey_cutout(path, "legacy", sample_id="b1")
    with pytest.raises(ModalityError, match=re.escape("LegacySurveyImage.flux: expected Float tensor of shape "
                                                      "(batch, 4, height, width)")):
        survey_image("legacy", cube("legacy")[:3], metadata={"id": "b1"})


@pytest.mark.parametrize("survey, angle", [("legacy", 30.0), ("hsc", -90.0), ("gaia", 180.0)])
def test_rotated_square_pixels_are_accepted(tmp_path, survey, angle):
    s = survey_info(survey).pixel_scale_arcsec
    path = tmp_path / "rot.fits"
    fits.PrimaryHDU(cube(survey), header=cd_header(survey, _rot(s, 180 + angle, 90 + angle))).writeto(path)
    assert load_survey_cutout(path, survey, sample_id="r").flux.shape[0] == survey_info(survey).n_bands


@pytest.mark.parametrize("survey", SURVEYS3)
def test_big_endian_fits_data_are_accepted_and_converted(tmp_path, survey):
    c = cube(survey)
    path = tmp_path / "be.fits"
    fits.PrimaryHDU(c.astype(">f4"), header=cutout_header(survey, 150.0, 2.0, c.shape[-1])).writeto(path)
    with fits.open(path) as hdul: assert hdul[0].data.dtype.byteorder == ">"       # FITS is big-endian
    flux = load_survey_cutout(path, survey, sample_id="be").flux
    assert flux.dtype == np.dtype(np.float32) and flux.dtype.isnative
    np.testing.assert_array_equal(flux, c)
    img = survey_image(survey, c.astype(">f4"), metadata={"id": "be"})           # in memory too
    assert img.flux.dtype == torch.float32 and torch.equal(img.flux[0], torch.from_numpy(c))


@pytest.mark.parametrize("survey, band", [("legacy", "z"), ("hsc", "g"), ("gaia", "BP")])
def test_one_band_not_observed_is_accepted_and_marked_absent(tmp_path, survey, band):
    info = survey_info(survey)
    k = info.band_index(band)
    c = cube(survey); c[k] = np.nan
    path = write_survey_cutout(tmp_path / "one.fits", c, survey, 150.0, 2.0, "one")
    flux = load_survey_cutout(path, survey, sample_id="one").flux
    img = survey_image(survey, flux, metadata={"id": "one"})
    assert img.band_present[0].tolist() == [b != band for b in info.bands]
    x, valid = SurveyPreprocessor(survey)(img.flux, ids=["one"])
    assert not valid[0, k].any() and (x[0, k] == 0).all()                      # masked, never a value
    assert torch.isnan(SurveyPreprocessor(survey).inverse(x, valid)[0, k]).all()


@pytest.mark.parametrize("survey", SURVEYS3)
def test_in_memory_image_meets_the_file_rules(survey):
    info, cls = survey_info(survey), image_modality(survey).__name__
    nothing = np.full((2, info.n_bands, 8, 8), np.nan, np.float32); nothing[1] = 1.0
    with pytest.raises(ModalityError, match=re.escape(f"{cls}.flux: every pixel is NaN (masked) in every band of "
                                                      "sample(s) ['m0']")):
        survey_image(survey, nothing, metadata={"per_sample": [{"id": "m0"}, {"id": "m1"}]})
    hot = np.ones((1, info.n_bands, 8, 8), np.float32); hot[0, -1, 2, 2] = -np.inf
    with pytest.raises(ModalityError, match=re.escape(f"{cls}.flux: infinite pixel values (band {info.bands[-1]} "
                                                      "of sample 'm2')")):
        survey_image(survey, hot, metadata={"id": "m2"})


@pytest.mark.parametrize("survey", SURVEYS3)
def test_default_loader_is_the_strict_loader(tmp_path, survey):
    mod = SURVEY_IMAGES[survey]
    loader = mod.default_loader()
    assert isinstance(loader, SurveyImageLoader) and loader.survey == survey
    s = survey_info(survey).pixel_scale_arcsec
    (tmp_path / "c").mkdir()
    fits.PrimaryHDU(cube(survey), header=cd_header(survey, [[-1.5 * s, 0], [0, s / 1.5]])).writeto(tmp_path / "c/x.fits")
    ds = MultiSourceDataset(tmp_path, [{"id": "d1", f"{survey}_image": "c/x.fits"}],
                            [Source(f"{survey}_image", mod, mod.default_loader())])
    with pytest.raises(DataError, match=rf"sample 'd1', source '{survey}_image': .*WCS pixel scale .*x.fits"):
        ds[0]


@pytest.fixture(scope="module")
def codecs():
    torch.manual_seed(0)
    return {s: SURVEY_IMAGE_CODECS[s](hidden=8, depth=1).eval() for s in SURVEYS3}


@pytest.mark.parametrize("survey, band", [("legacy", "z"), ("legacy", "g"), ("hsc", "y"), ("gaia", "G")])
def test_band_not_observed_through_the_codec(codecs, survey, band):
    info, codec = survey_info(survey), codecs[survey]
    k = info.band_index(band)
    flux = np.stack([cube(survey, seed) for seed in range(3)]); flux[1, k] = np.nan
    img = survey_image(survey, flux, metadata={"per_sample": [{"id": f"c{i}"} for i in range(3)]})
    tokens = codec.encode(img)
    nb = info.n_bands
    assert tokens[1, k] == ABSENT_FLUX_TOKEN                                     # not observed: token 0
    others = torch.ones(3, nb, dtype=torch.bool); others[1, k] = False
    assert (tokens[:, :nb][others] != ABSENT_FLUX_TOKEN).all()                 # a real flux never encodes to 0
    out = codec.decode(tokens).flux
    assert torch.isnan(out[1, k]).all()                                        # absent, not the decoder's guess
    assert torch.isfinite(out[others]).all()
    again = tokens.clone(); again[0, k] = ABSENT_FLUX_TOKEN                    # a 0 placed in a flux slot
    assert torch.isnan(codec.decode(again).flux[0, k]).all()


def test_every_band_absent_in_tokens_is_refused(codecs):
    codec = codecs["gaia"]
    tokens = codec.encode(survey_image("gaia", np.stack([cube("gaia"), cube("gaia", 1)])))
    tokens[1, :3] = ABSENT_FLUX_TOKEN
    with pytest.raises(CodecError, match=re.escape("GaiaImageCodec.decode: every band is marked absent in row(s) [1]")):
        codec.decode(tokens)


def test_flux_below_the_range_is_refused_not_mapped_to_the_absent_token(codecs):
    codec = codecs["legacy"]
    assert codec.flux_to_tokens(torch.tensor([[-100.0, 0.0, 1e8, 5.0]])).min() == 1
    with pytest.raises(CodecError, match=r"sample 'q', band g: aperture flux -101 σ is outside flux_snr_range"):
        codec.flux_to_tokens(torch.tensor([[-101.0, 0.0, 1.0, 1.0]]), ids=["q"])


def test_shared_codec_carries_absent_surveys(codecs):
    torch.manual_seed(0)
    shared = SharedImageCodec(hidden=8, depth=1).eval()
    flux = torch.full((2, 12, 32, 32), float("nan"))
    flux[:, :4] = torch.from_numpy(np.stack([cube("legacy"), cube("legacy", 1)]))   # Legacy only
    tokens = shared.encode(MultiSurveyImage(flux=flux))
    assert (tokens[:, 4:12] == ABSENT_FLUX_TOKEN).all() and (tokens[:, :4] != ABSENT_FLUX_TOKEN).all()
    back = shared.decode(tokens)
    assert back.band_present.tolist() == [[True] * 4 + [False] * 8] * 2


def test_metrics_skip_absent_bands():
    rng = np.random.default_rng(0)
    truth = np.zeros((4, 4, 32, 32)); truth[:, :, 14:18, 14:18] = 100.0
    sigma = np.ones(4)
    noisy = truth + rng.normal(size=truth.shape)
    noisy[:, 3] = np.nan                                                        # z observed nowhere
    decoded = truth.copy(); decoded[:, 3] = np.nan; decoded[0, 1] = np.nan      # r decoded absent in sample 0
    table = image_metrics(decoded, truth, noisy, sigma, 0.262, "griz").set_index("band")
    assert list(table.index) == ["g", "r", "i"]
    assert (table.loc["r", "n"], table.loc["r", "n_decoded_absent"]) == (3, 1)
    assert table["rms_over_sigma"].notna().all()
