"""Settings resolved once: unset fields take the model's recipe, the hyperparameters' batch size
wins, the CLI's flags and defaults come from the dataclass fields, errors carry a hint."""

from __future__ import annotations

from dataclasses import fields

import pytest
from conftest import cli

from lungxray.cli import build_parser, from_args
from lungxray.config import AugmentConfig, Recipe, TrainConfig, TuneConfig, resolve_train, resolve_tune, trial_settings
from lungxray.errors import ConfigError, LungxrayError
from lungxray.models import REGISTRY


def test_resolve_fills_every_unset_field_from_the_recipe():
    recipe = Recipe(optimizer="adam", schedule="constant", augment=False, epochs=7, batch_size=4, jobs=2)
    cfg = TrainConfig()
    assert not cfg.resolved
    done = resolve_train(cfg, recipe)
    assert done.resolved
    assert (done.epochs, done.batch_size, done.optimizer, done.schedule, done.augment.enabled) == (
        7,
        4,
        "adam",
        "constant",
        False,
    )
    assert resolve_train(done, recipe) == done  # idempotent
    assert resolve_tune(TuneConfig(), recipe).jobs == 2 and resolve_tune(TuneConfig(jobs=3), recipe).jobs == 3


def test_user_values_win_over_the_recipe_and_params_over_batch_size():
    recipe = REGISTRY["cnn"].recipe
    cfg = TrainConfig(epochs=3, batch_size=8, optimizer="adam", augment=AugmentConfig(enabled=False, rotation=9))
    done = resolve_train(cfg, recipe)
    assert (done.epochs, done.batch_size, done.optimizer, done.schedule) == (3, 8, "adam", "cosine")
    assert done.augment == AugmentConfig(enabled=False, rotation=9, scanner=True)  # scanner: the cnn's recipe
    assert resolve_train(cfg, recipe).for_params({"batch_size": 32, "learning_rate": 1e-3}).batch_size == 32
    assert resolve_train(cfg, recipe).for_params({"learning_rate": 1e-3}).batch_size == 8


def test_augment_ranges_without_the_switch_follow_the_recipe():
    """--rotate 10 alone: on for a CNN (its recipe augments) with that range, off for the MLP."""
    cfg = TrainConfig(augment=AugmentConfig(rotation=10))
    assert resolve_train(cfg, REGISTRY["cnn"].recipe).augment == AugmentConfig(enabled=True, rotation=10, scanner=True)
    assert resolve_train(cfg, REGISTRY["mlp"].recipe).augment.enabled is False
    assert resolve_train(cfg, REGISTRY["mlp"].recipe).augment.scanner is False
    off = TrainConfig(augment=AugmentConfig(scanner=False))  # --no-scanner-augment wins over the recipe
    assert resolve_train(off, REGISTRY["cnn"].recipe).augment.scanner is False
    assert TrainConfig(augment=False).augment == AugmentConfig(enabled=False)  # the bool shorthand


def test_pruner_none_turns_patience_off_inside_trials_only():
    cfg = resolve_train(TrainConfig(patience=5), REGISTRY["mlp"].recipe)
    assert trial_settings(cfg, TuneConfig(pruner="none")).patience == 0
    assert trial_settings(cfg, TuneConfig(pruner="median")).patience == 5


def test_every_flagged_field_is_a_cli_option_with_the_dataclass_default():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    options = {s for a in run._actions for s in a.option_strings}
    for cls in (TrainConfig, TuneConfig, AugmentConfig):
        for f in fields(cls):
            if f.metadata.get("flag"):
                assert f.metadata["flag"] in options, f.name
    args = parser.parse_args(["run", "data", "--out", "o"])
    assert from_args(TrainConfig, args) == TrainConfig()  # nothing given: every dataclass default
    args = parser.parse_args(
        [
            "run",
            "data",
            "--out",
            "o",
            "--objective",
            "val_accuracy",
            "--rotate",
            "7",
            "--no-augment",
            "--batch-size",
            "4",
        ]
    )
    cfg = from_args(TrainConfig, args, augment=from_args(AugmentConfig, args))
    assert (cfg.select_by, cfg.batch_size, cfg.augment.rotation, cfg.augment.enabled) == ("val_accuracy", 4, 7.0, False)


def test_help_shows_field_docs_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli("run --help")
    text = " ".join(capsys.readouterr().out.split())
    assert "Validation figure that picks the kept epoch and the best trial (default val_loss)" in text
    assert "--zoom ZOOM Largest zoom in or out, as a share (default 0.05)" in text


def test_a_bad_setting_names_its_flag_and_user_errors_share_one_base():
    with pytest.raises(ConfigError, match="--objective must be one of val_loss, val_accuracy"):
        TrainConfig(select_by="accuracy")
    assert issubclass(ConfigError, LungxrayError) and issubclass(ConfigError, ValueError)


def test_a_bug_keeps_its_traceback_a_user_error_gets_a_hint(tmp_path, capsys, monkeypatch):
    import lungxray.cli

    def boom(args):
        raise ValueError("an internal bug")

    monkeypatch.setitem(lungxray.cli.COMMANDS, "report", boom)
    with pytest.raises(ValueError, match="an internal bug"):
        cli("report", tmp_path)
    monkeypatch.undo()
    assert cli("report", tmp_path) == 2
    err = capsys.readouterr().err
    assert "holds no metrics.json or cv.json" in err and "hint: run `lungxray run`" in err
