"""What DATA names: one folder of class folders, a CSV manifest, or several of these at once, each
file with its class, its site and its patient where the data says them.

A manifest is a CSV with a row per image: a path (relative to the CSV's folder, or to
``--image-dir``), a label, and optional patient, site and other columns (view, sex, age: kept as
the file's metadata). Several DATA roots make one dataset; each root is a site (named after its
folder) unless a site column says otherwise. Errors name the file, the row, the column and the
value. Reads names and CSV text only: no image is opened here (``data.py`` decodes them).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from lungxray.config import Manifest
from lungxray.errors import DataError
from lungxray.layout import Skipped, discover, normalise_class_name

# Column names looked for when no flag names the column, as published sets spell them.
DEFAULT_COLUMNS = {
    "path": ("path", "file", "filename", "image", "Image Index"),
    "label": ("label", "class"),
    "patient": ("patient", "patient_id", "patientid", "Patient ID"),
    "site": ("site",),
}
GENERIC_STEMS = {"manifest", "metadata", "labels", "data", "index"}
MOST_LISTED = 10  # problems listed in one error


@dataclass
class Origin:
    """Where a file came from, beyond its class: its site, its patient, the manifest's other columns."""

    site: str | None = None
    patient: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Located:
    """Every file DATA names: (path, class, folder split) rows as ``layout.discover`` gives them,
    the files left out with a reason, each file's ``Origin``, and the folder that paths and the
    --groups/--exclude files are relative to."""

    layout: str
    files: list[tuple[Path, str, str | None]]
    skipped: list[Skipped]
    origins: dict[Path, Origin]
    root: Path
    sources: list[str]


def is_manifest(entry: Path) -> bool:
    return Path(entry).suffix.lower() in (".csv", ".tsv") and not Path(entry).is_dir()


def locate(entries, cfg: Manifest, same_classes: bool = True) -> Located:
    """The files of one or several DATA entries (folders or CSV manifests)."""
    entries = [Path(os.path.abspath(e)) for e in ([entries] if isinstance(entries, (str, Path)) else entries)]
    if not entries:
        raise DataError("no DATA given", hint="pass a folder of class folders or a CSV manifest")
    names = _site_names(entries)
    if cfg.where and not any(is_manifest(e) for e in entries):
        raise DataError("--where chooses rows of a CSV manifest, and DATA names none", hint="drop --where")
    layouts, files, skipped, origins, roots = [], [], [], {}, []
    listed: dict[Path, tuple[str, str]] = {}  # path -> (class, the entry that named it first)
    for entry, name in zip(entries, names, strict=True):
        if is_manifest(entry):
            root = Path(os.path.abspath(cfg.image_dir)) if cfg.image_dir else entry.parent
            rows = read_manifest(entry, cfg, root, name)
            layout, found, stray = "manifest", [(p, label, None) for p, label, _ in rows], []
            found_origins = {p: origin for p, _, origin in rows}
        else:
            root = entry
            layout, found, stray = discover(entry, same_classes=same_classes)
            found_origins = {p: Origin(site=name) for p, _, _ in found}
        _check_listed_once(found, listed, entry)
        found = [f for f in found if f[0] not in listed]  # named again with the same class: once, as first named
        listed |= {p: (label, str(entry)) for p, label, _ in found}
        layouts.append(layout)
        roots.append(root)
        files += found
        skipped += stray
        origins |= {p: found_origins[p] for p, _, _ in found}
    common = Path(os.path.commonpath(roots)) if len(roots) > 1 else roots[0]
    layout = layouts[0] if len(set(layouts)) == 1 else "mixed"
    return Located(layout, files, skipped, origins, common, [str(e) for e in entries])


