"""A contact sheet (one PNG) of the top rows of label_issues.csv, for BENCHMARKS.md: each image as
a thumbnail with its rank, given and suggested class, score and path.

    .venv/bin/python bench/label_sheet.py LABEL_ISSUES_CSV DATA OUT.png [--top 30]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image, ImageDraw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("data", type=Path, help="the dataset folder the csv's paths are relative to")
    parser.add_argument("out", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--size", type=int, default=150)
    args = parser.parse_args()
    rows = list(csv.DictReader(args.csv.read_text().splitlines()))[: args.top]
    cols, cell, caption = 6, args.size, 26
    sheet = Image.new("L", (cols * cell, -(-len(rows) // cols) * (cell + caption)), 255)
    draw = ImageDraw.Draw(sheet)
    for k, row in enumerate(rows):
        x, y = (k % cols) * cell, (k // cols) * (cell + caption)
        with Image.open(args.data / row["path"]) as img:
            img = img.convert("L")
            img.thumbnail((cell - 6, cell - 6))
            sheet.paste(img, (x + 3, y + 3))
        flag = "*" if row["flagged"] == "True" else ""
        draw.text(
            (x + 3, y + cell - 1),
            f"#{row['rank']}{flag} {row['given'][:6]}>{row['suggested'][:6]} {float(row['score']):.2f}",
            fill=0,
        )
        draw.text((x + 3, y + cell + 11), row["path"][:26], fill=0)
    sheet.save(args.out, optimize=True)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
