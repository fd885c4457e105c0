"""The on-disk cache of preprocessed images, keyed by file content hash; safe to delete at any time.

Holds ``PreprocessCache`` only: what it stores and how it finds an unchanged file without reading
it again. Decoding is in ``decode.py``; the scan that fills the cache is in ``data.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lungxray.runfolder import secret_key, write_text

CACHE_VERSION = 3  # bump when preprocessing changes, so old cache entries are not reused


class PreprocessCache:
    """Content-addressed store of preprocessed images, safe to delete at any time.

    ``index.json`` maps a file path to (size, mtime_ns, sha256), as git's index does, so unchanged
    files are not re-hashed. ``<settings>/<sha256>.npy`` holds the pixels and
    ``<settings>/entries.json`` the perceptual hash (and a DICOM file's patient pseudonym) or the
    reason a file is unusable. Patient IDs are never stored: ``patient_key`` is the key of the
    keyed hash that stands for them.
    """

    def __init__(
        self, root: Path, img_size: int, *, crop: bool = False, equalize: str = "none", dicom_keep: tuple = ()
    ) -> None:
        self.root = Path(root)
        self.shape = (img_size, img_size)
        options = ("-crop" if crop else "") + (f"-{equalize}" if equalize != "none" else "")
        options += "".join(f"-keep-{what}" for what in sorted(dicom_keep))
        self.folder = self.root / f"v{CACHE_VERSION}-gray-bilinear-{img_size}{options}"
        self._index = self._read(self.root / "index.json")
        self._entries = self._read(self.folder / "entries.json")
        self._dirty = False

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}  # no cache yet, or a damaged one: it is rebuilt

    def lookup(self, path: Path) -> tuple[str, dict] | None:
        """(sha256, entry) when the file is unchanged since it was cached, else None."""
        key = str(path)  # discover() yields absolute paths
        stat = path.stat()
        known = self._index.get(key)
        if not known or known[:2] != [stat.st_size, stat.st_mtime_ns]:
            return None
        entry = self._entries.get(known[2])
        return (known[2], entry) if entry is not None else None

    def pixels(self, sha: str) -> np.ndarray | None:
        # Raw bytes, shape known from the settings: np.load's header parsing cost more than the read.
        try:
            return np.fromfile(self.folder / f"{sha}.u8", dtype=np.uint8).reshape(self.shape)
        except (OSError, ValueError):
            return None  # missing or damaged: decoded again

    def patient_key(self) -> bytes:
        """The 32-byte key of the patient pseudonyms in this cache: ``patient-key`` in the cache
        folder, made on first use and readable by its owner only. DataError when it can be neither
        read nor made: a key of this process alone would give one patient two pseudonyms (cached
        and new films), and the split would part them."""
        from lungxray.errors import DataError

        try:
            return secret_key(self.root / "patient-key")
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot read or make the patient key {self.root / 'patient-key'} ({exc})",
                hint="fix its permissions, delete a damaged one, or set --cache-dir to a folder of your own",
            ) from None

    @staticmethod
    def key_id(key: bytes) -> str:
        """A short fingerprint of a patient key: entries hashed with another key are decoded again."""
        import hashlib

        return hashlib.blake2b(key, digest_size=4).hexdigest()

    def put(
        self,
        path: Path,
        sha: str,
        pixels: np.ndarray | None,
        phash: str | None,
        reason: str | None,
        patient: str | None = None,
        key_id: str | None = None,
    ) -> None:
        stat = path.stat()
        self._index[str(path)] = [stat.st_size, stat.st_mtime_ns, sha]
        if pixels is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            pixels.tofile(self.folder / f"{sha}.u8")
            self._entries[sha] = {"phash": phash} | ({"patient": patient, "key": key_id} if patient else {})
        else:
            self._entries[sha] = {"reason": reason}
        self._dirty = True

    def save(self) -> None:
        if self._dirty:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text(self.root / "index.json", json.dumps(self._index))
            write_text(self.folder / "entries.json", json.dumps(self._entries))
            self._dirty = False
