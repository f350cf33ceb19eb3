"""Token n-grams shared by the contamination report (evaluate) and training decontamination (tokenize).

Both stages must agree exactly on what "an eval item's n-gram" is, or the tokenize stage could
cut one set of windows out of training while the report looks for another; so the definition
lives here once: the text of an item, its token n-grams with low-variety runs left out, and a
64-bit hash per n-gram.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import yaml

MIN_DISTINCT_FRACTION = 0.5  # an n-gram counts only with at least n/2 distinct tokens
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier: a polynomial hash mod 2^64


def ngram_hashes(windows: np.ndarray) -> np.ndarray:
    """Hash each row of an (m, n) integer array to a uint64 (order-sensitive)."""
    h = np.zeros(windows.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(windows.shape[1]):
            h = h * _MULT + windows[:, j].astype(np.uint64) + np.uint64(1)
    return h


def item_ngrams(ids: list[int], n: int) -> np.ndarray:
    """Hashes of the item's n-grams, leaving out runs of few distinct tokens (indentation,
    '*****' rules): they occur everywhere and say nothing about having seen the item.
    An item shorter than n tokens counts as one n-gram of its own length."""
    arr = np.asarray(ids, dtype=np.int64)
    if len(arr) == 0:
        return np.zeros(0, np.uint64)
    win = arr[None, :] if len(arr) < n else np.lib.stride_tricks.sliding_window_view(arr, n)
    srt = np.sort(win, axis=1)
    distinct = 1 + (np.diff(srt, axis=1) != 0).sum(axis=1)
    keep = distinct >= min(MIN_DISTINCT_FRACTION * n, win.shape[1])
    return ngram_hashes(win[keep])


def contains(sorted_hashes: np.ndarray, grams: np.ndarray) -> np.ndarray:
    """Boolean mask: which of `grams` occur in `sorted_hashes` (binary search, no re-sorting)."""
    if len(grams) == 0 or len(sorted_hashes) == 0:
        return np.zeros(len(grams), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_hashes, grams), len(sorted_hashes) - 1)
    return sorted_hashes[pos] == grams


def seen_any(grams: np.ndarray, train_sorted: np.ndarray) -> bool:
    """Whether any hash occurs in the sorted training hashes."""
    return bool(contains(train_sorted, grams).any())


def item_text(row: dict) -> str:
    """The text the model is shown and scored on for one eval row."""
    if "text" in row:
        return row["text"]
    if "context" in row:
        return row["context"] + row["choices"][row["label"]]
    return f"Q: {row['question']}\nA: {row['answer']}"


class _TaskLoader(yaml.SafeLoader):
    """Safe YAML loading that keeps lm-eval's `!function module.name` tags as plain strings."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def load_task_yaml(path: Path):
    """One lm-eval task YAML, safely (tags read as text, never run)."""
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 - a SafeLoader


def task_files(tasks_dir: Path) -> dict[str, Path]:
    """task name -> the local jsonl it reads (tasks with `dataset_kwargs.data_files.test`).

    A relative data file is relative to the task YAML's folder (evals/tasks/omp_data.py loads it so
    for lm-eval); the result is normalised, e.g. `evals/tasks/../data/x.jsonl` -> `evals/data/x.jsonl`.
    """
    out = {}
    for y in sorted(tasks_dir.glob("*.yaml")):
        try:
            cfg = load_task_yaml(y)
        except yaml.YAMLError:
            continue
        files = ((cfg or {}).get("dataset_kwargs") or {}).get("data_files") or {}
        if isinstance(files, dict) and "test" in files and "task" in cfg:
            out[cfg["task"]] = Path(os.path.normpath(y.parent / files["test"]))
    return out


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_texts(tasks_dir: Path) -> list[str]:
    """The scored text of every item of every local task under `tasks_dir`, each file once."""
    texts = []
    for path in sorted(set(task_files(tasks_dir).values())):
        if path.is_file():
            texts += [item_text(r) for r in read_rows(path)]
    return texts


def covered_by(ids: np.ndarray, banned: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask over `ids`: tokens inside some n-token window whose hash is in `banned` (sorted)."""
    covered = np.zeros(len(ids), dtype=bool)
    if len(ids) < n or len(banned) == 0:
        return covered
    hit = contains(banned, ngram_hashes(np.lib.stride_tricks.sliding_window_view(ids, n)))
    for k in range(n):
        covered[k:k + len(hit)] |= hit
    return covered
