"""Where the read-only shared data (traces, specs) lives: `../shared` beside the repo root, or $SPLITWAVE_SHARED.

The resolver itself is `edge.paths` (torch-free, no channel_sim import), so the edge, the server and the link
models agree on one folder and one environment variable.
"""
from __future__ import annotations

from pathlib import Path

from edge.paths import shared_dir

__all__ = ["shared_dir", "traces_dir"]


def traces_dir() -> Path:
    return shared_dir() / "traces"
