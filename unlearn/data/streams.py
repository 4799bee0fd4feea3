"""Endless, seeded batch streams with one global-batch semantics across data-parallel workers.

Every worker draws the same global batch sequence and keeps its own slice, so W workers averaging their
gradients see exactly the gradient of the global batch a single worker would.
"""

from __future__ import annotations

import torch

from unlearn.data.splits import ImageSubset


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


class BatchStream:
    def __init__(
        self,
        subset: ImageSubset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(subset) == 0:
            raise ValueError("cannot stream an empty subset")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} workers")
        self.subset, self.batch_size, self.rank, self.world_size = subset, batch_size, rank, world_size
        self.device = torch.device(device)
        self._gen = torch.Generator().manual_seed(seed)
        self._order = torch.zeros(0, dtype=torch.int64)
        self.samples_seen = 0  # global samples, for cost bookkeeping

    def _next_indices(self) -> torch.Tensor:
        # Cycle through successive seeded permutations so every global batch is full.
        while len(self._order) < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(len(self.subset), generator=self._gen)])
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        self.samples_seen += self.batch_size
        return batch[self.rank :: self.world_size]

    def state_dict(self) -> dict:
        return {"gen": self._gen.get_state(), "order": self._order.clone(), "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self._gen.set_state(state["gen"])
        self._order = state["order"].clone()
        self.samples_seen = int(state["samples_seen"])

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, clean, labels): images as float tensors in [0, 1] on the stream's device."""
        idx = self._next_indices()
        images = to_float(self.subset.images[idx]).to(self.device, non_blocking=True)
        clean = to_float(self.subset.clean[idx]).to(self.device, non_blocking=True)
        return images, clean, self.subset.labels[idx].to(self.device, non_blocking=True)
