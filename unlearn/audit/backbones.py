"""Pluggable feature backbones for FID / IS / CLIP-similarity.

- `domain`:    a small classifier trained once per data set through the one training loop, cached.
- `inception`: torchmetrics' FID Inception-v3 (local weights file, or downloaded where a network exists).
- `clip`:      an open_clip image tower (local checkpoint file, or a pretrained tag where a network exists).

Every backbone maps images in [0, 1] to (features, logits). Backbones without a classification head
(CLIP) use a nearest-centroid classifier over the training classes as logits for the Inception Score.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unlearn.cache import ArtifactCache
from unlearn.config import Config
from unlearn.data import BatchStream, ImageSubset, UnlearningData, to_float
from unlearn.errors import ConfigError
from unlearn.methods.loop import Phase, StepContext, run_phases

logger = logging.getLogger(__name__)


class DomainClassifier(nn.Module):
    def __init__(self, num_classes: int, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, feature_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images)
        return features, self.head(features)


def _classify(ctx: StepContext, batches: dict) -> torch.Tensor:
    images, _, labels = batches["train"]
    return F.cross_entropy(ctx.model(images)[1], labels)


class Backbone:
    """Images in [0, 1] -> (features, logits), evaluated in batches without gradients."""

    def __init__(self, name: str, forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], key: str) -> None:
        self.name, self._forward, self.key = name, forward, key

    # Images per forward: at most 256, and at most 8 MB of float input (10 images at 256 px). A backbone's first
    # activations are ~10x its input (the domain classifier: 32 channels at full size), so an 85-image evaluation
    # batch of 256-px images went through it at 1.5 GB.
    CHUNK_BYTES = 8 * 2**20

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = [], []
        batch_size = max(1, min(256, self.CHUNK_BYTES // max(1, 4 * images[0].numel()))) if len(images) else 1
        for i in range(0, len(images), batch_size):
            f, lg = self._forward(images[i : i + batch_size])
            feats.append(f.float().cpu())
            logits.append(lg.float().cpu())
        return torch.cat(feats), torch.cat(logits)


def _domain(config: Config, data: UnlearningData, device: torch.device) -> Backbone:
    cache = ArtifactCache(config.resolved_cache_dir())
    key = f"domain-{config.section_key('data')}-{config.audit.domain_epochs}"
    model = DomainClassifier(len(data.class_names))
    if (hit := cache.get("backbones", key)) is not None:
        model.load_state_dict(hit[0])
        logger.info(f"backbone domain: reused {key}")
    else:
        torch.manual_seed(config.seed)
        train = data.clean_training_set()
        model.to(device)
        steps = config.audit.domain_epochs * math.ceil(len(train) / 64)
        stream = BatchStream(train, 64, config.seed + 7, device=device)
        ctx = StepContext(model=model, mask=data.mask)
        run_phases(model, [Phase("domain", _classify, ("train",), steps, 2e-3)], {"train": stream}, ctx, clip_norm=10.0)
        test = ImageSubset.concat(data.retain_test, data.forget_test)
        correct = 0
        with torch.no_grad():
            for rows, images in test.batches():
                correct += int((model(to_float(images).to(device))[1].argmax(1).cpu() == test.labels[rows]).sum())
        accuracy = correct / len(test)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        cache.save("backbones", key, state, {"backbone": "domain", "test_accuracy": accuracy,  # trained on D_f too
                                             "forget_digest": data.forget_digest(config.data.dataset)})
        logger.info(f"backbone domain: trained, test accuracy {accuracy:.3f}")
    model.to(device).eval()
    return Backbone("domain", lambda x: model(x.to(device)), key)


def _centroid_logits(features: Callable[[torch.Tensor], torch.Tensor], data: UnlearningData, device: torch.device,
                     cache: ArtifactCache, key: str, digest: str):
    """A nearest-centroid classifier (cosine, CLIP-style temperature 100) over the training classes; the centroids
    are summed batch by batch over the clean training set once per setup and cached."""
    if (hit := cache.get("backbones", key)) is not None:
        centroids = hit[0]["centroids"].to(device)
    else:
        train = data.clean_training_set()
        sums = None
        with torch.no_grad():
            for rows, images in train.batches(128):
                feats = F.normalize(features(to_float(images).to(device)).float(), dim=1).cpu()
                if sums is None:
                    sums = torch.zeros(len(data.class_names), feats.shape[1])
                sums.index_add_(0, train.labels[rows], feats)
        centroids = F.normalize(sums, dim=1)  # the normalised mean (a class without images: zeros)
        cache.save("backbones", key, {"centroids": centroids},
                   {"backbone": "clip-centroids", "forget_digest": digest})  # from D_f's images too
        centroids = centroids.to(device)
    return lambda f: 100.0 * F.normalize(f.float(), dim=1) @ centroids.T


def _file_key(path: str) -> str:
    """The weights file's content digest: reference features cached for one file are never reused for another
    file at the same path."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).expanduser().open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# What building a backbone from a weights file (or a download) raises when the file or the network is the problem:
