"""Tiny synthetic X-ray-like image trees made in tmp_path, plus the path of the shared dataset."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import os

_CANDIDATES = [os.environ.get("LUNGXRAY_SHARED_DATA", ""),
               Path(__file__).resolve().parents[2] / "shared" / "data" / "covid19-image-dataset",
               "/work/shared/data/covid19-image-dataset"]
# Resolved: tests link to its files from tmp_path, where a relative path would point nowhere.
SHARED_DATA = next((Path(p).resolve() for p in _CANDIDATES if p and Path(p).is_dir()), None)
CLASSES = ("Covid", "Normal", "Viral Pneumonia")


def synthetic_image(label: int, index: int, size: int = 32) -> np.ndarray:
    """A 'radiograph' whose class is visible: a bright band at a class-specific place, plus noise."""
    rng = np.random.default_rng(1000 * label + index)
    img = rng.normal(90, 25, (size, size))
    band = slice(label * size // 3, (label + 1) * size // 3)
    img[:, band] += 100
    img[size // 4 + index % 5, :] += 30  # an extra per-image feature so no two images are alike
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tree(root: Path, per_class: int = 12, fmt: str = "png", start: int = 0) -> Path:
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            Image.fromarray(synthetic_image(label, i)).save(folder / f"img{i:03d}.{fmt}")
    return root


def png_bomb() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_bytes(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **save)
    return buf.getvalue()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def flat_tree(tmp_path: Path) -> Path:
    """Three class folders of 12 distinct 32x32 PNGs each."""
    return write_tree(tmp_path / "flat")


@pytest.fixture
def split_tree(tmp_path: Path) -> Path:
    """train/ and test/ folders; test/Covid/img000.png is a byte copy of train/Covid/img000.png."""
    root = tmp_path / "split"
    write_tree(root / "train", per_class=10)
    write_tree(root / "test", per_class=4, start=10)
    (root / "test" / "Covid" / "copy_of_train.png").write_bytes((root / "train" / "Covid" / "img000.png").read_bytes())
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if SHARED_DATA is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shared dataset not found; set LUNGXRAY_SHARED_DATA to covid19-image-dataset")
        pytest.skip("shared dataset not found; set LUNGXRAY_SHARED_DATA to covid19-image-dataset")
    return SHARED_DATA
