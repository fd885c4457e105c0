"""The README's main job with and without greenlet, to attribute the GP sampler's ask time.

Optuna's GPSampler optimises its acquisition function in batches when greenlet can be imported,
and falls back to one L-BFGS-B run at a time otherwise; the trials are the same. `off` hides
greenlet from this process before Optuna is imported. Run both, one after the other:

    for m in off on; do .venv/bin/python bench/greenlet_ab.py $m; done
"""

import sys
import tempfile
import time
from pathlib import Path

if sys.argv[1] == "off":
    sys.modules["greenlet"] = None  # import greenlet now raises ImportError
from lungxray.cli import main  # noqa: E402

out = Path(tempfile.gettempdir()) / f"ab-{sys.argv[1]}"

start = time.perf_counter()
main(
    [
        "run",
        "../shared/data/covid19-image-dataset",
        "--model",
        "mlp",
        "--out",
        str(out),
        "--seed",
        "0",
        "--force",
        "--quiet",
    ]
)
print(sys.argv[1], "wall", round(time.perf_counter() - start, 1), "s; search s in", out / "run.json")
