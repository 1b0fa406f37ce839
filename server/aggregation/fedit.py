"""FedIT (aggregation.md §1): FedAvg of A and B separately. Inexact: the error
sum_k p_k B_k A_k - B̄Ā = sum_k p_k (B_k - B̄)(A_k - Ā) is reported as `agg_error_fro`."""

from __future__ import annotations

from .base import ModuleEntry, ModuleResult, Strategy


class FedIT(Strategy):
    name = "fedit"
    SUPPORTS_DP = True

    def aggregate_module(self, module: str, entries: list[ModuleEntry]) -> ModuleResult:
        w = [e.weight for e in entries]
        return ModuleResult(
            A=self.combiner.combine([e.A for e in entries], w), B=self.combiner.combine([e.B for e in entries], w)
        )
