"""The `inception` and `clip` audit backbones on local weights files in their real on-disk formats, built here
from randomly initialised networks of the real architectures (nothing is downloaded):

- clip: an open_clip checkpoint (`torch.save` of the model's state dict) of a tiny ViT registered under a test
  name; it must be loaded with weights-only unpickling.
- inception: torch-fidelity's FID Inception-v3 state dict (`pt_inception-2015-12-05` format, ~96 MB, ~10 s to build).

A missing or mismatched file is a ConfigError, and through the CLI one line on stderr with exit code 2.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F

from unlearn.audit.backbones import load_backbone
from unlearn.cli import main
from unlearn.config import load_config
from unlearn.data import build_data, to_float
from unlearn.errors import ConfigError
from unlearn.models import build_model

CPU = torch.device("cpu")
TINY_CLIP = "unlearn-test-tiny-vit"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
# Stages small enough that the CLI reaches the backbone in seconds (it loads it after the stages).
TINY_RUN = ["model.width=8", "model.latent_channels=4", "data.max_per_class=20", "stages.epochs=1",
            "stages.attack_epochs=1"]


class _Touch:
    """Unpickling this object creates a file: what a checkpoint carrying code would run under full unpickling."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def _config(tmp_path, *overrides: str):
    return load_config("digits-ae", [f"cache_dir={tmp_path / 'cache'}", "data.max_per_class=20", *overrides])


@pytest.fixture
def tiny_clip(monkeypatch):
    """open_clip with a tiny ViT architecture registered as TINY_CLIP (unregistered after the test)."""
    import open_clip

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_CLIP, TINY_CLIP_CONFIG)
    return open_clip


def _clip_checkpoint(open_clip, path: pathlib.Path, seed: int):
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    torch.save(model.state_dict(), path)
    return model


def test_clip_backbone_embeds_with_the_checkpoints_weights(tmp_path, tiny_clip):
    saved = _clip_checkpoint(tiny_clip, tmp_path / "clip.pt", seed=1)
    other = _clip_checkpoint(tiny_clip, tmp_path / "other.pt", seed=2)
    config = _config(tmp_path, "audit.backbone=clip", f"audit.clip_model={TINY_CLIP}",
                     f"audit.backbone_weights={tmp_path / 'clip.pt'}")
    data = build_data(config.data, config.seed, config.resolved_cache_dir())
    backbone = load_backbone(config, data, CPU)
    assert backbone.name == "clip" and backbone.key.startswith(f"clip-{TINY_CLIP}-")
    # the key (of the reference features cached for this backbone) follows the file's content, not its path
    (tmp_path / "clip.pt").write_bytes((tmp_path / "other.pt").read_bytes())
    assert load_backbone(config, data, CPU).key != backbone.key
    _clip_checkpoint(tiny_clip, tmp_path / "clip.pt", seed=1)
    images = to_float(data.retain_test.head(12).read())
    features, logits = backbone(images)
    assert features.shape == (12, TINY_CLIP_CONFIG["embed_dim"]) and logits.shape == (12, len(data.class_names))
    # the features are the saved model's image embeddings (CLIP preprocessing: resize to its input size, OpenAI
    # normalisation), not those of another initialisation
    mean = torch.tensor(tiny_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tiny_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    x = (F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1) - mean) / std
    with torch.no_grad():
        expected, unrelated = saved.encode_image(x), other.encode_image(x)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(features, unrelated, atol=1e-3)
    # the logits are a nearest-centroid classifier (cosine x 100) over the training classes: averaged over the
    # training images of class c, the logit of c is the largest (the centroid of c is their mean direction)
    train = data.clean_training_set()
    train_logits = backbone(to_float(train.read()))[1]
    assert float(train_logits.abs().max()) <= 100.0 + 1e-3
    per_class = torch.stack([train_logits[train.labels == c].mean(0) for c in range(len(data.class_names))])
    assert torch.equal(per_class.argmax(1), torch.arange(len(data.class_names)))


def test_clip_checkpoint_is_unpickled_weights_only(tmp_path, tiny_clip):
    """A checkpoint that carries an object (here one that creates a file when unpickled) is refused, unrun."""
    _clip_checkpoint(tiny_clip, tmp_path / "clip.pt", seed=1)
    state = torch.load(tmp_path / "clip.pt", weights_only=True)  # the real format loads weights-only
    state["logit_scale"] = _Touch(tmp_path / "executed")
    torch.save(state, tmp_path / "evil.pt")
    config = _config(tmp_path, "audit.backbone=clip", f"audit.clip_model={TINY_CLIP}",
                     f"audit.backbone_weights={tmp_path / 'evil.pt'}")
    with pytest.raises(ConfigError, match="cannot load CLIP model"):
        load_backbone(config, build_data(config.data, config.seed, config.resolved_cache_dir()), CPU)
    assert not (tmp_path / "executed").exists()


