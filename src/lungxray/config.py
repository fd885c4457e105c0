"""Typed settings for every stage (data, splits, augmentation, training, tuning, serving) and their resolution.

Each field has a default and a one-line doc; a field that is a command-line option names its flag
(and its choices) in its metadata, so the CLI builds its flags, defaults and help from the fields
(``lungxray.flags``) and errors name the flag to change. Cross-field checks live in ``__post_init__``.

"A setting left unset means the model's recipe" is decided here and only here: ``resolve_train``
and ``resolve_tune`` fill every unset field from the model's ``Recipe``; ``trial_settings`` gives
the training settings inside trials; the ``Job`` (``job.py``) calls them once, and everything
downstream receives a fully filled config and never re-derives a default. Nothing here reads files or imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from lungxray.errors import ConfigError, ParamsError
from lungxray.labelling import Findings
from lungxray.options import check_choices, flag_of, option


def default_cache_dir() -> Path:
    """Where preprocessed arrays live unless ``--cache-dir`` says otherwise."""
    import os

    root = os.environ.get("LUNGXRAY_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "lungxray" if root else Path.home() / ".cache" / "lungxray"


EQUALIZE = ("none", "hist", "clahe")
DICOM_KEEP = ("multiframe", "lateral", "any-modality")  # as dicom.KEEP, without importing it


MAX_PIXELS = 40_000_000  # a chest radiograph has at most ~18 M (4280 x 4280); decoding costs 8 B per pixel


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the model's input. Training, evaluation and serving decode with
    the same object: the bundle's config.json stores it (``to_json``) and the Predictor reads it
    back (``from_json``), so one name per option holds from the flag to the bundle."""

    img_size: int = option("--img-size", 128)
    """Side of the square grayscale image fed to the model."""
    crop_borders: bool = option("--crop-borders", False)
    """Remove uniform borders (black or white frames, padding) of each image before resizing."""
    equalize: str = option("--equalize", "none", choices=EQUALIZE)
    """Spread each image's grey levels after resizing: clahe (contrast-limited adaptive), hist
    (global histogram equalisation), or none (the tutorial's plain resize). Stored in the bundle,
    so prediction repeats it. Measured on adult X-rays from other hospitals, no option raised the
    default CNN's external AUROC beyond the seed spread (BENCHMARKS.md, "External validation")."""
    site_normalise: bool = option("--site-normalise", False)
    """Equalise each site's pooled grey-level histogram (every image of a hospital mapped alike,
    ``decode.normalise_sites``); one image at a time where no site is known (predict, serve)."""
    dicom_keep: tuple[str, ...] = option("--dicom-keep", (), choices=DICOM_KEEP)
    """DICOM files to use instead of skipping (repeat the flag for several): multiframe (a series' first frame),
    lateral (ViewPosition LL/RL), any-modality (not CR, DX, DR). Stored in the bundle for prediction."""

    def __post_init__(self) -> None:
        keep = self.dicom_keep
        if isinstance(keep, (list, set, frozenset)):  # a list from the CLI or JSON
            keep = tuple(keep)
        if isinstance(keep, tuple) and all(isinstance(v, str) for v in keep):
            keep = tuple(sorted(set(keep)))
        object.__setattr__(self, "dicom_keep", keep)  # frozen: normalised once, here
        check_choices(self)
        if isinstance(self.img_size, bool) or not isinstance(self.img_size, int) or not 8 <= self.img_size <= 1024:
            raise ConfigError(f"--img-size must be between 8 and 1024, got {self.img_size!r}")
        for name in ("crop_borders", "site_normalise"):
            if getattr(self, name) not in (True, False):
                raise ConfigError(f"{flag_of(Preprocessing, name)} is true or false, got {getattr(self, name)!r}")

    @property
    def plain(self) -> Preprocessing:
        """The same size with neither cropping nor equalisation (the tutorial's plain resize)."""
        return replace(self, crop_borders=False, equalize="none")

    def to_json(self) -> dict:
        """config.json's "preprocessing": these options, and the fixed steps around them."""
        return {
            "img_size": self.img_size,
            "crop_borders": self.crop_borders,
            "equalize": self.equalize,
            "dicom_keep": list(self.dicom_keep),
            "site_normalise": self.site_normalise,
            "color": "grayscale",
            "resize": "bilinear",
            "scale": "pixel / 255",
            "jpeg_reduced_decoding": True,
        }

    @classmethod
    def from_json(cls, saved: dict) -> Preprocessing:
        """The options ``to_json`` wrote; an option a bundle does not name is its default (bundles
        made before it existed). Raises ConfigError for a value out of range."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass
class Manifest:
    """How a CSV manifest given as DATA is read (a folder of class folders needs none of this)."""

    path_col: str | None = option("--path-col", None, metavar="COL")
    """Column of image paths (relative to the CSV, or to --image-dir); default: path or file."""
    label_col: str | None = option("--label-col", None, metavar="COL")
    """Column of class names; default: label, or each file's folder when the CSV has no label column."""
    patient_col: str | None = option("--patient-col", None, metavar="COL")
    """Column of patient IDs (a patient's films never straddle splits or folds); default: patient."""
    site_col: str | None = option("--site-col", None, metavar="COL")
    """Column of sites (hospital, collection); default: site, else each DATA root is a site."""
    image_dir: Path | None = option("--image-dir", None, metavar="DIR")
    """Folder the manifest's paths are relative to, where a published set lists bare file names."""
    where: tuple[str, ...] = option("--where", (), metavar="COL=VALUE[,VALUE]")
    """Keep only the manifest rows whose column COL holds one of the values (repeatable)."""

    def __post_init__(self) -> None:
        self.image_dir = Path(self.image_dir) if self.image_dir is not None else None
        self.where = (self.where,) if isinstance(self.where, str) else tuple(self.where)
        bad = [w for w in self.where if "=" not in w or not w.split("=", 1)[0].strip()]
        if bad:
            raise ConfigError(f"--where {bad[0]!r} is not COL=VALUE[,VALUE]", hint="e.g. --where view=PA,AP")


