"""Analytical wireless link of one cell (channel.md section 2): path loss, shadowing per period,
small-scale fading per coherence block, noise, Shannon rate with gap and cap, OFDMA sharing.

A transfer that spans several coherence blocks sums bits block by block at each block's rate, so the
link is FIFO-additive like the others.  Randomness is addressed by (seed, block index), not drawn in
call order, so `rate_at(t)` and `done()` agree whatever order they are asked in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .link import Jitter, Link

RateFn = Callable[[float], float]  # bandwidth (Hz) -> mean rate (bit/s) of one link

C_LIGHT = 3.0e8  # TR 38.901 and the spec use c = 3e8 m/s (d'_BP = 560 m at 3.5 GHz for UMa)
_BLOCKS_PER_CHUNK = 1024
_MAX_WINDOW = 1 << 16  # blocks per step of the block walk (vectorised)
_MAX_WINDOWS = 1 << 16  # a transfer longer than ~4e9 blocks is an error, never a hang


def _index_of(t: float, length: float) -> int:
    """The interval i with i*length <= t < (i+1)*length, boundaries computed as (i+1)*length in floating
    point (t = 256.58, length = 0.01: t/length = 25657.999..., but 25658*0.01 == 256.58, so i = 25658)."""
    i = math.floor(t / length)
    for _ in range(4):  # the quotient is off by at most one; bounded anyway
        if (i + 1) * length <= t:
            i += 1
        elif i > 0 and i * length > t:
            i -= 1
        else:
            break
    return int(i)


# ---------------------------------------------------------------- path loss (dB), distances in m
def pl_macro(d2d_m: float) -> float:
    """Simplified macro model (TR 36.814/36.942, 2 GHz): 128.1 + 37.6 log10(d_km)."""
    return 128.1 + 37.6 * math.log10(d2d_m / 1000.0)


def d3d(d2d_m: float, h_bs: float = 25.0, h_ut: float = 1.5) -> float:
    return math.hypot(d2d_m, h_bs - h_ut)


def breakpoint_uma(fc_ghz: float, h_bs: float = 25.0, h_ut: float = 1.5) -> float:
    """d'_BP = 4 h'_BS h'_UT f_c / c with effective heights h' = h - 1 m (TR 38.901 Table 7.4.1-1)."""
    return 4.0 * (h_bs - 1.0) * (h_ut - 1.0) * fc_ghz * 1e9 / C_LIGHT


def pl_uma_los(d2d_m: float, fc_ghz: float, h_bs: float = 25.0, h_ut: float = 1.5) -> float:
    d = d3d(d2d_m, h_bs, h_ut)
    dbp = breakpoint_uma(fc_ghz, h_bs, h_ut)
    if d2d_m <= dbp:
        return 28.0 + 22.0 * math.log10(d) + 20.0 * math.log10(fc_ghz)
    return 28.0 + 40.0 * math.log10(d) + 20.0 * math.log10(fc_ghz) - 9.0 * math.log10(dbp**2 + (h_bs - h_ut) ** 2)


def pl_uma_nlos(d2d_m: float, fc_ghz: float, h_bs: float = 25.0, h_ut: float = 1.5) -> float:
    d = d3d(d2d_m, h_bs, h_ut)
    nlos = 13.54 + 39.08 * math.log10(d) + 20.0 * math.log10(fc_ghz) - 0.6 * (h_ut - 1.5)
    return max(pl_uma_los(d2d_m, fc_ghz, h_bs, h_ut), nlos)


def pl_umi_los(d2d_m: float, fc_ghz: float, h_bs: float = 10.0, h_ut: float = 1.5) -> float:
    """UMi street canyon LOS (TR 38.901), with the same breakpoint form as UMa (210 m at 3.5 GHz)."""
    d = d3d(d2d_m, h_bs, h_ut)
    dbp = breakpoint_uma(fc_ghz, h_bs, h_ut)
    if d2d_m <= dbp:
        return 32.4 + 21.0 * math.log10(d) + 20.0 * math.log10(fc_ghz)
    return 32.4 + 40.0 * math.log10(d) + 20.0 * math.log10(fc_ghz) - 9.5 * math.log10(dbp**2 + (h_bs - h_ut) ** 2)


def pl_umi_nlos(d2d_m: float, fc_ghz: float, h_bs: float = 10.0, h_ut: float = 1.5) -> float:
    d = d3d(d2d_m, h_bs, h_ut)
    nlos = 22.4 + 35.3 * math.log10(d) + 21.3 * math.log10(fc_ghz) - 0.3 * (h_ut - 1.5)
    return max(pl_umi_los(d2d_m, fc_ghz, h_bs, h_ut), nlos)


def los_probability(model: str, d2d_m: float) -> float:
    """TR 38.901 Table 7.4.2-1 (UMa with h_UT <= 13 m)."""
    if d2d_m <= 18.0:
        return 1.0
    if model == "uma":
        return 18.0 / d2d_m + math.exp(-d2d_m / 63.0) * (1.0 - 18.0 / d2d_m)
    if model == "umi":
        return 18.0 / d2d_m + math.exp(-d2d_m / 36.0) * (1.0 - 18.0 / d2d_m)
    return 1.0


# default shadowing sigma (dB) per (model, los); macro: 8 dB (TR 36.942 macro cell)
SHADOW_SIGMA_DB = {
    ("macro", True): 8.0,
    ("macro", False): 8.0,
    ("uma", True): 4.0,
    ("uma", False): 6.0,
    ("umi", True): 4.0,
    ("umi", False): 7.82,
}


def path_loss_db(
    model: str, d2d_m: float, fc_ghz: float = 3.5, los: bool = True, h_bs: float = 25.0, h_ut: float = 1.5
) -> float:
    if model == "macro":
        return pl_macro(d2d_m)
    if model == "uma":
        return (pl_uma_los if los else pl_uma_nlos)(d2d_m, fc_ghz, h_bs, h_ut)
    if model == "umi":
        return (pl_umi_los if los else pl_umi_nlos)(d2d_m, fc_ghz, h_bs, h_ut)
    raise ValueError(f"unknown path-loss model {model!r} (macro | uma | umi)")


def noise_dbm(bandwidth_hz: float, nf_db: float) -> float:
    return -174.0 + 10.0 * math.log10(bandwidth_hz) + nf_db


def shannon_rate(bandwidth_hz: float, snr_db: float, gap_db: float = 0.0, se_cap: float | None = None) -> float:
    """R = B min(log2(1 + SNR/Gamma), eta_max)."""
    se = math.log2(1.0 + 10.0 ** ((snr_db - gap_db) / 10.0))
    if se_cap is not None:
        se = min(se, se_cap)
    return bandwidth_hz * se


def place_clients(
    n: int, r_cell_m: float = 500.0, d_min_m: float = 35.0, seed: int | Sequence[int] | None = None
) -> np.ndarray:
    """2-D distances of n clients drawn uniformly in the annulus d_min <= d <= r_cell (seeded)."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(size=n)
    return np.sqrt(u * (r_cell_m**2 - d_min_m**2) + d_min_m**2)


