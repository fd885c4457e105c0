"""Training-batch augmentation: small random rotation, shift, zoom, brightness and contrast, and
(``--scanner-augment``) the look of other scanners: gamma, blur or sharpening, noise, quantisation.

Parameters are drawn per image from the caller's ``torch.Generator`` (so trials trained side by
side in threads stay reproducible from their seed). On the CPU one numba kernel
(``_augment_kernel``) applies them; elsewhere torch does, the warp of the whole batch by MONAI's
``AffineTransform`` (one ``grid_sample`` call). Used on the training split only; holds no model code.
"""

from __future__ import annotations

import math

import torch

from lungxray.config import AugmentConfig


class BatchAugment:
    """``augment(x)``: (B, 1, H, W) in [0, 1] -> a randomly changed copy, same shape and range."""

    def __init__(self, cfg: AugmentConfig, generator: torch.Generator, kernel: bool = True) -> None:
        from monai.networks.layers import AffineTransform

        self.cfg = cfg
        self.generator = generator
        self.kernel = kernel  # on the CPU, the numba kernel applies the draws (False: torch's operations)
        # Normalised coordinates ([-1, 1] across the image) so the shift is a share of the side;
        # zeros outside the film, as a radiograph's background is dark.
        # theta reaches it in torch's (x, y) order, already 3x3 (``geometry``), so it makes no tensor of its own
        self._warp = AffineTransform(
            normalized=True, mode="bilinear", padding_mode="zeros", align_corners=False, reverse_indexing=False
        )
        self._noise_generator: torch.Generator | None = None  # on the batches' GPU, seeded from ``generator``
        self._kernels: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # the blur's, per device

    def _uniform(self, n: int, half_width: float) -> torch.Tensor:
        """(n,) values uniform in [-half_width, half_width]."""
        return (torch.rand(n, generator=self.generator) * 2 - 1) * half_width

    def theta(self, n: int) -> torch.Tensor:
        """(n, 2, 3) affine matrices: rotation, zoom, optional mirror, shift."""
        cfg = self.cfg
        angle = self._uniform(n, math.radians(cfg.rotation))
        zoom = 1 + self._uniform(n, cfg.scale)
        mirror = torch.ones(n)
        if cfg.hflip:
            mirror = torch.where(torch.rand(n, generator=self.generator) < 0.5, -1.0, 1.0)
        shift = torch.stack([self._uniform(n, 2 * cfg.shift), self._uniform(n, 2 * cfg.shift)], dim=1)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # sampling grid: zoom in = smaller step
        return torch.stack(
            [
                torch.stack([cos * mirror, -sin, shift[:, 0]], dim=1),
                torch.stack([sin * mirror, cos, shift[:, 1]], dim=1),
            ],
            dim=1,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        geometry = self.cfg.enabled is not False  # off only with scanner alone
        if self.kernel and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[1] == 1:
            return self._on_cpu(x, geometry)
        out = self.geometry(x) if geometry else x
        return self.scanner(out) if self.cfg.scanner else out

    def _on_cpu(self, x: torch.Tensor, geometry: bool) -> torch.Tensor:
        """``__call__`` by the numba kernel: the same draws, in the same order, as the torch path."""
        import numpy as np

        from lungxray._augment_kernel import augment

        n, _, h, w = x.shape
        warp = None
        if geometry:
            theta, contrast, brightness = self._geometry_draws(n)
            warp = (theta[:, :2].contiguous().numpy(), contrast.numpy(), brightness.numpy())
        look = None
        if self.cfg.scanner:
            gamma, blur, noise, spread, levels = self._scanner_draws(x)
            look = (gamma.numpy(), blur.numpy(), noise.reshape(n, h, w).numpy(), spread.numpy(), levels.numpy())
        images = x.detach().reshape(n, h, w).contiguous().numpy()
        out = np.empty_like(images)
        augment(images, out, warp, look, np.empty((h + 2, w + 2), dtype=np.float32))
        return torch.from_numpy(out).view(n, 1, h, w)

    def _geometry_draws(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(theta (n, 3, 3) in torch's (x, y) order, contrast (n,), brightness (n,)), on the CPU."""
        # From MONAI's (row, column) order to torch's (x, y), padded to 3x3, here on the CPU: MONAI
        # would do both on the batch's device from small tensors it makes on the CPU, and each copy
        # of those waits for every kernel queued on the GPU.
        theta = self.theta(n)[:, [1, 0]][:, :, [1, 0, 2]]
        theta = torch.cat([theta, torch.tensor([0.0, 0.0, 1.0]).expand(n, 1, 3)], dim=1)  # (n, 3, 3)
        return theta, 1 + self._uniform(n, self.cfg.contrast), self._uniform(n, self.cfg.brightness)

    def _scanner_draws(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(gamma, blur, noise (B, 1, H, W) on ``x``'s device, spread, levels), the others (B,) on the CPU."""
        n = len(x)
        gamma = torch.exp(self._uniform(n, 1.0) * 0.5 * math.log(2.0)).clamp(0.7, 1.4)
        blur = self._uniform(n, 1.0)  # > 0 blurs, < 0 sharpens
        noise = self._noise(x)  # (B, 1, H, W)
        spread = torch.rand(n, generator=self.generator) * 0.03
        levels = torch.randint(16, 257, (n,), generator=self.generator).float() - 1
        return gamma, blur, noise, spread, levels

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Rotation, shift, zoom, brightness and contrast."""
        n = len(x)
        # Brightness and contrast are two tensor operations; a library transform would loop per image.
        theta, contrast, brightness = _to_batch(x, *self._geometry_draws(n))
        out = self._warp(x, theta)  # (B, 1, H, W)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        return ((out - mean) * contrast.view(n, 1, 1, 1) + mean + brightness.view(n, 1, 1, 1)).clamp_(0.0, 1.0)

    def scanner(self, x: torch.Tensor) -> torch.Tensor:
        """Another scanner's or encoder's look, drawn per image: gamma in [0.7, 1.4] (log-uniform),
        blur (up to a 3x3 Gaussian) or sharpening (as much the other way), Gaussian noise with a
        standard deviation up to 0.03, then quantisation to 16..256 grey levels.

        Written as batch tensor operations because MONAI's per-image transforms would loop over
        the batch in Python and draw from the global random state, not the trial's generator."""
        n = len(x)
        gamma, blur, noise, spread, levels = self._scanner_draws(x)
        gamma, blur, spread, levels = (v.view(n, 1, 1, 1) for v in _to_batch(x, gamma, blur, spread, levels))
        out = x.clamp(0.0, 1.0) ** gamma
        blurred = torch.nn.functional.conv2d(
            torch.nn.functional.pad(out, (1, 1, 1, 1), mode="replicate"), self._blur_kernel(x)
        )
        out = out + blur * (blurred - out) + noise * spread
        return (torch.round(out.clamp(0.0, 1.0) * levels) / levels).clamp_(0.0, 1.0)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) standard normal noise. On the CPU from ``generator``; on a GPU from a
        generator there, seeded once from ``generator``: a batch's worth drawn on the CPU and copied
        over would take longer than the step."""
        if x.device.type == "cpu":
            return torch.randn(x.shape, generator=self.generator).to(x.device, x.dtype)
        if self._noise_generator is None or self._noise_generator.device != x.device:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self._noise_generator = torch.Generator(x.device).manual_seed(seed)
        return torch.randn(x.shape, generator=self._noise_generator, device=x.device, dtype=x.dtype)

    def _blur_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 1, 3, 3) Gaussian blur on ``x``'s device, made there once."""
        key = (x.device, x.dtype)
        if key not in self._kernels:
            kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype) / 16
            self._kernels[key] = kernel.view(1, 1, 3, 3).to(x.device)
        return self._kernels[key]


def _to_batch(x: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
    """CPU tensors ``values`` on ``x``'s device, in its dtype. On a GPU in one non-blocking copy from
    pinned memory: a plain copy from the CPU waits for every kernel queued before it."""
    if x.device.type == "cpu":
        return [v.to(x.dtype) for v in values]
    flat = torch.cat([v.reshape(-1) for v in values]).to(x.dtype).pin_memory().to(x.device, non_blocking=True)
    return [part.view(v.shape) for part, v in zip(flat.split([v.numel() for v in values]), values, strict=True)]
