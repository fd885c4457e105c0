"""What the command line prints: one function per result (a scan, a run, a search, a worker, a
training, an evaluation, a cross-validation, an audit, predictions). Reads results, never runs a
stage.
"""

from __future__ import annotations

import json

from lungxray import runfolder


def print_json(obj) -> None:
    """``obj`` as strict JSON (``--json``): a NaN or infinite number, which JSON cannot hold, is null."""
    import math

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, (list, tuple)) else value

    print(json.dumps(finite(obj), indent=2, allow_nan=False))


def print_scan(summary: dict) -> None:
    import os

    rel = lambda path: os.path.relpath(path, summary["root"])  # noqa: E731
    print(f"{summary['root']}: {summary['layout']} layout, {summary['n_images']} usable images")
    if summary.get("task") == "multilabel":
        print_findings(summary)
    else:
        for name, n in summary["counts"].items():
            print(f"  {name:<24} {n}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} file(s):")
        for s in summary["skipped"]:
            print(f"  {rel(s['path'])}: {s['reason']}")
    print(f"{len(summary['duplicate_groups'])} duplicate group(s) (identical or near-identical images):")
    for group in summary["duplicate_groups"]:
        print("  " + "  ==  ".join(map(rel, group)))
    if summary["layout"] == "split":
        print(f"{len(summary['cross_split_duplicates'])} duplicate pair(s) straddle two split folders")
    mixed = summary["mixed_label_duplicate_groups"]
    if mixed:
        print(f"{len(mixed)} duplicate group(s) whose copies carry different labels (check these labels):")
        for group in mixed:
            print("  " + "  ==  ".join(f"{rel(m['path'])} ({m['label']})" for m in group))
    from lungxray.data import films_per_patient

    patients = summary["patients"]
    if patients["n"]:
        per = films_per_patient(patients)
        print(f"{patients['n']} patient(s) named by DICOM headers, covering {patients['images']} images ({per})")
    groups = summary["groups"]
    sources = [f"patients from {groups['file']}"] * bool(groups["file"])
    sources += ["DICOM patients"] * bool(patients["n"] and patients["grouped"])
    sources += ["patients of the manifest"] * bool(summary.get("manifest_patients"))
    source = f"{' and '.join(sources)} joined with duplicate groups" if sources else "duplicate groups"
    print(f"{groups['n']} group(s) kept whole by every split ({source}); the largest holds {groups['largest']} images")
    if summary["excluded"]:
        print(f"{len(summary['excluded'])} image(s) left out by --exclude")
    print_confound(summary.get("confound"))


def print_findings(summary: dict) -> None:
    """A multi-label scan's findings: positive / negative / unknown films and prevalence among the
    known, per site where there are sites, and the pairs most often positive together."""
    share = lambda row: f"{row['prevalence']:.1%}" if row["prevalence"] is not None else "-"  # noqa: E731
    print(f"multi-label: {len(summary['findings'])} findings (positive / negative / unknown films, prevalence "
          "among the known)")  # fmt: skip
    for name, row in summary["findings"].items():
        print(f"  {name:<28} {row['positive']:>6} / {row['negative']:>6} / {row['unknown']:>6}  {share(row):>6}")
    by_site = summary.get("findings_by_site") or {}
    if by_site:
        print("prevalence per site:")
        width = max(10, *(len(site) + 2 for site in by_site))
        print(f"  {'finding':<28}" + "".join(f"{site:>{width}}" for site in by_site))
        for name in summary["findings"]:
            print(f"  {name:<28}" + "".join(f"{share(table[name]):>{width}}" for table in by_site.values()))
    pairs = summary.get("co_occurring") or []
    if pairs:
        together = ", ".join(f"{' + '.join(p['findings'])} ({p['films']})" for p in pairs)
        print(f"findings most often positive together (films): {together}")


def print_confound(confound: dict | None) -> None:
    """The source-confound probe against chance, its warning when it fires, then what cleanlab's
    Datalab checks add (their notes)."""
    if not confound:
        return
    sites = confound.get("sites")
    if sites:
        print_sites(sites)
    if confound["balanced_accuracy"] is not None:
        print(
            "source-confound probe (the class from image size, file format, bytes per pixel, bit depth and grey "
            f"levels, {confound['folds']}-fold): balanced accuracy {confound['balanced_accuracy']:.2f} against "
            f"{confound['chance']:.2f} for chance"
        )
    if confound["warning"]:
        print(f"WARNING: {confound['warning']}")
    for line in confound.get("datalab", {}).get("notes", []):
        print(line)


