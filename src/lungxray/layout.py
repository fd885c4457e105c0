"""A dataset's files on disk: the two folder layouts (class folders, or train/ test/ [val/]
folders of class folders), class names, and the user's lists of images to group (--groups) or
leave out (--exclude).

Reads names and small CSV files only: no image is opened here (``data.py`` decodes them).
"""

from __future__ import annotations

import io
import os
import re
import stat
import unicodedata
import warnings
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
    """Folder name -> snake_case class name: 'Viral Pneumonia' -> 'viral_pneumonia', 'Норма' ->
    'норма'. Letters and digits of any script are kept (NFKC, then case-folded); anything else
    becomes one '_'. A name of symbols only gives '' (``discover`` refuses such a folder)."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", unicodedata.normalize("NFKC", name).strip())
    # letters (L), their combining marks (M: Devanagari vowel signs, say) and digits (N)
    kept = "".join(c if unicodedata.category(c)[0] in "LMN" else "_" for c in name)
    return unicodedata.normalize("NFKC", re.sub("_+", "_", kept).strip("_").casefold())


def _check_class_folders(root: Path, parents: list[Path], walks: dict, same_classes: bool) -> None:
    """Raise DataError for colliding, nameless, empty or unreadable class folders and differing
    class sets. ``walks``: each class folder's ``_walk``."""
    class_sets = {}
    for parent in parents:
        by_label: dict[str, list[str]] = {}
        for class_dir in _class_dirs(parent):
            label = normalise_class_name(class_dir.name)
            if not label:
                raise DataError(
                    f"class folder {class_dir} names no class: its name has no letter or digit",
                    hint="rename it (class names keep the letters of any script, and digits)",
                )
            by_label.setdefault(label, []).append(class_dir.name)
            if not os.access(class_dir, os.R_OK | os.X_OK):
                raise DataError(f"class folder {class_dir} cannot be read", hint="fix its permissions, or move it out")
            if not walks[class_dir][0]:
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
    """Find (path, class, folder split) for every regular file; return the layout and the entries
    left out, each with its reason (``_kind``): files outside a class folder, hidden files and
    folders, sub-folders that cannot be read, pipes, sockets, devices and broken links.

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
    walks = {d: _walk(d) for parent, _ in parents for d in _class_dirs(parent)}
    _check_class_folders(root, [parent for parent, _ in parents], walks, same_classes)
    files, stray = [], []
    for parent, split in parents:
        class_dirs = _class_dirs(parent)
        for path in sorted(p for p in parent.iterdir() if p not in class_dirs):
            what = _kind(path)
            stray.append(Skipped(str(path), "not inside a class folder" if what == FILE else what))
        for class_dir in class_dirs:
            label = normalise_class_name(class_dir.name)
            found, left = walks[class_dir]
            files += [(path, label, split) for path in sorted(found)]
            stray += left
    return layout, files, stray


FILE, FOLDER = "file", "folder"  # what ``_kind`` says of an entry to read, not to skip


def _kind(path: Path) -> str:
    """FILE (a regular file, or a link to one), FOLDER, or why ``path`` is left out: hidden, a broken
    or looping link, a named pipe, socket or device. Only its status is read, never its content:
    opening a named pipe would wait for a writer forever."""
    if path.name.startswith("."):
        return "hidden"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"broken symbolic link (points to {os.readlink(path)}, which does not exist)"
        return "vanished during the scan"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return FILE
    link = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
    if stat.S_ISDIR(mode):
        return FOLDER if not link else f"a symbolic link to a folder, not followed{link}"
    kinds = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device",
             stat.S_ISBLK: "a device"}  # fmt: skip
    kind = next((name for test, name in kinds.items() if test(mode)), "a special file")
    return f"not a regular file: {kind}{link}"


def _walk(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """The regular files under ``folder``, and every other entry with the reason it is left out
    (``_kind``; a hidden folder is not entered, a sub-folder that cannot be listed gives its OS
    error)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return [], [Skipped(str(folder), f"folder cannot be read: {exc.strerror or exc}")]
    files, skipped = [], []
    for name in names:
        path = folder / name
        what = _kind(path)
        if what == FILE:
            files.append(path)
        elif what == FOLDER:
            more, left = _walk(path)
            files += more
            skipped += left
        else:
            skipped.append(Skipped(str(path), what))
    return files, skipped


