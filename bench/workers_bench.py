"""A search with 1 and 2 workers on one machine, its study in SQLite and in PostgreSQL.

Each setting runs `lungxray tune DATA --model cnn --trials 16 --seed 0 --storage URL --parallel W`
into a fresh run folder, so every row goes through the worker path: `--parallel 1` is one worker
process (both cores on its trial), `--parallel 2` two worker processes (one core each here). The
study is a SQLite file in the run folder, or a database of a throw-away PostgreSQL cluster on
127.0.0.1 (Debian's postgresql; started here as an unprivileged user and removed after).

Like for like: before a search starts, its study is given the same 16 parameter sets (drawn once
from the CNN's search space by a seeded random sampler) as queued trials, so every row trains the
same trials, and the one-worker rows prune alike. With two workers, which trials the median
pruner stops depends on the order they finish in, so the table also gives the epochs trained and
the seconds per epoch. The scan is done once beforehand into the cache, so each time is the
search itself.

    .venv/bin/python bench/workers_bench.py ../shared/data/covid19-image-dataset [--trials 16] [--epochs 30]
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


def fixed_trials(n: int) -> list[dict]:
    """``n`` parameter sets of the CNN's search space, the same on every call."""
    import optuna

    from lungxray.models import get_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return [get_spec("cnn").space(draw.ask()) for _ in range(n)]


def tune(data: Path, out: Path, cache: Path, trials: list[dict], parallel: int, storage: str, epochs: int) -> float:
    import optuna

    study = optuna.create_study(storage=storage, study_name="bench", direction="minimize")
    for params in trials:  # the same trials, in the same order, for every row
        study.enqueue_trial(params)
    command = [sys.executable, "-m", "lungxray.cli", "tune", str(data), "--out", str(out), "--model", "cnn",
               "--trials", str(len(trials)), "--epochs", str(epochs), "--seed", "0", "--parallel", str(parallel),
               "--cache-dir", str(cache), "--storage", storage, "--study-name", "bench", "--quiet"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30, help="epochs per trial (the CNN's recipe: 30)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    os.chmod(work, 0o711)  # the server's user must reach its folder inside
    cache = work / "cache"
    subprocess.run([sys.executable, "-m", "lungxray.cli", "scan", str(args.data), "--cache-dir", str(cache),
                    "--quiet", "--json"], check=True, capture_output=True)  # fmt: skip
    pg_folder = work / "pg"
    pg_folder.mkdir()
    prefix, stop = start_postgres(pg_folder)
    rows, fixed = [], fixed_trials(args.trials)
    try:
        settings = [("sqlite", 1), ("postgres", 1), ("sqlite", 2), ("postgres", 2)]
        for k, (storage, parallel) in enumerate(settings):
            out = work / f"{storage}-{parallel}"
            out.mkdir()
            url = f"{prefix}{k}" if storage == "postgres" else f"sqlite:///{out / 'study.db'}"
            seconds = tune(args.data, out, cache, fixed, parallel, url, args.epochs)
            best = json.loads((out / "best_params.json").read_text())
            trials = json.loads((out / "trials.json").read_text())
            finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
            assert sorted(map(json.dumps, (t["params"] for t in finished))) == sorted(map(json.dumps, fixed))
            rows.append({"storage": storage, "workers": parallel, "seconds": seconds, "finished": len(finished),
                         "pruned": sum(t["state"] == "PRUNED" for t in finished),
                         "epochs": sum(t["epochs_run"] for t in finished), "best_val_loss": best["value"]})  # fmt: skip
            print(rows[-1], flush=True)
    finally:
        subprocess.run(stop, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["seconds"]
    table = "\n".join(
        f"| {r['storage']} | {r['workers']} | {r['seconds']:.0f} | {base / r['seconds']:.2f} | {r['finished']} "
        f"({r['pruned']} pruned) | {r['epochs']} | {r['seconds'] / r['epochs']:.2f} | {r['best_val_loss']:.4f} |"
        for r in rows
    )
    body = f"""## A search with 1 and 2 workers, the study in SQLite and in PostgreSQL

Command: `.venv/bin/python bench/workers_bench.py {args.data} --trials {args.trials} --epochs {args.epochs}` on
{machine()}. `lungxray tune DATA --model cnn --trials {args.trials} --epochs {args.epochs} --seed 0 --parallel W
--storage URL`, every study given
the same {args.trials} queued parameter sets first; the scan done beforehand into the cache; one run per
setting, in the order of the table.

| study | workers | wall s | vs 1 worker, SQLite | trials finished | epochs trained | s per epoch | best val. loss |
|---|---|---|---|---|---|---|---|
{table}
"""
    update_section("workers", body)
    print(body)


if __name__ == "__main__":
    main()
