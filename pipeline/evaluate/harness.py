"""lm-eval's side of the evaluate stage, shared with the learning curves (curves.py): a model variant,
the in-memory lm-eval model of one, and the per-item scores and bits-per-byte stderr read from
lm-eval's samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.device import resolve, use_bf16
from pipeline.core.errors import PipelineError


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path
    format: str = "hf"      # "hf" (a transformers directory) or "gguf" (one file)
    chat: bool = False      # post-trained: also run the chat tasks with the chat template


def load_lm(variant: Variant, batch_size: int, device: str = "cpu", precision: str = "fp32"):
    """An in-memory HFLM, so lm-eval does not reload the model per call. lm-eval takes an
    instantiated model's own device, so the model is moved there first; precision bf16 casts the
    weights (lm-eval's loop has no autocast)."""
    from lm_eval.models.huggingface import HFLM   # lm_eval and transformers: heavy, loaded when a model is
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(variant.path), trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(str(variant.path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{variant.path}: cannot load variant {variant.name}: {e}") from None
    dev = resolve(device, key="evaluate.device")
    model.to(dev, dtype=torch.bfloat16 if use_bf16(dev, precision) else None).eval()
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(dev))


def item_score(sample: dict) -> float | None:
    """One number per item, higher is better: accuracy / exact match, or log-likelihood per byte."""
    for metric in ("acc", "exact_match"):
        if metric in sample:
            return float(sample[metric])
    if "bits_per_byte" in sample:
        ll, n_bytes = sample["bits_per_byte"]
        return float(ll) / max(int(n_bytes), 1)
    return None


def item_scores(samples: dict) -> dict[str, dict[str, float]]:
    out = {}
    for task, rows in samples.items():
        scores = {str(r["doc_id"]): item_score(r) for r in rows}
        out[task] = {k: v for k, v in sorted(scores.items(), key=lambda kv: int(kv[0])) if v is not None}
    return out


def ratio_stderr(pairs: list[tuple[float, float]]) -> float | None:
    """Standard error of bits per byte, -sum(ll) / sum(bytes) / ln 2, over items (ll_i, bytes_i):
    the delta method for a ratio of sums, sqrt(sum((x_i - R y_i)^2) / (n (n-1))) / mean(y)."""
    n = len(pairs)
    if n < 2:
        return None
    xs = [-ll / math.log(2) for ll, _ in pairs]
    ys = [float(b) for _, b in pairs]
    r = sum(xs) / sum(ys)
    s2 = sum((x - r * y) ** 2 for x, y in zip(xs, ys)) / (n - 1)
    return math.sqrt(s2 / n) / (sum(ys) / n)


def add_bits_per_byte_stderr(result: dict, samples: dict) -> None:
    """lm-eval reports no stderr for bits_per_byte ("N/A"): compute it from the per-document samples."""
    for task, rows in samples.items():
        tr = (result.get("results") or {}).get(task)
        if tr is None or "bits_per_byte,none" not in tr:
            continue
        pairs = [tuple(r["bits_per_byte"]) for r in rows if isinstance(r.get("bits_per_byte"), (list, tuple))]
        se = ratio_stderr(pairs)
        if se is not None:
            tr["bits_per_byte_stderr,none"] = se


def jsonable(obj):
    """lm-eval's results as plain JSON values (its own fallback for what json cannot write)."""
    from lm_eval.utils import handle_non_serializable   # heavy; only once lm-eval has run

    return json.loads(json.dumps(obj, default=handle_non_serializable))
