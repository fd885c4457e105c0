"""Write the five-site manifest of the shared data: the covid19-image-dataset's two sources and
external-dev's three, for leave-one-site-out experiments (``lungxray cv --by site``).

covid19-image-dataset names its sources by class (its README): every COVID-19 film comes from the
University of Montreal's public COVID chest X-ray collection ("montreal"), every normal and viral
pneumonia film from a public pediatric pneumonia collection ("pediatric"). external-dev's
manifest.csv names each film's source and patient; its sources become "hannover", "actualmed" and
"ieee8023". Paths are relative to the shared data folder:

    python bench/five_sites.py /tmp/five-sites.csv
    lungxray scan /tmp/five-sites.csv --image-dir ../shared/data
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# external-dev's source column -> site name (the repositories its README names)
EXTERNAL_SITES = {"ml-workgroup": "hannover", "agchung": "actualmed", "ieee8023": "ieee8023"}


def rows(shared: Path) -> list[dict]:
    out = []
    base = shared / "covid19-image-dataset"
    for path in sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")):
        label = path.parent.name
        site = "montreal" if label.lower() == "covid" else "pediatric"
        out.append({"path": str(path.relative_to(shared)), "label": label, "site": site, "patient": ""})
    with open(shared / "external-dev" / "manifest.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            site = next(name for key, name in EXTERNAL_SITES.items() if row["source"].startswith(key))
            label = row["file"].split("/")[0]
            out.append({"path": f"external-dev/{row['file']}", "label": label, "site": site, "patient": row["patient"]})
    return out


def main_to(out: Path, shared: Path = SHARED) -> list[dict]:
    """Write the manifest to ``out``; return its rows."""
    table = rows(shared)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "site", "patient"])
        writer.writeheader()
        writer.writerows(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the CSV to write")
    parser.add_argument("--shared", type=Path, default=SHARED, help=f"the shared data folder (default {SHARED})")
    args = parser.parse_args()
    table = main_to(args.out, args.shared)
    print(f"{args.out}: {len(table)} images from {len({r['site'] for r in table})} sites")


if __name__ == "__main__":
    main()
