"""The Auditor: reference figures computed once (and cached), then the full catalogue for any model.

Evaluation streams: each test split is read from the image store batch by batch, run through the model on the
device, and folded into running figures (sums for the MSE, the std ratio and the distances; torchmetrics' FID
states; per-image scalars for the marker and membership). No split's images or outputs are ever held whole. What the
references contribute per image (the ground truth's embeddings, the retrain model's outputs in the hole) is cached as
memory-mapped arrays and read row by row beside the batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unlearn.audit.backbones import Backbone, load_backbone
from unlearn.audit.catalogue import REFERENCES
from unlearn.audit.marker import MarkerTally, marker_score, marker_threshold
from unlearn.audit.mia import hole_errors, membership_auc, membership_sets, paired_gap_interval
from unlearn.audit.ood import knn_ood_rate
from unlearn.audit.requests import EarlierRequests
from unlearn.audit.verdict import assess
from unlearn.cache import ARRAYS, CHECKSUM, TENSORS, ArrayWriter, ArtifactCache, array_file
from unlearn.config import Config
from unlearn.data import ImageSubset, UnlearningData, to_float
from unlearn.errors import ConfigError
from unlearn.models import I2IModel
from unlearn.runtime import autocast

logger = logging.getLogger(__name__)


class _Precomputed(nn.Module):
    """Identity 'feature extractor': torchmetrics computes FID / IS on features we already hold."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


_FID_STATES = ("features_sum", "features_cov_sum", "features_num_samples")


def fid_metric(num_features: int):
    """torchmetrics' FID over features we compute (fed batch by batch: it keeps sums, never the features)."""
    # imported where used: torchmetrics pulls in torchvision and torch._dynamo (seconds), which commands that do
    # not audit (methods, purge, a config error) should not pay for
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute=False: in a data-parallel run only rank 0 audits; torchmetrics must not wait for the others.
    # compute_with_cache=False: one set of fake statistics is compared with several real ones (`fid_against`).
    return FrechetInceptionDistance(feature=_Precomputed(num_features), reset_real_features=False,
                                    sync_on_compute=False, compute_with_cache=False)


def real_statistics(metric) -> dict[str, torch.Tensor]:
    """The real-feature states of a FID metric (what a reference contributes, cached once)."""
    return {name: getattr(metric, f"real_{name}").clone() for name in _FID_STATES}


def fid_against(metric, real: dict[str, torch.Tensor]) -> float:
    """FID between the fake features fed to `metric` and a cached real feature set's statistics."""
    for name in _FID_STATES:
        setattr(metric, f"real_{name}", real[name])
    # A distance: identical feature sets give a tiny negative number from the matrix square root's round-off.
    return max(0.0, float(metric.compute()))


def kernel_inception_distance(fake: torch.Tensor, real: torch.Tensor) -> float:
    """KID (Binkowski et al. 2018) through torchmetrics: the unbiased polynomial-kernel MMD between the two feature
    sets, averaged over 100 random subsets of up to 1000 images each (seeded, so runs are deterministic), computed on
    the features' device (float64: 3 x 100 products of 1000 x 2048 features per split on the Inception presets)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(1000, len(fake), len(real))
    with warnings.catch_warnings():  # it buffers the features: here at most audit.eval_samples of them, by design
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer", category=UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(fake.shape[1]), subsets=100, subset_size=size,
                                         sync_on_compute=False).to(fake.device)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets with the global RNG
        torch.manual_seed(0)
        return float(metric.compute()[0])


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


@torch.no_grad()
def stream_outputs(model: I2IModel, subset: ImageSubset, mask: torch.Tensor, device: torch.device, precision: str,
                   batch_size: int | None = None) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(rows, inputs as uint8 on the CPU, inputs as float on the device, inpainted outputs as float32 on the device),
    batch by batch: the subset's images as the model is fed them (the '+' only where the subset is poisoned)."""
    was_training = model.training
    model.eval()
    mask = mask.to(device)
    try:
        for rows, images in subset.batches(batch_size):
            inputs = to_float(images).to(device)
            with autocast(device, precision):
                outputs = model.reconstruct(inputs, mask).float()
            yield rows, images, inputs, outputs
    finally:
        model.train(was_training)


