"""The loader fuzzed: hypothesis throws generated files at the scan's per-file worker (read, hash,
decode; the path every command and the service share) and at a whole scan. Valid PNG, JPEG, TIFF,
BMP, GIF and DICOM files of odd modes and bit depths are truncated, bit-flipped, overwritten,
misnamed, given huge declared dimensions, broken DICOM headers and pixel data shorter than
declared. Each file must load or be skipped with a reason, within a per-file time limit; a scan
must account for every file it was given.

Derandomized (a fixed seed per test), so a CI run is reproducible; more than 1,000 files per run.
"""

from __future__ import annotations

import contextlib
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dicom_bytes, synthetic_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lungxray.config import DataConfig, Preprocessing
from lungxray.data import _process_file, load_dataset

SECONDS_PER_FILE = 5.0  # a 40 M-pixel film decodes in about 1 s here; anything slower is a hang
OPTIONS = Preprocessing(img_size=16)
KEEP_ALL = Preprocessing(img_size=16, dicom_keep=("any-modality", "lateral", "multiframe"))


def _pillow(mode: str, fmt: str, **save) -> bytes:
    base = synthetic_image(1, 3, 24)
    img = {
        "I;16": lambda: Image.fromarray(base.astype(np.uint16) * 200),
        "F": lambda: Image.fromarray(base.astype(np.float32) / 7),
        "I": lambda: Image.fromarray(base.astype(np.int32) * 1000 - 5000),
    }.get(mode, lambda: Image.fromarray(base).convert(mode))()
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _dicom(**kw) -> bytes:
    pixels = synthetic_image(2, 5, 24).astype(np.uint16) * 16
    return dicom_bytes(pixels, bits_stored=12, **kw)


SEEDS = {
    "l.png": lambda: _pillow("L", "PNG"),
    "i16.png": lambda: _pillow("I;16", "PNG"),
    "rgba.png": lambda: _pillow("RGBA", "PNG"),
    "p.png": lambda: _pillow("P", "PNG"),
    "la.png": lambda: _pillow("LA", "PNG"),
    "one.bmp": lambda: _pillow("1", "BMP"),
    "rgb.jpg": lambda: _pillow("RGB", "JPEG", quality=80),
    "l.jpg": lambda: _pillow("L", "JPEG", quality=90, progressive=True),
    "cmyk.jpg": lambda: _pillow("CMYK", "JPEG"),
    "f.tif": lambda: _pillow("F", "TIFF"),
    "i.tif": lambda: _pillow("I", "TIFF", compression="tiff_deflate"),
    "p.gif": lambda: _pillow("P", "GIF"),
    "mono2.dcm": lambda: _dicom(),
    "mono1.dcm": lambda: _dicom(photometric="MONOCHROME1", window=(2000, 1500), rescale=(1.5, -100)),
    "u8.dcm": lambda: dicom_bytes(synthetic_image(0, 1, 24)),
    "rle.dcm": lambda: _dicom(syntax=pydicom.uid.RLELossless),
    "frames.dcm": lambda: dicom_bytes(np.stack([synthetic_image(0, k, 24) for k in range(3)])),
    "bare.dcm": lambda: _dicom(preamble=False),
    "sigmoid.dcm": lambda: _dicom(window=(1500, 900), voi_function="SIGMOID"),
}


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    return {name: make() for name, make in SEEDS.items()}


