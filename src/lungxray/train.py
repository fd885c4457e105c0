"""Training: ``train_one_epoch``, ``evaluate_loss`` and ``fit`` (keeps the best validation epoch, or the last).

Works on in-memory tensors (the whole preprocessed dataset fits in RAM: 317 images at 128x128 are
21 MB), so batches are index lookups rather than a DataLoader. Takes a resolved ``TrainConfig``
(``job.Job``'s trial or final settings) and never re-derives a default. Multi-label targets (float (N, F), NaN
unknown) train on ``losses.MaskedBCE`` by the same loop. Holds no tuning and no test-set code: the
test split never reaches this module; the serving side imports nothing from it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn

from lungxray.augment import BatchAugment
from lungxray.config import TrainConfig
from lungxray.devices import resolve_device, training_arithmetic
from lungxray.errors import ConfigError, TrainingDiverged
from lungxray.fused import FirstLayerAdam
from lungxray.infer import predict_logits
from lungxray.losses import (
    MaskedBCE,
    check_targets,
    class_weights,
    epoch_counts,
    is_multilabel,
    multilabel_figures,
    site_balanced_weights,
)
from lungxray.models import Ensemble, create_model, load_init_weights, seed_dropout

_INIT_LOCK = threading.Lock()  # weight init draws from torch's global generator


class FitData(NamedTuple):
    """What a fit learns from and is watched on."""

    train: tuple[torch.Tensor, torch.Tensor]  # (N, C, H, W) images, (N,) labels or multi-label (N, F) (NaN: unknown)
    val: tuple[torch.Tensor, torch.Tensor]
    n_classes: int  # classes, or findings
    train_sites: torch.Tensor | None = None  # (N,) each training image's site code (--site-balanced)


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float


@dataclass
class FitResult:
    model: nn.Module  # holds the weights of the kept epoch (the moving average's with --ema)
    best_epoch: int  # 1-based: the kept epoch (the last with keep="last")
    history: list[EpochStats] = field(default_factory=list)
    diverged: bool = False  # training loss became NaN/inf; the best finite epoch was kept
    stopped_at: int | None = None  # epoch after which ``on_epoch`` asked to stop (pruning)
    member_epochs: list[int] | None = None  # with --members: each member's kept epoch (history: the first's)
    arithmetic: str = "float32"  # what the steps computed in: "float32" or "bfloat16" (autocast), ", channels-last"

    @property
    def best(self) -> EpochStats:
        return self.history[self.best_epoch - 1]

    def history_dict(self) -> dict[str, list[float]]:
        return {k: [asdict(h)[k] for h in self.history] for k in asdict(self.history[0])}


@dataclass
class StepOptions:
    """How ``train_one_epoch`` steps besides the model and optimiser; the defaults turn each off."""

    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to each whole batch
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped after every step
    class_weight: torch.Tensor | None = None  # (n_classes,) weights of the loss
    autocast: torch.dtype | None = None  # mixed precision: the forward pass's dtype (None: float32)
    scaler: torch.amp.GradScaler | None = None  # loss scaling, with float16 (CUDA)
    channels_last: bool = False  # batches as NHWC, for a model converted to it
    label_smoothing: float = 0.0
    averaged: torch.optim.swa_utils.AveragedModel | None = None  # updated after every step (EMA)
    # (rank, world size): under DistributedDataParallel every process draws the same seeded order
    # and takes its share of each batch (what DistributedSampler does per epoch, here per batch),
    # so a step averages the gradients of the same batch as one process would
    shard: tuple[int, int] = (0, 1)
    first_layer: FirstLayerAdam | None = None  # steps the weight it took over from the optimiser
    draw: torch.Tensor | None = None  # (N,) weights to draw each epoch's images by, with replacement (None: shuffle)
    # in place of cross-entropy (multi-label: MaskedBCE); the epoch's figures then count known entries
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    options: StepOptions | None = None,
) -> tuple[float, float]:
    """One pass over (x, y) in shuffled mini-batches; returns mean loss and accuracy (with
    ``options.loss``, multi-label: over the known entries).

    A last batch of one image is skipped for models with batch norm, which cannot normalise a
    single image in training mode. ``options``: augmentation, schedule, loss weights, mixed
    precision, moving average, the process's share and the fused first layer (``StepOptions``).
    """
    options = options if options is not None else StepOptions()
    augment, scheduler, scaler, averaged = options.augment, options.scheduler, options.scaler, options.averaged
    model.train()
    rank, world = options.shard
    if options.draw is None:
        order = torch.randperm(len(x), generator=generator).to(x.device)
    else:  # as many draws as images, so an epoch keeps its number of steps
        order = torch.multinomial(options.draw, len(x), replacement=True, generator=generator).to(x.device)
    skip_single = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # Each step's loss and logits kept on the device and summed once at the end: no host sync and
    # no extra small ops inside the epoch (the loss summed in float64, in step order on the CPU,
    # whose cumsum is sequential: the figures of a running sum).
    losses, outputs, labels = [], [], []
    for xs, ys in _batches(x, y, order, batch_size):
        if len(ys) < world * (2 if skip_single else 1):
            continue  # every process skips it alike: one with no image would stall the others' step
        if augment is not None:
            xs = augment(xs)  # the whole batch, so each process's share has one process's draws
        xb, yb = xs[rank::world], ys[rank::world]
        if options.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        if options.autocast is None:
            logits = model(xb)
        else:
            with torch.autocast(x.device.type, dtype=options.autocast):
                logits = model(xb)
        if options.loss is None:
            loss = nn.functional.cross_entropy(
                logits.float(), yb, weight=options.class_weight, label_smoothing=options.label_smoothing
            )
        else:
            loss = options.loss(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if options.first_layer is not None:
            options.first_layer.step()  # at the learning rate optimizer.step() used, before the scheduler's
        if scheduler is not None:
            scheduler.step()
        if averaged is not None:
            averaged.update_parameters(model)
        losses.append(loss.detach())
        outputs.append(logits.detach())
        labels.append(yb)
    if options.loss is None or not losses:
        sizes = torch.tensor([len(t) for t in labels], dtype=torch.float64, device=x.device)
        correct = (torch.cat(outputs).argmax(1) == torch.cat(labels)).sum() if outputs else sizes.sum()
    else:  # each step's loss is a mean over its known entries
        sizes, correct = epoch_counts(outputs, labels)
    total_loss = (torch.stack(losses).double() * sizes).cumsum(0)[-1] if losses else sizes.sum()
    sums = torch.stack([total_loss, correct.double(), sizes.sum()])
    if world > 1:  # the epoch's figures over every process's share
        import torch.distributed as dist

        dist.all_reduce(sums)
    total_loss, correct, seen = sums.tolist()
    return total_loss / seen, correct / seen


_GATHER_BYTES = 16 << 20  # images gathered at once: a whole small set, bounded for a large one


def _batches(x, y: torch.Tensor, order: torch.Tensor, batch_size: int):
    """(images, labels) of each batch of ``order``, gathered many batches at a time.

    One gather (a tensor's index, or ``infer.Images`` reading its memory-mapped stack) per chunk
    of at most ``_GATHER_BYTES`` instead of one per step: the steps then read slices of it. The
    values are those of indexing ``x`` batch by batch.
    """
    per_image = 4 * math.prod(x.shape[1:])
    chunk = max(1, _GATHER_BYTES // (per_image * batch_size)) * batch_size
    for first in range(0, len(order), chunk):
        idx = order[first : first + chunk]
        xs, ys = x[idx], y[idx]
        for start in range(0, len(idx), batch_size):
            yield xs[start : start + batch_size], ys[start : start + batch_size]


def world() -> tuple[int, int]:
    """(rank, world size) of this process in a distributed training (torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), ``batch_size`` images a pass; multi-label:
    binary cross-entropy and the share of entries sigmoid >= 0.5 gets right, both over the known entries."""
    logits = predict_logits(model, x, batch_size)
    if is_multilabel(y):
        return multilabel_figures(logits, y)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def is_better(stats: EpochStats, best: EpochStats | None, select_by: str) -> bool:
    """Validation loss: lower wins. Validation accuracy: higher wins, lower loss breaks ties."""
    if best is None:
        return True
    if select_by == "val_loss":
        return stats.val_loss < best.val_loss
    return (stats.val_accuracy, -stats.val_loss) > (best.val_accuracy, -best.val_loss)


def make_optimizer(model: nn.Module, hp: dict, name: str) -> torch.optim.Optimizer:
    """Adam (the tutorial's) or AdamW with the trial's weight decay, fused into one kernel.

    Fused: small-batch MLP steps are memory-bound, and the unfused optimiser reads and writes
    each weight tensor several times.
    """
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=hp["learning_rate"], fused=True)
    return torch.optim.AdamW(
        model.parameters(), lr=hp["learning_rate"], weight_decay=hp.get("weight_decay", 1e-2), fused=True
    )


def ema_with_warmup(decay: float) -> Callable:
    """``AveragedModel`` update: exponential moving average whose decay ramps up as
    min(decay, (1 + n) / (10 + n)) after n updates.

    Written here because torch's ``get_ema_multi_avg_fn`` uses the full decay from the first step:
    the average then holds the untrained batch-norm statistics (mean 0, variance 1) for hundreds
    of steps, and on the default CNN it predicted one class for whole 30-epoch fits.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = int(n_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, weight)
        else:  # integer buffers (batch norm's step count): follow the model
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def _training_parts(
    model: nn.Module,
    hp: dict,
    cfg: TrainConfig,
    data: FitData,
    y_train: torch.Tensor,
    device: torch.device,
    autocast: torch.dtype | None,
) -> tuple[torch.optim.Optimizer, StepOptions]:
    """The optimiser and ``train_one_epoch``'s options for one fit in ``autocast`` (None: float32); seeds dropout.
    Multi-label (``losses.MaskedBCE``): --class-weighted weighs each finding's positives, label
    smoothing moves targets towards 0.5, --site-balanced draws every site equally often."""
    n_classes, multilabel = data.n_classes, is_multilabel(y_train)
    draw = None
    if cfg.site_balanced:
        if data.train_sites is None or bool((data.train_sites < 0).any()):
            raise ConfigError(
                "--site-balanced needs every training image's site",
                hint="give several DATA roots (each a site) or a manifest with a site column",
            )
        labels = torch.zeros_like(data.train_sites) if multilabel else data.train[1]
        draw = site_balanced_weights(labels, data.train_sites)
    # The moving average is a copy of the model (made before its dropout gets a generator), with
    # batch-norm statistics averaged alongside the weights; validation and the kept state read it.
    averaged = (
        torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_with_warmup(cfg.ema), use_buffers=True)
        if cfg.ema
        else None
    )
    seed_dropout(model, torch.Generator(device).manual_seed(cfg.seed + 1))
    optimizer = make_optimizer(model, hp, cfg.optimizer)
    scheduler = None
    if cfg.schedule == "cosine":  # to zero at the last step of the last epoch
        steps = cfg.epochs * math.ceil(len(y_train) / cfg.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return optimizer, StepOptions(
        augment=(
            BatchAugment(cfg.augment, torch.Generator().manual_seed(cfg.seed + 2))
            if cfg.augment.enabled or cfg.augment.scanner
            else None
        ),
        scheduler=scheduler,
        class_weight=class_weights(y_train, n_classes) if cfg.class_weighted and not multilabel else None,
        autocast=autocast,
        scaler=torch.amp.GradScaler("cuda") if autocast == torch.float16 else None,
        label_smoothing=cfg.label_smoothing,
        averaged=averaged,
        draw=draw,
        loss=MaskedBCE(y_train, cfg.class_weighted, cfg.label_smoothing) if multilabel else None,
    )


def fit(
    model_name: str,
    hp: dict,
    data: FitData,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochStats], bool] | None = None,
    progress: bool = False,
) -> FitResult:
    """Train ``model_name`` with ``hp`` on ``data.train``, watch ``data.val``, keep the best (or
    last) epoch's weights.

    ``on_epoch`` is called after every epoch; returning True stops training (the tuner prunes
    there). Safe to call from several threads at once: each call owns its generators. ``cfg`` must
    be resolved (a ``job.Job``'s ``trial`` or ``final``), with ``hp``'s batch size (``cfg.for_params(hp)``):
    the batch size, optimiser, schedule and augmentation are read from it as they are. The
    returned model is on the CPU.
    """
    if not cfg.resolved:
        raise ValueError("fit() needs a resolved TrainConfig: a Job's trial or final settings, .for_params(hp)")
    if cfg.members > 1:
        return _fit_members(model_name, hp, data, cfg, progress)
    if "batch_size" in hp and int(hp["batch_size"]) != cfg.batch_size:
        raise ValueError(
            f"the hyperparameters set batch_size {hp['batch_size']} but cfg has {cfg.batch_size}; "
            "pass the config with them: cfg.for_params(hp)"
        )
    if is_multilabel(data.train[1]):
        check_targets(data.train[1], data.val[1], data.n_classes)
    device = resolve_device(cfg.device)
    with _INIT_LOCK:
        torch.manual_seed(cfg.seed)
        model = create_model(model_name, tuple(data.train[0].shape[1:]), data.n_classes, **hp)
    if cfg.init_weights is not None:
        load_init_weights(model, cfg.init_weights)
    model.to(device)
    autocast, channels_last = training_arithmetic(cfg.precision, device, model, tuple(data.train[0].shape[1:]))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    rank, size = world()
    if size > 1 and device.type == "cuda":
        # Batch statistics over every process's share, as one process would see them (GPU only:
        # on the CPU each process normalises its own share, so a CNN trains a little differently).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train, val = [tuple(t.to(device) for t in part) for part in (data.train, data.val)]
    optimizer, options = _training_parts(model, hp, cfg, data, train[1], device, autocast)
    options.channels_last = channels_last
    plain = cfg.fused_step and size == 1 and options.autocast is None
    fused = FirstLayerAdam.applies(model, optimizer, device, cfg.batch_size) if plain else None
    # the process's cores (shared out among the trials stepping at once), or --threads
    cores = cfg.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    options.first_layer = FirstLayerAdam(fused, optimizer, cores) if fused is not None else None
    watched = options.averaged.module if options.averaged is not None else model
    generator = torch.Generator().manual_seed(cfg.seed)  # batch order, the same in every process
    stepped = model
    if size > 1:  # torchrun: every process holds the model, DDP averages the gradients of their shares
        from torch.nn.parallel import DistributedDataParallel

        stepped = DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None
        )
        options.shard = (rank, size)
    loop = _Loop(stepped, optimizer, watched, generator, options)
    with options.first_layer or contextlib.nullcontext():
        history, best, best_state, diverged, stopped_at = _epochs(loop, train, val, cfg, on_epoch, progress)
    if best_state is None:
        raise TrainingDiverged(f"training diverged in the first epoch with {hp}", hint="lower the learning rate")
    model.load_state_dict(best_state)
    model.cpu().eval().to(memory_format=torch.contiguous_format)  # saved, exported and served as NCHW
    arithmetic = str(autocast or torch.float32).removeprefix("torch.") + ", channels-last" * channels_last
    return FitResult(model, best.epoch, history, diverged, stopped_at, arithmetic=arithmetic)


