"""scikit-learn's 8x8 handwritten digits: a small real second domain, upsampled to ``image_size``."""

from __future__ import annotations

import numpy as np
import torch

from lit_finetune.data.base import ImageDataModule

#: the held-out test split is fixed, whatever ``seed`` the experiment uses
DIGITS_TEST_FRACTION = 0.3
DIGITS_TEST_SEED = 0


class DigitsDataModule(ImageDataModule):
    """sklearn ``load_digits`` (1,797 images, 10 classes), split 70/30 train/test, stratified.

    Pixel values 0-16 are scaled to 0-255; images are upsampled from 8x8 to ``image_size``
    (28 by default, to match Fashion-MNIST models). Flips are off by default: digits are not
    mirror-symmetric.
    """

    all_class_names = tuple(str(i) for i in range(10))

    def __init__(self, hflip: bool = False, **kwargs) -> None:
        super().__init__(hflip=hflip, **kwargs)

    def read_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        labels = digits.target.astype(np.int64)
        rng = np.random.default_rng(DIGITS_TEST_SEED)
        test = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            test[idx[: int(round(DIGITS_TEST_FRACTION * len(idx)))]] = True
        keep = test if split == "test" else ~test
        return torch.from_numpy(images[keep]).unsqueeze(1), torch.from_numpy(labels[keep])
