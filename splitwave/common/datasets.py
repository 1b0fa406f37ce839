"""Raw datasets as a device holds them: which file each (dataset, split) is, and loaders that read it.

Loaders return untokenized rows (texts + labels, or prompt/target pairs); turning them into token arrays is
`splitwave.common.encoding`'s job, so a loader stays the same whichever model's tokenizer the run uses.
`limit` subsampling is seeded, so every party that loads the same spec sees the same rows.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitwave.common.paths import find_data_file

SST2_LABELS = ("negative", "positive")
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")

# The file each (dataset, split) is read from, relative to a data folder (splitwave.common.paths): what a device must hold.
DATA_FILES = {
    "sst2": {
        "train": "sst2/train.tsv",
        "dev": "sst2/dev.tsv",
        "validation": "sst2/dev.tsv",
        "test_unofficial": "sst2/test_labeled_unofficial.tsv",
    },
    "ag_news": {
        "train": "ag_news/train_sample_alps.tsv",
        "test": "ag_news/test_alps.tsv",
        "test_official": "ag_news/test.csv",
    },
    "e2e": {
        "train": "e2e/lora_format/train.txt",
        "valid": "e2e/lora_format/valid.txt",
        "validation": "e2e/lora_format/valid.txt",
        "dev": "e2e/lora_format/valid.txt",
        "test": "e2e/lora_format/test.txt",
    },
}
_SPLIT_HELP = {
    "sst2": "SST-2 split must be one of {}",
    "ag_news": "AG News split must be one of {}",
    "e2e": "E2E split must be one of {}",
}

DataDir = str | os.PathLike | None  # an explicit data folder, or None for splitwave.common.paths' search order


def data_file(name: str, split: str) -> str:
    """The relative path of a dataset split (ValueError for an unknown dataset or split)."""
    if name not in DATA_FILES:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATA_FILES)}")
    files = DATA_FILES[name]
    if split not in files:
        raise ValueError(f"{_SPLIT_HELP[name].format(sorted(files))}, got {split!r}")
    return files[split]


@dataclass(frozen=True)
class TextDataset:
    """Raw texts + integer labels (0..num_labels-1) of a classification split."""

    name: str
    texts: list[str]
    labels: np.ndarray  # int64 [n]
    num_labels: int
    label_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return TextDataset(
            self.name, [self.texts[i] for i in idx], self.labels[idx].copy(), self.num_labels, self.label_names
        )


@dataclass(frozen=True)
class PromptDataset:
    """Prompt/target string pairs for causal-LM fine-tuning (E2E: prompt = MR, target = reference)."""

    name: str
    prompts: list[str]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PromptDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return PromptDataset(self.name, [self.prompts[i] for i in idx], [self.targets[i] for i in idx])

    def references_by_prompt(self) -> dict[str, list[str]]:
        """Group references per MR (insertion-ordered) for BLEU-style multi-reference evaluation."""
        out: dict[str, list[str]] = {}
        for p, t in zip(self.prompts, self.targets):
            out.setdefault(p, []).append(t)
        return out


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Seeded subset of row indices (kept in file order), or None for all rows."""
    if limit is None or limit >= n:
        return None
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _read_tsv(path: Path, skip_header: bool) -> list[list[str]]:
    # newline="" lets csv strip CRLF (test_labeled_unofficial.tsv) with QUOTE_NONE as the README says.
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if skip_header else rows


def load_sst2(split: str = "train", limit: int | None = None, seed: int = 0, data_dir: DataDir = None) -> TextDataset:
    """GLUE SST-2. split: train (67,349) | dev (872) | test_unofficial (1,821, non-GLUE labels)."""
    rows = _read_tsv(find_data_file(data_file("sst2", split), data_dir), skip_header=True)
    # Sentences end in a trailing space before the tab; strip it (tokenizers ignore it anyway).
    texts = [r[0].strip() for r in rows]
    labels = np.array([int(r[1]) for r in rows], dtype=np.int64)
    ds = TextDataset(f"sst2/{split}", texts, labels, 2, SST2_LABELS)
    idx = _subsample(len(ds), limit, seed)
    return ds if idx is None else ds.subset(idx)


def load_ag_news(
    split: str = "train", limit: int | None = None, seed: int = 0, data_dir: DataDir = None
) -> TextDataset:
    """AG News, description text only, labels 0..3 = World, Sports, Business, Sci/Tech.

    split: train (the 10,001-row training sample) | test (official 7,600, same text field as train)
    | test_official (test.csv, the original CSV's description column).
    """
    name_to_id = {n: i for i, n in enumerate(AG_NEWS_LABELS)}
    path = find_data_file(data_file("ag_news", split), data_dir)
    if split in ("train", "test"):
        rows = _read_tsv(path, skip_header=False)
        texts = [r[0].strip() for r in rows]
        labels = np.array([name_to_id[r[1].strip()] for r in rows], dtype=np.int64)
    else:  # test_official
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        # Original format writes in-field newlines as a literal backslash + n (sometimes a lone backslash).
        texts = [" ".join(r[2].replace("\\n", " ").replace("\\", " ").split()) for r in rows]
        labels = np.array([int(r[0]) - 1 for r in rows], dtype=np.int64)
    ds = TextDataset(f"ag_news/{split}", texts, labels, 4, AG_NEWS_LABELS)
    idx = _subsample(len(ds), limit, seed)
    return ds if idx is None else ds.subset(idx)


def load_e2e(split: str = "train", limit: int | None = None, seed: int = 0, data_dir: DataDir = None) -> PromptDataset:
    """E2E NLG in the LoRA paper's `MR||reference` format: train 42,061 | valid 4,672 | test 4,693.

    prompt = the MR (`name : X | Type : pub | ...`), target = the tokenized reference, stripped.
    """
    path = find_data_file(data_file("e2e", split), data_dir)
    split = "valid" if split in ("validation", "dev") else split
    prompts, targets = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            mr, sep, ref = line.partition("||")
            if not sep:
                raise ValueError(f"E2E line without '||': {line[:80]!r}")
            prompts.append(mr.strip())
            targets.append(ref.strip())
    ds = PromptDataset(f"e2e/{split}", prompts, targets)
    idx = _subsample(len(ds), limit, seed)
    return ds if idx is None else ds.subset(idx)


def load_dataset(
    name: str, split: str, limit: int | None = None, seed: int = 0, data_dir: DataDir = None
) -> TextDataset | PromptDataset:
    """Dispatch by name ('sst2' | 'ag_news' | 'e2e') for configs; `data_dir` as in splitwave.common.paths."""
    loaders: dict[str, Callable[..., TextDataset | PromptDataset]] = {
        "sst2": load_sst2,
        "ag_news": load_ag_news,
        "e2e": load_e2e,
    }
    data_file(name, split)  # an unknown dataset or split: ValueError before any file is looked for
    return loaders[name](split, limit=limit, seed=seed, data_dir=data_dir)
