"""Logger-agnostic image logging: W&B, TensorBoard, and PNG files beside the checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only


def figure_to_array(fig) -> np.ndarray:
    """Render a matplotlib figure to an ``(H, W, 3)`` uint8 array and close it."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    array = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return array


def image_dir(trainer: L.Trainer) -> Path:
    """Where PNGs go: ``<log dir>/images`` (the checkpoint callback's parent when there is one)."""
    if trainer.checkpoint_callback is not None and getattr(trainer.checkpoint_callback, "dirpath", None):
        return Path(trainer.checkpoint_callback.dirpath).parent / "images"
    return Path(trainer.log_dir or trainer.default_root_dir) / "images"


@rank_zero_only
def log_image(trainer: L.Trainer, key: str, image: np.ndarray | torch.Tensor, step: int | None = None) -> Path:
    """Send one image (``(H, W, C)`` uint8 array or ``(C, H, W)`` float tensor in [0, 1]) to every logger.

    Also writes ``<image_dir>/<key>_step<step>.png`` so results survive without any logger.
    """
    from PIL import Image

    if isinstance(image, torch.Tensor):
        image = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:  # isinstance, so subclasses of these loggers get the image too
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HW" if image.ndim == 2 else "HWC")
    path = image_dir(trainer) / f"{key.replace('/', '_')}_step{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
