"""HetLoRA (aggregation.md §8): heterogeneous ranks by zero-padding to the server's r_max, weighted
averaging, and truncation back to each client's rank. Client scalings are folded into B before
averaging (the server stores s*B, unit scaling), so clients with different s_k = alpha/r_k combine in
ΔW units. weighting="norm" uses the paper's w_k ∝ ||s_k B_k A_k||_F per module (sample weights
when all norms are 0, e.g. right after init); "samples" uses p_k. Self-pruning is client-side: the
directive carries `self_prune` = {gamma, lambda} when prune_gamma is set."""

from __future__ import annotations

import numpy as np

from . import lora_math as lm
from .base import ModuleEntry, ModuleResult, Strategy


class HetLoRA(Strategy):
    name = "hetlora"
    HETEROGENEOUS = True
    FOLD_SCALING = True
    REPORTS_AGG_ERROR = False
    MASKED = False

    def __init__(
        self, *, weighting: str = "norm", prune_gamma: float | None = None, prune_lambda: float = 0.0, **common
    ):
        if weighting not in ("norm", "samples"):
            raise ValueError(f"weighting must be 'norm' or 'samples', got {weighting!r}")
        if prune_gamma is not None and not 0 < prune_gamma < 1:
            raise ValueError(f"prune_gamma must be in (0, 1), got {prune_gamma!r}")
        if prune_lambda < 0:
            raise ValueError(f"prune_lambda must be >= 0, got {prune_lambda!r}")
        super().__init__(**common)
        self.weighting, self.prune_gamma, self.prune_lambda = weighting, prune_gamma, float(prune_lambda)

    def directive_extra(self, client_id: str) -> dict:
        if self.prune_gamma is None:
            return {}
        return {"self_prune": {"gamma": self.prune_gamma, "lambda": self.prune_lambda}}

    def _weights(self, entries: list[ModuleEntry]) -> np.ndarray:
        p = np.array([e.weight for e in entries])
        if self.weighting == "samples":
            return p
        norms = np.array([e.scaling * lm.product_fro_norm(e.A, e.B) for e in entries])
        return norms / norms.sum() if norms.sum() > 0 else p

    def aggregate_module(self, module: str, entries: list[ModuleEntry]) -> ModuleResult:
        A, B = lm.rank_slot_combine(
            [e.A for e in entries],
            [e.scaling * e.B for e in entries],
            self._weights(entries),
            self.shapes[module][2],
            self.global_A[module],
            self.global_B[module],
            masked=self.MASKED,
            combine=self.combiner.combine,
        )
        return ModuleResult(A=A, B=B)
