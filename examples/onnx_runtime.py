"""Classify one X-ray with an exported model.onnx and ONNX Runtime, NumPy and Pillow only."""

import json

import numpy as np
import onnxruntime
from PIL import Image

session = onnxruntime.InferenceSession("runs/demo/model/model.onnx")
meta = session.get_modelmeta().custom_metadata_map
classes = json.loads(meta["lungxray.classes"])
preprocessing = json.loads(meta["lungxray.preprocessing"])
assert preprocessing.get("equalize", "none") == "none" and not preprocessing.get("crop_borders")
assert not preprocessing.get("site_normalise")  # else: equalise the film's grey levels first
size = preprocessing["img_size"]
temperature = float(meta["lungxray.temperature"])
bias = np.array(json.loads(meta.get("lungxray.class_bias", "[]")) or 0.0)  # 0 unless --val-by site

image = Image.open("../shared/data/covid19-image-dataset/test/Normal/0101.jpeg").convert("L")
x = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)[None, None] / 255
logits = (session.run(None, {"image": x})[0][0] + bias) / temperature
probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
print(dict(zip(classes, probs.round(3).tolist(), strict=True)))