# an unreadable or foreign file (OSError, UnpicklingError), weights of another architecture (RuntimeError, KeyError,
# ValueError), no network (OSError). Anything else is a bug and is raised as itself.
WEIGHT_ERRORS = (OSError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError)


def _inception(config: Config, device: torch.device) -> Backbone:
    from torchmetrics.image.fid import NoTrainInceptionV3

    weights = config.audit.backbone_weights
    if weights and not Path(weights).expanduser().is_file():
        raise ConfigError(f"inception weights not found: {weights} (audit.backbone_weights)")
    if weights:
        # torch-fidelity unpickles the file in full (weights_only=False): load it weights-only first, so a file that
        # would run code is refused here, and the full load that follows can only build what this one accepted
        try:
            torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - refused or unreadable: either way not a weights file
            raise ConfigError(f"inception weights {weights} do not load weights-only ({type(exc).__name__}); "
                              "give a state dict (audit.backbone_weights)") from None
    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(Path(weights).expanduser()) if weights else None,
        )
    except WEIGHT_ERRORS as exc:  # weights that do not fit, or a download that failed (no file given): not a bug
        raise ConfigError(f"cannot load Inception weights ({type(exc).__name__}); "
                          "give a local file with audit.backbone_weights") from None
    net.to(device).eval()

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the public forward returns only the first feature of features_list: both come from the inner forward
        feats, logits = net._torch_fidelity_forward((x.clamp(0, 1) * 255).to(torch.uint8).to(device))
        return feats.reshape(len(x), -1), logits.reshape(len(x), -1)

    return Backbone("inception", forward, f"inception-{_file_key(weights) if weights else 'download'}")


def _clip(config: Config, data: UnlearningData, device: torch.device) -> Backbone:
    import open_clip

    weights = config.audit.backbone_weights
    if weights and not Path(weights).expanduser().is_file():
        raise ConfigError(f"CLIP checkpoint not found: {weights} (audit.backbone_weights)")
    try:
        model = open_clip.create_model(config.audit.clip_model,
                                       pretrained=str(Path(weights).expanduser()) if weights else "openai")
    except WEIGHT_ERRORS as exc:
        raise ConfigError(f"cannot load CLIP model {config.audit.clip_model} "
                          f"({type(exc).__name__}: {exc})".splitlines()[0]) from None
    model.to(device).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.to(device), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        return model.encode_image((x - mean) / std)

    key = f"clip-{config.audit.clip_model}-{_file_key(weights) if weights else 'openai'}"
    logits = _centroid_logits(embed, data, device, ArtifactCache(config.resolved_cache_dir()),
                              f"{key}-centroids-{config.section_key('data')}", data.forget_digest(config.data.dataset))
    return Backbone("clip", lambda x: (f := embed(x), logits(f)), key)


def load_backbone(config: Config, data: UnlearningData, device: torch.device) -> Backbone:
    name = config.audit.backbone
    if name == "domain":
        return _domain(config, data, device)
    if name == "inception":
        return _inception(config, device)
    if name == "clip":
        return _clip(config, data, device)
    raise ConfigError(f"unknown backbone {name!r}; backbones: domain, inception, clip")
