"""FID / KID of generated images in the feature space of an in-project Fashion-MNIST classifier.

Train the extractor once: ``lit-finetune fit --config configs/metrics/feature_extractor.yaml``.
"""

from lit_finetune.metrics.diversity import IntraClusterDiversity, intra_cluster_distance
from lit_finetune.metrics.feature_extractor import (
    DEFAULT_EXTRACTOR_PATH,
    EXTRACTOR_COMMAND,
    ExtractorNotFoundError,
    FeatureExtractor,
)
from lit_finetune.metrics.generative import GenerativeMetrics

__all__ = [
    "DEFAULT_EXTRACTOR_PATH",
    "EXTRACTOR_COMMAND",
    "ExtractorNotFoundError",
    "FeatureExtractor",
    "GenerativeMetrics",
    "IntraClusterDiversity",
    "intra_cluster_distance",
]
