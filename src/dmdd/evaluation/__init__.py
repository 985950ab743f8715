"""Evaluation: running a model over a split, the statistics and thresholds fitted without test labels, metrics
and reports. The names below are the public API (``from dmdd.evaluation import evaluate``)."""

from dmdd.evaluation.evaluate import compute_metrics, evaluate, metrics_markdown, write_metrics, write_overlays
from dmdd.evaluation.predictions import Predictions, image_batches, predict_split, preload_images, run_model
from dmdd.evaluation.statistics import fit_map_statistics, fit_teacher_gaussians
from dmdd.evaluation.thresholds import CALIBRATION_STREAM, calibrate, normal_threshold, operating_point

__all__ = ["CALIBRATION_STREAM", "Predictions", "calibrate", "compute_metrics", "evaluate",
           "fit_map_statistics", "fit_teacher_gaussians", "image_batches", "metrics_markdown", "normal_threshold",
           "operating_point", "predict_split", "preload_images", "run_model", "write_metrics", "write_overlays"]
