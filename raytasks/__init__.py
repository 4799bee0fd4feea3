"""Ray Train workers, the Ray Tune + Optuna sweep and its MLflow tracking (imports Ray and MLflow)."""
