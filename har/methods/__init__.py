"""Training methods that are not a loss: Mixup / Manifold Mixup and the decoupled second stage (cRT, LWS, tau-norm)."""
