"""Build links from plain dicts (what the YAML/pydantic config produces).

Keys (times in ms, rates in Mbit/s, all optional unless marked):

common:   kind ("static" | "trace" | "wireless", required), latency_ms (0), seed (None),
          jitter ("none" | "normal" | "uniform"), jitter_ms (normal: sigma; uniform: high),
          jitter_mean_ms (normal: mean before truncation at 0, default 0), jitter_low_ms (uniform, 0)
static:   rate_mbps (required), loss (0.0, packet-loss probability), loss_model ("goodput" = Mathis
          goodput, default | "stall" = per-segment retransmission delays), mss_bytes (1460)
trace:    file (required: name in shared/traces or a path) or timestamps_ms (list, for tests),
          offset ("random" (seeded) | ms number; default 0), strict (false; true = Mahimahi mm-link's
          convention: an opportunity exactly at t is not used), mtu (1500 bytes per opportunity; 1448
          matches mm-link for a TCP stream with timestamps)
wireless: direction ("up" | "down"; default "up"), distance_m (None -> drawn uniformly in the
          cell disc with r_cell_m (500) and d_min_m (35) from seed), pathloss ("macro" | "uma" |
          "umi", default "macro"), los (true | false | "auto" = draw from TR 38.901 LOS probability),
          fc_ghz (3.5), h_bs_m (25; 10 for umi), h_ut_m (1.5), p_tx_dbm (23 up / 46 down), nf_db (5 up / 9 down),
          g_tx_dbi (0), g_rx_dbi (0), bandwidth_mhz (20, the cell's, per direction),
          n_active (clients sharing; default: links attached to the cell), allocation ("equal" |
          "proportional_fair" | "latency_balancing"), shadowing_db (default per model: macro 8,
          UMa 4/6, UMi 4/7.82; 0 = off), shadowing_period_ms (None = per round via set_round),
          fading ("rayleigh" | "rician" | "none"; default "rayleigh"), rician_k (linear, 0),
          coherence_ms (10), snr_gap_db (0), se_cap (7.4 bit/s/Hz; None = no cap)

A pair: {"uplink": {...}, "downlink": {...}}; keys of the pair dict other than those two are
defaults for both (e.g. a shared distance_m or seed).  Wireless links of several clients share
bandwidth only if given the same `Cell` (see `make_link(spec, cell=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .link import Jitter, Link
from .static import LOSS_MODELS, StaticLink
from .trace import TraceLink, load_trace, trace_from_timestamps
from .wireless import Cell, RadioParams, WirelessLink, los_probability, place_clients

_COMMON = {"kind", "latency_ms", "seed", "jitter", "jitter_ms", "jitter_mean_ms", "jitter_low_ms"}
_KEYS = {
    "static": _COMMON | {"rate_mbps", "loss", "loss_model", "mss_bytes"},
    "trace": _COMMON | {"file", "timestamps_ms", "offset", "strict", "mtu"},
    "wireless": _COMMON
    | {
        "direction",
        "distance_m",
        "r_cell_m",
        "d_min_m",
        "pathloss",
        "los",
        "fc_ghz",
        "h_bs_m",
        "h_ut_m",
        "p_tx_dbm",
        "nf_db",
        "g_tx_dbi",
        "g_rx_dbi",
        "bandwidth_mhz",
        "n_active",
        "allocation",
        "shadowing_db",
        "shadowing_period_ms",
        "fading",
        "rician_k",
        "coherence_ms",
        "snr_gap_db",
        "se_cap",
    },
}


@dataclass
class LinkPair:
    """A client's two directions: uplink (edge -> server) and downlink (server -> edge)."""

    uplink: Link
    downlink: Link

    def reset(self) -> None:
        self.uplink.reset()
        self.downlink.reset()

    def set_round(self, r: int) -> None:
        for link in (self.uplink, self.downlink):
            if hasattr(link, "set_round"):
                link.set_round(r)


def _jitter(spec: dict) -> Jitter:
    dist = spec.get("jitter") or "none"
    ms = float(spec.get("jitter_ms", 0.0)) / 1e3
    if dist == "normal":
        return Jitter("normal", sigma_s=ms, mean_s=float(spec.get("jitter_mean_ms", 0.0)) / 1e3)
    if dist == "uniform":
        return Jitter("uniform", low_s=float(spec.get("jitter_low_ms", 0.0)) / 1e3, high_s=ms)
    return Jitter(dist)


def check_link_spec(spec: dict) -> None:
    """Kind, keys and the selectable conventions of a link dict, without building it (no trace file is
    read): what the config schema checks at load time.  Raises ValueError naming the bad key."""
    kind = spec.get("kind")
    if kind not in _KEYS:
        raise ValueError(f"link kind must be one of {sorted(_KEYS)}, got {kind!r}")
    unknown = set(spec) - _KEYS[kind]
    if unknown:
        raise ValueError(f"unknown keys for a {kind} link: {sorted(unknown)} (valid: {sorted(_KEYS[kind])})")
    if not isinstance(spec.get("strict", False), bool):
        raise ValueError(f"strict must be true or false, got {spec['strict']!r}")
    if spec.get("loss_model", "goodput") not in LOSS_MODELS:
        raise ValueError(f"loss_model must be one of {list(LOSS_MODELS)}, got {spec['loss_model']!r}")
    mtu = spec.get("mtu", 1500)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or mtu <= 0:
        raise ValueError(f"mtu must be a positive integer (bytes per opportunity), got {mtu!r}")


