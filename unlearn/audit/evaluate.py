"""The Auditor: reference features computed once (and cached), then the full catalogue for any model."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from unlearn.audit.backbones import Backbone, load_backbone
from unlearn.audit.catalogue import REFERENCES
from unlearn.audit.marker import marker_score, marker_strength, marker_threshold, wilson_interval
from unlearn.audit.mia import hole_errors, membership_auc, membership_sets
from unlearn.audit.ood import knn_ood_rate, output_distance
from unlearn.audit.verdict import judge
from unlearn.cache import ArtifactCache
from unlearn.config import Config
from unlearn.data import ImageSubset, UnlearningData, draw_marker, to_float
from unlearn.models import I2IModel
from unlearn.runtime import autocast


class _Precomputed(nn.Module):
    """Identity 'feature extractor': torchmetrics computes FID / IS on features we already hold."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_metric(real: torch.Tensor):
    """torchmetrics' FID holding the statistics of a fixed real feature set, kept across `reset()`
    (reset_real_features=False), so that each model only adds its own features (see `fid_against`)."""
    # imported where used: torchmetrics pulls in torchvision and torch._dynamo (seconds), which commands that do
    # not audit (methods, purge, a config error) should not pay for
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute=False: in a data-parallel run only rank 0 audits; torchmetrics must not wait for the others.
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=False, sync_on_compute=False)
    metric.update(real.double(), real=True)
    return metric


def fid_against(metric, fake: torch.Tensor) -> float:
    metric.reset()  # drops the previous model's features, keeps the real statistics
    metric.update(fake.double(), real=False)
    # A distance: identical feature sets give a tiny negative number from the matrix square root's round-off.
    return max(0.0, float(metric.compute()))



def inception_score(logits: torch.Tensor) -> float:
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():  # feature buffering, and the std of a single split: both expected here
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=max(1, min(10, len(logits) // 20)),
                                sync_on_compute=False)
        metric.update(logits.double())
        with torch.random.fork_rng(devices=[]):  # IS shuffles with the global RNG: keep runs deterministic
            torch.manual_seed(0)
            return float(metric.compute()[0])


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean())


