"""What DATA names: one folder of class folders, a CSV manifest, or several of these at once, each
file with its class, its site and its patient where the data says them.

A manifest is a CSV with a row per image: a path (relative to the CSV's folder, or to
``--image-dir``), a label, and optional patient, site and other columns (view, sex, age: kept as
the file's metadata). A row may name several findings instead of one class (--label-sep,
--finding-cols: ``targets.py`` reads them), and --layout names a published set's columns. Several
DATA roots make one dataset; each root is a site (named after its folder) unless a site column says
otherwise. Errors name the file, the row, the column and the value. Reads names and CSV text only,
and lists a folder rather than asking after each of its files: no image is opened here
(``data.py`` decodes them).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from lungxray.config import Manifest
from lungxray.errors import DataError
from lungxray.labelling import LAYOUTS, Findings
from lungxray.layout import FILE, Listing, Skipped, discover
from lungxray.targets import Labelling, Problem, Said, finding_names, vector

# Column names looked for when no flag names the column, as published sets spell them.
DEFAULT_COLUMNS = {
    "path": ("path", "file", "filename", "image", "Image Index"),
    "label": ("label", "class"),
    "patient": ("patient", "patient_id", "patientid", "Patient ID"),
    "site": ("site",),
}
GENERIC_STEMS = {"manifest", "metadata", "labels", "data", "index", "data_entry_2017"}  # the last: ChestX-ray14's CSV
MOST_LISTED = 10  # problems listed in one error


@dataclass
class Origin:
    """Where a file came from, beyond its class: its site, its patient, the manifest's other
    columns; for multi-label data what its row says of each finding, and its targets."""

    site: str | None = None
    patient: str | None = None
    meta: dict[str, str] = field(default_factory=dict)
    said: Said | None = None
    targets: tuple[float, ...] | None = None  # in ``Located.findings`` order: 1.0, 0.0, NaN unknown


@dataclass
class Located:
    """Every file DATA names: (path, class, folder split) rows as ``layout.discover`` gives them,
    the files left out with a reason, each file's ``Origin``, and the folder that paths and the
    --groups/--exclude files are relative to; for multi-label data the findings (sorted), else None."""

    layout: str
    files: list[tuple[Path, str, str | None]]
    skipped: list[Skipped]
    origins: dict[Path, Origin]
    root: Path
    sources: list[str]
    findings: list[str] | None = None
    unnamed_negative: bool = False  # multi-label: every film is negative for a finding it does not name


def is_manifest(entry: Path) -> bool:
    return Path(entry).suffix.lower() in (".csv", ".tsv") and not Path(entry).is_dir()


def with_layout(cfg: Manifest, findings: Findings) -> tuple[Manifest, Findings, tuple[str, ...]]:
    """The settings with a published layout's (``--layout``) columns filled where no flag set them,
    and the folders beside the CSV where that layout keeps its images."""
    preset = LAYOUTS.get(findings.layout, {})
    columns = {k: v for k, v in preset.items() if hasattr(cfg, k) and getattr(cfg, k) is None}
    return replace(cfg, **columns), findings.fill(**preset), () if cfg.image_dir else preset.get("image_dirs", ())


def locate(entries, cfg: Manifest, findings: Findings | None = None, same_classes: bool = True) -> Located:
    """The files of one or several DATA entries (folders or CSV manifests), their labels read as
    ``findings`` says (one class per file, or several findings)."""
    entries = [Path(os.path.abspath(e)) for e in ([entries] if isinstance(entries, (str, Path)) else entries)]
    if not entries:
        raise DataError("no DATA given", hint="pass a folder of class folders or a CSV manifest")
    names = _site_names(entries)
    if cfg.where and not any(is_manifest(e) for e in entries):
        raise DataError("--where chooses rows of a CSV manifest, and DATA names none", hint="drop --where")
    cfg, findings, image_dirs = with_layout(cfg, findings or Findings())
    labelling = Labelling(findings)
    layouts, files, skipped, origins, roots = [], [], [], {}, []
    listed: dict[Path, tuple] = {}  # path -> (what its row says, the entry that named it first)
    for entry, name in zip(entries, names, strict=True):
        if is_manifest(entry):
            root = Path(os.path.abspath(cfg.image_dir)) if cfg.image_dir else entry.parent
            rows, stray = read_manifest(entry, cfg, root, name, labelling, image_dirs)
            layout, found = "manifest", [(p, label, None) for p, label, _ in rows]
            found_origins = {p: origin for p, _, origin in rows}
        else:
            root = entry
            layout, found, stray = discover(entry, same_classes=same_classes)
            found, found_origins = _relabel(found, labelling, name, stray)
        _check_listed_once(found, found_origins, listed, entry)
        found = [f for f in found if f[0] not in listed]  # named again with the same class: once, as first named
        listed |= {p: (found_origins[p].said or Said(label), str(entry)) for p, label, _ in found}
        layouts.append(layout)
        roots.append(root)
        files += found
        skipped += stray
        origins |= {p: found_origins[p] for p, _, _ in found}
    labelling.warn_unused()
    common = Path(os.path.commonpath(roots)) if len(roots) > 1 else roots[0]
    layout = layouts[0] if len(set(layouts)) == 1 else "mixed"
    found_findings, unnamed_negative = None, False
    if labelling.multilabel:
        found_findings = finding_names([o.said.values for o in origins.values()])
        for origin in origins.values():
            origin.targets = vector(origin.said, found_findings)
        # a label column or class folder names a film's findings, all others negative; a column per
        # finding says nothing of a finding without a column (unknown)
        unnamed_negative = all(o.said.unnamed == 0.0 for o in origins.values())
    sources = [str(e) for e in entries]
    return Located(layout, files, skipped, origins, common, sources, found_findings, unnamed_negative)


def _relabel(found: list, labelling: Labelling, site: str | None, stray: list[Skipped]) -> tuple[list, dict]:
    """Class folders' files with their class renamed by --map (those it drops go to ``stray``) and,
    for multi-label data, the class as each file's one finding; and each file's ``Origin``."""
    if not labelling.multilabel and not labelling.renames:
        return found, {p: Origin(site=site) for p, _, _ in found}
    kept, origins = [], {}
    for path, label, split in found:
        said = labelling.from_class(label)
        if said.label is None:
            stray.append(Skipped(str(path), f"its class ({label}) is dropped by --map"))
            continue
        kept.append((path, said.label, split))
        origins[path] = Origin(site=site, said=said if labelling.multilabel else None)
    return kept, origins


def _site_names(entries: list[Path]) -> list[str | None]:
    """One root: no site of its own. Several: each named after its folder (a CSV with a generic
    name such as manifest.csv after the folder that holds it), numbered where two names clash."""
    if len(entries) == 1:
        return [None]
    names = [e.parent.name if is_manifest(e) and e.stem.lower() in GENERIC_STEMS else e.stem if is_manifest(e)
             else e.name for e in entries]  # fmt: skip
    return [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _check_listed_once(found: list, origins: dict[Path, Origin], earlier: dict, entry: Path) -> None:
    """A file named by two DATA entries is an error when they give it two labels."""
    clashes = [(p, label, earlier[p]) for p, label, _ in found
               if p in earlier and _key(earlier[p][0]) != _key(origins[p].said or Said(label))]  # fmt: skip
    if clashes:
        listed = "; ".join(f"{p}: {a} in {entry}, {b.label} in {src}" for p, a, (b, src) in clashes[:MOST_LISTED])
        raise DataError(f"{len(clashes)} file(s) named twice with two classes: {listed}", hint="fix one of the labels")


def _column(csv_path: Path, columns: list[str], given: str | None, role: str, flag: str) -> str | None:
    """The column playing ``role``: the one ``flag`` names (an error when absent), else the first
    of its usual names present, else None."""
    # Matched whatever the case and surrounding spaces: "Label" and " label" are the label column.
    by_key = {c.strip().lower(): c for c in columns}
    if given is not None:
        if given.strip().lower() not in by_key:
            raise DataError(
                f"{flag} {given!r}: {csv_path} has no such column (its columns: {', '.join(columns)})",
                hint=f"name one of its columns with {flag}",
            )
        return by_key[given.strip().lower()]
    return next((by_key[c.lower()] for c in DEFAULT_COLUMNS[role] if c.lower() in by_key), None)


def _read_text(csv_path: Path) -> str:
    try:
        return csv_path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"manifest {csv_path} does not exist", hint="check the path") from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"manifest {csv_path} is not UTF-8 text (byte {exc.start})", hint="save it as UTF-8 (CSV UTF-8)"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read manifest {csv_path}: {exc.strerror or exc}") from None


def _parse_where(where: tuple[str, ...], columns: list[str], csv_path: Path) -> dict[str, set[str]]:
    chosen: dict[str, set[str]] = {}
    for item in where:
        col, values = (part.strip() for part in item.split("=", 1))
        if col.lower() not in {c.strip().lower() for c in columns}:
            raise DataError(
                f"--where {item!r}: {csv_path} has no column {col!r} (its columns: {', '.join(columns)})",
                hint="name one of its columns",
            )
        by_key = {c.strip().lower(): c for c in columns}
        chosen.setdefault(by_key[col.lower()], set()).update(v.strip() for v in values.split(","))
    return chosen


def read_manifest(
    csv_path: Path, cfg: Manifest, root: Path, default_site: str | None, labelling: Labelling, image_dirs=()
) -> tuple[list[tuple[Path, str, Origin]], list[Skipped]]:
    """(path, class, origin) of every row of ``csv_path`` that ``cfg.where`` keeps, and the rows
    whose class --map drops. Paths are looked for under ``root``, then the ``image_dirs`` beside the
    CSV. Every problem (an empty or missing path, a path outside ``root``, an empty class, a finding
    cell that is not 1, 0, -1 or blank, one file with two labels) is collected and raised as one
    DataError naming each row, column and value."""
    text = _read_text(csv_path)
    dialect = "excel-tab" if csv_path.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    columns = [c for c in reader.fieldnames or [] if c is not None]
    path_col = _column(csv_path, columns, cfg.path_col, "path", "--path-col")
    if path_col is None:
        raise DataError(
            f"manifest {csv_path} has no path column (its columns: {', '.join(columns) or 'none'})",
            hint="name the column of image paths with --path-col",
        )
    label_col = _column(csv_path, columns, cfg.label_col, "label", "--label-col")
    patient_col = _column(csv_path, columns, cfg.patient_col, "patient", "--patient-col")
    site_col = _column(csv_path, columns, cfg.site_col, "site", "--site-col")
    where = _parse_where(cfg.where, columns, csv_path)
    kept = [(reader.line_num, row) for row in reader
            if all((row.get(col) or "").strip() in values for col, values in where.items())]  # fmt: skip
    used = {path_col, label_col, patient_col, site_col} - {None}
    by_columns = None
    if labelling.cfg.finding_cols is not None:
        finding_cols = labelling.columns(csv_path, columns, [row for _, row in kept], used)
        by_columns, used = labelling.column_reader(finding_cols, columns), used | set(finding_cols)
    roots = _roots(root, csv_path.parent, image_dirs)
    listing, patient_in_path = Listing(), labelling.cfg.patient_from_path
    pattern = re.compile(patient_in_path) if patient_in_path else None
    rows, dropped, problems, seen = [], [], [], {}
    for line, row in kept:
        at = f"row {line}, column {{}}"
        path, problem = _row_path(row.get(path_col), roots, listing)
        said = by_columns(row) if by_columns else _row_label(row, label_col, path, roots, labelling)
        if problem or not isinstance(said, Said):
            wrong = [(path_col, problem)] if problem else said if isinstance(said, list) else [said]
            problems += [f"{at.format(col)}: {message}" for col, message in wrong]
            continue
        path = Path(path)
        if said.label is None:
            dropped.append(
                Skipped(str(path), f"its class ({row.get(label_col) or path.parent.name}) is dropped by --map")
            )
            continue
        if path in seen:
            if _key(seen[path][1]) != _key(said):
                problems.append(
                    f"row {line}: {path} again, as {said.label!r} (row {seen[path][0]} says {seen[path][1].label!r})"
                )
            continue
        seen[path] = (line, said)
        site = (row.get(site_col) or "").strip() if site_col else ""
        if site_col and not site and default_site is None:
            problems.append(f"{at.format(site_col)}: empty (every row of a site column names its site)")
            continue
        patient = (row.get(patient_col) or "").strip() if patient_col else ""
        if pattern is not None:
            found = pattern.search(row.get(path_col) or "")
            if found is None:
                problems.append(f"{at.format(path_col)}: no patient in {row.get(path_col)!r} (--patient-from-path "
                                f"'{patient_in_path}')")  # fmt: skip
                continue
            patient = found.group(1) if pattern.groups else found.group(0)
        meta = {k: (v or "").strip() for k, v in row.items() if k is not None and k not in used}
        origin = Origin(site or default_site, patient or None, meta, said if labelling.multilabel else None)
        rows.append((path, said.label, origin))
    if problems:
        listed = "; ".join(problems[:MOST_LISTED]) + (
            f"; and {len(problems) - MOST_LISTED} more" if len(problems) > MOST_LISTED else ""
        )
        raise DataError(f"manifest {csv_path}: {len(problems)} problem(s): {listed}", hint=_hint(cfg, root))
    if not rows and not dropped:
        raise DataError(f"manifest {csv_path} has no rows{' that --where keeps' if where else ''}")
    return rows, dropped


def _key(said: Said) -> tuple:
    """What a row says of its file, for comparing two rows of one file (an unknown equal to an unknown)."""
    if said.values is None:
        return (said.label,)
    known = lambda v: None if math.isnan(v) else v  # noqa: E731
    return (
        said.label,
        None if math.isnan(said.unnamed) else said.unnamed,
        sorted((f, known(v)) for f, v in said.values.items()),
    )


def _hint(cfg: Manifest, root: Path) -> str:
    return (
        f"paths are relative to {root}"
        + ("" if cfg.image_dir else " (the CSV's folder; --image-dir sets another)")
        + "; --where keeps only some rows"
    )


def _roots(root: Path, csv_folder: Path, image_dirs: tuple[str, ...]) -> list[str]:
    """Where a manifest's paths are looked for, in order: ``root``, then the existing folders that a
    published layout's ``image_dirs`` (glob patterns, beside the CSV) name."""
    import glob

    found = [str(root)]
    for pattern in image_dirs:
        for folder in sorted(glob.glob(os.path.join(glob.escape(str(csv_folder)), pattern))):
            folder = os.path.normpath(folder)
            if os.path.isdir(folder) and folder not in found:
                found.append(folder)
    return found


