"""Log grids of a generative module's images while it fits: samples, reconstructions, anything."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchvision.utils import make_grid

from lit_finetune.callbacks.image_logging import log_image


class SampleImages(Callback):
    """Every ``every_n_epochs`` training epochs, and once more when ``fit`` ends, log image grids.

    The module says what to draw by implementing ``image_samples(self) -> dict[str, Tensor]``:
    named batches of images, float ``(B, C, H, W)`` in ``[-1, 1]``, e.g.
    ``{"samples": G(fixed_z), "samples_ema": G_ema(fixed_z)}`` for a GAN, or
    ``{"reconstructions": <inputs and outputs interleaved>, "prior_samples": decode(fixed_z)}`` for
    a VAE. Each batch becomes one :func:`torchvision.utils.make_grid` grid (``nrow`` images per row,
    ``[-1, 1]`` mapped to ``[0, 1]``), logged as ``images/<name>`` at the trainer's ``global_step``
    through :func:`~lit_finetune.callbacks.image_logging.log_image`: to W&B and TensorBoard when
    they are the trainer's loggers, and always as ``<log dir>/images/images_<name>_step<N>.png``
    beside the checkpoints (so CSV-only and ``logger=False`` runs keep them too).

    Fixed noise is the module's job: keep it as a buffer drawn once from a fixed seed (e.g.
    ``torch.randn(64, latent_dim, generator=torch.Generator().manual_seed(0))``), so that every grid
    of a run, and of a resumed run, shows the same latent points and grids compare across epochs.

    How ``image_samples`` is called: under ``torch.no_grad()``, with the module in ``eval()`` mode
    (each sub-module's own train/eval mode is restored afterwards, so BatchNorm layers that
    :class:`~lit_finetune.callbacks.LayerFreezing` holds in eval mode stay there), and inside
    :func:`torch.random.fork_rng`, so random draws in it do not change the training run's random
    stream (a run gives the same weights with or without this callback). It runs on every process,
    so strategies that shard weights keep working; only global rank zero logs. At the end of
    ``fit`` Lightning has moved the module to the CPU already, so the last grid is drawn there.

    Fit only: ``validate``, ``test`` and ``predict`` log nothing. A module without ``image_samples``
    stops the fit at its start with a message naming the method to add.

    Args:
        every_n_epochs: log after every n-th training epoch; ``0`` logs only when ``fit`` ends.
        nrow: images per grid row (keep it even for interleaved input/output pairs).
        log_at_fit_end: also log the final grids when ``fit`` ends (skipped when the last epoch
            has just logged them at the same step).
        upscale: enlarge each grid by this integer factor (nearest neighbour, pixels stay sharp), so
            28-pixel samples are large enough to see in a logger or a README.
    """

    def __init__(self, every_n_epochs: int = 1, nrow: int = 8, log_at_fit_end: bool = True, upscale: int = 1) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0: only at the end of fit), got {every_n_epochs}")
        if nrow < 1:
            raise ValueError(f"nrow must be >= 1, got {nrow}")
        if upscale < 1:
            raise ValueError(f"upscale must be an integer >= 1, got {upscale}")
        self.every_n_epochs = every_n_epochs
        self.nrow = nrow
        self.upscale = upscale
        self.log_at_fit_end = log_at_fit_end
        self._last_logged_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not callable(getattr(pl_module, "image_samples", None)):
            raise MisconfigurationException(
                f"SampleImages needs {type(pl_module).__name__} to implement "
                "`def image_samples(self) -> dict[str, torch.Tensor]`, returning named batches of images "
                "(B, C, H, W) in [-1, 1] to log (e.g. {'samples': self.generator(self.fixed_noise)}); "
                "add it, or remove the SampleImages callback."
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.log_grids(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.log_at_fit_end and self._last_logged_step != trainer.global_step:
            self.log_grids(trainer, pl_module)

    def log_grids(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Draw the module's images, log one grid per name, and return the grids (``(3, H, W)`` in [0, 1])."""
        grids = {name: self.make_grid(name, images) for name, images in self._draw(pl_module).items()}
        for name, grid in grids.items():
            log_image(trainer, f"images/{name}", grid, step=trainer.global_step)
        self._last_logged_step = trainer.global_step
        return grids

    def make_grid(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """One ``(3, H, W)`` float grid in ``[0, 1]`` from a ``(B, C, H, W)`` batch in ``[-1, 1]``, upscaled."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            what = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"image_samples()[{name!r}] must be a (B, C, H, W) tensor with C = 1 or 3 in [-1, 1], got {what}."
            )
        grid = make_grid(images.detach().float().cpu(), nrow=self.nrow, normalize=True, value_range=(-1, 1))
        if self.upscale > 1:
            grid = grid.repeat_interleave(self.upscale, dim=1).repeat_interleave(self.upscale, dim=2)
        return grid

    @staticmethod
    def _draw(pl_module: L.LightningModule) -> Mapping[str, torch.Tensor]:
        # per-module modes, not pl_module.train() afterwards: that would also switch frozen BatchNorm to train
        modes = {m: m.training for m in pl_module.modules()}
        device = pl_module.device
        fork_devices = [] if device.type == "cpu" else [device.index or 0]
        try:
            pl_module.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=fork_devices, device_type=device.type):
                samples = pl_module.image_samples()
        finally:
            for module, training in modes.items():
                module.training = training
        if not isinstance(samples, Mapping):
            raise TypeError(
                f"{type(pl_module).__name__}.image_samples() must return a dict of name -> (B, C, H, W) images, "
                f"got {type(samples).__name__}."
            )
        return samples
