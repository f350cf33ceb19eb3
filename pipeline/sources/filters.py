"""The manifest's filter steps: per-document steps, exact and MinHash near-dedup, order and limits.

A source is filtered in two parts so that the first can run anywhere:

1. `filter_unit` (per unit of documents, on any worker): the length filter, then each step of
   `filters.steps` in order; for each survivor its exact-dedup key and, with `near_dedup`, its
   MinHash signature. Pure: the result depends only on the unit's documents and the filters.
2. `finish` (once per source, in the driver, over the units in order): exact dedup (first one
   kept), near dedup (clusters from LSH bands; the document with the smallest sha256 survives),
   then the seeded order and the `max_docs` / `max_bytes` limits.

Every step reports how many documents it removed; ingest writes those counts to ingest.json.
A new per-document step is a pydantic model in `pipeline.core.config.FilterStep` and a builder here
registered under the same `kind` with `@register_step`.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from typing import Callable

import numpy as np

from pipeline.core.config import Filters, LanguageStep, NearDedup, QualityStep

# kind -> builder(step config) -> predicate(text) -> keep?
STEPS: dict[str, Callable] = {}


def register_step(kind: str):
    def deco(builder):
        STEPS[kind] = builder
        return builder
    return deco


_LANGID = None


def _language_identifier():
    global _LANGID
    if _LANGID is None:  # ~1.5 s to load the model: once per process
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _LANGID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _LANGID


@register_step("language")
def language_step(cfg: LanguageStep) -> Callable[[str], bool]:
    ident, wanted = _language_identifier(), set(cfg.languages)

    def keep(text: str) -> bool:
        lang, prob = ident.classify(text[: cfg.score_chars])
        return lang in wanted and prob >= cfg.min_score
    return keep


STOPWORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list
BULLETS = ("•", "-", "*", "●", "‣", "◦")


def quality_failures(cfg: QualityStep, text: str) -> list[str]:
    """Names of the Gopher rules `text` fails (empty: it passes)."""
    words = text.split()
    n = len(words)
    fails = []
    if cfg.min_words is not None and n < cfg.min_words:
        fails.append("min_words")
    if cfg.max_words is not None and n > cfg.max_words:
        fails.append("max_words")
    if n:
        mean = sum(len(w) for w in words) / n
        if cfg.min_mean_word_chars is not None and mean < cfg.min_mean_word_chars:
            fails.append("min_mean_word_chars")
        if cfg.max_mean_word_chars is not None and mean > cfg.max_mean_word_chars:
            fails.append("max_mean_word_chars")
        symbols = text.count("#") + text.count("...") + text.count("…")
        if cfg.max_symbol_word_ratio is not None and symbols / n > cfg.max_symbol_word_ratio:
            fails.append("max_symbol_word_ratio")
        alpha = sum(1 for w in words if re.search(r"[^\W\d_]", w))
        if cfg.min_alpha_word_ratio is not None and alpha / n < cfg.min_alpha_word_ratio:
            fails.append("min_alpha_word_ratio")
    if cfg.min_stopwords is not None and len(STOPWORDS.intersection(w.lower() for w in words)) < cfg.min_stopwords:
        fails.append("min_stopwords")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        if (cfg.max_ellipsis_line_ratio is not None
                and sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_line_ratio):
            fails.append("max_ellipsis_line_ratio")
        if (cfg.max_bullet_line_ratio is not None
                and sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_line_ratio):
            fails.append("max_bullet_line_ratio")
    return fails


@register_step("quality")
def quality_step(cfg: QualityStep) -> Callable[[str], bool]:
    return lambda text: not quality_failures(cfg, text)


# --------------------------------------------------------------------------- per unit


def dedup_key(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def shingles(text: str, n: int) -> list[bytes]:
    """Lower-cased word n-grams (one shingle of all words when there are fewer than n)."""
    words = text.lower().split()
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")]
    return list({" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)})


def minhash_signature(text: str, cfg: NearDedup) -> np.ndarray:
    """datasketch's seeded MinHash (its default sha1 hash, affine32 permutations, named so that a
    later datasketch default cannot change the signatures): uint64[num_perm]."""
    from datasketch import MinHash

    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme="affine32")
    m.update_batch(shingles(text, cfg.ngram))
    return m.hashvalues.astype(np.uint64)


def step_names(filters: Filters) -> list[str]:
    """The names under which ingest.json counts removed documents, in the order they apply."""
    return (["length"] + [s.kind for s in filters.steps] + (["exact_dedup"] if filters.dedup else [])
            + (["near_dedup"] if filters.near_dedup else []) + ["limits"])


def filter_unit(filters: Filters, docs: list[str]) -> dict:
    """Per-document part of the filters over one unit: survivors, their keys, removed counts."""
    predicates = [(s.kind, STEPS[s.kind](s)) for s in filters.steps]
    removed = {"length": 0, **{k: 0 for k, _ in predicates}}
    kept = []
    for d in docs:
        if len(d) < filters.min_chars or (filters.max_chars is not None and len(d) > filters.max_chars):
            removed["length"] += 1
            continue
        drop = next((k for k, keep in predicates if not keep(d)), None)
        if drop is not None:
            removed[drop] += 1
            continue
        kept.append(d)
    out = {"raw": len(docs), "removed": removed, "docs": kept, "keys": [dedup_key(d) for d in kept]}
    if filters.near_dedup is not None:
        nd = filters.near_dedup
        out["minhash"] = (np.stack([minhash_signature(d, nd) for d in kept]) if kept
                          else np.zeros((0, nd.num_perm), np.uint64))
    return out


# --------------------------------------------------------------------------- per source


def lsh_params(cfg: NearDedup) -> tuple[int, int]:
    """(bands, rows) that datasketch's MinHashLSH picks for this threshold and num_perm."""
    return _lsh_params(cfg.threshold, cfg.num_perm)


