"""The tutorial's search, written with Keras 3 + KerasTuner, run on a split that lungxray wrote.

Runs inside its own virtual environment (bench/search_bench.py creates it); it never imports
lungxray. It reads the images the tutorial's way (OpenCV, grayscale, 128x128, /255), builds the
tutorial's MLP and search space, runs BayesianOptimization on train/val, trains the best model for
the tutorial's 128 epochs, scores the test split once, and times predict. Prints one JSON object.

    bench/.keras-venv/bin/python bench/keras_reference.py SPLITS_JSON [--trials 16 --epochs 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import cv2  # noqa: E402
import keras  # noqa: E402
import keras_tuner  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

IMG_SIZE = 128


def load(paths: list[str]) -> np.ndarray:
    images = [cv2.resize(cv2.imread(p, cv2.IMREAD_GRAYSCALE), (IMG_SIZE, IMG_SIZE)) for p in paths]
    return np.array(images).reshape(-1, IMG_SIZE, IMG_SIZE, 1) / 255


def build_model(hp, n_classes: int):
    activation = hp.Choice("activation", ["relu", "tanh"])
    model = keras.Sequential([keras.Input((IMG_SIZE, IMG_SIZE, 1)), layers.Flatten()])
    model.add(layers.Dense(hp.Int("layer_1", 16, 128, step=16), activation=activation))
    model.add(layers.Dropout(hp.Choice("dropout_1", [0.0, 0.1, 0.2, 0.3])))
    dropout_2 = hp.Choice("dropout_2", [0.0, 0.1, 0.2, 0.3])
    model.add(layers.Dense(hp.Int("layer_2", 16, 128, step=16), activation=activation))
    model.add(layers.Dropout(dropout_2))
    model.add(layers.Dense(hp.Int("layer_3", 16, 128, step=16), activation=activation))
    model.add(layers.Dropout(dropout_2))
    model.add(layers.Dense(n_classes, activation="softmax"))
    model.compile(
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        optimizer=keras.optimizers.Adam(learning_rate=hp.Choice("learning_rate", [1e-2, 1e-3, 1e-4])),
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("splits", help="splits.json written by lungxray")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=64)
    parser.add_argument("--final-epochs", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    with open(args.splits) as f:
        splits = json.load(f)
    label_of = lambda p: os.path.basename(os.path.dirname(p))  # noqa: E731
    classes = sorted({label_of(p) for p in splits["train"]})
    start = time.perf_counter()
    data = {
        k: (load(splits[k]), np.array([classes.index(label_of(p)) for p in splits[k]]))
        for k in ("train", "val", "test")
    }
    load_s = time.perf_counter() - start
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data["train"], data["val"], data["test"]
    with tempfile.TemporaryDirectory() as workdir:
        tuner = keras_tuner.BayesianOptimization(
            lambda hp: build_model(hp, len(classes)),
            objective="val_accuracy",
            max_trials=args.trials,
            seed=args.seed,
            overwrite=True,
            directory=workdir,
            project_name="tutorial",
        )
        start = time.perf_counter()
        tuner.search(
            x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, validation_data=(x_val, y_val), verbose=0
        )
        search_s = time.perf_counter() - start
        best = tuner.get_best_hyperparameters(num_trials=1)[0]
        model = tuner.hypermodel.build(best)
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=args.final_epochs, validation_data=(x_val, y_val), verbose=0)
    final_s = time.perf_counter() - start
    test_loss, test_acc = model.evaluate(x_test, y_test, verbose=0)
    many = np.concatenate([x_test] * max(1, 2048 // len(x_test)))
    model.predict(many[:64], verbose=0)  # warm-up
    start = time.perf_counter()
    model.predict(many, verbose=0)
    predict_ips = len(many) / (time.perf_counter() - start)
    y_pred = model.predict(x_test, verbose=0).argmax(1)
    print(
        json.dumps(
            {
                "load_s": load_s,
                "search_s": search_s,
                "final_train_s": final_s,
                "test_accuracy": float(test_acc),
                "test_loss": float(test_loss),
                "best_params": best.values,
                "predict_images_per_s": predict_ips,
                "confusion": [
                    [int(((y_test == i) & (y_pred == j)).sum()) for j in range(len(classes))]
                    for i in range(len(classes))
                ],
                "versions": {"keras": keras.__version__, "keras_tuner": keras_tuner.__version__},
            }
        )
    )


if __name__ == "__main__":
    main()
