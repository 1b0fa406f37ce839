"""Channel simulation for SplitWave: link models (static, trace replay, analytical wireless), real-time
shaping of byte streams (a TCP proxy), and virtual time.  Imports numpy and the standard library only."""

from .factory import LinkPair, make_link, make_link_pair
from .link import MTU_BYTES, Jitter, Link
from .paths import shared_dir, traces_dir
from .proxy import ShapingProxy, measure_sleep_precision
from .static import StaticLink, mathis_goodput
from .trace import Trace, TraceLink, load_trace, trace_from_timestamps
from .virtual import (
    ClientRoundPlan,
    RoundLatency,
    RoundResult,
    ServerQueue,
    VirtualClock,
    activation_bytes,
    round_latency_model,
    simulate_round,
)
from .wireless import (
    Cell,
    RadioParams,
    WirelessLink,
    noise_dbm,
    path_loss_db,
    pl_macro,
    pl_uma_los,
    pl_uma_nlos,
    pl_umi_los,
    pl_umi_nlos,
    place_clients,
    shannon_rate,
)

__all__ = [
    "Cell",
    "ClientRoundPlan",
    "Jitter",
    "Link",
    "LinkPair",
    "MTU_BYTES",
    "RadioParams",
    "RoundLatency",
    "RoundResult",
    "ServerQueue",
    "ShapingProxy",
    "StaticLink",
    "Trace",
    "TraceLink",
    "VirtualClock",
    "WirelessLink",
    "activation_bytes",
    "load_trace",
    "make_link",
    "make_link_pair",
    "mathis_goodput",
    "measure_sleep_precision",
    "noise_dbm",
    "path_loss_db",
    "pl_macro",
    "pl_uma_los",
    "pl_uma_nlos",
    "pl_umi_los",
    "pl_umi_nlos",
    "place_clients",
    "round_latency_model",
    "shannon_rate",
    "shared_dir",
    "simulate_round",
    "trace_from_timestamps",
    "traces_dir",
]
