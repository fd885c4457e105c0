"""The report's HTML building blocks: an inline PNG image, a table, a section, a path shown relative
to the data folder, a confidence interval in brackets, a probability.

Shared by the report's section modules (``report_sections``, ``report_external``) so that every
table and figure reads the same way. Knows nothing about runs or metrics.
"""

from __future__ import annotations

import base64
import html
import os


def img(png: bytes, alt: str) -> str:
    """PNG bytes as an <img> with the data inline and ``alt`` saying what it shows."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def figure(fig, alt: str) -> str:
    """A matplotlib figure as an inline <img> (the figure closed)."""
    from lungxray.plots import figure_png  # here: the console imports this module for `probability` alone

    return img(figure_png(fig), alt)


def table(header: list[str], rows: list[list]) -> str:
    """A table that scrolls sideways on a narrow screen; floats shown to 4 decimals, the rest escaped."""
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def relative(path: str, root: str | None) -> str:
    """``path`` relative to the data folder ``root`` when it lies inside it."""
    if root:
        try:
            rel = os.path.relpath(path, root)
            if not rel.startswith(".."):
                return rel
        except ValueError:
            pass
    return str(path)


def interval(ci: dict, key: str) -> str:
    """`` (low-high)`` of ``key`` in a metrics dict's ci95, or nothing."""
    return f" ({ci[key][0]:.2f}-{ci[key][1]:.2f})" if ci.get(key) else ""


def probability(p: float) -> str:
    """A probability as the report's pages show it: three decimals, and never rounded to certainty
    (0.9993 is ">0.999", not 1.00; 0.0004 is "<0.001", not 0.00)."""
    if p > 0.999:
        return ">0.999"
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}"
