"""Which training steps Lightning writes to the loggers, for code that skips logging the others."""

from __future__ import annotations

import lightning as L


def lightning_writes_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this training step's ``self.log`` values to the loggers.

    It writes step metrics only every ``log_every_n_steps`` batches (and on a step where the fit
    stops); a value logged on another step is recorded for nothing, and each ``self.log`` key costs
    Lightning about 0.3 ms on a CPU. No public API says which steps those are: this reads the
    logger connector's flag and answers ``True`` (log every step) if a Lightning version lacks it.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def train_step_values_read(trainer: L.Trainer | None, batch_idx: int, global_step: int, prog_bar: bool = False) -> bool:
    """Whether anything reads the values a ``training_step`` logs at this batch.

    Read are: the steps Lightning writes to the loggers (:func:`lightning_writes_step`), every step of
    ``fast_dev_run``, the last batch of an epoch (epoch-end callbacks such as ``EarlyStopping`` see
    ``trainer.callback_metrics``), the last step of ``max_steps``, and, for a ``prog_bar`` value, every
    step while a progress bar draws it. Outside a Trainer everything is read.
    """
    if trainer is None:
        return True
    return bool(
        lightning_writes_step(trainer)
        or trainer.fast_dev_run
        or trainer.is_last_batch
        or batch_idx + 1 >= trainer.num_training_batches  # the last batch under limit_train_batches too
        or 0 < trainer.max_steps <= global_step + 1
        or (prog_bar and trainer.progress_bar_callback is not None)
    )
