"""The feature space of the generative metrics: a Fashion-MNIST classifier's penultimate layer.

FID and KID are distances between feature distributions; which features decides what they
measure. Inception-v3 (the usual choice) needs ImageNet weights and a network, and 28x28
grayscale images say little to it. Here the features come from an :class:`ImageClassifier`
trained on all ten Fashion-MNIST classes, so numbers are comparable inside this project only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch import nn

from lit_finetune.nets.resnet import ResNetClassifierNet
from lit_finetune.transfer.peft import merge_into_state
from lit_finetune.transfer.pretrained import PretrainedLoadError, load_checkpoint_file
from lit_finetune.zoo import resolve_source

#: the command that trains the extractor (``configs/metrics/feature_extractor.yaml``)
EXTRACTOR_COMMAND = "lit-finetune fit --config configs/metrics/feature_extractor.yaml"
#: where that command writes it (relative to the directory it is run from)
DEFAULT_EXTRACTOR_PATH = "runs/metrics/feature_extractor/checkpoints/best.ckpt"


class ExtractorNotFoundError(FileNotFoundError):
    """The feature extractor's checkpoint is missing; the message names the command that makes it."""


class FeatureExtractor(nn.Module):
    """Penultimate features and class logits of a trained classifier, frozen.

    A measuring instrument, not a model to train: it is always in ``eval()`` mode (``train()``
    does not change that, so BatchNorm statistics never move), its parameters have
    ``requires_grad=False``, and it runs without autograd and without autocast (float32
    features even inside a ``bf16-mixed`` run, so covariances keep their precision).

    Inputs are ``[-1, 1]`` float images ``(B, C, H, W)`` as everywhere in the package. Images of
    another size or channel count than the classifier's are converted first, the way the
    datamodules convert files: RGB to grayscale with ``rgb_to_grayscale`` (ITU-R 601 weights),
    grayscale to RGB by repeating the channel, and a bilinear, antialiased resize to the
    classifier's square ``image_size`` (non-square images are stretched).

    It meets torchmetrics' contract for a custom ``feature`` module (``num_features`` and a
    forward returning ``(B, num_features)``), so ``FrechetInceptionDistance(feature=extractor)``
    works directly; :class:`~lit_finetune.metrics.GenerativeMetrics` is the packaged use.

    Args:
        classifier: a trained classifier: an :class:`~lit_finetune.ImageClassifier` or a
            :class:`~lit_finetune.nets.ResNetClassifierNet` (anything with ``backbone``, a linear
            ``head``, ``normalize_input``, ``in_channels`` and ``image_size``); used as it is.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features: int = classifier.head.in_features
        self.num_classes: int = classifier.head.out_features
        self.in_channels: int = classifier.in_channels
        self.image_size: int = classifier.image_size
        self.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_checkpoint(cls, path: str | Path = DEFAULT_EXTRACTOR_PATH) -> FeatureExtractor:
        """Build the extractor from a checkpoint written by ``EXTRACTOR_COMMAND`` (read with ``weights_only=True``)
        or a ``zoo:`` name (``zoo:fashion-mnist/feature-extractor``)."""
        path = Path(resolve_source(path, role="feature_extractor"))
        if not path.is_file():
            raise ExtractorNotFoundError(
                f"Feature extractor checkpoint {str(path)!r} not found. FID/KID need it; train it once "
                f"(a few minutes on a CPU) with\n    {EXTRACTOR_COMMAND}\nwhich writes {DEFAULT_EXTRACTOR_PATH} "
                "under the directory it runs in, then point the metric's extractor path at that file; or pass "
                "zoo:fashion-mnist/feature-extractor (built once, cached)."
            )
        # The network only, rebuilt from the checkpoint's hyper-parameters: the metrics need no LightningModule
        # (and importing one here would tie the metrics package to the modules that use it)
        checkpoint = load_checkpoint_file(path, role="The feature extractor")
        hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
        if "num_classes" not in hparams or "state_dict" not in checkpoint:
            raise PretrainedLoadError(
                f"{str(path)!r} is not a classifier checkpoint written by lit-finetune (no hyper-parameters); "
                f"train the extractor with\n    {EXTRACTOR_COMMAND}"
            )
        net = ResNetClassifierNet(
            hparams["num_classes"], hparams.get("backbone", "resnet_small"), hparams.get("in_channels", 1),
            hparams.get("image_size", 28), hparams.get("small_input"),
        )  # fmt: skip
        wanted = net.state_dict().keys()
        state, _ = merge_into_state(checkpoint["state_dict"])  # a PEFT classifier's updates folded into its weights
        net.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)
        return cls(net)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever the caller (e.g. a parent module's ``train()``) asks."""
        return super().train(False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` images -> float32 images on the extractor's device, in its channels and size."""
        if x.ndim != 4 or x.shape[1] not in (1, 3, self.in_channels):
            raise ValueError(f"expected images (B, C, H, W) with C in (1, 3); got {tuple(x.shape)}")
        param = next(self.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        if x.shape[1] != self.in_channels:
            # in [0, 1], as the datamodules convert (uint8): black stays black
            x = TF.rgb_to_grayscale(x * 0.5 + 0.5) * 2 - 1 if self.in_channels == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = TF.resize(x, [self.image_size, self.image_size], antialias=True)
        return x

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features ``(B, num_features)`` of ``[-1, 1]`` images."""
        x = self.prepare(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.classifier.backbone(self.classifier.normalize_input(x))

    @torch.no_grad()
    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` from features returned by :meth:`forward`."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.classifier.head(features)  # dropout is the identity in eval mode

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of ``[-1, 1]`` images (Fashion-MNIST class ids 0-9)."""
        return self.classify_features(self(x))
