"""FedEx-LoRA (aggregation.md §4): FedAvg the factors, then fold the residual
R = sum_k p_k B_k A_k - B̄Ā into the base weight (W0 += s R) so that W0' + s B̄Ā = W0 + s sum_k p_k B_k A_k.

The residual is also sent factored, without an SVD: Bf = [B_1 .. B_K, B̄], Af = [s p_1 A_1; ..; s p_K A_K; -s Ā]
(rank <= sum r_k + r), which is what the downlink should carry instead of the dense matrix.
With a robust method the target is the coordinate-wise robust combination of the dense products."""

from __future__ import annotations

from . import lora_math as lm
from .base import ModuleEntry, ModuleResult, Strategy


class FedExLoRA(Strategy):
    name = "fedex-lora"
    MERGES_INTO_BASE = True
    SUPPORTS_SERVER_OPT = False  # the optimizer would move B̄, Ā away from the residual's reference

    def aggregate_module(self, module: str, entries: list[ModuleEntry]) -> ModuleResult:
        w = [e.weight for e in entries]
        s = entries[0].scaling
        A_bar = self.combiner.combine([e.A for e in entries], w)
        B_bar = self.combiner.combine([e.B for e in entries], w)
        if self.combiner.method == "mean":
            Bf, Af = lm.stack_factors(
                [e.A for e in entries] + [A_bar], [e.B for e in entries] + [B_bar], [s * p for p in w] + [-s]
            )
            return ModuleResult(A=A_bar, B=B_bar, base_delta=Bf @ Af, base_delta_factors=(Bf, Af))
        target = self.combiner.combine([e.B @ e.A for e in entries], w)
        return ModuleResult(A=A_bar, B=B_bar, base_delta=s * (target - B_bar @ A_bar))
