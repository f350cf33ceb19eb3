"""What the learning curves add to the evaluate stage: lm-eval on every rung of the ladder.

Run in a folder where the data stages of the recipe have run (artifacts/tokenizer, blend, ...):

    python bench/ladder_eval.py --recipe recipes/tiny.yaml [--rungs 13] [--limit 20]

It writes `--rungs` model folders of the recipe's model shape (the costs do not depend on the
weights), scores them as the evaluate stage does (pipeline/evaluate/curves.py, the recipe's
`evaluate.ladder` tasks) and prints wall and CPU seconds in all and per rung. The ladder's other
costs (writing rungs while training, copying them into the release) are printed too. CPU seconds
are the honest figure on a shared machine; on an idle one wall time is about CPU time / threads.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/tiny.yaml")
    p.add_argument("--rungs", type=int, default=None, help="default: the recipe's ladder (pretrain) + 2 (posttrain)")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: evaluate.ladder.limit)")
    a = p.parse_args()

    # torch and the stages after the arguments: --help stays instant
    import torch

    from pipeline.core import ladder
    from pipeline.core.config import load_recipe
    from pipeline.core.order import PublishedOrder
    from pipeline.evaluate import curves, task_manager
    from pipeline.core.model import build_model, special_ids, vocab_size

    recipe = load_recipe(a.recipe)
    if a.limit is not None:
        recipe = load_recipe(a.recipe, overrides={"evaluate": {"ladder": {"limit": a.limit}}})
    art = Path("artifacts")
    order = PublishedOrder(art / "blend", art / "tokenize")
    total = recipe.pretrain.steps or order.steps
    n = a.rungs or len(ladder.steps(recipe.pretrain.ladder, total)) + 2
    torch.set_num_threads(recipe.pretrain.threads or os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="omp-bench-ladder-"))
    try:
        t0, c0 = time.perf_counter(), cpu()
        found = []
        for i in range(n):
            model = build_model(recipe.pretrain.model, vocab_size(art / "tokenizer"), order.seq_len,
                                special_ids(art / "tokenizer"), seed=i)
            rec = ladder.write_rung(model, tmp, {"step": i, "stage": "pretrain", "stage_step": i, "tokens_seen": 0,
                                                 "rows_consumed": 0, "parent_sha256": ""}, tokenizer_dir=art / "tokenizer")
            found.append((rec, tmp / ladder.rung_name(i)))
        write_s, write_c = time.perf_counter() - t0, cpu() - c0
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        t0 = time.perf_counter()
        shutil.copytree(tmp, tmp.with_name(tmp.name + "-copy"))
        copy_s = time.perf_counter() - t0
        shutil.rmtree(tmp.with_name(tmp.name + "-copy"))
        t0, c0 = time.perf_counter(), cpu()
        tm = task_manager(Path(recipe.evaluate.include_path), defaults=False)
        tm_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), cpu()
        rows = curves.score(recipe, tm, found)
        eval_s, eval_c = time.perf_counter() - t0, cpu() - c0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cfg = recipe.evaluate.ladder
    print(f"\nrecipe {a.recipe}: {n} rungs of {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"tasks {', '.join(cfg.tasks)}; limit {cfg.limit}; {len(rows)} scores\n")
    print("| part | wall s | CPU s | per rung (wall) |")
    print("|---|---:|---:|---:|")
    print(f"| write {n} rungs ({size / 2**20:.1f} MiB) | {write_s:.1f} | {write_c:.1f} | {write_s / n:.2f} |")
    print(f"| copy them (release) | {copy_s:.2f} | | |")
    print(f"| lm-eval TaskManager (already built by evaluate) | {tm_s:.1f} | | |")
    print(f"| lm-eval on every rung | {eval_s:.1f} | {eval_c:.1f} | {eval_s / n:.2f} |")


if __name__ == "__main__":
    main()
