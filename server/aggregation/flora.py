"""FLoRA (aggregation.md §5): stack the client adapters so the product is exactly the p-weighted sum
of client updates, for any mix of ranks, then every client merges it into its base weight and
re-initializes a fresh LoRA. Per-client scalings are folded into the A rows (rows p_k s_k A_k), so the
stacked adapter has unit scaling: delta = B_stack @ A_stack = sum_k p_k s_k B_k A_k.

There is no global adapter; the server cannot know the clients' fresh random init, so clipping acts on
the raw factors (B starts at 0, so that bounds the update's B part)."""

from __future__ import annotations

from . import lora_math as lm
from .base import ModuleEntry, ModuleResult, Strategy


class FLoRA(Strategy):
    name = "flora"
    MERGES_INTO_BASE = True
    HETEROGENEOUS = True
    REINIT = True
    SUPPORTS_SERVER_OPT = False
    SUPPORTS_ROBUST_METHOD = False  # a stack is a weighted sum; medians have no stacked form
    shapes_bound_rank = False

    def module_rank(self, module: str, client_rank: int) -> int:
        d_out, d_in, _ = self.shapes[module]
        return min(client_rank, d_out, d_in)

    def client_view(self, client_id: str, rank: int):
        return dict(self.extras) or None  # LoRA factors are re-initialized by the client

    def global_output(self):
        return dict(self.extras) or None

    def aggregate_module(self, module: str, entries: list[ModuleEntry]) -> ModuleResult:
        Bf, Af = lm.stack_factors(
            [e.A for e in entries], [e.B for e in entries], [e.weight * e.scaling for e in entries]
        )
        return ModuleResult(base_delta=Bf @ Af, base_delta_factors=(Bf, Af))
