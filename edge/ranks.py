"""A client of LoRA rank r_k inside an edge graph exported at rank r (heterogeneous-rank strategies).

The bundle's graphs have factor inputs of the exported rank r and apply the scaling s = alpha / r. A client
told to train at rank r_k < r keeps its factors zero-padded to r (rows of A, columns of B beyond r_k are zero
and get no updates) and rescales B so that the graph computes exactly the client's own update:
s * B_pad A_pad = s_k * B_k A_k with s_k = alpha / r_k. On the way back it uploads (A_k, B_k) at rank r_k.
No re-export, one bundle for every rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from splitwave.common.lora import is_a_key, scaling


class RankAdapter:
    """Converts between a client's rank-r_k factors and the graph's rank-r inputs, and masks the padding."""

    def __init__(self, graph_rank: int, alpha: float, rslora: bool = False):
        self.graph_rank, self.alpha, self.rslora = int(graph_rank), float(alpha), bool(rslora)
        self.ranks: dict[str, int] = {}  # factor name -> the client's rank for it (only where < graph rank)

    def _ratio(self, r: int) -> float:
        """s_k / s: how much larger the client's scaling is than the graph's."""
        return scaling(self.alpha, r, self.rslora) / scaling(self.alpha, self.graph_rank, self.rslora)

    def to_graph(self, factors: dict[str, np.ndarray], shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
        """Pad received factors of a smaller rank up to the graph's shapes (and remember that rank)."""
        out = {}
        for k, v in factors.items():
            full = tuple(shapes[k])
            v = np.asarray(v, dtype=np.float32)
            if v.shape == full:
                self.ranks.pop(k, None)
                out[k] = v
                continue
            r = v.shape[0] if is_a_key(k) else v.shape[1] if v.ndim == 2 else -1
            ok = (
                v.ndim == 2
                and 0 < r < self.graph_rank
                and (v.shape[1] == full[1] if is_a_key(k) else v.shape[0] == full[0])
            )
            if not ok:
                raise ValueError(f"factor {k}: shape {v.shape} does not fit the graph's {full}")
            pad = np.zeros(full, np.float32)
            if is_a_key(k):
                pad[:r] = v
            else:
                pad[:, :r] = v * np.float32(self._ratio(r))
            self.ranks[k] = r
            out[k] = pad
        return out

    def set_rank(self, names: Iterable[str], rank: int) -> None:
        """A fresh adapter of rank `rank` (FLoRA re-init): every factor is masked beyond it."""
        for k in names:
            if 0 < rank < self.graph_rank:
                self.ranks[k] = rank
            else:
                self.ranks.pop(k, None)

    def mask(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zero the padded rows/columns (gradients, or freshly initialized factors)."""
        out = dict(arrays)
        for k, r in self.ranks.items():
            if k in out:
                a = np.array(out[k], copy=True)
                if is_a_key(k):
                    a[r:] = 0
                else:
                    a[:, r:] = 0
                out[k] = a
        return out

    def from_graph(self, name: str, value: np.ndarray) -> np.ndarray:
        """The client's own rank-r_k factor for upload."""
        r = self.ranks.get(name)
        if r is None:
            return value
        if is_a_key(name):
            return np.ascontiguousarray(value[:r])
        return np.ascontiguousarray(value[:, :r] / np.float32(self._ratio(r)))
