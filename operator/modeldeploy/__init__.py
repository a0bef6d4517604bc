"""modeldeploy: deploy models on NVIDIA Triton with progressive, metric-gated rollouts."""

__version__ = "0.1.0"
