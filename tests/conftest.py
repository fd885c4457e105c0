"""Shared test helpers and fixtures: tiny synthetic X-ray-like image trees made in tmp_path, toy
tensors, resolved training settings, the metrics.json schema check, the browser, one trained run
shared by the whole session, and the path of the shared dataset.

Markers (registered in pyproject.toml, --strict-markers): ``slow`` (takes more than a few seconds:
training, a whole run, a long fuzzing run), ``browser`` (drives Debian's chromium), ``postgres``
(uses the throw-away PostgreSQL server below), ``processes`` (starts a child process or a server,
and stops it in a finally block). ``make test-fast`` runs everything else. Helpers that are not
fixtures and that test files share without the data here live in helpers.py.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lungxray.config import TrainConfig
from lungxray.infer import to_tensor

# $LUNGXRAY_SHARED_DATA (make test passes DATA), else ../shared next to the checkout. Resolved:
# tests link to its files from tmp_path, where a relative path would point nowhere.
_CANDIDATES = [
    os.environ.get("LUNGXRAY_SHARED_DATA", ""),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "covid19-image-dataset",
]
SHARED_DATA = next((Path(p).resolve() for p in _CANDIDATES if p and Path(p).is_dir()), None)
CLASSES = ("Covid", "Normal", "Viral Pneumonia")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
METRIC_KEYS = {
    "classes",
    "n",
    "loss",
    "accuracy",
    "macro_f1",
    "macro_auroc",
    "per_class",
    "confusion_matrix",
    "ci95",
    "bootstrap",
    "balanced_accuracy",
    "baseline",
    "intervals",
}


def synthetic_image(label: int, index: int, size: int = 32) -> np.ndarray:
    """A 'radiograph' whose class is visible: a bright band at a class-specific place, plus noise."""
    rng = np.random.default_rng(1000 * label + index)
    img = rng.normal(90, 25, (size, size))
    band = slice(label * size // 3, (label + 1) * size // 3)
    img[:, band] += 100
    img[size // 4 + index % 5, :] += 30  # an extra per-image feature so no two images are alike
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tree(
    root: Path, per_class: int = 12, fmt: str = "png", start: int = 0, classes: dict[int, str] | None = None
) -> Path:
    """Class folders of synthetic films under ``root``: ``classes`` maps the films' class (their
    band) to a folder name (default: every class of CLASSES)."""
    for label, name in (classes or dict(enumerate(CLASSES))).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            Image.fromarray(synthetic_image(label, i)).save(folder / f"img{i:03d}.{fmt}")
    return root


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    """``rows`` as a CSV manifest at ``path`` (columns: ``fields``, else the first row's keys)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def png_bomb() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def jpeg_bytes(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **save)
    return buf.getvalue()


def dicom_bytes(
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    voi_function: str | None = None,
    patient: dict | None = None,
    modality: str = "DX",
    view: str = "PA",
    preamble: bool = True,
    syntax: str | None = None,
) -> bytes:
    """A DICOM file of ``stored`` pixel values, (H, W) or (frames, H, W), uint8 or uint16, written
    by pydicom: ``rescale`` (slope, intercept), ``window`` (center, width), ``patient`` (element
    keyword -> value, e.g. {"PatientID": ...}), ``syntax`` a transfer syntax UID (default explicit
    VR little endian; a compressed one is encoded by pydicom's own encoders)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[stored.tobytes().hex()[:4096], repr(patient), photometric]
    )
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = modality, view
    for keyword, value in (patient or {}).items():
        setattr(ds, keyword, value)
    frames = stored.shape[0] if stored.ndim == 3 else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()
    if syntax is not None:
        ds.compress(syntax, encoding_plugin="pylibjpeg" if "4.9" in syntax else "")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue() if preamble else buf.getvalue()[132:]


def toy(n_per_class: int = 10, size: int = 16, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 1, size, size), y (N,)) of synthetic images, ``n_per_class`` of each of 3 classes."""
    images = np.stack([synthetic_image(c, i, size) for c in range(3) for i in range(start, start + n_per_class)])
    labels = np.repeat(np.arange(3), n_per_class)
    return to_tensor(images), torch.from_numpy(labels)


def settings(model: str, params: dict | None = None, **fields) -> TrainConfig:
    """``TrainConfig(**fields)`` resolved against ``model``'s recipe (and ``params``' batch size), as
    the pipeline hands it to ``train.fit``."""
    from lungxray.job import Job

    return Job(Path("."), model=model, train=TrainConfig(**fields)).final.for_params(params)


def check_metrics_schema(metrics: dict, classes: list[str]) -> None:
    """metrics.json has every key, finite headline values, intervals around them and a consistent matrix."""
    assert set(metrics) >= METRIC_KEYS
    assert metrics["classes"] == classes
    assert isinstance(metrics["n"], int) and metrics["n"] > 0
    for key in ("loss", "accuracy", "macro_f1", "balanced_accuracy"):
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key])
    assert metrics["baseline"]["majority_class"] in classes and metrics["baseline"]["auroc"] == 0.5
    assert 0 <= metrics["accuracy"] <= 1
    assert set(metrics["per_class"]) == set(classes)
    for stats in metrics["per_class"].values():
        assert set(stats) == {"precision", "recall", "specificity", "f1", "auroc", "support", "auroc_vs_chance"}
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):  # an interval around the point estimate
        low, high = metrics["ci95"][key]
        assert 0 <= low <= metrics[key] <= high <= 1
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (len(classes), len(classes)) and cm.sum() == metrics["n"]
    assert np.trace(cm) / cm.sum() == pytest.approx(metrics["accuracy"])


