"""FFA-LoRA (aggregation.md §2): A is frozen at the shared A⁰ for the whole run; only B is trained,
uploaded and averaged, which is exact: sum_k p_k s B_k A⁰ = s B̄ A⁰. Clients that upload A anyway must
send it bit-identical to the server's copy (checked), so a diverged A⁰ is caught, not averaged away."""

from __future__ import annotations

from .base import ModuleEntry, ModuleResult, Strategy


class FFALoRA(Strategy):
    name = "ffa-lora"
    TRAINABLE = ("B",)
    UPLOAD = ("B",)
    SUPPORTS_DP = True

    def aggregate_module(self, module: str, entries: list[ModuleEntry]) -> ModuleResult:
        return ModuleResult(B=self.combiner.combine([e.B for e in entries], [e.weight for e in entries]))
