"""DICOM input: grey levels as DICOM defines them (checked against the standard's formulas and
pydicom's own conversion), MONOCHROME1 films, compressed syntaxes, what is skipped and why, the
same prediction as a PNG of the same pixels through predict and the service, and a run on DICOM
files whose patients have several films: no patient split, no patient data in any output."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from conftest import dicom_bytes, synthetic_image
from PIL import Image

from lungxray import dicom
from lungxray.config import DataConfig, Preprocessing
from lungxray.data import load_dataset
from lungxray.decode import decode
from lungxray.errors import UnusableImage

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
ANY = ("multiframe", "lateral", "any-modality")


def stored_12bit(seed: int = 0, shape=(40, 56)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, shape).astype(np.uint16)


def test_8_12_16_bit_without_window_scale_as_the_standard_says():
    v8 = np.random.default_rng(1).integers(10, 240, (30, 20)).astype(np.uint8)
    assert np.array_equal(dicom.read(dicom_bytes(v8))[0], v8)  # 8 bits: the values themselves, as an 8-bit PNG
    for bits in (12, 16):
        v = stored_12bit() if bits == 12 else (stored_12bit() * 16 + 7)
        expected = np.rint((v - v.min()) * (255.0 / (int(v.max()) - int(v.min())))).astype(np.uint8)
        gray, patient = dicom.read(dicom_bytes(v, bits_stored=bits))
        assert np.array_equal(gray, expected) and patient is None
    # a negative rescale slope turns the film over, as MONOCHROME1 does
    v = stored_12bit(8)
    turned = dicom.read(dicom_bytes(v, bits_stored=12, rescale=(-1.0, 5000.0)))[0]
    assert np.array_equal(turned, dicom.read(dicom_bytes(v, bits_stored=12, photometric="MONOCHROME1"))[0])
    assert np.array_equal(turned, 255 - dicom.read(dicom_bytes(v, bits_stored=12))[0])


def test_rescale_and_window_follow_the_dicom_formula():
    v = stored_12bit(2)
    slope, intercept, center, width = 2.0, -1000.0, 2500.0, 3000.0
    gray = dicom.read(dicom_bytes(v, bits_stored=12, rescale=(slope, intercept), window=(center, width),
                                  voi_function="LINEAR_EXACT"))[0]  # fmt: skip
    x = v * slope + intercept  # modality LUT
    expected = np.rint(np.clip((x - center) / width + 0.5, 0, 1) * 255).astype(np.uint8)  # C.11.2.1.3.2
    assert np.abs(gray.astype(int) - expected).max() <= 1 and (gray == expected).mean() > 0.99
    assert 0 < (gray == 0).mean() < 1 and 0 < (gray == 255).mean() < 1  # the window cuts at both ends


@pytest.mark.parametrize("window", [None, (1800.0, 1200.0)])
def test_monochrome1_film_matches_its_monochrome2_twin(window):
    v = stored_12bit(3)
    twin_window = None if window is None else (4095 - window[0], window[1])  # mirrored with the values
    kw = {"bits_stored": 12, "voi_function": "LINEAR_EXACT"}
    mono2 = decode(dicom_bytes(v, window=window, **kw), Preprocessing(img_size=32))
    mono1 = decode(
        dicom_bytes(4095 - v, photometric="MONOCHROME1", window=twin_window, **kw), Preprocessing(img_size=32)
    )
    assert np.array_equal(mono1, mono2)
    assert mono2.std() > 10  # not a flat image that would match anything


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm", "693_J2KI.dcm", "examples_overlay.dcm"])
def test_pydicom_test_files_match_pydicoms_own_conversion(name):
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(TEST_FILES / name)
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    if "WindowCenter" in ds:  # the window's output range: the stored range through the rescale
        bits, signed = ds.BitsStored, ds.PixelRepresentation == 1
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        low, high = low * slope + intercept, high * slope + intercept
    else:
        low, high = values.min(), values.max()
    expected = np.rint(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    gray, patient = dicom.read((TEST_FILES / name).read_bytes(), ANY)
    assert np.array_equal(gray, expected)
    assert patient == ds.PatientID


def test_lossless_compressed_and_other_encodings_give_the_same_pixels():
    reference = dicom.read((TEST_FILES / "MR_small.dcm").read_bytes(), ANY)[0]
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):  # fmt: skip
        assert np.array_equal(dicom.read((TEST_FILES / name).read_bytes(), ANY)[0], reference), name
    v = stored_12bit(4)
    plain = dicom.read(dicom_bytes(v, bits_stored=12))[0]
    assert np.array_equal(dicom.read(dicom_bytes(v, bits_stored=12, syntax=pydicom.uid.RLELossless))[0], plain)


def test_what_is_skipped_and_why_and_what_keeps_it():
    v = stored_12bit(5)
    cases = {
        "modality CT": (dicom_bytes(v, bits_stored=12, modality="CT"), "any-modality"),
        "lateral view (ViewPosition LL)": (dicom_bytes(v, bits_stored=12, view="LL"), "lateral"),
        "of 3 frames": (dicom_bytes(np.stack([v, v, 4095 - v]), bits_stored=12), "multiframe"),
    }
    for reason, (data, keep) in cases.items():
        with pytest.raises(UnusableImage, match=re.escape(reason)) as info:
            decode(data, Preprocessing(img_size=32))
        assert f"--dicom-keep {keep}" in str(info.value)
        assert decode(data, Preprocessing(img_size=32, dicom_keep=(keep,))).shape == (32, 32)
    with pytest.raises(UnusableImage, match="without pixel data"):
        dicom.read((TEST_FILES / "rtplan.dcm").read_bytes())
    with pytest.raises(UnusableImage, match="less than expected"):
        dicom.read((TEST_FILES / "MR_truncated.dcm").read_bytes(), ANY)
    # the first frame of a kept series
    frames = np.stack([v, 4095 - v])
    assert np.array_equal(
        dicom.read(dicom_bytes(frames, bits_stored=12), ("multiframe",))[0],
        dicom.read(dicom_bytes(v, bits_stored=12))[0],
    )


def test_found_by_preamble_or_by_name():
    v = stored_12bit(6)
    with_preamble = dicom_bytes(v, bits_stored=12)
    expected = decode(with_preamble, Preprocessing(img_size=32))
    assert np.array_equal(
        decode(with_preamble, Preprocessing(img_size=32), "film.png"), expected
    )  # misnamed: the preamble says DICOM
    bare = dicom_bytes(v, bits_stored=12, preamble=False)
    assert np.array_equal(decode(bare, Preprocessing(img_size=32), "FILM.DCM"), expected)
    with pytest.raises(UnusableImage, match="not an image Pillow can read"):
        decode(bare, Preprocessing(img_size=32), "film")  # no preamble, no name: nothing says DICOM


@pytest.mark.processes
def test_a_syntax_no_installed_decoder_reads_names_the_extra():
    """A user without the dicom extra (checked in a fresh interpreter where the JPEG-LS decoders
    cannot be imported) is told which extra to install."""
    script = (
        "import sys\n"
        "for m in ('libjpeg', 'openjpeg', 'rle', 'pylibjpeg', 'jpeg_ls'): sys.modules[m] = None\n"
        "from lungxray.decode import decode\n"
        "from lungxray.config import Preprocessing\n"
        f"try: decode(open({str(TEST_FILES / 'MR_small_jpeg_ls_lossless.dcm')!r}, 'rb').read(), "
        "Preprocessing(img_size=32, dicom_keep=('any-modality',)))\n"
        "except Exception as exc: print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("UnusableImage") and "JPEG-LS Lossless" in out
    assert "pip install 'lungxray[dicom]'" in out


def test_a_syntax_nothing_decodes_says_so():
    """The reason says lungxray cannot read it instead of sending the user to install something."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(stored_12bit(7), bits_stored=12)))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(UnusableImage, match="MPEG2.*lungxray cannot read; export the film"):
        decode(buf.getvalue(), Preprocessing(img_size=32))


