"""Does post-training earn its place? Base vs post-trained on held-out arithmetic, per setting.

Run in a workdir where the data stages and pretrain exist (after `make repro`, or `omp pretrain`):

    python bench/posttrain.py --recipe recipes/tiny.yaml [--set posttrain.dpo.enabled=false ...]

Each row is one posttrain run (the recipe, then each `--set` alone, or the built-in sweep when none is
given) into a temporary directory; artifacts/posttrain is not touched. Greedy exact match on the
recipe's held-out problems (n = posttrain.eval_problems), with its standard error
sqrt(p (1 - p) / (n - 1)): the base in its own Q:/A: format and in the chat format, the model after
SFT and after DPO (chat format). "beyond noise" means the released model beats the better of the
two base scores by more than 1.96 standard errors of the difference — the bar the release stage
uses. A benchmark that prints a table, not a test.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import yaml

from pipeline import posttrain
from pipeline.config import load_recipe

SWEEP = [[], ["posttrain.dpo.enabled=false"], ["posttrain.lr=0.0003"], ["posttrain.steps=240"]]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="recipes/tiny.yaml", help="recipe whose posttrain section is the baseline")
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                    help="one row per --set (e.g. posttrain.steps=240); default: a small built-in sweep")
    args = ap.parse_args()
    rows = [[s] for s in args.set] if args.set else SWEEP
    print("| setting | n | base Q:/A: | base chat | after SFT | released | Δ vs best base | beyond noise | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for sets in rows:
        recipe = load_recipe(args.recipe, override(sets))
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            m = posttrain.run(recipe, out_dir=Path(tmp) / "posttrain")
        n = m["arith_eval_problems"]
        base = max(m["arith_em_before"], m["arith_em_before_chat"])
        rel = m["arith_em_after"]
        d = rel - base
        beyond = d > 1.96 * math.hypot(se(rel, n), se(base, n))
        cell = lambda p: f"{p:.3f} ± {se(p, n):.3f}"  # noqa: E731
        print(f"| {' '.join(sets) or 'recipe'} | {n} | {cell(m['arith_em_before'])} | {cell(m['arith_em_before_chat'])} | "
              f"{cell(m['arith_em_after_sft'])} | {cell(rel)} | {d:+.3f} | {'yes' if beyond else 'no'} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
