"""A manifest row's labels -> its class, or its findings (1.0 positive, 0.0 negative, NaN unknown).

Reads a label column (one class, or several findings joined by --label-sep, the no-finding label
meaning none), or a column per finding (1, 0, -1, blank, -1 mapped by --uncertain, blank negative
where the no-finding column holds 1), renames and merges names with --map (dropping a class drops
its films), and warns of names --map or --uncertain give that the data never uses.
Also holds the findings' table of a scanned dataset (positives, negatives, unknown, prevalence, per
site, the pairs seen together). Works on rows ``manifest.py`` has parsed: no file is opened here but
a --map CSV.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lungxray.errors import ConfigError, DataError
from lungxray.labelling import Findings
from lungxray.layout import normalise_class_name, read_text

NAN = float("nan")
NO_FINDING = "no_finding"  # a film's label when no finding is positive
MOST_PAIRS = 10  # co-occurring pairs in a scan summary


class Problem(NamedTuple):
    """What is wrong with a row's labels: the column, and the message naming the value."""

    column: str
    message: str


class Said(NamedTuple):
    """A row's labels: its class (or its positive findings joined by |), and for multi-label data
    its findings' values, any finding it does not name being ``unnamed`` (0.0 for a label column,
    NaN for a column per finding). ``label`` None: its class was dropped by --map."""

    label: str | None
    values: dict[str, float] | None = None
    unnamed: float = 0.0


def read_map(items: tuple[str, ...]) -> tuple[dict[str, str], list[tuple[str, list[str]]]]:
    """--map's renames, normalised name -> normalised name ('' drops it), and per item (its whole
    left side, its names) for the warning about names the data lacks. "COVID-19, ARDS=covid" maps
    covid_19, ards and the single class covid_19_ards alike."""
    renames: dict[str, str] = {}
    sources: list[tuple[str, list[str]]] = []
    pairs = []
    for item in items:
        if "=" not in item:
            pairs += _map_file(Path(item))
            continue
        names, _, target = item.rpartition("=")
        pairs.append((names, target))
    for names, target in pairs:
        whole, parts = normalise_class_name(names), [normalise_class_name(n) for n in names.split(",") if n.strip()]
        to = normalise_class_name(target)
        for name in {whole, *parts} - {""}:
            if renames.get(name, to) != to:
                raise ConfigError(f"--map sends {name!r} to both {renames[name]!r} and {to!r}", hint="keep one")
            renames[name] = to
        sources.append((whole, parts))
    return renames, sources


