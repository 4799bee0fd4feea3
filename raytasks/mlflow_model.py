"""The MLflow pyfunc of an unlearned model, logged "from code": loading it runs this file, never unpickles.

The model's `bundle` artifact is the folder `unlearn run --out` writes (weights, config.yaml, metrics.json,
certificate.md). predict: float images (N, 3, H, W) in [0, 1] -> the inpainted images, with the mask of the
config the model was unlearned with.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class UnlearnedModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from unlearn.data.masks import inpaint_mask
        from unlearn.export import load_saved, model_folder
        from unlearn.models import build_model

        config, folder = load_saved(context.artifacts["bundle"])
        self.model = build_model(config)
        self.model.load_weights(model_folder(folder))
        self.model.eval()
        self.mask = inpaint_mask(config.data.image_size, config.data.mask)

    # No type hints here: MLflow would read them as an input schema (and warn that an array is not list[...]).
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import numpy as np
        import torch

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model.reconstruct(images, self.mask).numpy()


mlflow.models.set_model(UnlearnedModel())
