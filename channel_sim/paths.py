"""Where the read-only shared folder (traces, specs, data) lives: `../shared` beside the repo root, or $SPLITWAVE_SHARED.

One resolver for the link models, the edge and the server (`splitwave.common.paths` builds the data search on it),
so every party agrees on one folder and one environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = "SPLITWAVE_SHARED"

__all__ = ["SHARED_ENV", "shared_dir", "traces_dir"]


def shared_dir() -> Path:
    """The shared folder (traces, specs, data); env SPLITWAVE_SHARED overrides `../shared` beside the repo."""
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared"


def traces_dir() -> Path:
    return shared_dir() / "traces"
