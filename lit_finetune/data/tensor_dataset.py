"""In-memory uint8 image datasets that build and augment whole batches at once.

A small image dataset fits in one uint8 tensor. Fetching a batch is then one indexing op,
one float conversion and one vectorised augmentation, instead of a PIL round trip per image.
The dataset implements ``__getitems__`` so that ``DataLoader`` hands it the whole list of
indices of a batch; :func:`collate_batched` passes the ready batch through.

The tensor may live on an accelerator (:meth:`TensorImageDataset.to`): batches are then built
there, and all that crosses from the host per batch is one small asynchronous copy of the
batch's indices and augmentation draws (from pinned memory, so the training step never waits
for it). The random draws stay on the CPU generator either way, so a batch is the same on
every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, RandomSampler


def to_signed_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (the GAN/VAE convention used by every module)."""
    return images.float().div_(127.5).sub_(1.0)


def draw_shifts(n: int, max_shift: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image offsets ``(dy, dx)`` in ``[0, 2 * max_shift]`` (padded coordinates) for :func:`translate`."""
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return dy, dx


def translate(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image by its own offset, zero-padding (value -1): one pad and two gathers, on any device."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    arange_h = torch.arange(h, device=images.device)
    arange_w = torch.arange(w, device=images.device)
    rows = (dy[:, None] + arange_h)[:, None, :, None].expand(n, c, h, padded.shape[3])
    cols = (dx[:, None] + arange_w)[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def draw_flips(n: int, generator: torch.Generator) -> torch.Tensor:
    """Which images of a batch :func:`hflip` mirrors: a random half."""
    return torch.rand(n, generator=generator) < 0.5


def hflip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images where ``flip`` is set, left-right."""
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def to_device_async(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` (a small CPU tensor) on ``device`` without waiting for it: through pinned memory on CUDA.

    PyTorch's caching host allocator keeps the pinned block alive until the copy has run, so this is
    safe to call every batch; a copy from pageable memory would wait for the GPU's queue to drain.
    """
    if device.type == "cpu":
        return values
    if device.type == "cuda":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


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

    @property
    def device(self) -> torch.device:
        """Where the images are kept and batches are built."""
        return self.images.device

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """Keep the images and labels on ``device`` (in place; returns ``self``): batches are built there."""
        device = torch.device(device)
        if self.images.device != device:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        n, shift = len(index), self.max_shift if self.augment else 0
        # the batch's indices and augmentation draws, one row each, from the CPU generator on every device
        rows = [index]
        if self.augment:
            epoch = getattr(indices, "epoch", 0)
            generator = torch.Generator().manual_seed(hash((self.seed, epoch, *index.tolist())) & 0x7FFF_FFFF_FFFF)
            if shift > 0:
                rows += draw_shifts(n, shift, generator)
            if self.hflip:
                rows.append(draw_flips(n, generator).long())
        draws = to_device_async(torch.stack(rows), self.device)  # one small copy per batch
        index = draws[0]
        x = to_signed_float(self.images[index])
        if shift > 0:
            x = translate(x, draws[1], draws[2], shift)
        if self.augment and self.hflip:
            x = hflip(x, draws[-1].bool())
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
