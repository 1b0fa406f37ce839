"""RBLA (aggregation.md §9b): rank-slot masked averaging; slot j averages only the clients that own it,
so high-rank components are not diluted by zero padding. Equal ranks reduce to FedAvg. Replication
padding (§9a) with the owners' mean is the same computation. Shares HetLoRA's code path."""

from __future__ import annotations

from .hetlora import HetLoRA


class RBLA(HetLoRA):
    name = "rbla"
    MASKED = True

    def __init__(self, *, weighting: str = "samples", **common):
        super().__init__(weighting=weighting, **common)
