"""Does post-training earn its place? Base vs post-trained on held-out arithmetic, per setting.

Run in a workdir where the data stages and pretrain exist (after `make repro`, or `omp pretrain`):

    python bench/posttrain.py --recipe recipes/tiny.yaml [--set posttrain.dpo.enabled=false ...]

Each row is one posttrain run (the recipe, then each `--set` alone, or the built-in sweep when none is
given) into a temporary directory; artifacts/posttrain is not touched. Greedy exact match on the
recipe's held-out problems (n = posttrain.eval_problems), with its standard error
sqrt(p (1 - p) / (n - 1)): the base in its own Q:/A: format and in the chat format, the model after
SFT and after DPO (chat format). "beyond noise" means the released model beats the better of the
two base scores by more than 1.96 standard errors of the difference — the bar the release stage
uses. `ppl` columns: held-out bits per byte (base → released) of the three perplexity tasks' items
(evals/data, first evaluate.limit items; rolling windows of the model's positions, each predicting
from the tokens before it, the first from <|endoftext|>, as lm-eval's loglikelihood_rolling does),
to see forgetting. One `--set` may hold several assignments separated by spaces (one row).
A benchmark that prints a table, not a test.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import yaml

from pipeline import posttrain
from pipeline.core.config import load_recipe

REPO = Path(__file__).resolve().parents[1]
PPL = {"arith": ("arithmetic.jsonl", lambda r: f"Q: {r['question']}\nA: {r['answer']}\n"),
       "code": ("ppl_python_code.jsonl", lambda r: r["text"]),
       "docs": ("ppl_python_docs.jsonl", lambda r: r["text"])}

SWEEP = [[], ["posttrain.replay_examples=0"], ["posttrain.dpo.enabled=true", "posttrain.dpo.lr=0.0005"],
         ["posttrain.steps=120"]]


def override(assignments: list[str]) -> dict:
    """`a.b.c=value` (value parsed as YAML) -> nested dict."""
    out: dict = {}
    for a in assignments:
        key, _, value = a.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def ppl_texts(limit: int | None) -> dict[str, list[str]]:
    import json

    out = {}
    for k, (f, text) in PPL.items():
        rows = [json.loads(x) for x in (REPO / "evals/data" / f).read_text().splitlines()]
        out[k] = [text(r) for r in rows[:limit]]
    return out


def bits_per_byte(model_dir: Path, texts: list[str]) -> float:
    """Σ bits / Σ UTF-8 bytes over rolling windows (each window predicts up to `positions` tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    n_pos = model.config.max_position_embeddings
    nats = nbytes = 0.0
    with torch.no_grad():
        for t in texts:
            ids = [tok.eos_token_id] + tok.encode(t, add_special_tokens=False)
            for start in range(1, len(ids), n_pos):  # predict ids[start:end] from up to n_pos tokens before
                end = min(start + n_pos, len(ids))
                lo = max(0, end - 1 - n_pos)
                logits = model(torch.tensor([ids[lo:end - 1]])).logits[0, -(end - start):]
                tgt = torch.tensor(ids[start:end])
                nats -= torch.log_softmax(logits.float(), -1).gather(-1, tgt.unsqueeze(-1)).sum().item()
            nbytes += len(t.encode("utf-8"))
    return nats / math.log(2) / nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="recipes/tiny.yaml", help="recipe whose posttrain section is the baseline")
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                    help="one row per --set (e.g. posttrain.steps=240); default: a small built-in sweep")
    args = ap.parse_args()
    rows = [s.split() for s in args.set] if args.set else SWEEP
    base_recipe = load_recipe(args.recipe)
    texts = ppl_texts(base_recipe.evaluate.limit)
    base_dir = Path("artifacts/pretrain/final")
    base_bpb = {k: bits_per_byte(base_dir, v) for k, v in texts.items()}
    print("| setting | n | base Q:/A: | base chat | after SFT | released | Δ vs best base | beyond noise | "
          + " | ".join(f"{k} bits/byte (base {v:.3f})" for k, v in base_bpb.items()) + " | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---|" + "---:|" * len(base_bpb) + "---:|")
    for sets in rows:
        recipe = load_recipe(args.recipe, override(sets))
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            m = posttrain.run(recipe, out_dir=Path(tmp) / "posttrain")
            bpb = {k: bits_per_byte(Path(tmp) / "posttrain/final", v) for k, v in texts.items()}
        n = m["arith_eval_problems"]
        base = max(m["arith_em_before"], m["arith_em_before_chat"])
        rel = m["arith_em_after"]
        d = rel - base
        beyond = d > 1.96 * math.hypot(se(rel, n), se(base, n))
        cell = lambda p: f"{p:.3f} ± {se(p, n):.3f}"  # noqa: E731
        print(f"| {' '.join(sets) or 'recipe'} | {n} | {cell(m['arith_em_before'])} | {cell(m['arith_em_before_chat'])} | "
              f"{cell(m['arith_em_after_sft'])} | {cell(rel)} | {d:+.3f} | {'yes' if beyond else 'no'} | "
              + " | ".join(f"{bpb[k]:.3f}" for k in base_bpb) + " | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