def _site_names(entries: list[Path]) -> list[str | None]:
    """One root: no site of its own. Several: each named after its folder (a CSV with a generic
    name such as manifest.csv after the folder that holds it), numbered where two names clash."""
    if len(entries) == 1:
        return [None]
    names = [e.parent.name if is_manifest(e) and e.stem.lower() in GENERIC_STEMS else e.stem if is_manifest(e)
             else e.name for e in entries]  # fmt: skip
    return [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _check_listed_once(found: list, earlier: dict, entry: Path) -> None:
    """A file named by two DATA entries is an error when they give it two classes."""
    clashes = [(p, label, earlier[p]) for p, label, _ in found if p in earlier and earlier[p][0] != label]
    if clashes:
        listed = "; ".join(f"{p}: {a} in {entry}, {b} in {src}" for p, a, (b, src) in clashes[:MOST_LISTED])
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
    csv_path: Path, cfg: Manifest, root: Path, default_site: str | None
) -> list[tuple[Path, str, Origin]]:
    """(path, class, origin) of every row of ``csv_path`` that ``cfg.where`` keeps. Every problem
    (an empty or missing path, a path outside ``root``, an empty class, one file with two classes)
    is collected and raised as one DataError naming each row, column and value."""
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
    used = {path_col, label_col, patient_col, site_col} - {None}
    rows, problems, seen = [], [], {}
    for row in reader:
        line = reader.line_num
        if any((row.get(col) or "").strip() not in values for col, values in where.items()):
            continue
        at = f"row {line}, column {{}}"
        path, problem = _row_path(row.get(path_col), root)
        label = _row_label(row, label_col, path, root)
        if problem or isinstance(label, tuple):
            problems.append(f"{at.format(path_col)}: {problem}" if problem else f"{at.format(label[0])}: {label[1]}")
            continue
        if path in seen:
            if seen[path][1] != label:
                problems.append(f"row {line}: {path} again, as {label!r} (row {seen[path][0]} says {seen[path][1]!r})")
            continue
        seen[path] = (line, label)
        site = (row.get(site_col) or "").strip() if site_col else ""
        if site_col and not site and default_site is None:
            problems.append(f"{at.format(site_col)}: empty (every row of a site column names its site)")
            continue
        patient = (row.get(patient_col) or "").strip() if patient_col else ""
        meta = {k: (v or "").strip() for k, v in row.items() if k is not None and k not in used}
        rows.append((path, label, Origin(site or default_site, patient or None, meta)))
    if problems:
        listed = "; ".join(problems[:MOST_LISTED]) + (
            f"; and {len(problems) - MOST_LISTED} more" if len(problems) > MOST_LISTED else ""
        )
        raise DataError(f"manifest {csv_path}: {len(problems)} problem(s): {listed}", hint=_hint(cfg, root))
    if not rows:
        raise DataError(f"manifest {csv_path} has no rows{' that --where keeps' if where else ''}")
    return rows


def _hint(cfg: Manifest, root: Path) -> str:
    return (
        f"paths are relative to {root}"
        + ("" if cfg.image_dir else " (the CSV's folder; --image-dir sets another)")
        + "; --where keeps only some rows"
    )


def _row_path(value: str | None, root: Path) -> tuple[Path | None, str | None]:
    """(the absolute path, None), or (None, what is wrong with ``value``)."""
    raw = (value or "").strip()
    if not raw:
        return None, "empty"
    path = Path(os.path.abspath(root / raw))
    if os.path.commonpath([path, root]) != str(root):
        return None, f"{raw!r} lies outside {root}"
    if not path.is_file():
        return None, f"{raw!r} does not exist" if not path.exists() else f"{raw!r} is not a file"
    return path, None


def _row_label(row: dict, label_col: str | None, path: Path | None, root: Path) -> str | tuple[str, str]:
    """The row's class name, or (column, what is wrong). Without a label column, the file's folder."""
    if label_col is None:
        if path is None:
            return ""
        if path.parent == root:
            return ("label", "no label column, and the file is not inside a class folder (name it with --label-col)")
        raw = path.parent.name
    else:
        raw = (row.get(label_col) or "").strip()
    name = normalise_class_name(raw)
    if not name:
        return (label_col or "label", f"{raw!r} names no class" if raw else "empty")
    return name


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
