"""Training: the loop, the learning-rate schedule, checkpoints and resume."""
