"""The code's shape, checked on its source: modules sit in layers and import only from their own
layer or below (the package's ``__init__`` included, so no cycle hides behind it), the serving and
judging sides import no training code, no module reads another's private names, the run folder's
names have one home, and functions and modules stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import lungxray

PACKAGE = Path(lungxray.__file__).parent
MODULES = {p.stem for p in PACKAGE.glob("*.py")}  # "__init__" is the package itself

# Bottom to top: a module imports from its own layer or the ones below it.
LAYERS = [
    {"errors", "version", "options", "labelling", "config", "runfolder", "progress"},  # settings, run folder names
    {
        "decode",
        "dicom",
        "cache",
        "layout",
        "targets",
        "manifest",
        "data",
        "duplicates",
        "splits",
        "learnable",
        "stratify",
        "confound",
    },  # data
    # networks and figures
    {
        "models",
        "devices",
        "infer",
        "ood",
        "metrics",
        "metrics_multilabel",
        "plots",
        "augment",
        "_fused_kernel",
        "_augment_kernel",
        "losses",
        "multilabel_calibration",
    },
    {"bundle", "predictor", "onnx_export", "saliency", "serve", "serve_schema"},  # serving a saved model
    {"fused", "train", "study", "tune", "workers"},  # learning
    {
        "evaluation",
        "evaluation_multilabel",
        "report",
        "report_blocks",
        "report_data",
        "report_external",
        "report_sections",
        "report_multilabel",
        "card",
        "labels",
    },
    {"job", "pipeline", "cv", "launch", "compare", "tracking"},  # the stages, wired; their folders compared, logged
    {"flags", "console", "cli", "__init__"},  # what users call
]
SERVING = LAYERS[3]
LEARNING = LAYERS[4]
JUDGING = LAYERS[5]
MOST_PARAMETERS = 7
MOST_LINES = 450


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text())


def _imports(module: str) -> set[str]:
    """lungxray modules that ``module`` imports anywhere in its source, inside functions included;
    a name imported from the package itself (``from lungxray import __version__``) is an edge to
    ``__init__``, a submodule imported through it (``from lungxray import runfolder``) one to it."""
    found = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lungxray":
                    found.add(parts[1] if len(parts) > 1 and parts[1] in MODULES else "__init__")
        elif isinstance(node, ast.ImportFrom):
            name = f"lungxray.{node.module or ''}".rstrip(".") if node.level else node.module or ""
            parts = name.split(".")
            if parts[0] != "lungxray":
                continue
            if len(parts) > 1:
                found.add(parts[1] if parts[1] in MODULES else "__init__")
            else:
                found |= {a.name if a.name in MODULES else "__init__" for a in node.names}
    return found - {module}


def _reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for child in _imports(todo.pop()) - seen:
            seen.add(child)
            todo.append(child)
    return seen


def _layer(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def test_the_import_scan_sees_imports_inside_functions_and_through_the_package():
    assert "tune" in _imports("pipeline")  # imported inside tune_stage only
    assert "runfolder" in _imports("pipeline")  # from lungxray import runfolder
    assert {"job", "pipeline", "cv", "predictor"} <= _imports("__init__")  # imported inside the API's functions
    assert {"train", "tune", "pipeline"} <= _reachable("cv")


def test_every_module_has_one_layer():
    placed = [m for layer in LAYERS for m in layer]
    assert len(placed) == len(set(placed))
    assert set(placed) == MODULES, f"place these in a layer: {sorted(MODULES - set(placed))}"


def test_no_module_imports_from_a_layer_above_its_own():
    back_edges = [
        f"{m} -> {d}" for m in sorted(MODULES) for d in sorted(_imports(m)) if _layer(d) > _layer(m)
    ]  # fmt: skip
    assert back_edges == []


def test_the_import_graph_has_no_cycle():
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for child in sorted(_imports(module)):
            if state.get(child) == "open":
                cycles.append(path[path.index(child) :] + [child])
            elif child not in state:
                visit(child, [*path, child])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_serving_and_judging_sides_import_no_training_code():
    for module in SERVING | JUDGING:
        assert not _reachable(module) & LEARNING, (module, _reachable(module) & LEARNING)


def test_settings_and_errors_sit_at_the_bottom():
    assert _reachable("errors") == set()
    assert _reachable("config") == {"errors", "options", "labelling"}
    assert _reachable("labelling") == {"errors", "options"}
    assert _reachable("options") == {"errors"}
    assert _reachable("runfolder") == {"errors"}


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for module in sorted(MODULES):
        for node in ast.walk(_tree(module)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lungxray"):
                offenders += [f"{module}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    allowed = {"__init__: lungxray.version.__version__"} | {
        f"{m}: lungxray.version.__version__" for m in MODULES
    }  # a dunder is public
    assert sorted(set(offenders) - allowed) == []


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    count = len(names) + (args.vararg is not None) + (args.kwarg is not None)
    return count - (bool(names) and names[0] in ("self", "cls"))


def test_no_function_takes_more_than_seven_parameters():
    """Eight loose parameters are a settings object waiting to be named (the Job's own
    constructor is a dataclass's and generated)."""
    wide = [
        f"{module}.{node.name} ({_parameters(node)})"
        for module in sorted(MODULES)
        for node in ast.walk(_tree(module))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _parameters(node) > MOST_PARAMETERS
    ]
    assert wide == []


def test_no_module_is_longer_than_a_reader_holds_in_mind():
    long = {m: n for m in sorted(MODULES) if (n := len((PACKAGE / f"{m}.py").read_text().splitlines())) > MOST_LINES}
    assert long == {}


def test_the_parameter_count_reads_methods_and_catch_alls():
    tree = ast.parse("class A:\n    def f(self, a, *b, c, **d): pass\ndef g(a, b=1, /, c=2): pass\n")
    counts = {n.name: _parameters(n) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert counts == {"f": 4, "g": 3}


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
