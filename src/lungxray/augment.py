"""Training-batch augmentation: small random rotation, shift, zoom, brightness and contrast, and
(``--scanner-augment``) the look of other scanners: gamma, blur or sharpening, noise, quantisation.

Parameters are drawn per image from the caller's ``torch.Generator`` (so trials trained side by
side in threads stay reproducible from their seed); the warp of the whole batch is MONAI's
``AffineTransform`` (one ``grid_sample`` call). Used on the training split only; holds no model code.
"""

from __future__ import annotations

import math

import torch

from lungxray.config import AugmentConfig


class BatchAugment:
    """``augment(x)``: (B, 1, H, W) in [0, 1] -> a randomly changed copy, same shape and range."""

    def __init__(self, cfg: AugmentConfig, generator: torch.Generator) -> None:
        from monai.networks.layers import AffineTransform

        self.cfg = cfg
        self.generator = generator
        # Normalised coordinates ([-1, 1] across the image) so the shift is a share of the side;
        # zeros outside the film, as a radiograph's background is dark.
        self._warp = AffineTransform(normalized=True, mode="bilinear", padding_mode="zeros", align_corners=False)

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
        out = self.geometry(x) if self.cfg.enabled is not False else x  # off only with scanner alone
        return self.scanner(out) if self.cfg.scanner else out

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Rotation, shift, zoom, brightness and contrast."""
        n = len(x)
        out = self._warp(x, self.theta(n).to(x.device, x.dtype))  # (B, 1, H, W)
        # Brightness and contrast are two tensor operations; a library transform would loop per image.
        contrast = (1 + self._uniform(n, self.cfg.contrast)).view(n, 1, 1, 1).to(x.device, x.dtype)
        brightness = self._uniform(n, self.cfg.brightness).view(n, 1, 1, 1).to(x.device, x.dtype)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        return ((out - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)

    def scanner(self, x: torch.Tensor) -> torch.Tensor:
        """Another scanner's or encoder's look, drawn per image: gamma in [0.7, 1.4] (log-uniform),
        blur (up to a 3x3 Gaussian) or sharpening (as much the other way), Gaussian noise with a
        standard deviation up to 0.03, then quantisation to 16..256 grey levels.

        Written as batch tensor operations because MONAI's per-image transforms would loop over
        the batch in Python and draw from the global random state, not the trial's generator."""
        n = len(x)

        def per_image(values: torch.Tensor) -> torch.Tensor:
            return values.view(n, 1, 1, 1).to(x.device, x.dtype)

        gamma = per_image(torch.exp(self._uniform(n, 1.0) * 0.5 * math.log(2.0)).clamp(0.7, 1.4))
        out = x.clamp(0.0, 1.0) ** gamma
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=x.device, dtype=x.dtype) / 16
        blurred = torch.nn.functional.conv2d(
            torch.nn.functional.pad(out, (1, 1, 1, 1), mode="replicate"), kernel.view(1, 1, 3, 3)
        )
        out = out + per_image(self._uniform(n, 1.0)) * (blurred - out)  # > 0 blurs, < 0 sharpens
        noise = torch.randn(x.shape, generator=self.generator).to(x.device, x.dtype)
        out = out + noise * per_image(torch.rand(n, generator=self.generator) * 0.03)
        levels = per_image(torch.randint(16, 257, (n,), generator=self.generator).float()) - 1
        return (torch.round(out.clamp(0.0, 1.0) * levels) / levels).clamp_(0.0, 1.0)
