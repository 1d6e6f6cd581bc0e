"""Callbacks shared by every module: freezing, warm-up, LR logging, sample images, image logging, predictions."""

from lit_finetune.callbacks.channels_last import ChannelsLast
from lit_finetune.callbacks.freezing import LayerFreezing
from lit_finetune.callbacks.image_logging import log_image
from lit_finetune.callbacks.lr_monitor import AppliedLRMonitor
from lit_finetune.callbacks.prediction_writer import PredictionWriter
from lit_finetune.callbacks.sample_images import SampleImages
from lit_finetune.callbacks.warmup import LRWarmup

__all__ = [
    "AppliedLRMonitor",
    "ChannelsLast",
    "LRWarmup",
    "LayerFreezing",
    "PredictionWriter",
    "SampleImages",
    "log_image",
]
