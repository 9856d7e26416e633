"""Evaluation: metrics, cross-validation and plots."""
