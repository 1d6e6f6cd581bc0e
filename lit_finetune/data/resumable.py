"""A ``DataLoader`` that Lightning can checkpoint mid-epoch and resume at the next batch.

Lightning 2.x saves ``state_dict()`` of every training dataloader that has one into the
checkpoint (``loops.fit_loop.combined_loader``) and, when it restarts an unfinished epoch,
calls ``load_state_dict()`` before it iterates again. Without it, a run resumed from a
mid-epoch checkpoint trains the first batches of the epoch a second time and never sees the
last ones. Here the state is the sampler's epoch and the number of batches already handed
out in it; on resume the first ones are skipped as *indices* (no image is loaded or
augmented for them), and the rest come out exactly as in a run that never stopped, because
the order depends only on (seed, epoch) and each batch's augmentation only on the seed, the
epoch and its indices (each batch's indices reach the dataset as an ``EpochBatch``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from torch.utils.data import DataLoader

from lit_finetune.data.tensor_dataset import EpochBatch


class _SkipFirst:
    """Wraps the index sampler; the next iteration drops its first ``skip`` items, later ones none.
    Batches of indices go out as :class:`EpochBatch` of ``epoch`` (the dataset seeds augmentation with it)."""

    def __init__(self, inner: Iterable) -> None:
        self.inner, self.skip, self.epoch = inner, 0, 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]  # the full epoch: Lightning counts resumed batches itself

    def __iter__(self) -> Iterator:
        # a generator: ``skip`` is read at the first draw, not at ``iter()`` (worker iterators call
        # ``iter()`` on their index sampler twice when they start and draw from the second)
        skip, self.skip = self.skip, 0
        for indices in islice(self.inner, skip, None):
            yield EpochBatch(indices, self.epoch) if isinstance(indices, list) else indices


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with ``state_dict``/``load_state_dict`` for exact mid-epoch resumption.

    Same constructor as ``DataLoader`` (so Lightning can rebuild it with a ``DistributedSampler``
    under DDP). The state is ``{"epoch": <sampler epoch or None>, "batches": <batches handed
    out this epoch>}``; the count includes batches skipped on a previous resume, so a second
    resume inside the same epoch lands right too. A loaded state applies to the next
    iteration only, and only if the sampler is still at the saved epoch and the epoch was not
    finished; otherwise the iteration starts from its first batch.

    Iteration starts lazily, at the first ``next()``: Lightning sets the sampler's epoch after
    it calls ``iter()`` on a resumed run, and worker processes would otherwise draw their
    first indices from the previous epoch's order.
    """

    _resume_state: dict[str, Any] | None = None
    _state: dict[str, Any] | None = None
    _skipper: _SkipFirst | None = None

    @property
    def _index_sampler(self):  # noqa: ANN202  (the attribute DataLoader iterators draw indices from)
        inner = super()._index_sampler
        if self._skipper is None or self._skipper.inner is not inner:
            self._skipper = _SkipFirst(inner)
        return self._skipper

    def _sampler_epoch(self) -> int | None:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            epoch = getattr(sampler, "epoch", None)
            if isinstance(epoch, int):
                return epoch
        return None

    def __iter__(self) -> Iterator:
        return self._iterate()

    def _iterate(self) -> Iterator:
        epoch, skip = self._sampler_epoch(), 0
        saved, self._resume_state = self._resume_state, None
        if saved is not None and saved.get("epoch") == epoch and 0 < saved.get("batches", 0) < len(self):
            skip = int(saved["batches"])
        state = self._state = {"epoch": epoch, "batches": skip}
        self._index_sampler.skip = skip
        self._index_sampler.epoch = epoch or 0
        for batch in super().__iter__():
            state["batches"] += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where the current (or last) epoch's iteration stands; plain ints, safe for ``weights_only`` loads."""
        return dict(self._state) if self._state is not None else {"epoch": None, "batches": 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the next iteration after ``state_dict["batches"]`` batches of ``state_dict["epoch"]``."""
        self._resume_state = dict(state_dict)
