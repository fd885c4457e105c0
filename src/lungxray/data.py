"""Folder of X-rays -> samples (path, label, group, hashes) and preprocessed pixel arrays.

Holds: discovery of both dataset layouts, the parallel scan that reads, hashes and decodes every
file once (through the cache), and the assembly of the ``Dataset`` with its duplicate groups.
Decoding one file is ``decode.py``, the cache ``cache.py``, the duplicate search ``duplicates.py``.
It does not split (see ``splits.py``) and does not import torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from lungxray.cache import PreprocessCache
from lungxray.config import DataConfig, Preprocessing
from lungxray.decode import decode_with_patient, normalise_sites, read_image_file
from lungxray.duplicates import find_duplicate_groups
from lungxray.errors import DataError, UnusableImage
from lungxray.layout import Skipped, join_groups, known_paths, read_groups, read_paths
from lungxray.manifest import column_summary, locate
from lungxray.targets import conflicting, finding_summary


@dataclass
class Sample:
    """One usable image: the sample contract used everywhere (image rows align with samples)."""

    path: Path
    label: str
    folder_split: str | None  # "train"/"val"/"test" for the split-folder layout, else None
    sha256: str  # of the file's bytes
    pixel_hash: str  # of the preprocessed pixels: equal hashes mean identical images
    phash: str  # 64-bit perceptual hash (hex) of the preprocessed image
    group: int = -1  # duplicate cluster; samples sharing a group are one unit in every split
    patient: str | None = None  # keyed hash of a DICOM file's PatientID (``pseudonym``), never the ID
    site: str | None = None  # hospital or collection: a manifest's site column, or the DATA root
    meta: dict[str, str] = field(default_factory=dict)  # a manifest's other columns (view, sex, age)
    targets: tuple[float, ...] | None = None  # multi-label: per finding (``Dataset.classes``) 1.0, 0.0, NaN unknown


@dataclass
class Dataset:
    """Scanned dataset: usable samples, their pixels, skipped files and duplicate structure."""

    root: Path
    layout: str  # "flat" (class folders) or "split" (train/ test/ [val/] holding class folders)
    classes: list[str]
    samples: list[Sample]
    images: np.ndarray  # (N, H, W) uint8
    skipped: list[Skipped] = field(default_factory=list)
    duplicate_groups: list[list[int]] = field(default_factory=list)  # sample indices, size >= 2
    cross_split_duplicates: list[tuple[int, int]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # paths left out by --exclude
    groups_file: str | None = None  # the --groups CSV joined into the groups, if any
    patients_joined: bool = False  # DICOM patients joined into the groups (--dicom-patients)
    sources: list[str] = field(default_factory=list)  # the DATA entries: folders and CSV manifests
    manifest_patients: int = 0  # images whose patient a manifest names (joined into the groups)
    task: str = "single"  # or "multilabel": ``classes`` are findings, each film any number of them
    unnamed_negative: bool = False  # multi-label: a finding no film names is negative, not unknown

    @property
    def sites(self) -> list[str]:
        """The sites the samples come from (sorted); empty when the data names none."""
        return sorted({s.site for s in self.samples if s.site is not None})

    def site_class_counts(self) -> dict[str, dict[str, int]]:
        """site -> class -> images (every class listed, zeros included); multi-label: positive films."""
        table = {site: dict.fromkeys(self.classes, 0) for site in self.sites}
        for s, row in zip(self.samples, self.targets == 1, strict=True):
            for c in np.flatnonzero(row) if s.site is not None else ():
                table[s.site][self.classes[c]] += 1
        return table

    def site_codes(self) -> np.ndarray:
        """(N,) int64: each sample's index in ``sites``, -1 where it has none."""
        index = {site: i for i, site in enumerate(self.sites)}
        return np.array([index.get(s.site, -1) for s in self.samples], dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class index; multi-label: the code of each distinct label (never for learning or splits)."""
        if self.task == "multilabel":
            return np.unique([s.label for s in self.samples], return_inverse=True)[1].astype(np.int64)
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[s.label] for s in self.samples], dtype=np.int64)

    @property
    def targets(self) -> np.ndarray:
        """(N, F) float32 per finding of ``classes``: 1.0, 0.0, NaN unknown; single-label: one-hot of labels."""
        if self.task == "multilabel":
            return np.array([s.targets for s in self.samples], dtype=np.float32).reshape(
                len(self.samples), len(self.classes)
            )
        return np.eye(len(self.classes), dtype=np.float32)[self.labels]

    @property
    def groups(self) -> np.ndarray:
        return np.array([s.group for s in self.samples], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """Images per class; multi-label: positive films per finding."""
        return dict(zip(self.classes, (self.targets == 1).sum(axis=0).tolist(), strict=True))

    def summary(self) -> dict:
        """JSON-ready description, the shape printed by ``lungxray scan --json``."""
        rel = lambda i: str(self.samples[i].path)  # noqa: E731
        sites = [s.site for s in self.samples]
        by_split: dict[str, dict[str, int]] = {}
        for s in self.samples:
            if s.folder_split:
                by_split.setdefault(s.folder_split, Counter(dict.fromkeys(self.classes, 0)))[s.label] += 1
        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": self.classes,
            "counts": self.counts(),
            "counts_by_folder": by_split,
            "n_images": len(self.samples),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "duplicate_groups": [[rel(i) for i in g] for g in self.duplicate_groups],
            "cross_split_duplicates": [[rel(a), rel(b)] for a, b in self.cross_split_duplicates],
            "mixed_label_duplicate_groups": [  # copies with different labels (multi-label: different targets)
                [{"path": rel(i), "label": self.samples[i].label} for i in g]
                for g in conflicting(self.duplicate_groups, self.targets)
            ],
            "groups": self.group_sizes(),
            "patients": self.patient_counts(),
            "excluded": self.excluded,
            "sources": self.sources,
            "sites": self.site_class_counts(),
            "manifest_patients": self.manifest_patients,
            "metadata": {
                col: column_summary([s.meta.get(col, "") for s in self.samples])
                for col in sorted({k for s in self.samples for k in s.meta})
            },
        } | (finding_summary(self.targets, self.classes, sites) if self.task == "multilabel" else {})

    def rekey_patients(self, key: bytes) -> None:
        """Replace the cache's patient pseudonyms by ones keyed with ``key`` (a run folder's), so
        the pseudonyms in one run's files cannot be matched with another run's."""
        for s in self.samples:
            s.patient = pseudonym(s.patient, key) if s.patient else None

    def patient_counts(self) -> dict:
        """Patients named by DICOM headers: how many, how many of the images they cover, and how
        many patients have 1, 2, ... images (keyed pseudonyms only; no ID)."""
        per_patient: dict[str, int] = {}
        for s in self.samples:
            if s.patient:
                per_patient[s.patient] = per_patient.get(s.patient, 0) + 1
        films: dict[str, int] = {}
        for n in sorted(per_patient.values()):
            films[str(n)] = films.get(str(n), 0) + 1
        return {
            "n": len(per_patient),
            "images": sum(per_patient.values()),
            "images_per_patient": films,
            "grouped": self.patients_joined,
        }

    def group_sizes(self) -> dict:
        """How many groups (patients and duplicate clusters joined) the splits keep whole, the largest."""
        sizes = np.bincount(np.unique(self.groups, return_inverse=True)[1]) if self.samples else np.zeros(0, int)
        return {"n": int(len(sizes)), "largest": int(sizes.max(initial=0)), "file": self.groups_file}


def films_per_patient(patients: dict) -> str:
    """A scan summary's patient counts in words: '9 with 2 images, 6 with 3 images'."""
    return ", ".join(f"{n} with {k} image{'s' * (k != '1')}" for k, n in patients["images_per_patient"].items())