class Listing:
    """Which entries folders hold, a folder listed once (``os.scandir``) when a second path in it
    is asked about: a manifest of 100,000 rows in a few folders costs a listing per folder, not a
    status call per row, and one whose folders hold a file each (CheXpert's studies) a status call
    per row, not a listing. A folder that cannot be listed (execute permission only) falls back to
    a status call per path, and so does a name the listing spells otherwise (case, Unicode form):
    a case-insensitive file system (macOS, Windows) opens ``a.png`` as ``A.PNG``."""

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, os.DirEntry] | None] = {}  # listed (None: cannot be)
        self._once: set[str] = set()  # asked about once, not listed
        self._folded: dict[str, set[str]] = {}  # a listed folder's names folded (``_fold``), when first missed

    def kind(self, path: str) -> str | None:
        """FILE (a regular file, or a link to one), None when nothing is at ``path`` (a broken link
        included), else 'other' (a folder, a pipe, a device)."""
        folder, name = os.path.split(path)
        if folder not in self._folders:
            if folder not in self._once:
                self._once.add(folder)
                return self._status(path)
            self._folders[folder] = self._list(folder)
        listed = self._folders[folder]
        if listed is None:
            return self._status(path)
        entry = listed.get(name)
        if entry is None:
            return self._status(path) if self._spelt_otherwise(folder, name) else None
        if entry.is_symlink() and not os.path.exists(path):
            return None
        return FILE if entry.is_file() else "other"

    def _spelt_otherwise(self, folder: str, name: str) -> bool:
        """Whether the listing of ``folder`` holds ``name`` in another case or Unicode form: a status
        call then says whether the file system opens it by this spelling. A name in no form there
        costs no call: a layout whose paths are looked for under several roots misses in most."""
        if folder not in self._folded:
            self._folded[folder] = {_fold(n) for n in self._folders[folder] or ()}
        return _fold(name) in self._folded[folder]

    @staticmethod
    def _list(folder: str) -> dict[str, os.DirEntry] | None:
        try:
            with os.scandir(folder) as entries:
                return {e.name: e for e in entries}
        except OSError:
            return None

    @staticmethod
    def _status(path: str) -> str | None:
        try:
            return FILE if stat.S_ISREG(os.stat(path).st_mode) else "other"
        except OSError:
            return "other" if os.path.lexists(path) and not os.path.islink(path) else None


def _fold(name: str) -> str:
    """A file name as a case-insensitive file system compares it: case and Unicode form set aside."""
    return unicodedata.normalize("NFC", name).casefold()


def _resolve(entry: str, root: Path) -> Path:
    """A path from a user's file: absolute as given, else relative to the dataset root."""
    path = Path(entry.strip())
    return Path(os.path.abspath(path if path.is_absolute() else Path(os.path.abspath(root)) / path))


def read_text(file: Path, flag: str) -> str:
    """The text of the ``flag`` file ``file``: UTF-8, a byte-order mark (as Excel writes) dropped;
    DataError naming the first line that is not UTF-8 (a Latin-1 file, say)."""
    data = Path(file).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{flag} {file} is not UTF-8: line {line} holds the byte 0x{data[exc.start]:02x}",
            hint=f"save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 {file} -o fixed.csv, then pass {flag} fixed.csv)",
        ) from None


def read_paths(file: Path, root: Path) -> list[Path]:
    """Paths listed in ``file``: a CSV whose header has a ``path`` column, or one path per line."""
    import csv

    if not Path(file).is_file():
        raise DataError(f"{file} not found", hint="pass a CSV with a path column, or a file of one path per line")
    lines = [line for line in read_text(file, "--exclude").splitlines() if line.strip()]
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
    ignored, rows of files that are not in the dataset are an error. Groups that share an image
    are one group (``_join_shared``)."""
    import csv

    if not Path(file).is_file():
        raise DataError(f"--groups {file} not found", hint="pass a CSV with columns path,group")
    with io.StringIO(read_text(file, "--groups"), newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"path", "group"} <= set(reader.fieldnames or []):
            raise DataError(
                f"--groups {file} has columns {reader.fieldnames}", hint="the header must name the columns path,group"
            )
        rows = [(reader.line_num, _resolve(row["path"], root), (row.get("group") or "").strip())
                for row in reader if row.get("path")]  # fmt: skip
    rows = [row for row in rows if row[2]]  # a blank group: its own group
    known = set(sample_paths) | {Path(s.path) for s in skipped} | set(excluded)
    known_paths([path for _, path, _ in rows], known, file, "--groups")
    return _join_shared(rows, file)


def _join_shared(rows: list[tuple[int, Path, str]], file: Path) -> dict[Path, str]:
    """path -> group from (line, path, group) rows, where an image listed in two groups joins them:
    both are one patient's films (or one is a typo), and keeping either apart would put that
    patient in two splits. Warns once, naming the rows."""
    joined: dict[str, str] = {}  # group -> a group it was joined to (union-find)

    def find(group: str) -> str:
        while joined.get(group, group) != group:
            group = joined[group]
        return group

    seen: dict[Path, list[tuple[int, str]]] = {}
    for line, path, group in rows:
        seen.setdefault(path, []).append((line, group))
    shared = {path: lines for path, lines in seen.items() if len({g for _, g in lines}) > 1}
    for lines in shared.values():
        for _, group in lines[1:]:
            if find(group) != find(lines[0][1]):
                joined[find(group)] = find(lines[0][1])
    if shared:
        listed = (
            "; ".join(
                f"{path} in rows " + ", ".join(str(line) for line, _ in lines)  # rows, not the groups: patient IDs
                for path, lines in list(shared.items())[:10]
            )
            + (f"; and {len(shared) - 10} more" if len(shared) > 10 else "")
        )
        warnings.warn(
            f"--groups {file} lists {len(shared)} image(s) in two or more groups: {listed}; "
            "the groups that share an image are kept together as one",
            stacklevel=4,
        )
    return {path: find(lines[0][1]) for path, lines in seen.items()}


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
