"""RoLoRA (aggregation.md §3): alternate which factor is trained and averaged, one per round.
Each phase is exact because the other factor is shared. The phase lives in the strategy state and flips
only after a successful aggregation; it starts with B because with peft's B⁰ = 0 the gradient of A is
zero, so an A-phase first round would be wasted (pitfall 5)."""

from __future__ import annotations

import logging

from .base import ModuleEntry, ModuleResult, Strategy

log = logging.getLogger(__name__)


class RoLoRA(Strategy):
    name = "rolora"
    SUPPORTS_DP = True

    def __init__(self, *, start_phase: str = "B", **common):
        if start_phase not in ("A", "B"):
            raise ValueError(f"start_phase must be 'A' or 'B', got {start_phase!r}")
        super().__init__(**common)
        if start_phase == "A":
            log.warning("rolora: starting with an A-phase; wasted if B starts at 0 (peft default)")
        self.phase = start_phase

    def trainable(self) -> tuple[str, ...]:
        return (self.phase,)

    def upload_kinds(self) -> tuple[str, ...]:
        return (self.phase,)

    def directive_extra(self, client_id: str) -> dict:
        return {"phase": self.phase}

    def aggregate_module(self, module: str, entries: list[ModuleEntry]) -> ModuleResult:
        w = [e.weight for e in entries]
        factor = self.combiner.combine([getattr(e, self.phase) for e in entries], w)
        return ModuleResult(**{self.phase: factor})

    def _after_round(self, checked) -> None:
        self.phase = "A" if self.phase == "B" else "B"

    def _meta(self) -> dict:
        return {"phase": self.phase}

    def _load_meta(self, meta) -> None:
        self.phase = meta["phase"]
