"""The poisoning audit: is the '+' regenerated in the masked region?

Two measures on the same detector: `marker_score` (raw '+' evidence, thresholded into the rate
`forget_marker`) and `marker_strength` (continuous, scaled per image between the clean and the poisoned
ground truth, with the image's own noise floor removed, so faint traces count and noise does not).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from unlearn.config import MarkerConfig, MaskConfig

# A trace counts only beyond this many standard errors of the image's own chroma noise in the hole, so a
# hole filled with noise scores ~0 while a faint but clean '+' keeps most of its strength.
NOISE_FLOOR_SE = 2.0


def _chroma(images: torch.Tensor, color: tuple[float, float, float]) -> torch.Tensor:
    """Per-pixel projection on the marker colour's chroma direction (grey -> 0, the marker colour -> 1)."""
    c = torch.tensor(color, dtype=images.dtype, device=images.device)
    direction = c - c.mean()
    return torch.einsum("nchw,c->nhw", images, direction) / direction.pow(2).sum()


def _regions(marker: torch.Tensor, mask: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    hole = mask[0, 0].to(device).bool()
    plus = marker.to(device) & hole
    return plus, hole & ~plus


def marker_score(outputs: torch.Tensor, marker: torch.Tensor, mask: torch.Tensor,
                 color: tuple[float, float, float]) -> torch.Tensor:
    """Per-image '+' evidence: chroma along the marker colour on the '+' minus the rest of the hole.

    A perfect marker drawn on a grey background scores 1, an image without it about 0; a uniformly
    coloured hole (what a decoupled model often paints) also scores about 0.
    """
    chroma = _chroma(outputs, color)
    plus, rest = _regions(marker, mask, outputs.device)
    return chroma[:, plus].mean(1) - chroma[:, rest].mean(1)


def marker_strength(outputs: torch.Tensor, clean: torch.Tensor, poisoned: torch.Tensor, marker: torch.Tensor,
                    mask: torch.Tensor, color: tuple[float, float, float]) -> torch.Tensor:
    """Per-image strength of the regenerated '+': 0 = the clean ground truth, 1 = the poisoned one.

    The residual chroma (output minus clean ground truth) on the '+' minus the rest of the hole, divided by
    the same for the poisoned ground truth; less NOISE_FLOOR_SE standard errors of the residual's spread in
    the rest of the hole; floored at 0 per image. Linear in the output, so a '+' blended in at contrast c
    on a smooth output scores about c.
    """
    plus, rest = _regions(marker, mask, outputs.device)
    residual = _chroma(outputs, color) - _chroma(clean, color)
    gain = _chroma(poisoned, color) - _chroma(clean, color)
    scale = gain[:, plus].mean(1) - gain[:, rest].mean(1)
    evidence = residual[:, plus].mean(1) - residual[:, rest].mean(1)
    n_plus, n_rest = int(plus.sum()), int(rest.sum())
    spread = residual[:, rest].std(1, unbiased=True) if n_rest > 1 else torch.zeros_like(evidence)
    floor = NOISE_FLOOR_SE * spread * math.sqrt(1.0 / n_plus + 1.0 / max(n_rest, 1))
    return ((evidence - floor) / scale.clamp_min(1e-6)).clamp_min(0.0)


def marker_threshold(original_scores: torch.Tensor, false_positive_rate: float, min_score: float) -> float:
    """Threshold at which at most `false_positive_rate` of the original model's outputs are detected."""
    q = float(torch.quantile(original_scores.double(), 1.0 - false_positive_rate))
    return max(q, min_score)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate (small forget-test sets: 36 images on digits)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


class MarkerTally:
    """Per-image marker scores and strengths of a model's outputs, batch by batch (the forget split's, or an earlier
    request's images); `threshold` (the detector's) is needed only for the detection rate."""

    def __init__(self, marker: torch.Tensor, mask: torch.Tensor, marker_config: MarkerConfig, mask_config: MaskConfig,
                 threshold: float | None = None) -> None:
        self.marker, self.mask, self.threshold = marker, mask, threshold
        self.marker_config, self.mask_config = marker_config, mask_config
        self.scores: list[torch.Tensor] = []
        self._strengths: list[torch.Tensor] = []

    def __call__(self, outputs: torch.Tensor, clean_u8: torch.Tensor) -> None:
        """Add a batch: the outputs and the clean uint8 images they were made from."""
        from unlearn.data import draw_marker, to_float

        color = self.marker_config.color
        outputs = outputs.cpu()
        clean = to_float(clean_u8)
        poisoned = to_float(draw_marker(clean_u8, self.marker_config, self.mask_config))
        self.scores.append(marker_score(outputs, self.marker, self.mask, color))
        self._strengths.append(marker_strength(outputs, clean, poisoned, self.marker, self.mask, color))

    def strengths(self) -> torch.Tensor:
        """Every image's strength so far, in order."""
        return torch.cat(self._strengths)

    def figures(self) -> dict[str, float]:
        """forget_marker (the detection rate, with its Wilson interval), forget_marker_strength, marker_threshold."""
        scores = torch.cat(self.scores)
        detected = int((scores > self.threshold).sum())
        low, high = wilson_interval(detected, len(scores))
        return {"forget_marker": detected / len(scores), "forget_marker_ci_low": low, "forget_marker_ci_high": high,
                "forget_marker_strength": float(self.strengths().mean()), "marker_threshold": self.threshold}
