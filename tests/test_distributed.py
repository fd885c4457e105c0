"""Training in several processes (DistributedDataParallel over gloo, through torchrun's launcher):
`train --nproc 2` reaches what one process reaches. The processes a test starts are ended, with
whatever they started, when it ends, passed or not."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_tree

from lungxray.config import DataConfig, Preprocessing
from lungxray.data import load_dataset
from lungxray.predictor import Predictor


def _run(args: list[str], timeout: float) -> tuple[int, str, str]:
    """Run ``args`` in a process group of its own; the group (torchrun's workers too) is killed
    however the run ends. Returns (exit status, stdout, stderr)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group has ended already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.processes
def test_two_processes_train_the_model_one_process_trains(tmp_path):
    """The MLP without dropout: each process takes half of every batch and DDP averages their
    gradients, so the two runs agree to float rounding (measured 3e-8; the tolerance is 1e-5).
    A CNN on the CPU would not: each process normalises its own half in batch norm."""
    data, cache = write_tree(tmp_path / "data", per_class=14), tmp_path / "cache"
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"nproc{n}"
        status, stdout, stderr = _run(
            [sys.executable, "-m", "lungxray.cli", "train", str(data), "--out", str(out), "--model", "mlp",
             "--params", "defaults", "--epochs", "25", "--img-size", "16", "--cache-dir", str(cache), "--quiet",
             "--nproc", str(n)],
            timeout=600,
        )  # fmt: skip
        assert status == 0, stderr
        runs[n] = out
    assert "2 processes, batch 8 shared among them" in stdout
    one, two = (json.loads((runs[n] / "history.json").read_text()) for n in (1, 2))
    assert len(one["val_loss"]) == len(two["val_loss"]) == 25
    assert np.abs(np.array(one["val_loss"]) - np.array(two["val_loss"])).max() < 1e-5
    assert np.abs(np.array(one["train_loss"]) - np.array(two["train_loss"])).max() < 1e-5
    assert (runs[1] / "splits.json").read_text() == (runs[2] / "splits.json").read_text()
    ds = load_dataset(data, DataConfig(Preprocessing(img_size=16), cache_dir=cache), progress=False)
    test = json.loads((runs[1] / "splits.json").read_text())["test"]
    images = ds.images[[i for i, s in enumerate(ds.samples) if str(s.path) in test]]
    p1, p2 = (Predictor(runs[n] / "model").predict_arrays(images) for n in (1, 2))
    assert np.abs(p1 - p2).max() < 1e-4 and (p1.argmax(1) == p2.argmax(1)).all()
