"""Privacy accounting for the Gaussian mechanism on client updates (client-level DP).

Method: Rényi DP of the Poisson-subsampled Gaussian mechanism at integer orders alpha, computed exactly
by the binomial expansion of Mironov, Talwar & Zhang (2019, "Rényi Differential Privacy of the Sampled
Gaussian Mechanism", Sec. 3.3; the same formula as TF-Privacy's `_compute_log_a_int`):

    A_alpha = sum_{k=0..alpha} C(alpha,k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 z^2))
    RDP(alpha) = log(A_alpha) / (alpha - 1)          (q = 1 gives alpha / (2 z^2))

RDP composes additively over T rounds. Conversion to (eps, delta): the standard bound
eps = min_alpha T*RDP(alpha) + log(1/delta)/(alpha-1) (Mironov 2017, Prop. 3); optionally the tighter
conversion of Balle et al. 2020 / Canonne et al. 2020 (`tight=True`), which TF-Privacy and Opacus use.
Only integer orders are used, so the reported epsilon is a valid (slightly conservative) upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 160, 192, 256, 384, 512)


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def rdp_subsampled_gaussian(q: float, noise_multiplier: float, order: int) -> float:
    """RDP epsilon of one round of the sampled Gaussian mechanism at integer order >= 2."""
    if not (0.0 < q <= 1.0):
        raise ValueError(f"sampling_rate must be in (0, 1], got {q}")
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if int(order) != order or order < 2:
        raise ValueError(f"order must be an integer >= 2, got {order}")
    alpha, z2 = int(order), float(noise_multiplier) ** 2
    if q == 1.0:
        return alpha / (2.0 * z2)
    log_q, log_1mq = math.log(q), math.log1p(-q)
    terms = [
        math.lgamma(alpha + 1)
        - math.lgamma(k + 1)
        - math.lgamma(alpha - k + 1)
        + (alpha - k) * log_1mq
        + k * log_q
        + (k * k - k) / (2.0 * z2)
        for k in range(alpha + 1)
    ]
    return _logsumexp(terms) / (alpha - 1)


def rdp_to_epsilon(orders: Sequence[int], rdp: Sequence[float], delta: float, tight: bool = False):
    """Best (eps, order) over the orders. tight=False: eps = rdp + log(1/delta)/(alpha-1)."""
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    best = (math.inf, None)
    for a, r in zip(orders, rdp):
        if tight:
            eps = r + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        else:
            eps = r + math.log(1.0 / delta) / (a - 1)
        if eps < best[0]:
            best = (max(eps, 0.0), a)
    return best


class RDPAccountant:
    """Accumulates RDP over rounds (possibly with changing q / z) and reports epsilon for a delta."""

    def __init__(self, orders: Iterable[int] = DEFAULT_ORDERS):
        self.orders = tuple(int(a) for a in orders)
        self.rdp = np.zeros(len(self.orders))

    def step(self, noise_multiplier: float, sampling_rate: float, num_steps: int = 1) -> None:
        self.rdp = self.rdp + num_steps * np.array(
            [rdp_subsampled_gaussian(sampling_rate, noise_multiplier, a) for a in self.orders]
        )

    def get_epsilon(self, delta: float, tight: bool = False) -> float:
        return rdp_to_epsilon(self.orders, self.rdp, delta, tight)[0]

    def state_dict(self) -> dict:
        return {"orders": list(self.orders), "rdp": [float(x) for x in self.rdp]}

    def load_state_dict(self, state: dict) -> None:
        self.orders = tuple(int(a) for a in state["orders"])
        self.rdp = np.asarray(state["rdp"], dtype=np.float64)


def compute_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    orders: Iterable[int] = DEFAULT_ORDERS,
    tight: bool = False,
) -> float:
    """Epsilon after `rounds` rounds of client-level DP with client sampling rate q."""
    acc = RDPAccountant(orders)
    acc.step(noise_multiplier, sampling_rate, rounds)
    return acc.get_epsilon(delta, tight)
