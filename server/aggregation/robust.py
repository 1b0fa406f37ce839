"""Robust aggregation and client-level Gaussian DP, composable with every strategy.

Strategies never average directly: they call `Combiner.combine` (factor averages) and the base class
runs `Combiner.clip` on each client's *update* (uploaded factors minus what the client started from).
- clipping: scale the whole update (L2 over all uploaded arrays) to norm <= clip_norm;
- method "mean" (p_k-weighted), "median" (coordinate-wise), "trimmed_mean" (drop the trim_ratio
  largest and smallest values per coordinate). Median/trimmed mean are unweighted and translation
  equivariant, so applying them to factors equals start + robust(update);
- DP (Gaussian mechanism, DP-FedAvg style): clip to C, *uniform* mean over the K reporting clients
  (sample weights would change the sensitivity), plus N(0, (z C / K)^2) per coordinate, seeded.
  The RDP accountant (privacy.py) is stepped once per aggregated round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from splitwave.common.robust_rules import METHODS, min_clients_for

from .privacy import RDPAccountant


def _check_keys(cfg: Mapping, allowed: set, what: str) -> None:
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"unknown {what} parameter(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _positive(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class Combiner:
    """Averaging operator + per-client clipping + optional Gaussian noise and privacy accounting."""

    def __init__(self, robust: Mapping | None = None, dp: Mapping | None = None):
        robust = dict(robust or {})
        dp = dict(dp or {})
        _check_keys(robust, {"clip_norm", "method", "trim_ratio"}, "robust")
        _check_keys(dp, {"noise_multiplier", "clip_norm", "seed", "delta", "sampling_rate"}, "dp")
        self.method = robust.get("method", "mean")
        if self.method not in METHODS:
            raise ValueError(f"robust.method must be one of {METHODS}, got {self.method!r}")
        self.trim_ratio = float(robust.get("trim_ratio", 0.1))
        if not 0.0 <= self.trim_ratio < 0.5:
            raise ValueError(f"robust.trim_ratio must be in [0, 0.5), got {self.trim_ratio}")
        self.min_clients = min_clients_for(self.method, self.trim_ratio)
        clip = robust.get("clip_norm")  # None or absent: no clipping
        self.clip_norm = _positive("robust.clip_norm", clip) if clip is not None else None
        self.dp = bool(dp)
        if self.dp:
            if self.method != "mean":
                raise ValueError("dp requires robust.method='mean' (noise is calibrated to the mean's sensitivity)")
            self.noise_multiplier = _positive("dp.noise_multiplier", dp.get("noise_multiplier"))
            dp_clip = _positive("dp.clip_norm", dp.get("clip_norm"))
            self.clip_norm = dp_clip if self.clip_norm is None else min(self.clip_norm, dp_clip)
            self.delta = float(dp.get("delta", 1e-5))
            if not 0 < self.delta < 1:
                raise ValueError(f"dp.delta must be in (0, 1), got {self.delta}")
            self.sampling_rate = float(dp.get("sampling_rate", 1.0))
            if not 0 < self.sampling_rate <= 1:
                raise ValueError(f"dp.sampling_rate must be in (0, 1], got {self.sampling_rate}")
            self.rng = np.random.default_rng(int(dp.get("seed", 0)))
            self.accountant = RDPAccountant()
        self._num_clients = 0

    @property
    def is_plain(self) -> bool:
        return self.method == "mean" and self.clip_norm is None and not self.dp

    def clip(self, update: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> tuple[dict, float]:
        """Return start + clipped(update - start) over the keys of `update`, and the pre-clip norm."""
        deltas = {k: np.asarray(v, np.float64) - start.get(k, 0.0) for k, v in update.items()}
        norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()))
        if self.clip_norm is None or norm <= self.clip_norm:
            return {k: np.asarray(v, np.float64) for k, v in update.items()}, norm
        f = self.clip_norm / norm
        return {k: start.get(k, 0.0) + f * d for k, d in deltas.items()}, norm

    def begin_round(self, num_clients: int) -> None:
        if num_clients < self.min_clients:
            raise ValueError(
                f"robust.method {self.method!r} needs at least {self.min_clients} clients, "
                f"{num_clients} reported: refusing to aggregate (it would be a plain mean)"
            )
        self._num_clients = num_clients

    def combine(self, arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
        stack = np.stack([np.asarray(a, np.float64) for a in arrays])
        if self.method == "median":
            return np.median(stack, axis=0)
        if self.method == "trimmed_mean":
            k = int(math.floor(self.trim_ratio * len(arrays)))
            srt = np.sort(stack, axis=0)
            return srt[k : len(arrays) - k].mean(axis=0)
        if self.dp:
            std = self.noise_multiplier * self.clip_norm / self._num_clients
            return stack.mean(axis=0) + self.rng.normal(0.0, std, size=stack.shape[1:])
        return np.tensordot(np.asarray(weights, np.float64), stack, axes=1)

    def end_round(self) -> dict:
        if not self.dp:
            return {}
        self.accountant.step(self.noise_multiplier, self.sampling_rate)
        return {"dp_epsilon": self.accountant.get_epsilon(self.delta), "dp_delta": self.delta}

    def state_dict(self) -> dict:
        if not self.dp:
            return {}
        return {"rng": self.rng.bit_generator.state, "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        if self.dp:
            self.rng.bit_generator.state = state["rng"]
            self.accountant.load_state_dict(state["accountant"])
