"""Contamination: does any eval item share an n-gram with exactly the tokens training saw?

The training data is published as indices (artifacts/blend), so "what training saw" is the set
of instances of steps 0..steps-1, each `seq_len` tokens. We hash every token n-gram inside each
instance (n-grams do not cross instance boundaries, as the model never saw them joined) and
look up the n-grams of each eval item, tokenized with the same tokenizer. An item shorter than
n tokens counts as one n-gram of its own length (the whole item must occur in training).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from pipeline.data import PublishedOrder

MIN_DISTINCT_FRACTION = 0.5  # an n-gram counts only with at least n/2 distinct tokens
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier: a polynomial hash mod 2^64


def ngram_hashes(windows: np.ndarray) -> np.ndarray:
    """Hash each row of an (m, n) integer array to a uint64 (order-sensitive)."""
    h = np.zeros(windows.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(windows.shape[1]):
            h = h * _MULT + windows[:, j].astype(np.uint64) + np.uint64(1)
    return h


def training_ngrams(order: PublishedOrder, n: int, steps: int | None = None) -> np.ndarray:
    """Sorted unique hashes of every n-gram inside the instances of steps 0..steps-1."""
    steps = order.steps if steps is None else steps
    chunks = []
    for step in tqdm(range(steps), desc="training n-grams", unit="step", leave=False):
        batch = order.batch(step)
        win = np.lib.stride_tricks.sliding_window_view(batch, n, axis=1).reshape(-1, n)
        chunks.append(np.unique(ngram_hashes(win)))
    return np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, np.uint64)


def item_ngrams(ids: list[int], n: int) -> np.ndarray:
    """Hashes of the item's n-grams, leaving out runs of few distinct tokens (indentation,
    '*****' rules): they occur everywhere and say nothing about having seen the item."""
    arr = np.asarray(ids, dtype=np.int64)
    if len(arr) == 0:
        return np.zeros(0, np.uint64)
    win = arr[None, :] if len(arr) < n else np.lib.stride_tricks.sliding_window_view(arr, n)
    srt = np.sort(win, axis=1)
    distinct = 1 + (np.diff(srt, axis=1) != 0).sum(axis=1)
    keep = distinct >= min(MIN_DISTINCT_FRACTION * n, win.shape[1])
    return ngram_hashes(win[keep])


def seen_any(grams: np.ndarray, train_sorted: np.ndarray) -> bool:
    """Whether any hash occurs in the sorted training hashes (binary search, no re-sorting)."""
    if len(grams) == 0 or len(train_sorted) == 0:
        return False
    pos = np.minimum(np.searchsorted(train_sorted, grams), len(train_sorted) - 1)
    return bool((train_sorted[pos] == grams).any())


def item_text(row: dict) -> str:
    """The text the model is shown and scored on for one eval row."""
    if "text" in row:
        return row["text"]
    if "context" in row:
        return row["context"] + row["choices"][row["label"]]
    return f"Q: {row['question']}\nA: {row['answer']}"


def task_files(tasks_dir: Path) -> dict[str, Path]:
    """task name -> the local jsonl it reads (tasks with `dataset_kwargs.data_files.test`)."""
    out = {}
    for y in sorted(tasks_dir.glob("*.yaml")):
        try:
            cfg = yaml.safe_load(y.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        files = ((cfg or {}).get("dataset_kwargs") or {}).get("data_files") or {}
        if isinstance(files, dict) and "test" in files and "task" in cfg:
            out[cfg["task"]] = Path(files["test"])
    return out


def report(artifacts: Path, data_dir: Path, n: int, tasks_dir: Path = Path("evals/tasks")) -> dict:
    from pipeline.tokenizer import load

    blend, tokenize = artifacts / "blend", artifacts / "tokenize"
    if not (blend / "blend.json").is_file():
        return {"skipped": f"{blend}/blend.json not found: no published training order to check against"}
    order = PublishedOrder(blend, tokenize)
    train = training_ngrams(order, n)
    tok = load(artifacts / "tokenizer")
    tasks = {}
    for task, path in task_files(tasks_dir).items():
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        hits = []
        for row in rows:
            grams = item_ngrams(tok(item_text(row), add_special_tokens=False)["input_ids"], n)
            if seen_any(grams, train):
                hits.append(row.get("id"))
        tasks[task] = {"items": len(rows), "overlapping": len(hits), "overlapping_ids": hits[:20],
                       "file": str(path)}
    return {"ngram": n, "training_steps": order.steps, "training_tokens": order.steps * order.batch_size * order.seq_len,
            "unique_training_ngrams": int(len(train)), "tasks": tasks}
