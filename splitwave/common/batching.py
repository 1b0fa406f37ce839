"""Deterministic minibatch order of one client's shard: what makes "one client == centralized to ~1e-5" checkable.

Shared by the edge, the server's reference trainer and the benchmarks, so all of them draw the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class Batcher:
    """Deterministic shuffled minibatches of one client's indices.

    The order of epoch e depends only on (seed, client_id, e), so a centralized reference with the same
    triple replays exactly the batches a client trained on, independent of timing or restarts.
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int,
        client_id: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.client_id = int(client_id)
        self.drop_last = drop_last
        self.shuffle = shuffle

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.client_id, int(epoch)])
            order = self.indices[rng.permutation(len(self.indices))]
        else:
            order = self.indices
        bs = self.batch_size
        return [order[i : i + bs] for i in range(0, bs * len(self), bs)]

    def stream(self, start_epoch: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """Endless (epoch, step_in_epoch, batch_indices) over consecutive epochs."""
        if len(self) == 0:
            raise ValueError("no full batch: fewer indices than batch_size with drop_last=True")
        e = start_epoch
        while True:
            for s, b in enumerate(self.epoch(e)):
                yield e, s, b
            e += 1


def batches(
    indices: Sequence[int] | np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    drop_last: bool = False,
    client_id: int = 0,
) -> list[np.ndarray]:
    """One epoch of `Batcher` (functional form)."""
    return Batcher(indices, batch_size, seed, client_id=client_id, drop_last=drop_last).epoch(epoch)