@functools.lru_cache(maxsize=None)
def _lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def near_duplicate_clusters(sigs: np.ndarray, cfg: NearDedup) -> list[list[int]]:
    """Clusters (sorted lists of row numbers, size >= 2) of documents linked by a candidate pair
    from an LSH band whose estimated Jaccard similarity is >= threshold. A function of the set of
    signatures: neither the order of insertion nor the worker count changes it."""
    n = len(sigs)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands, rows = lsh_params(cfg)
    for b in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for i, key in enumerate(sigs[:, b * rows:(b + 1) * rows]):
            buckets.setdefault(key.tobytes(), []).append(i)
        for members in buckets.values():
            for pos, j in enumerate(members):
                for i in members[:pos]:
                    ri, rj = find(i), find(j)
                    if ri != rj and np.mean(sigs[i] == sigs[j]) >= cfg.threshold:
                        parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(g for g in groups.values() if len(g) > 1)


def finish(source, units: list[dict]) -> tuple[list[str], dict]:
    """Source-level part of the filters over its units in order: (documents, report).

    The report has `raw_documents` and `removed` (documents per step, see `step_names`)."""
    f = source.filters
    removed = {k: 0 for k in step_names(f)}
    for u in units:
        for k, v in u["removed"].items():
            removed[k] += v
    docs = [d for u in units for d in u["docs"]]
    keys = [k for u in units for k in u["keys"]]
    keep = list(range(len(docs)))
    if f.dedup:
        seen: set[str] = set()
        first = []
        for i in keep:
            if keys[i] not in seen:
                seen.add(keys[i])
                first.append(i)
        removed["exact_dedup"] = len(keep) - len(first)
        keep = first
    if f.near_dedup is not None:
        sigs = np.concatenate([u["minhash"] for u in units])[keep] if keep else np.zeros((0, 1), np.uint64)
        drop: set[int] = set()
        for cluster in near_duplicate_clusters(sigs, f.near_dedup):
            hashes = [hashlib.sha256(docs[keep[c]].encode("utf-8")).digest() for c in cluster]
            survivor = cluster[hashes.index(min(hashes))]
            drop.update(c for c in cluster if c != survivor)
        removed["near_dedup"] = len(drop)
        keep = [i for pos, i in enumerate(keep) if pos not in drop]
    kept = [docs[i] for i in keep]
    limited = apply_order_and_limits(source, kept)
    removed["limits"] = len(kept) - len(limited)
    return limited, {"raw_documents": sum(u["raw"] for u in units), "removed": removed}


def apply_order_and_limits(source, kept: list[str]) -> list[str]:
    """The seeded order, then max_docs, then max_bytes (a first document always stays)."""
    kept = list(kept)
    if source.seed:
        random.Random(source.seed).shuffle(kept)
    if source.max_docs is not None:
        kept = kept[: source.max_docs]
    if source.max_bytes is not None:
        out, total = [], 0
        for d in kept:
            n = len(d.encode("utf-8"))
            if total + n > source.max_bytes and out:
                break
            out.append(d)
            total += n
        kept = out
    return kept
