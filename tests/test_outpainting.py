"""Outpainting end to end (data.mask.kind=border): a tiny autoencoder on digits through prepare, unlearn and the audit
(CPU, ~30 s on an idle machine). The frame is hidden from the model, the '+' sits inside the frame, the outputs keep
the centre and differ from the input only in the frame, and every figure of the catalogue is finite."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import Painter

from unlearn.audit.catalogue import METRICS
from unlearn.cli import main
from unlearn.config import load_config
from unlearn.data import build_data, to_float
from unlearn.errors import ConfigError

FRAME = 5  # data.mask.size: the width of the hidden frame (16 px images: a 6 x 6 centre is the context)
OVERRIDES = ["data.mask.kind=border", f"data.mask.size={FRAME}", "model.width=8", "model.latent_channels=8",
             "data.max_per_class=40", "stages.epochs=12", "stages.attack_epochs=12", "audit.domain_epochs=3",
             "unlearn.ga_steps=4", "unlearn.ft_steps=30", "audit.knn_train_samples=100", "audit.mia_resamples=20"]


def _frame_mask(size: int, width: int) -> torch.Tensor:
    i = torch.arange(size)
    edge = torch.minimum(i, size - 1 - i)  # distance to the nearest edge, per row / column
    return (torch.minimum(edge[:, None], edge[None, :]) < width).float()


@pytest.fixture(scope="module")
def outpainting(tmp_path_factory):
    from unlearn.pipeline import audit_result, evaluate_reference, prepare, unlearn

    cache = tmp_path_factory.mktemp("outpainting-cache")
    config = load_config("digits-ae", [*OVERRIDES, f"cache_dir={cache}"])
    prepared = prepare(config)
    result = unlearn(prepared, "realistic")
    metrics = {"attack": evaluate_reference(prepared, "attack"), "original": evaluate_reference(prepared, "original"),
               "realistic": audit_result(prepared, result)}
    return prepared, result.model, metrics


def test_the_mask_is_the_frame_and_the_marker_lies_inside_it(tmp_path):
    config = load_config("digits-ae", [*OVERRIDES, f"cache_dir={tmp_path}"])
    data = build_data(config.data, config.seed, config.resolved_cache_dir())
    frame = _frame_mask(16, FRAME)
    assert torch.equal(data.mask[0, 0], frame)  # 1 on every pixel within FRAME of an edge, 0 on the 6 x 6 centre
    assert int(data.marker.sum()) == 9 and bool(frame[data.marker].all())  # the whole '+' is hidden
    rows = data.marker.any(1).nonzero().flatten()
    assert int(rows.max()) < FRAME  # in the top band
    # poisoning changes D_f's images on the '+' only, and the test images not at all
    changed = (data.forget_train.read() != data.forget_train.read(clean=True)).any(1).any(0)
    assert torch.equal(changed, data.marker)
    assert data.forget_test.poison is None


def test_a_frame_too_thin_for_the_marker_is_a_config_error(tmp_path):
    config = load_config("digits-ae", ["data.mask.kind=border", "data.mask.size=3"])  # the '+' is 5 px tall
    with pytest.raises(ConfigError, match="does not fit inside the 3px border frame"):
        build_data(config.data, config.seed, tmp_path)


def test_the_model_sees_only_the_centre_and_fills_only_the_frame(outpainting):
    prepared, model, _ = outpainting
    mask = prepared.data.mask.to(prepared.device)
    images = to_float(prepared.data.forget_train.head(16).read()).to(prepared.device)
    hidden = images * (1 - mask) + (1 - images) * mask  # every frame pixel inverted, the centre untouched
    for net in (prepared.stages["attack"].model, model):
        net.eval()
        with torch.no_grad():
            out, out_hidden = net.reconstruct(images, mask), net.reconstruct(hidden, mask)
            torch.testing.assert_close(net.generate(images, mask), net.generate(hidden, mask), rtol=0, atol=1e-6)
        torch.testing.assert_close(out, out_hidden, rtol=0, atol=1e-6)  # the frame's content never reaches the model
        centre, out, given = ~mask[0, 0].bool().cpu(), out.cpu(), images.cpu()
        assert torch.equal(out[:, :, centre], given[:, :, centre])  # the context is kept exactly
        differs = (out - given).abs().amax(dim=(0, 1)) > 1e-3
        assert not differs[centre].any() and differs[~centre].float().mean() > 0.9  # the frame is filled by the model


def test_the_audit_reads_the_marker_in_the_frame_and_every_figure_is_finite(outpainting):
    prepared, _, metrics = outpainting
    for name, m in metrics.items():
        bad = {k: v for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"{name}: {bad}"
        for split in ("retain", "forget"):
            assert all(n in m for n in METRICS if n.startswith(f"{split}_")), name
        assert 0.0 <= m["forget_marker"] <= 1.0 and m["forget_marker_strength"] >= 0.0
    realistic = metrics["realistic"]
    assert realistic["ga_steps"] == prepared.config.unlearn.ga_steps and realistic["diverged"] == 0.0
    # the MSE is measured in the frame: the outputs' error against the ground truth there
    forget = prepared.auditor.splits["forget"]
    from unlearn.audit.evaluate import model_outputs

    outputs = model_outputs(prepared.stages["attack"].model, forget, prepared.data.mask, prepared.device, "fp32")
    frame = prepared.data.mask[0, 0].bool()
    expected = float((outputs - to_float(forget.read(clean=True)))[:, :, frame].pow(2).mean())
    assert metrics["attack"]["forget_mse"] == pytest.approx(expected, rel=1e-5)


def test_the_marker_audit_reads_the_top_band_of_the_frame(outpainting):
    """A '+' painted into the frame where D_f carries it is detected at its contrast; one painted in the centre (the
    inpainting position, which the model never fills) or a plain fill is not. (These tiny stages do not teach the
    attack model the '+', so the audit is checked with painted outputs.)"""
    from unlearn.data import marker_pixels

    prepared, _, _ = outpainting
    auditor = prepared.auditor
    centre_plus = marker_pixels(16, prepared.config.data.marker)  # where the '+' sits for a centre hole

    def painted(plus: torch.Tensor, contrast: float) -> dict:  # the frame mid-grey with the '+' blended in at contrast
        return auditor.marker_figures(Painter(plus, contrast))

    for contrast in (1.0, 0.5):
        f = painted(prepared.data.marker, contrast)
        assert f["forget_marker"] == 1.0 and f["forget_marker_strength"] == pytest.approx(contrast, abs=1e-4)
    for f in (painted(centre_plus, 1.0), painted(prepared.data.marker, 0.0)):
        assert f["forget_marker"] == 0.0 and f["forget_marker_strength"] < 1e-4


def test_cli_run_with_the_border_mask(outpainting, capsys):
    prepared, _, _ = outpainting
    argv = ["run", "--method", "realistic", "--json", *[a for o in OVERRIDES for a in ("--set", o)],
            "--set", f"cache_dir={prepared.config.cache_dir}"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["method"] == "realistic"
    assert all(math.isfinite(v) for k, v in metrics.items() if k != "method")
