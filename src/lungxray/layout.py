"""A dataset's files on disk: the two folder layouts (class folders, or train/ test/ [val/]
folders of class folders), class names, and the user's lists of images to group (--groups) or
leave out (--exclude).

Reads names and small CSV files only: no image is opened here (``data.py`` decodes them).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungxray.errors import DataError

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class Skipped:
    path: str
    reason: str


def normalise_class_name(name: str) -> str:
    """Folder name -> snake_case class name: 'Viral Pneumonia' -> 'viral_pneumonia'."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name.strip())
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def _check_class_folders(root: Path, parents: list[Path], same_classes: bool) -> None:
    """Raise DataError for colliding, empty or unreadable class folders and differing class sets."""
    class_sets = {}
    for parent in parents:
        by_label: dict[str, list[str]] = {}
        for class_dir in _class_dirs(parent):
            by_label.setdefault(normalise_class_name(class_dir.name), []).append(class_dir.name)
            if not os.access(class_dir, os.R_OK | os.X_OK):
                raise DataError(f"class folder {class_dir} cannot be read", hint="fix its permissions, or move it out")
            if not any(p.is_file() for p in class_dir.rglob("*") if not p.name.startswith(".")):
                raise DataError(f"class folder {class_dir} holds no file", hint="add its images, or remove the folder")
        clashes = [names for names in by_label.values() if len(names) > 1]
        if clashes:
            listed = "; ".join(" and ".join(f"{parent / n}" for n in names) for names in clashes)
            raise DataError(
                f"class folders that name the same class: {listed}",
                hint="folder names are matched after normalising (case, spaces); merge or rename them",
            )
        class_sets[parent.name] = set(by_label)
    if same_classes and len({frozenset(s) for s in class_sets.values()}) > 1:
        every = set().union(*class_sets.values())
        missing = "; ".join(
            f"{name}/ lacks {', '.join(sorted(every - s))}" for name, s in class_sets.items() if every - s
        )
        raise DataError(
            f"the split folders of {root} hold different classes: {missing}",
            hint="give every split folder the same class folders (check the spelling: covid vs covid19)",
        )


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def discover(root: Path, same_classes: bool = True) -> tuple[str, list[tuple[Path, str, str | None]], list[Skipped]]:
    """Find (path, class, folder split) for every file; return the layout and stray files.

    Class folders that mean the same class after normalising (Normal/ and normal/), a class
    folder that is empty or cannot be read, and (unless ``same_classes`` is off, as for
    evaluating on part of the classes) split folders with different class sets are errors that
    name the folders: each would silently change the labels."""
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(
            f"dataset folder {root} does not exist or is not a folder; pass the folder "
            "that holds one sub-folder per class (or train/ and test/ folders)"
        )
    top = _class_dirs(root)
    split_dirs = [d for d in top if normalise_class_name(d.name) in SPLIT_NAMES and _class_dirs(d)]
    layout = "split" if split_dirs else "flat"
    if split_dirs and len(split_dirs) != len(top):
        others = sorted(d.name for d in top if d not in split_dirs)
        raise DataError(
            f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}) with "
            f"other folders ({', '.join(others)}); use either class folders or "
            "train/ test/ [val/] folders that each hold class folders"
        )
    parents = [(d, SPLIT_NAMES[normalise_class_name(d.name)]) for d in split_dirs] or [(root, None)]
    _check_class_folders(root, [parent for parent, _ in parents], same_classes)
    files, stray = [], []
    for parent, split in parents:
        stray += [
            Skipped(str(p), "not inside a class folder")
            for p in sorted(parent.iterdir())
            if p.is_file() and not p.name.startswith(".")
        ]
        for class_dir in _class_dirs(parent):
            label = normalise_class_name(class_dir.name)
            for path in sorted(class_dir.rglob("*")):
                if path.name.startswith("."):
                    continue
                if path.is_file():
                    files.append((path, label, split))
                elif path.is_symlink() and not path.exists():
                    stray.append(
                        Skipped(
                            str(path), f"broken symbolic link (points to {os.readlink(path)}, which does not exist)"
                        )
                    )
    return layout, files, stray


def _resolve(entry: str, root: Path) -> Path:
    """A path from a user's file: absolute as given, else relative to the dataset root."""
    path = Path(entry.strip())
    return Path(os.path.abspath(path if path.is_absolute() else Path(os.path.abspath(root)) / path))


def read_paths(file: Path, root: Path) -> list[Path]:
    """Paths listed in ``file``: a CSV whose header has a ``path`` column, or one path per line."""
    import csv

    if not Path(file).is_file():
        raise DataError(f"{file} not found", hint="pass a CSV with a path column, or a file of one path per line")
    lines = [line for line in Path(file).read_text().splitlines() if line.strip()]
    if lines and "path" in next(csv.reader([lines[0]])):
        return [_resolve(row["path"], root) for row in csv.DictReader(lines) if row.get("path")]
    return [_resolve(line, root) for line in lines if not line.startswith("#")]


def known_paths(paths: list[Path], known: set[Path], file: Path, flag: str) -> set[Path]:
    """``paths`` as a set; any path not among ``known`` files of the dataset is an error listing them."""
    unknown = sorted(str(p) for p in set(paths) - known)
    if unknown:
        listed = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise DataError(
            f"{flag} {file} names {len(unknown)} path(s) that are not images of the dataset: {listed}",
            hint="paths are relative to the dataset folder (or absolute); check the spelling",
        )
    return set(paths)


def read_groups(
    file: Path, root: Path, sample_paths: list[Path], skipped: list[Skipped], excluded: list[str] = ()
) -> dict[Path, str]:
    """path -> group from a CSV with columns path,group; rows of skipped or excluded files are
    ignored, rows of files that are not in the dataset are an error."""
    import csv

    if not Path(file).is_file():
        raise DataError(f"--groups {file} not found", hint="pass a CSV with columns path,group")
    with open(file, newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"path", "group"} <= set(reader.fieldnames or []):
            raise DataError(
                f"--groups {file} has columns {reader.fieldnames}", hint="the header must name the columns path,group"
            )
        rows = {_resolve(row["path"], root): (row.get("group") or "").strip() for row in reader if row.get("path")}
    rows = {path: group for path, group in rows.items() if group}  # a blank group: its own group
    known = set(sample_paths) | {Path(s.path) for s in skipped} | set(excluded)
    known_paths(list(rows), known, file, "--groups")
    return rows


def join_groups(duplicate_groups: np.ndarray, patients: list[str | None]) -> np.ndarray:
    """Group id per sample: duplicate clusters and patient groups (None: no row) joined as connected
    components, so two images share a group when a chain of copies or same-patient rows links them."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(duplicate_groups)
    _, first_of_dup = np.unique(duplicate_groups, return_index=True)
    rows = [np.arange(n)]
    cols = [first_of_dup[np.unique(duplicate_groups, return_inverse=True)[1]]]
    named = [i for i, p in enumerate(patients) if p is not None]
    if named:
        _, first, inverse = np.unique([patients[i] for i in named], return_index=True, return_inverse=True)
        rows.append(np.array(named))
        cols.append(np.array(named)[first[inverse]])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)