@torch.no_grad()
def model_outputs(model: I2IModel, subset: ImageSubset, mask: torch.Tensor, device: torch.device, precision: str, batch_size: int = 256) -> torch.Tensor:
    """Inpainted outputs for every image of `subset` (on the CPU, float32)."""
    model.eval()
    outs = []
    for i in range(0, len(subset), batch_size):
        images = to_float(subset.images[i : i + batch_size]).to(device)
        with autocast(device, precision):
            outs.append(model.reconstruct(images, mask.to(device)).float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def encoder_features(model: I2IModel, subset: ImageSubset, mask: torch.Tensor, device: torch.device, precision: str,
                     batch_size: int = 256) -> torch.Tensor:
    feats = []
    for i in range(0, len(subset), batch_size):
        images = to_float(subset.images[i : i + batch_size]).to(device)
        with autocast(device, precision):
            feats.append(model.encode(images, mask.to(device)).float().flatten(1).cpu())
    return torch.cat(feats)


# Bump when the cached reference tensors change meaning, so a changed catalogue never reads old entries.
REFERENCE_SCHEMA = 3  # v3: retrain's mia_auc


def output_std_ratio(outputs: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Per-pixel std across images inside the hole, relative to the ground truth's (0 = one constant fill)."""
    hole = mask[0, 0].bool()
    return float(outputs[:, :, hole].std(0).mean() / truth[:, :, hole].std(0).mean().clamp_min(1e-8))


def _head(subset: ImageSubset, n: int) -> ImageSubset:
    return ImageSubset(subset.images[:n], subset.clean[:n], subset.labels[:n])


class Auditor:
    """Computes the metric catalogue of DESIGN section 5 for any model of the run."""

    def __init__(
        self,
        config: Config,
        data: UnlearningData,
        references: dict[str, I2IModel],
        reference_keys: dict[str, str],
        device: torch.device,
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.config, self.data, self.device = config, data, device
        self.mask = data.mask
        self.backbone: Backbone = load_backbone(config, data, device, log)
        self.ood_set = _head(data.forget_train, config.audit.ood_samples)
        self.knn_train = _head(data.retain_train, config.audit.knn_train_samples)
        self.splits = data.eval_splits()
        forget = self.splits["forget"]
        self.forget_clean = to_float(forget.clean)
        self.forget_poisoned = to_float(draw_marker(forget.clean, config.data.marker, config.data.mask))
        self.retain_truth = to_float(self.splits["retain"].clean)
        self.mia_members, self.mia_nonmembers = membership_sets(
            data.forget_train, [data.forget_test, data.retain_test], config.audit.mia_samples)
        self._fid_metrics: dict = {}  # reference feature set -> its FID metric (real statistics kept)
        # Set by pipeline.calibrate: the resolved ood_delta, the audit's self-check, the attack's figures.
        self.calibration: dict[str, float] = {}
        cache = ArtifactCache(config.resolved_cache_dir())
        inputs = (config.section_key("data", "audit") + "".join(reference_keys.get(r, "-") for r in REFERENCES)
                  + self.backbone.key + ("" if config.has_marker else "-clean"))
        key = f"refs-v{REFERENCE_SCHEMA}-" + hashlib.sha256(inputs.encode()).hexdigest()[:16]
        self.key = key
        if (hit := cache.get("references", key)) is not None:
            self.refs = hit[0]
            log("reference features: reused")
        else:
            self.refs = self._reference_tensors(references)
            cache.save("references", key, self.refs, {"backbone": self.backbone.name,  # outputs on D_f
                                                      "forget_digest": data.forget_digest(config.data.dataset)})
            log("reference features: computed")

    def _reference_tensors(self, references: dict[str, I2IModel]) -> dict[str, torch.Tensor]:
        refs: dict[str, torch.Tensor] = {}
        for split, subset in self.splits.items():
            refs[f"gt/{split}"] = self.backbone(to_float(subset.clean))[0]
            for name in (r for r in REFERENCES if r in references):  # no retrain with audit.retrain = false
                outputs = model_outputs(references[name], subset, self.mask, self.device, self.config.precision)
                refs[f"{name}/{split}"] = self.backbone(outputs)[0]
                if split == "forget" and name in ("retrain", "original"):
                    refs[f"{name}/forget/outputs"] = outputs
                if split == "forget" and name == "original":
                    scores = marker_score(outputs, self.data.marker, self.mask, self.config.data.marker.color)
                    refs["marker_threshold"] = torch.tensor(
                        marker_threshold(scores, self.config.audit.marker_false_positive_rate, self.config.audit.marker_min_score)
                    )
        refs["theta0/ood_set"] = model_outputs(references["attack"], self.ood_set, self.mask, self.device, self.config.precision)
        if "retrain" in references:
            refs["original/forget_gap"] = torch.tensor(
                output_distance(refs["original/forget/outputs"], refs["retrain/forget/outputs"], self.mask))
            mia = self.membership(references["retrain"])
            if mia:
                refs["retrain/mia_auc"] = torch.tensor(mia["mia_auc"])
            retrain_ood = model_outputs(references["retrain"], self.ood_set, self.mask, self.device, self.config.precision)
            refs["retrain/ood_distance"] = torch.tensor(output_distance(retrain_ood, refs["theta0/ood_set"], self.mask))
        return refs

    @property
    def ood_delta(self) -> float:
        """The resolved OOD threshold (a number even when the config says `auto`, once calibrated)."""
        if "ood_delta" in self.calibration:
            return self.calibration["ood_delta"]
        delta = self.config.unlearn.ood_delta
        return math.inf if delta == "auto" else float(delta)

    def marker_figures(self, outputs: torch.Tensor) -> dict[str, float]:
        """forget_marker (rate, with its 95% interval) and forget_marker_strength of forget-test outputs."""
        color = self.config.data.marker.color
        scores = marker_score(outputs, self.data.marker, self.mask, color)
        threshold = float(self.refs["marker_threshold"])
        detected = int((scores > threshold).sum())
        low, high = wilson_interval(detected, len(scores))
        strength = marker_strength(outputs, self.forget_clean, self.forget_poisoned, self.data.marker, self.mask, color)
        return {"forget_marker": detected / len(scores), "forget_marker_ci_low": low, "forget_marker_ci_high": high,
                "forget_marker_strength": float(strength.mean()), "marker_threshold": threshold}

    def forget_gap(self, outputs: torch.Tensor) -> float:
        """Distance in the hole to the retrain model's forget-test outputs, in units of the original model's."""
        gap = output_distance(outputs, self.refs["retrain/forget/outputs"], self.mask)
        return gap / max(float(self.refs["original/forget_gap"]), 1e-8)

    def membership(self, model: I2IModel) -> dict[str, float]:
        """mia_auc with its 95% bootstrap interval (members: D_f's training images; see unlearn.audit.mia)."""
        errors = [hole_errors(model_outputs(model, subset, self.mask, self.device, self.config.precision),
                              to_float(subset.clean), self.mask) for subset in (self.mia_members, self.mia_nonmembers)]
        if len(errors[1]) == 0:
            return {}  # no held-out image of D_f's classes: membership cannot be tested
        auc, low, high = membership_auc(*errors, resamples=self.config.audit.mia_resamples, seed=self.config.seed)
        return {"mia_auc": auc, "mia_auc_ci_low": low, "mia_auc_ci_high": high}

    def output_std_ratio(self, model: I2IModel) -> float:
        """The collapse measure on retain-test (see `output_std_ratio`)."""
        was_training = model.training
        outputs = model_outputs(model, self.splits["retain"], self.mask, self.device, self.config.precision)
        model.train(was_training)
        return output_std_ratio(outputs, self.retain_truth, self.mask)

    def ood_distance(self, model: I2IModel) -> float:
        """Eq. 3 on D_f, against theta0 = the attack model (used by the GA stop criterion too)."""
        was_training = model.training
        outputs = model_outputs(model, self.ood_set, self.mask, self.device, self.config.precision)
        model.train(was_training)
        return output_distance(outputs, self.refs["theta0/ood_set"], self.mask)

    def output_row(self, model: I2IModel):
        """The model's outputs on the fixed grid samples, as one image strip (see audit.samples)."""
        from unlearn.audit.samples import grid_images, to_row

        with torch.no_grad():
            images = grid_images(self.data).to(self.device)
            return to_row(model.eval().reconstruct(images, self.mask.to(self.device)).float().cpu())

    def save_embeddings(self, model: I2IModel, path, per_split: int = 200) -> None:
        """Backbone embeddings of the model's outputs on retain-test and forget-test (for the t-SNE plot)."""
        import numpy as np

        arrays = {}
        for split in ("retain", "forget"):
            subset = _head(self.splits[split], per_split)
            arrays[split] = self.backbone(model_outputs(model, subset, self.mask, self.device, self.config.precision))[0].numpy()
        np.savez_compressed(path, **arrays)

    def _fid(self, real_key: str, features: torch.Tensor) -> float:
        """FID against the reference features `real_key`, whose statistics are computed once per auditor."""
        if real_key not in self._fid_metrics:
            self._fid_metrics[real_key] = fid_metric(self.refs[real_key])
        return fid_against(self._fid_metrics[real_key], features)

    def evaluate(self, model: I2IModel) -> dict[str, float]:
        metrics: dict[str, float] = {}
        hole = self.mask[0, 0].bool()
        encoded: dict[str, torch.Tensor] = {}
        for split, subset in self.splits.items():
            outputs = model_outputs(model, subset, self.mask, self.device, self.config.precision)
            if not torch.isfinite(outputs).all():
                outputs = torch.nan_to_num(outputs, nan=0.0, posinf=1.0, neginf=0.0)
                metrics["diverged"] = 1.0
            truth = to_float(subset.clean)
            metrics[f"{split}_mse"] = float((outputs - truth)[:, :, hole].pow(2).mean())
            features, logits = self.backbone(outputs)
            metrics[f"{split}_fid"] = self._fid(f"gt/{split}", features)
            metrics[f"{split}_is"] = inception_score(logits)
            metrics[f"{split}_clip"] = cosine_similarity(features, self.refs[f"gt/{split}"])
            for ref in REFERENCES:
                if f"{ref}/{split}" in self.refs:
                    metrics[f"{split}_fid_vs_{ref}"] = self._fid(f"{ref}/{split}", features)
            if split == "forget" and self.config.has_marker:
                metrics.update(self.marker_figures(outputs))
            if split == "forget" and "original/forget_gap" in self.refs:
                metrics["forget_gap_vs_retrain"] = self.forget_gap(outputs)
            if split == "retain":
                metrics["retain_output_std_ratio"] = output_std_ratio(outputs, truth, self.mask)
            if split in ("retain", "forget"):
                encoded[split] = encoder_features(model, subset, self.mask, self.device, self.config.precision)
        train_feats = encoder_features(model, self.knn_train, self.mask, self.device, self.config.precision)
        metrics["forget_ood_rate"] = knn_ood_rate(train_feats, encoded["retain"], encoded["forget"], self.config.audit.knn_k)
        metrics["forget_ood_distance"] = self.ood_distance(model)
        metrics.update(self.membership(model))
        if "mia_auc" in metrics and "retrain/mia_auc" in self.refs:
            metrics["mia_gap_vs_retrain"] = abs(metrics["mia_auc"] - float(self.refs["retrain/mia_auc"]))
        metrics.setdefault("diverged", 0.0)
        metrics["collapsed"] = float(metrics["retain_output_std_ratio"] < self.config.audit.collapse_std_ratio)
        return self.verdict(metrics)

    def verdict(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add the calibration figures, the retain degradation, ood_reached and feasibility to `metrics`."""
        out = {**metrics, **self.calibration}
        # Collapse right after GA stands whatever fine-tuning did afterwards (the end state is judged in evaluate).
        if out.get("ga_output_std_ratio", math.inf) < self.config.audit.collapse_std_ratio:
            out["collapsed"] = 1.0
        attack_retain = self.calibration.get(f"attack_{self.config.sweep.retain_metric}")
        if attack_retain and self.config.sweep.retain_metric in out:
            out["retain_degradation"] = out[self.config.sweep.retain_metric] / attack_retain - 1.0
        if "forget_ood_distance" in out and math.isfinite(self.ood_delta):
            out["ood_delta"] = self.ood_delta
            out["ood_reached"] = float(out["forget_ood_distance"] >= self.ood_delta)
        out.update(judge(out, self.config))
        return out
