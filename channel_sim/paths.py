"""Where the read-only shared data (traces, specs) lives: `../shared` beside the repo root."""
from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    """The shared folder; env SPLITWAVE_SHARED overrides so tests/CI can point elsewhere."""
    env = os.environ.get("SPLITWAVE_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared"


def traces_dir() -> Path:
    return shared_dir() / "traces"