def print_sites(sites: dict) -> None:
    """The class x site table, Cramer's V, the site probe against its baselines, the warnings."""
    table = sites["table"]
    classes = list(next(iter(table.values())))
    width = max(len(s) for s in table) + 2
    print("images per site and class:")
    print(f"  {'site':<{width}}" + "".join(f"{c:>17}" for c in classes))
    for site, row in table.items():
        print(f"  {site:<{width}}" + "".join(f"{row[c]:>17}" for c in classes))
    v = sites["cramers_v"]
    probe = sites["probe"]
    print(f"Cramer's V of class and site: {v:.2f} (0: classes spread alike over sites; 1: the site gives the class)"
          if v is not None else "Cramer's V of class and site: not defined (one class or one site)")  # fmt: skip
    if probe["balanced_accuracy"] is None:
        print(f"site probe: not run (the smallest site holds fewer than 2 images: {probe['folds']} fold(s) possible)")
    else:
        print(
            f"site probe (the site from the same image properties, {probe['folds']}-fold): balanced accuracy "
            f"{probe['balanced_accuracy']:.2f} against {probe['chance']:.2f} for chance; accuracy "
            f"{probe['accuracy']:.2f} against {probe['majority']:.2f} for always answering the largest site"
        )
    for line in sites["warnings"]:
        print(f"WARNING: {line}")


def ci(metrics: dict, name: str) -> str:
    interval = metrics.get("ci95", {}).get(name)
    return f" (95% CI {interval[0]:.4f}-{interval[1]:.4f})" if interval else ""


def seen_line(seen: dict) -> str:
    """The headline on images the model was trained or validated on."""
    if not seen["known"]:
        return "this model does not record which images it was trained on: seen images cannot be left out"
    n, k = seen["n_images"], seen["n_seen"]
    if not k:
        return f"none of the {n} images was used in training or validation: this is a test"
    if seen["included"]:
        return (
            f"NOT A TEST: {k} of {n} images were used in training or validation and are included "
            "(--include-seen); these figures overstate how the model does on new images"
        )
    return f"{k} of {n} images were used in training or validation: scored on the other {n - k}"


def print_run(summary: dict, metrics: dict, external: dict[str, dict]) -> None:
    """``lungxray run``'s results: the search, the test figures, the external ones (``external``:
    name -> that set's metrics.json) against what a model that knows nothing scores, the artifacts."""
    split = metrics["split"]
    print_confound(summary.get("confound"))
    print(f"best hyperparameters: {json.dumps(summary['best_params'])}")
    print(f"trials: {summary['trials_complete']} ran to the end, {summary['trials_pruned']} stopped early")
    leaked = split["test_duplicates_of_train"]
    duplicates = (
        f"{leaked} test images copy a training image: optimistic, see --drop-test-duplicates"
        if leaked
        else f"{summary['duplicate_groups']} duplicate groups kept whole"
    )
    from lungxray.report_external import against_chance, site_rows

    if metrics.get("task") == "multilabel":
        print(
            f"test on {summary['n_test']} held-out images ({split['mode']} split, seed {split['seed']}, {duplicates}):"
        )
        print_multilabel(metrics)
        metrics = {}  # the figures below are single-label ones
    for label, figures in site_rows(metrics) if metrics else ():  # where the model meets a site it never saw: first
        print(f"{label}: {figures}")
    if metrics:
        print(
            f"test accuracy {summary['test_accuracy']:.4f}{ci(metrics, 'accuracy')}, macro-F1 "
            f"{summary['test_macro_f1']:.4f}{ci(metrics, 'macro_f1')} on {summary['n_test']} held-out images "
            f"({split['mode']} split, seed {split['seed']}, {duplicates})"
        )
        print_ood(metrics)
    for name, ext in summary["external"].items():
        if "error" in ext:
            print(f"external {name}: not evaluated: {ext['error']}")
            continue

        print(f"external {name} ({ext['n']} images): " + "; ".join(against_chance(external[name])))
    print("artifacts:")
    for name, path in summary["artifacts"].items():
        print(f"  {name:<17} {path}")
    if summary["artifacts"].get("study"):
        print(study_hint(summary["artifacts"]["study"]))


def study_hint(study: str) -> str:
    """How to browse the search: optuna-dashboard on the study's storage URL (``study``: a URL, or
    the path of the run folder's SQLite file)."""
    import os
    import shlex

    url = study if "://" in study else f"sqlite:///{os.path.abspath(study)}"
    return f"browse the search: optuna-dashboard {shlex.quote(url)}  (pip install 'lungxray[dashboard]')"


