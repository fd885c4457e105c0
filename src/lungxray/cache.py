"""The on-disk cache of preprocessed images, keyed by file content hash; safe to delete at any time.

Holds ``PreprocessCache`` only: what it stores and how it finds an unchanged file without reading
it again (one status call per file, and one listing of the cache's folder for all of them).
Decoding is in ``decode.py``; the scan that fills the cache is in ``data.py``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
import warnings
from pathlib import Path

import numpy as np

from lungxray.config import Preprocessing
from lungxray.runfolder import secret_key, write_text

CACHE_VERSION = 3  # bump when preprocessing changes, so old cache entries are not reused


class PreprocessCache:
    """Content-addressed store of preprocessed images, safe to delete at any time.

    ``index.json`` maps a file path to (size, mtime_ns, sha256), as git's index does, so unchanged
    files are not re-hashed. ``<settings>/<sha256>.u8`` holds the pixels and
    ``<settings>/entries.json`` the perceptual hash (and a DICOM file's patient pseudonym) or the
    reason a file is unusable. Patient IDs are never stored: ``patient_key`` is the key of the
    keyed hash that stands for them. A cache that cannot be written (a full disk, a read-only
    folder) warns once and writes no more images: the scan holds them in memory instead.
    ``beside``: a cache of the same root with other settings, whose index this one shares (one
    scan filling both).
    """

    def __init__(self, root: Path, prep: Preprocessing, beside: PreprocessCache | None = None) -> None:
        self.root = Path(root)
        self.shape = (prep.img_size, prep.img_size)
        options = ("-crop" if prep.crop_borders else "") + (f"-{prep.equalize}" if prep.equalize != "none" else "")
        options += "".join(f"-keep-{what}" for what in sorted(prep.dicom_keep))
        self.folder = self.root / f"v{CACHE_VERSION}-gray-bilinear-{prep.img_size}{options}"
        self._index = beside._index if beside is not None else self._read(self.root / "index.json")
        self._entries = self._read(self.folder / "entries.json")
        self._stored: set[str] | None = None  # the images in ``folder``, listed on first need
        self._made = False  # ``folder`` exists
        self._dirty = False
        self._failed = False  # a write failed: nothing more is written by this scan

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}  # no cache yet, or a damaged one: it is rebuilt

    def lookup(self, path: Path, stat: os.stat_result | None) -> tuple[str, dict] | None:
        """(sha256, entry) when the file is unchanged since it was cached, else None. ``stat``: the
        file's status, read by the caller before it reads the file (None: it has none)."""
        known = self._index.get(str(path))  # discover() yields absolute paths
        if stat is None or not known or known[:2] != [stat.st_size, stat.st_mtime_ns]:
            return None
        entry = self._entries.get(known[2])
        return (known[2], entry) if entry is not None else None

    def has_pixels(self, sha: str) -> bool:
        """The image of ``sha`` is on disk (``pixels`` reads it). One listing of the folder answers
        for every image: an image is written whole or not at all, and ``stack`` removes one found
        damaged."""
        if self._stored is None:
            try:
                self._stored = {name[:-3] for name in os.listdir(self.folder) if name.endswith(".u8")}
            except OSError:
                self._stored = set()
        return sha in self._stored

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

    def put(self, path: Path, sha: str, pixels: np.ndarray | None, entry: dict, stat: os.stat_result | None) -> bool:
        """Remember ``path`` as the file of ``sha`` and keep its ``pixels`` (None: unusable) with
        ``entry``: {"phash", "pixel_hash"[, "patient", "key"]} for a usable image, {"reason"} else.
        ``stat``: the file's status read before the file was (a file changed while it was read
        differs from it, so it is read again next time); None: not remembered. False when the
        cache did not keep the pixels (the caller holds them)."""
        if pixels is not None:
            try:
                self._write_pixels(sha, pixels)
            except OSError as exc:
                self._cannot_write(exc)
                return False
        if stat is not None:
            self._index[str(path)] = [stat.st_size, stat.st_mtime_ns, sha]
            self._entries[sha] = entry
            self._dirty = True
        return True

    def _write_pixels(self, sha: str, pixels: np.ndarray) -> None:
        """``<sha>.u8`` whole or not at all: written aside (a fresh name per call, as
        ``runfolder.atomic_path`` makes, without its cost per file), the bytes written counted,
        closed (a full disk can fail a write only then), then renamed."""
        if self._failed:
            raise OSError(errno.EIO, "an earlier write failed")  # not tried again: said once already
        if not self._made:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._made = True
        folder = os.fspath(self.folder)
        draft = os.path.join(folder, f".{sha}.u8.{uuid.uuid4().hex}.tmp")
        try:
            with open(draft, "wb", buffering=0) as handle:
                written = handle.write(pixels.tobytes())
            if written != pixels.nbytes:
                raise OSError(errno.ENOSPC, f"{written} of {pixels.nbytes} bytes written", draft)
            os.replace(draft, os.path.join(folder, f"{sha}.u8"))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(draft)
            raise
        if self._stored is not None:
            self._stored.add(sha)

    def _cannot_write(self, exc: OSError) -> None:
        """Warn, once per scan, that the cache cannot be written; from now on nothing is written."""
        if not self._failed:
            self._failed = True
            warnings.warn(
                f"the preprocessing cache {self.root} cannot be written ({exc.strerror or exc}): "
                "this scan keeps its images in memory instead; free space there, or set --cache-dir "
                "to a writable folder",
                stacklevel=4,
            )

    def stack(self, shas: list[str], held: dict[str, np.ndarray]) -> np.ndarray:
        """(N, H, W) uint8: the images of ``shas`` in order, as one read-only memory-mapped file
        in the cache (made once per list of images, named by its hash), so that they are read from
        disk pages as they are used rather than held in memory. ``held``: images the cache could
        not keep. Where the file cannot be written, an array in memory."""
        import hashlib

        def image(sha: str) -> np.ndarray:
            found = held[sha] if sha in held else self.pixels(sha)
            if found is None:
                from lungxray.errors import DataError

                (self.folder / f"{sha}.u8").unlink(missing_ok=True)  # damaged: the next scan decodes it again
                raise DataError(
                    f"a cached image vanished from {self.folder} or was damaged during the scan", hint="run it again"
                )
            return found

        shape = (len(shas), *self.shape)
        if not shas:
            return np.zeros(shape, dtype=np.uint8)
        path = self.folder / f"stack-{hashlib.blake2b(''.join(shas).encode(), digest_size=16).hexdigest()}.u8"
        try:
            if not (path.is_file() and path.stat().st_size == int(np.prod(shape))):
                if self._failed:
                    raise OSError(errno.EIO, "an earlier write failed")
                self.folder.mkdir(parents=True, exist_ok=True)
                draft = path.with_name(f".{path.name}.{os.getpid()}")
                try:
                    _reserve(draft, int(np.prod(shape)))
                    # written, not mapped: the pages go to the page cache, never into this
                    # process's memory (5 GB for 100,000 images at 224 px)
                    with open(draft, "r+b") as handle:
                        for start in range(0, len(shas), 256):
                            handle.write(b"".join(image(sha).tobytes() for sha in shas[start : start + 256]))
                    os.replace(draft, path)
                finally:
                    draft.unlink(missing_ok=True)
            return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
        except OSError as exc:  # a cache that cannot be written: in memory
            self._cannot_write(exc)
            return np.stack([image(sha) for sha in shas])

    def save(self) -> None:
        """Write the index and the entries; a cache that cannot be written warns (once) instead."""
        if self._dirty:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                write_text(self.root / "index.json", json.dumps(self._index))
                write_text(self.folder / "entries.json", json.dumps(self._entries))
            except OSError as exc:
                self._cannot_write(exc)
            self._dirty = False


def _reserve(path: Path, size: int) -> None:
    """Make ``path`` a file of ``size`` bytes whose disk blocks are allocated now, so that a full
    disk fails here (OSError) rather than as SIGBUS on writing through a memory map of it."""
    with open(path, "wb") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except (AttributeError, OSError) as exc:  # no posix_fallocate here, or not on this file system
            if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            handle.truncate(size)