def perceptual_hash(pixels: np.ndarray) -> str:
    """64-bit DCT perceptual hash (hex) of a preprocessed image."""
    import imagehash

    return str(imagehash.phash(Image.fromarray(pixels)))


def pseudonym(patient_id: str, key: bytes) -> str:
    """A patient's stand-in: the keyed BLAKE2b hash (hex, 64 bits) of ``patient_id``. Without the
    key, a list of likely IDs cannot be hashed to find who is who."""
    return hashlib.blake2b(patient_id.encode("utf-8", "surrogateescape"), key=key, digest_size=8).hexdigest()


def _process_file(args: tuple) -> tuple:
    """Worker: read one file once, hash it, decode it. ``args``: (path, preprocessing, *more), each
    of ``more`` another preprocessing of the same bytes. Returns (path, sha, pixels, phash, reason,
    DICOM PatientID or None) for the first, then (pixels, phash, reason) for each of ``more``. The
    ID goes back to the scan in memory only, which hashes it at once."""
    path, *preps = args
    try:
        data = read_image_file(Path(path))
    except (UnusableImage, OSError) as exc:
        reason = str(exc) if isinstance(exc, UnusableImage) else f"cannot read file: {exc.strerror or exc}"
        return path, None, None, None, reason, None, *[(None, None, reason)] * (len(preps) - 1)
    sha = hashlib.sha256(data).hexdigest()
    decoded = [_decode(data, prep, Path(path).name) for prep in preps]
    patient = next((found[3] for found in decoded if found[3]), None)
    return path, sha, *decoded[0][:3], patient, *[found[:3] for found in decoded[1:]]