def test_a_dicom_and_a_png_of_the_same_pixels_predict_alike(trained_run, tmp_path):
    from fastapi.testclient import TestClient

    from lungxray.predictor import Predictor
    from lungxray.serve import create_app

    _, run, _ = trained_run
    films = tmp_path / "films"
    films.mkdir()
    for i in range(3):
        pixels = synthetic_image(i, 40 + i)
        (films / f"x{i}.dcm").write_bytes(dicom_bytes(pixels, patient={"PatientID": f"P{i}"}))
        Image.fromarray(pixels).save(films / f"x{i}.png")
        wide = pixels.astype(np.uint16) * 257  # 16 bits: stretched alike by both readers
        (films / f"w{i}.dcm").write_bytes(dicom_bytes(wide, bits_stored=16))
        Image.fromarray(wide).save(films / f"w{i}.png")
    results = {Path(r["path"]).name: r for r in Predictor(run / "model").predict_files(sorted(films.iterdir()))}
    assert not [r for r in results.values() if "error" in r]
    with TestClient(create_app(run / "model")) as client:
        for stem in ("x0", "x1", "x2", "w0", "w1", "w2"):
            assert results[f"{stem}.dcm"]["probabilities"] == results[f"{stem}.png"]["probabilities"]
            assert results[f"{stem}.dcm"]["ood_score"] == results[f"{stem}.png"]["ood_score"]
            answers = [
                client.post("/predict", files={"file": (f"{stem}.{ext}", (films / f"{stem}.{ext}").read_bytes())})
                for ext in ("dcm", "png")
            ]
            assert [a.status_code for a in answers] == [200, 200]
            assert answers[0].json()["probabilities"] == answers[1].json()["probabilities"]
            assert answers[0].json()["probabilities"] == pytest.approx(results[f"{stem}.png"]["probabilities"])
            assert "P0" not in answers[0].text and "PatientID" not in answers[0].text
        lateral = client.post("/predict", files={"file": ("l.dcm", dicom_bytes(synthetic_image(0, 1), view="RL"))})
        assert lateral.status_code == 422 and "lateral view" in lateral.json()["detail"]