def _row_path(value: str | None, roots: list[str], listing: Listing) -> tuple[str | None, str | None]:
    """(the absolute path, None), or (None, what is wrong with ``value``): the path under the first
    of ``roots`` that holds it. String operations and one folder listing, no status call per row:
    this runs once per row of manifests of 100,000 rows."""
    raw = (value or "").strip()
    if not raw:
        return None, "empty"
    outside, absent = None, None
    for root in roots:
        path = os.path.normpath(os.path.join(root, raw))
        if path != root and not path.startswith(root.rstrip(os.sep) + os.sep):
            outside = outside or f"{raw!r} lies outside {root}"
            continue
        kind = listing.kind(path)
        if kind == FILE:
            return path, None
        absent = absent or (f"{raw!r} does not exist" if kind is None else f"{raw!r} is not a file")
    return None, absent or outside


def _row_label(row: dict, label_col: str | None, path: str | None, roots: list[str], labelling: Labelling):
    """The row's ``Said`` (class, or findings), or a ``Problem``. Without a label column, the class
    is the file's folder."""
    if label_col is not None:
        return labelling.from_text(row.get(label_col) or "", label_col)
    if path is None:
        return Said("")
    if os.path.dirname(path) in roots:
        return Problem("label", "no label column, and the file is not inside a class folder (name it with --label-col)")
    return labelling.from_text(os.path.basename(os.path.dirname(path)), "label")


def column_summary(cells: list[str], most: int = 20) -> dict:
    """A manifest column over the dataset's images (one cell each): how many are empty, each value's
    count (past ``most`` values, how many there are) and, for a column of numbers, min/median/max."""
    from collections import Counter
    from statistics import median

    seen = Counter(cell for cell in cells if cell)
    numbers = [float(v) for v in seen.elements() if v.removeprefix("-").replace(".", "", 1).isdecimal()]
    values = {"counts": dict(sorted(seen.items()))} if len(seen) <= most else {"distinct": len(seen)}
    spread = {}
    if numbers and len(numbers) == seen.total():
        spread = {"min": min(numbers), "median": float(median(numbers)), "max": max(numbers)}
    return {"missing": len(cells) - seen.total(), **values, **spread}
