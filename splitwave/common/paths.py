"""Where datasets and the shared folder live: one resolver for the edge, the server and channel_sim.

A device holds its own copy of its dataset (no sample crosses the network), so where that copy lives must be
easy to say and easy to diagnose. Order, first set wins:
  1. an explicit folder (`splitwave edge --data-dir DIR`),
  2. env SPLITWAVE_DATA_DIR (the data folder itself),
  3. env SPLITWAVE_SHARED (the shared folder; its data is in `data/`),
  4. otherwise: `./data` in the working directory, then `../shared/data` beside the repository checkout.
Layout inside a data folder: `sst2/train.tsv`, `ag_news/train_sample_alps.tsv`, `e2e/lora_format/train.txt`, ...
(the same as `../shared/data`; see `splitwave.common.datasets.DATA_FILES`).
"""

from __future__ import annotations

import os
from pathlib import Path

from splitwave.channel.paths import SHARED_ENV, shared_dir

DATA_ENV = "SPLITWAVE_DATA_DIR"

__all__ = ["DATA_ENV", "SHARED_ENV", "DataNotFound", "data_dir", "data_dirs", "find_data_file", "shared_dir"]


class DataNotFound(FileNotFoundError):
    """A dataset file is in none of the places searched; the message lists each of them."""


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """The data folders searched, in order, each with what put it on the list (for error messages)."""
    if data_dir:
        return [(Path(data_dir), "--data-dir")]
    if os.environ.get(DATA_ENV):
        return [(Path(os.environ[DATA_ENV]), f"${DATA_ENV}")]
    if os.environ.get(SHARED_ENV):
        return [(Path(os.environ[SHARED_ENV]) / "data", f"${SHARED_ENV}/data")]
    return [(Path.cwd() / "data", "./data"), (shared_dir() / "data", "../shared/data beside the checkout")]


def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder in use: the first one searched that exists (else the first one searched)."""
    dirs = data_dirs(data_dir)
    return next((d for d, _ in dirs if d.is_dir()), dirs[0][0])


def find_data_file(rel: str, data_dir: str | os.PathLike | None = None) -> Path:
    """`rel` (e.g. `sst2/train.tsv`) in the first data folder that has it; DataNotFound names every place."""
    tried = []
    for d, why in data_dirs(data_dir):
        p = d / rel
        if p.is_file():
            return p
        tried.append(f"{p} ({why})")
    raise DataNotFound(
        f"dataset file {rel} not found; looked in: {'; '.join(tried)}. A device needs its own copy "
        f"of the data: pass --data-dir DIR or set {DATA_ENV} to a folder holding {rel}"
    )
