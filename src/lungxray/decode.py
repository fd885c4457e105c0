"""Decoding: the bytes of one image file -> a preprocessed (size, size) uint8 grayscale array.

Every format Pillow reads (JPEG decoded at a reduced DCT scale, PNG, 8- and 16-bit, EXIF
orientation applied) and DICOM (through ``dicom.py``); every file it cannot use raises
``UnusableImage`` with a one-line reason (empty, not an image, truncated, a decompression bomb, an
unsupported mode, a DICOM file that is not a frontal radiograph). The preprocessing options
(``--crop-borders``, ``--equalize``, ``--dicom-keep``) are applied here too, so training,
evaluation and serving repeat them from the bundle's config. Used by the dataset scan and by the
serving side alike; imports no torch.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lungxray import dicom
from lungxray.config import EQUALIZE, MAX_PIXELS, Preprocessing
from lungxray.errors import MissingInputError, UnusableImage


def _to_gray_uint8(img: Image.Image) -> Image.Image:
    """Any supported mode -> 8-bit grayscale image."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High-bit-depth X-rays often use 10-14 of 16 bits: stretch each image's own range so a
        # 12-bit image does not come out almost black.
        arr = np.asarray(img, dtype=np.float32)
        low, high = float(arr.min()), float(arr.max())
        arr = (arr - low) * (255.0 / (high - low)) if high > low else np.zeros_like(arr)
        return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")
    if img.mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La"):
        return img.convert("L")
    raise UnusableImage(f"unsupported image mode {img.mode!r}; save it as 8- or 16-bit grayscale or RGB")


MAX_FILE_BYTES = 256 * 1024 * 1024


def read_image_file(path: Path) -> bytes:
    """The bytes of an image file: only a regular file (a FIFO would hang, /dev/zero never end),
    at most MAX_FILE_BYTES; UnusableImage says why not."""
    import stat

    info = os.stat(path)  # follows symbolic links, as opening the file would
    if not stat.S_ISREG(info.st_mode):
        raise UnusableImage("not a regular file (a folder, a pipe or a device); pass image files")
    if info.st_size > MAX_FILE_BYTES:
        raise UnusableImage(
            f"file of {info.st_size / 2**20:.0f} MB, larger than the {MAX_FILE_BYTES // 2**20} MB limit"
        )
    return Path(path).read_bytes()


def image_files(paths: list[Path]) -> list[Path]:
    """``paths`` with every folder replaced by the files under it (sorted, hidden ones left out);
    MissingInputError for a folder that holds none."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = (p for p in path.rglob("*") if p.is_file())
            found = sorted(p for p in inside if not any(x.startswith(".") for x in p.relative_to(path).parts))
            if not found:
                raise MissingInputError(
                    f"{path} holds no image files (looked in it and its sub-folders for any file not hidden)",
                    hint="pass the folder that holds the X-rays (JPEG, PNG, DICOM ...), or the files themselves",
                )
            files += found
        else:
            files.append(path)
    return files


def crop_borders(gray: np.ndarray, tolerance: float = 3.0, most: float = 0.25) -> np.ndarray:
    """(H, W) uint8 without its uniform borders: rows and columns at the edges whose grey levels
    hardly vary (standard deviation under ``tolerance``: black or white frames, padding), at most
    ``most`` of the side from each edge, so a nearly flat image is never cropped to nothing.

    Written here because neither Pillow (``getbbox`` wants one border colour) nor scikit-image
    trims per side by uniformity: a film often has a black frame on one side and a white one on
    another."""

    def span(keep: np.ndarray, n: int) -> tuple[int, int]:
        limit = int(n * most)
        inside = np.flatnonzero(keep)
        if not len(inside):
            return 0, n
        return min(int(inside[0]), limit), max(int(inside[-1]) + 1, n - limit)

    h, w = gray.shape
    # Rows first, then columns of what is left (a white band along the top would otherwise make
    # every column of a black side frame vary), then rows again for frames under side frames.
    top, bottom = span(gray.std(axis=1) >= tolerance, h)
    left, right = span(gray[top:bottom].std(axis=0) >= tolerance, w)
    inner_top, inner_bottom = span(gray[top:bottom, left:right].std(axis=1) >= tolerance, bottom - top)
    limit = int(h * most)
    top, bottom = min(top + inner_top, limit), max(top + inner_bottom, h - limit)
    return gray[top:bottom, left:right]


def equalize(gray: np.ndarray, method: str) -> np.ndarray:
    """(H, W) uint8 with its grey levels spread: ``hist`` (global histogram equalisation), ``clahe``
    (contrast-limited adaptive equalisation in 8x8 tiles, clip limit 0.01: scikit-image's
    defaults), ``none``. Flat images come back unchanged."""
    if method == "none" or gray.min() == gray.max():
        return gray
    from skimage import exposure

    if method == "hist":
        out = exposure.equalize_hist(gray, nbins=256)
    elif method == "clahe":
        out = exposure.equalize_adapthist(gray, clip_limit=0.01, nbins=256)
    else:
        raise ValueError(f"equalize must be one of {', '.join(EQUALIZE)}, got {method!r}")
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def equalize_together(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> the same with one grey-level map for all of them: histogram equalisation
    of their pooled histogram, the map scikit-image's ``equalize_hist(images, nbins=256)`` applies
    to the whole stack (its cumulative distribution at each grey level). Written as a 256-entry
    table because ``equalize_hist`` makes float64 copies of the stack (8 bytes per pixel: 1.3 GB
    for 10,000 films at 128x128). A flat stack comes back unchanged."""
    images = np.asarray(images)
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(images), 4096):  # a memory-mapped stack, read a chunk at a time
        counts += np.bincount(images[start : start + 4096].ravel(), minlength=256)
    if np.count_nonzero(counts) < 2:
        return np.array(images)
    table = np.rint(np.cumsum(counts) / counts.sum() * 255.0).astype(np.uint8)
    return table[images]


