"""Callbacks shared by every module: freezing, warm-up, LR logging, image logging, prediction writing."""

from lit_finetune.callbacks.freezing import LayerFreezing
from lit_finetune.callbacks.image_logging import log_image
from lit_finetune.callbacks.lr_monitor import AppliedLRMonitor
from lit_finetune.callbacks.prediction_writer import PredictionWriter
from lit_finetune.callbacks.warmup import LRWarmup

__all__ = ["AppliedLRMonitor", "LRWarmup", "LayerFreezing", "PredictionWriter", "log_image"]