def _map_file(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise ConfigError(f"--map {str(path)!r} is neither NAMES=NAME nor a CSV file",
                          hint="e.g. --map 'COVID-19, ARDS=covid', or a CSV with columns from,to")  # fmt: skip
    reader = csv.DictReader(io.StringIO(read_text(path, "--map")))
    by_key = {c.strip().lower(): c for c in reader.fieldnames or []}
    if not {"from", "to"} <= set(by_key):
        raise ConfigError(f"--map {path} has columns {reader.fieldnames}", hint="name them from,to")
    return [
        (row[by_key["from"]] or "", row[by_key["to"]] or "") for row in reader if (row[by_key["from"]] or "").strip()
    ]


def positives(values: dict[str, float]) -> str:
    """A film's label: its positive findings, sorted and joined by |, or no_finding."""
    return "|".join(sorted(f for f, v in values.items() if v == 1.0)) or NO_FINDING


def _merge(a: float, b: float) -> float:
    """Two findings merged into one (--map): positive where either is, negative where both are."""
    return 1.0 if a == 1.0 or b == 1.0 else 0.0 if a == 0.0 and b == 0.0 else NAN


def _cell(text: str) -> float | None:
    """A finding column's cell: 1.0, 0.0, -1.0 (uncertain), NaN (blank), or None (none of these)."""
    if not text:
        return NAN
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value in (1.0, 0.0, -1.0) else None


class Labelling:
    """Reads the labels of every entry of one dataset with one ``Findings`` setting, and keeps the
    names it saw, for the warnings of names --map or --uncertain give that the data never uses."""

    def __init__(self, cfg: Findings) -> None:
        self.cfg, self.multilabel = cfg, cfg.multilabel
        self.renames, self._sources = read_map(cfg.map)
        self.policy, own = cfg.policies()
        self.own = {normalise_class_name(k): (k, v) for k, v in own.items()}
        self.none = normalise_class_name(cfg.no_finding_label)
        self.seen: set[str] = set()  # every name read (normalised), before and after --map
        self._names: dict[str, str] = {}
        self._cells: dict[tuple[str, str], Said | Problem] = {}

    def name(self, raw: str) -> str:
        """``raw`` normalised and renamed by --map ('' where --map drops it)."""
        if raw not in self._names:
            name = normalise_class_name(raw)
            self.seen.add(name)
            self._names[raw] = self.renames.get(name, name)
            self.seen.add(self._names[raw])
        return self._names[raw]

    def from_class(self, raw: str) -> Said:
        """A film whose one class is ``raw`` (a class folder, a label column without a separator)."""
        name = self.name(raw)
        if not self.multilabel or not name:  # '': --map drops the class, and its films with it
            return Said(name or None)
        values = {name: 1.0} if normalise_class_name(raw) != self.none else {}
        return Said(positives(values), values, 0.0)

    def from_text(self, raw: str, column: str) -> Said | Problem:
        """A label cell: one class, or (with --label-sep) findings joined by the separator. Read once
        per distinct cell: ChestX-ray14's 112,120 rows hold some 800."""
        if (raw, column) not in self._cells:
            self._cells[raw, column] = self._from_text(raw, column)
        return self._cells[raw, column]

    def _from_text(self, raw: str, column: str) -> Said | Problem:
        text = raw.strip()
        if not text:
            return Problem(column, "empty")
        parts = [p.strip() for p in text.split(self.cfg.label_sep)] if self.cfg.label_sep else [text]
        parts = [p for p in parts if p]
        nameless = [p for p in parts if not normalise_class_name(p)]
        if nameless or not parts:
            return Problem(column, f"{(nameless or [text])[0]!r} names no {'finding' if self.multilabel else 'class'}")
        if self.cfg.label_sep is None:
            return self.from_class(text)
        named = [p for p in parts if normalise_class_name(p) != self.none]  # the no-finding label names none
        found = sorted({self.name(p) for p in named} - {""})  # '': dropped by --map
        if self.multilabel:
            values = dict.fromkeys(found, 1.0)
            return Said(positives(values), values, 0.0)
        if len(found) > 1:
            return Problem(column, f"{text!r} names {len(found)} findings ({', '.join(found)}); --task single "
                           "takes one per film (merge them with --map, or use --task multilabel)")  # fmt: skip
        if not named:  # single-label: the no-finding label is a class of its own
            return Said(self.name(parts[0]) or None)
        return Said(found[0] if found else None)

    def columns(self, csv_path: Path, columns: list[str], rows: list[dict], used: set[str]) -> list[str]:
        """The finding columns --finding-cols names in ``csv_path`` (all: every column but ``used``
        and the no-finding one whose cells over ``rows`` are all 1, 0, -1 or blank, one at least not blank)."""
        given = self.cfg.finding_cols or ""
        if given.strip().lower() == "all":
            found = [c for c in columns if c not in used and normalise_class_name(c) != self.none
                     and _finding_column([(r.get(c) or "").strip() for r in rows])]  # fmt: skip
            if not found:
                raise DataError(f"--finding-cols all: no column of {csv_path} holds only 1, 0, -1 or blank cells",
                                hint="name the finding columns: --finding-cols A,B,C")  # fmt: skip
            return found
        by_key = {c.strip().lower(): c for c in columns}
        names = [n.strip() for n in given.split(",") if n.strip()]
        missing = [n for n in names if n.lower() not in by_key]
        if missing:
            raise DataError(f"--finding-cols: {csv_path} has no column {', '.join(map(repr, missing))} "
                            f"(its columns: {', '.join(columns)})", hint="name its columns, or give all")  # fmt: skip
        return [by_key[n.lower()] for n in names]

    def column_reader(self, finding_cols: list[str], columns: list[str]):
        """A function: a row -> its ``Said`` from a column per finding, or the Problems of its cells.
        Where the no-finding column of ``columns`` holds 1, a blank finding cell is negative (as
        torchxrayvision's CheX_Dataset reads CheXpert); a 1 or -1 cell keeps its meaning."""
        plan = []  # (column, finding, what its -1 becomes)
        none_col = next((c for c in columns if normalise_class_name(c) == self.none), None)
        for col in finding_cols:
            finding = self.name(col)
            if finding:
                own = self.own.get(normalise_class_name(col)) or self.own.get(finding)
                policy = own[1] if own else self.policy
                plan.append((col, finding, {"ignore": NAN, "positive": 1.0, "negative": 0.0}[policy]))
        cells: dict[str, float | None] = {}

        def read(row: dict) -> Said | list[Problem]:
            values, problems = {}, []
            normal = none_col is not None and _cell((row.get(none_col) or "").strip()) == 1.0
            for col, finding, uncertain in plan:
                text = (row.get(col) or "").strip()
                value = cells[text] if text in cells else cells.setdefault(text, _cell(text))
                if value is None:
                    problems.append(Problem(col, f"{text!r} is not 1, 0, -1 or blank"))
                    continue
                value = uncertain if value == -1.0 else 0.0 if normal and math.isnan(value) else value
                values[finding] = _merge(values[finding], value) if finding in values else value
            return problems or Said(positives(values), values, NAN)

        return read

    def warn_unused(self) -> None:
        """Warn of the names --map or --uncertain give that no row, column or class folder has."""
        unknown = [n for whole, parts in self._sources if whole not in self.seen for n in parts if n not in self.seen]
        unknown += [given for key, (given, _) in self.own.items() if key not in self.seen]
        if unknown:
            warnings.warn(f"--map or --uncertain name(s) that the data does not have: {', '.join(unknown)} "
                          "(names are compared after normalising: case, spaces)", stacklevel=4)  # fmt: skip


def _finding_column(cells: list[str]) -> bool:
    """Every cell 1, 0, -1 or blank, one at least not blank."""
    distinct = set(cells)
    return bool(distinct - {""}) and all(_cell(c) is not None for c in distinct)


def finding_names(values: list[dict[str, float]]) -> list[str]:
    """Every finding the films' values name, sorted: a dataset's classes when it is multi-label."""
    return sorted({name for v in values for name in v})


def vector(said: Said, findings: list[str]) -> tuple[float, ...]:
    """A film's targets in ``findings``' order."""
    return tuple(said.values.get(f, said.unnamed) for f in findings)


def same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Two target vectors equal, an unknown (NaN) equal to an unknown."""
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


def finding_table(targets: np.ndarray, findings: list[str]) -> dict:
    """Per finding: positives, negatives, unknown and prevalence among the known (None: none known)."""
    table = {}
    for j, name in enumerate(findings):
        column = targets[:, j]
        pos, neg = int((column == 1).sum()), int((column == 0).sum())
        table[name] = {"positive": pos, "negative": neg, "unknown": int(np.isnan(column).sum()),
                       "prevalence": pos / (pos + neg) if pos + neg else None}  # fmt: skip
    return table


def co_occurring(targets: np.ndarray, findings: list[str], most: int = MOST_PAIRS) -> list[dict]:
    """The pairs of findings most often positive on one film, most common first."""
    positive = (targets == 1).astype(np.int64)  # (N, F)
    together = positive.T @ positive  # (F, F) films positive for both
    pairs = [(int(together[i, j]), findings[i], findings[j]) for i in range(len(findings))
             for j in range(i + 1, len(findings)) if together[i, j]]  # fmt: skip
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [{"findings": [a, b], "films": n} for n, a, b in pairs[:most]]


def finding_summary(targets: np.ndarray, findings: list[str], sites: list[str | None]) -> dict:
    """A multi-label scan's findings (``targets`` (N, F)): positives, negatives, unknown and
    prevalence among the known, per site too where films have one, and the pairs most often positive
    together."""
    by_site = {site: finding_table(targets[[s == site for s in sites]], findings)
               for site in sorted({s for s in sites if s is not None})}  # fmt: skip
    return {"task": "multilabel", "findings": finding_table(targets, findings), "findings_by_site": by_site,
            "co_occurring": co_occurring(targets, findings)}  # fmt: skip


def conflicting(groups: list[list[int]], targets: np.ndarray) -> list[list[int]]:
    """The duplicate ``groups`` whose copies carry different targets (an unknown equal to an unknown)."""
    return [g for g in groups if any(not same(tuple(targets[g[0]]), tuple(targets[i])) for i in g[1:])]
