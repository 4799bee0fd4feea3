"""Loss-based membership inference (Yeom et al. 2018), the audit every unlearning benchmark reports.

Score = minus the per-sample masked reconstruction error against the clean image: a model that still
remembers its training images fills their holes better than those of held-out images of the same classes.
`mia_auc` is the ROC AUC of members (D_f's training images) against non-members; 0.5 = cannot tell them apart.
"""

from __future__ import annotations

import numpy as np
import torch

from unlearn.data import ImageSubset


def hole_errors(outputs: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE inside the hole (N,)."""
    hole = mask[0, 0].bool()
    return (outputs - clean)[:, :, hole].pow(2).mean(dim=(1, 2))


def _scores(member_errors: torch.Tensor, nonmember_errors: torch.Tensor) -> np.ndarray:
    """Membership scores, members first: minus the error (members are predicted by a low error)."""
    return -torch.cat([member_errors, nonmember_errors]).double().numpy()


def _resamples(members: int, nonmembers: int, resamples: int, seed: int) -> np.ndarray:
    """Stratified bootstrap rows of indices into [members | non-members]: each row keeps both groups' sizes, members
    first. The same seed gives the same rows, so two models' figures can be resampled together (paired)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.r_[rng.choice(members, members), members + rng.choice(nonmembers, nonmembers)]
                     for _ in range(resamples)])


def membership_auc(member_errors: torch.Tensor, nonmember_errors: torch.Tensor, resamples: int = 200,
                   seed: int = 0) -> tuple[float, float, float]:
    """(AUC, 95% bootstrap interval low, high); members are predicted by a low error."""
    from sklearn.metrics import roc_auc_score  # imported where used (seconds with scikit-learn)

    scores = _scores(member_errors, nonmember_errors)
    labels = np.r_[np.ones(len(member_errors)), np.zeros(len(nonmember_errors))]
    auc = float(roc_auc_score(labels, scores))
    idx = _resamples(len(member_errors), len(nonmember_errors), resamples, seed)
    low, high = np.quantile(ranked_auc(scores[idx], len(member_errors)), [0.025, 0.975])
    return auc, float(low), float(high)


def paired_gap_interval(errors: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                        resamples: int = 200, seed: int = 0) -> tuple[float, float]:
    """95% interval of AUC(this model) - AUC(reference) over the same bootstrap resamples of the same images (a
    paired bootstrap): whether two models differ, which two separate intervals cannot say on a small forget set.
    `errors` and `reference` are (member errors, non-member errors) of the same images in the same order."""
    members = len(errors[0])
    if (len(reference[0]), len(reference[1])) != (members, len(errors[1])):
        raise ValueError("a paired interval needs both models' errors on the same images")
    idx = _resamples(members, len(errors[1]), resamples, seed)
    gaps = ranked_auc(_scores(*errors)[idx], members) - ranked_auc(_scores(*reference)[idx], members)
    low, high = np.quantile(gaps, [0.025, 0.975])
    return float(low), float(high)


def ranked_auc(rows: np.ndarray, positives: int) -> np.ndarray:
    """ROC AUC of each row whose first `positives` entries are the positives: the Mann-Whitney U statistic from
    average ranks (ties count one half, as in roc_auc_score), all rows at once instead of one sklearn call each."""
    from scipy.stats import rankdata

    ranks = rankdata(rows, axis=1)
    negatives = rows.shape[1] - positives
    return (ranks[:, :positives].sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives)


def membership_sets(forget_train: ImageSubset, candidates: list[ImageSubset], limit: int) -> tuple[ImageSubset, ImageSubset]:
    """(members, non-members), both clean (no '+'): D_f's training images, and the held-out test images of D_f's
    classes (class level: forget-test; sample level: those classes' test images), never a training image of D_f.
    At most `limit` each. Index lists into the store: nothing is read here."""
    members = forget_train.clean_view().head(limit)
    classes = forget_train.labels.unique()
    parts = []
    for subset in candidates:
        keep = torch.isin(subset.labels, classes) & ~torch.isin(subset.index, forget_train.index)
        parts.append(subset.clean_view().take(keep))
    return members, ImageSubset.concat(*parts).head(limit)
