"""unlearn: realistic image-to-image machine unlearning (pure PyTorch; no Ray, no MLflow)."""

__version__ = "0.1.0"