def test_clip_checkpoint_of_another_architecture_is_a_config_error(tmp_path, tiny_clip):
    torch.save(build_model(_config(tmp_path)).state_dict(), tmp_path / "ae.pt")  # an inpainting model, not CLIP
    config = _config(tmp_path, "audit.backbone=clip", f"audit.clip_model={TINY_CLIP}",
                     f"audit.backbone_weights={tmp_path / 'ae.pt'}")
    with pytest.raises(ConfigError, match=f"cannot load CLIP model {TINY_CLIP}") as error:
        load_backbone(config, build_data(config.data, config.seed, config.resolved_cache_dir()), CPU)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------- inception


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> pathlib.Path:
    """torch-fidelity's FID Inception-v3 with random weights, saved as the real weights file is: a state dict."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity


    class Unloaded(fidelity.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the architecture only: no weights to load yet
            return None

    download = fidelity.load_state_dict_from_url
    fidelity.load_state_dict_from_url = lambda *args, **kwargs: {}  # never downloads
    try:
        torch.manual_seed(0)
        net = Unloaded("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        fidelity.load_state_dict_from_url = download
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_backbone_gives_pool_features_and_logits(tmp_path, inception_weights):
    config = _config(tmp_path, "audit.backbone=inception", f"audit.backbone_weights={inception_weights}")
    backbone = load_backbone(config, None, CPU)
    images = torch.rand(3, 3, 16, 16)
    features, logits = backbone(images)
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    assert not torch.allclose(features[0], features[1])


def test_inception_weights_file_loads_into_the_backbone(tmp_path, inception_weights):
    """The file is read (weights, not a download): the network holds exactly the file's tensors."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    state = torch.load(inception_weights, weights_only=True)
    config = _config(tmp_path, "audit.backbone=inception", f"audit.backbone_weights={inception_weights}")
    built = []
    original_init = NoTrainInceptionV3.__init__

    def record(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NoTrainInceptionV3, "__init__", record)
        backbone = load_backbone(config, None, CPU)
    assert backbone.name == "inception" and backbone.key.startswith("inception-") and "download" not in backbone.key
    (net,) = built
    loaded = net.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_inception_weights_are_unpickled_weights_only(tmp_path, inception_weights):
    state = torch.load(inception_weights, weights_only=True)
    state["fc.bias"] = _Touch(tmp_path / "executed")
    torch.save(state, tmp_path / "evil.pth")
    config = _config(tmp_path, "audit.backbone=inception", f"audit.backbone_weights={tmp_path / 'evil.pth'}")
    with pytest.raises(ConfigError):
        load_backbone(config, None, CPU)
    assert not (tmp_path / "executed").exists()


def test_inception_weights_of_another_architecture_are_a_config_error(tmp_path):
    torch.save(build_model(_config(tmp_path)).state_dict(), tmp_path / "ae.pth")
    config = _config(tmp_path, "audit.backbone=inception", f"audit.backbone_weights={tmp_path / 'ae.pth'}")
    with pytest.raises(ConfigError, match="cannot load Inception weights") as error:
        load_backbone(config, None, CPU)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("backbone", ["inception", "clip"])
def test_cli_missing_weights_file_is_one_line_and_exit_2(backbone, tmp_path_factory, capsys):
    cache = tmp_path_factory.getbasetemp() / "backbones-cli-cache"  # the tiny stages are trained once for both
    missing = tmp_path_factory.getbasetemp() / "no-such-weights.pt"
    argv = ["run", "--method", "attack", "--set", f"cache_dir={cache}", "--set", f"audit.backbone={backbone}",
            "--set", f"audit.backbone_weights={missing}", *[a for o in TINY_RUN for a in ("--set", o)]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not found" in err and str(missing) in err and "audit.backbone_weights" in err


def test_a_bug_while_building_a_backbone_is_raised_not_reported_as_a_config_error(tmp_path, inception_weights, monkeypatch):
    """Weights that do not fit or a failed download are the user's to fix (ConfigError, above); a bug in the
    construction (here a TypeError) surfaces as itself."""
    import torchmetrics.image.fid as fid

    def broken(*args, **kwargs):
        raise TypeError("a bug in the construction")

    monkeypatch.setattr(fid, "NoTrainInceptionV3", broken)
    config = _config(tmp_path, "audit.backbone=inception", f"audit.backbone_weights={inception_weights}")
    with pytest.raises(TypeError, match="a bug in the construction"):
        load_backbone(config, None, CPU)