@dataclass
class DataConfig:
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    """Size and preprocessing of the model's input (``Preprocessing``)."""
    manifest: Manifest = field(default_factory=Manifest, metadata={"group": "CSV manifests"})
    """How a CSV manifest given as DATA is read (``Manifest``)."""
    findings: Findings = field(default_factory=Findings, metadata={"group": "findings (published sets, multi-label)"})
    """How a manifest's findings are read, several per film (``labelling.Findings``)."""
    dicom_patients: bool = option("--dicom-patients", True)
    """Keep the images of one DICOM PatientID in one group (--no-dicom-patients: for anonymised
    files that all carry the same placeholder ID)."""
    sources: str | None = option("--data-sources", None, metavar="TEXT")
    """Where the images come from, in words (hospitals, collections, licences): written into the
    model card, which otherwise asks for it."""
    cache_dir: Path = option("--cache-dir", default_factory=default_cache_dir)
    """Folder of preprocessed arrays keyed by file content hash ($LUNGXRAY_CACHE/lungxray, else
    $XDG_CACHE_HOME/lungxray, else ~/.cache/lungxray)."""
    workers: int = option("--workers", 0)
    """Decoding processes; 0 means one per CPU core."""
    groups: Path | None = option("--groups", None, metavar="CSV")
    """CSV with columns path,group (paths relative to DATA): images of one group (a patient) never
    straddle train/val/test or cv folds; images without a row are their own group."""
    exclude: Path | None = option("--exclude", None, metavar="FILE")
    """Images to leave out: a CSV with a path column (e.g. checked rows of label_issues.csv) or one
    path per line, relative to DATA or absolute; run.json and scan.json list them."""
    near_duplicate_distance: int = 10
    """Largest perceptual-hash Hamming distance (of 64 bits) for a near-duplicate candidate pair."""
    near_duplicate_correlation: float = 0.95
    """Smallest correlation of 32x32 thumbnails that confirms a candidate pair as a near-duplicate."""

    def __post_init__(self) -> None:
        if not isinstance(self.preprocessing, Preprocessing):
            raise ConfigError(f"preprocessing must be a Preprocessing, got {self.preprocessing!r}")
        self.cache_dir = Path(self.cache_dir)
        self.groups = Path(self.groups) if self.groups is not None else None
        self.exclude = Path(self.exclude) if self.exclude is not None else None
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 (all cores) or more, got {self.workers}")
        if not 0 <= self.near_duplicate_distance <= 32:
            raise ConfigError(f"near_duplicate_distance must be in 0..32, got {self.near_duplicate_distance}")