# ---------------------------------------------------------------- the cell
class Cell:
    """The bandwidth of one direction of one cell, split among the clients transmitting at a time.

    allocation: "equal" (B / K_active), "proportional_fair" (max sum log rate over attached links,
    from their mean SNR) or "latency_balancing" (equal mean rates, i.e. equal time for equal payloads).
    `n_active` overrides K for the equal split (default: number of attached links).
    """

    def __init__(self, bandwidth_hz: float = 20e6, allocation: str = "equal", n_active: int | None = None):
        if allocation not in ("equal", "proportional_fair", "latency_balancing"):
            raise ValueError(f"unknown allocation {allocation!r}")
        self.bandwidth_hz = float(bandwidth_hz)
        self.allocation = allocation
        self._n_active = n_active
        self.links: list[WirelessLink] = []
        self._shares: dict[int, float] | None = None

    @property
    def n_active(self) -> int:
        return max(1, self._n_active if self._n_active is not None else len(self.links))

    @n_active.setter
    def n_active(self, k: int | None) -> None:
        self._n_active = k
        self.invalidate()

    def attach(self, link: WirelessLink) -> None:
        if link not in self.links:
            self.links.append(link)
            self.invalidate()

    def invalidate(self) -> None:
        self._shares = None

    def bandwidth_for(self, link: WirelessLink) -> float:
        if self.allocation == "equal" or len(self.links) <= 1:
            return self.bandwidth_hz / self.n_active
        if self._shares is None:
            self._shares = self._allocate()
        return self._shares[id(link)]

    def _allocate(self) -> dict[int, float]:
        B = self.bandwidth_hz
        rate_fns = [link.mean_rate_for_bandwidth for link in self.links]
        if self.allocation == "latency_balancing":
            # common rate r with sum_k B_k(r) = B, B_k(r) = bandwidth link k needs for rate r
            def need(fn: RateFn, r: float) -> float:
                lo, hi = 0.0, B
                if fn(hi) < r:
                    return math.inf
                for _ in range(60):
                    mid = 0.5 * (lo + hi)
                    lo, hi = (mid, hi) if fn(mid) < r else (lo, mid)
                return hi

            lo, hi = 0.0, max(fn(B) for fn in rate_fns)
            for _ in range(60):
                r = 0.5 * (lo + hi)
                lo, hi = (r, hi) if sum(need(fn, r) for fn in rate_fns) <= B else (lo, r)
            shares = [need(fn, lo) for fn in rate_fns]
        else:  # proportional fair: d/dB log r_k(B_k) = lambda for all k

            def dlog(fn: RateFn, b: float) -> float:
                h = 1e-6 * B
                return (math.log(fn(b + h)) - math.log(fn(max(b - h, 1e-9 * B)))) / (b + h - max(b - h, 1e-9 * B))

            def b_of(fn: RateFn, lam: float) -> float:
                lo, hi = 1e-9 * B, B
                for _ in range(60):
                    mid = 0.5 * (lo + hi)
                    lo, hi = (mid, hi) if dlog(fn, mid) > lam else (lo, mid)
                return 0.5 * (lo + hi)

            lo, hi = 1e-12, 1e3 / (1e-9 * B)
            for _ in range(80):
                lam = math.sqrt(lo * hi)
                lo, hi = (lam, hi) if sum(b_of(fn, lam) for fn in rate_fns) > B else (lo, lam)
            shares = [b_of(fn, hi) for fn in rate_fns]
        total = sum(shares)
        return {id(link): B * s / total for link, s in zip(self.links, shares)}


