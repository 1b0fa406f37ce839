"""peft's LoRA naming and scaling, in one torch-free place the edge, the server and aggregation all agree on.

A LoRA module `m` is saved by peft as two factors, `m.lora_A.weight` [r, d_in] and `m.lora_B.weight`
[d_out, r], and adds s * B @ A to the base weight with s = alpha / r (alpha / sqrt(r) with rsLoRA). Every
place that builds or parses factor names, or scales an update, goes through here, so exported adapters
still load with peft.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, TypeVar

A_NAME, B_NAME = "lora_A", "lora_B"  # peft's attribute names of the two factors of a LoRA layer
A_SUFFIX = f".{A_NAME}.weight"
B_SUFFIX = f".{B_NAME}.weight"
FACTOR_SUFFIXES: Mapping[str, str] = {"A": A_SUFFIX, "B": B_SUFFIX}  # factor kind -> key suffix

Factor = Literal["A", "B"]
V = TypeVar("V")


def a_key(module: str) -> str:
    """The peft state-dict key of a module's A factor."""
    return module + A_SUFFIX


def b_key(module: str) -> str:
    """The peft state-dict key of a module's B factor."""
    return module + B_SUFFIX


def factor_key(module: str, kind: Factor | str) -> str:
    """The key of a module's factor of kind "A" or "B"."""
    return module + FACTOR_SUFFIXES[kind]


def is_a_key(key: str) -> bool:
    return key.endswith(A_SUFFIX)


def is_b_key(key: str) -> bool:
    return key.endswith(B_SUFFIX)


def factor_kind(key: str) -> Factor | None:
    """ "A" or "B" for a LoRA factor key; None for anything else (heads, biases)."""
    return "A" if is_a_key(key) else "B" if is_b_key(key) else None


def module_of(key: str) -> str:
    """The module a factor key belongs to (`m.lora_A.weight` -> `m`); ValueError for a non-factor key."""
    for suffix in (A_SUFFIX, B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise ValueError(f"{key!r} is not a LoRA factor key (*{A_SUFFIX} or *{B_SUFFIX})")


def is_factor_param(param_name: str) -> bool:
    """A peft LoRA factor parameter (`m.lora_A.<adapter>.weight`), not a base weight or a head."""
    return f".{A_NAME}." in param_name or f".{B_NAME}." in param_name


def saved_key(param_name: str, adapter: str) -> str:
    """peft parameter name -> its saved-adapter key: `m.lora_A.<adapter>.weight` -> `m.lora_A.weight`."""
    for ab in (A_NAME, B_NAME):
        param_name = param_name.replace(f".{ab}.{adapter}.", f".{ab}.")
    return param_name


def split_factors(factors: Mapping[str, V]) -> tuple[dict[str, dict[str, V]], dict[str, V]]:
    """Split a flat peft adapter dict into {module: {"A": .., "B": ..}} and the non-LoRA extras
    (modules_to_save heads, LoRA biases), which strategies average like ordinary weights."""
    modules: dict[str, dict[str, V]] = {}
    extras: dict[str, V] = {}
    for key, value in factors.items():
        kind = factor_kind(key)
        if kind is None:
            extras[key] = value
        else:
            modules.setdefault(module_of(key), {})[kind] = value
    return modules, extras


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """peft's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)