@dataclass
class SplitConfig:
    mode: str = option("--split", "random", choices=("random", "folders"))
    """random: stratified, duplicate-grouped train/val/test; folders: the dataset's own train/ and
    test/ folders, val carved out of train."""
    val_fraction: float = option("--val-fraction", 0.10)
    """Share of all images held out for validation."""
    test_fraction: float = option("--test-fraction", 0.20)
    """Share of all images held out for the final test; ignored with --split folders."""
    drop_test_duplicates: bool = option("--drop-test-duplicates", False)
    """With --split folders, drop test images that duplicate a training image."""
    seed: int = option("--seed", 0)
    """Seed of the split, the search and training."""
    test_site: str | None = option("--test-site", None, metavar="SITE")
    """Test on one whole site (a hospital the model never saw), validate on part of the others."""
    val_by: str = option("--val-by", "group", choices=("group", "site"))
    """With sites held out (--test-site, cv --by site): site validates on one whole other site and
    fits the decision's class offsets there (``metrics.fit_class_bias``), not on the training mix."""

    def __post_init__(self) -> None:
        check_choices(self)
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
    scanner: bool = False
    """Training batches made to look like other scanners' (``AugmentConfig.scanner``)."""
    epochs: int = 40
    """Epochs per training run."""
    batch_size: int = 16
    """Mini-batch size when the hyperparameters do not set one."""
    jobs: int = 1
    """Trials trained side by side: 2 for models too small to use two cores in one trial."""
    mixed_precision: bool = True
    """``--precision auto`` trains in mixed precision where the GPU or CPU has it; off for mlp."""


@dataclass
class AugmentConfig:
    """Random changes to each training image, drawn per image and applied to whole batches.

    Mild by default: on the shared dataset, larger ranges (10 degrees, 6% shift, 10% zoom and
    brightness, 15% contrast) cost the default CNN about 3 points of cross-validated macro-F1,
    while these ranges did no harm (BENCHMARKS.md, "Models compared").
    """

    enabled: bool | None = option("--augment", None)
    """Augment training batches; unset: the model's recipe (on for CNNs, off for mlp)."""
    rotation: float = option("--rotate", 5.0)
    """Largest rotation, degrees either way."""
    shift: float = option("--shift", 0.03)
    """Largest shift, as a share of the image side."""
    scale: float = option("--zoom", 0.05)
    """Largest zoom in or out, as a share."""
    brightness: float = option("--brightness", 0.05)
    """Largest brightness change, added to pixels in [0, 1]."""
    contrast: float = option("--contrast", 0.05)
    """Largest contrast change, as a share."""
    hflip: bool = option("--hflip", False)
    """Mirror half the images left-right (off: the heart sits on the left in a PA film)."""
    scanner: bool | None = option("--scanner-augment", None)
    """Simulate other scanners on training images, with or without --augment: gamma 0.7-1.4, blur or sharpening,
    noise up to 3% of the range, 16-256 grey levels; unset: the model's recipe (on for cnn, off for the others)."""

    def __post_init__(self) -> None:
        if self.enabled is False:
            return  # ranges of augmentation that is off are never used, so never wrong
        if not 0 <= self.rotation <= 45:
            raise ConfigError(f"--rotate must be between 0 and 45 degrees, got {self.rotation}")
        for name in ("shift", "scale", "brightness", "contrast"):
            value = getattr(self, name)
            if not 0 <= value < 0.5:
                raise ConfigError(f"{flag_of(AugmentConfig, name)} must be in [0, 0.5), got {value}")


