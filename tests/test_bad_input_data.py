"""Every bad input stopped at the door with a message that names it (issue 14, kinds 1, 2 and 7).

Kind 1, files: whatever the OS, numpy, pandas or astropy raise while a file is read reaches the user as a
`DataError` naming the sample, the source and the file (`mmfm.data.reading`). Kind 2, numbers: every float field
passes `mmfm.modality.as_float32`, which converts (any byte order, float64, integers) or refuses with a
`ModalityError` naming the class and field. Kind 7, manifests: surprises (a key twice, ids that differ only
invisibly, an empty result, a non-string split...) are refused, never resolved silently.

The battery below asserts the exception type and what each message names; the hypothesis tests feed random
manifests, random file bytes and random presence patterns and accept only the library's documented errors.
"""
import json, os
import numpy as np
import pandas as pd
import pytest
import torch
from astropy.io import fits
from hypothesis import given, settings, HealthCheck, strategies as st

from mmfm.modality import ModalityError, as_float32
from mmfm.data import (DataError, MultiSourceDataset, Source, TableLoader, NpyLoader, FitsLoader, ArrayRowLoader,
                       Sample, collate, read_manifest, multi_survey_dataset)
from mmfm.testing import ToyTable, ToyImage, ToySeries, toy_table, toy_image, toy_series, toy_manager

N = 3
IMG, SER = toy_image(N, seed=1), toy_series(N, seed=1)
SAMPLES = [{"id": f"s{i}", "split": "test" if i == 2 else "train", "patients_row": i,
            "image": f"img/s{i}.npy", "series": f"ser/s{i}.npy"} for i in range(N)]


def write_root(root):
    "A small data root: a CSV table, .npy images and series, FITS images, one array of series rows."
    pd.DataFrame(toy_table(N, seed=1).as_matrix().numpy(), columns=list(ToyTable.columns)).to_csv(
        root / "patients.csv", index=False)
    (root / "img").mkdir(); (root / "ser").mkdir()
    for i in range(N):
        np.save(root / f"img/s{i}.npy", IMG.flux[i].numpy()); np.save(root / f"ser/s{i}.npy", SER.signal[i].numpy())
        fits.PrimaryHDU(IMG.flux[i].numpy()).writeto(root / f"img/s{i}.fits")
    np.save(root / "arr.npy", SER.signal.numpy())
    (root / "m.json").write_text(json.dumps({"samples": SAMPLES}))
    return root


def sources(table="patients.csv"):
    return [Source("patients_row", ToyTable, TableLoader(table)),
            Source("image", ToyImage, NpyLoader("flux", allow_nan=True)),
            Source("series", ToySeries, NpyLoader("signal"))]


def dataset(root, samples=None, srcs=None, **kw):
    return MultiSourceDataset(root, "m.json" if samples is None else samples, srcs or sources(), **kw)


def changed(change):
    "A copy of SAMPLES with `change(samples)` applied."
    s = [dict(x) for x in SAMPLES]; change(s); return s


def load_all(ds):
    return [ds[i] for i in range(len(ds))]


def after_write(path, write, then):
    "Write a file under the root, then return the action `then(root)` that should fail."
    def make(root):
        write(root / path); return lambda: then(root)
    return make


def npy_case(data_writer, srcs=None):
    return after_write("img/s1.npy", data_writer, lambda root: load_all(dataset(root, srcs=srcs)))


def fits_ds(root, **loader_kw):
    samples = [{"id": f"s{i}", "image": f"img/s{i}.fits"} for i in range(N)]
    if loader_kw: return MultiSourceDataset(root, samples, [Source("image", ToyImage, FitsLoader(**loader_kw))])
    return multi_survey_dataset(root, samples, {"image": ToyImage})


def array_ds(root):
    samples = [{"id": f"s{i}", "series_row": i} for i in range(N)]
    return MultiSourceDataset(root, samples, [Source("series_row", ToySeries, ArrayRowLoader("arr.npy"))])


def manifest_text(text):
    "A manifest file holding `text` (str or bytes)."
    def make(root):
        p = root / "m.json"
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        return lambda: dataset(root)
    return make


def bad_samples(change, **kw): return lambda root: (lambda: dataset(root, changed(change), **kw))


