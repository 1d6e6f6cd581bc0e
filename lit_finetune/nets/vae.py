"""Convolutional VAE encoder and decoder for 28, 32 and 64 px images (plain ``nn.Module``s)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lit_finetune.nets.dcgan import _check_layout, _down_block, _up_block


class ConvEncoder(nn.Module):
    """Images (B, C, S, S) -> the Gaussian posterior's ``(mu, logvar)``, each (B, latent_dim).

    Stride-2 convolution blocks (``blocks.0`` on the input side), then a linear ``head``: the
    same layout as the DCGAN discriminator, so freezing and parameter groups go by block name.

    Args:
        image_size: 28, 32 or 64.
        channels: image channels.
        latent_dim: size of ``z``.
        width: channels of the first block (doubling per block).
    """

    #: the convolution that reads the images: the only layer a pretrained load may adapt to another channel count
    input_convs: tuple[str, ...] = ("blocks.0.conv",)

    def __init__(self, image_size: int = 28, channels: int = 1, latent_dim: int = 16, width: int = 32) -> None:
        super().__init__()
        side, n_down = _check_layout(image_size)
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        widths = [width * 2**i for i in range(n_down)]
        ins = [channels, *widths[:-1]]
        self.blocks = nn.Sequential(
            *(_down_block(c_in, c_out, batch_norm=i > 0) for i, (c_in, c_out) in enumerate(zip(ins, widths)))
        )
        self.head = nn.Linear(widths[-1] * side * side, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.channels or x.shape[-1] != self.image_size:
            raise ValueError(
                f"ConvEncoder expects images (B, {self.channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        mu, logvar = self.head(self.blocks(x).flatten(1)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """``z`` (B, latent_dim) -> per-pixel logits (B, C, S, S) of the likelihood (see :class:`~lit_finetune.VAE`).

    A linear ``project`` to the smallest feature map, transposed-convolution ``blocks``, and a
    final ``to_image`` transposed convolution (no activation: the module turns logits into a
    likelihood or an image).
    """

    #: none: the input is ``z``; ``to_image`` writes the image, so another channel count there is an error
    input_convs: tuple[str, ...] = ()

    def __init__(self, image_size: int = 28, channels: int = 1, latent_dim: int = 16, width: int = 32) -> None:
        super().__init__()
        side, n_up = _check_layout(image_size)
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        widths = [width * 2 ** (n_up - 1 - i) for i in range(n_up)]
        self.side, self.first = side, widths[0]
        self.project = nn.Sequential(
            OrderedDict(linear=nn.Linear(latent_dim, widths[0] * side * side), relu=nn.ReLU(inplace=True))
        )
        self.blocks = nn.Sequential(*(_up_block(c_in, c_out) for c_in, c_out in zip(widths, widths[1:])))
        self.to_image = nn.ConvTranspose2d(widths[-1], channels, kernel_size=4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"ConvDecoder: z must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        h = self.project(z).view(-1, self.first, self.side, self.side)
        return self.to_image(self.blocks(h))
