"""In-memory uint8 image datasets that build and augment whole batches at once.

A small image dataset fits in one uint8 tensor. Fetching a batch is then one indexing op,
one float conversion and one vectorised augmentation, instead of a PIL round trip per image.
The dataset implements ``__getitems__`` so that ``DataLoader`` hands it the whole list of
indices of a batch; :func:`collate_batched` passes the ready batch through.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, RandomSampler


def to_signed_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (the GAN/VAE convention used by every module)."""
    return images.float().div_(127.5).sub_(1.0)


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random offset in [-max_shift, max_shift], zero-padding (value -1).

    torchvision's v2 transforms draw one set of random parameters per call, so a batch would
    share a single crop; per-image offsets are done here with one gather instead.
    """
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, padded.shape[3])
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class EpochBatch(list):
    """A batch's indices and the epoch they were drawn in, as the training loader hands them to the dataset.

    The epoch travels with the indices (not as a dataset attribute) so worker processes, persistent
    ones included, see it too.
    """

    def __init__(self, indices: Sequence[int], epoch: int) -> None:
        super().__init__(indices)
        self.epoch = epoch

    def __reduce__(self):  # noqa: ANN204  (to worker processes: the indices and the epoch)
        return EpochBatch, (list(self), self.epoch)


class TensorImageDataset(Dataset):
    """``(image, label)`` pairs from a uint8 ``(N, C, H, W)`` tensor, batched and augmented in one go.

    Augmentation randomness is drawn from a generator seeded by ``seed``, the epoch and the batch's
    indices, so an image is augmented differently every epoch (also with ``batch_size=1``), yet the
    same batch of the same epoch is augmented the same way on every run, with any worker count, and
    after resuming from a checkpoint. The epoch comes with the indices (an :class:`EpochBatch`, from
    :class:`~lit_finetune.data.ResumableDataLoader`); plain indices count as epoch 0.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: bool = False,
        hflip: bool = True,
        max_shift: int = 2,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W); got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.augment, self.hflip, self.max_shift, self.seed = augment, hflip, max_shift, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        x = to_signed_float(self.images[index])
        if self.augment:
            epoch = getattr(indices, "epoch", 0)
            generator = torch.Generator().manual_seed(hash((self.seed, epoch, *index.tolist())) & 0x7FFF_FFFF_FFFF)
            x = random_translate(x, self.max_shift, generator)
            if self.hflip:
                x = random_hflip(x, generator)
        return x, self.labels[index]


def collate_batched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a batch."""
    return batch


class EpochSeededRandomSampler(RandomSampler):
    """A ``RandomSampler`` whose order depends only on ``seed`` and the epoch.

    Lightning calls ``set_epoch`` on samplers every epoch, so a run resumed from a checkpoint
    sees the same order as one that never stopped. It stays a ``RandomSampler`` so that under
    DDP Lightning swaps in its own (also epoch-seeded) ``DistributedSampler``.
    """

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()
