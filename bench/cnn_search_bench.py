"""The default CNN's search against its compute floor, its step against a plain eager PyTorch loop,
and the default `lungxray run` and `lungxray cv` against an earlier commit, side by side in one run.

1. The search: `lungxray run DATA --seed 0` (the default model, cnn: 16 trials of 30 epochs), with
   this checkout's code and, with ``--baseline REV``, with REV's (a git worktree put first on
   PYTHONPATH), alternating, ``--repeats`` times each.
2. The floor of this checkout's search: every trial's epochs x steps per epoch x the measured step
   time of its network (forward, loss, backward, AdamW on one preloaded batch of its size, in
   lungxray's arithmetic and layout: ``devices.training_arithmetic``), timed with ``jobs``
   such steps side by side on their share of the cores, divided by ``jobs``; each network in
   ``--rounds`` rounds, the median kept (as ``search_bench.floor`` does for the MLP).
3. The step: lungxray's training (``train.fit`` of the registered defaults, augmentation and the
   validation pass included, trials side by side as the search runs them) against a plain eager
   loop of the same MONAI network, same batch and the same augmentation (``BatchAugment``),
   float32 NCHW on every core, with torch's AdamW. Images per second over epochs 2.., on
   random images of the shared dataset's training size.
4. With ``--cv-repeats N``: `lungxray cv DATA --folds 5 --seed 0 --repeats N` for both codes:
   macro-F1 over training seeds (the spread a change of arithmetic must stay within).

    .venv/bin/python bench/cnn_search_bench.py [DATA] [--baseline db2e5d5] [--repeats 1] [--rounds 3] [--cv-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402

OUT = ROOT / "bench" / "out" / "cnn-search"
SIZE, N_TRAIN = 128, 221  # the shared dataset's default split: 221 training images


def worktree(rev: str) -> Path:
    """A checkout of ``rev`` under bench/out (made once)."""
    path = OUT / f"tree-{rev}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True)
    return path


def lungxray(args: list[str], tree: Path | None) -> float:
    """Run the CLI (``tree``'s source first on the path when given); returns wall seconds."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree / "src")
    start = time.perf_counter()
    subprocess.run([str(ROOT / ".venv" / "bin" / "lungxray"), *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def search(data: Path, out: Path, tree: Path | None) -> dict:
    (out / "study.db").unlink(missing_ok=True)  # a fresh study, not a resumed one
    wall = lungxray(["run", str(data), "--out", str(out), "--seed", "0", "--force", "--quiet",
                     "--cache-dir", str(OUT / "cache")], tree)  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    run["trials"] = json.loads((out / "trials.json").read_text())
    run["wall_s"] = wall
    run["training"] = occupancy(out)
    return run


def occupancy(out: Path) -> dict[int, float]:
    """Seconds of the search with 0, 1, 2, ... trials training. A trial trains from when a worker took
    it (``started_s``; before it was recorded, when it was asked) or, if later, when the last trial
    of its history (``drawn_from_below``) ended."""
    import optuna

    study = optuna.load_study(study_name="lungxray", storage=f"sqlite:///{out / 'study.db'}")
    trials = [t for t in study.trials if t.datetime_complete is not None]
    ended = {t.number: t.datetime_complete for t in trials}
    origin = min(t.datetime_start for t in trials)  # the first ask: about when the search began
    events = []
    for t in trials:
        below = t.user_attrs.get("drawn_from_below", 0)
        taken = (
            origin + timedelta(seconds=t.user_attrs["started_s"]) if "started_s" in t.user_attrs else t.datetime_start
        )
        start = max([taken] + [ended[k] for k in range(below) if k in ended])
        events += [(start, 1), (t.datetime_complete, -1)]
    events.sort()
    seconds: dict[int, float] = {}
    running, last = 0, events[0][0]
    for when, change in events:
        seconds[running] = seconds.get(running, 0.0) + (when - last).total_seconds()
        running, last = running + change, when
    return seconds


def _in_threads(jobs: int, work) -> list:
    """``work(k)`` in ``jobs`` threads at once, the torch threads shared out as the search does."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    results = [None] * jobs

    def run(k: int) -> None:
        results[k] = work(k)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_num_threads(before)
    return results


def _as_trained(params: dict):
    """The cnn of ``params`` in training mode, in the arithmetic and layout ``train.fit`` gives it on
    the CPU (``--precision auto``): (model, autocast dtype or None, memory format or None)."""
    import torch

    from lungxray.devices import training_arithmetic
    from lungxray.models import create_model

    model = create_model("cnn", (1, SIZE, SIZE), 3, **params).train()
    autocast, channels_last = training_arithmetic("auto", torch.device("cpu"), model, (1, SIZE, SIZE))
    layout = torch.channels_last if channels_last else None
    if layout is not None:
        model.to(memory_format=layout)
    return model, autocast, layout


def _step(model, optimizer, x, y, autocast) -> None:
    """One training step as ``train.fit`` takes it, bare: forward in ``autocast`` (None: float32),
    cross-entropy, backward, the optimiser."""
    import torch
    from torch import nn

    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        logits = model(x)
    loss = nn.functional.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def step_seconds(params: dict, jobs: int, steps: int = 30) -> float:
    """Seconds per step of the cnn ``params`` in lungxray's layout, ``jobs`` side by side (their mean)."""
    import torch

    from lungxray.train import make_optimizer

    batch = int(params["batch_size"])
    barrier = threading.Barrier(jobs)

    def work(k: int) -> float:
        torch.manual_seed(k)
        model, autocast, layout = _as_trained(params)
        optimizer = make_optimizer(model, params, "adamw")
        x, y = torch.rand(batch, 1, SIZE, SIZE), torch.arange(batch) % 3
        x = x.contiguous(memory_format=layout) if layout is not None else x
        barrier.wait(timeout=600)
        for n in range(5 + steps):
            if n == 5:
                start = time.perf_counter()
            _step(model, optimizer, x, y, autocast)
        return (time.perf_counter() - start) / steps

    return statistics.mean(_in_threads(jobs, work))


def floor(run: dict, jobs: int, rounds: int) -> dict:
    """The search's compute floor (see the module's docstring) and each round's own."""
    trials = [t for t in run["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
    keys = list(dict.fromkeys(json.dumps(t["params"], sort_keys=True) for t in trials))
    times: dict[str, list[float]] = {key: [] for key in keys}
    for _ in range(rounds):
        for key in keys:
            times[key].append(step_seconds(json.loads(key), jobs))

    def steps(batch: int) -> int:  # a last batch of one image is skipped (batch norm)
        return N_TRAIN // batch + (N_TRAIN % batch >= 2)

    def seconds(step_s: dict[str, float]) -> float:
        return (
            sum(
                t["epochs_run"] * steps(t["params"]["batch_size"]) * step_s[json.dumps(t["params"], sort_keys=True)]
                for t in trials
            )
            / jobs
        )

    return {
        "floor_s": seconds({k: statistics.median(v) for k, v in times.items()}),
        "round_floors_s": [seconds({k: v[r] for k, v in times.items()}) for r in range(rounds)],
        "epochs": sum(t["epochs_run"] for t in trials),
    }


def plain_loop(epochs: int, cfg, hp: dict, x, y) -> float:
    """Images/s of a plain eager loop: the same network, batch and augmentation (in torch's
    operations, not lungxray's numba kernel), NCHW float32, on the calling thread's share of the cores."""
    import torch
    from torch import nn

    from lungxray.augment import BatchAugment
    from lungxray.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", (1, SIZE, SIZE), 3, **hp).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    augment = BatchAugment(cfg.augment, torch.Generator().manual_seed(0), kernel=False)
    batch = int(hp["batch_size"])
    for epoch in range(epochs + 1):
        if epoch == 1:
            start = time.perf_counter()
        order = torch.randperm(len(x))
        for first in range(0, len(x), batch):
            idx = order[first : first + batch]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(model(augment(x[idx])), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return epochs * len(x) / (time.perf_counter() - start)


def lungxray_step(epochs: int, cfg, hp: dict, x, y, jobs: int) -> float:
    """Training images/s of ``jobs`` fits side by side (epochs 2..; validation passes included)."""
    from lungxray.train import FitData, fit

    val = (x[:32], y[:32])  # the split's validation part is 32 images

    def work(k: int) -> tuple[float, float]:
        stamps = []
        fit("cnn", hp, FitData((x, y), val, 3), cfg, on_epoch=lambda _: stamps.append(time.perf_counter()))
        return stamps[0], stamps[-1]

    # one fit alone runs in the calling thread, as the final training and cv's folds do
    spans = _in_threads(jobs, work) if jobs > 1 else [work(0)]
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return jobs * (epochs - 1) * len(x) / wall


def steps_compared(epochs: int) -> dict:
    import torch

    from lungxray.config import TrainConfig, resolve_train
    from lungxray.models import get_spec

    spec = get_spec("cnn")
    hp = dict(spec.defaults)
    cfg = resolve_train(TrainConfig(epochs=epochs + 1, patience=0), spec.recipe).for_params(hp)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N_TRAIN, 1, SIZE, SIZE), generator=generator).float() / 255
    y = torch.arange(N_TRAIN) % 3
    jobs = spec.recipe.jobs
    return {
        "plain": plain_loop(epochs, cfg, hp, x, y),
        "plain_pair": sum(_in_threads(jobs, lambda _: plain_loop(epochs, cfg, hp, x, y))),
        "lungxray_pair": lungxray_step(epochs + 1, cfg, hp, x, y, spec.recipe.jobs),
        "lungxray_alone": lungxray_step(epochs + 1, cfg, hp, x, y, 1),
        "hp": hp,
        "epochs": epochs,
        "arithmetic": _arithmetic(hp),
    }


def _arithmetic(hp: dict) -> str:
    """What ``fit`` trains the cnn of ``hp`` in on this CPU, in words."""
    import torch

    _, autocast, layout = _as_trained(hp)
    return f"{'bfloat16 mixed precision' if autocast == torch.bfloat16 else 'float32'}, " + (
        "channels-last" if layout is not None else "NCHW"
    )


def compiled_step(hp: dict, steps: int = 30) -> dict:
    """``torch.compile`` (inductor) of the default network's training step against eager, in
    lungxray's arithmetic and layout, on one thread (a trial's share in the search): the first
    compiled step's seconds and each one's after it."""
    import torch

    from lungxray.train import make_optimizer

    batch = int(hp["batch_size"])
    out, before = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model, autocast, layout = _as_trained(hp)
        optimizer = make_optimizer(model, hp, "adamw")
        stepped = torch.compile(model) if mode == "compiled" else model
        x = torch.rand(batch, 1, SIZE, SIZE)
        x = x.contiguous(memory_format=layout) if layout is not None else x
        y = torch.arange(batch) % 3
        start = time.perf_counter()
        for n in range(steps + 1):
            if n == 1:
                out[f"{mode}_first_s"], start = time.perf_counter() - start, time.perf_counter()
            _step(stepped, optimizer, x, y, autocast)
        out[f"{mode}_step_s"] = (time.perf_counter() - start) / steps
    torch.set_num_threads(before)
    return out


def cross_validate(data: Path, out: Path, tree: Path | None, repeats: int) -> dict:
    wall = lungxray(["cv", str(data), "--out", str(out), "--folds", "5", "--seed", "0", "--repeats", str(repeats),
                     "--force", "--quiet", "--cache-dir", str(OUT / "cache")], tree)  # fmt: skip
    report = json.loads((out / "cv.json").read_text())
    spread = report["seed_spread"] or {}
    per_seed = [s["fold_mean"] for s in spread.get("macro_f1", {}).get("per_seed", [])]
    return {"wall_s": wall, "macro_f1_per_seed": per_seed or [report["summary"]["macro_f1"]["mean"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=ROOT.parent / "shared" / "data" / "covid19-image-dataset")
    parser.add_argument("--baseline", help="an earlier commit whose search, run and cv are timed alongside")
    parser.add_argument("--repeats", type=int, default=1, help="searches of each code, alternating")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the floor's step timings")
    parser.add_argument("--epochs", type=int, default=4, help="epochs timed in the step comparison")
    parser.add_argument("--cv-repeats", type=int, default=0, help="training seeds of lungxray cv (0: no cv)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the default network's step")
    parser.add_argument("--steps-only", action="store_true", help="only the step comparison (section cnn-steps)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from lungxray.models import get_spec

    OUT.mkdir(parents=True, exist_ok=True)
    if args.steps_only:
        steps = steps_compared(args.epochs)
        body = render_steps(steps, get_spec("cnn").recipe.jobs)
        print(body)
        return update_section("cnn-steps", body)
    tree = worktree(args.baseline) if args.baseline else None
    # the images preprocessed into the cache first, so that neither timed run pays for it
    lungxray(["run", str(args.data), "--model", "mlp", "--trials", "1", "--epochs", "1", "--out", str(OUT / "warm"),
              "--force", "--quiet", "--cache-dir", str(OUT / "cache")], None)  # fmt: skip
    runs: dict[str, list[dict]] = {"new": [], "old": []}
    for r in range(args.repeats):
        if tree is not None:
            runs["old"].append(search(args.data, OUT / f"old-{r}", tree))
            print(f"baseline search {r}: {runs['old'][-1]['timings']['tune_s']:.1f} s", flush=True)
        runs["new"].append(search(args.data, OUT / f"new-{r}", None))
        print(f"search {r}: {runs['new'][-1]['timings']['tune_s']:.1f} s", flush=True)
    jobs = get_spec("cnn").recipe.jobs
    floor_ = floor(runs["new"][0], jobs, args.rounds)
    print(f"floor {floor_['floor_s']:.1f} s", flush=True)
    steps = steps_compared(args.epochs)
    print(f"steps {steps}", flush=True)
    compiled = compiled_step(steps["hp"]) if args.compile else None
    print(f"torch.compile {compiled}", flush=True)
    cv = {}
    if args.cv_repeats:
        for name, where in (("old", tree), ("new", None)) if tree is not None else (("new", None),):
            cv[name] = cross_validate(args.data, OUT / f"cv-{name}", where, args.cv_repeats)
            print(f"cv {name}: {cv[name]}", flush=True)
    results = {"runs": runs, "floor": floor_, "steps": steps, "cv": cv, "jobs": jobs, "machine": machine(),
               "compiled": compiled}  # fmt: skip
    (OUT / "results.json").write_text(json.dumps(results, indent=1, default=str))
    body = render(args, results)
    print(body)
    update_section("cnn-search", body)


def render_steps(steps: dict, jobs: int) -> str:
    command = "`.venv/bin/python bench/cnn_search_bench.py " + " ".join(sys.argv[1:]) + "`"
    pair, plain, plain_pair = steps["lungxray_pair"], steps["plain"], steps["plain_pair"]
    return "\n".join([
        "### The step alone, against plain loops laid out both ways",
        "",
        f"Command: {command} ({machine()}). Training images/s of the registered defaults "
        f"({json.dumps(steps['hp'])}), epochs 2-{steps['epochs'] + 1}, on random images of the training split's size; "
        f"lungxray trains in {steps['arithmetic']} (`--precision auto` on this CPU); the plain loops augment "
        "with torch's operations (`BatchAugment(kernel=False)`), NCHW float32, torch's AdamW.",
        "",
        "| | images/s | lungxray, two fits side by side, against it |",
        "|---|---|---|",
        f"| plain loop, one on both cores | {plain:.0f} | {pair / plain:.2f}x |",
        f"| plain loops, {jobs} side by side, one core each | {plain_pair:.0f} | {pair / plain_pair:.2f}x |",
        f"| lungxray, one fit alone on both cores (as the final training and cv) | {steps['lungxray_alone']:.0f} | |",
        f"| lungxray, {jobs} fits side by side (as the search) | {pair:.0f} | |",
    ])  # fmt: skip


def _median(runs: list[dict], key) -> float:
    return statistics.median(key(r) for r in runs)


def render(args, results: dict) -> str:
    runs, fl, steps, cv = results["runs"], results["floor"], results["steps"], results["cv"]
    command = "`.venv/bin/python bench/cnn_search_bench.py " + " ".join(sys.argv[1:]) + "`"
    new_search = _median(runs["new"], lambda r: r["timings"]["tune_s"])
    lines = [
        "## The default CNN at its floor: search, step and run",
        "",
        f"Command: {command} ({results['machine']}). The default `lungxray run DATA --seed 0` "
        f"(cnn, 16 trials of 30 epochs, {results['jobs']} trials side by side).",
        "",
        "| | search s | whole run s (wall) | trials complete / pruned | epochs | test accuracy | test macro-F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("old", "new"):
        for r in runs[name]:
            label = f"baseline {args.baseline}" if name == "old" else "this commit"
            lines.append(
                f"| {label} | {r['timings']['tune_s']:.1f} | {r['wall_s']:.1f} | {r['trials_complete']} / "
                f"{r['trials_pruned']} | {sum(t['epochs_run'] for t in r['trials'])} | "
                f"{r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} |"
            )
    lines += [
        "",
        f"- Floor of this commit's search: {fl['floor_s']:.1f} s ({fl['epochs']} epochs; rounds "
        + ", ".join(f"{s:.1f}" for s in fl["round_floors_s"])
        + f" s). Search / floor: **{new_search / fl['floor_s']:.2f}x** (target: within 1.5x).",
    ]
    for name in ("old", "new"):
        for r in runs[name]:
            label = f"baseline {args.baseline}" if name == "old" else "this commit"
            counts = sorted(r["training"].items(), key=lambda kv: int(kv[0]))
            lines.append(f"- Seconds of the search with 0, 1, 2 trials training, {label}: "
                         + ", ".join(f"{k}: {v:.1f}" for k, v in counts) + ".")  # fmt: skip
    if runs["old"]:
        old_run = _median(runs["old"], lambda r: r["wall_s"])
        new_run = _median(runs["new"], lambda r: r["wall_s"])
        ratio = old_run / new_run
        lines.append(
            f"- Whole run, baseline / this commit: {old_run:.1f} / {new_run:.1f} s = **{ratio:.2f}x** (target: 2x)."
        )
    pair = steps["lungxray_pair"]
    lines.append(
        f"- Training images/s of the registered defaults ({json.dumps(steps['hp'])}), epochs 2-{steps['epochs'] + 1}:"
        f" plain eager loop (float32 NCHW) {steps['plain']:.0f} on both cores, {steps['plain_pair']:.0f} as "
        f"{results['jobs']} side by side; lungxray ({steps['arithmetic']}), {results['jobs']} fits side by side "
        f"{pair:.0f}: **{pair / steps['plain']:.2f}x** one plain loop, **{pair / steps['plain_pair']:.2f}x** plain "
        f"loops laid out alike (target 1.5x); one fit alone on every core {steps['lungxray_alone']:.0f} "
        f"({steps['lungxray_alone'] / steps['plain']:.2f}x)."
    )
    if results["compiled"]:
        c = results["compiled"]
        lines.append(
            f"- `torch.compile` (inductor) of the default network's step, one thread: the first step "
            f"{c['compiled_first_s']:.1f} s (compiling), then {1e3 * c['compiled_step_s']:.1f} ms a step against "
            f"{1e3 * c['eager_step_s']:.1f} ms eager ({c['eager_step_s'] / c['compiled_step_s']:.2f}x)."
        )
    for name, c in cv.items():
        f1 = c["macro_f1_per_seed"]
        label = f"baseline {args.baseline}" if name == "old" else "this commit"
        spread = f" +- {statistics.stdev(f1):.4f}" if len(f1) > 1 else ""
        lines.append(
            f"- `lungxray cv --folds 5 --seed 0 --repeats {args.cv_repeats}`, {label}: macro-F1 per training seed "
            + " / ".join(f"{v:.4f}" for v in f1)
            + f" (mean {statistics.mean(f1):.4f}{spread}), {c['wall_s']:.0f} s."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
