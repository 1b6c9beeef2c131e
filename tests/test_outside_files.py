"""Files a user brings from elsewhere: what an outside writer can get wrong is refused or handled, never misread."""
import json
import numpy as np
import pytest
from astropy.io import fits
from mmfm.align import SurveyAligner
from mmfm.data import DataError
from mmfm.files import FileFormatError
from mmfm.shards import read_shard_index, INDEX_FILE
from mmfm.simulate import SimConfig, simulate_shards
from mmfm.surveys import (SurveyDataError, cutout_header, cutout_wcs, load_survey_cutout, survey_info,
                          spectrum_modality, SpectrumLoader, write_spectra, spectrograph_info)


def test_float64_pixels_beyond_float32_are_named_as_such(tmp_path):
    info = survey_info("legacy"); n = info.stamp_size
    c = np.zeros((info.n_bands, n, n)); c[1, 3, 3] = 1e40                    # finite in float64, not in float32
    path = tmp_path / "big.fits"
    fits.PrimaryHDU(c, header=cutout_header("legacy", 150.0, 2.0, n)).writeto(path)
    with pytest.raises(SurveyDataError, match="1 finite pixel value\\(s\\) beyond float32's range"):
        load_survey_cutout(path, "legacy", sample_id="g1")


def test_the_aligner_centres_on_the_central_pixel_not_on_crval():
    "The same pixels on the same sky grid, with the reference pixel at the centre or at a corner: the same result."
    w = cutout_wcs("hsc", 10.0, 20.0, 48)
    corner = w.deepcopy()
    corner.wcs.crpix = [1, 1]; corner.wcs.crval = w.wcs_pix2world([[0, 0]], 0)[0]; corner.wcs.set()
    img = np.random.default_rng(0).normal(size=(5, 48, 48)).astype(np.float32)
    a, b = SurveyAligner("legacy").align(img, w), SurveyAligner("legacy").align(img, corner)
    assert a.valid.mean() > 0.8 and np.array_equal(a.valid, b.valid)
    np.testing.assert_allclose(a.flux[a.valid], b.flux[b.valid], atol=5e-3)   # tangent points differ slightly


def test_spectra_with_fewer_ids_than_rows_are_refused_when_bound(tmp_path):
    DESI = spectrum_modality("desi")
    n = DESI.length
    write_spectra(tmp_path / "spectra" / "desi.npy", np.ones((3, n)), np.ones((3, n)), "desi", ["a", "b", "c"])
    side = tmp_path / "spectra" / "desi.json"
    d = json.loads(side.read_text()); d["ids"] = ["a", "b"]; side.write_text(json.dumps(d))
    with pytest.raises(DataError, match="lists 2 ids for 3 spectra"):
        SpectrumLoader("spectra/desi.npy").bind(tmp_path, DESI)


def test_a_shard_index_whose_entries_miss_rows_is_refused(tmp_path):
    simulate_shards(tmp_path / "s", SimConfig(n_galaxies=6, seed=0), shard_size=3)
    index = json.loads((tmp_path / "s" / INDEX_FILE).read_text())
    index["shards"] = index["shards"][:1]                                   # an entry removed by hand
    (tmp_path / "s" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FileFormatError, match="hold 3 rows but the index records 6"):
        read_shard_index(tmp_path / "s")
