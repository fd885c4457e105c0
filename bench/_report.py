"""Write one benchmark's section into BENCHMARKS.md, between markers, leaving the others alone."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

# The tutorial's preprocessing (plain bilinear resize), which the benchmarks measured before
# --crop-borders and --equalize clahe became the defaults: their figures stay reproducible.
PLAIN = {"crop_borders": False, "equalize": "none"}

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\nEvery figure below was printed by the command written above it, which "
    "measures the things it compares side by side in one run. Absolute times on a shared machine "
    "are noisy; compare the ratios.\n"
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    import os

    return (
        f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def update_section(name: str, body: str) -> None:
    """Replace (or append) the section called ``name``."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)
