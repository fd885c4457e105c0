"""Settings of how a manifest's labels are read when a film may carry several findings: a
separator in one column (ChestX-ray14's ``Finding Labels``), or a column per finding (CheXpert's 1,
0, -1, blank); the uncertain cells' policy; renamed and merged findings; the patient inside a path;
and the published layouts that set all of these, and the manifest's columns, with one flag.

Settings only: ``manifest.py`` applies a layout, ``targets.py`` reads the rows. Nothing here reads files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lungxray.errors import ConfigError
from lungxray.options import check_choices, option

TASKS = ("auto", "single", "multilabel")
POLICIES = ("ignore", "positive", "negative")  # what an uncertain (-1) cell becomes: NaN, 1.0, 0.0

# CheXpert's (and MIMIC-CXR's) observation columns, "No Finding" left out: it is the absence of the others.
CHEXPERT_FINDINGS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip

# The published layouts, as they ship: the columns they name (settings of ``Manifest`` and of
# ``Findings``, filled where the flag is unset), and ``image_dirs``, folders beside the CSV (glob
# patterns allowed) where its paths are also looked for when --image-dir is unset.
LAYOUTS = {
    "chestxray14": {"path_col": "Image Index", "label_col": "Finding Labels", "patient_col": "Patient ID",
                    "label_sep": "|", "image_dirs": ("images", "images_*/images")},
    "chexpert": {"path_col": "Path", "finding_cols": ",".join(CHEXPERT_FINDINGS), "patient_from_path": r"patient\d+",
                 "image_dirs": ("..",)},  # train.csv inside CheXpert-v1.0/ names CheXpert-v1.0/train/...
    "covid-metadata": {"path_col": "filename", "label_col": "finding", "patient_col": "patientid", "label_sep": ",",
                       "image_dirs": ("images",)},
}  # fmt: skip


@dataclass
class Findings:
    """How the findings of a CSV manifest are read (several per film, uncertain cells, renamed
    findings), and the published layouts that set them."""

    layout: str | None = option("--layout", None, choices=tuple(LAYOUTS))
    """A published set's columns in one flag (a flag given as well wins): chestxray14 (Data_Entry_2017.csv:
    Image Index, Finding Labels joined by |, Patient ID; bare names looked for in images/ and
    images_*/images/), chexpert (train.csv: Path, a column per observation but No Finding, the patient
    from patientNNNNN in the path; paths looked for beside the CSV's folder too), covid-metadata
    (metadata.csv: filename in images/, finding split at commas, patientid). Choose rows with --where,
    e.g. --where Frontal/Lateral=Frontal, --where view=PA,AP --where modality=X-ray."""
    task: str = option("--task", "auto", choices=TASKS)
    """single: one class per film; multilabel: any number of findings per film, each a yes/no with
    its own sigmoid; auto: multilabel when --label-sep, --finding-cols or --layout is given."""
    label_sep: str | None = option("--label-sep", None, metavar="TEXT")
    """The label column holds several findings joined by TEXT (e.g. '|' or ','); a finding a row does
    not name is negative there."""
    finding_cols: str | None = option("--finding-cols", None, metavar="COL,COL,...|all")
    """A column per finding, each cell 1 (positive), 0 (negative), -1 (uncertain: --uncertain) or blank
    (unknown; negative on a row whose no-finding column, --no-finding-label, holds 1, as torchxrayvision
    reads CheXpert); all: every column holding only these (but the no-finding one)."""
    no_finding_label: str = option("--no-finding-label", "No Finding", metavar="TEXT")
    """The label that names no finding (every finding negative), compared after normalising; with
    --finding-cols, the column of that name: where it holds 1, the row's blank finding cells are
    negative (its 1 and -1 cells keep their meaning: No Finding with Support Devices)."""
    uncertain: tuple[str, ...] = option("--uncertain", (), metavar="[FINDING=]POLICY")
    """What a -1 cell becomes: ignore (unknown: left out of the loss), positive or negative; per
    finding with FINDING=POLICY (repeatable); default ignore."""
    map: tuple[str, ...] = option("--map", (), metavar="NAME[,NAME]=NAME|FILE.csv")
    """Rename or merge findings (or classes): the names before = become the name after it, an empty
    name drops them; or a CSV with columns from,to (repeatable). Merged findings: positive where any
    is, negative where all are. A dropped class's films are left out (scan lists why); a film whose
    label column names only dropped findings stays, negative for every other finding."""
    patient_from_path: str | None = option("--patient-from-path", None, metavar="REGEX")
    """Take each film's patient from its path: the first match of REGEX (its first group, if it has
    one), e.g. 'patient\\d+' for CheXpert; a path without a match is an error."""

    def __post_init__(self) -> None:
        for name in ("uncertain", "map"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))
        check_choices(self)
        if self.label_sep is not None and not self.label_sep:
            raise ConfigError("--label-sep is empty", hint="give the text that joins findings, e.g. '|'")
        if self.finding_cols is not None and not self.finding_cols.strip(" ,"):
            raise ConfigError("--finding-cols names no column", hint="list columns: --finding-cols A,B, or all")
        if self.label_sep is not None and self.finding_cols is not None:
            raise ConfigError("--label-sep and --finding-cols both say where the findings are", hint="give one")
        if self.task == "single" and (self.finding_cols or "finding_cols" in LAYOUTS.get(self.layout, {})):
            raise ConfigError("--task single reads one class per film; a column per finding gives several",
                              hint="use --task multilabel (or auto)")  # fmt: skip
        self.policies()  # checks them
        if self.patient_from_path is not None:
            try:
                re.compile(self.patient_from_path)
            except re.error as exc:
                raise ConfigError(f"--patient-from-path '{self.patient_from_path}' is not a regular expression: {exc}",
                                  hint=r"e.g. --patient-from-path 'patient\d+'") from None  # fmt: skip

    def policies(self) -> tuple[str, dict[str, str]]:
        """(the policy of every finding, {finding as given: its own policy}) from ``uncertain``."""
        default, own = None, {}
        for item in self.uncertain:
            finding, _, policy = item.rpartition("=")
            if policy.strip() not in POLICIES:
                raise ConfigError(f"--uncertain {item!r}: the policy must be one of {', '.join(POLICIES)}",
                                  hint="e.g. --uncertain positive --uncertain Edema=ignore")  # fmt: skip
            if finding.strip():
                own[finding.strip()] = policy.strip()
            elif default not in (None, policy.strip()):
                raise ConfigError(f"--uncertain gives two policies for every finding: {default} and {policy.strip()}",
                                  hint="give one; name a finding for its own: FINDING=POLICY")  # fmt: skip
            else:
                default = policy.strip()
        return default or "ignore", own

    def fill(self, **preset) -> Findings:
        """These settings with the fields ``preset`` names filled where unset."""
        from dataclasses import replace

        unset = {k: v for k, v in preset.items() if hasattr(self, k) and getattr(self, k) is None}
        return replace(self, **unset)

    @property
    def multilabel(self) -> bool:
        """The task, resolved: multilabel when asked, or (auto) when a film can carry several findings."""
        if self.task != "auto":
            return self.task == "multilabel"
        return self.label_sep is not None or self.finding_cols is not None or self.layout is not None
