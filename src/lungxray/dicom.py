"""DICOM files -> the (H, W) uint8 grayscale film a reading workstation shows, and its PatientID.

Holds the DICOM side of decoding: recognising a DICOM file (the ``DICM`` preamble, or a ``.dcm``
name), the checks that keep what a chest-film classifier should not read out (multi-frame series,
other modalities, lateral views; each kept by a ``--dicom-keep`` value), and the grey-level chain:
stored values -> modality LUT (rescale slope/intercept) -> VOI LUT or window -> 8 bits, inverted
for MONOCHROME1. Every step but the last is pydicom's own (``pydicom.pixels``). Compressed
transfer syntaxes decode through pydicom's plugins (the ``lungxray[dicom]`` extra installs
pylibjpeg and its JPEG, JPEG 2000 and RLE decoders).

What it does not do: resize, crop or equalise (``decode.py`` does, for every format alike), or
keep any patient data: the PatientID leaves here only to be hashed by the scan (``data.py``), and
messages about a file never quote its identifying elements.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np

from lungxray.config import MAX_PIXELS
from lungxray.errors import UnusableImage

RADIOGRAPHY = ("CR", "DX", "DR")  # computed and digital radiography
LATERAL = ("LL", "RL")  # ViewPosition of a lateral film
EXTRA = "pip install 'lungxray[dicom]'"
# Elements whose values must never appear in a message (they reach logs, reports and HTTP answers).
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "IssuerOfPatientID",
)


def _drop(record: logging.LogRecord) -> bool:
    return False


def _quiet_pydicom() -> None:
    """Keep pydicom's own messages out of logs and shown warnings: pydicom reports header problems
    with the element's value (a malformed birth date, an over-long name), which a logging setup or
    a printed warning would carry into a log file. Every pydicom logger drops its records (a
    filter, whatever handlers are attached) and stops passing them to the application's, and
    pydicom's warnings are ignored; process-wide, as ``warnings.catch_warnings`` is not
    thread-safe and the service decodes in threads. Repeated on every read: each call replaces its
    own filters (test runners reset warning filters between tests)."""
    names = [n for n in list(logging.root.manager.loggerDict) if n == "pydicom" or n.startswith("pydicom.")]
    for name in names:
        logging.getLogger(name).addFilter(_drop)  # added once: addFilter skips a filter already there
    logging.getLogger("pydicom").propagate = False
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    warnings.filterwarnings("ignore", module=r"lungxray\.dicom$")  # a pydicom warning that names its caller


def is_dicom(data: bytes, name: str = "") -> bool:
    """A DICOM file: the ``DICM`` marker after the 128-byte preamble, or a ``.dcm``/``.dicom`` name
    (files written without the preamble)."""
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def read(data: bytes, keep: tuple[str, ...] = ()) -> tuple[np.ndarray, str | None]:
    """A DICOM file's bytes -> ((H, W) uint8 grayscale as displayed, PatientID or None when blank).

    ``keep`` names what is used instead of skipped (``config.DICOM_KEEP``): the first frame of a multi-frame
    file, a lateral view, a modality other than CR/DX/DR. Raises UnusableImage with a reason that
    quotes no patient data."""
    import pydicom

    _quiet_pydicom()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        identity = _identity(ds)
        patient = str(ds.get("PatientID", "") or "").strip() or None
    except Exception as exc:  # noqa: BLE001 - a damaged header breaks pydicom's parser in any way
        # Only the exception's type: before the header is read, its values cannot be scrubbed.
        raise UnusableImage(f"not a readable DICOM file ({type(exc).__name__} in its header)") from None
    try:
        _check(ds, keep)
        return _to_gray(ds, multiframe=int(ds.get("NumberOfFrames") or 1) > 1), patient
    except UnusableImage as exc:
        raise UnusableImage(_scrub(str(exc), identity)) from None
    except Exception as exc:  # noqa: BLE001 - as above, for the pixel data and its decoders
        raise UnusableImage(_decode_failure(ds, exc, identity)) from None
    except BaseException as exc:
        # A decoder written in Rust (through pyo3) reports a bug as PanicException, which derives
        # from BaseException; a damaged file must not end the scan or the service.
        if type(exc).__name__ != "PanicException":
            raise
        raise UnusableImage(_decode_failure(ds, exc, identity)) from None


def _identity(ds) -> list[str]:
    """The identifying values of ``ds`` (strings of 2 or more characters), longest first."""
    from pydicom.multival import MultiValue

    values = []
    for keyword in IDENTIFYING:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - an undecodable element: nothing to scrub from it
            continue
        items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        values += [str(v).strip() for v in items if v is not None and len(str(v).strip()) >= 2]
    return sorted(set(values), key=len, reverse=True)


def _scrub(message: str, identity: list[str]) -> str:
    for value in identity:
        message = message.replace(value, "[patient data removed]")
    return message


def _describe(exc: BaseException, identity: list[str]) -> str:
    """``Type: message``, patient data scrubbed before the message is shortened to 200 characters
    (shortened first, a value cut at the end would survive)."""
    text = _scrub(" ".join(str(exc).split()), identity)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _check(ds, keep: tuple[str, ...]) -> None:
    """UnusableImage when ``ds`` is not a single frontal radiograph (unless ``keep`` says use it)."""
    if "PixelData" not in ds:
        raise UnusableImage("DICOM file without pixel data (a report, a structured report or another non-image object)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1 and "multiframe" not in keep:
        raise UnusableImage(
            f"DICOM file of {frames} frames (a series or a cine loop); "
            "a model trained with --dicom-keep multiframe reads its first frame"
        )
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality not in RADIOGRAPHY and "any-modality" not in keep:
        raise UnusableImage(
            f"DICOM modality {modality or '(missing)'}, not a radiograph ({', '.join(RADIOGRAPHY)}); "
            "a model trained with --dicom-keep any-modality reads it"
        )
    view = str(ds.get("ViewPosition") or "").strip().upper()
    if view in LATERAL and "lateral" not in keep:
        raise UnusableImage(f"lateral view (ViewPosition {view}); a model trained with --dicom-keep lateral reads it")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or columns <= 0:
        raise UnusableImage(f"DICOM image of {rows} x {columns} pixels (Rows and Columns must be positive)")
    if rows * columns > MAX_PIXELS:
        raise UnusableImage(
            f"{columns} x {rows} pixels, more than the {MAX_PIXELS // 10**6} M an X-ray needs "
            "(decoding it would take gigabytes); downscale it first"
        )


def _decode_failure(ds, exc: BaseException, identity: list[str]) -> str:
    """The reason a pixel-data failure gives: for compressed data no installed decoder reads, what
    to install (or that nothing will read it)."""
    from pydicom.pixels import get_decoder

    try:
        syntax = ds.file_meta.TransferSyntaxUID
        compressed = syntax.is_compressed
    except Exception:  # noqa: BLE001 - no file meta, or a UID that is not a transfer syntax
        compressed = False
    if not compressed:
        return f"cannot decode the DICOM pixel data ({_describe(exc, identity)})"
    compressed = f"DICOM pixel data compressed as {syntax.name} ({syntax})"
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:  # no decoder exists for it (MPEG and HEVC video, for instance)
        return f"{compressed}, which lungxray cannot read; export the film as uncompressed DICOM or PNG"
    if not available:
        return f"{compressed}, which no installed decoder reads; install the optional decoders: {EXTRA}"
    failure = f"cannot decode the {compressed} ({_describe(exc, identity)})"
    if not _extra_installed():  # e.g. Pillow decodes JPEG, but not 12-bit JPEG Extended
        return f"{failure}; the optional decoders may read it: {EXTRA}"
    return failure


def _extra_installed() -> bool:
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("pylibjpeg", "libjpeg", "openjpeg"))


def _to_gray(ds, multiframe: bool) -> np.ndarray:
    """(H, W) uint8: the first (or only) frame through the modality LUT, the VOI LUT or window,
    scaled to 0-255 and inverted for MONOCHROME1."""
    from pydicom.pixels import apply_color_lut

    ds.pixel_array_options(index=0 if multiframe else None)  # decode only the frame used
    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)  # uint8 or uint16, by the LUT's entries
    if arr.ndim == 3:  # (H, W, 3): colour, converted to RGB by pydicom; the luma Pillow's convert("L") uses
        gray = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if photometric == "PALETTE COLOR":
            low, high = 0.0, float(np.iinfo(arr.dtype).max)
        else:
            low, high = (0.0, 255.0) if int(ds.get("BitsStored") or 8) <= 8 else (gray.min(), gray.max())
        return _to_uint8(gray, low, high, invert=False)
    if arr.ndim != 2:
        raise UnusableImage(f"DICOM pixel data of shape {arr.shape}, not one grayscale or colour image")
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize > 2:
        return _grey_levels(arr, None, ds, photometric)
    # Every step is a function of the stored value alone, so it runs once per possible value (at
    # most 65,536) and the film is looked up: exact, and 5-10x faster than float arrays the size
    # of the film (bench/dicom_bench.py).
    lowest = int(arr.min())
    index = arr.astype(np.int32) - lowest if arr.dtype.kind == "i" else arr - arr.dtype.type(lowest)  # (H, W)
    domain = np.arange(lowest, int(arr.max()) + 1).astype(arr.dtype)  # every stored value in range
    present = np.zeros(len(domain), dtype=bool)
    if "ModalityLUTSequence" in ds or float(ds.get("RescaleSlope") or 1) < 0:  # may not be monotone
        present[np.unique(index)] = True
    else:  # monotone: the film's range ends at its lowest and highest stored values
        present[[0, -1]] = True
    return _grey_levels(domain, present, ds, photometric)[index]


def _grey_levels(stored: np.ndarray, present: np.ndarray | None, ds, photometric: str) -> np.ndarray:
    """Stored values -> uint8 grey levels, same shape. ``present`` marks values that span the
    film's range (None: all of ``stored``): a film without a window is stretched over it."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(stored, ds)  # rescale slope/intercept or a modality LUT
    held = values if present is None else values[present]
    if _has_voi_lut(ds):
        values = apply_voi(values, ds)
        low, high = 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        values = apply_windowing(values, ds)
        # The window's output range as pydicom computes it (from the bit depth and rescale):
        # the values far below and far above the window land on its ends.
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
    elif int(ds.get("BitsStored") or 8) <= 8 and values.dtype.kind in "ui" and held.min() >= 0:
        low, high = 0.0, 255.0  # an 8-bit film reads as an 8-bit PNG of the same pixels does
    else:
        # No window: stretch the film's own range, as a viewer does and as decode does for
        # 16-bit PNGs (12 of 16 bits used would otherwise come out almost black).
        low, high = float(held.min()), float(held.max())
    return _to_uint8(values, low, high, invert=photometric == "MONOCHROME1")


def _has_voi_lut(ds) -> bool:
    sequence = ds.get("VOILUTSequence")
    return bool(sequence) and None not in (sequence[0].get("LUTDescriptor"), sequence[0].get("LUTData"))


def _to_uint8(values: np.ndarray, low: float, high: float, invert: bool) -> np.ndarray:
    """(H, W) values in [low, high] -> uint8 0-255; MONOCHROME1 (low is white) inverted.

    The inversion is (high - v) rather than 255 minus the result, so a MONOCHROME1 film and its
    MONOCHROME2 twin (stored values mirrored) go through the same arithmetic and round alike."""
    values = values.astype(np.float64)
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = ((high - values) if invert else (values - low)) * (255.0 / (high - low))
    # Rounded to 6 decimals first: a window puts many values exactly on a half grey level, and the
    # last bit of float noise would otherwise round a film and its mirrored twin apart.
    return np.rint(np.round(np.clip(scaled, 0.0, 255.0), 6)).astype(np.uint8)
