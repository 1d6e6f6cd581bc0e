"""N-way K-shot episodes drawn from the splits of any :class:`ImageDataModule`, for meta-learning.

An episode picks ``ways`` classes of a split, relabels them ``0..ways-1`` in a random order, and draws
``shots`` support and ``queries`` query images of each (no image twice in an episode). Which classes,
which order and which images depend only on ``(seed, epoch, episode index)``, so two runs with the same
seed see the same episodes, a resumed run continues with the episodes it would have seen, and each DDP
rank (Lightning's ``DistributedSampler`` splits the episode indices) gets its own. Training episodes come
from the wrapped datamodule's training split only (its validation images are held out by its own
``val_split``), validation episodes from its validation split (the same episodes every epoch), test
episodes from its test split.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_finetune.data.base import ImageDataModule
from lit_finetune.data.resumable import ResumableDataLoader
from lit_finetune.data.tensor_dataset import EpochBatch, EpochSeededRandomSampler, TensorImageDataset, collate_batched

#: ``(support images (E, N*K, C, H, W), support labels (E, N*K), query images (E, N*Q, C, H, W), query labels (E, N*Q))``
Episodes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class EpisodeDataset(Dataset):
    """``episodes`` N-way K-shot episodes over a :class:`TensorImageDataset`; item ``i`` is episode ``i``.

    Like :class:`TensorImageDataset` it builds whole batches (``__getitems__``): a batch of episode indices
    becomes one :data:`Episodes` tuple stacked over the episodes. Support and query images are ordered by
    episode label (``shots`` of label 0, then of label 1...). Augmentation, if the image dataset has it, is
    the image dataset's (seeded by the epoch and the images drawn).

    Args:
        images: the split to draw from (its labels are the datamodule's ``0..k-1``).
        ways, shots, queries: classes per episode, support and query images per class.
        episodes: episodes per epoch (the dataset's length).
        seed: seeds every draw (with the epoch and the episode index).
        fixed: the same episodes every epoch (validation, test): the epoch is ignored.
    """

    def __init__(
        self, images: TensorImageDataset, ways: int, shots: int, queries: int, episodes: int, seed: int = 0,
        fixed: bool = False,
    ) -> None:  # fmt: skip
        if min(ways, shots, episodes) < 1 or queries < 0:
            raise ValueError(
                f"need ways, shots, episodes >= 1 and queries >= 0; got ways={ways}, shots={shots}, "
                f"queries={queries}, episodes={episodes}"
            )
        self.images, self.ways, self.shots, self.queries = images, ways, shots, queries
        self.episodes, self.seed, self.fixed = episodes, seed, fixed
        labels = images.labels
        self.classes = labels.unique().tolist()
        self.pools = {c: (labels == c).nonzero().flatten() for c in self.classes}
        if ways > len(self.classes):
            raise ValueError(
                f"{ways}-way episodes need {ways} classes, the split has {len(self.classes)}; lower ways or add classes."
            )
        short = {c: len(p) for c, p in self.pools.items() if len(p) < shots + queries}
        if short:
            raise ValueError(
                f"episodes need shots + queries = {shots + queries} images per class; classes {short} (label: images) "
                "have fewer in this split. Lower shots/queries or the datamodule's val_split."
            )

    def __len__(self) -> int:
        return self.episodes

    def episode_indices(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(support indices, query indices, classes)`` of episode ``index``: indices into ``images``; the
        datamodule labels of the classes, in episode-label order (class ``classes[j]`` is relabelled ``j``)."""
        epoch = 0 if self.fixed else epoch
        generator = torch.Generator().manual_seed(hash((self.seed, epoch, int(index))) & 0x7FFF_FFFF_FFFF)
        order = torch.randperm(len(self.classes), generator=generator)[: self.ways].tolist()
        classes = [self.classes[i] for i in order]
        support, query = [], []
        for c in classes:
            pool = self.pools[c]
            picked = pool[torch.randperm(len(pool), generator=generator)[: self.shots + self.queries]]
            support.append(picked[: self.shots])
            query.append(picked[self.shots :])
        return torch.cat(support), torch.cat(query), classes

    def __getitem__(self, index: int) -> Episodes:
        sx, sy, qx, qy = self.__getitems__([index])
        return sx[0], sy[0], qx[0], qy[0]

    def __getitems__(self, indices: Sequence[int]) -> Episodes:
        epoch = getattr(indices, "epoch", 0)
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        for index in indices:
            support, query, _ = self.episode_indices(index, epoch)
            for k, (idx, per_class) in enumerate(((support, self.shots), (query, self.queries))):
                x, _ = self.images.__getitems__(EpochBatch(idx.tolist(), 0 if self.fixed else epoch))
                parts[2 * k].append(x)
                parts[2 * k + 1].append(torch.arange(self.ways).repeat_interleave(per_class))
        return tuple(torch.stack(p) for p in parts)  # type: ignore[return-value]


class EpisodicDataModule(L.LightningDataModule):
    """N-way K-shot episodes from the splits of an :class:`ImageDataModule` (meta-learning's data).

    The wrapped datamodule says what the images are (dataset, classes, validation split, size, channels,
    augmentation, seed) exactly as for supervised training; this one only says how they are grouped. A
    training batch is ``meta_batch_size`` episodes (one outer step of :class:`~lit_finetune.MetaPretrainer`),
    as an :data:`Episodes` tuple. ``num_classes`` is ``ways``: the head of an episode has one output per way.

    Args:
        dataset: e.g. ``FashionMNISTDataModule(classes=[0, 1, 2, 3, 4])``; its ``batch_size`` is not used.
        ways: classes per episode (N).
        shots: support images per class (K).
        queries: query images per class.
        episodes_per_epoch: training episodes per epoch (new ones every epoch).
        meta_batch_size: episodes per training batch (per outer step).
        val_episodes: validation episodes (the same every epoch), from the validation split.
        test_episodes: test episodes, from the test split.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        dataset: ImageDataModule,
        ways: int = 5,
        shots: int = 5,
        queries: int = 5,
        episodes_per_epoch: int = 500,
        meta_batch_size: int = 5,
        val_episodes: int = 50,
        test_episodes: int = 100,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(dataset, ImageDataModule):
            raise TypeError(f"dataset must be an ImageDataModule (e.g. FashionMNISTDataModule), got {type(dataset).__name__}")
        if meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}")
        self.dataset = dataset
        self.ways, self.shots, self.queries = ways, shots, queries
        self.episodes_per_epoch, self.meta_batch_size = episodes_per_epoch, meta_batch_size
        self.val_episodes, self.test_episodes, self.num_workers = val_episodes, test_episodes, num_workers
        self.train_set: EpisodeDataset | None = None
        self.val_set: EpisodeDataset | None = None
        self.test_set: EpisodeDataset | None = None

    # -- what the CLI links into the model --------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.ways

    @property
    def channels(self) -> int:
        return self.dataset.channels

    @property
    def image_size(self) -> int:
        return self.dataset.image_size

    @property
    def seed(self) -> int:
        return self.dataset.seed

    # -- building -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.dataset.prepare_data()

    def _episodes(self, images: TensorImageDataset | None, episodes: int, fixed: bool) -> EpisodeDataset:
        assert images is not None
        return EpisodeDataset(images, self.ways, self.shots, self.queries, episodes, self.seed, fixed=fixed)

    def setup(self, stage: str | None = None) -> None:
        self.dataset.setup(stage)
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.train_set = self._episodes(self.dataset.train_set, self.episodes_per_epoch, fixed=False)
            if self.val_episodes > 0 and self.dataset.val_set is not None and len(self.dataset.val_set):
                self.val_set = self._episodes(self.dataset.val_set, self.val_episodes, fixed=True)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._episodes(self.dataset.test_set, self.test_episodes, fixed=True)

    def _loader(self, episodes: EpisodeDataset | None, train: bool, name: str) -> DataLoader:
        if episodes is None:
            raise RuntimeError(f"{type(self).__name__} has no {name} episodes (setup not run, or val_episodes=0).")
        loader_class = ResumableDataLoader if train else DataLoader  # training resumes mid-epoch, as in the base
        return loader_class(
            episodes,
            batch_size=self.meta_batch_size,
            sampler=EpochSeededRandomSampler(episodes, self.seed) if train else None,
            collate_fn=collate_batched,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True, name="training")

    def val_dataloader(self) -> DataLoader | list:
        # no validation split (val_split=0) or val_episodes=0: an empty list, which Lightning skips
        return [] if self.val_set is None else self._loader(self.val_set, train=False, name="validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False, name="test")