def symlink_loop(p): p.unlink(missing_ok=True); p.symlink_to(p)
def make_dir(p): p.unlink(missing_ok=True); p.mkdir()
def npy_header(descr, shape, payload=b""):
    "The bytes of an .npy file of version 1.0 with this header and payload."
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload


def csv_case(text): return after_write("patients.csv", lambda p: p.write_text(text), lambda root: load_all(dataset(root)))


IMG_FILE = ["sample 's1'", "source 'image'", "img/s1.npy"]
TABLE = ["source 'patients_row'", "patients.csv"]

CASES = [
    # ---- kind 1: files -------------------------------------------------------------------------------------------
    ("symlink loop", npy_case(symlink_loop), DataError, IMG_FILE + ["RuntimeError: Symlink loop"]),
    ("directory for file", npy_case(make_dir), DataError, IMG_FILE + ["is a directory"]),
    ("missing file", npy_case(lambda p: p.unlink()), DataError, IMG_FILE + ["missing file"]),
    ("path escapes root", bad_samples(lambda s: s[1].update(image="../x.npy")), DataError,
     ["sample 's1'", "source 'image'", "'../x.npy' is outside data_root"]),
    ("absolute path", bad_samples(lambda s: s[1].update(image="/etc/passwd")), DataError,
     ["sample 's1'", "source 'image'", "'/etc/passwd' is outside data_root"]),
    ("NUL in path", bad_samples(lambda s: s[1].update(image="img/s\x001.npy")), DataError,
     ["sample 's1'", "source 'image'", "embedded null byte"]),
    ("path not a string", bad_samples(lambda s: s[1].update(image=3)), DataError,
     ["sample 's1'", "source 'image'", "expected a relative file path, got 3"]),
    ("zero-byte npy", npy_case(lambda p: p.write_bytes(b"")), DataError, IMG_FILE + ["EOFError"]),
    ("garbage npy", npy_case(lambda p: p.write_bytes(b"\x93NUMPY\x01\x00garbage")), DataError,
     IMG_FILE + ["cannot read"]),
    ("truncated npy", npy_case(lambda p: p.write_bytes(npy_header("<f4", (4, 16, 16), b"\0" * 10))), DataError,
     IMG_FILE + ["cannot read"]),
    ("text as npy", npy_case(lambda p: p.write_text("not an array")), DataError, IMG_FILE + ["ValueError"]),
    ("object array npy", npy_case(lambda p: np.save(p, np.array([None] * 4, dtype=object))), DataError,
     IMG_FILE + ["ValueError", "pickle"]),
    ("npz for npy", npy_case(lambda p: p.write_bytes(_npz_bytes())), DataError, IMG_FILE + [".npz archive"]),
    ("zip-looking npy", npy_case(lambda p: p.write_bytes(b"PK\x03\x04zzzz")), DataError,
     IMG_FILE + ["BadZipFile"]),
    ("zero-byte csv", csv_case(""), DataError, TABLE + ["EmptyDataError"]),
    ("malformed csv row", csv_case("age,sex,bmi\n1,2,3\n4,5,6,7,8\n"), DataError, TABLE + ["ParserError"]),
    ("csv not utf-8", after_write("patients.csv", lambda p: p.write_bytes(b"age,sex,bmi\n\xff\xfe,1,2\n"),
                                  lambda root: dataset(root)), DataError, TABLE + ["UnicodeDecodeError"]),
    ("csv is a directory", after_write("patients.csv", make_dir, lambda root: dataset(root)), DataError,
     TABLE + ["is a directory"]),
    ("csv symlink loop", after_write("patients.csv", symlink_loop, lambda root: dataset(root)), DataError,
     TABLE + ["Symlink loop"]),
    ("csv missing column", csv_case("age,sex\n1,0\n2,1\n3,0\n"), DataError,
     TABLE + ["missing declared column(s) ['bmi']"]),
    ("csv row out of range", bad_samples(lambda s: s[1].update(patients_row=7)), DataError,
     ["sample 's1'", "source 'patients_row'", "row 7 out of range", "patients.csv"]),
    ("csv row index a float", bad_samples(lambda s: s[1].update(patients_row=1.0)), DataError,
     ["sample 's1'", "source 'patients_row'", "row index must be an integer"]),
    ("csv row index a bool", bad_samples(lambda s: s[1].update(patients_row=True)), DataError,
     ["sample 's1'", "source 'patients_row'", "row index must be an integer"]),
    ("csv missing cell", csv_case("age,sex,bmi\n1,0,20\n2,1,\n3,0,22\n"), DataError,
     ["sample 's1'", "source 'patients_row'", "missing (NaN) cell in column 'bmi' of patients.csv row 1"]),
    ("csv non-numeric cell", csv_case("age,sex,bmi\n1,0,20\nunknown,1,21\n3,0,22\n"), DataError,
     ["sample 's1'", "source 'patients_row'", "non-numeric cell 'unknown' in column 'age' of patients.csv"]),
    ("csv infinite cell", csv_case("age,sex,bmi\n1,0,20\n2,1,inf\n3,0,22\n"), DataError,
     ["sample 's1'", "source 'patients_row'", "infinite cell inf in column 'bmi'"]),
    ("fits not fits", after_write("img/s1.fits", lambda p: p.write_bytes(b"garbage" * 100),
                                  lambda root: load_all(fits_ds(root))), DataError,
     ["sample 's1'", "source 'image'", "img/s1.fits", "OSError"]),
    ("fits zero bytes", after_write("img/s1.fits", lambda p: p.write_bytes(b""),
                                    lambda root: load_all(fits_ds(root))), DataError,
     ["sample 's1'", "source 'image'", "img/s1.fits", "cannot read"]),
    ("fits without image", after_write("img/s1.fits", lambda p: fits.PrimaryHDU().writeto(p, overwrite=True),
                                       lambda root: load_all(fits_ds(root))), DataError,
     ["sample 's1'", "source 'image'", "img/s1.fits", "HDU 0 has no image data"]),
    ("fits hdu out of range", lambda root: (lambda: load_all(fits_ds(root, hdu=3))), DataError,
     ["sample 's0'", "source 'image'", "img/s0.fits", "no HDU 3: the file has 1"]),
    ("array rows corrupt", after_write("arr.npy", lambda p: p.write_bytes(b"\x93NUMPY\x01\x00x"),
                                       lambda root: array_ds(root)), DataError,
     ["source 'series_row'", "arr.npy", "cannot read"]),
    ("array rows 0-d", after_write("arr.npy", lambda p: np.save(p, np.float32(1)), lambda root: array_ds(root)),
     DataError, ["source 'series_row'", "arr.npy", "a 0-d array has no rows"]),
    ("array row with NaN", after_write("arr.npy", lambda p: np.save(p, _with_nan(SER.signal.numpy(), (1, 0, 5))),
                                       lambda root: load_all(array_ds(root))), DataError,
     ["sample 's1'", "source 'series_row'", "ToySeries.signal: 1 NaN or infinite value(s) in 'arr.npy row 1'"]),
    ("wrong shape", npy_case(lambda p: np.save(p, np.zeros((5, 16, 16), np.float32))), DataError,
     IMG_FILE + ["ToyImage.flux: expected Float tensor of shape (batch, 4, height, width)"]),
    # ---- kind 2: numbers ------------------------------------------------------------------------------------------
    ("complex npy", npy_case(lambda p: np.save(p, np.zeros((4, 16, 16), np.complex64))), DataError,
     IMG_FILE + ["ToyImage.flux: complex values (complex64)"]),
    ("bool npy", npy_case(lambda p: np.save(p, np.zeros((4, 16, 16), bool))), DataError,
     IMG_FILE + ["ToyImage.flux: a boolean array (bool)"]),
    ("string npy", npy_case(lambda p: np.save(p, np.full((4, 16, 16), "x"))), DataError,
     IMG_FILE + ["ToyImage.flux: a non-numeric array (dtype <U1)"]),
    ("record npy", npy_case(lambda p: np.save(p, np.zeros((4, 16, 16), [("a", "f4")]))), DataError,
     IMG_FILE + ["ToyImage.flux: a non-numeric array"]),
    ("float64 beyond float32", npy_case(lambda p: np.save(p, _one(np.float64, 1e39))), DataError,
     IMG_FILE + ["ToyImage.flux: 1 finite value(s) beyond float32's range", "1e+39"]),
    ("int beyond 2**24", npy_case(lambda p: np.save(p, _one(np.int64, 2**24 + 1))), DataError,
     IMG_FILE + ["ToyImage.flux: integer 16777217 (int64) would lose precision"]),
    ("NaN where refused", after_write("ser/s1.npy", lambda p: np.save(p, _with_nan(SER.signal[1].numpy(), (0, 5))),
                                      lambda root: load_all(dataset(root))), DataError,
     ["sample 's1'", "source 'series'", "ToySeries.signal: 1 NaN or infinite value(s) in 'ser/s1.npy'"]),
    ("inf in an image", npy_case(lambda p: np.save(p, _one(np.float32, np.inf))), DataError,
     IMG_FILE + ["ToyImage.flux: 1 infinite value(s)"]),
    ("csv cell beyond float32", csv_case("age,sex,bmi\n1,0,20\n1e39,1,21\n3,0,22\n"), DataError,
     ["sample 's1'", "source 'patients_row'", "ToyTable.age: 1 finite value(s) beyond float32's range",
      "patients.csv row 1"]),
    ("modality complex tensor", lambda root: (lambda: ToyImage(flux=torch.zeros(1, 4, 16, 16,
                                                                              dtype=torch.complex64))),
     ModalityError, ["ToyImage.flux: complex values"]),
    ("modality bool tensor", lambda root: (lambda: ToyImage(flux=torch.zeros(1, 4, 16, 16, dtype=torch.bool))),
     ModalityError, ["ToyImage.flux: a boolean array"]),
    ("modality object array", lambda root: (lambda: ToySeries(signal=np.full((1, 1, 64), None))),
     ModalityError, ["ToySeries.signal: a non-numeric array (dtype object)"]),
    ("modality big int", lambda root: (lambda: ToyTable(age=np.array([[2**25 + 1]]), sex=np.zeros((1, 1)),
                                                        bmi=np.zeros((1, 1)))),
     ModalityError, ["ToyTable.age: integer 33554433"]),
    ("modality float64 overflow", lambda root: (lambda: ToyTable(age=np.zeros((1, 1)), sex=np.zeros((1, 1)),
                                                                 bmi=np.array([[-1e300]]))),
     ModalityError, ["ToyTable.bmi: 1 finite value(s) beyond float32's range"]),
    ("modality list", lambda root: (lambda: ToyImage(flux=[[1.0]])), ModalityError, ["ToyImage.flux: expected"]),
    # ---- kind 7: manifests ----------------------------------------------------------------------------------------
    ("key twice in a sample", manifest_text('{"samples": [{"id": "s1", "image": "img/s1.npy", '
                                            '"image": "img/s0.npy"}]}'), DataError,
     ["sample 's1'", "source 'image'", "key 'image' given twice", "m.json"]),
    ("id twice in a sample", manifest_text('{"samples": [{"id": "s1", "id": "s2"}]}'), DataError,
     ["sample 's1'", "source 'id'", "key 'id' given twice", "'s1' and 's2'"]),
    ("samples twice", manifest_text('{"samples": [], "samples": [{"id": "s1"}]}'), DataError,
     ["'<manifest>'", "source 'samples'", "key 'samples' given twice"]),
    ("trailing space in id", bad_samples(lambda s: s[1].update(id="s1 ")), DataError,
     ["sample 's1 '", "source 'id'", "leading or trailing whitespace"]),
    ("leading space in id", bad_samples(lambda s: s[1].update(id=" s1")), DataError,
     ["sample ' s1'", "leading or trailing whitespace"]),
    ("zero-width space in id", bad_samples(lambda s: s[1].update(id="s\u200b1")), DataError,
     ["sample 's\\u200b1'", "source 'id'", "['U+200B']"]),
    ("no-break space in id", bad_samples(lambda s: s[1].update(id="s\u00a01")), DataError,
     ["source 'id'", "['U+00A0']"]),
    ("newline in id", bad_samples(lambda s: s[1].update(id="s\n1")), DataError, ["'s\\n1'", "['U+000A']"]),
    ("ids equal after NFC", bad_samples(lambda s: (s[0].update(id="caf\u00e9"), s[1].update(id="cafe\u0301"))),
     DataError, ["source 'id'", "equals id 'café' of sample #0 after Unicode NFC normalization"]),
    ("duplicate id", bad_samples(lambda s: s[2].update(id="s1")), DataError,
     ["sample 's1'", "source 'id'", "duplicate id (sample #1 has it too)"]),
    ("missing id", bad_samples(lambda s: s[1].pop("id")), DataError, ["'<sample #1>'", "missing or empty id"]),
    ("id not a string", bad_samples(lambda s: s[1].update(id=7)), DataError, ["'<sample #1>'", "got 7"]),
    ("sample not an object", bad_samples(lambda s: s.__setitem__(1, ["s1"])), DataError,
     ["'<sample #1>'", "a sample must be an object, got list"]),
    ("split not a string", bad_samples(lambda s: s[1].update(split=1)), DataError,
     ["sample 's1'", "source 'split'", "split must be a string, got 1"]),
    ("unknown source", bad_samples(lambda s: s[1].update(hsc_image="x.npy")), DataError,
     ["sample 's1'", "source 'hsc_image'", "unknown source"]),
    ("empty manifest", manifest_text('{"samples": []}'), DataError, ["'<manifest>'", "m.json", "lists none"]),
    ("empty split", bad_samples(lambda s: None, split="val"), DataError,
     ["no sample in split 'val'; the splits are ['test', 'train']"]),
    ("all skipped", bad_samples(lambda s: s.__setitem__(slice(None), [{"id": "s0", "image": "no.npy"}]),
                                on_error="skip"), DataError, ["all 1 were skipped"]),
    ("manifest not an object", manifest_text("[]"), DataError, ["m.json", 'expected an object {"samples"']),
    ("manifest not JSON", manifest_text('{"samples": ['), DataError, ["m.json", "not valid JSON"]),
    ("manifest not utf-8", manifest_text(b'{"samples": ["\xff"]}'), DataError, ["m.json", "UnicodeDecodeError"]),
    ("manifest nested too deep", manifest_text('{"samples": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     DataError, ["m.json", "RecursionError"]),
    ("manifest is a directory", lambda root: (make_dir(root / "m.json"), lambda: dataset(root))[1], DataError,
     ["m.json", "IsADirectoryError"]),
    ("collate: modality of another class", lambda root: (lambda: collate(
        [Sample("a", {"t": toy_table(1)}), Sample("b", {"t": toy_image(1)})])), DataError,
     ["sample 'b'", "source 't'", "a ToyImage, but the source holds ToyTable"]),
    ("collate: undeclared source", lambda root: (lambda: collate([Sample("a", {"t": toy_table(1)})], names=["x"])),
     DataError, ["sample 'a'", "source 't'", "not among the batch's sources ['x']"]),
]


def _npz_bytes():
    import io
    buf = io.BytesIO(); np.savez(buf, a=np.zeros(3)); return buf.getvalue()


def _one(dtype, value):
    a = np.zeros((4, 16, 16), dtype); a[1, 2, 3] = value; return a


def _with_nan(a, at):
    a = a.copy(); a[at] = np.nan; return a


def test_battery_is_large():
    assert len(CASES) >= 45, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("make, exc, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(tmp_path, make, exc, needles):
    action = make(write_root(tmp_path))
    with pytest.raises(exc) as e: action()
    assert type(e.value) is exc, f"{type(e.value).__name__}: {e.value}"
    for needle in needles: assert needle in str(e.value), f"{needle!r} not in: {e.value}"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_file(tmp_path):
    root = write_root(tmp_path); (root / "img/s1.npy").chmod(0)
    with pytest.raises(DataError, match=r"sample 's1', source 'image': cannot read 'img/s1.npy': PermissionError"):
        load_all(dataset(root))


def test_permission_error_is_named(tmp_path, monkeypatch):
    "The same fault, simulated (tests often run as root, who may read anything)."
    root = write_root(tmp_path); ds = dataset(root)
    def denied(*a, **k): raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(np, "load", denied)
    with pytest.raises(DataError, match=r"sample 's0', source 'image': cannot read 'img/s0.npy': PermissionError"):
        ds[0]


def test_cause_is_kept(tmp_path):
    root = write_root(tmp_path); (root / "patients.csv").write_text("")
    with pytest.raises(DataError) as e: dataset(root)
    assert type(e.value.__cause__).__name__ == "EmptyDataError"


# ---- what passes the door: converted to float32, values kept -----------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda a: a.astype(">f4"), lambda a: a.astype(">f8"), lambda a: a.astype(np.float64),
    lambda a: a.astype(np.float16), lambda a: np.round(a * 100).astype(np.int32),
    lambda a: np.round(np.abs(a) * 10).astype(np.uint8), lambda a: torch.from_numpy(a).double(),
    lambda a: torch.from_numpy(a).bfloat16()],
    ids=[">f4", ">f8", "float64", "float16", "int32", "uint8", "float64 tensor", "bfloat16 tensor"])
def test_numbers_are_converted_to_float32(make):
    src = IMG.flux[:1].numpy()
    value = make(src)
    before = value.float().numpy().copy() if isinstance(value, torch.Tensor) else np.array(value, copy=True)
    m = ToyImage(flux=value)
    assert m.flux.dtype == torch.float32
    expected = torch.as_tensor(np.asarray(before, dtype=np.float32))
    assert torch.equal(m.flux, expected)
    m.flux.add_(1)   # the modality's tensor is its own: the caller's array is unchanged
    now = value.float().numpy() if isinstance(value, torch.Tensor) else value
    assert np.array_equal(np.asarray(now, dtype=np.float64), np.asarray(before, dtype=np.float64))


def test_float32_tensor_is_kept_and_nan_passes():
    t = IMG.flux[:1].clone(); t[0, 0, 0, 0] = float("nan")
    assert as_float32(t, "X.flux") is t
    assert ToyImage(flux=t.double()).flux.isnan()[0, 0, 0, 0]


def test_codec_reads_float64_and_big_endian_modalities():
    manager = toy_manager()
    ref = manager.encode(IMG)["tok_toy_image"]
    for value in (IMG.flux.double(), IMG.flux.numpy().astype(">f4"), IMG.flux.numpy().astype(">f8")):
        assert torch.equal(manager.encode(ToyImage(flux=value))["tok_toy_image"], ref)


def test_loaders_read_big_endian_files(tmp_path):
    root = write_root(tmp_path)
    np.save(root / "img/s1.npy", IMG.flux[1].numpy().astype(">f8"))
    fits.PrimaryHDU(IMG.flux[2].numpy().astype(">f4")).writeto(root / "img/s2.fits", overwrite=True)
    assert torch.equal(dataset(root)[1].mods["image"].flux, IMG.flux[1:2])
    assert torch.equal(fits_ds(root)[2].mods["image"].flux, IMG.flux[2:3])


def test_survey_image_takes_big_endian():
    from mmfm.surveys import survey_image
    flux = np.arange(4 * 32 * 32, dtype=">f4").reshape(4, 32, 32)      # as astropy returns FITS data
    img = survey_image("legacy", flux)
    assert img.flux.dtype == torch.float32 and torch.equal(img.flux[0], torch.from_numpy(flux.astype("<f4")))


def test_relative_manifest_is_read_under_data_root(tmp_path, monkeypatch):
    (tmp_path / "root").mkdir(); root = write_root(tmp_path / "root")
    elsewhere = tmp_path / "cwd"; elsewhere.mkdir()
    (elsewhere / "m.json").write_text(json.dumps({"samples": SAMPLES[:1]}))   # a decoy in the working directory
    monkeypatch.chdir(elsewhere)
    assert len(dataset(root)) == N


def test_split_filter_keeps_the_split(tmp_path):
    assert dataset(write_root(tmp_path), split="test").ids == ["s2"]


# ---- fuzzing: only the library's own errors ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    return write_root(tmp_path_factory.mktemp("fuzz"))


KEYS = ["id", "split", "image", "series", "patients_row", "other"]
IDS = st.sampled_from(["s0", "s1", "s0 ", "s\u200b0", "caf\u00e9", "cafe\u0301", "", "\t"]) | st.text(max_size=4)
json_leaf = (st.none() | st.booleans() | st.integers(-10, 10**20) | st.floats(allow_nan=False)
             | st.sampled_from(["img/s0.npy", "img", "../x", "/etc", "ser/s1.npy", "img/s0.fits", "a\x00b", "."])
             | st.text(max_size=6))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=3)
                          | st.dictionaries(st.text(max_size=3), kids, max_size=3), max_leaves=8)
