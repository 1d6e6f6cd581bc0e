"""DCGAN generator and discriminator (Radford et al. 2016) for 28, 32 and 64 px images.

Both are plain ``nn.Module``s with their stages as named children, so that parameter groups,
L2-SP and freezing address them by name:

* generator: ``embed`` (conditional only), ``project``, ``blocks.0`` ... , ``to_image``;
* discriminator: ``blocks.0`` (input side) ... ``blocks.{n-1}``, ``embed`` (projection only; with
  spectral norm also ``embed_gain``), ``head``, and with ``patch_block`` a patch-level head ``patch_head``
  (+ ``patch_embed``). FreezeD's "freeze the lowest k blocks" is ``blocks.0`` ... ``blocks.{k-1}``.

Widths follow the DCGAN layout: the feature map at resolution ``r`` has
``width * (image_size // 2) // r`` channels: ``width`` channels in the hidden map next to the image,
and each halving of the resolution doubles the channels. Layouts (``w = width``, maps as side/channels):

* 28 px: G 7/2w -> 14/w -> 28/C;  D 28/C -> 14/w -> 7/2w -> logit
* 32 px: G 4/4w -> 8/2w -> 16/w -> 32/C;  D 32/C -> 16/w -> 8/2w -> 4/4w -> logit
* 64 px: G 4/8w -> 8/4w -> 16/2w -> 32/w -> 64/C;  D 64/C -> 32/w -> 16/2w -> 8/4w -> 4/8w -> logit

The discriminator returns logits (no sigmoid): losses in logit form (``softplus``, hinge)
are safe under bf16 autocast, ``Sigmoid`` + ``BCELoss`` are not.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

# image size -> (side of the first / last feature map, number of stride-2 layers)
_LAYOUTS = {28: (7, 2), 32: (4, 3), 64: (4, 4)}
CONDITIONINGS = ("projection", "concat")


def dcgan_init_(module: nn.Module) -> nn.Module:
    """DCGAN initialisation, in place: conv and linear weights ~ N(0, 0.02), BatchNorm weights
    ~ N(1, 0.02), biases 0. Embeddings are left alone (their owners initialise them).

    Returns ``module`` so that it can be chained.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


def _check_layout(image_size: int) -> tuple[int, int]:
    if image_size not in _LAYOUTS:
        raise ValueError(f"image_size must be one of {sorted(_LAYOUTS)}, got {image_size}")
    return _LAYOUTS[image_size]


def _check_labels(y: torch.Tensor | None, num_classes: int | None, batch_size: int, owner: str) -> torch.Tensor | None:
    """``y`` as int64, with clear errors for missing, unexpected, mis-shaped or out-of-range labels."""
    if num_classes is None:
        if y is not None:
            raise ValueError(f"{owner} is unconditional (num_classes=None) but got labels y")
        return None
    if y is None:
        raise ValueError(f"{owner} is class-conditional (num_classes={num_classes}): pass labels y of shape (B,)")
    if y.shape != (batch_size,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{owner}: labels y must be an int64 or int32 tensor of shape ({batch_size},), "
            f"got dtype {y.dtype} and shape {tuple(y.shape)}"
        )
    # An out-of-range index is a device-side assert on CUDA; say what is wrong instead.
    # (Skipped while torch.compile traces: the check would break the graph.)
    if batch_size and not torch.compiler.is_compiling():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{owner}: labels must lie in [0, {num_classes - 1}], got values in [{low}, {high}]")
    return y.long()


