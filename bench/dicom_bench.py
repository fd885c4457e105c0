"""DICOM decode throughput next to JPEG and PNG for the same pixels.

Every image of the dataset is decoded once to full-size 8-bit grayscale; those pixels are then
written five ways, all held in memory so the figures compare decoding, not the disk:

  jpeg        a grayscale JPEG (quality 95)
  dicom-jpeg  the same JPEG bitstream inside a DICOM file (JPEG Baseline transfer syntax)
  png         an 8-bit PNG
  dicom-8     an uncompressed 8-bit DICOM file
  dicom-12    an uncompressed 12-bit DICOM file (pixels x 16) with a window, MONOCHROME1

Each is decoded by lungxray's decoder (``decode.decode``, one process, 128 px), the formats
alternating in every round; the median of the rounds gives images/s and the ratio to the JPEG.

    .venv/bin/python bench/dicom_bench.py [DATA] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from lungxray.config import Preprocessing
from lungxray.decode import decode
from lungxray.layout import discover

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402


def dicom_file(pixels: np.ndarray, *, jpeg: bytes | None = None, twelve_bit: bool = False) -> bytes:
    """A DX DICOM file of (H, W) uint8 ``pixels``: the ``jpeg`` bitstream encapsulated, or the
    pixels uncompressed (as 12-bit MONOCHROME1 with a window when ``twelve_bit``)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg is not None else ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if twelve_bit else "MONOCHROME2"
    if jpeg is not None:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
    elif twelve_bit:
        ds.BitsAllocated, ds.BitsStored = 16, 12
        # stored 16 p for MONOCHROME2's p: this window maps 0..4080 onto the 8-bit range exactly
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2040, 4080, "LINEAR_EXACT"
        ds.PixelData = ((255 - pixels.astype(np.uint16)) * 16).astype("<u2").tobytes()
    else:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.PixelData = pixels.tobytes()
    ds.HighBit = ds.BitsStored - 1
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encodings(pixels: np.ndarray) -> dict[str, bytes]:
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=95)
    Image.fromarray(pixels).save(png, format="PNG")
    return {
        "jpeg": jpeg.getvalue(),
        "dicom-jpeg": dicom_file(pixels, jpeg=jpeg.getvalue()),
        "png": png.getvalue(),
        "dicom-8": dicom_file(pixels),
        "dicom-12": dicom_file(pixels, twelve_bit=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=Path("../shared/data/covid19-image-dataset"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    _, files, _ = discover(args.data)
    originals = [np.asarray(Image.open(path).convert("L")) for path, _, _ in files]
    files_by_format: dict[str, list[bytes]] = {}
    for pixels in originals:
        for name, data in encodings(pixels).items():
            files_by_format.setdefault(name, []).append(data)
    names = list(files_by_format)
    for name in names:  # same pixels: the lossless encodings decode to one array
        first = decode(files_by_format[name][0], Preprocessing(img_size=args.size))
        assert first.shape == (args.size, args.size), name
    lossless = [
        decode(files_by_format[n][0], Preprocessing(img_size=args.size)) for n in ("png", "dicom-8", "dicom-12")
    ]
    assert all(np.array_equal(lossless[0], other) for other in lossless[1:]), "lossless encodings differ"
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # a different format first each round
            start = time.perf_counter()
            for data in files_by_format[name]:
                decode(data, Preprocessing(img_size=args.size))
            seconds[name].append(time.perf_counter() - start)
    n = len(originals)
    jpeg_rate = n / statistics.median(seconds["jpeg"])
    rows = []
    for name in names:
        rate = n / statistics.median(seconds[name])
        size = statistics.mean(map(len, files_by_format[name])) / 1024
        rows.append(f"| {name} | {size:.0f} KB | {rate:.0f} | {rate / jpeg_rate:.2f} |")
        print(f"{name:12s} {size:7.0f} KB {rate:8.0f} images/s  {rate / jpeg_rate:5.2f} x jpeg")
    megapixels = statistics.mean(p.size for p in originals) / 1e6
    plugin = pydicom.pixels.get_decoder(JPEGBaseline8Bit).available_plugins
    body = f"""## DICOM decode throughput next to JPEG and PNG for the same pixels

`.venv/bin/python bench/dicom_bench.py {args.data} --rounds {args.rounds}` on {machine()}.

The {n} images of the dataset (mean {megapixels:.2f} M pixels), decoded once to 8-bit grayscale,
then written five ways and decoded from memory by `decode.decode` to {args.size} px, one process,
the formats alternating within each of {args.rounds} rounds (median). `dicom-jpeg` holds the very
bitstream of `jpeg`; `png`, `dicom-8` and `dicom-12` (12 bits, windowed, MONOCHROME1) decode to
the same array (checked). pydicom's JPEG decoders available: {", ".join(plugin)}.

| format | mean file | images/s | vs jpeg |
|---|---|---|---|
{chr(10).join(rows)}

A JPEG file is decoded at the smallest DCT scale at or above {args.size} px (Pillow's draft
mode); pydicom decodes the same bitstream in a DICOM file at full size, which is where
`dicom-jpeg` loses. Uncompressed DICOM needs no inflating, so it beats PNG; its grey-level
chain (modality LUT, window, inversion) runs once per stored value, as a lookup table, not on
full-size float arrays.
"""
    update_section("dicom", body)
    print(body)


if __name__ == "__main__":
    main()
