"""Out-of-distribution measures: Eq. 3 output distance to theta0, and kNN OOD on encoder features."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def output_distance(outputs: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> float:
    """d(f_theta(tau(D_f)), f_theta0(tau(D_f))): mean over images of the RMS difference in the hole."""
    hole = mask[0, 0].bool()
    diff = (outputs - reference)[:, :, hole]
    return float(diff.pow(2).mean(dim=(1, 2)).sqrt().mean())


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
