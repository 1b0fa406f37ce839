"""Server-side federated LoRA aggregation strategies (numpy only). See shared/specs/aggregation.md.

strat = make_strategy("fedex-lora", lora_alpha=16, robust={"clip_norm": 1.0})
strat.initialize(initial_adapter)                  # flat peft adapter dict
directives = strat.configure_round(t, client_ids)  # -> {cid: ClientDirective}
result = strat.aggregate(t, [ClientUpdate(cid, factors, n_samples), ...])
"""

from .base import AggregateResult, ClientDirective, ClientUpdate, ModuleEntry, ModuleResult, Strategy
from .privacy import RDPAccountant, compute_epsilon, rdp_subsampled_gaussian, rdp_to_epsilon
from .registry import STRATEGIES, make_strategy, strategy_params
from .state_io import load_state, save_state

__all__ = [
    "AggregateResult",
    "ClientDirective",
    "ClientUpdate",
    "ModuleEntry",
    "ModuleResult",
    "Strategy",
    "STRATEGIES",
    "make_strategy",
    "strategy_params",
    "RDPAccountant",
    "compute_epsilon",
    "rdp_subsampled_gaussian",
    "rdp_to_epsilon",
    "save_state",
    "load_state",
]
