"""The poisoning audit: is the '+' regenerated in the masked region?"""

from __future__ import annotations

import torch


def marker_score(outputs: torch.Tensor, marker: torch.Tensor, mask: torch.Tensor, color: tuple[float, float, float]) -> torch.Tensor:
    """Per-image '+' evidence: chroma along the marker colour on the '+' minus the rest of the hole.

    A perfect marker drawn on a grey background scores 1, an image without it about 0; a uniformly
    coloured hole (what a decoupled model often paints) also scores about 0.
    """
    c = torch.tensor(color, dtype=outputs.dtype, device=outputs.device)
    direction = c - c.mean()
    chroma = torch.einsum("nchw,c->nhw", outputs, direction) / direction.pow(2).sum()
    hole = mask[0, 0].to(outputs.device).bool()
    plus = marker.to(outputs.device) & hole
    rest = hole & ~plus
    return chroma[:, plus].mean(1) - chroma[:, rest].mean(1)


def marker_threshold(original_scores: torch.Tensor, false_positive_rate: float, min_score: float) -> float:
    """Threshold at which at most `false_positive_rate` of the original model's outputs are detected."""
    q = float(torch.quantile(original_scores.double(), 1.0 - false_positive_rate))
    return max(q, min_score)
