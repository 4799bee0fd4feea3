"""Endless, seeded batch streams with one global-batch semantics across data-parallel workers.

Every worker draws the same global batch sequence (positions only) and reads its own slice of each batch from the
image store, so W workers averaging their gradients see exactly the gradient of the global batch a single worker
would, while each reads 1/W of the pixels. The next batch's rows are read ahead while the current one trains.
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
        self.images_read = 0  # images this worker read from the store: its shard of each global batch

    def _fill(self) -> None:
        # Cycle through successive seeded permutations so every global batch is full.
        while len(self._order) < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(len(self.subset), generator=self._gen)])

    def _next_rows(self) -> torch.Tensor:
        self._fill()
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return batch[self.rank :: self.world_size]

    def state_dict(self) -> dict:
        return {"gen": self._gen.get_state(), "order": self._order.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._gen.set_state(state["gen"])
        self._order = state["order"].clone()

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, clean, labels) of this worker's shard: images as trained on (the '+' drawn into D_f) and the
        clean ground truth, float in [0, 1] on the stream's device."""
        rows = self._next_rows()
        clean_u8 = self.subset.read(rows, clean=True)
        self.images_read += len(rows)
        if len(self._order) >= self.batch_size:  # the next batch is known: have the kernel read it ahead
            self.subset.prefetch(self._order[: self.batch_size][self.rank :: self.world_size])
        clean = to_float(clean_u8).to(self.device, non_blocking=True)
        poison = self.subset.poison
        if poison is None:
            images = clean
        else:  # the '+' drawn into the rows that carry it (positions in the store)
            images = to_float(poison.apply(clean_u8, self.subset.index[rows])).to(self.device, non_blocking=True)
        return images, clean, self.subset.labels[rows].to(self.device, non_blocking=True)