sample_st = st.dictionaries(st.sampled_from(KEYS), json_value, max_size=5).flatmap(
    lambda d: st.just(d) | IDS.map(lambda i: {**d, "id": i}))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(json_value, st.lists(sample_st, max_size=4).map(lambda s: {"samples": s})),
       split=st.sampled_from([None, "train", "val"]), raw=st.none() | st.binary(max_size=40))
def test_fuzz_manifest(fuzz_root, doc, split, raw):
    (fuzz_root / "fuzz.json").write_bytes(raw if raw is not None else json.dumps(doc).encode())
    try:
        ds = MultiSourceDataset(fuzz_root, "fuzz.json", sources(), split=split)
        load_all(ds)
    except (DataError, ModalityError):
        pass


PREFIX = {"npy": [b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, "
                  b"'shape': (4, 16, 16), }"],
          "csv": [b"", b"age,sex,bmi\n", b"age,sex,bmi\n1,2,3\n"],
          "fits": [b"", b"SIMPLE  =                    T".ljust(80) + b"BITPIX  =                  -32".ljust(80)]}
DESCR = ["<f4", ">f8", "|b1", "<c8", "<U2", "<i8", ">i2", "|u1", "<f2", "|V4", "O", "<M8[s]"]


@pytest.mark.filterwarnings("ignore")   # astropy warns about the headers it repairs
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["npy", "csv", "fits"]), prefix=st.integers(0, 2), body=st.binary(max_size=300),
       header=st.none() | st.tuples(st.sampled_from(DESCR), st.sampled_from([(4, 16, 16), (1,), (4, 16), (),
                                                                              (4, 16, 17), (0, 16, 16)])))
