"""Inference: prediction, scoring, ranking scenes by uncertainty, the review page."""
