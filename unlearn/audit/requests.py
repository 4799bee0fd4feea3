"""The earlier requests of a chain, re-checked on every later model (`unlearn request`).

Request k of a chain unlearns its own images from the model that honoured requests 1..k-1. Each earlier request j is
audited again on the new model, on its own images: membership (`mia_auc` of F_j's training images against held-out
images of their classes, with the paired interval against this setup's retrain reference, which never saw any of the
chain's images) and, where F_j carried the marker in theta0's training data, the '+' strength (with its bootstrap
interval and the paired interval against retrain). The verdict (`unlearn.audit.verdict.regressions`) judges whether
this model brought any of them back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from unlearn.audit.catalogue import request_figure
from unlearn.audit.marker import MarkerTally
from unlearn.audit.mia import membership_sets
from unlearn.data import ImageSubset

if TYPE_CHECKING:  # the Auditor imports this module
    from unlearn.audit.evaluate import Auditor
    from unlearn.models import I2IModel

def _bootstrap_rows(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def mean_interval(values: torch.Tensor, resamples: int, seed: int) -> tuple[float, float]:
    """95% bootstrap interval of the mean of per-image values."""
    means = values.double().numpy()[_bootstrap_rows(len(values), resamples, seed)].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def paired_mean_interval(values: torch.Tensor, reference: torch.Tensor, resamples: int, seed: int) -> tuple[float, float]:
    """95% interval of mean(values) - mean(reference) over the same resamples of the same images (paired)."""
    difference = (values.double() - reference.double()).numpy()
    means = difference[_bootstrap_rows(len(difference), resamples, seed)].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


class EarlierRequests:
    """The earlier requests' audit sets (index lists: nothing is read here) and their figures for any model."""

    def __init__(self, auditor: Auditor) -> None:
        self.auditor = auditor
        data, limit = auditor.data, auditor.config.audit.mia_samples
        # members: F_j's images; non-members: held-out (retain-test) images of F_j's classes, which hold no image of
        # any request
        self.sets = [(request, *membership_sets(request, [data.retain_test], limit)) for request in data.earlier]

    def __len__(self) -> int:
        return len(self.sets)

    def marked(self, number: int) -> bool:
        """Whether request `number` carried the marker in theta0's training data (its marker is audited)."""
        return self.sets[number - 1][0].poison is not None

    def _errors(self, model: I2IModel, members: ImageSubset, nonmembers: ImageSubset) -> tuple[torch.Tensor, torch.Tensor]:
        return self.auditor.membership_errors(model, (members, nonmembers))

    def strengths(self, model: I2IModel, request: ImageSubset) -> torch.Tensor:
        """Per-image '+' strength of the model's outputs on a request's images (0: the clean ground truth, 1: the '+')."""
        a = self.auditor
        tally = MarkerTally(a.data.marker, a.mask, a.config.data.marker, a.config.data.mask)
        for _, images, _, outputs in a.outputs(model, request.clean_view()):
            tally(outputs, images)
        return tally.strengths()

    def reference_arrays(self, retrain: I2IModel) -> dict[str, torch.Tensor]:
        """The retrain reference's per-image figures on every earlier request (the paired intervals' other side)."""
        refs: dict[str, torch.Tensor] = {}
        for number, (request, members, nonmembers) in enumerate(self.sets, 1):
            member_errors, nonmember_errors = self._errors(retrain, members, nonmembers)
            refs[f"retrain/request{number}/mia_member_errors"] = member_errors.double()
            refs[f"retrain/request{number}/mia_nonmember_errors"] = nonmember_errors.double()
            if request.poison is not None:
                refs[f"retrain/request{number}/marker_strengths"] = self.strengths(retrain, request).double()
        return refs

    def figures(self, model: I2IModel) -> dict[str, float]:
        """`request<j>_*` for every earlier request j, and `earlier_requests` (how many were re-checked)."""
        a = self.auditor
        resamples, seed = a.config.audit.mia_resamples, a.config.seed
        out: dict[str, float] = {"earlier_requests": float(len(self.sets))}
        for number, (request, members, nonmembers) in enumerate(self.sets, 1):
            reference = f"retrain/request{number}"
            membership = a.membership(model, self._errors(model, members, nonmembers),
                                      reference=reference if f"{reference}/mia_member_errors" in a.refs else None)
            out.update({request_figure(number, k): v for k, v in membership.items() if k != "mia_gap_vs_retrain"})
            if not self.marked(number):
                continue
            strengths = self.strengths(model, request)
            low, high = mean_interval(strengths, resamples, seed)
            out.update({request_figure(number, "marker_strength"): float(strengths.double().mean()),
                        request_figure(number, "marker_strength_ci_low"): low,
                        request_figure(number, "marker_strength_ci_high"): high})
            if f"{reference}/marker_strengths" in a.refs:
                gap_low, gap_high = paired_mean_interval(strengths, a.refs[f"{reference}/marker_strengths"], resamples, seed)
                out.update({request_figure(number, "marker_gap_vs_retrain_ci_low"): gap_low,
                            request_figure(number, "marker_gap_vs_retrain_ci_high"): gap_high})
        return out
