"""Out-of-distribution by kNN on encoder features (Eq. 3's output distance is streamed by the Auditor)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def knn_ood_rate(train: torch.Tensor, calibration: torch.Tensor, query: torch.Tensor, k: int, tpr: float = 0.95) -> float:
    """Share of `query` flagged OOD by the k-th nearest-neighbour distance (Sun et al. 2022).

    Features are L2-normalised; the threshold keeps `tpr` of the in-distribution `calibration` samples.
    """
    def prep(x: torch.Tensor) -> np.ndarray:
        return F.normalize(x.flatten(1).double(), dim=1).numpy()

    k = min(k, len(train))
    from sklearn.neighbors import NearestNeighbors  # imported where used (seconds with scikit-learn)

    index = NearestNeighbors(n_neighbors=k).fit(prep(train))
    threshold = np.quantile(index.kneighbors(prep(calibration))[0][:, -1], tpr)
    return float((index.kneighbors(prep(query))[0][:, -1] > threshold).mean())