def print_evaluation(metrics: dict, out) -> None:
    """``lungxray evaluate``'s headline figures and files: first against what a model that knows
    nothing scores on these images (they are often another hospital's), and each site's worst."""
    from lungxray.report_external import against_chance, site_rows

    if metrics.get("task") == "multilabel":
        print(f"{metrics['n']} images:")
        print_multilabel(metrics)
        print("written: " + ", ".join(str(out / name) for name in (runfolder.REPORT, runfolder.METRICS)))
        return
    print(f"against chance on {metrics['n']} images: " + "; ".join(against_chance(metrics)))
    for label, figures in site_rows(metrics):
        print(f"{label}: {figures}")
    auroc = "n/a" if metrics["macro_auroc"] is None else f"{metrics['macro_auroc']:.4f}"
    print(
        f"accuracy {metrics['accuracy']:.4f}{ci(metrics, 'accuracy')}, macro-F1 {metrics['macro_f1']:.4f}"
        f"{ci(metrics, 'macro_f1')}, macro AUROC {auroc}, loss {metrics['loss']:.4f} on {metrics['n']} images"
    )
    print_ood(metrics)
    names = (runfolder.REPORT, runfolder.METRICS, runfolder.AUDIT, runfolder.CONFUSION)
    print("written: " + ", ".join(str(out / name) for name in names))


def print_audit(report: dict, out) -> None:
    """``lungxray audit``'s accuracy per view against chance, and its verdict."""
    chance = report["chance"]
    print(
        f"shortcut audit on {report['n']} images (chance: accuracy {chance['accuracy']:.4f}, "
        f"macro-F1 {chance['macro_f1']:.4f}):"
    )
    for name, view in report["views"].items():
        ci95 = view["accuracy_ci95"]
        interval = f" (95% CI {ci95[0]:.4f}-{ci95[1]:.4f})" if ci95 else ""
        print(
            f"  {name.replace('_', ' '):<16} accuracy {view['accuracy']:.4f}{interval}, macro-F1 {view['macro_f1']:.4f}"
        )
    print(report["verdict"])
    print(f"written: {out / runfolder.AUDIT}")


def print_cv(report: dict, job, out) -> None:
    """``lungxray cv``'s table: each metric's mean +- std over folds, pooled value and CI."""
    print_confound(report.get("confound"))
    tuned = ", tuned in each fold" if job.cv.tune else ""
    if report.get("by") == "site":
        print_held_out_sites(report["per_fold"])
        print(f"{job.model}, leave-one-site-out over {report['folds']} sites, pooled over every site's held-out "
              f"images ({report['pooled']['n']}; seed {report['seed']}{tuned}):")  # fmt: skip
    else:
        print(f"{job.model}, {job.cv.folds}-fold cross-validation on {report['pooled']['n']} images "
              f"(folds grouped by duplicate group, seed {report['seed']}{tuned}):")  # fmt: skip
    print(f"  {'metric':<28} {'mean +- std over folds':>24} {'pooled':>8}  95% CI (bootstrap)")
    for name, row in report["summary"].items():
        spread = (
            f"{row['mean']:.4f} +- {row['std']:.4f}"
            if row["std"] is not None
            else "n/a"
            if row["mean"] is None
            else f"{row['mean']:.4f}"
        )
        pooled = "n/a" if row["pooled"] is None else f"{row['pooled']:.4f}"
        ci95 = "n/a" if row["ci95"] is None else f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]"
        print(f"  {name:<28} {spread:>24} {pooled:>8}  {ci95}")
    if report["seed_spread"]:
        print_seed_spread(report)
    names = (runfolder.REPORT, runfolder.CV, runfolder.FOLDS, runfolder.CV_CONFUSION)
    print("written: " + ", ".join(str(out / name) for name in names))


def print_held_out_sites(per_fold: list[dict]) -> None:
    """Each held-out site's figures against what a model that knows nothing scores there."""
    from lungxray.report_external import against_chance

    print("each site held out in turn (trained on the others; 95% intervals):")
    for fold in per_fold:
        left = fold.get("left_out")
        note = f" ({left} image(s) elsewhere left out of training: a copy or their patient is here)" if left else ""
        print(f"  {fold['site']}, {fold['metrics']['n']} images{note}: " + "; ".join(against_chance(fold["metrics"])))


def print_seed_spread(report: dict) -> None:
    seeds = [p["training_seed"] for p in next(iter(report["seed_spread"].values()))["per_seed"]]
    print(
        f"over {len(seeds)} training seeds ({', '.join(map(str, seeds))}) on the same folds "
        f"(the table above: seed {seeds[0]}):"
    )
    print(f"  {'metric':<28} {'fold mean: mean +- std':>24} {'pooled: mean +- std':>22}")
    for name, row in report["seed_spread"].items():
        cells = [f"{row[k]['mean']:.4f} +- {row[k]['std']:.4f}" if row[k] else "n/a" for k in ("fold_mean", "pooled")]
        print(f"  {name:<28} {cells[0]:>24} {cells[1]:>22}")


