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


class Images:
    """(N, 1, H, W) float32 images in [0, 1], made on demand from (N, H, W) uint8 ``pixels`` (a
    memory-mapped file or an array) at rows ``index``: indexing gives a float tensor of just those
    images, so a training epoch reads its batches from disk pages instead of holding every image
    as float32 (four times its bytes) in memory. The values are those of ``to_tensor``.

    Supports what training and prediction ask of a tensor: ``len``, ``shape``, ``device``,
    ``to(device)`` and indexing by an int, a slice, or an index tensor or array. On the CPU, batches
    are read from ``pixels`` as they are asked for; ``to`` a GPU (or ``resident``) copies the uint8
    rows there once and indexing gathers and converts them there, with no host round trip.
    """

    def __init__(self, pixels: np.ndarray, index: np.ndarray | None = None, device: torch.device | None = None):
        self.pixels = pixels
        self.index = np.arange(len(pixels)) if index is None else np.asarray(index, dtype=np.int64)
        self.device = torch.device(device or "cpu")
        self.rows: torch.Tensor | None = None  # (N, H, W) uint8 on ``device`` once resident
        self._levels: torch.Tensor | None = None  # (256,) to_tensor's value of each grey level, there

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), 1, *self.pixels.shape[1:])

    def to(self, device) -> Images:
        """These images on ``device``: resident there on a GPU whose free memory holds them four
        times over (or where they already are), else read from ``pixels`` batch by batch."""
        device = torch.device(device)
        if self.rows is not None and device == self.device:
            return self
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if len(self.index) * int(np.prod(self.pixels.shape[1:])) * 4 <= free:
                return self.resident(device)
        return Images(self.pixels, self.index, device)

    def resident(self, device=None) -> Images:
        """These images held on ``device`` (default: theirs) as one uint8 tensor, a quarter of their
        float32 bytes, copied once; indexing then gathers and converts there."""
        device = torch.device(device) if device is not None else self.device
        if self.rows is not None and self.device == device:
            return self
        held = Images(self.pixels, self.index, device)
        held.rows = torch.empty((len(self.index), *self.pixels.shape[1:]), dtype=torch.uint8, device=device)
        for first in range(0, len(self.index), 4096):  # a chunk at a time: no host copy of a whole large stack
            rows = np.ascontiguousarray(self.pixels[self.index[first : first + 4096]])
            held.rows[first : first + len(rows)] = torch.from_numpy(rows).to(device)
        # A lookup of to_tensor's own values, not a division here: on a GPU, dividing by a number
        # multiplies by its reciprocal, which rounds 126 of the 256 levels differently in the last bit.
        held._levels = to_tensor(np.arange(256, dtype=np.uint8).reshape(1, 1, 256)).view(256).to(device)
        return held

    def __getitem__(self, key) -> torch.Tensor:
        if self.rows is not None:
            return self._gather(key)
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        rows = self.index[key]
        if np.ndim(rows) == 0:
            return to_tensor(self.pixels[int(rows)][None])[0].to(self.device)
        return to_tensor(self.pixels[rows]).to(self.device)  # (B, 1, H, W)

    def _gather(self, key) -> torch.Tensor:
        """The resident rows at ``key`` as float images, on their device; an index tensor already
        there stays there (no host sync)."""
        if isinstance(key, torch.Tensor):
            key = key.to(self.rows.device)
        elif not isinstance(key, (int, np.integer, slice)):
            key = torch.as_tensor(np.asarray(key), device=self.rows.device)
        pixels = self.rows[int(key) if isinstance(key, np.integer) else key]  # (B, H, W), or (H, W) for one
        return self._levels[pixels.long()].unsqueeze(-3)  # (B, 1, H, W), or (1, H, W)
