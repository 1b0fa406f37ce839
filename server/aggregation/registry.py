"""Strategy registry: make_strategy(name, **params) with parameter validation."""

from __future__ import annotations

import inspect

from .base import Strategy
from .fedex_lora import FedExLoRA
from .fedit import FedIT
from .fedsa_lora import FedSALoRA
from .ffa_lora import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA
from .rbla import RBLA
from .rolora import RoLoRA

_CLASSES = (FedIT, FFALoRA, RoLoRA, FedExLoRA, FLoRA, FlexLoRA, FedSALoRA, HetLoRA, RBLA)
_REGISTRY: dict[str, tuple[type[Strategy], dict]] = {c.name: (c, {}) for c in _CLASSES}
_REGISTRY["zero-padding"] = (HetLoRA, {"weighting": "samples"})  # FlexLoRA repo's `truncate` baseline
STRATEGIES: tuple[str, ...] = tuple(_REGISTRY)


def strategy_params(name: str) -> dict[str, object]:
    """Accepted keyword parameters of a strategy and their defaults."""
    cls, preset = _lookup(name)
    params = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and issubclass(klass, Strategy):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind is p.KEYWORD_ONLY:
                    params[p.name] = p.default
    params.update(preset)
    return params


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose one of {list(STRATEGIES)}")
    return _REGISTRY[name]


def make_strategy(name: str, **params) -> Strategy:
    """Build a strategy; unknown or invalid parameters raise ValueError naming the parameter."""
    cls, preset = _lookup(name)
    allowed = strategy_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"strategy {name!r}: unknown parameter(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**{**preset, **params})
