"""The run folder contract: the name of every artifact, and how each is written and read.

``run``, ``tune``, ``train``, ``evaluate``, ``audit`` and ``cv`` write into a run folder, and
``report`` and the CLI read from it, all through the names and functions here. Every artifact is
written once, to a temporary name in the same folder, then renamed over the target, so a reader (or
a crash) never sees half a file. The model bundle inside (``MODEL``) keeps its own file names in
``bundle.py``. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from lungxray.errors import OutputExistsError

SCAN = "scan.json"  # the dataset: classes, counts, skipped files, duplicate groups
SPLITS = "splits.json"  # the paths in train / val / test
FOLDS = "folds.json"  # cv: the paths in each fold's train / val / test
TRIALS = "trials.json"  # every trial of the study: state, value, parameters
BEST_PARAMS = "best_params.json"  # the best trial's hyperparameters
STUDY = "study.db"  # the Optuna study (SQLite) unless --storage names another
HISTORY = "history.json"  # the final training's loss and accuracy per epoch
CURVES = "curves.png"
MODEL = "model"  # the bundle folder (bundle.py)
METRICS = "metrics.json"  # test metrics with confidence intervals
PREDICTIONS = "predictions.json"  # every scored image's probabilities
CONFUSION = "confusion_matrix.png"
AUDIT = "audit.json"  # the shortcut audit
RUN = "run.json"  # what `run` did: settings, timings, headline figures, artifacts
CV = "cv.json"  # cross-validation: per fold, pooled, out-of-fold probabilities
CV_CONFUSION = "cv_confusion_matrix.png"
REPORT = "report.html"
EXPLAIN = "explain.json"  # explain: probabilities and overlay file per image
COVERAGE = "coverage.png"  # accuracy against the share the out-of-distribution flag accepts
EXTERNAL = "external"  # run --external: one sub-folder of evaluation per external dataset

# What `run` lists as its artifacts, in this order.
RUN_ARTIFACTS = {
    "report": REPORT,
    "model": MODEL,
    "metrics": METRICS,
    "confusion_matrix": CONFUSION,
    "curves": CURVES,
    "audit": AUDIT,
    "trials": TRIALS,
    "splits": SPLITS,
    "scan": SCAN,
}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; renamed over ``path`` when the block succeeds,
    removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name per call (not per process): threads and processes in other PID namespaces that
    # share the folder (the preprocessing cache) must never write into one temporary file.
    # (A random name rather than mkstemp, whose 0600 mode would stay on the renamed file.)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")  # a non-UTF-8 file name, escaped
    return Path(path)


def write_json(folder: Path, name: str, obj, indent: int | None = 2) -> Path:
    """``obj`` as JSON in ``folder/name``, atomically; Paths and other objects become strings."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent, default=str)
    return write_text(folder / name, text + "\n" if indent else text)


def read_json(folder: Path, name: str):
    """The parsed ``folder/name``, or None when there is no such file; a damaged file is an error."""
    from lungxray.errors import DataError

    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc})", hint="the file is damaged; run the command that wrote it again"
        ) from None


def by_class(probabilities: dict | list, classes: list[str]) -> list[float]:
    """An image's probabilities in ``classes``' order, from the one shape every file writes, a
    class-to-probability map, or from the list that older predictions.json files hold."""
    return [probabilities[c] for c in classes] if isinstance(probabilities, dict) else list(probabilities)


PREDICTIONS_CSV = "predictions.csv"  # evaluate --csv: predictions.json as a table