def browser_or_skip():
    """Playwright driving Debian's chromium; outside CI a missing browser skips, in CI it fails."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install playwright)"
    if missing is None and not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        missing = f"{CHROMIUM} not found (apt-get install chromium chromium-driver)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run in CI: {missing}")
        pytest.skip(missing)
    return sync_playwright


def cli(*parts) -> int:
    """``lungxray`` run in-process: a str part is split on spaces (flags and values), anything else
    (a Path) is one argument."""
    from lungxray.cli import main

    return main([arg for part in parts for arg in (part.split() if isinstance(part, str) else [str(part)])])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One `lungxray run` on a synthetic tree (16 px, 2 trials, 3 epochs), shared by every test
    that reads a run folder: (data, run folder, root with the cache)."""
    root = tmp_path_factory.mktemp("trained_run")
    data = write_tree(root / "data", per_class=14)
    out = root / "run"
    code = cli(
        "run",
        data,
        "--out",
        out,
        "--img-size 16 --cache-dir",
        root / "cache",
        "--trials 2 --epochs 3 --final-epochs 3 --seed 1 --quiet",
    )
    assert code == 0
    return data, out, root


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


def _postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or in Debian's versioned folder."""
    import glob

    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A throw-away PostgreSQL cluster on 127.0.0.1, run by an unprivileged user, removed after the
    session: yields a function making a fresh database and returning its SQLAlchemy URL. Without a
    server (no Debian package, no user to run it) the tests skip, except under CI=true."""
    import subprocess

    def unavailable(why: str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is needed under CI=true: {why} (.ci/run installs the postgresql package)")
        pytest.skip(f"no PostgreSQL server: {why}")

    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        unavailable("initdb and pg_ctl not found")
    try:
        import psycopg
    except ImportError:
        unavailable("the psycopg driver is not installed (pip install 'lungxray[postgres]')")
    folder = tmp_path_factory.mktemp("postgres")
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: the nobody user runs it
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chmod(folder, 0o777)
        for parent in folder.parents:  # nobody must be able to reach the folder
            if str(parent).startswith(tempfile_root()):
                os.chmod(parent, os.stat(parent).st_mode | 0o711)
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        run_as = ["runuser", "-u", "nobody", "--"]
    data, port = folder / "data", _free_port_number()

    def stop() -> None:
        import contextlib

        stopping = [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"]
        with contextlib.suppress(subprocess.SubprocessError, OSError):  # nothing started, or nothing left to stop
            subprocess.run(stopping, capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)

    try:
        subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "lungxray", "--no-sync"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off"
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        stop()  # a server that started too slowly is not left running
        unavailable(f"the cluster did not start ({exc})")
    made = []

    def database(name: str) -> str:
        with psycopg.connect(f"host=127.0.0.1 port={port} user=lungxray dbname=postgres", autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"postgresql+psycopg://lungxray@127.0.0.1:{port}/{name}"

    try:
        yield database
    finally:
        stop()


def tempfile_root() -> str:
    import tempfile

    return tempfile.gettempdir()


def _free_port_number() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
