"""What an edge backend is: the interface the edge client trains through, and how one is made for a bundle.

Two backends implement it: `splitwave.edge.runtime.EdgeRuntime` (ONNX Runtime + numpy, what devices run) and
`splitwave.server.torch_edge.TorchEdge` (torch eager, the reference for comparisons). The edge client never
picks one itself: whoever starts it passes a `BackendFactory` (the experiment layer picks TorchEdge for
`--backend torch`), so the torch-free edge never imports the server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class BackendSettings:
    """What a run asks of an edge backend: the server's optimizer and training mode, the device's threads."""

    lr: float = 1e-3
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    mode: str = "recompute"  # "recompute" or "saved" (an ONNX Runtime choice; torch has one way)
    threads: int | None = None


class EdgeBackend(Protocol):
    """forward / backward / optimizer step of the edge bottom on LoRA factors, with numpy in and out."""

    trainable: set[str]  # factors the optimizer updates (default all); backward still returns every gradient

    @property
    def factor_names(self) -> Sequence[str]: ...

    @property
    def factors(self) -> dict[str, np.ndarray]:
        """The current factors by name (float32)."""
        ...

    def set_factors(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace some or all factors (copies)."""
        ...

    def load_factors(self, path: str | os.PathLike[str]) -> None: ...

    def save_factors(self, path: str | os.PathLike[str]) -> None: ...

    def forward(self, input_ids: ArrayLike, attention_mask: ArrayLike) -> np.ndarray:
        """h for this batch; keeps what the next backward needs."""
        ...

    def backward(self, grad_h: ArrayLike) -> dict[str, np.ndarray]:
        """dL/d(factor) for every factor, for the inputs of the last forward."""
        ...

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """AdamW on the trainable factors."""
        ...

    def train_step(
        self, input_ids: ArrayLike, attention_mask: ArrayLike, grad_fn: Callable[[np.ndarray], ArrayLike]
    ) -> dict[str, np.ndarray]:
        """forward -> grad_fn(h) (e.g. the server round trip) -> backward -> step; returns the grads."""
        ...

    def set_base_deltas(self, deltas: Mapping[str, np.ndarray]) -> None:
        """Frozen weight of each LoRA module := the bundle's weight + delta (FedEx-LoRA, FLoRA)."""
        ...

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moments (a re-initialized adapter starts a new optimization)."""
        ...

    def optimizer_state(self) -> dict[str, Any]:
        """A snapshot of the optimizer state that later steps do not change."""
        ...

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Go back to a snapshot of `optimizer_state` (the snapshot stays usable for another load)."""
        ...


BackendFactory = Callable[[Path, BackendSettings], EdgeBackend]
"""Makes the backend for a downloaded bundle folder under the run's settings."""