def _decode(data: bytes, prep: Preprocessing, name: str) -> tuple:
    """(pixels, phash, None, patient) of one file's bytes, or (None, None, reason, None)."""
    try:
        pixels, patient = decode_with_patient(data, prep, name)
    except UnusableImage as exc:
        return None, None, str(exc), None
    return pixels, perceptual_hash(pixels), None, patient


def _decode_all(todo: dict[Path, list[int]], preps: list[Preprocessing], cfg: DataConfig, progress: bool):
    """Yield (path, sha, patient, [(pixels, phash, reason) per preprocessing asked]) for every path
    of ``todo`` (path -> the indices in ``preps`` to decode it with), each file read once, in
    parallel processes when worth it."""
    from lungxray.progress import bar as progress_bar

    args = [(str(p), *(preps[k] for k in ks)) for p, ks in todo.items()]
    workers = min(cfg.workers or os.cpu_count() or 1, len(todo))
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(
            progress_bar(total=len(todo), desc="decoding", unit="img", disable=not progress or not todo)
        )
        if workers <= 1 or len(todo) < 8:
            results = map(_process_file, args)
        else:
            # fork: workers start in milliseconds and only use Pillow/numpy, never torch. Small
            # chunks: the images decoded ahead of the scan wait in memory.
            ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=ctx))
            results = pool.map(_process_file, args, chunksize=min(64, max(1, len(args) // (workers * 8))))
        for path, sha, pixels, phash, reason, patient, *more in results:
            bar.update()
            yield Path(path), sha, patient, [(pixels, phash, reason), *more]


def _pixel_hash(pixels: np.ndarray) -> str:
    return hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest()


def _status(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None  # the read says why


def _load_pixels(files: list[tuple[Path, str, str | None]], cfgs: list[DataConfig], progress: bool) -> list:
    """For each of ``cfgs`` (settings differing in their preprocessing only): per file (sha, pixel
    hash or None when unusable, phash, reason, patient pseudonym), using and filling the cache, and
    where the usable images are: (the cache, the images held in memory because the cache could not
    keep them). A file is read once (one status call, one read) however many settings decode it;
    no image stays in memory otherwise."""
    caches: list[PreprocessCache] = []
    for cfg in cfgs:
        caches.append(PreprocessCache(cfg.cache_dir, cfg.preprocessing, caches[0] if caches else None))
    out: list[dict[Path, tuple]] = [{} for _ in cfgs]
    todo: dict[Path, list[int]] = {}  # file -> the settings it must be decoded with
    key: list[bytes] = []  # the cache's patient key, read when the first patient needs it

    def key_id() -> str:
        key[:] = key or [caches[0].patient_key()]
        return caches[0].key_id(key[0])

    stats = {path: _status(path) for path, _, _ in files}
    for path, _, _ in files:
        for k, cache in enumerate(caches):
            found = _cached(cache, path, stats[path], key_id)
            if found is None:
                todo.setdefault(path, []).append(k)
            else:
                out[k][path] = found
    held: list[dict[str, np.ndarray]] = [{} for _ in cfgs]
    for path, sha, patient_id, decoded in _decode_all(todo, [c.preprocessing for c in cfgs], cfgs[0], progress):
        patient = pseudonym(patient_id, key[0]) if patient_id and key_id() else None
        for k, (pixels, phash, reason) in zip(todo[path], decoded, strict=True):
            digest = _pixel_hash(pixels) if pixels is not None else None
            out[k][path] = (sha, digest, phash, reason, patient)
            if sha is None:
                continue
            entry = (
                {"reason": reason}
                if pixels is None
                else {"phash": phash, "pixel_hash": digest} | ({"patient": patient, "key": key_id()} if patient else {})
            )
            if not caches[k].put(path, sha, pixels, entry, stats[path]) and pixels is not None:
                held[k][sha] = pixels  # the cache cannot keep it (and said so, once): memory must
    for cache in caches:
        cache.save()  # a cache that cannot be written warns, once, itself
    return [(found, (cache, kept)) for found, cache, kept in zip(out, caches, held, strict=True)]


def _cached(cache: PreprocessCache, path: Path, stat: os.stat_result | None, key_id) -> tuple | None:
    """``path``'s record as ``_load_pixels`` gives it, from ``cache``; None: it must be decoded."""
    hit = cache.lookup(path, stat)
    if hit is None:
        return None
    sha, entry = hit
    digest = None
    if "phash" in entry:  # usable: its pixel hash is in the entry, or read from the image
        if entry.get("pixel_hash") and cache.has_pixels(sha):
            digest = entry["pixel_hash"]  # not read now: stack() reads it, or its stack exists
        elif (pixels := cache.pixels(sha)) is not None:
            digest = _pixel_hash(pixels)
    stale = "patient" in entry and entry.get("key") != key_id()  # hashed with another key
    if (digest is not None or "reason" in entry) and not stale:
        return sha, digest, entry.get("phash"), entry.get("reason"), entry.get("patient")
    return None


def load_dataset(
    data,
    cfg: DataConfig | None = None,
    *,
    progress: bool = True,
    min_classes: int = 2,
) -> Dataset:
    """Scan ``data`` (a folder, a CSV manifest, or a list of them: ``manifest.locate``), preprocess
    every image (cached), and find duplicate groups, joined with the patients of DICOM files
    (``cfg.dicom_patients``), of the manifest's patient column and of the ``cfg.groups`` CSV.

    Raises DataError when a class folder has no usable image or fewer than ``min_classes`` classes
    are found (findings: one fewer, each a yes/no). Unusable files are listed in ``Dataset.skipped`` with their reason.
    """
    cfg = cfg or DataConfig()
    # absolute paths: scan.json and the report stay valid from any folder
    located = locate(data, cfg.manifest, cfg.findings, same_classes=min_classes > 1)
    root, layout, files, skipped = located.root, located.layout, located.files, located.skipped
    excluded = []
    if cfg.exclude is not None:
        drop = known_paths(read_paths(cfg.exclude, root), {p for p, _, _ in files}, cfg.exclude, "--exclude")
        excluded = sorted(str(p) for p in drop)
        files = [f for f in files if f[0] not in drop]
    # Duplicates are found on the plain resize, whatever the preprocessing options: equalising
    # and cropping make re-encoded copies look less alike (on the shared dataset, CLAHE and border
    # cropping hid 2 of its 13 duplicate groups), and a missed copy is a leak between splits.
    plain_cfg = replace(cfg, preprocessing=cfg.preprocessing.plain)
    scanned = _load_pixels(files, [plain_cfg] if plain_cfg == cfg else [plain_cfg, cfg], progress)
    (loaded, plain_store), (processed, store) = scanned[0], scanned[-1]
    samples = _usable_samples(files, loaded, processed, skipped, root, located.findings is None)
    for sample in samples:
        origin = located.origins[sample.path]
        sample.site, sample.meta, sample.targets = origin.site, origin.meta, origin.targets
    classes = sorted({s.label for s in samples}) if located.findings is None else located.findings
    need = min_classes - (located.findings is not None)  # one finding is two classes: with it, without
    if len(classes) < need:
        what, fix = ("class folder", "one sub-folder of images per class") if located.findings is None else (
            "finding", "see --label-sep, --finding-cols, --map")  # fmt: skip
        raise DataError(f"found {len(classes)} {what}(s) in {root} ({', '.join(classes) or 'none'}); "
                        f"need at least {need}: {fix}")  # fmt: skip
    shas = [s.sha256 for s in samples]
    pixels = store[0].stack(shas, store[1])  # (N, H, W), memory-mapped from the cache
    plain = pixels if plain_cfg == cfg else plain_store[0].stack(shas, plain_store[1])
    groups, dup_groups, cross = _duplicates(samples, plain, cfg)
    if cfg.preprocessing.site_normalise:  # after the duplicate search, which reads the plain pixels
        pixels = normalise_sites(pixels, [s.site for s in samples])
    if cfg.groups is not None:
        by_path = read_groups(cfg.groups, root, [s.path for s in samples], skipped, [Path(p) for p in excluded])
        groups = join_groups(groups, [by_path.get(s.path) for s in samples])
    listed = [located.origins[s.path].patient for s in samples]
    if any(listed):  # a manifest's patients: IDs are per site (patient 17 of two hospitals is two people)
        groups = join_groups(groups, [f"{s.site}\x00{p}" if p else None for s, p in zip(samples, listed, strict=True)])
    joined = cfg.dicom_patients and any(s.patient for s in samples)
    if joined:
        groups = join_groups(groups, [s.patient for s in samples])
        _warn_of_placeholder_ids(samples)
    for sample, group in zip(samples, groups, strict=True):
        sample.group = int(group)
    groups_file = str(cfg.groups) if cfg.groups is not None else None
    return Dataset(
        root, layout, classes, samples, pixels, skipped, dup_groups, cross, excluded, groups_file, joined,
        located.sources, sum(map(bool, listed)), "single" if located.findings is None else "multilabel",
        located.unnamed_negative,
    )  # fmt: skip


def _usable_samples(files: list, loaded: dict, processed: dict, skipped: list, root: Path, single=True) -> list[Sample]:
    """A ``Sample`` per file both scans (plain and preprocessed) could use; the others are added to
    ``skipped`` with their reason. A class folder left with no usable image is an error (``single``)."""
    samples, usable = [], {}
    for path, label, split in files:
        sha, pixel_hash, phash, reason, patient = loaded[path]
        model_input, reason_processed = processed[path][1], processed[path][3]
        key = (split, label)
        usable.setdefault(key, 0)
        if pixel_hash is None or model_input is None:
            skipped.append(Skipped(str(path), reason or reason_processed))
            continue
        usable[key] += 1
        samples.append(Sample(path, label, split, sha, pixel_hash, phash, patient=patient))
    empty = [f"{s + '/' if s else ''}{label}" for (s, label), n in usable.items() if n == 0 and single]
    if empty:
        raise DataError(
            f"class folder(s) with no usable image in {root}: {', '.join(empty)}; "
            "add images or remove the folder (skipped files: "
            f"{'; '.join(f'{k.path}: {k.reason}' for k in skipped[:5])})"
        )
    return samples


def _duplicates(samples: list[Sample], plain: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, list, list]:
    """(a duplicate group per sample, the groups of two or more sample indices, the pairs of copies
    in two different split folders), found on the plain resize ``plain`` (N, H, W)."""
    groups = find_duplicate_groups(
        plain,
        [s.pixel_hash for s in samples],
        [s.phash for s in samples],
        cfg.near_duplicate_distance,
        cfg.near_duplicate_correlation,
    )
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    dup_groups = [m for m in members.values() if len(m) > 1]
    cross = [
        (a, b)
        for m in dup_groups
        for j, a in enumerate(m)
        for b in m[j + 1 :]
        if samples[a].folder_split != samples[b].folder_split
    ]
    return groups, dup_groups, cross


def _warn_of_placeholder_ids(samples: list[Sample]) -> None:
    """Warn when one PatientID covers most images: anonymised files often carry one placeholder,
    and joining on it would make one group of nearly everything (no split could be made)."""
    largest = max(Counter(s.patient for s in samples if s.patient).values(), default=0)
    if largest > 1 and largest > len(samples) // 2:
        warnings.warn(
            f"one DICOM PatientID covers {largest} of {len(samples)} images: a placeholder of anonymised files? "
            "Their images are kept together; pass --no-dicom-patients to treat them as separate patients",
            stacklevel=3,
        )
