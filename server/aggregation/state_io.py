"""Persist a strategy's state_dict as one .npz (arrays) with a JSON blob (everything else)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import Strategy

_SEP = "\x1f"  # unit separator: cannot clash with peft keys or client ids in practice


def _flatten(tree, prefix=(), arrays=None):
    arrays = {} if arrays is None else arrays
    if isinstance(tree, np.ndarray):
        arrays[_SEP.join(prefix)] = tree
        return {"__array__": _SEP.join(prefix)}, arrays
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out[str(k)], _ = _flatten(v, prefix + (str(k),), arrays)
        return out, arrays
    return tree, arrays


def _unflatten(tree, arrays):
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            return np.array(arrays[tree["__array__"]])
        return {k: _unflatten(v, arrays) for k, v in tree.items()}
    return tree


def save_state(strategy: Strategy, path: str | Path) -> None:
    skeleton, arrays = _flatten(strategy.state_dict())
    names = {f"a{i}": k for i, k in enumerate(arrays)}
    np.savez(
        path,
        __skeleton__=np.array(json.dumps({"tree": skeleton, "names": names})),
        **{n: arrays[k] for n, k in names.items()},
    )


def load_state(strategy: Strategy, path: str | Path) -> None:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__skeleton__"]))
        arrays = {k: z[n] for n, k in meta["names"].items()}
    strategy.load_state_dict(_unflatten(meta["tree"], arrays))