def normalise_sites(images: np.ndarray, sites: list[str | None]) -> np.ndarray:
    """``--site-normalise``: each site's images mapped by ``equalize_together`` of that site's images
    (histogram matching of the site's pooled grey levels to one reference, the uniform
    distribution), so that a hospital's exposure and processing no longer tell it apart while
    the differences between its own films stay. Images without a site are mapped one by one.
    Uses no label: a new hospital's films are mapped from their own grey levels alone."""
    out = np.empty(images.shape, dtype=np.uint8)
    rows_of: dict[str | None, list[int]] = {}
    for i, site in enumerate(sites):
        rows_of.setdefault(site, []).append(i)
    for site, rows in rows_of.items():
        if site is None:
            for i in rows:
                out[i] = equalize_together(images[i][None])[0]
        else:
            out[rows] = equalize_together(images[rows])
    return out


def decode(data: bytes, prep: Preprocessing, name: str = "") -> np.ndarray:
    """Encoded bytes -> (img_size, img_size) uint8 grayscale as ``prep`` says (crop the borders,
    resize, equalise; which DICOM files to use); raises UnusableImage with a reason. ``name``: the
    file's name, which marks a DICOM file written without its preamble (``.dcm``)."""
    return decode_with_patient(data, prep, name)[0]


def decode_with_patient(data: bytes, prep: Preprocessing, name: str = "") -> tuple[np.ndarray, str | None]:
    """As ``decode``, with the DICOM PatientID (None for other formats, or when blank). The ID is
    for the scan to hash at once; it must not be stored or printed."""
    if not data:
        raise UnusableImage("empty file (zero bytes)")
    if dicom.is_dicom(data, name):
        gray, patient = dicom.read(data, prep.dicom_keep)
        image = Image.fromarray(gray)
    else:
        image, patient = _read_with_pillow(data, prep.img_size), None
    return _as_input(image, prep), patient


def preprocess_image(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """An image already decoded (a Pillow image in any mode ``decode`` reads) -> (img_size, img_size)
    uint8, as ``decode`` makes it from the file's bytes: EXIF orientation, grayscale (16-bit and
    float images stretched from their own range), then ``prep``'s crop, resize and equalisation.
    A JPEG opened by the caller is decoded at full scale, not at ``decode``'s reduced DCT scale."""
    return _as_input(_to_gray_uint8(ImageOps.exif_transpose(image)), prep)


def _as_input(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """An 8-bit grayscale image -> (img_size, img_size) uint8: borders cropped, resized, equalised."""
    if prep.crop_borders:
        image = Image.fromarray(crop_borders(np.asarray(image)))
    image = image.resize((prep.img_size, prep.img_size), Image.Resampling.BILINEAR)
    return equalize(np.asarray(image, dtype=np.uint8), prep.equalize)


def display_gray(data: bytes, prep: Preprocessing, name: str = "", long_side: int = 1024) -> np.ndarray:
    """The file as a person looks at it: (H, W) uint8 grayscale at its own aspect ratio, at most
    ``long_side`` pixels on its long side, cropped as the model's input is (``prep.crop_borders``),
    so a map of the model's square input stretches back onto it. Raises UnusableImage as ``decode``
    does."""
    if not data:
        raise UnusableImage("empty file (zero bytes)")
    if dicom.is_dicom(data, name):
        image = Image.fromarray(dicom.read(data, prep.dicom_keep)[0])
    else:
        image = _read_with_pillow(data, long_side)
    if prep.crop_borders:
        image = Image.fromarray(crop_borders(np.asarray(image)))
    scale = long_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)  # fmt: skip
    return np.asarray(image, dtype=np.uint8)


def _read_with_pillow(data: bytes, img_size: int) -> Image.Image:
    """Any format Pillow reads -> 8-bit grayscale image (a JPEG decoded at the smallest DCT
    scale at or above ``img_size``)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both as a bomb.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                # JPEG only: decode at the smallest DCT scale >= img_size and in grayscale.
                img.draft("L", (img_size, img_size))
                if img.width * img.height > MAX_PIXELS:  # the size to decode (a JPEG's after draft), from its header
                    raise UnusableImage(
                        f"{img.width} x {img.height} pixels, more than the {MAX_PIXELS // 10**6} M an X-ray needs "
                        "(decoding it would take gigabytes); downscale it first"
                    )
                return _to_gray_uint8(ImageOps.exif_transpose(img))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UnusableImage(f"too many pixels (possible decompression bomb): {exc}") from None
        except UnidentifiedImageError:
            raise UnusableImage("not an image Pillow can read (unknown format or wrong content)") from None
        except UnusableImage:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UnusableImage(f"cannot decode image: {exc}") from None