def print_multilabel(metrics: dict) -> None:
    """A multi-label model's figures: macro and micro AUROC against chance, then per finding its
    AUROC, average precision beside its baseline (the prevalence), and sensitivity and specificity
    at the finding's threshold."""
    two = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731

    def interval(name: str) -> str:
        found = (metrics.get("ci95") or {}).get(name)
        return f" ({found[0]:.2f}-{found[1]:.2f})" if found else ""

    baseline = (metrics.get("baseline") or {}).get("micro_auroc")
    print(f"  macro AUROC {two(metrics['macro_auroc'])}{interval('macro_auroc')} (chance: 0.50), micro AUROC "
          f"{two(metrics['micro_auroc'])}{interval('micro_auroc')} (each finding's prevalence alone: "
          f"{two(baseline)})")  # fmt: skip
    for name, m in metrics["per_finding"].items():
        print(f"  {name} ({m['n_pos']} of {m['n_known']} known positive): AUROC {two(m['auroc'])}"
              f"{interval(f'auroc/{name}')}, average precision {two(m['average_precision'])} (baseline "
              f"{two(m['average_precision_baseline'])}), sensitivity {two(m['sensitivity'])}, specificity "
              f"{two(m['specificity'])} at threshold {two(m['threshold'])}")  # fmt: skip
    ood = metrics.get("ood")
    if ood:
        print(f"  flagged out of distribution: {ood['n_flagged']} of {metrics['n']} ({ood['share_flagged']:.1%})")


def print_ood(metrics: dict) -> None:
    """How many scored images the out-of-distribution flag set aside, and the accuracy on the rest."""
    ood = metrics.get("ood")
    if ood and ood["accepted"]:
        print(
            f"flagged out of distribution: {ood['n_flagged']} of {metrics['n']} ({ood['share_flagged']:.1%}); "
            f"accuracy on the other {ood['accepted']['n']}: {ood['accepted']['accuracy']:.4f}"
        )
    elif ood:
        print(f"flagged out of distribution: all {metrics['n']} images")


def print_predictions(results: list[dict], thresholds: dict[str, float] | None = None) -> None:
    """One line per image: its class and probabilities (and overlay), or why it was skipped; a
    multi-label model's (``thresholds``: its per-finding thresholds) its findings against them."""
    from lungxray.report_blocks import probability  # one way to show a probability, here and in the report

    for r in results:
        if "error" in r:
            print(f"{r['path']}: skipped, {r['error']}")
        elif "findings" in r:
            print(finding_line(r, thresholds or {}))
        else:
            probs = ", ".join(f"{c} {probability(p)}" for c, p in r["probabilities"].items())
            overlay = f" -> {r['overlay']}" if "overlay" in r else ""
            if r.get("in_distribution") is False:  # the answer is shown, but as one the model cannot vouch for
                print(
                    f"{r['path']}: NOT LIKE THE TRAINING IMAGES (out-of-distribution score {r['ood_score']:.2f} > 1): "
                    f"no reliable answer; the model would say {r['class']} ({probs}){overlay}"
                )
                continue
            print(f"{r['path']}: {r['class']} ({probs}){overlay}")


def finding_line(r: dict, thresholds: dict[str, float]) -> str:
    """'path: effusion 0.710 (>= 0.400), cardiomegaly 0.550 (>= 0.500); below threshold: nodule 0.120
    (< 0.300)': a multi-label answer's findings present, then the others, each most probable first
    (a finding missing from ``thresholds`` without its threshold)."""
    from lungxray.report_blocks import probability

    def shown(f: str, sign: str) -> str:
        cut = f" ({sign} {probability(thresholds[f])})" if f in thresholds else ""
        return f"{f} {probability(r['probabilities'][f])}{cut}"

    ranked = sorted(r["probabilities"], key=lambda f: -r["probabilities"][f])
    present = ", ".join(shown(f, ">=") for f in r["findings"]) or "no finding at or above its threshold"
    below = ", ".join(shown(f, "<") for f in ranked if f not in r["findings"])
    answer = present + (f"; below threshold: {below}" if below else "")
    overlays = f" -> {', '.join(r['overlays'].values())}" if "overlays" in r else ""
    if r.get("in_distribution") is False:  # shown, but as an answer the model cannot vouch for
        return (
            f"{r['path']}: NOT LIKE THE TRAINING IMAGES (out-of-distribution score {r['ood_score']:.2f} > 1): "
            f"no reliable answer; the model would say {answer}{overlays}"
        )
    return f"{r['path']}: {answer}{overlays}"
