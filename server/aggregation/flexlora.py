"""FlexLoRA (aggregation.md §7): aggregate in ΔW space, ΔW_g = sum_k p_k s_k B_k A_k, then redistribute
by SVD: client k (rank r_k, scaling s_k) gets A = V[:, :r_k]^T, B = U[:, :r_k] S[:r_k] / s_k.
The server keeps the top-`keep` SVD factors with unit scaling (B = U S, A = V^T), where keep covers the
largest rank any client may ask for, so per-client views are plain truncations (base class)."""

from __future__ import annotations

from . import lora_math as lm
from .base import ModuleEntry, ModuleResult, Strategy


class FlexLoRA(Strategy):
    name = "flexlora"
    HETEROGENEOUS = True
    FOLD_SCALING = True
    REPORTS_AGG_ERROR = False
    SUPPORTS_SERVER_OPT = False

    def __init__(self, *, max_rank: int | None = None, **common):
        self.max_rank = None if max_rank is None else self._check_rank("max_rank", max_rank)
        super().__init__(**common)

    def aggregate_module(self, module: str, entries: list[ModuleEntry]) -> ModuleResult:
        d_out, d_in, r_glob = self.shapes[module]
        if self.combiner.method == "mean":
            dW = lm.product_sum([e.A for e in entries], [e.B for e in entries], [e.weight * e.scaling for e in entries])
        else:
            dW = self.combiner.combine([e.scaling * (e.B @ e.A) for e in entries], [e.weight for e in entries])
        wanted = [r_glob, *self.client_ranks.values(), *self.known_ranks.values(), sum(e.A.shape[0] for e in entries)]
        keep = min(d_out, d_in, self.max_rank or max(wanted))
        A, B = lm.svd_factors(dW, keep)
        return ModuleResult(A=A, B=B)
