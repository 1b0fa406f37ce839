"""numpy AdamW with the exact semantics of torch.optim.AdamW (the edge has no torch).

Decoupled weight decay (p *= 1 - lr*wd), bias-corrected moments, eps added after the sqrt of the
bias-corrected second moment, the same defaults; matches torch to ~1e-7 in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class AdamW:
    """AdamW over a dict of float32 arrays, updated in place."""

    def __init__(
        self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2
    ):
        self.lr, self.betas, self.eps, self.weight_decay = (
            float(lr),
            (float(betas[0]), float(betas[1])),
            float(eps),
            float(weight_decay),
        )
        self.state: dict[str, dict[str, Any]] = {}

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """Update params[name] in place for every name in grads (names absent from grads are frozen)."""
        b1, b2 = self.betas
        for name, g in grads.items():
            p = params[name]
            g = np.asarray(g, dtype=p.dtype)
            st = self.state.get(name)
            if st is None:
                st = self.state[name] = {"step": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
            st["step"] += 1
            t = st["step"]
            # same operation order as torch's single-tensor implementation
            p *= np.float32(1.0 - self.lr * self.weight_decay)
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m += (g - m) * np.float32(1.0 - b1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
            v *= np.float32(b2)
            v += np.float32(1.0 - b2) * g * g
            bc1 = 1.0 - b1**t
            bc2 = 1.0 - b2**t
            step_size = self.lr / bc1
            denom = np.sqrt(v) / np.float32(bc2**0.5) + np.float32(self.eps)
            p -= np.float32(step_size) * (m / denom)

    def state_dict(self) -> dict[str, Any]:
        return {
            "hparams": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay},
            "state": {
                k: {"step": v["step"], "exp_avg": v["exp_avg"].copy(), "exp_avg_sq": v["exp_avg_sq"].copy()}
                for k, v in self.state.items()
            },
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        hp = sd.get("hparams", {})
        self.lr = float(hp.get("lr", self.lr))
        self.betas = tuple(hp.get("betas", self.betas))
        self.eps = float(hp.get("eps", self.eps))
        self.weight_decay = float(hp.get("weight_decay", self.weight_decay))
        self.state = {
            k: {
                "step": int(v["step"]),
                "exp_avg": np.array(v["exp_avg"], dtype=np.float32),
                "exp_avg_sq": np.array(v["exp_avg_sq"], dtype=np.float32),
            }
            for k, v in sd["state"].items()
        }