@dataclass
class _Loop:
    """What ``fit``'s epochs step and watch."""

    stepped: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    watched: nn.Module  # validated and kept: the model, or its moving average
    generator: torch.Generator  # the batch order
    options: StepOptions


def _epochs(loop: _Loop, train, val, cfg: TrainConfig, on_epoch, progress: bool):
    """``fit``'s epochs: train, validate ``loop.watched``, keep the best (or last) state, stop on
    pruning, patience or divergence. Returns (history, best stats, best state, diverged, stopped at)."""
    from lungxray.progress import bar, note

    history: list[EpochStats] = []
    best, best_state, diverged, stopped_at = None, None, False, None
    epochs = bar(total=cfg.epochs, desc="epochs", unit="epoch", leave=False, disable=not progress)
    try:
        for epoch in range(1, cfg.epochs + 1):
            loss, acc = train_one_epoch(
                loop.stepped, loop.optimizer, *train, cfg.batch_size, loop.generator, loop.options
            )
            # a CNN on the CPU a batch at a time: its activations stay in cache (the same logits where checked)
            chunk = cfg.batch_size if loop.options.channels_last and val[0].device.type == "cpu" else 256
            val_loss, val_acc = evaluate_loss(loop.watched, *val, chunk)
            stats = EpochStats(epoch, loss, acc, val_loss, val_acc)
            history.append(stats)
            figures = f"loss {loss:.4f}, val_loss {val_loss:.4f}, val_accuracy {val_acc:.4f}"
            epochs.set_postfix_str(figures)
            epochs.update()
            note(f"epoch {epoch}/{cfg.epochs}: {figures}", enabled=progress)
            if not (math.isfinite(loss) and math.isfinite(val_loss)):
                diverged = True
                break
            if cfg.keep == "last" or is_better(stats, best, cfg.select_by):
                best, best_state = stats, copy.deepcopy(loop.watched.state_dict())
            if on_epoch is not None and on_epoch(stats):
                stopped_at = epoch
                break
            if cfg.keep == "best" and cfg.patience and epoch - best.epoch >= cfg.patience:
                note(f"stopped early: no better {cfg.select_by} for {cfg.patience} epochs", enabled=progress)
                break  # early stopping: no better validation figure for cfg.patience epochs
    finally:
        epochs.close()
    return history, best, best_state, diverged, stopped_at


def _fit_members(model_name: str, hp: dict, data: FitData, cfg: TrainConfig, progress: bool) -> FitResult:
    """``cfg.members`` fits from seeds seed, seed + 1000, ... as one ``Ensemble`` (mean probability:
    of the softmax, or multi-label of each finding's sigmoid)."""
    fits = [
        fit(model_name, hp, data, replace(cfg, seed=cfg.seed + 1000 * m, members=1), progress=progress)
        for m in range(cfg.members)
    ]
    first = fits[0]
    return FitResult(
        Ensemble([f.model for f in fits], "multilabel" if is_multilabel(data.train[1]) else "single").eval(),
        first.best_epoch,
        first.history,
        diverged=any(f.diverged for f in fits),
        member_epochs=[f.best_epoch for f in fits],
        arithmetic=first.arithmetic,
    )