def predictions_csv(rows: list[dict], classes: list[str]) -> str:
    """The rows of predict or predictions.json as CSV for a spreadsheet: path, label (when given),
    predicted class, a multi-label model's findings present (joined by "|"), one ``p_CLASS`` column
    per class, the out-of-distribution fields, site, the manifest's other columns (``meta_NAME``)
    and the reason for a file that could not be read."""
    import csv
    import io

    fixed = ["path", *(["label"] if any("label" in r for r in rows) else []), "class"]
    fixed += ["findings"] if any("findings" in r for r in rows) else []  # a multi-label model's, joined by "|"
    fixed += [f"p_{c}" for c in classes] + ["ood_score", "in_distribution"]
    fixed += ["site"] if any("site" in r for r in rows) else []
    meta = list(dict.fromkeys(k for r in rows for k in r.get("meta", {})))
    errors = ["error"] if any("error" in r for r in rows) else []
    text = io.StringIO()
    writer = csv.DictWriter(text, [*fixed, *(f"meta_{k}" for k in meta), *errors], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        shown = by_class(r["probabilities"], classes) if "probabilities" in r else []  # none for a skipped file
        probabilities = dict(zip(classes, shown, strict=False))
        row = (
            {k: r[k] for k in ("path", "label", "class", "ood_score", "in_distribution", "site", "error") if k in r}
            | {f"p_{c}": probabilities[c] for c in classes if c in probabilities}
            | ({"findings": "|".join(r["findings"])} if "findings" in r else {})
            | {f"meta_{k}": v for k, v in r.get("meta", {}).items()}
        )
        writer.writerow({k: _inert(v) for k, v in row.items()})
    return text.getvalue()


def _inert(value):
    """A text cell a spreadsheet would run as a formula (a file or manifest value starting with =, +,
    -, @, a tab or a carriage return) quoted with a leading ', as OWASP advises; numbers as they are."""
    if not isinstance(value, str) or not value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return value
    try:
        float(value)  # "-1", a CheXpert cell, stays a number
        return value
    except ValueError:
        return "'" + value


PATIENT_KEY = "patient-key"  # the key of the patient pseudonyms in the run's files; not to be shared


def secret_key(path: Path) -> bytes:
    """The 32-byte key held in ``path`` (hex), made on first use and readable by its owner only.

    Written aside, then linked into place: a process making it at the same time reads either no
    key or a whole one, and the first link wins. OSError when the folder cannot be written."""
    import secrets

    path = Path(path)
    if not path.exists():
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
                handle.write(secrets.token_hex(32))
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink(missing_ok=True)
    key = bytes.fromhex(path.read_text().strip())
    if len(key) != 32:
        raise OSError(f"{path} does not hold a 32-byte key; delete it to make a new one")
    return key


def refuse_to_replace(folder: Path, name: str, force: bool, what: str) -> None:
    """Raise OutputExistsError when ``folder/name`` exists and ``force`` is off."""
    target = Path(folder) / name
    empty_folder = target.is_dir() and not any(target.iterdir())  # left by a crash: holds nothing to lose
    if target.exists() and not empty_folder and not force:
        raise OutputExistsError(
            f"{target} already holds {what}", hint="pass --force to replace it, or choose another --out"
        )


def study_storage(folder: Path, storage: str | None) -> str:
    """The Optuna storage URL: ``storage`` when given, else the SQLite file ``folder/study.db``."""
    return storage or f"sqlite:///{(Path(folder) / STUDY).resolve()}"


def shown_url(url: str) -> str:
    """A storage URL as it may be printed or written to a file: its password, in the user part or
    in the query (``?password=``), shown as ``***``. Connect with the URL itself, never this.
    Masked as text, up to the last ``@`` before the path: a password holding an unescaped ``@``
    (which SQLAlchemy's parser would cut at the first one) is hidden whole. Written by hand because
    SQLAlchemy's ``render_as_string(hide_password=True)`` shows what its parser took for the host."""
    import re

    masked = re.sub(r"(?i)([?&][^=&]*password=)[^&]*", r"\1***", url)
    return re.sub(r"^([^:/]+://[^/:@]*:)[^/]*@", r"\1***@", masked)


def read_params(path: Path) -> dict:
    """Hyperparameters from a best_params.json (its ``params``) or a plain ``{name: value}`` JSON file."""
    from lungxray.errors import MissingInputError, ParamsError

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"{path} not found",
            hint="pass a JSON file of hyperparameters (best_params.json of a run, or a "
            "plain {name: value} object), --params defaults, or run `lungxray tune` first",
        )
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ParamsError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path} holds a JSON {type(params).__name__}, not an object of hyperparameters")
    return params.get("params", params)  # best_params.json wraps them; a plain dict works too


LOCK = ".lungxray.lock"  # the pid of the one process writing the folder
FINGERPRINT = "fingerprint.json"  # what a run folder was made from: data, model, split, preprocessing
CONTENT = "content.json"  # the usable images it was made from: [sha256, class, site] each, sorted


BUNDLE_MARK = "checksums.json"  # bundle.CHECKSUMS (bundle.py imports this module): a folder holding it is a bundle


def check_out(folder: Path, data: Iterable[Path] = ()) -> None:
    """Refuse ``folder`` as an output folder when it is a model bundle or lies inside one (a file
    written there is not among its checksums, and the bundle then refuses to load), or when it lies
    inside one of the dataset folders ``data`` (the next scan would take the plots and overlays
    written there for images). Each error names both folders."""
    from lungxray.errors import ConfigError

    out = Path(folder).resolve()
    for bundle in (out, *out.parents):
        if (bundle / BUNDLE_MARK).is_file():
            where = "is the model bundle" if bundle == out else f"lies inside the model bundle {bundle}"
            raise ConfigError(
                f"--out {folder} {where}: files written there are not among its checksums, and the "
                "bundle would refuse to load",
                hint=f"choose an --out outside {bundle}, e.g. {bundle.parent / 'evaluation'}",
            )
    for root in map(Path, data):
        if root.is_dir() and (out == root.resolve() or root.resolve() in out.parents):
            raise ConfigError(
                f"--out {folder} lies inside the dataset folder {root}: its next scan would take the "
                "plots and overlays written there for images",
                hint=f"choose an --out outside {root}",
            )


