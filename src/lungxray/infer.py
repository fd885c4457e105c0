"""Inference helpers shared by training and serving: pixels to tensors, logits in eval mode, threads.

The serving side (bundle, explain, serve) predicts through these and imports nothing from the
training modules (train, tune, augment, pipeline, cv); training validates through the same
``predict_logits`` so a validation figure and a served prediction take one path. Holds no training.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (0: one per core, shared out among the processes of a
    distributed training on this machine)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float32 in [0, 1]."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # decoded uploads are read-only views; torch wants to own its memory
        images = images.copy()
    return torch.from_numpy(images).unsqueeze(1).float().div_(255.0)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 1, H, W) -> (N, n_classes) logits, in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
