"""The code's layering, checked on the import graph: the serving side imports no training code,
the settings import nothing heavy, and the run folder's names have one home."""

from __future__ import annotations

import ast
from pathlib import Path

import lungxray

PACKAGE = Path(lungxray.__file__).parent
SERVING = ("bundle", "explain", "serve", "infer", "decode")
TRAINING = {"train", "tune", "augment", "pipeline", "cv", "fused", "_fused_kernel"}


def _imports(module: str) -> set[str]:
    """lungxray modules that ``module`` imports anywhere in its source, inside functions included."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:  # from .train import fit
            node = ast.ImportFrom(module=f"lungxray.{node.module}" if node.module else "lungxray", names=node.names)
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "lungxray" and len(parts) > 1 and (PACKAGE / f"{parts[1]}.py").is_file():
                found.add(parts[1])
    return found - {module}


def _reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for child in _imports(todo.pop()) - seen:
            seen.add(child)
            todo.append(child)
    return seen


def test_the_import_scan_sees_imports_inside_functions():
    assert "tune" in _imports("pipeline")  # imported inside tune_stage only
    assert {"train", "tune", "pipeline"} <= _reachable("cv")


def test_serving_side_imports_no_training_code():
    for module in SERVING:
        assert not _reachable(module) & TRAINING, (module, _reachable(module) & TRAINING)


def test_settings_and_errors_sit_at_the_bottom():
    assert _reachable("errors") == set()
    assert _reachable("config") == {"errors"}
    assert _reachable("runfolder") == {"errors"}


def test_run_folder_names_are_written_in_one_module():
    """No module but runfolder spells an artifact's file name as a string literal."""
    names = {
        "scan.json",
        "splits.json",
        "folds.json",
        "trials.json",
        "best_params.json",
        "history.json",
        "metrics.json",
        "predictions.json",
        "audit.json",
        "run.json",
        "cv.json",
        "report.html",
        "curves.png",
        "confusion_matrix.png",
        "cv_confusion_matrix.png",
        "explain.json",
        "study.db",
    }
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.stem in ("runfolder", "bundle"):  # bundle keeps its own files (metrics.json inside model/)
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append(f"{path.name}: {node.value}")
    assert offenders == []
