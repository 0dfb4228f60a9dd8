"""Evaluation of multi-exit models: accuracy, early-exit trade-offs and computational cost."""
