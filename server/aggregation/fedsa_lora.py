"""FedSA-LoRA (aggregation.md §10): average A (shared knowledge), keep each client's B (and, by default,
its classifier/extras) personal. With keep_local_on_server=True the clients also upload B (and personal
extras) and the server stores them per client, so stateless clients can be resumed (privacy trade-off);
otherwise only A travels and B stays on the client. Evaluation must be per client (pitfall 9)."""

from __future__ import annotations

from splitwave.common import lora

from .base import ModuleEntry, ModuleResult, Strategy


class FedSALoRA(Strategy):
    name = "fedsa-lora"
    REPORTS_AGG_ERROR = False
    SUPPORTS_DP = True

    def __init__(self, *, keep_local_on_server: bool = False, personalize_extras: bool = True, **common):
        super().__init__(**common)
        self.keep_local, self.personalize_extras = bool(keep_local_on_server), bool(personalize_extras)

    def upload_kinds(self):
        return ("A", "B") if self.keep_local else ("A",)

    def upload_extras(self) -> bool:
        return self.keep_local or not self.personalize_extras

    def average_extras(self) -> bool:
        return not self.personalize_extras

    def client_view(self, client_id: str, rank: int):
        out = super().client_view(client_id, rank)
        out.update(self.client_state.get(client_id, {}))
        return out

    def aggregate_module(self, module: str, entries: list[ModuleEntry]) -> ModuleResult:
        A = self.combiner.combine([e.A for e in entries], [e.weight for e in entries])
        personal = {e.client_id: {"B": e.B} for e in entries} if self.keep_local else {}
        return ModuleResult(A=A, client=personal)

    def _after_round(self, checked) -> None:
        if self.keep_local and self.personalize_extras:
            for cid, _rank, _start, uploaded, _alpha in checked:
                self.client_state.setdefault(cid, {}).update({k: self._cast(uploaded[k]) for k in self.extras})

    def global_output(self):
        out = {lora.a_key(m): a.copy() for m, a in self.global_A.items()}
        if not self.personalize_extras:
            out.update(self.extras)
        return out

    def client_output(self, client_id: str, rank):
        return {k: v.copy() for k, v in self.client_state.get(client_id, {}).items()}
