"""Prediction with cached image embeddings."""

from fmadapt.inference.predictor import Predictor, select_best_mask

__all__ = ["Predictor", "select_best_mask"]