# Values planted in the files; none may appear in any file lungxray writes or in what it prints.
PLANTED = {"PatientName": "Quillfeather^Ottoline", "PatientBirthDate": "19230417", "AccessionNumber": "ACQ99871234"}


def patient_tree(root: Path, n_patients: int = 5) -> dict[str, list[Path]]:
    """Three class folders of DICOM films, 2 or 3 per patient (some MONOCHROME1, 12-bit), plus
    a lateral view, a CT and a damaged file of planted patients. Returns PatientID -> its films."""
    films: dict[str, list[Path]] = {}
    for label, name in enumerate(("covid", "normal", "viral")):
        folder = root / name
        folder.mkdir(parents=True)
        for p in range(n_patients):
            pid = f"PID-{label}{p}-ZX{7000 + 13 * p}"
            for k in range(2 + p % 2):
                pixels = synthetic_image(label, 10 * p + k).astype(np.uint16) * 16  # 12-bit
                mono1 = (p + k) % 2 == 1
                data = dicom_bytes(
                    4095 - pixels if mono1 else pixels,
                    bits_stored=12,
                    photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
                    patient={"PatientID": pid, **PLANTED},
                )
                path = folder / f"film_{label}_{p}_{k}.dcm"
                path.write_bytes(data)
                films.setdefault(pid, []).append(path)
    odd = {"PatientID": "PID-ODD-ZX1", **PLANTED}
    (root / "covid" / "side.dcm").write_bytes(dicom_bytes(synthetic_image(0, 99), view="LL", patient=odd))
    (root / "normal" / "ct.dcm").write_bytes(dicom_bytes(synthetic_image(1, 99), modality="CT", patient=odd))
    damaged = dicom_bytes(synthetic_image(2, 99), patient=odd)
    (root / "viral" / "damaged.dcm").write_bytes(damaged[:-300])
    return films


def test_scan_counts_patients_and_groups_their_films(tmp_path):
    films = patient_tree(tmp_path / "data")
    ds = load_dataset(
        tmp_path / "data", DataConfig(Preprocessing(img_size=16), cache_dir=tmp_path / "cache"), progress=False
    )
    group_of = {s.path: s.group for s in ds.samples}
    for paths in films.values():
        assert len({group_of[p] for p in paths}) == 1
    assert len({s.group for s in ds.samples}) == len(films) == 15
    summary = ds.summary()
    assert summary["patients"] == {"n": 15, "images": 36, "images_per_patient": {"2": 9, "3": 6}, "grouped": True}
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"side.dcm", "ct.dcm", "damaged.dcm"}
    assert "lateral" in reasons["side.dcm"] and "modality CT" in reasons["ct.dcm"]
    # --no-dicom-patients: every film its own group again
    alone = load_dataset(
        tmp_path / "data",
        DataConfig(Preprocessing(img_size=16), cache_dir=tmp_path / "cache", dicom_patients=False),
        progress=False,
    )
    assert len({s.group for s in alone.samples}) == 36
    key = tmp_path / "cache" / "patient-key"
    assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_a_run_on_dicom_films_never_splits_a_patient_and_writes_no_patient_data(tmp_path, capsys):
    from conftest import cli

    films = patient_tree(tmp_path / "data", n_patients=6)
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = cli("run", tmp_path / "data", "--out", out, "--cache-dir", cache,
               "--model mlp --img-size 16 --trials 2 --epochs 2 --final-epochs 2 --seed 3")  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    splits = json.loads((out / "splits.json").read_text())
    where = {Path(p): part for part in ("train", "val", "test") for p in splits[part]}
    for pid, paths in films.items():
        assert len({where[p] for p in paths}) == 1, f"{pid} straddles {sorted({where[p] for p in paths})}"
    assert {len({where[p] for p in paths}) for paths in films.values()} == {1}
    pseudonyms = splits["patients"]
    assert sum(map(len, pseudonyms.values())) == len(films) == 18
    assert not set(pseudonyms["train"]) & set(pseudonyms["test"])
    assert (out / "patient-key").stat().st_mode & 0o777 == 0o600
    written = [p for p in [*out.rglob("*"), *cache.rglob("*")] if p.is_file() and p.name != "patient-key"]
    assert len(written) > 10 and any(p.name == "report.html" for p in written)
    secrets = [*PLANTED.values(), *films, "PID-ODD-ZX1", "Quillfeather", "Ottoline"]
    for path in written:
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, f"{secret} in {path}"
    for secret in secrets:
        assert secret not in printed.out + printed.err
    # the cache's pseudonyms are not the run's: the run's key re-keys them
    entries = [json.loads(p.read_text()) for p in cache.rglob("entries.json")]
    cached = {e["patient"] for entries_ in entries for e in entries_.values() if "patient" in e}
    assert len(cached) == 18 and not cached & set(pseudonyms["train"])
    assert os.access(out / "report.html", os.R_OK)


