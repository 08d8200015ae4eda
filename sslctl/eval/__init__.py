"""Evaluations: dataset-ordered feature extraction, re-identification layouts and metrics."""
