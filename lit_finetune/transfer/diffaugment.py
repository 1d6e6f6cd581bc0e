"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

With few training images a discriminator memorises them and GAN training collapses. DiffAugment
augments every image the discriminator sees, real and fake, in the discriminator step *and*
the generator step, with transforms that are differentiable so the generator's gradient flows
through them. Augmenting reals only would teach the generator to produce augmented images;
augmenting only in the D step would leave G optimising against a D that never saw its images
unaugmented. The ops and their ranges follow the official implementation
(mit-han-lab/data-efficient-gans, ``DiffAugment_pytorch.py``):

* ``color``: brightness ``x + U(-0.5, 0.5)``, saturation ``(x - mean_c) * U(0, 2) + mean_c``
  (a no-op on one channel), contrast ``(x - mean_chw) * U(0.5, 1.5) + mean_chw``;
* ``translation``: a shift by up to ``round(translation_ratio * size)`` pixels in each
  direction, the uncovered border filled with ``fill``;
* ``cutout``: a ``round(cutout_ratio * size)`` square set to ``fill``, its centre anywhere in
  the image (so it may be clipped by the border, as in the official code).

Every random parameter is drawn per image. Written here rather than taken from a library:
torchvision's transforms draw one parameter set per call (the whole batch shares it) and are
not all differentiable, and kornia is not a dependency.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPS: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "translation": ("translation",),
    "cutout": ("cutout",),
}


class DiffAugment(nn.Module):
    """Random differentiable augmentation of a batch of [-1, 1] images, sampled per image.

    The GAN module applies the same ``DiffAugment`` to real and fake images in both the
    discriminator and the generator step; it is applied whenever called (train or eval mode).

    Args:
        policy: comma-separated ops from ``color``, ``translation``, ``cutout`` (or a sequence of
            them), applied in that order; ``""`` is the identity.
        translation_ratio: largest shift as a fraction of the image side (official: 1/8).
        cutout_ratio: side of the cut-out square as a fraction of the image side (official: 1/2).
        fill: value of uncovered and cut-out pixels. The official code uses 0, which is mid-grey
            for [-1, 1] images; the default -1 is the black background of Fashion-MNIST, so the
            filled pixels look like background. Pass 0.0 to match the official code.

    ``forward(x, generator=None)``: ``x`` (B, C, H, W) of any float dtype and device (bf16
    under autocast included) -> a tensor of the same shape, dtype and device. ``generator``
    (a ``torch.Generator`` on any device) makes the draw reproducible; without it the global
    RNG of ``x``'s device is used.
    """

    def __init__(
        self,
        policy: str | Sequence[str] = "color,translation,cutout",
        translation_ratio: float = 0.125,
        cutout_ratio: float = 0.5,
        fill: float = -1.0,
    ) -> None:
        super().__init__()
        names = [p.strip() for p in (policy.split(",") if isinstance(policy, str) else policy) if p.strip()]
        unknown = [p for p in names if p not in OPS]
        if unknown:
            raise ValueError(f"DiffAugment: unknown policy {unknown}; choose from {sorted(OPS)}")
        if not 0.0 <= translation_ratio <= 1.0 or not 0.0 <= cutout_ratio <= 1.0:
            raise ValueError(
                f"DiffAugment: ratios must lie in [0, 1], got translation_ratio={translation_ratio}, "
                f"cutout_ratio={cutout_ratio}"
            )
        self.policy = tuple(names)
        self.translation_ratio = translation_ratio
        self.cutout_ratio = cutout_ratio
        self.fill = fill

    def extra_repr(self) -> str:
        return (
            f"policy={','.join(self.policy)!r}, translation_ratio={self.translation_ratio}, "
            f"cutout_ratio={self.cutout_ratio}, fill={self.fill}"
        )

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"DiffAugment: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        for name in self.policy:
            for op in OPS[name]:
                x = getattr(self, f"_{op}")(x, generator)
        return x

    # Random draws: on the generator's device (a CPU generator cannot fill a CUDA tensor), then
    # moved to x's; float32 so that a bf16 input does not coarsen the distribution.

    @staticmethod
    def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """U(0, 1) per image, shaped (B, 1, 1, 1) in x's dtype."""
        device = generator.device if generator is not None else x.device
        u = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=device)
        return u.to(device=x.device, dtype=x.dtype)

    @staticmethod
    def _randint(x: torch.Tensor, low: int, high: int, generator: torch.Generator | None) -> torch.Tensor:
        """Integers in [low, high) per image, shaped (B, 1)."""
        device = generator.device if generator is not None else x.device
        return torch.randint(low, high, (x.shape[0], 1), generator=generator, device=device).to(x.device)

    def _brightness(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return x + (self._uniform(x, generator) - 0.5)

    def _saturation(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        return (x - mean) * (self._uniform(x, generator) * 2) + mean

    def _contrast(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (self._uniform(x, generator) + 0.5) + mean

    def _translation(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, c, h, w = x.shape
        max_y, max_x = int(h * self.translation_ratio + 0.5), int(w * self.translation_ratio + 0.5)
        if max_y == 0 and max_x == 0:
            return x
        shift_y = self._randint(x, -max_y, max_y + 1, generator)
        shift_x = self._randint(x, -max_x, max_x + 1, generator)
        # Output pixel (i, j) reads input (i + shift_y, j + shift_x); reads from outside the
        # image land on the one-pixel border of fill values (the official clamp-and-pad trick).
        padded = F.pad(x, (1, 1, 1, 1), value=self.fill)
        rows = (torch.arange(h, device=x.device) + shift_y + 1).clamp(0, h + 1)  # (B, H)
        cols = (torch.arange(w, device=x.device) + shift_x + 1).clamp(0, w + 1)  # (B, W)
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2))
        return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))

    def _cutout(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        size_y, size_x = int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5)
        if size_y == 0 or size_x == 0:
            return x
        # Centre drawn as in the official code: anywhere in the image (one more position for
        # even sizes), so the square may be clipped by the border.
        top = self._randint(x, 0, h + (1 - size_y % 2), generator) - size_y // 2
        left = self._randint(x, 0, w + (1 - size_x % 2), generator) - size_x // 2
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_rows = (rows >= top) & (rows < top + size_y)  # (B, H)
        in_cols = (cols >= left) & (cols < left + size_x)  # (B, W)
        mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (B, 1, H, W)
        return x.masked_fill(mask, self.fill)