def _png_with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (CRC recomputed, so decoders believe it)."""
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    return data[:16] + bytes(ihdr) + struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr))) + data[33:]


DICOM_EDITS = {
    "huge": lambda ds: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535)),
    "zero rows": lambda ds: setattr(ds, "Rows", 0),
    "bits allocated 7": lambda ds: setattr(ds, "BitsAllocated", 7),
    "bits stored 0": lambda ds: setattr(ds, "BitsStored", 0),
    "bits 64": lambda ds: (setattr(ds, "BitsAllocated", 64), setattr(ds, "BitsStored", 64)),
    "samples 3": lambda ds: setattr(ds, "SamplesPerPixel", 3),
    "photometric odd": lambda ds: setattr(ds, "PhotometricInterpretation", "YBR_ICT"),
    "frames huge": lambda ds: setattr(ds, "NumberOfFrames", 100000),
    "short pixels": lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 3]),
    "no pixels": lambda ds: delattr(ds, "PixelData"),
    "window width 0": lambda ds: (setattr(ds, "WindowCenter", 100), setattr(ds, "WindowWidth", 0)),
    "slope 0": lambda ds: (setattr(ds, "RescaleSlope", 0), setattr(ds, "RescaleIntercept", 5)),
    "compressed claim": lambda ds: (  # raw pixels handed to the JPEG decoder
        setattr(ds.file_meta, "TransferSyntaxUID", pydicom.uid.JPEGBaseline8Bit),
        setattr(ds, "PixelData", pydicom.encaps.encapsulate([ds.PixelData])),
    ),
    "unknown syntax": lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4.5.6"),
    "voi lut broken": lambda ds: setattr(ds, "VOILUTSequence", [pydicom.Dataset()]),
    "pixel representation 1": lambda ds: setattr(ds, "PixelRepresentation", 1),
    "high bit odd": lambda ds: setattr(ds, "HighBit", 40),
    "palette": lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"),
}


def _edit_dicom(data: bytes, edit: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    DICOM_EDITS[edit](ds)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@st.composite
def fuzzed_file(draw, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    """(file name, bytes): a seed file, then one or two mutations, under a drawn extension."""
    name = draw(st.sampled_from(sorted(seeds)))
    data = seeds[name]
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["none", "truncate", "flip", "overwrite", "header", "random"]))
        if kind == "truncate":
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
        elif kind == "flip" and data:
            flipped = bytearray(data)
            for _ in range(draw(st.integers(1, 16))):
                flipped[draw(st.integers(0, len(flipped) - 1))] ^= 1 << draw(st.integers(0, 7))
            data = bytes(flipped)
        elif kind == "overwrite" and data:
            start = draw(st.integers(0, len(data) - 1))
            data = data[:start] + draw(st.binary(min_size=1, max_size=64)) + data[start + 64 :]
        elif kind == "header" and name.endswith(".dcm") and data[128:132] == b"DICM":
            edit = draw(st.sampled_from(sorted(DICOM_EDITS)))
            with contextlib.suppress(Exception):  # pydicom refused to write that edit: the file stays as it was
                data = _edit_dicom(data, edit)
        elif kind == "header" and name.endswith(".png") and data[:8] == b"\x89PNG\r\n\x1a\n":
            side = draw(st.sampled_from([0, 1, 70000, 2**31 - 1]))
            data = _png_with_size(data, side, draw(st.sampled_from([1, 24, 70000])))
        elif kind == "random":
            data = draw(st.binary(max_size=2048))
    suffix = draw(st.sampled_from(["", ".png", ".jpg", ".dcm", ".txt", Path(name).suffix]))
    return f"f{suffix}", data


def _check_one(path: Path, keep: Preprocessing) -> str | None:
    """Run the worker on ``path``; returns the reason, or None when it loaded. Fails on a crash,
    on a result that is neither pixels nor reason, and past the time limit."""
    start = time.perf_counter()
    _, sha, pixels, phash, reason, patient = _process_file((str(path), keep))
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS_PER_FILE, f"{path.name} took {elapsed:.1f} s"
    if pixels is None:
        assert isinstance(reason, str) and len(reason) > 10, f"skipped without a reason: {reason!r}"
        assert "\n" not in reason
        return reason
    assert reason is None and pixels.shape == (16, 16) and pixels.dtype == np.uint8
    assert len(sha) == 64 and len(phash) == 16
    return None


@pytest.mark.slow  # 2,000 files take several seconds; the fast tier keeps the 300-file scan below
def test_the_loader_survives_more_than_a_thousand_fuzzed_files(seeds, tmp_path):
    outcomes: list[str | None] = []

    @settings(
        max_examples=2000,
        derandomize=True,
        deadline=None,  # the time limit is checked per file, in _check_one
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def check(data):
        name, content = data.draw(fuzzed_file(seeds))
        path = tmp_path / name
        path.write_bytes(content)
        outcomes.append(_check_one(path, data.draw(st.sampled_from([OPTIONS, KEEP_ALL]))))

    check()
    loaded = sum(o is None for o in outcomes)
    print(f"{len(outcomes)} fuzzed files: {loaded} loaded, {len(outcomes) - loaded} skipped with a reason")
    assert len(outcomes) >= 2000
    # Both outcomes are exercised, and DICOM failures say what is wrong with the DICOM file.
    assert 100 < loaded < len(outcomes) - 100, f"{loaded} of {len(outcomes)} loaded"
    reasons = {o for o in outcomes if o}
    assert any("DICOM" in r for r in reasons) and any("Pillow" in r or "decode image" in r for r in reasons)


def test_a_scan_accounts_for_every_fuzzed_file(seeds, tmp_path):
    """300 fuzzed files in class folders (drawn with a seeded generator, same mutations): each is
    either a sample or skipped with a reason, none twice, none missing."""
    rng = np.random.default_rng(0)
    names = sorted(seeds)
    written = []
    for i in range(300):
        seed_name = names[i % len(names)]
        data = bytearray(seeds[seed_name])
        kind = i // len(names) % 4
        if kind == 1:
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:
            for at in rng.integers(0, len(data), 8):
                data[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 3 and seed_name.endswith(".dcm") and data[128:132] == b"DICM":
            edit = sorted(DICOM_EDITS)[i % len(DICOM_EDITS)]
            with contextlib.suppress(Exception):  # pydicom refused to write that edit: the file stays as it was
                data = bytearray(_edit_dicom(bytes(data), edit))
        path = tmp_path / "data" / f"class{i % 3}" / f"file{i:03d}{Path(seed_name).suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(data))
        written.append(path)
    ds = load_dataset(
        tmp_path / "data", DataConfig(Preprocessing(img_size=16), cache_dir=tmp_path / "cache"), progress=False
    )
    seen = [s.path for s in ds.samples] + [Path(s.path) for s in ds.skipped]
    assert sorted(seen) == sorted(written)
    assert all(len(s.reason) > 10 for s in ds.skipped)
    assert 30 < len(ds.samples) < 270 and len(ds.skipped) > 30
