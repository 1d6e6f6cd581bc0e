"""Callbacks shared by every module: freezing, warm-up, image logging, prediction writing."""

from lit_finetune.callbacks.freezing import LayerFreezing
from lit_finetune.callbacks.image_logging import log_image
from lit_finetune.callbacks.prediction_writer import PredictionWriter
from lit_finetune.callbacks.warmup import LRWarmup

__all__ = ["LRWarmup", "LayerFreezing", "PredictionWriter", "log_image"]