def test_fuzz_file_bytes(fuzz_root, kind, prefix, body, header):
    name = {"npy": "img/fz.npy", "csv": "fz.csv", "fits": "img/fz.fits"}[kind]
    data = PREFIX[kind][min(prefix, len(PREFIX[kind]) - 1)] + body
    if kind == "npy" and header is not None: data = npy_header(header[0], header[1], body * 64)
    (fuzz_root / name).write_bytes(data)
    samples = [{"id": "f0", "patients_row": 0, "image": name}] if kind != "csv" else [{"id": "f0", "patients_row": 0}]
    srcs = sources("fz.csv" if kind == "csv" else "patients.csv")
    if kind == "fits": srcs[1] = Source("image", ToyImage, FitsLoader())
    try: load_all(MultiSourceDataset(fuzz_root, samples, srcs))
    except (DataError, ModalityError):
        pass


@settings(max_examples=120, deadline=None)
@given(pattern=st.lists(st.sets(st.sampled_from(["table", "image", "series"])), min_size=1, max_size=6),
       names=st.none() | st.lists(st.sampled_from(["table", "image", "series", "extra"]), unique=True),
       swap=st.booleans(), order=st.randoms(use_true_random=False))
def test_fuzz_collate(pattern, names, swap, order):
    make = {"table": lambda i: toy_table(1, seed=i), "image": lambda i: toy_image(1, seed=i),
            "series": lambda i: toy_series(1, seed=i)}
    samples = [Sample(f"s{i}", {n: make[n](i) for n in sorted(p)}) for i, p in enumerate(pattern)]
    if swap and samples[-1].mods:   # one sample holds a modality of another class under a source's name
        n = next(iter(samples[-1].mods)); other = "image" if n != "image" else "table"
        samples[-1].mods[n] = make[other](0)
    order.shuffle(samples)
    try: batch = collate(samples, names=names)
    except DataError as e:
        assert e.sample_id in {s.id for s in samples}, e
        return
    expect = list(dict.fromkeys(n for s in samples for n in s.mods)) if names is None else names
    assert batch.ids == [s.id for s in samples] and list(batch.present) == expect
    for n in expect:
        assert batch.present[n].tolist() == [n in s.mods for s in samples]
        if batch.present[n].any():
            rows = [s.mods[n] for s in samples if n in s.mods]
            assert batch.mods[n].batch_size == len(rows)
            for j, m in enumerate(rows):
                f = m.tensor_fields()[0]
                assert torch.equal(getattr(batch.mods[n], f)[j], getattr(m, f)[0])
