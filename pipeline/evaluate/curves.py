"""Learning curves: every rung of the checkpoint ladder (pipeline/core/ladder.py) scored with lm-eval on a
few tasks (`evaluate.ladder`: by default the perplexity tasks and one multiple-choice task, on the
first `limit` items), task score against tokens seen.

Writes into the evaluate output: `ladder.json` (one row per rung and task: step, stage, tokens_seen,
task, metric, value, stderr, n), `ladder.csv` (one row per rung, a column per task: what the
`dvc plots` definition in dvc.yaml reads) and `ladder.png` (a panel per task; the release's model
card embeds it).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pipeline.core import ladder, leaderboard
from pipeline.core.integrity import verify_stage
from pipeline.core.io import atomic_write_text, write_json
from pipeline.core.log import status
from pipeline.evaluate.harness import Variant, add_bits_per_byte_stderr, jsonable, load_lm


def rungs(artifacts: Path) -> list[tuple[dict, Path]]:
    """(rung record, folder) of pretraining's and post-training's rungs, each stage's files verified."""
    out = []
    for stage in ("pretrain", "posttrain"):
        root = artifacts / stage / "ladder"
        if not root.is_dir():
            continue
        verify_stage(artifacts / stage, under="ladder")
        out += [(r, root / ladder.rung_name(r["step"])) for r in ladder.read_rungs(root)]
    return out


def score(recipe, tm, found: list[tuple[dict, Path]]) -> list[dict]:
    """One row per rung and task: the task's primary metric (leaderboard.PRIMARY) with its stderr."""
    from lm_eval import simple_evaluate   # lm_eval: heavy, loaded only when rungs are scored

    cfg, seed = recipe.evaluate, recipe.seed
    rows = []
    for r, path in found:
        status(f"evaluate: ladder rung {path.name} ({r['stage']})")
        lm = load_lm(Variant(path.name, path), cfg.batch_size, cfg.device, cfg.precision)
        res = simple_evaluate(model=lm, tasks=list(cfg.ladder.tasks), task_manager=tm, limit=cfg.ladder.limit,
                              log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=100)
        samples = jsonable(res.pop("samples", {}))
        res = jsonable(res)
        add_bits_per_byte_stderr(res, samples)
        tasks, cells = leaderboard.table({"rung": res})
        for task in tasks:
            c = cells["rung"].get(task)
            if c is not None:
                rows.append({"step": r["step"], "stage": r["stage"], "tokens_seen": r["tokens_seen"], "task": task,
                             "metric": c.metric, "value": c.value, "stderr": c.stderr, "n": c.n})
    return rows


def csv_text(rows: list[dict]) -> str:
    """A row per rung (step order), a column per task: the file `dvc plots` reads."""
    tasks = sorted({r["task"] for r in rows})
    by = {}
    for r in rows:
        by.setdefault(r["step"], {"step": r["step"], "stage": r["stage"], "tokens_seen": r["tokens_seen"]})[r["task"]] = \
            f"{r['value']:.6f}"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "stage", "tokens_seen", *tasks], lineterminator="\n")
    w.writeheader()
    for step in sorted(by):
        w.writerow(by[step])
    return buf.getvalue()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib   # heavy; only when there is a curve to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        pts = sorted((r for r in rows if r["task"] == task), key=lambda r: r["step"])
        for stage, marker in (("pretrain", "o"), ("posttrain", "s")):
            sp = [p for p in pts if p["stage"] == stage]
            if sp:
                ax.errorbar([p["tokens_seen"] for p in sp], [p["value"] for p in sp],
                            yerr=[p["stderr"] or 0 for p in sp], marker=marker, ms=3, capsize=2, label=stage)
        ax.set_xscale("symlog", linthresh=max(1, min((p["tokens_seen"] for p in pts if p["tokens_seen"]), default=1)))
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("tokens seen", fontsize=8)
        ax.set_ylabel(pts[0]["metric"] if pts else "", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def write(out: Path, rows: list[dict]) -> None:
    write_json(out / "ladder.json", rows)
    atomic_write_text(out / "ladder.csv", csv_text(rows))
    if rows:
        plot(rows, out / "ladder.png")
