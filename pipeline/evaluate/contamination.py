"""Contamination: does any eval item share an n-gram with exactly the tokens training saw?

The training data is published as indices (artifacts/blend), so "what training saw" is the set
of instances of steps 0..steps-1, each `seq_len` tokens. We hash every token n-gram inside each
instance (n-grams do not cross instance boundaries, as the model never saw them joined) and
look up the n-grams of each eval item, tokenized with the same tokenizer. An item shorter than
n tokens counts as one n-gram of its own length (the whole item must occur in training).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.order import PublishedOrder
from pipeline.core.io import read_json
from pipeline.core.ngrams import item_ngrams, item_text, ngram_hashes, read_rows, seen_any, task_files
from pipeline.tokenizer import load


def training_ngrams(order: PublishedOrder, n: int, steps: int | None = None) -> np.ndarray:
    """Sorted unique hashes of every n-gram inside the instances of steps 0..steps-1."""
    steps = order.steps if steps is None else steps
    chunks = []
    for step in tqdm(range(steps), desc="training n-grams", unit="step", leave=False):
        batch = order.batch(step)
        win = np.lib.stride_tricks.sliding_window_view(batch, n, axis=1).reshape(-1, n)
        chunks.append(np.unique(ngram_hashes(win)))
    return np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, np.uint64)


def report(artifacts: Path, data_dir: Path, n: int, tasks_dir: Path = Path("evals/tasks")) -> dict:
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
        rows = read_rows(path)
        hits = []
        for row in rows:
            grams = item_ngrams(tok(item_text(row), add_special_tokens=False)["input_ids"], n)
            if seen_any(grams, train):
                hits.append(row.get("id"))
        tasks[task] = {"items": len(rows), "overlapping": len(hits), "overlapping_ids": hits[:20],
                       "file": str(path)}
    decon = read_json(tokenize / "tokenize.json").get("decontamination", {"enabled": False})
    decon = {k: v for k, v in decon.items() if k != "files"}
    return {"ngram": n, "training_decontamination": decon, "training_steps": order.steps, "training_tokens": order.steps * order.batch_size * order.seq_len,
            "unique_training_ngrams": int(len(train)), "tasks": tasks}
