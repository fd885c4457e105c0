"""Uncertain labels: ``--uncertain ignore``, ``positive``, ``negative`` and a per-finding mix,
scored on a clean test set, on a synthetic CheXpert-layout set where the truth of every uncertain
cell is known.

Each film carries each of five findings in one of four states, drawn through a seeded latent
model (a heart-and-fluid factor and an airspace factor shared by the findings, a patient's studies
sharing most of their draw): absent; a mimic (a faint striped sign in the finding's place that is
not the finding); faint (the finding, drawn at a third of its strength); clear. The training CSV
labels them as a report-reading labeller would: clear 1.0; faint -1.0 (uncertain) with
probability ``SAID_UNCERTAIN``, else 1.0; a mimic -1.0 with the same probability, else 0.0; absent
0.0 where the report mentions it (``MENTIONED``), else blank, and every cell blank with No Finding
1.0 on a film with no positive or uncertain finding. Per finding the states' shares give CheXpert's
positive and uncertain shares, and a share of the uncertain cells that is truly positive which
differs by finding: mostly positive for Atelectasis and Edema (U-Ones was best for them in the
CheXpert paper), mostly negative for Consolidation (U-Zeros), even for the others. The test set
(CheXpert-v1.0/valid.csv) is drawn the same way, with other patients, every cell its truth.

Every policy trains the MLP with its registered hyperparameters (``lungxray train --params
defaults``) with --seed 0, 1, 2 (each seed its own split and initialisation) and is scored by
``lungxray evaluate`` on the test set: per finding the AUROC, mean +- std over seeds; the macro
AUROC; and from predictions.json the AUROC among the test films with a faint sign only (faint
findings against mimics), where the policies teach different things.

    .venv/bin/python bench/uncertain_bench.py [--films 2400] [--test-films 1000] [--seeds 0 1 2] [--epochs 30]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.special import ndtri
from sklearn.metrics import roc_auc_score

from lungxray.labelling import CHEXPERT_FINDINGS

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402

# finding -> (share of films labelled 1.0, share labelled -1.0: CheXpert's training set; share of
# the uncertain cells that is truly positive: this bench's choice)
SHARES = {
    "Cardiomegaly": (0.12, 0.035, 0.5),
    "Edema": (0.23, 0.06, 0.8),
    "Pleural Effusion": (0.38, 0.05, 0.5),
    "Atelectasis": (0.15, 0.15, 0.8),
    "Consolidation": (0.066, 0.12, 0.2),
}
FINDINGS = list(SHARES)
LOADINGS = {  # finding -> loading on (heart and fluid, airspace)
    "Cardiomegaly": (0.6, 0.0),
    "Edema": (0.6, 0.3),
    "Pleural Effusion": (0.6, 0.1),
    "Atelectasis": (0.3, 0.4),
    "Consolidation": (0.1, 0.6),
}
REGIONS = {  # finding -> (rows, columns) of its place in a 32 x 32 film
    "Cardiomegaly": (slice(17, 26), slice(10, 22)),
    "Edema": (slice(9, 16), slice(4, 13)),
    "Pleural Effusion": (slice(27, 31), slice(2, 30)),
    "Atelectasis": (slice(18, 25), slice(23, 30)),
    "Consolidation": (slice(3, 9), slice(19, 28)),
}
ABSENT, MIMIC, FAINT, CLEAR = range(4)
SAID_UNCERTAIN = 0.85  # share of faint findings and of mimics that the labeller calls uncertain
MENTIONED = 0.5  # share of absent findings, on a film with others, that the report calls negative
SHARED = 0.6  # share of a study's latent variance that is its patient's
STRENGTH = 30.0  # grey levels a clear finding adds; a faint one a third of it
SIZE = 32
# Soft shadows a film, their grey levels (std), and pixel noise (std): chosen so that a logistic
# regression trained on the truth finds clear findings (AUROC about 0.99) but faint ones only in
# part (0.7-0.9 against the films without them), and barely tells faint findings from mimics.
SHADOWS, SHADOW, NOISE = 5, 25.0, 30.0
POLICIES = {
    "ignore": ["--uncertain", "ignore"],
    "positive": ["--uncertain", "positive"],
    "negative": ["--uncertain", "negative"],
    "mix": ["--uncertain", "Atelectasis=positive", "--uncertain", "Edema=positive",
            "--uncertain", "Consolidation=negative"],
}  # fmt: skip


def state_shares(finding: str) -> tuple[float, float, float]:
    """(clear, faint, mimic) shares of films that give ``finding`` its CheXpert label shares."""
    positive, uncertain, truly = SHARES[finding]
    faint, mimic = truly * uncertain / SAID_UNCERTAIN, (1 - truly) * uncertain / SAID_UNCERTAIN
    return positive - (1 - SAID_UNCERTAIN) * faint, faint, mimic


def draw_states(n_films: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(each film's state per finding (N, F) in ABSENT..CLEAR, its patient (N,)): 1-3 studies a patient."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 3], size=n_films, p=[0.6, 0.25, 0.15])
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n_films) + 1]
    sizes[-1] -= sizes.sum() - n_films
    patient = np.repeat(np.arange(len(sizes)), sizes)  # (N,)
    loadings = np.array([LOADINGS[f] for f in FINDINGS])  # (F, 2)
    unique = np.sqrt(1 - (loadings**2).sum(axis=1))  # (F,) each latent variable of variance 1
    factors = rng.standard_normal((len(sizes), 2))  # (P, 2)
    latent = factors @ loadings.T + unique * rng.standard_normal((len(sizes), len(FINDINGS)))  # (P, F)
    films = np.sqrt(SHARED) * latent[patient] + np.sqrt(1 - SHARED) * rng.standard_normal((n_films, len(FINDINGS)))
    states = np.zeros((n_films, len(FINDINGS)), dtype=np.int64)
    for j, finding in enumerate(FINDINGS):
        above = np.cumsum(state_shares(finding))  # shares above the clear, faint and mimic cut-offs
        for state, share in zip((CLEAR, FAINT, MIMIC), above, strict=True):
            states[(films[:, j] > ndtri(1 - share)) & (states[:, j] == ABSENT), j] = state
    return states, patient


def render(states: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 32 x 32 'radiograph': a chest's outline, the exposure and soft shadows of one film, each
    finding at its place by its state, and noise."""
    rows, cols = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    img = 60 + 50 * np.exp(-(((cols - 15.5) / 3.5) ** 2))  # the mediastinum
    img += 40 * (rows > 27)  # the diaphragm
    for _ in range(SHADOWS):  # shadows of ribs, vessels and soft tissue that no finding explains
        r, c = rng.uniform(0, SIZE, 2)
        img += rng.normal(0, SHADOW) * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 4.0**2))
    for finding, state in zip(FINDINGS, states, strict=True):
        place = REGIONS[finding]
        if state == CLEAR:
            img[place] += STRENGTH
        elif state == FAINT:
            img[place] += STRENGTH / 3
        elif state == MIMIC:  # as bright on average as a faint finding, striped
            img[place] += (2 * STRENGTH / 3) * (rows[place] % 2 == 0)
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 8) + rng.normal(0, NOISE, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def cells(states: np.ndarray, rng: np.random.Generator, clean: bool) -> tuple[dict[str, str], bool]:
    """A film's finding cells ({finding: '1.0', '0.0', '-1.0' or ''}) and its No Finding: the truth
    when ``clean``, else what the labeller writes."""
    if clean:
        truth = {f: "1.0" if s in (FAINT, CLEAR) else "0.0" for f, s in zip(FINDINGS, states, strict=True)}
        return truth, "1.0" not in truth.values()
    said = {}
    for finding, state in zip(FINDINGS, states, strict=True):
        if state == CLEAR:
            said[finding] = "1.0"
        elif state in (FAINT, MIMIC):
            said[finding] = "-1.0" if rng.random() < SAID_UNCERTAIN else ("1.0" if state == FAINT else "0.0")
        else:
            said[finding] = "0.0" if rng.random() < MENTIONED else ""
    if not {"1.0", "-1.0"} & set(said.values()):  # No Finding: CheXpert leaves the findings blank
        return dict.fromkeys(FINDINGS, ""), True
    return said, False


def patient_path(path: str) -> str:
    """A film's path from its patient folder on (patientNNNNN/studyN/view1_frontal.jpg): one key
    for the CSV's relative path and the absolute one lungxray writes."""
    return "/".join(Path(path).parts[-3:])


def write_set(root: Path, part: str, n_films: int, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    """CheXpert-v1.0/{part}.csv and its films (clean labels for part 'valid'); returns the CSV and
    each film's states by its path under the patient folder."""
    states, patient = draw_states(n_films, seed)
    rng = np.random.default_rng(seed + 1)
    first = 1 if part == "train" else 60_001  # the test's patients are other people
    rows, truth, study = [], {}, {}
    for i in range(n_films):
        p = first + int(patient[i])
        study[p] = study.get(p, 0) + 1
        path = f"CheXpert-v1.0/{part}/patient{p:05d}/study{study[p]}/view1_frontal.jpg"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(states[i], rng)).save(root / path, quality=95)
        said, nothing = cells(states[i], rng, clean=part == "valid")
        rows.append({"Path": path, "Sex": "Female" if rng.random() < 0.45 else "Male", "Age": str(rng.integers(18, 91)),
                     "Frontal/Lateral": "Frontal", "AP/PA": "AP" if rng.random() < 0.7 else "PA",
                     "No Finding": "1.0" if nothing else ""} | dict.fromkeys(CHEXPERT_FINDINGS, "") | said)  # fmt: skip
        truth[patient_path(path)] = states[i]
    manifest = root / "CheXpert-v1.0" / f"{part}.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest, truth


def lungxray(*args: str) -> None:
    """One ``lungxray`` command, as a user types it; its errors end the bench with its output."""
    done = subprocess.run([sys.executable, "-m", "lungxray.cli", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"lungxray {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def train_and_score(work: Path, sets: tuple[Path, Path], policy: str, seed: int, epochs: int) -> dict:
    """Train with ``policy`` and ``seed``, evaluate on the test set; metrics.json and predictions.json."""
    train_csv, test_csv = sets
    run, cache = work / f"{policy}-{seed}", work / "cache"
    common = ["--layout", "chexpert", "--finding-cols", ",".join(FINDINGS), *POLICIES[policy],
              "--cache-dir", str(cache), "--quiet"]  # fmt: skip
    lungxray("train", str(train_csv), "--out", str(run), "--model", "mlp", "--params", "defaults",
             "--img-size", str(SIZE), "--epochs", str(epochs), "--seed", str(seed), "--test-fraction", "0.05",
             *common)  # fmt: skip
    lungxray("evaluate", str(run / "model"), str(test_csv), "--out", str(run / "test"), *common)
    return {name: json.loads((run / "test" / f"{name}.json").read_text()) for name in ("metrics", "predictions")}


def key(findings: list[str], finding: str) -> str:
    """``finding`` as lungxray names it (normalised: lower case, underscores)."""
    return next(f for f in findings if f == finding.lower().replace(" ", "_"))


def faint_sign_auroc(predictions: dict, truth: dict[str, np.ndarray], finding: str) -> float:
    """AUROC of ``finding`` among the test films with a faint sign of it: faint findings against mimics."""
    j, name = FINDINGS.index(finding), key(predictions["classes"], finding)
    pairs = [(truth[patient_path(image["path"])][j], image["probabilities"][name]) for image in predictions["images"]]
    signed = [(state == FAINT, p) for state, p in pairs if state in (FAINT, MIMIC)]
    return float(roc_auc_score([s for s, _ in signed], [p for _, p in signed]))


def figures(result: dict, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """One trained model's test figures: AUROC per finding, macro, and per finding among faint signs."""
    metrics = result["metrics"]
    per = metrics["per_finding"]
    out = {f: per[key(list(per), f)]["auroc"] for f in FINDINGS} | {"macro": metrics["macro_auroc"]}
    return out | {f"sign/{f}": faint_sign_auroc(result["predictions"], truth, f) for f in FINDINGS}


def label_table(train_csv: Path, truth: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per finding the shares of the training CSV's cells (1.0, 0.0, -1.0, blank) and of its
    uncertain cells that are truly positive."""
    with open(train_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = {}
    for j, finding in enumerate(FINDINGS):
        said = [row[finding] for row in rows]
        unsure = [truth[patient_path(row["Path"])][j] for row in rows if row[finding] == "-1.0"]
        table[finding] = {v or "blank": said.count(v) / len(rows) for v in ("1.0", "0.0", "-1.0", "")}
        table[finding]["truly positive"] = float(np.isin(unsure, (FAINT, CLEAR)).mean())
    table["No Finding"] = {"1.0": sum(row["No Finding"] == "1.0" for row in rows) / len(rows)}
    return table


def winner(stats: dict[str, tuple[float, float]]) -> str:
    """The policy with the best mean; with it, every policy whose mean is within the sum of the
    two seed stds of it (a tie)."""
    best = max(stats, key=lambda p: stats[p][0])
    tied = [p for p in stats if p != best and stats[best][0] - stats[p][0] <= stats[best][1] + stats[p][1]]
    return best if not tied else f"tie: {', '.join([best, *tied])}"


def summary_table(results: dict[str, list[dict]], prefix: str = "") -> str:
    """Per finding and policy the mean +- std over seeds of ``prefix + finding``, and the winner."""
    names = list(results)
    rows = ["| finding | " + " | ".join(names) + " | best |", "|---|" + "---|" * (len(names) + 1)]
    keys = [prefix + f for f in FINDINGS] + ([] if prefix else ["macro"])
    for k in keys:
        values = {p: [r[k] for r in results[p]] for p in names}
        stats = {p: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) for p, v in values.items()}
        cells = " | ".join(f"{m:.3f} +- {s:.3f}" for m, s in stats.values())
        label = "**macro AUROC**" if k == "macro" else k.removeprefix(prefix)
        rows.append(f"| {label} | {cells} | {winner(stats)} |")
    return "\n".join(rows)


def labels_markdown(table: dict) -> str:
    rows = ["| finding | 1.0 | 0.0 | -1.0 | blank | -1.0 truly positive |", "|---|---|---|---|---|---|"]
    for finding in FINDINGS:
        t = table[finding]
        rows.append(f"| {finding} | {t['1.0']:.1%} | {t['0.0']:.1%} | {t['-1.0']:.1%} | {t['blank']:.1%} "
                    f"| {t['truly positive']:.0%} |")  # fmt: skip
    return "\n".join(rows)


def sign_counts(truth: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """Per finding the films with it faint, and those with its mimic."""
    states = np.array(list(truth.values()))  # (N, F)
    return {f: (int((states[:, j] == FAINT).sum()), int((states[:, j] == MIMIC).sum())) for j, f in enumerate(FINDINGS)}


def run(args: argparse.Namespace, work: Path) -> tuple[dict, dict, float]:
    """Every policy on every seed: ({policy: [figures per seed]}, the training labels' table with the
    test set's faint signs under "signs", seconds)."""
    train_csv, train_truth = write_set(work / "data", "train", args.films, 0)
    test_csv, test_truth = write_set(work / "data", "valid", args.test_films, 1000)
    start = time.perf_counter()
    results: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for seed in args.seeds:
        for policy in POLICIES:
            t = time.perf_counter()
            results[policy].append(figures(train_and_score(work, (train_csv, test_csv), policy, seed, args.epochs),
                                           test_truth))  # fmt: skip
            print(f"{policy} seed {seed}: macro AUROC {results[policy][-1]['macro']:.4f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    labels = label_table(train_csv, train_truth) | {"signs": sign_counts(test_truth)}
    return results, labels, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--films", type=int, default=2400, help="films in the training CSV")
    parser.add_argument("--test-films", type=int, default=1000, help="films in the clean test CSV")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per training (early stopping: patience 16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="uncertain-bench-") as folder:
        results, labels, seconds = run(args, Path(folder))
    seeds, signs = " ".join(map(str, args.seeds)), labels["signs"]
    mix = " ".join(POLICIES["mix"])
    command = (f".venv/bin/python bench/uncertain_bench.py --films {args.films} --test-films {args.test_films} "
               f"--seeds {seeds} --epochs {args.epochs}")  # fmt: skip
    body = f"""## Uncertain labels: `--uncertain` policies where the truth of the uncertain cells is known

Command: `{command}`
on {machine()}; {seconds / 60:.1f} minutes for the {len(POLICIES) * len(args.seeds)} trainings and evaluations.

A synthetic CheXpert-layout set (`CheXpert-v1.0/train.csv`, CheXpert's columns, paths
`patientNNNNN/studyN/view1_frontal.jpg`, 1-3 studies per patient) of {args.films:,} films at {SIZE} px.
Each of five findings is, on each film, absent, a mimic (a faint striped sign in the finding's
place that is not the finding), faint (a third of a clear finding's strength) or clear, drawn
through a seeded latent model (a heart-and-fluid and an airspace factor; a patient's studies share
{SHARED:.0%} of their draw). The labeller writes clear findings 1.0; faint findings and mimics -1.0
({SAID_UNCERTAIN:.0%} of them; else 1.0 and 0.0); an absent finding 0.0 on half of the films that
have other findings, else blank; a film with no positive or uncertain finding No Finding 1.0 and
every finding blank, as CheXpert does. The other eight CheXpert columns are blank. The shares match
CheXpert's training set for the 1.0 and -1.0 cells; the share of -1.0 cells that is truly positive
is this bench's choice, by finding:

{labels_markdown(labels)}

No Finding 1.0: {labels["No Finding"]["1.0"]:.1%} of films. lungxray reads a blank cell as unknown
(left out of the loss), but as negative on a film whose No Finding is 1.0 (as torchxrayvision reads
CheXpert).

Each policy trains the MLP with its registered hyperparameters (`lungxray train CSV --layout
chexpert --finding-cols '{",".join(FINDINGS)}' --model mlp --params defaults --img-size {SIZE} --epochs
{args.epochs} --test-fraction 0.05 --seed S --uncertain ...`; the policy applies to the validation
part too, which picks the kept epoch and each finding's threshold) for seeds {seeds} (each seed its
own split and initialisation), and `lungxray evaluate MODEL valid.csv --layout chexpert ...` scores
it on a clean test set of {args.test_films:,} other patients' films drawn the same way, every cell
its truth (faint findings 1.0, mimics 0.0). Policies: ignore, positive, negative, and mix (`{mix}`,
Cardiomegaly and Pleural Effusion left at ignore: what the truth shares above, or the CheXpert
paper, would suggest). Test AUROC, mean +- sample std over the seeds; "best" is the best mean, with every
policy whose mean is within the sum of the two stds of it called a tie (best mean first):

{summary_table(results)}

The same models' AUROC among the test films with a faint sign of the finding only (faint findings
against mimics, from predictions.json), where the policies teach different things; the test set's
faint findings / mimics: {", ".join(f"{f} {n[0]}/{n[1]}" for f, n in signs.items())}:

{summary_table(results, "sign/")}
"""
    update_section("uncertain labels", body)
    print(body)


if __name__ == "__main__":
    main()
