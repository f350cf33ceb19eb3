"""What rank 0 writes when training ends: the HF model directory, metrics, dvclive logs, loss curve."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import ladder
from pipeline.core.config import Recipe
from pipeline.core.io import atomic_dir, sha256_file, write_json
from pipeline.core.integrity import seal
from pipeline.core.provenance import provenance


def write_final(model, out: Path, tokenizer_dir: Path, lineage: dict) -> Path:
    """artifacts/pretrain/final: config.json, model.safetensors, generation_config.json, tokenizer files."""
    final = out / "final"
    with atomic_dir(final) as tmp:
        ladder.save_hf(model, tmp, tokenizer_dir)   # as the ladder's rungs: the last rung is byte-identical
        write_json(tmp / "lineage.json", lineage)
    return final


def val_mean(val: dict[str, float]) -> float:
    return sum(val.values()) / len(val)


def write_dvclive(out: Path, history: list[dict]) -> None:
    """dvclive logs of the run: losses, lr, grad norm; no wall-clock figures (those are in
    artifacts/timings/pretrain.json), so equal runs write equal files."""
    from dvclive import Live  # dvclive imports dvc, seconds of start-up: only when outputs are written

    # dvc.yaml declares these files as metrics/plots; dvclive must not write its own dvc.yaml
    live = Live(str(out / "dvclive"), save_dvc_exp=False, dvcyaml=False)
    for rec in history:
        live.step = rec["step"]
        for k in ("loss", "lr", "grad_norm"):
            if k in rec:
                live.log_metric(f"train/{k}", rec[k])
        for name, v in rec.get("val", {}).items():
            live.log_metric(f"val/loss_{name}", v)
        if rec.get("val"):
            live.log_metric("val/loss", val_mean(rec["val"]))
    live.end()


def plot_loss(out: Path, history: list[dict]) -> Path:
    import matplotlib  # heavy, and only the writer of the outputs plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    names = sorted({n for r in history for n in r.get("val", {})})
    for n in names:
        pts = [(r["step"], r["val"][n]) for r in history if n in r.get("val", {})]
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"held-out {n}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss_curve.png"
    tmp = out / ".loss_curve.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write(recipe: Recipe, out: Path, model, history: list[dict], metrics: dict, dirs, lineage: dict,
          parent: str | None, speeds: list[dict]) -> dict:
    """Every output of the run (final/, ladder/, metrics, history, dvclive/, the plot, provenance) is
    built in one temporary sibling of `out` and swapped in together (checkpoints/ carried over), so a
    kill never leaves the new weights beside the old run's metrics or provenance."""
    with atomic_dir(out, keep=("checkpoints",)) as tmp:
        final = write_final(model, tmp, dirs.tokenizer, {**lineage, "parent_checkpoint": parent})
        # the rungs written while training (checkpoints/ladder/), sealed as outputs of the stage
        ladder.link_into(out / "checkpoints" / "ladder", tmp / "ladder")
        vals = [r for r in history if r.get("val")]
        metrics = {**metrics,
                   "val_loss_initial": val_mean(vals[0]["val"]) if vals else None,
                   "val_loss_final": val_mean(vals[-1]["val"]) if vals else None,
                   "val_loss_per_source_initial": vals[0]["val"] if vals else {},
                   "val_loss_per_source": vals[-1]["val"] if vals else {},
                   "train_loss_final": next((r["loss"] for r in reversed(history) if "loss" in r), None),
                   "model_sha256": sha256_file(final / "model.safetensors")}
        write_json(tmp / "history.json", history)
        write_dvclive(tmp, history)
        plot_loss(tmp, history)
        write_json(tmp / "metrics.json", metrics)
        seal(tmp, provenance(
            "pretrain", recipe, {"indices": lineage["indices_sha256"],
                                 "tokenizer": sha256_file(dirs.tokenizer / "tokenizer.json")},
            model_sha256=metrics["model_sha256"]))
    return metrics