@contextlib.contextmanager
def writer_lock(folder: Path, data: Iterable[Path] = ()) -> Iterator[None]:
    """Hold ``folder`` for this process: a second lungxray writing the same folder is refused while
    this one lives. The kernel's advisory lock (flock) is released when the process ends, however
    it ends, so there is no stale lock to detect; the file keeps the holder's pid for the message.
    A bundle, or a folder inside ``data``, is refused first (``check_out``); a folder this call
    created is removed again when the work fails before writing anything to it."""
    import fcntl

    from lungxray.errors import OutputExistsError

    check_out(folder, data)
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutputExistsError(
                f"{folder} is being written by another lungxray process (pid {holder})",
                hint="wait for it to finish, or choose another --out",
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, str(os.getpid()).encode(), 0)
        try:
            yield
        except BaseException:
            # failed before writing anything (a bad data path): leave no folder holding only the lock
            if created and os.listdir(folder) == [LOCK]:
                os.unlink(folder / LOCK)
                folder.rmdir()
            raise
    finally:
        os.close(handle)  # releases the lock; the file stays (unlinking it would race a waiting writer)


def check_fingerprint(folder: Path, fingerprint: dict) -> None:
    """Refuse a run folder made from something else (a study reused under another seed would put
    validation images of the old split in the new test split), saying what differs. A folder with
    no fingerprint yet passes; ``record_fingerprint`` writes it once the scan and split succeeded,
    so a failed first attempt never blocks the corrected one."""
    from lungxray.errors import OutputExistsError

    known = read_json(folder, FINGERPRINT)
    if known is None:
        return
    # both ways: an option recorded only when set is a difference when set there and not now; the
    # data's content is known after the scan only (``check_content``)
    keys = [k for k in list(fingerprint) + [k for k in known if k not in fingerprint] if k != "content"]
    differs = [
        f"{k}: {known.get(k)!r} there, {fingerprint.get(k)!r} now" for k in keys if known.get(k) != fingerprint.get(k)
    ]
    if differs:
        raise OutputExistsError(
            f"{folder} holds a run made from other settings ({'; '.join(differs)})",
            hint=f"choose another --out (its study, splits and model belong to those settings), or delete {folder}",
        )


def record_fingerprint(folder: Path, fingerprint: dict, content: list | None = None) -> None:
    """Write what the run folder is made from (after ``check_fingerprint`` and ``check_content``
    passed), with ``content``, the listing of its images: once, and again when the content is new
    (a folder made before content was recorded, or one remade with --force)."""
    known = read_json(folder, FINGERPRINT)
    if known is None or known.get("content") != fingerprint.get("content"):
        if content is not None:
            write_json(folder, CONTENT, content, indent=None)
        write_json(folder, FINGERPRINT, fingerprint)


def content_digest(content: list) -> str:
    """fingerprint.json's ``content``: a short hash of the sorted [sha256, class, site] rows."""
    import hashlib

    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def check_content(folder: Path, fingerprint: dict, content: list, force: bool) -> str | None:
    """Refuse a run folder made from other images under the same DATA (files deleted, added or moved
    between classes since: its study chose the best trial on a validation split whose images now
    lie partly in test), saying what changed. With ``force``, return what changed: the caller starts
    anew. None when nothing changed, or when the folder recorded no content (made before it was)."""
    from lungxray.errors import OutputExistsError

    known = read_json(folder, FINGERPRINT) or {}
    if known.get("content") in (None, fingerprint["content"]):
        return None
    changes = _changes(read_json(folder, CONTENT), content, known["content"])
    if not force:
        raise OutputExistsError(
            f"{folder} was made from other images under the same DATA: {changes}",
            hint="choose another --out, or pass --force (run, train, cv) to start a new study on the data as it is",
        )
    return changes


def _changes(old: list | None, new: list, old_digest: str) -> str:
    """What changed from the ``old`` listing to the ``new`` one, in words: 3 images added, 40
    removed, 5 given another class or site."""
    from collections import Counter

    if old is None or content_digest(old) != old_digest:  # its listing lost or from another attempt
        return f"the images are not those it was made from ({len(new)} usable images now)"
    before, after = Counter(row[0] for row in old), Counter(row[0] for row in new)
    classes: dict[str, list] = {}
    for when, rows in enumerate((old, new)):
        for sha, *where in rows:
            classes.setdefault(sha, [[], []])[when].append(where)
    moved = sum(1 for sha, (a, b) in classes.items() if a and b and sorted(a) != sorted(b))
    counts = {"added": sum((after - before).values()), "removed": sum((before - after).values()),
              "given another class or site": moved}  # fmt: skip
    return ", ".join(f"{n} image{'s' * (n != 1)} {what}" for what, n in counts.items() if n) or "the images differ"


def set_study_aside(folder: Path) -> Path | None:
    """Rename the folder's study (study.db) to study.<its content digest>.db, so that the next search
    starts a new one and the old trials stay readable; where it went, or None when there was none."""
    study = Path(folder) / STUDY
    if not study.exists():
        return None
    tag = (read_json(folder, FINGERPRINT) or {}).get("content", "old")
    aside, n = study.with_name(f"study.{tag}.db"), 1
    while aside.exists():  # the data changed back and forth: every old study is kept
        aside, n = study.with_name(f"study.{tag}-{n}.db"), n + 1
    os.replace(study, aside)
    return aside
