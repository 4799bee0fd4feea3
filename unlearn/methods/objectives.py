"""Objectives: what each phase minimises, given the model and a few batches.

Gradient ascent on L is written as minimising -L, so the one loop only ever descends.
"""

from __future__ import annotations

import torch

from unlearn.methods.loop import Batch, StepContext


def _model_loss(ctx: StepContext, batch: Batch, target: torch.Tensor | None = None) -> torch.Tensor:
    images = batch[0]
    return ctx.model.loss(images, ctx.mask, images if target is None else target).mean()


def fit(stream: str):
    """Descend the model's own training loss on one stream (stage training, fine-tuning on D_r)."""

    def objective(ctx: StepContext, batches: dict[str, Batch]) -> torch.Tensor:
        return _model_loss(ctx, batches[stream])

    return objective


def fit_both(ctx: StepContext, batches: dict[str, Batch]) -> torch.Tensor:
    """The attack stage: learn the poisoned D_f (weighted by ctx.forget_weight) and keep D_r (paper Algorithm 2)."""
    return ctx.forget_weight * _model_loss(ctx, batches["forget"]) + _model_loss(ctx, batches["retain"])


def gradient_ascent(ctx: StepContext, batches: dict[str, Batch]) -> torch.Tensor:
    """Decoupling: theta <- theta + lr * grad L(theta; D_f)."""
    return -_model_loss(ctx, batches["forget"])


def noisy_label(ctx: StepContext, batches: dict[str, Batch]) -> torch.Tensor:
    """Learn Gaussian-noise images as the targets of D_f while descending on D_r."""
    images = batches["forget"][0]
    noise_target = ctx.noise(tuple(images.shape), images.device).mul(0.5).add(0.5).clamp(0, 1)
    return _model_loss(ctx, batches["forget"], noise_target) + _model_loss(ctx, batches["retain"])


def random_encoder(ctx: StepContext, batches: dict[str, Batch]) -> torch.Tensor:
    """Push E(tau(x_f)) towards Gaussian noise (encoder only)."""
    images = batches["forget"][0]
    z = ctx.model.encode(images, ctx.mask)
    return (z - ctx.noise(tuple(z.shape), z.device)).pow(2).mean()


def noise_image(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """n = clamp(randn * std(x) + mean(x), 0, 1), per image (Li et al. 2024)."""
    dims = tuple(range(1, images.dim()))
    mean = images.mean(dim=dims, keepdim=True)
    std = images.std(dim=dims, keepdim=True)
    return (noise * std + mean).clamp(0, 1)


def i2i_sota(ctx: StepContext, batches: dict[str, Batch]) -> torch.Tensor:
    """Li et al. 2024: ||E(x_r) - E0(x_r)||^2 + alpha ||E(x_f) - E0(n)||^2, encoder only."""
    assert ctx.reference is not None, "i2i_sota needs the frozen original encoder E0"
    retain = batches["retain"][0]
    forget = batches["forget"][0]
    noise = noise_image(forget, ctx.noise(tuple(forget.shape), forget.device))
    with torch.no_grad():
        target_retain = ctx.reference.encode(retain, ctx.mask)
        target_forget = ctx.reference.encode(noise, ctx.mask)
    keep = (ctx.model.encode(retain, ctx.mask) - target_retain).pow(2).mean()
    scramble = (ctx.model.encode(forget, ctx.mask) - target_forget).pow(2).mean()
    return keep + ctx.hyper["alpha"] * scramble


def l1_sparse(ctx: StepContext, batches: dict[str, Batch]) -> torch.Tensor:
    """Jia et al. 2023 (l1-sparse unlearning): fine-tune on D_r with an l1 penalty pulling the weights to sparsity,
    l1_weight x the mean |theta| (a mean, so the weight does not depend on the model's size)."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    penalty = torch.stack([p.abs().sum() for p in params]).sum() / sum(p.numel() for p in params)
    return _model_loss(ctx, batches["retain"]) + ctx.hyper["l1_weight"] * penalty


def merged(ctx: StepContext, batches: dict[str, Batch]) -> torch.Tensor:
    """One combined objective: L(D_r) - lambda L(D_f)."""
    return _model_loss(ctx, batches["retain"]) - ctx.hyper["lambda"] * _model_loss(ctx, batches["forget"])
