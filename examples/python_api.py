"""Search, train, evaluate and save a model, predict with it, and cross-validate, from Python."""

import lungxray

result = lungxray.run(
    "../shared/data/covid19-image-dataset",
    "runs/api",
    model="mlp",
    trials=2,
    epochs=4,
    img_size=32,
    seed=1,
    progress=False,
    force=True,
)
print(result.summary["best_params"], result.metrics["accuracy"], result.metrics["ci95"]["accuracy"])

predictor = lungxray.load("runs/api")  # the run folder, or its model/
for row in predictor.predict("../shared/data/covid19-image-dataset/test/Normal")[:3]:
    print(row["path"], row["class"], row["probabilities"])

cv = lungxray.cross_validate(
    "../shared/data/covid19-image-dataset",
    "runs/api-cv",
    model="mlp",
    folds=3,
    epochs=3,
    img_size=32,
    progress=False,
    force=True,
)
print(cv["summary"]["macro_f1"])
