"""The Job: built once from the command line or the Python API, resolved against the model's
recipe in its constructor, and the same Job whichever way it was asked for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lungxray.config import CVConfig, Preprocessing, TrainConfig, TuneConfig
from lungxray.errors import ConfigError, UnknownModelError
from lungxray.flags import build_parser
from lungxray.job import Job


def _from_cli(argv: list[str]) -> Job:
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("data", "out")} | {"progress": not args.quiet}
    return Job.from_options(args.data, getattr(args, "out", None), strict=False, **values)


def test_the_constructor_fills_unset_settings_from_the_models_recipe():
    job = Job(Path("data"), Path("out"), "mlp", final_epochs=5)
    assert job.trial.resolved and job.final.resolved
    assert (job.trial.epochs, job.final.epochs) == (64, 5)  # the mlp's recipe; --final-epochs
    assert job.final.optimizer == "adam" and job.final.batch_size == 8 and job.search.jobs == 2
    assert job.train == TrainConfig()  # what was given stays as given
    cnn = Job(Path("data"), model="cnn")
    assert (cnn.final.optimizer, cnn.final.epochs, cnn.search.jobs) == ("adamw", 30, 2)
    assert (cnn.final.precision, job.final.precision) == ("auto", "float32")  # mixed precision on a GPU, never mlp


def test_trials_leave_patience_to_the_pruner_and_fit_one_member():
    job = Job(Path("d"), model="mlp", train=TrainConfig(patience=5, members=3), search=TuneConfig(pruner="none"))
    assert (job.trial.patience, job.trial.members) == (0, 1)
    assert (job.final.patience, job.final.members) == (5, 3)


def test_an_unknown_model_fails_before_anything_is_read():
    with pytest.raises(UnknownModelError, match="mlp"):
        Job(Path("no/such/folder"), model="mpl")


def test_the_job_is_frozen_and_replace_resolves_again():
    job = Job(Path("d"), model="mlp")
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.model = "cnn"
    other = dataclasses.replace(job, train=dataclasses.replace(job.train, seed=7, epochs=3))
    assert (other.trial.seed, other.final.seed, other.final.epochs) == (7, 7, 3)
    assert job.final.seed == 0


def test_options_keep_their_field_names_and_nest_where_the_settings_do():
    job = Job.from_options("d", "o", model="mlp", equalize="clahe", img_size=32, batch_size=4, seed=3, rotation=2.0,
                           trials=5, folds=3, force=True, progress=False)  # fmt: skip
    assert job.preprocessing == Preprocessing(img_size=32, equalize="clahe")
    assert (job.final.batch_size, job.final.seed, job.split.seed, job.final.augment.rotation) == (4, 3, 3, 2.0)
    assert (job.search.trials, job.cv, job.force, job.progress) == (5, CVConfig(folds=3), True, False)
    assert (job.data, job.out, job.data_named) == ((Path("d"),), Path("o"), "d")


def test_an_unknown_option_names_the_one_it_may_mean():
    with pytest.raises(ConfigError, match="unknown option") as info:
        Job.from_options("d", "o", model="mlp", equalise="clahe")
    assert "equalize" in info.value.hint


def test_the_command_line_and_the_python_api_build_the_same_job():
    argv = ["run", "DATA", "--out", "OUT", "--model", "mlp", "--equalize", "hist", "--img-size", "64", "--seed", "4",
            "--batch-size", "16", "--trials", "3", "--final-epochs", "9", "--no-augment", "--quiet"]  # fmt: skip
    api = Job.from_options("DATA", "OUT", model="mlp", equalize="hist", img_size=64, seed=4, batch_size=16,
                           trials=3, final_epochs=9, enabled=False, progress=False)  # fmt: skip
    cli = _from_cli(argv)
    assert cli == dataclasses.replace(api, dataset=dataclasses.replace(api.dataset, cache_dir=cli.dataset.cache_dir))
    assert cli.final.epochs == 9 and cli.final.augment.enabled is False


def test_preprocessing_writes_and_reads_itself():
    prep = Preprocessing(img_size=48, crop_borders=True, equalize="clahe", dicom_keep=["lateral", "multiframe"])
    assert prep.dicom_keep == ("lateral", "multiframe")
    saved = prep.to_json()
    assert saved["equalize"] == "clahe" and saved["dicom_keep"] == ["lateral", "multiframe"]
    assert Preprocessing.from_json(saved) == prep
    assert Preprocessing.from_json({"img_size": 16}) == Preprocessing(img_size=16)  # a bundle from before the options
    with pytest.raises(ConfigError, match="--equalize"):
        Preprocessing.from_json(saved | {"equalize": "gamma"})


def test_the_python_api_refuses_the_other_functions_options():
    import lungxray

    with pytest.raises(ConfigError, match="params, tune: not an option of lungxray.run"):
        lungxray.run("d", "o", model="mlp", params={}, tune=True)
    with pytest.raises(ConfigError, match="final_epochs: not an option of lungxray.cross_validate"):
        lungxray.cross_validate("d", "o", model="mlp", final_epochs=3)