def make_link(spec: dict, cell: Cell | None = None) -> Link:
    """One link from a dict (schema in the module docstring); unknown keys are an error."""
    check_link_spec(spec)
    kind = spec["kind"]
    latency = float(spec.get("latency_ms", 0.0)) / 1e3
    seed = spec.get("seed")
    jitter = _jitter(spec)
    if kind == "static":
        return StaticLink(
            float(spec["rate_mbps"]) * 1e6,
            latency,
            jitter,
            float(spec.get("loss", 0.0)),
            seed,
            int(spec.get("mss_bytes", 1460)),
            spec.get("loss_model", "goodput"),
        )
    if kind == "trace":
        if "timestamps_ms" in spec:
            trace = trace_from_timestamps(spec["timestamps_ms"])
        else:
            trace = load_trace(spec["file"])
        off = spec.get("offset", 0)
        offset_ms = None if off == "random" else float(off)
        return TraceLink(trace, latency, offset_ms, jitter, seed, spec.get("strict", False), spec.get("mtu", 1500))
    # wireless
    direction = spec.get("direction", "up")
    base = 0 if seed is None else int(seed)
    d = spec.get("distance_m")
    if d is None:
        d = float(place_clients(1, spec.get("r_cell_m", 500.0), spec.get("d_min_m", 35.0), [base, 1])[0])
    pathloss = spec.get("pathloss", "macro")
    los = spec.get("los", True)
    if los == "auto":
        los = bool(np.random.default_rng([base, 2]).uniform() < los_probability(pathloss, float(d)))
    radio = RadioParams(
        direction=direction,
        p_tx_dbm=float(spec.get("p_tx_dbm", 23.0 if direction == "up" else 46.0)),
        nf_db=float(spec.get("nf_db", 5.0 if direction == "up" else 9.0)),
        g_tx_dbi=float(spec.get("g_tx_dbi", 0.0)),
        g_rx_dbi=float(spec.get("g_rx_dbi", 0.0)),
        fc_ghz=float(spec.get("fc_ghz", 3.5)),
        h_bs_m=float(spec.get("h_bs_m", 10.0 if pathloss == "umi" else 25.0)),  # UMi: street-level BS
        h_ut_m=float(spec.get("h_ut_m", 1.5)),
        pathloss=pathloss,
        los=bool(los),
        snr_gap_db=float(spec.get("snr_gap_db", 0.0)),
        se_cap=spec.get("se_cap", 7.4),
    )
    if cell is None:
        cell = Cell(float(spec.get("bandwidth_mhz", 20.0)) * 1e6, spec.get("allocation", "equal"), spec.get("n_active"))
    sp = spec.get("shadowing_period_ms")
    return WirelessLink(
        float(d),
        radio,
        cell,
        shadowing_db=spec.get("shadowing_db"),
        shadowing_period_s=None if sp is None else float(sp) / 1e3,
        fading=spec.get("fading", "rayleigh"),
        rician_k=float(spec.get("rician_k", 0.0)),
        coherence_s=float(spec.get("coherence_ms", 10.0)) / 1e3,
        latency_s=latency,
        jitter=jitter,
        seed=seed,
    )


def make_link_pair(spec: dict, up_cell: Cell | None = None, down_cell: Cell | None = None) -> LinkPair:
    """{"uplink": {...}, "downlink": {...}, <shared defaults>} -> LinkPair.

    Shared defaults let both directions of a wireless client use the same distance and seed; the
    downlink direction is filled in for wireless links.  The downlink seed is offset so the two
    directions fade independently.
    """
    shared = {k: v for k, v in spec.items() if k not in ("uplink", "downlink")}
    up = {**shared, **spec.get("uplink", {})}
    down = {**shared, **spec.get("downlink", {})}
    if up.get("kind") == "wireless":
        up.setdefault("direction", "up")
    if down.get("kind") == "wireless":
        down.setdefault("direction", "down")
        if down.get("distance_m") is None and up.get("kind") == "wireless":
            # same client, same place: draw the distance once (from the uplink's seed)
            base = 0 if up.get("seed") is None else int(up["seed"])
            up.setdefault(
                "distance_m", float(place_clients(1, up.get("r_cell_m", 500.0), up.get("d_min_m", 35.0), [base, 1])[0])
            )
            down["distance_m"] = up["distance_m"]
    if down.get("seed") is not None and down.get("seed") == up.get("seed"):
        down["seed"] = int(down["seed"]) + 1_000_003
    return LinkPair(make_link(up, up_cell), make_link(down, down_cell))


def rate_summary(link: Link, t0: float = 0.0, t1: float = 1.0, n: int = 101) -> dict:
    """Mean/min/max of rate_at over [t0, t1] (bit/s), for logs."""
    r = np.array([link.rate_at(t) for t in np.linspace(t0, t1, n)])
    return {"mean_bps": float(r.mean()), "min_bps": float(r.min()), "max_bps": float(r.max())}


__all__ = ["LinkPair", "check_link_spec", "make_link", "make_link_pair", "rate_summary"]
