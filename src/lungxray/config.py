"""Typed settings for every stage: data, splits, tuning and training.

Each field has a default and a one-line doc; cross-field checks live in ``__post_init__`` and their
errors name the CLI flag to change. Nothing here reads files or imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A setting is out of range; the message names the flag to change."""


def default_cache_dir() -> Path:
    """Where preprocessed arrays live unless ``--cache-dir`` says otherwise."""
    import os

    root = os.environ.get("LUNGXRAY_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "lungxray" if root else Path.home() / ".cache" / "lungxray"


@dataclass
class DataConfig:
    img_size: int = 128
    """Side of the square grayscale image fed to the model (--img-size)."""
    cache_dir: Path = field(default_factory=default_cache_dir)
    """Folder of preprocessed arrays keyed by file content hash (--cache-dir)."""
    workers: int = 0
    """Decoding processes; 0 means one per CPU core (--workers)."""
    near_duplicate_distance: int = 10
    """Largest perceptual-hash Hamming distance (of 64 bits) for a near-duplicate candidate pair."""
    near_duplicate_correlation: float = 0.95
    """Smallest correlation of 32x32 thumbnails that confirms a candidate pair as a near-duplicate."""

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        if not 8 <= self.img_size <= 1024:
            raise ConfigError(f"--img-size must be between 8 and 1024, got {self.img_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 (all cores) or more, got {self.workers}")
        if not 0 <= self.near_duplicate_distance <= 32:
            raise ConfigError(
                f"near_duplicate_distance must be in 0..32, got {self.near_duplicate_distance}"
            )


@dataclass
class SplitConfig:
    mode: str = "random"
    """'random': stratified, duplicate-grouped 70/10/20; 'folders': the dataset's own train/test (--split)."""
    val_fraction: float = 0.10
    """Share of all images held out for validation (--val-fraction)."""
    test_fraction: float = 0.20
    """Share of all images held out for the final test (--test-fraction); ignored with --split folders."""
    drop_test_duplicates: bool = False
    """With --split folders, drop test images that duplicate a training image (--drop-test-duplicates)."""
    seed: int = 0
    """Seed of the split (--seed)."""

    def __post_init__(self) -> None:
        if self.mode not in ("random", "folders"):
            raise ConfigError(f"--split must be 'random' or 'folders', got {self.mode!r}")
        if not 0 < self.val_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ConfigError("--val-fraction and --test-fraction must each lie strictly between 0 and 1")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ConfigError(
                f"--val-fraction + --test-fraction = {self.val_fraction + self.test_fraction:.2f} "
                "leaves too little to train on; keep their sum under 0.9"
            )


@dataclass(frozen=True)
class Recipe:
    """How a model trains unless flags say otherwise; each registered model names its own."""

    optimizer: str = "adamw"
    """adam (the tutorial's) or adamw (decoupled weight decay)."""
    schedule: str = "cosine"
    """Learning rate over the run: constant, or cosine decay to zero by the last epoch."""
    augment: bool = True
    """Random affine and intensity changes of training batches."""
    epochs: int = 40
    """Epochs per training run."""
    batch_size: int = 16
    """Mini-batch size when the hyperparameters do not set one."""
    jobs: int = 1
    """Trials trained side by side: 2 for models too small to use two cores in one trial."""


@dataclass
class AugmentConfig:
    """Random changes to each training image, drawn per image and applied to whole batches.

    Mild by default: on the shared dataset, larger ranges (10 degrees, 6% shift, 10% zoom and
    brightness, 15% contrast) cost the default CNN about 3 points of cross-validated macro-F1,
    while these ranges did no harm (BENCHMARKS.md, "Models compared").
    """

    rotation: float = 5.0
    """Largest rotation, degrees either way (--rotate)."""
    shift: float = 0.03
    """Largest shift, as a share of the image side (--shift)."""
    scale: float = 0.05
    """Largest zoom in or out, as a share (--zoom)."""
    brightness: float = 0.05
    """Largest brightness change, added to pixels in [0, 1] (--brightness)."""
    contrast: float = 0.05
    """Largest contrast change, as a share (--contrast)."""
    hflip: bool = False
    """Mirror half the images left-right (--hflip). Off: the heart sits on the left in a PA film."""

    def __post_init__(self) -> None:
        if not 0 <= self.rotation <= 45:
            raise ConfigError(f"--rotate must be between 0 and 45 degrees, got {self.rotation}")
        for flag, value in (("--shift", self.shift), ("--zoom", self.scale),
                            ("--brightness", self.brightness), ("--contrast", self.contrast)):
            if not 0 <= value < 0.5:
                raise ConfigError(f"{flag} must be in [0, 0.5), got {value}")


@dataclass
class TrainConfig:
    epochs: int = 64
    """Epochs of training (--final-epochs for the final model, --epochs inside each trial)."""
    batch_size: int = 8
    """Mini-batch size (--batch-size)."""
    seed: int = 0
    """Seed of weight initialisation, dropout and batch order (--seed)."""
    threads: int = 0
    """Torch intra-op threads; 0 means one per CPU core (--threads)."""
    patience: int = 16
    """Stop when the validation figure has not improved for this many epochs; 0 never stops (--patience)."""
    select_by: str = "val_loss"
    """Which validation figure picks the kept epoch and the best trial: val_loss or val_accuracy (--objective)."""
    optimizer: str | None = None
    """adam or adamw; None: the model's recipe."""
    schedule: str | None = None
    """constant or cosine (--schedule); None: the model's recipe."""
    augment: AugmentConfig | bool | None = None
    """Training-batch augmentation: settings, True (default settings), False (off), None (the model's recipe)."""
    class_weighted: bool = False
    """Weight the loss by inverse class frequency (--class-weighted)."""
    device: str = "auto"
    """cpu, cuda, or auto: cuda when present (--device). Mixed precision on cuda."""
    init_weights: Path | None = None
    """Start from this weights file (safetensors, or a state dict) instead of random (--init-weights)."""
    label_smoothing: float = 0.0
    """Share of each target spread evenly over all classes (--label-smoothing)."""
    ema: float = 0.0
    """Decay of an exponential moving average of the weights, evaluated and kept instead of the
    raw weights; 0 turns it off (--ema)."""
    keep: str = "best"
    """Which epoch's weights a fit returns: best (by --objective on val) or last (--keep)."""

    def __post_init__(self) -> None:
        if self.optimizer not in (None, "adam", "adamw"):
            raise ConfigError(f"optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.schedule not in (None, "constant", "cosine"):
            raise ConfigError(f"--schedule must be constant or cosine, got {self.schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.init_weights is not None:
            self.init_weights = Path(self.init_weights)
        if self.epochs < 1:
            raise ConfigError(f"--epochs/--final-epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.patience < 0:
            raise ConfigError(f"--patience must be 0 (off) or more, got {self.patience}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"--ema must be in [0, 1) (0: off), got {self.ema}")
        if self.keep not in ("best", "last"):
            raise ConfigError(f"--keep must be best or last, got {self.keep!r}")
        if self.select_by not in ("val_loss", "val_accuracy"):
            raise ConfigError(f"--objective must be val_loss or val_accuracy, got {self.select_by!r}")


@dataclass
class TuneConfig:
    trials: int = 16
    """Number of finished (complete or pruned) trials the study should hold (--trials)."""
    sampler: str = "gp"
    """Optuna sampler: gp (Gaussian-process Bayesian optimisation), tpe or random (--sampler)."""
    pruner: str = "median"
    """Optuna pruner: median, hyperband or none (--pruner)."""
    storage: str | None = None
    """Optuna storage URL; None means a SQLite file in the run folder (--storage)."""
    study_name: str = "lungxray"
    """Name of the study inside the storage (--study-name)."""
    jobs: int = 0
    """Trials trained side by side, in threads (--jobs); 0: the model's recipe (MLP 2, CNNs 1)."""
    startup_trials: int = 4
    """Random trials before the sampler models the objective and before pruning starts."""
    warmup_epochs: int = 8
    """Epochs every trial runs before it may be pruned."""

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.trials}")
        if self.jobs < 0:
            raise ConfigError(f"--jobs must be 0 (the model's default) or more, got {self.jobs}")
        if self.sampler not in ("gp", "tpe", "random"):
            raise ConfigError(f"--sampler must be gp, tpe or random, got {self.sampler!r}")
        if self.pruner not in ("median", "hyperband", "none"):
            raise ConfigError(f"--pruner must be median, hyperband or none, got {self.pruner!r}")
