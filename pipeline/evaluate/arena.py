"""Arena view: variants paired item by item, ranked with Bradley-Terry (as Chatbot Arena does).

Each eval item is a "battle" between every pair of variants: the one with the higher per-item
score (accuracy, exact match, or log-likelihood per byte) wins; equal scores are a tie and count
half a win each. Bradley-Terry strengths p_i (P(i beats j) = p_i / (p_i + p_j)) are fitted with
the MM algorithm (Hunter 2004) and shown on the Elo scale (400·log10, baseline at 1000).
95% intervals: percentiles of ratings refitted on battles resampled with replacement.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

SCALE, ANCHOR = 400.0, 1000.0


def battles(scores: dict[str, dict[str, dict[str, float]]]) -> tuple[list[str], np.ndarray]:
    """(names, outcomes): one row per (item, pair) = [i, j, w] where w is 1, 0.5 or 0 for i."""
    names = sorted(scores)
    rows = []
    tasks = sorted(set().union(*[set(s) for s in scores.values()])) if scores else []
    for task in tasks:
        items = sorted(set().union(*[set(scores[n].get(task, {})) for n in names]), key=int)
        for item in items:
            for a, b in itertools.combinations(range(len(names)), 2):
                sa, sb = scores[names[a]].get(task, {}).get(item), scores[names[b]].get(task, {}).get(item)
                if sa is None or sb is None:
                    continue
                rows.append((a, b, 1.0 if sa > sb else 0.0 if sa < sb else 0.5))
    return names, np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def fit_bradley_terry(n: int, outcomes: np.ndarray, iters: int = 200, prior: float = 0.5) -> np.ndarray:
    """Log-strengths (natural log, mean zero). `prior` adds that many tie games between every
    pair, so a variant that wins (or loses) everything still gets a finite rating."""
    wins = np.full((n, n), prior / 2)
    np.fill_diagonal(wins, 0.0)
    i, j, w = outcomes[:, 0].astype(int), outcomes[:, 1].astype(int), outcomes[:, 2]
    np.add.at(wins, (i, j), w)
    np.add.at(wins, (j, i), 1.0 - w)
    games = wins + wins.T
    p = np.ones(n)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        p_new = wins.sum(axis=1) / np.maximum(denom, 1e-12)
        p_new /= math.exp(np.log(p_new).mean())
        if np.max(np.abs(p_new - p)) < 1e-10:
            p = p_new
            break
        p = p_new
    return np.log(p)


def to_elo(log_p: np.ndarray, anchor_index: int | None) -> np.ndarray:
    elo = SCALE * log_p / math.log(10)
    return elo - (elo[anchor_index] if anchor_index is not None else elo.mean()) + ANCHOR


def ratings(scores: dict, rounds: int = 200, seed: int = 0, baseline: str | None = None) -> dict:
    """{"variants": [{name, rating, lo, hi, battles}], ...} sorted by rating, best first."""
    names, outcomes = battles(scores)
    if len(names) < 2 or len(outcomes) == 0:
        return {"variants": [{"name": n, "rating": ANCHOR, "lo": ANCHOR, "hi": ANCHOR, "battles": 0} for n in names],
                "battles": 0, "note": "fewer than two variants with shared items: nothing to compare"}
    anchor = names.index(baseline) if baseline in names else None
    point = to_elo(fit_bradley_terry(len(names), outcomes), anchor)
    rng = np.random.default_rng(seed)
    boots = np.stack([to_elo(fit_bradley_terry(len(names), outcomes[rng.integers(0, len(outcomes), len(outcomes))]),
                             anchor) for _ in range(rounds)])
    lo, hi = np.percentile(boots, 2.5, axis=0), np.percentile(boots, 97.5, axis=0)
    count = np.bincount(outcomes[:, :2].astype(int).ravel(), minlength=len(names))
    rows = [{"name": n, "rating": round(float(point[k]), 1), "lo": round(float(lo[k]), 1),
             "hi": round(float(hi[k]), 1), "battles": int(count[k])} for k, n in enumerate(names)]
    rows.sort(key=lambda r: -r["rating"])
    return {"variants": rows, "battles": int(len(outcomes)), "bootstrap_rounds": rounds,
            "anchor": baseline if anchor is not None else "mean", "scale": "elo (400 log10), anchor = 1000"}