@dataclass(frozen=True)
class RadioParams:
    """Link-budget parameters of one direction (defaults: uplink of an edge device in a macro cell)."""

    direction: str = "up"  # "up": full P_tx over the share; "down": BS power split with bandwidth
    p_tx_dbm: float = 23.0
    nf_db: float = 5.0
    g_tx_dbi: float = 0.0
    g_rx_dbi: float = 0.0
    fc_ghz: float = 3.5
    h_bs_m: float = 25.0
    h_ut_m: float = 1.5
    pathloss: str = "macro"
    los: bool = True
    snr_gap_db: float = 0.0
    se_cap: float | None = 7.4


class WirelessLink(Link):
    """One direction between a client at distance d and the base station of `cell`.

    shadowing_period_s: None = redrawn per round (call `set_round`), else every that many seconds.
    fading: "none" | "rayleigh" | "rician" (with K factor `rician_k`, linear), i.i.d. per coherence block.
    """

    def __init__(
        self,
        distance_m: float,
        radio: RadioParams | None = None,
        cell: Cell | None = None,
        shadowing_db: float | None = None,
        shadowing_period_s: float | None = None,
        fading: str = "rayleigh",
        rician_k: float = 0.0,
        coherence_s: float = 0.010,
        latency_s: float = 0.0,
        jitter: Jitter | None = None,
        seed: int | None = None,
    ):
        super().__init__(latency_s, jitter, seed)
        self.radio = radio or RadioParams()
        if self.radio.direction not in ("up", "down"):
            raise ValueError("direction must be 'up' or 'down'")
        if fading not in ("none", "rayleigh", "rician"):
            raise ValueError(f"unknown fading {fading!r}")
        self.distance_m = float(distance_m)
        self.cell = cell or Cell()
        self.cell.attach(self)
        self.shadowing_db = (
            SHADOW_SIGMA_DB[(self.radio.pathloss, self.radio.los)] if shadowing_db is None else float(shadowing_db)
        )
        self.shadowing_period_s = shadowing_period_s
        self.fading = fading
        self.rician_k = float(rician_k)
        self.coherence_s = float(coherence_s)
        if not (math.isfinite(self.coherence_s) and self.coherence_s > 0):
            raise ValueError(f"coherence time must be > 0 s, got {coherence_s!r}")
        if shadowing_period_s is not None and not (math.isfinite(shadowing_period_s) and shadowing_period_s > 0):
            raise ValueError(f"shadowing period must be > 0 s, got {shadowing_period_s!r}")
        self.round = 0
        self.path_loss_db = path_loss_db(
            self.radio.pathloss,
            self.distance_m,
            self.radio.fc_ghz,
            self.radio.los,
            self.radio.h_bs_m,
            self.radio.h_ut_m,
        )
        self._base = 0 if seed is None else int(seed)
        self._chunks: dict[int, np.ndarray] = {}
        self._shadow_cache: dict[int, float] = {}

    # ---- random state addressed by index
    def set_round(self, r: int) -> None:
        """Per-round shadowing (the default): a new round draws a new shadowing value."""
        if r != self.round:
            self.round = int(r)
            self.cell.invalidate()

    def shadowing_at(self, t: float) -> float:
        period = self.round if self.shadowing_period_s is None else _index_of(t, self.shadowing_period_s)
        return self._shadow_of_period(period)

    def _shadow_of_period(self, period: int) -> float:
        if self.shadowing_db == 0.0:
            return 0.0
        period = max(period, 0)
        x = self._shadow_cache.get(period)
        if x is None:
            z = np.random.default_rng([self._base, 11, period]).standard_normal()
            x = self._shadow_cache[period] = float(self.shadowing_db * z)
            if len(self._shadow_cache) > 256:
                self._shadow_cache.clear()
        return x

    def _fading_chunk(self, c: int) -> np.ndarray:
        g = self._chunks.get(c)
        if g is None:
            rng = np.random.default_rng([self._base, 13, c])
            if self.fading == "none":
                g = np.ones(_BLOCKS_PER_CHUNK)
            else:
                h = (rng.standard_normal(_BLOCKS_PER_CHUNK) + 1j * rng.standard_normal(_BLOCKS_PER_CHUNK)) / math.sqrt(
                    2
                )
                if self.fading == "rician":
                    k = self.rician_k
                    h = math.sqrt(k / (k + 1)) + math.sqrt(1 / (k + 1)) * h
                g = np.abs(h) ** 2
            if len(self._chunks) > 64:
                self._chunks.clear()
            self._chunks[c] = g
        return g

    def fading_gain(self, block: int) -> float:
        c, i = divmod(block, _BLOCKS_PER_CHUNK)
        return float(self._fading_chunk(c)[i])

    def _gains(self, blocks: np.ndarray) -> np.ndarray:
        """fading_gain for an array of block indices (one lookup per chunk, not per block)."""
        if self.fading == "none":
            return np.ones(len(blocks))
        chunk, idx = np.divmod(np.asarray(blocks, dtype=np.int64), _BLOCKS_PER_CHUNK)
        if chunk[0] == chunk[-1]:  # blocks are sorted: one chunk
            return self._fading_chunk(int(chunk[0]))[idx]
        out = np.empty(len(blocks))
        for c in range(int(chunk[0]), int(chunk[-1]) + 1):
            sel = chunk == c
            out[sel] = self._fading_chunk(int(c))[idx[sel]]
        return out

    # ---- link budget
    def snr_db(self, bandwidth_hz: float, shadow_db: float = 0.0, gain: float = 1.0) -> float:
        r = self.radio
        p_tx = r.p_tx_dbm
        if r.direction == "down":  # BS power spectral density is fixed: power follows the share
            p_tx += 10.0 * math.log10(bandwidth_hz / self.cell.bandwidth_hz)
        p_rx = p_tx + r.g_tx_dbi + r.g_rx_dbi - self.path_loss_db - shadow_db + 10.0 * math.log10(max(gain, 1e-30))
        return p_rx - noise_dbm(bandwidth_hz, r.nf_db)

    def mean_rate_for_bandwidth(self, bandwidth_hz: float) -> float:
        """Rate without fading at the current round's shadowing (what allocations plan with)."""
        return shannon_rate(
            bandwidth_hz, self.snr_db(bandwidth_hz, self.shadowing_at(0.0)), self.radio.snr_gap_db, self.radio.se_cap
        )

    @property
    def bandwidth_hz(self) -> float:
        return self.cell.bandwidth_for(self)

    def rate_at(self, t: float) -> float:
        b = self.bandwidth_hz
        return shannon_rate(
            b,
            self.snr_db(b, self.shadowing_at(t), self.fading_gain(self.block_of(t))),
            self.radio.snr_gap_db,
            self.radio.se_cap,
        )

    def block_of(self, t: float) -> int:
        """The coherence block b with b*T_c <= t < (b+1)*T_c, exactly as the block walk computes the
        boundaries ((b+1)*T_c in floating point): `floor(t / T_c)` alone can disagree with them."""
        return _index_of(t, self.coherence_s)

    def _rates(self, blocks: np.ndarray, shadow_db: np.ndarray, bandwidth_hz: float) -> np.ndarray:
        """Vectorised `rate_at` for given block indices and shadowing values (bit/s)."""
        r = self.radio
        p_tx = r.p_tx_dbm
        if r.direction == "down":
            p_tx += 10.0 * math.log10(bandwidth_hz / self.cell.bandwidth_hz)
        gain = self._gains(blocks)
        snr = (
            p_tx
            + r.g_tx_dbi
            + r.g_rx_dbi
            - self.path_loss_db
            - shadow_db
            + 10.0 * np.log10(np.maximum(gain, 1e-30))
            - noise_dbm(bandwidth_hz, r.nf_db)
        )
        se = np.log2(1.0 + 10.0 ** ((snr - r.snr_gap_db) / 10.0))
        if r.se_cap is not None:
            se = np.minimum(se, r.se_cap)
        return bandwidth_hz * se

    def _serialize(self, nbytes: int, start: float, queued: bool = False) -> float:
        """Walk the coherence blocks (and shadowing periods) from `start`, a window of blocks at a time.

        Segment boundaries are the integer-indexed times (b+1)*T_c (and (p+1)*period), so every window
        moves the walk forward by a whole number of blocks: it ends for any start and size (the old
        float `floor(t/T_c + eps)` walk could stay on a boundary forever)."""
        bits = 8.0 * nbytes
        if bits <= 0.0:
            return start
        tc, sp = self.coherence_s, self.shadowing_period_s
        bw = self.bandwidth_hz
        b0, t = self.block_of(start), float(start)
        # fast path (the proxy asks per 1500-byte segment): the transfer ends in the current segment
        first_end = (b0 + 1) * tc if sp is None else min((b0 + 1) * tc, (_index_of(t, sp) + 1) * sp)
        r = shannon_rate(
            bw, self.snr_db(bw, self.shadowing_at(t), self.fading_gain(b0)), self.radio.snr_gap_db, self.radio.se_cap
        )
        if r > 0.0 and r * (first_end - t) >= bits:
            return min(t + bits / r, first_end)
        window = 16
        for _ in range(_MAX_WINDOWS):
            edges = (b0 + np.arange(1, window + 1)) * tc  # ends of blocks b0 .. b0+window-1
            seg_end, blocks = edges, b0 + np.arange(window)
            if sp is None:
                shadow = np.full(window, self.shadowing_at(t))
            else:  # shadowing boundaries inside the window split blocks into segments
                p0 = _index_of(t, sp)
                p_edges = (p0 + np.arange(1, int((edges[-1] - t) / sp) + 2)) * sp
                p_edges = p_edges[p_edges < edges[-1]]
                seg_end = np.union1d(edges, p_edges)
                blocks = b0 + np.searchsorted(edges, seg_end, side="left")
                periods = p0 + np.searchsorted(p_edges, seg_end, side="left")
                shadow = np.array([self._shadow_of_period(int(p)) for p in periods])
            seg_start = np.concatenate(([t], seg_end[:-1]))
            rate = self._rates(blocks, shadow, bw)
            cap = rate * np.maximum(seg_end - seg_start, 0.0)
            cum = np.cumsum(cap)
            i = int(np.searchsorted(cum, bits, side="left"))
            if i < len(cum):
                before = cum[i - 1] if i > 0 else 0.0
                r = rate[i]
                if r <= 0.0:
                    return float(seg_end[i])
                return float(min(seg_start[i] + (bits - before) / r, seg_end[i]))
            bits -= cum[-1]
            b0 += window
            t = float(edges[-1])
            window = min(window * 2, _MAX_WINDOW)
        raise RuntimeError(f"{self!r}: {nbytes} B did not cross in {_MAX_WINDOWS} windows of blocks from t={start}")

    def __repr__(self) -> str:
        return (
            f"WirelessLink({self.radio.direction}, d={self.distance_m:.0f} m, PL={self.path_loss_db:.2f} dB,"
            f" {self.radio.pathloss}{'' if self.radio.los else '-NLOS'}, fading={self.fading})"
        )
