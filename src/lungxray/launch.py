"""``lungxray train``: one final training, in this process or in several through torchrun.

Under torchrun (WORLD_SIZE above 1) every process scans, splits and trains on its share of each
batch, and the first (rank 0) holds the run folder and writes everything. ``launch`` starts those
processes on this machine with torchrun's own launcher.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

from lungxray import runfolder
from lungxray.job import Job


@contextlib.contextmanager
def process_group(device: str):
    """torchrun's process group for this process (gloo on the CPU, NCCL on its GPU); yields the rank."""
    import torch
    import torch.distributed as dist

    from lungxray.devices import resolve_device

    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank()
        # every process waits for the others (rank 0 writes the run folder) before the group is torn
        # down: a process that leaves first while rank 0 still holds the group can abort in gloo's
        # teardown ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(argv: list[str], nproc: int) -> str | None:
    """``train --nproc N``: N processes on this machine through torchrun's own launcher, each
    running ``lungxray train`` with ``argv`` less --nproc. Returns the name torchrun gives a process
    that failed (its output is above), or None when all succeeded."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args, skip = [], False
    for arg in argv:
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        args.append(arg)
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", "lungxray.cli", *args])
    except ChildFailedError as exc:
        return exc.name
    return None


def train(job: Job):
    """Scan, split and train the final model with ``job.params`` (or the run folder's best
    parameters); in every process of a distributed training, writing from the first only.
    Returns (the fit, the bundle's folder or None, the number of processes, this process's rank)."""
    from lungxray import pipeline

    params = pipeline.training_params(job)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    with process_group(job.final.device) if processes > 1 else contextlib.nullcontext(0) as rank:
        first = rank == 0
        if first:
            runfolder.refuse_to_replace(job.out, runfolder.MODEL, job.force, "a model")  # before splits.json
        job = job if first else replace(job, progress=False)
        with runfolder.writer_lock(job.out, job.data) if first else contextlib.nullcontext():
            ds, split = pipeline.prepare(job, write=first)
            result, folder = pipeline.train_stage(job, ds, split, params)
    return result, folder, processes, rank
