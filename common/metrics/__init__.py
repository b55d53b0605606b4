"""Evaluation: FID / IS / precision-recall through stock torch-fidelity, and reconstruction metrics.

- `fidelity`: FID statistics and statistics files, Fréchet distance, Inception Score, precision/recall.
- `inception`: torch-fidelity's Inception from a local weights file, streaming sharded feature extraction.
- `images`: the image sets compute_metrics.py scores (folders, ADM `.npz` batches).
- `reconstruction`: PSNR, SSIM, LPIPS running means, codebook usage and perplexity.
- `shapes`, `shapes_classifier`: the built-in shapes evaluator (class accuracy, Fréchet distance and precision/recall
  in a small shapes classifier's features) and that classifier, trained once and cached.
"""
from common.metrics.fidelity import (FIDStatistics, frechet_distance, inception_score, load_statistics,
                                     precision_recall)
from common.metrics.images import open_images
from common.metrics.inception import (INCEPTION_FILE, INCEPTION_URL, InceptionAccumulator, extract_features,
                                      find_inception_weights, load_inception, write_random_inception_weights)
from common.metrics.reconstruction import (ReconstructionMeter, code_counts, codebook_usage, psnr,
                                           reconstruction_metrics, ssim, usage_from_counts)
from common.metrics.shapes import ShapesEvaluator

__all__ = [
    "FIDStatistics", "frechet_distance", "inception_score", "load_statistics", "precision_recall", "open_images",
    "INCEPTION_FILE", "INCEPTION_URL", "InceptionAccumulator", "extract_features", "find_inception_weights",
    "load_inception", "write_random_inception_weights", "ReconstructionMeter", "code_counts", "codebook_usage",
    "psnr", "reconstruction_metrics", "ssim", "usage_from_counts", "ShapesEvaluator",
]
