"""A search with 1 and 2 workers on one machine, its study in SQLite and in PostgreSQL.

Each setting runs `lungxray tune DATA --model cnn --trials 16 --seed 0` into a fresh run folder:
`--parallel 1` is the one-process search, `--parallel 2` two worker processes (one core each
here); `postgres` puts the study in a throw-away PostgreSQL cluster on 127.0.0.1 (Debian's
postgresql; started here as an unprivileged user and removed after). The scan is done once
beforehand into the cache, so each time is the search itself. Prints wall times, the best
validation loss, and the ratio to the one-process SQLite search.

    .venv/bin/python bench/workers_bench.py ../shared/data/covid19-image-dataset [--trials 16]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402


def _bin(name: str) -> str:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1]
    return found


def start_postgres(folder: Path) -> tuple[str, list[str]]:
    """A throw-away cluster in ``folder``: (a libpq host/port prefix, the command to stop it)."""
    run_as = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chmod(folder, 0o777)
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        run_as = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    subprocess.run([*run_as, _bin("initdb"), "-D", str(data), "-A", "trust", "-U", "lungxray", "--no-sync"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([*run_as, _bin("pg_ctl"), "-D", str(data), "-o", f"-h 127.0.0.1 -p {port} -k {folder}",
                    "-l", str(folder / "log"), "-w", "start"], check=True, capture_output=True)  # fmt: skip
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={port} user=lungxray dbname=postgres", autocommit=True) as db:
        for k in range(4):
            db.execute(f"CREATE DATABASE bench{k}")
    return f"postgresql+psycopg://lungxray@127.0.0.1:{port}/bench", [*run_as, _bin("pg_ctl"), "-D", str(data),
                                                                        "-m", "immediate", "stop"]  # fmt: skip


def tune(data: Path, out: Path, cache: Path, trials: int, parallel: int, storage: str | None) -> float:
    command = [sys.executable, "-m", "lungxray.cli", "tune", str(data), "--out", str(out), "--model", "cnn",
               "--trials", str(trials), "--seed", "0", "--parallel", str(parallel), "--cache-dir", str(cache),
               "--quiet"] + (["--storage", storage, "--study-name", "bench"] if storage else [])  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    os.chmod(work, 0o711)  # the server's user must reach its folder inside
    cache = work / "cache"
    subprocess.run([sys.executable, "-m", "lungxray.cli", "scan", str(args.data), "--cache-dir", str(cache),
                    "--quiet", "--json"], check=True, capture_output=True)  # fmt: skip
    pg_folder = work / "pg"
    pg_folder.mkdir()
    prefix, stop = start_postgres(pg_folder)
    rows = []
    try:
        settings = [("sqlite", 1), ("postgres", 1), ("sqlite", 2), ("postgres", 2)]
        for k, (storage, parallel) in enumerate(settings):
            out = work / f"{storage}-{parallel}"
            seconds = tune(
                args.data, out, cache, args.trials, parallel, f"{prefix}{k}" if storage == "postgres" else None
            )
            best = json.loads((out / "best_params.json").read_text())
            trials = json.loads((out / "trials.json").read_text())
            finished = sum(t["state"] in ("COMPLETE", "PRUNED") for t in trials)
            pruned = sum(bool(t.get("pruned_at_epoch")) for t in trials)
            rows.append({"storage": storage, "workers": parallel, "seconds": seconds, "finished": finished,
                         "pruned": pruned, "best_val_loss": best["value"]})  # fmt: skip
            print(rows[-1], flush=True)
    finally:
        subprocess.run(stop, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["seconds"]
    table = "\n".join(
        f"| {r['storage']} | {r['workers']} | {r['seconds']:.0f} | {base / r['seconds']:.2f} | {r['finished']} "
        f"({r['pruned']} stopped early) | {r['best_val_loss']:.4f} |"
        for r in rows
    )
    body = f"""## A search with 1 and 2 workers, the study in SQLite and in PostgreSQL

Command: `.venv/bin/python bench/workers_bench.py {args.data} --trials {args.trials}` on {machine()}.
`lungxray tune DATA --model cnn --trials {args.trials} --seed 0 --parallel W [--storage postgresql+psycopg://...]`,
the scan done beforehand into the cache; one run per setting, in the order of the table.

| study | workers | wall time (s) | speed vs 1 worker, SQLite | trials finished | best validation loss |
|---|---|---|---|---|---|
{table}
"""
    update_section("workers", body)
    print(body)


if __name__ == "__main__":
    main()
