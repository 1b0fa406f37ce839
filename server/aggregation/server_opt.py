"""Server optimizers over the aggregated update (FedOpt: Reddi et al. 2021, "Adaptive Federated
Optimization"). The pseudo-gradient is delta = aggregated - previous global; then
  avgm:    m = beta*m + delta;                       x += lr*m
  adagrad: v = v + delta^2;                          x += lr*m/(sqrt(v)+tau)   (m with beta1)
  adam:    v = beta2*v + (1-beta2)*delta^2
  yogi:    v = v - (1-beta2)*delta^2*sign(v - delta^2)
Applied key by key to the global factors (factor space: FedIT's product inexactness still applies).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .robust import _check_keys, _positive

OPTIMIZERS = ("avgm", "adagrad", "adam", "yogi")
_DEFAULTS = {
    "avgm": {"lr": 1.0, "momentum": 0.9},
    "adagrad": {"lr": 0.1, "betas": (0.0, 0.0), "tau": 1e-3},
    "adam": {"lr": 0.01, "betas": (0.9, 0.99), "tau": 1e-3},
    "yogi": {"lr": 0.01, "betas": (0.9, 0.99), "tau": 1e-3},
}


class ServerOptimizer:
    def __init__(self, cfg: Mapping):
        cfg = dict(cfg)
        name = cfg.pop("name", None)
        if name not in OPTIMIZERS:
            raise ValueError(f"server_opt.name must be one of {OPTIMIZERS}, got {name!r}")
        self.name = name
        params = dict(_DEFAULTS[name])
        _check_keys(cfg, set(params), f"server_opt ({name})")
        params.update(cfg)
        self.lr = _positive("server_opt.lr", params["lr"])
        if name == "avgm":
            self.beta1 = float(params["momentum"])
            if not 0 <= self.beta1 < 1:
                raise ValueError(f"server_opt.momentum must be in [0, 1), got {self.beta1}")
        else:
            betas = params["betas"]
            if len(betas) != 2 or not all(0 <= float(b) < 1 for b in betas):
                raise ValueError(f"server_opt.betas must be two numbers in [0, 1), got {betas!r}")
            self.beta1, self.beta2 = (float(b) for b in betas)
            self.tau = _positive("server_opt.tau", params["tau"])
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, key: str, previous: np.ndarray, aggregated: np.ndarray) -> np.ndarray:
        delta = np.asarray(aggregated, np.float64) - previous
        if self.name == "avgm":
            m = self.beta1 * self.m.get(key, 0.0) + delta
            self.m[key] = m
            return previous + self.lr * m
        m = self.beta1 * self.m.get(key, 0.0) + (1 - self.beta1) * delta
        v_prev = self.v.get(key, np.zeros_like(delta))
        d2 = delta * delta
        if self.name == "adagrad":
            v = v_prev + d2
        elif self.name == "adam":
            v = self.beta2 * v_prev + (1 - self.beta2) * d2
        else:
            v = v_prev - (1 - self.beta2) * d2 * np.sign(v_prev - d2)
        self.m[key], self.v[key] = m, v
        return previous + self.lr * m / (np.sqrt(v) + self.tau)

    def state_dict(self) -> dict:
        return {"m": {k: v.copy() for k, v in self.m.items()}, "v": {k: v.copy() for k, v in self.v.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.m = {k: np.array(v, np.float64) for k, v in state["m"].items()}
        self.v = {k: np.array(v, np.float64) for k, v in state["v"].items()}