@dataclass
class TrainConfig:
    """How one model is fitted. Fields left None are the model's recipe until ``resolve_train``."""

    epochs: int | None = option("--epochs", None)
    """Epochs per training run; unset: the model's (64 for mlp, 30 for cnn)."""
    batch_size: int | None = option("--batch-size", None)
    """Mini-batch size where the hyperparameters set none; unset: the model's (8 for mlp, 16 for CNNs)."""
    seed: int = option("--seed", 0)
    """Seed of weight initialisation, dropout and batch order."""
    threads: int = option("--threads", 0)
    """Torch intra-op threads; 0 means one per CPU core."""
    patience: int = option("--patience", 16)
    """Stop a training run after this many epochs without a better validation figure; 0 never stops early."""
    select_by: str = option("--objective", "val_loss", choices=("val_loss", "val_accuracy"))
    """Validation figure that picks the kept epoch and the best trial."""
    optimizer: str | None = option("--optimizer", None, choices=("adam", "adamw"))
    """adam (the tutorial's) or adamw; unset: the model's (adamw for CNNs, adam for mlp)."""
    schedule: str | None = option("--schedule", None, choices=("constant", "cosine"))
    """Learning rate over a run; unset: the model's (cosine for CNNs, constant for mlp)."""
    augment: AugmentConfig = field(
        default_factory=AugmentConfig,
        metadata={"group": "augmentation of training batches (default: on for CNNs, off for mlp)"},
    )
    """Training-batch augmentation; True or False turn it on or off with the default ranges."""
    class_weighted: bool = option("--class-weighted", False)
    """Weight the loss by inverse class frequency."""
    site_balanced: bool = option("--site-balanced", False)
    """Draw each epoch's images so that every site, and every class within a site, comes up equally often."""
    device: str = option("--device", "auto", choices=("auto", "cpu", "cuda"))
    """auto: CUDA with mixed precision when a GPU is there, else the CPU."""
    init_weights: Path | None = option("--init-weights", None)
    """Start from a local weights file (.safetensors, or a torch state dict read with weights_only=True)
    instead of random weights."""
    label_smoothing: float = option("--label-smoothing", 0.0)
    """Share of each target spread evenly over all classes (0: off)."""
    ema: float = option("--ema", 0.0, metavar="DECAY")
    """Validate and keep an exponential moving average of the weights with this decay, e.g. 0.999; it
    warms up as (1+n)/(10+n) over the first updates (0: off)."""
    keep: str = option("--keep", "best", choices=("best", "last"))
    """Weights a run returns: the best validation epoch, or the last (no early stopping)."""
    members: int = option("--members", 1)
    """Fits from seeds seed, seed+1000, ... averaged into one model (mean probability); a search's trials fit one."""
    precision: str = option("--precision", "auto", choices=("auto", "float32", "bfloat16", "float16"))
    """Training arithmetic; auto: bfloat16 mixed precision for CNNs where the GPU or CPU has it, else float32."""
    fused_step: bool = option("--fused-step", True)
    """On the CPU, step the MLP's first layer in one pass, its weight gradient fused into Adam, and
    compute its forward product in training with the same kernels (faster: bench/step_bench.py);
    --no-fused-step leaves both to torch, whose sums round differently."""

    def __post_init__(self) -> None:
        check_choices(self)
        if isinstance(self.augment, bool) or self.augment is None:
            self.augment = AugmentConfig(enabled=self.augment)
        if self.init_weights is not None:
            self.init_weights = Path(self.init_weights)
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs/--final-epochs must be at least 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.patience < 0:
            raise ConfigError(f"--patience must be 0 (off) or more, got {self.patience}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"--ema must be in [0, 1) (0: off), got {self.ema}")
        if self.members < 1:
            raise ConfigError(f"--members must be at least 1, got {self.members}")

    @property
    def resolved(self) -> bool:
        """True when no field is left to the model's recipe (``resolve_train`` has run)."""
        unset = (self.epochs, self.batch_size, self.optimizer, self.schedule, self.augment.enabled,
                 self.augment.scanner)  # fmt: skip
        return all(v is not None for v in unset)

    def for_params(self, params: dict | None) -> TrainConfig:
        """These settings with the batch size that the hyperparameters ``params`` set, when they set
        one: a searched batch size wins over ``--batch-size``, which only applies where the
        hyperparameters set none."""
        if not params or "batch_size" not in params:
            return self
        try:
            batch_size = int(params["batch_size"])
        except (TypeError, ValueError):
            raise ParamsError(
                f"the hyperparameters set batch_size to {params['batch_size']!r}, not a whole number"
            ) from None
        return replace(self, batch_size=batch_size)


@dataclass
class TuneConfig:
    trials: int = option("--trials", 16)
    """Finished (complete or pruned) trials the study should hold."""
    sampler: str = option("--sampler", "gp", choices=("gp", "tpe", "random"))
    """gp: Gaussian-process Bayesian optimisation; tpe; random."""
    pruner: str = option("--pruner", "median", choices=("median", "hyperband", "none"))
    """Stop hopeless trials early; none also turns --patience off inside trials."""
    storage: str | None = option("--storage", None)
    """Optuna storage URL; unset: a SQLite file OUT/study.db."""
    study_name: str = option("--study-name", "lungxray")
    """Name of the study inside the storage."""
    jobs: int = option("--jobs", 0)
    """Trials trained side by side, in threads; 0: the model's (2 for mlp and cnn, 1 for the others)."""
    parallel: int = option("--parallel", 1)
    """Worker processes on this machine sharing the study (each one trial at a time, the cores
    shared out); above 1 the trials' order depends on timing, so a search is not repeatable."""
    heartbeat: int = option("--heartbeat", 30, metavar="SECONDS")
    """In a study shared by workers: seconds between a running trial's heartbeats; a trial silent
    for three is taken as dead, failed and run again once with the same parameters."""
    startup_trials: int = 4
    """Random trials before the sampler models the objective and before pruning starts."""
    warmup_epochs: int = 8
    """Epochs every trial runs before it may be pruned."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.trials}")
        if self.jobs < 0:
            raise ConfigError(f"--jobs must be 0 (the model's default) or more, got {self.jobs}")
        if self.parallel < 1 or self.heartbeat < 1:
            raise ConfigError(
                f"--parallel and --heartbeat must be at least 1, got {self.parallel} and {self.heartbeat}"
            )


@dataclass
class CVConfig:
    """How ``lungxray cv`` cross-validates (the folds are drawn with ``--seed``)."""

    folds: int = option("--folds", 5)
    """Folds, stratified and grouped by duplicate group."""
    repeats: int = option("--repeats", 1)
    """Train the same folds with training seeds seed, seed+1, ... and report each metric's mean +- std over them."""
    tune: bool = option("--tune", False)
    """Tune inside each fold's training part instead of using fixed hyperparameters."""
    by: str = option("--by", "group", choices=("group", "site"))
    """group: folds of whole duplicate and patient groups; site: leave-one-site-out, each site held out in turn."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.folds}")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {self.repeats}")


@dataclass(frozen=True)
class ServeTimeouts:
    """How long ``lungxray serve`` waits on a client before it closes the connection."""

    keep_alive: float = option("--keep-alive-timeout", 5.0, metavar="SECONDS")
    """Seconds an idle connection stays open, before its first request and between requests."""
    header: float = option("--header-timeout", 10.0, metavar="SECONDS")
    """Seconds a request's line and headers may take to arrive, from their first byte."""
    body: float = option("--body-timeout", 60.0, metavar="SECONDS")
    """Seconds a request's body may take to arrive after its headers; 60 s lets 20 MB come at 2.7 Mbit/s."""

    def __post_init__(self) -> None:
        for f in fields(self):
            seconds = getattr(self, f.name)
            if not 0 < seconds <= 3600:
                raise ConfigError(f"{f.metadata['flag']} must be above 0 and at most 3600 seconds, got {seconds}")


def resolve_train(cfg: TrainConfig, recipe: Recipe) -> TrainConfig:
    """``cfg`` with every field left unset taken from the model's ``recipe``. Idempotent: a
    resolved config comes back unchanged."""
    enabled = cfg.augment.enabled if cfg.augment.enabled is not None else recipe.augment
    scanner = cfg.augment.scanner if cfg.augment.scanner is not None else recipe.scanner
    return replace(
        cfg,
        epochs=cfg.epochs if cfg.epochs is not None else recipe.epochs,
        batch_size=cfg.batch_size if cfg.batch_size is not None else recipe.batch_size,
        optimizer=cfg.optimizer or recipe.optimizer,
        schedule=cfg.schedule or recipe.schedule,
        augment=replace(cfg.augment, enabled=enabled, scanner=scanner),
        precision=cfg.precision if cfg.precision != "auto" or recipe.mixed_precision else "float32",
    )


def resolve_tune(cfg: TuneConfig, recipe: Recipe) -> TuneConfig:
    """``cfg`` with the trials run side by side taken from the model's ``recipe`` when unset (0)."""
    return replace(cfg, jobs=cfg.jobs or recipe.jobs)


def trial_settings(cfg: TrainConfig, tune: TuneConfig) -> TrainConfig:
    """Training settings inside trials: one fit per trial (``--members`` is for the final model),
    and early stopping on patience is part of pruning, so ``--pruner none`` turns it off there (the
    final training keeps ``--patience``)."""
    return replace(cfg, members=1, patience=0 if tune.pruner == "none" else cfg.patience)