def test_pydicom_messages_quoting_patient_values_reach_no_log_and_no_warning(caplog, monkeypatch):
    """pydicom reports header problems with the element's value; here it is made to quote the
    PatientID while reading (pydicom 3.0 happens not to for these values), as a later version or
    another header might. Neither the application's logging nor the shown warnings get it, nor
    does the reason of a damaged file."""
    import logging
    import warnings

    import pydicom.pixels
    from pydicom.misc import warn_and_log

    original = pydicom.pixels.apply_modality_lut

    # defined as if in pydicom, where such a warning comes from (the module its origin is judged by)
    namespace = {"__name__": "pydicom.valuerep", "warn_and_log": warn_and_log, "original": original}
    exec(  # noqa: S102 - a fixed test function, compiled in pydicom's name
        "def quoting(arr, ds):\n"
        "    warn_and_log(f'odd header in {ds.PatientID}, born {ds.PatientBirthDate}')\n"
        "    return original(arr, ds)\n",
        namespace,
    )
    in_pydicom = namespace["quoting"]
    monkeypatch.setattr(pydicom.pixels, "apply_modality_lut", in_pydicom)
    data = dicom_bytes(synthetic_image(0, 2), patient={"PatientBirthDate": "19230417", "PatientID": "PID-LEAK-77"})
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, as a user's process has them
        gray, patient = dicom.read(data)
        with pytest.raises(UnusableImage) as info:
            dicom.read(data[:-40])  # damaged: the reason must not quote the header either
    assert patient == "PID-LEAK-77" and gray.shape == (32, 32)  # returned to the scan, which hashes it
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught] + [str(info.value)]
    assert said and not [line for line in said if "19230417" in line or "PID-LEAK-77" in line]
    # the same message from pydicom is logged when lungxray does not hold it back
    pydicom_logger = logging.getLogger("pydicom")
    monkeypatch.setattr(pydicom_logger, "propagate", True)
    monkeypatch.setattr(pydicom_logger, "filters", [])
    warn_and_log("probe PID-LEAK-77")
    assert any("PID-LEAK-77" in r.getMessage() for r in caplog.records)


def test_one_patient_id_on_most_films_warns_of_a_placeholder(tmp_path):
    """Anonymised files often share one placeholder PatientID: joined on it, nearly every image
    would be one group. The scan warns and names the flag; a set of real patients does not warn."""
    import warnings

    for label, name in enumerate(("covid", "normal", "viral")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for k in range(4):
            pid = "ANONYMOUS" if k < 3 else f"P{label}"  # 9 of 12 films under one ID
            data = dicom_bytes(synthetic_image(label, k), patient={"PatientID": pid})
            (tmp_path / "data" / name / f"f{k}.dcm").write_bytes(data)
    cfg = DataConfig(Preprocessing(img_size=16), cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match=r"one DICOM PatientID covers 9 of 12 images.*--no-dicom-patients"):
        load_dataset(tmp_path / "data", cfg, progress=False)
    patient_tree(tmp_path / "real", n_patients=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="one DICOM PatientID")
        load_dataset(tmp_path / "real", cfg, progress=False)