class DCGANGenerator(nn.Module):
    """DCGAN generator: ``z`` (B, latent_dim) [and labels ``y`` (B,)] -> images (B, C, H, W) in [-1, 1].

    Args:
        latent_dim: size of the noise vector ``z``.
        image_size: 28, 32 or 64.
        channels: image channels (1 grayscale, 3 RGB).
        width: channels of the widest-resolution hidden map (64 in the DCGAN paper).
        num_classes: makes the generator class-conditional, ``G(z, y)``: a learned label
            embedding (``embed``) is concatenated to ``z``.
        embed_dim: size of that embedding (default ``latent_dim``, so labels weigh as much as
            the noise). Ignored when unconditional.
    """

    #: none: the input is ``z``; ``project``'s dimension 0 is its input, ``to_image``'s output is the image
    input_convs: tuple[str, ...] = ()

    def __init__(
        self,
        latent_dim: int = 100,
        image_size: int = 28,
        channels: int = 1,
        width: int = 64,
        num_classes: int | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        side, n_up = _check_layout(image_size)
        self.latent_dim = latent_dim
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        in_dim = latent_dim
        self.embed: nn.Embedding | None = None
        if num_classes is not None:
            embed_dim = embed_dim or latent_dim
            self.embed = nn.Embedding(num_classes, embed_dim)  # N(0, 1), the scale of z
            in_dim += embed_dim

        # Hidden maps from the first (side x side) to the widest one (image_size / 2).
        widths = [width * 2 ** (n_up - 1 - i) for i in range(n_up)]
        # A transposed conv over a 1x1 input is a linear layer laid out as a feature map.
        self.project = _up_block(in_dim, widths[0], kernel_size=side, stride=1, padding=0)
        self.blocks = nn.Sequential(*(_up_block(c_in, c_out) for c_in, c_out in zip(widths, widths[1:])))
        self.to_image = nn.Sequential(
            OrderedDict(
                conv=nn.ConvTranspose2d(widths[-1], channels, kernel_size=4, stride=2, padding=1),
                tanh=nn.Tanh(),
            )
        )
        dcgan_init_(self)

    def forward(
        self, z: torch.Tensor, y: torch.Tensor | None = None, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Images; with ``return_features`` also the hidden maps (the outputs of ``project`` and of each
        block, from the coarsest to the finest), e.g. for CDC's distance consistency.

        A keyword of ``forward`` rather than a method of its own, so a compiled generator
        (``nn.Module.compile``) runs it compiled too.
        """
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"DCGANGenerator: z must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        y = _check_labels(y, self.num_classes, z.shape[0], "DCGANGenerator")
        if self.embed is not None:
            z = torch.cat([z, self.embed(y).to(z.dtype)], dim=1)
        x = self.project(z[:, :, None, None])
        if not return_features:
            return self.to_image(self.blocks(x))
        features = [x]
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return self.to_image(x), features


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: images (B, C, H, W) [and labels ``y`` (B,)] -> logits (B,).

    Args:
        image_size: 28, 32 or 64; inputs must have exactly this size.
        channels: image channels.
        width: channels of the first block (the widest-resolution map).
        num_classes: makes the discriminator class-conditional, ``D(x, y)``.
        conditioning: ``"projection"`` (Miyato & Koyama 2018: ``logit += <embed(y), features>``)
            or ``"concat"`` (one-hot label maps concatenated to the input channels).
        spectral_norm: spectral normalisation (Miyato et al. 2018) on every conv, linear and
            projection-embedding weight; the blocks then have no BatchNorm, as in SNGAN.
        patch_block: adds a patch-level head on the output of ``blocks[patch_block]`` (e.g. ``-1``,
            the last block), for CDC's anchor-based adversarial loss (Ojha et al. 2021):
            :meth:`patch_logits` gives one logit per position of that map, i.e. per image patch of
            the block's receptive field. The head is a 3x3 convolution to one channel (the reference
            code's ``Extra`` head), plus, with projection conditioning, a per-class projection of the
            map's channels (``patch_embed``, Miyato & Koyama's term at every position). ``None``: no head.

    The first block has no BatchNorm (DCGAN paper); every block ends in LeakyReLU(0.2).
    """

    #: the convolutions that read the input images: the only layers a pretrained load may adapt to
    #: another image channel count (see :func:`~lit_finetune.transfer.load_pretrained`)
    input_convs: tuple[str, ...] = ("blocks.0.conv",)

    def __init__(
        self,
        image_size: int = 28,
        channels: int = 1,
        width: int = 64,
        num_classes: int | None = None,
        conditioning: str = "projection",
        spectral_norm: bool = False,
        patch_block: int | None = None,
    ) -> None:
        super().__init__()
        side, n_down = _check_layout(image_size)
        if patch_block is not None and not -n_down <= patch_block < n_down:
            raise ValueError(
                f"patch_block must index one of the {n_down} discriminator blocks of a {image_size} px image "
                f"({-n_down}..{n_down - 1}), got {patch_block}"
            )
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.conditioning = conditioning if num_classes is not None else None

        in_channels = channels + (num_classes if self.conditioning == "concat" else 0)
        widths = [width * 2**i for i in range(n_down)]
        blocks = [_down_block(in_channels, widths[0], batch_norm=False)]
        blocks += [_down_block(c_in, c_out, batch_norm=not spectral_norm) for c_in, c_out in zip(widths, widths[1:])]
        self.blocks = nn.Sequential(*blocks)
        self.num_features = widths[-1] * side * side
        self.embed: nn.Embedding | None = None
        if self.conditioning == "projection":
            self.embed = nn.Embedding(num_classes, self.num_features)
            # Same scale as the head, so the projection term does not dominate at init.
            nn.init.normal_(self.embed.weight, 0.0, 0.02)
        # A linear layer on the flattened (side x side) map: the DCGAN paper's final valid conv.
        self.head = nn.Linear(self.num_features, 1)
        self.patch_block = None if patch_block is None else patch_block % n_down
        self.patch_head: nn.Conv2d | None = None
        self.patch_embed: nn.Embedding | None = None
        if self.patch_block is not None:
            patch_channels = widths[self.patch_block]
            self.patch_head = nn.Conv2d(patch_channels, 1, kernel_size=3, padding=1)
            if self.conditioning == "projection":
                self.patch_embed = nn.Embedding(num_classes, patch_channels)
                nn.init.normal_(self.patch_embed.weight, 0.0, 0.02)
        dcgan_init_(self)
        #: with spectral norm, a learned factor on the projection term: SN keeps the embedding at spectral norm 1,
        #: so only this factor can start the term at 0 (a conditional D adapted from an unconditional source)
        self.embed_gain: nn.Parameter | None = None
        if spectral_norm:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    _spectral_norm(m)
            if self.embed is not None:
                self.embed_gain = nn.Parameter(torch.ones(()))

    def _check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"DCGANDiscriminator: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(
                f"DCGANDiscriminator: expected {self.channels} input channel(s), got {x.shape[1]} "
                f"(images of shape {tuple(x.shape)})"
            )
        if x.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"DCGANDiscriminator: expected {self.image_size}x{self.image_size} images, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )

    def _input(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Checked images (with the one-hot label maps under ``"concat"``) and checked labels."""
        self._check_images(x)
        y = _check_labels(y, self.num_classes, x.shape[0], "DCGANDiscriminator")
        if self.conditioning == "concat":
            maps = F.one_hot(y, self.num_classes).to(x.dtype)[:, :, None, None]
            x = torch.cat([x, maps.expand(-1, -1, *x.shape[2:])], dim=1)
        return x, y

    def features(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The penultimate features (B, num_features): the last block's map, flattened.

        ``y`` is needed only with ``conditioning="concat"`` (it is part of the input there).
        """
        x, _ = self._input(x, y)
        return torch.flatten(self.blocks(x), 1)

    def patch_logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-level logits (B, h, w): one per position of ``blocks[patch_block]``'s output map."""
        if self.patch_head is None:
            raise ValueError("DCGANDiscriminator has no patch head: build it with patch_block=<block index>, e.g. -1")
        x, y = self._input(x, y)
        h = self.blocks[: self.patch_block + 1](x)
        logits = self.patch_head(h).squeeze(1)
        if self.patch_embed is not None:
            logits = logits + torch.einsum("bc,bchw->bhw", self.patch_embed(y).to(h.dtype), h)
        return logits

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x, y)
        logits = self.head(h).squeeze(1)
        if self.embed is not None:
            projection = (self.embed(y).to(h.dtype) * h).sum(dim=1)
            logits = logits + (projection if self.embed_gain is None else self.embed_gain.to(h.dtype) * projection)
        return logits


def _up_block(c_in: int, c_out: int, kernel_size: int = 4, stride: int = 2, padding: int = 1) -> nn.Sequential:
    """ConvTranspose -> BatchNorm -> ReLU (bias-free conv: BatchNorm has one)."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.ConvTranspose2d(c_in, c_out, kernel_size, stride, padding, bias=False),
            bn=nn.BatchNorm2d(c_out),
            relu=nn.ReLU(inplace=True),
        )
    )


def _down_block(c_in: int, c_out: int, batch_norm: bool) -> nn.Sequential:
    """Stride-2 conv [-> BatchNorm] -> LeakyReLU(0.2)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=not batch_norm)
    )
    if batch_norm:
        layers["bn"] = nn.BatchNorm2d(c_out)
    layers["act"] = nn.LeakyReLU(0.2, inplace=True)
    return nn.Sequential(layers)