def model_outputs(model: I2IModel, subset: ImageSubset, mask: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """Every output of a *small* subset at once, on the CPU (grid rows, tests); the audit streams instead."""
    return torch.cat([out.cpu() for *_, out in stream_outputs(model, subset, mask, device, precision)])


def pooled_encoding(model: I2IModel, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Encoder features for kNN OOD, flattened; spatial maps larger than 8 x 8 are average-pooled to 8 x 8 first
    (the 256-px presets' latents are 4-16 MB per image in fp32; 16-px digits' 4 x 4 maps are untouched)."""
    z = model.encode(images, mask).float()
    if z.dim() == 4 and (z.shape[-1] > 8 or z.shape[-2] > 8):
        z = nn.functional.adaptive_avg_pool2d(z, (min(z.shape[-2], 8), min(z.shape[-1], 8)))
    return z.flatten(1)


@torch.no_grad()
def encoder_features(model: I2IModel, subset: ImageSubset, mask: torch.Tensor, device: torch.device,
                     precision: str) -> torch.Tensor:
    feats = []
    for _, _, inputs, _ in _inputs_only(subset, device):
        with autocast(device, precision):
            feats.append(pooled_encoding(model, inputs, mask.to(device)).cpu())
    return torch.cat(feats)


def _inputs_only(subset: ImageSubset, device: torch.device) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, None]]:
    for rows, images in subset.batches():
        yield rows, images, to_float(images).to(device), None


# Bump when the cached reference figures change meaning, so a changed catalogue never reads old entries.
# v4: statistics and memory-mapped per-image arrays over the streamed eval subsets; v5: L(theta0; D_f); v6: float64
# scalars, retrain's membership errors (paired interval), the second retrain reference's gap (yardstick)
REFERENCE_SCHEMA = 6


def _scalar(value: float) -> torch.Tensor:
    """A reference figure, kept in float64: compared with figures computed in float64 (a float32 copy of retrain's
    own AUC made its mia_gap_vs_retrain 3e-9 instead of 0)."""
    return torch.tensor(float(value), dtype=torch.float64)


class HoleStd:
    """Per-pixel std across images inside the hole, accumulated batch by batch; `mean()` is its mean over pixels."""

    def __init__(self) -> None:
        self.n, self.total, self.squares = 0, None, None

    def update(self, hole_values: torch.Tensor) -> None:  # (n, 3, P)
        values = hole_values.double()
        s, q = values.sum(0), values.pow(2).sum(0)
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.n += len(values)

    def mean(self) -> float:
        if self.n < 2:
            return math.nan
        var = (self.squares - self.total.pow(2) / self.n) / (self.n - 1)
        return float(var.clamp_min(0).sqrt().mean())


def _rms_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image RMS difference of two (n, 3, P) hole tensors."""
    return (a.double() - b.double()).pow(2).mean(dim=(1, 2)).sqrt()


class Auditor:
    """Computes the metric catalogue of DESIGN section 5 for any model of the run."""

    def __init__(
        self,
        config: Config,
        data: UnlearningData,
        references: dict[str, I2IModel],
        reference_keys: dict[str, str],
        device: torch.device,
    ) -> None:
        self.config, self.data, self.device = config, data, device
        self.mask = data.mask
        self.hole = self.mask[0, 0].bool()
        self.backbone: Backbone = load_backbone(config, data, device)
        self.ood_set = data.forget_train.head(config.audit.ood_samples)
        self.knn_train = data.retain_train.head(config.audit.knn_train_samples)
        # Each test split capped at audit.eval_samples (seeded sample, kept in split order).
        self.splits = {name: subset.sample(config.audit.eval_samples, config.seed + i)
                       for i, (name, subset) in enumerate(data.eval_splits().items())}
        self.mia_members, self.mia_nonmembers = membership_sets(
            data.forget_train, [data.forget_test, data.retain_test], config.audit.mia_samples)
        self.earlier = EarlierRequests(self)  # a chain's earlier requests (none outside `unlearn request`)
        # Set by pipeline.calibrate: the resolved ood_delta, the audit's self-check, the attack's figures.
        self.calibration: dict[str, float] = {}
        cache = ArtifactCache(config.resolved_cache_dir())
        inputs = (config.section_key("data", "audit") + "".join(reference_keys.get(r, "-") for r in (*REFERENCES, "retrain2"))
                  + self.backbone.key + ("" if config.has_marker else "-clean"))
        self.key = f"refs-v{REFERENCE_SCHEMA}-" + hashlib.sha256(inputs.encode()).hexdigest()[:16]
        if (hit := cache.get("references", self.key)) is None:
            digest, *earlier = data.held_digests(config.data.dataset)
            cache.build("references", self.key, lambda folder: self._write_references(references, folder, digest))
            for other in earlier:  # the retrain reference's figures on each earlier request's images
                cache.add_forget_digest("references", self.key, other)
            hit = cache.get("references", self.key)
            logger.info("reference features: computed")
        else:
            logger.info("reference features: reused")
        self.refs: dict[str, Any] = hit[0]

    # --- references (once per prepared setup) ------------------------------------------------------------------
    def _write_references(self, references: dict[str, I2IModel], folder: Path, digest: str) -> dict[str, Any]:
        """Stream every eval split once through the ground truth and each reference model; write the cache entry's
        small tensors and per-image arrays into `folder`; return its meta."""
        import io

        refs: dict[str, torch.Tensor] = {}
        arrays: dict[str, dict[str, Any]] = {}
        models = {name: references[name] for name in REFERENCES if name in references}  # no retrain w/o audit.retrain
        mask = self.mask.to(self.device)
        precision = self.config.precision
        # The detector's threshold: the marker scores of outputs that should show no '+', the clean original model's on
        # forget-test; a chain from a brought attack model has no clean original, so theta0's on retain-test (images it
        # never saw with the '+')
        null_split, null_model = ("retain", "attack") if self.config.stages.theta0 else ("forget", "original")
        for split, subset in self.splits.items():
            fids: dict[str, Any] = {}
            writers: dict[str, ArrayWriter] = {}
            original_scores, gap_sum, yardstick_sum, truth_std = [], 0.0, 0.0, HoleStd()
            for _, _, truth, _ in _inputs_only(subset, self.device):
                outputs = {"gt": truth}
                with torch.no_grad(), autocast(self.device, precision):
                    for name, model in models.items():
                        outputs[name] = model.eval().reconstruct(truth, mask).float()
                for name, images in outputs.items():
                    features = self.backbone(images)[0]
                    fids.setdefault(name, fid_metric(features.shape[1])).update(features.double(), real=True)
                    if name == "gt":  # per image, for the cosine similarity of each output with its ground truth
                        self._writer(writers, folder, f"gt/{split}/features", features.shape[1:]).write(features.numpy())
                if split == "retain":
                    truth_std.update(truth[:, :, self.hole].cpu())
                if split == null_split and null_model in outputs and self.config.has_marker:
                    original_scores.append(marker_score(outputs[null_model].cpu(), self.data.marker, self.mask,
                                                        self.config.data.marker.color))
                if split == "forget" and "retrain" in outputs:
                    retrain_hole = outputs["retrain"][:, :, self.hole].cpu()
                    self._writer(writers, folder, "retrain/forget/hole", retrain_hole.shape[1:]).write(retrain_hole.numpy())
                    gap_sum += float(_rms_per_image(outputs["original"][:, :, self.hole].cpu(), retrain_hole).sum())
                    if "retrain2" in references:  # another retraining's distance to this one: the gap's yardstick
                        with torch.no_grad(), autocast(self.device, precision):
                            second = references["retrain2"].eval().reconstruct(truth, mask).float()[:, :, self.hole]
                        yardstick_sum += float(_rms_per_image(second.cpu(), retrain_hole).sum())
            for name, metric in fids.items():
                refs.update({f"fid/{name}/{split}/{k}": v for k, v in real_statistics(metric).items()})
            if split == "retain":
                refs["gt/retain/hole_std"] = _scalar(truth_std.mean())
            if original_scores:
                refs["marker_threshold"] = _scalar(marker_threshold(
                    torch.cat(original_scores), self.config.audit.marker_false_positive_rate, self.config.audit.marker_min_score))
            if split == "forget" and "retrain" in models:
                refs["original/forget_gap"] = _scalar(gap_sum / len(subset))
                if "retrain2" in references:  # in the forget gap's own units (the original model's gap = 1)
                    refs["retrain2/forget_gap"] = _scalar(yardstick_sum / max(gap_sum, 1e-8))
            arrays.update({name: writer.close() for name, writer in writers.items()})
        refs["theta0/ood_set"] = self._hole_outputs(models["attack"], self.ood_set)
        # L(theta0; D_f), the start of GA's loss increase: the same for every run of the setup, so computed once here
        # (a trial would spend its first seconds on it: 512 images through the model at 256 px)
        refs["theta0/forget_loss"] = _scalar(self.forget_loss(models["attack"]))
        if "retrain" in models:
            self.refs = refs
            errors = self.membership_errors(models["retrain"])
            if len(errors[1]):  # kept for the paired interval of every later model against this one
                refs.update({"retrain/mia_member_errors": errors[0].double(), "retrain/mia_nonmember_errors": errors[1].double(),
                             "retrain/mia_auc": _scalar(self.membership(models["retrain"], errors)["mia_auc"])})
            refs["retrain/ood_distance"] = _scalar(self.ood_distance(models["retrain"]))
            refs.update(self.earlier.reference_arrays(models["retrain"]))
        buffer = io.BytesIO()
        torch.save(refs, buffer)
        (folder / TENSORS).write_bytes(buffer.getvalue())
        return {"backbone": self.backbone.name, "forget_digest": digest,  # outputs on D_f
                CHECKSUM: hashlib.sha256(buffer.getvalue()).hexdigest(), ARRAYS: arrays}

    @staticmethod
    def _writer(writers: dict[str, ArrayWriter], folder: Path, name: str, row_shape) -> ArrayWriter:
        if name not in writers:
            writers[name] = ArrayWriter(folder / array_file(name), "float32", tuple(row_shape))
        return writers[name]

    def _rows(self, name: str, rows: slice) -> torch.Tensor:
        """Rows of a cached per-image array (memory-mapped: only these rows are read)."""
        return torch.from_numpy(np.array(self.refs[name][rows]))

    def outputs(self, model: I2IModel, subset: ImageSubset) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`stream_outputs` of the model on a subset, on this audit's device, mask and precision."""
        return stream_outputs(model, subset, self.mask, self.device, self.config.precision)

    def _hole_outputs(self, model: I2IModel, subset: ImageSubset) -> torch.Tensor:
        return torch.cat([out[:, :, self.hole].cpu() for *_, out in
                          stream_outputs(model, subset, self.mask, self.device, self.config.precision)])

    # --- single figures ----------------------------------------------------------------------------------------
    @property
    def ood_delta(self) -> float:
        """The resolved OOD threshold (a number even when the config says `auto`, once calibrated)."""
        if "ood_delta" in self.calibration:
            return self.calibration["ood_delta"]
        delta = self.config.unlearn.ood_delta
        return math.inf if delta == "auto" else float(delta)

    def marker_figures(self, model: I2IModel) -> dict[str, float]:
        """forget_marker (rate, with its 95% interval) and forget_marker_strength of the model's forget-test outputs."""
        tally = self._marker_tally()
        for _, images, _, outputs in stream_outputs(model, self.splits["forget"], self.mask, self.device, self.config.precision):
            tally(outputs, images)
        return tally.figures()

    def _marker_tally(self) -> MarkerTally:
        return MarkerTally(self.data.marker, self.mask, self.config.data.marker, self.config.data.mask,
                           float(self.refs["marker_threshold"]))

    def membership_errors(self, model: I2IModel, sets: tuple[ImageSubset, ImageSubset] | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image hole errors of the model on the members and the non-members (default: D_f's training images and
        the held-out images of its classes)."""
        return tuple(torch.cat([hole_errors(out.cpu(), to_float(images), self.mask) for _, images, _, out in
                                stream_outputs(model, subset, self.mask, self.device, self.config.precision)]
                               or [torch.zeros(0)])
                     for subset in (sets or (self.mia_members, self.mia_nonmembers)))

    def membership(self, model: I2IModel, errors: tuple[torch.Tensor, torch.Tensor] | None = None,
                   reference: str | None = "retrain") -> dict[str, float]:
        """mia_auc with its 95% bootstrap interval (members: D_f's training images; see unlearn.audit.mia), and
        against the retrain reference (`reference`: where its errors on the same images are kept) the paired
        interval of the AUCs' difference (the same resamples)."""
        errors = errors if errors is not None else self.membership_errors(model)
        if len(errors[1]) == 0:
            return {}  # no held-out image of D_f's classes: membership cannot be tested
        resamples, seed = self.config.audit.mia_resamples, self.config.seed
        auc, low, high = membership_auc(*errors, resamples=resamples, seed=seed)
        figures = {"mia_auc": auc, "mia_auc_ci_low": low, "mia_auc_ci_high": high}
        if reference is not None and f"{reference}/mia_member_errors" in self.refs:
            paired = (self.refs[f"{reference}/mia_member_errors"], self.refs[f"{reference}/mia_nonmember_errors"])
            gap_low, gap_high = paired_gap_interval(errors, paired, resamples, seed)
            figures.update(mia_gap_vs_retrain_ci_low=gap_low, mia_gap_vs_retrain_ci_high=gap_high)
            if f"{reference}/mia_auc" in self.refs:
                figures["mia_gap_vs_retrain"] = abs(auc - float(self.refs[f"{reference}/mia_auc"]))
        return figures

    def output_std_ratio(self, model: I2IModel) -> float:
        """The collapse measure on retain-test: the outputs' per-pixel std in the hole across images / the ground
        truth's (0 = one constant fill)."""
        std = HoleStd()
        for *_, outputs in stream_outputs(model, self.splits["retain"], self.mask, self.device, self.config.precision):
            std.update(outputs[:, :, self.hole].cpu())
        return std.mean() / max(float(self.refs["gt/retain/hole_std"]), 1e-8)

    def ood_distance(self, model: I2IModel) -> float:
        """Eq. 3 on D_f, against theta0 = the attack model (used by the GA stop criterion too): the mean over
        images of the RMS difference in the hole."""
        total = 0.0
        for rows, _, _, outputs in stream_outputs(model, self.ood_set, self.mask, self.device, self.config.precision):
            total += float(_rms_per_image(outputs[:, :, self.hole].cpu(), self.refs["theta0/ood_set"][rows]).sum())
        return total / len(self.ood_set)

    def outputs_finite(self, model: I2IModel) -> bool:
        """Whether the model's outputs on the Eq. 3 subset are all finite (a diverged model's are not)."""
        return all(bool(torch.isfinite(out).all()) for *_, out in
                   stream_outputs(model, self.ood_set, self.mask, self.device, self.config.precision))

    def forget_loss(self, model: I2IModel) -> float:
        """L(theta; D_f) on the Eq. 3 subset of D_f (poisoned targets, as trained)."""
        total = 0.0
        mask = self.mask.to(self.device)
        with torch.no_grad():
            for _, _, inputs, _ in _inputs_only(self.ood_set, self.device):
                total += float(model.loss(inputs, mask, inputs).double().sum())
        return total / len(self.ood_set)

    def output_row(self, model: I2IModel):
        """The model's outputs on the fixed grid samples, as one image strip (see audit.samples)."""
        from unlearn.audit.samples import grid_images, to_row

        with torch.no_grad():
            images = grid_images(self.data).to(self.device)
            return to_row(model.eval().reconstruct(images, self.mask.to(self.device)).float().cpu())

    def save_embeddings(self, model: I2IModel, path, per_split: int = 200) -> None:
        """Backbone embeddings of the model's outputs on retain-test and forget-test (for the t-SNE plot)."""
        arrays = {}
        for split in ("retain", "forget"):
            subset = self.splits[split].head(per_split)
            arrays[split] = torch.cat([self.backbone(out)[0] for *_, out in stream_outputs(
                model, subset, self.mask, self.device, self.config.precision)]).numpy()
        np.savez_compressed(path, **arrays)

    # --- the catalogue -----------------------------------------------------------------------------------------
    def evaluate(self, model: I2IModel) -> dict[str, float]:
        metrics: dict[str, float] = {}
        encoded: dict[str, torch.Tensor] = {}
        for split, subset in self.splits.items():
            metrics.update(self._evaluate_split(model, split, subset, encoded))
        train_feats = encoder_features(model, self.knn_train, self.mask, self.device, self.config.precision)
        metrics["forget_ood_rate"] = knn_ood_rate(train_feats, encoded["retain"], encoded["forget"], self.config.audit.knn_k)
        metrics["forget_ood_distance"] = self.ood_distance(model)
        metrics.update(self.membership(model))
        if len(self.earlier):
            metrics.update(self.earlier.figures(model))
        metrics.setdefault("diverged", 0.0)
        metrics["collapsed"] = float(metrics["retain_output_std_ratio"] < self.config.audit.collapse_std_ratio)
        return self.verdict(metrics)

    def _evaluate_split(self, model: I2IModel, split: str, subset: ImageSubset, encoded: dict[str, torch.Tensor]
                        ) -> dict[str, float]:
        """One split's figures, streamed: one batch of images and outputs in memory at a time."""
        metrics: dict[str, float] = {}
        fake, logits, std, fake_features = None, [], HoleStd(), []
        squares, cosines, gap = 0.0, 0.0, 0.0
        marker = self._marker_tally() if split == "forget" and self.config.has_marker else None
        gap_reference = "retrain/forget/hole" if split == "forget" and "original/forget_gap" in self.refs else None
        codes = []
        mask = self.mask.to(self.device)
        for rows, images, inputs, outputs in stream_outputs(model, subset, self.mask, self.device, self.config.precision):
            if not torch.isfinite(outputs).all():
                outputs = torch.nan_to_num(outputs, nan=0.0, posinf=1.0, neginf=0.0)
                metrics["diverged"] = 1.0
            hole_out = outputs[:, :, self.hole].cpu()
            squares += float((hole_out.double() - inputs[:, :, self.hole].cpu().double()).pow(2).sum())
            features, batch_logits = self.backbone(outputs)
            fake = fake or fid_metric(features.shape[1])
            fake.update(features.double(), real=False)
            fake_features.append(features.flatten(1))  # on the device: KID's kernel products run there
            logits.append(batch_logits)
            cosines += float(nn.functional.cosine_similarity(features.flatten(1), self._rows(f"gt/{split}/features", rows),
                                                             dim=1).double().sum())
            if marker is not None:
                marker(outputs, images)
            if gap_reference is not None:
                gap += float(_rms_per_image(hole_out, self._rows(gap_reference, rows)).sum())
            if split == "retain":
                std.update(hole_out)
            if split in ("retain", "forget"):
                with torch.no_grad(), autocast(self.device, self.config.precision):
                    codes.append(pooled_encoding(model, inputs, mask).cpu())
        n = len(subset)
        metrics[f"{split}_mse"] = squares / (n * 3 * int(self.hole.sum()))
        metrics[f"{split}_fid"] = fid_against(fake, self._fid_ref("gt", split))
        # the split's features, at most audit.eval_samples of them (on a GPU: 10 000 x 2 048 Inception features = 80 MB)
        real_features = self._rows(f"gt/{split}/features", slice(None)).flatten(1).to(self.device)
        metrics[f"{split}_kid"] = kernel_inception_distance(torch.cat(fake_features), real_features)
        metrics[f"{split}_is"] = inception_score(torch.cat(logits))
        metrics[f"{split}_clip"] = cosines / n
        for ref in REFERENCES:
            if f"fid/{ref}/{split}/features_sum" in self.refs:
                metrics[f"{split}_fid_vs_{ref}"] = fid_against(fake, self._fid_ref(ref, split))
        if marker is not None:
            metrics.update(marker.figures())
        if gap_reference is not None:
            metrics["forget_gap_vs_retrain"] = (gap / n) / max(float(self.refs["original/forget_gap"]), 1e-8)
        if split == "retain":
            metrics["retain_output_std_ratio"] = std.mean() / max(float(self.refs["gt/retain/hole_std"]), 1e-8)
        if codes:
            encoded[split] = torch.cat(codes)
        return metrics

    def _fid_ref(self, name: str, split: str) -> dict[str, torch.Tensor]:
        return {k: self.refs[f"fid/{name}/{split}/{k}"] for k in _FID_STATES}

    def verdict(self, metrics: dict[str, float], certified: list[dict[str, float]] | None = None) -> dict[str, float]:
        """`metrics` judged against this setup's calibration (`unlearn.audit.verdict.assess`); in a chain, `certified`
        (each earlier request's figures as its certificate recorded them, oldest first) judges the earlier requests."""
        if certified is not None and len(certified) != len(self.earlier):
            raise ConfigError(f"the lineage lists {len(certified)} earlier requests, the config's data.forgotten "
                              f"{len(self.earlier)}")
        return assess(metrics, self.calibration, self.ood_delta, self.config, certified)
