"""Guarantee bookkeeping checked against a hand computation on a tiny model."""

import pytest
import torch
from torch import nn

from unlearn.audit.guarantees import ga_guarantees
from unlearn.data import BatchStream, ImageStore, ImageSubset
from unlearn.methods import objectives as obj
from unlearn.methods.loop import Phase, StepContext, run_phases
from unlearn.models.base import I2IModel, hole_weighted_mse, masked_input


class TinyModel(I2IModel):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(4, 2, 1)
        self.dec = nn.Conv2d(2, 3, 1)

    def encoder_parameters(self):
        return self.enc.parameters()


    def encode(self, images, mask):
        return self.enc(masked_input(images, mask))

    def generate(self, images, mask):
        return torch.sigmoid(self.dec(torch.tanh(self.encode(images, mask))))

    def loss(self, images, mask, target):
        return hole_weighted_mse(self.generate(images, mask), target, mask)


def test_ga_bookkeeping_matches_hand_computation():
    torch.manual_seed(0)
    images = (torch.rand(8, 3, 4, 4) * 255).to(torch.uint8)
    subset = ImageSubset(ImageStore.from_array(images, torch.zeros(8, dtype=torch.int64)), torch.arange(8))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1
    model = TinyModel()
    hand = TinyModel()
    hand.load_state_dict(model.state_dict())
    steps, lr = 4, 0.5
    x = images.float() / 255

    # by hand: full-batch SGD ascent, norms of the applied gradient
    norms = []
    with torch.no_grad():
        loss0 = float(hand.loss(x, mask, x).mean())
    for _ in range(steps):
        hand.zero_grad()
        (-hand.loss(x, mask, x).mean()).backward()
        norms.append(float(torch.sqrt(sum(p.grad.pow(2).sum() for p in hand.parameters()))))
        with torch.no_grad():
            for p in hand.parameters():
                p -= lr * p.grad
    with torch.no_grad():
        loss_t = float(hand.loss(x, mask, x).mean())

    phase = Phase("ga", obj.gradient_ascent, ("forget",), steps, lr, optimizer="sgd", ascent=True)
    history = run_phases(model, [phase], {"forget": BatchStream(subset, 8, seed=0)}, StepContext(model=model, mask=mask),
                         clip_norm=1e6)
    with torch.no_grad():
        after = float(model.loss(x, mask, x).mean())
    g = ga_guarantees(history.phase("ga"), lr, loss0, after)

    assert g["ga_steps"] == steps
    assert abs(g["ga_grad_min"] - min(norms)) < 1e-6 and abs(g["ga_grad_max"] - max(norms)) < 1e-6
    assert abs(g["ga_bound_lower"] - steps * lr * min(norms) ** 2) < 1e-6
    assert abs(g["ga_bound_upper"] - steps * lr * max(norms) ** 2) < 1e-6
    assert abs(g["ga_loss_increase"] - (loss_t - loss0)) < 1e-6
    assert g["ga_loss_increase"] > 0
    expected_distance = torch.sqrt(sum((p - q).pow(2).sum() for p, q in zip(model.parameters(), hand.parameters(), strict=True)))
    assert float(expected_distance) < 1e-5  # same trajectory as the hand loop
    assert g["ga_within_bounds"] == float(g["ga_bound_lower"] <= g["ga_loss_increase"] <= g["ga_bound_upper"])


def test_non_finite_loss_stops_and_flags_divergence():
    images = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    subset = ImageSubset(ImageStore.from_array(images, torch.zeros(4, dtype=torch.int64)), torch.arange(4))
    model = TinyModel()

    def exploding(ctx, batches):
        return ctx.model.loss(batches["forget"][0], ctx.mask, batches["forget"][0]).mean() * float("inf")

    phase = Phase("ga", exploding, ("forget",), 5, 0.1, optimizer="sgd", ascent=True)
    history = run_phases(model, [phase], {"forget": BatchStream(subset, 4, seed=0)},
                         StepContext(model=model, mask=torch.ones(1, 1, 4, 4)), clip_norm=1.0)
    assert history.diverged and history.phase("ga").steps_run == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ga_bookkeeping_with_clipping_matches_hand_computation():
    """Plain-SGD GA whose every step is clipped: the trajectory and the bounds use the clipped rates
    r_t = lr x clip / ||g_t|| (the test above never clips: clip_norm 1e6)."""
    torch.manual_seed(0)
    images = (torch.rand(8, 3, 4, 4) * 255).to(torch.uint8)
    subset = ImageSubset(ImageStore.from_array(images, torch.zeros(8, dtype=torch.int64)), torch.arange(8))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1
    model, hand = TinyModel(), TinyModel()
    hand.load_state_dict(model.state_dict())
    steps, lr, clip = 4, 0.5, 0.01
    x = images.float() / 255
    norms, rates = [], []
    with torch.no_grad():
        loss0 = float(hand.loss(x, mask, x).mean())
    for _ in range(steps):
        hand.zero_grad()
        (-hand.loss(x, mask, x).mean()).backward()
        norm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in hand.parameters())))
        norms.append(norm)
        rates.append(lr * min(1.0, clip / norm))
        with torch.no_grad():
            for p in hand.parameters():
                p -= rates[-1] * p.grad
    assert min(norms) > clip  # every step is clipped
    phase = Phase("ga", obj.gradient_ascent, ("forget",), steps, lr, optimizer="sgd", ascent=True)
    history = run_phases(model, [phase], {"forget": BatchStream(subset, 8, seed=0)}, StepContext(model=model, mask=mask),
                         clip_norm=clip)
    with torch.no_grad():
        after = float(model.loss(x, mask, x).mean())
    g = ga_guarantees(history.phase("ga"), lr, loss0, after)
    distance = torch.sqrt(sum((p - q).pow(2).sum() for p, q in zip(model.parameters(), hand.parameters(), strict=True)))
    assert float(distance) < 1e-5  # the loop clipped exactly as the hand loop
    assert g["ga_bound_lower"] == pytest.approx(min(norms) ** 2 * sum(rates), rel=1e-5)
    assert g["ga_bound_upper"] == pytest.approx(max(norms) ** 2 * sum(rates), rel=1e-5)
    assert g["ga_bound_upper"] < 0.5 * steps * lr * max(norms) ** 2  # clip / norm ~ 0.3: below the unclipped T lr G^2
