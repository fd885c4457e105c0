"""Helpers that several test files share and that are not fixtures: what a figure's size should be.
No tests here; conftest.py holds the fixtures and the synthetic data."""

from __future__ import annotations


def figure_size(width: int, height: int) -> tuple[int, int]:
    """The size of ``side_by_side``'s figure for a picture of ``width`` x ``height``: two panels of
    the picture's aspect whose longer side is ``PANEL``, their margins, and the colour scale."""
    from lungxray.saliency import PANEL

    w, h = round(width * PANEL / max(width, height)), round(height * PANEL / max(width, height))
    return 2 * w + 2 * 12 + 16 + 6 + 40, h + 26
