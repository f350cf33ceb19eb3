"""The work around the training step, as hooks of the one loop (pipeline/pretrain/trainer.py).

    HistoryHook     the step-0 evaluation; at sync points the log record (loss, lr, grad norm) and
                    the held-out evaluation, appended to the metric history
    LadderHook      the initialization record and a rung at each ladder step (weights at that step,
                    hash-chained to the previous rung); rungs past a rolled-back round are removed
    CheckpointHook  at sync points: an atomic checkpoint (engine state, RNG states, byte counters,
                    history, cursor), pruning, and the stop after a SIGTERM/SIGINT
    OutputHook      at the end: final/, ladder/, metrics, history, dvclive, plot, provenance

A hook may implement any of start(run), sync(run, point), rollback(run, step), end(run); the loop calls them in list order. Only the engine's writer writes files; hooks that
call collectives (a ZeRO-3 gather, a barrier) run on every rank.
"""

from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from pipeline.core import checkpoint as ckpt
from pipeline.core import ladder
from pipeline.core.errors import CheckpointError, TrainingStopped
from pipeline.core.io import read_json, write_json
from pipeline.core.model import count_params
from pipeline.pretrain import outputs
from pipeline.pretrain.context import Context, barrier, rng_state, set_rng_state


@dataclass
class SyncPoint:
    """A step after which everything queued was read back: what is due there, and the numbers."""
    done: int                      # steps finished (the cursor a checkpoint here records)
    log: bool = False
    eval: bool = False
    save: bool = False
    rung: bool = False             # a ladder step (also inside a torchft round: the weights at `done`)
    signum: int = 0
    losses: list[float] = field(default_factory=list)   # per step since the last sync point, worker mean
    grad_norm: object = None
    lr: float = 0.0
    record: dict = field(default_factory=dict)           # engine facts (torchft: round, replicas)


class Hook(Protocol):
    def start(self, run) -> None: ...
    def sync(self, run, point: SyncPoint) -> None: ...
    def rollback(self, run, step: int) -> None: ...
    def end(self, run) -> dict | None: ...


class BaseHook:
    def start(self, run) -> None:
        pass

    def sync(self, run, point: SyncPoint) -> None:
        pass

    def rollback(self, run, step: int) -> None:
        pass

    def end(self, run) -> dict | None:
        return None


# --------------------------------------------------------------------------- evaluation and history


@torch.no_grad()
def evaluate(model, windows: dict[str, torch.Tensor], ctx: Context, batch: int = 16) -> dict[str, float]:
    """Mean next-token loss per source (each window weighted equally)."""
    model.eval()
    out = {}
    for name, w in windows.items():
        losses = []
        for i in range(0, len(w), batch):
            x = w[i:i + batch].to(ctx.device)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
                losses.append(float(model(input_ids=x, labels=x).loss) * len(x))
        out[name] = sum(losses) / len(w)
    model.train()
    return out


def evaluate_now(run) -> dict | None:
    """The held-out losses, on the writer (None elsewhere); every rank joins a collective forward."""
    engine = run.engine
    if not (engine.collective_forward or engine.writer):
        return None
    val = evaluate(engine.forward_module, run.windows, run.ctx)
    return val if engine.writer else None


class HistoryHook(BaseHook):
    def start(self, run) -> None:
        if run.start == 0 and not run.joining:
            val = evaluate_now(run)
            if run.engine.writer:
                run.history.append({"step": 0, "val": val})

    def sync(self, run, point: SyncPoint) -> None:
        rec = None
        if point.log:
            rec = {"step": point.done, "loss": point.losses[-1], "lr": point.lr,
                   "grad_norm": None if point.grad_norm is None else float(point.grad_norm), **point.record}
        if point.eval:
            val = evaluate_now(run)
            if run.engine.writer:
                rec = {**(rec or {"step": point.done}), "val": val}
        if rec and run.engine.writer:
            run.history.append(rec)

    def rollback(self, run, step: int) -> None:
        run.history[:] = [r for r in run.history if r["step"] <= step]


# --------------------------------------------------------------------------- the ladder


class LadderHook(BaseHook):
    """Rungs of this run in checkpoints/ladder/ (kept on resume, like the checkpoints)."""

    def start(self, run) -> None:
        work, engine = run.root / "ladder", run.engine
        self.work = work
        if engine.writer and not run.joining:
            if run.resumed_from is None:
                shutil.rmtree(work, ignore_errors=True)   # a previous run's rungs: this run starts over
            else:
                ladder.drop_after(work, run.start)
        barrier(run.ctx)
        if run.start == 0 and not run.joining:
            init = engine.final_model()   # collective with ZeRO-3
            if engine.writer:
                work.mkdir(parents=True, exist_ok=True)
                write_json(work / ladder.INIT, {"init_sha256": ladder.weights_sha256(init), "seed": run.recipe.seed})
        elif engine.writer and not run.joining:
            self.ensure_init(run)
        if run.start == 0 and not run.joining and 0 in run.rung_steps:
            self.write(run, 0)

    def sync(self, run, point: SyncPoint) -> None:
        if point.rung:
            self.write(run, point.done)

    def ensure_init(self, run) -> None:
        """The initialization record, when this writer has none: resumed from a checkpoint written
        without a ladder (an older run's), or a torchft replica that became the writer before replica 0
        wrote it. The initialization is the seed's, rebuilt the way it was built first."""
        if (self.work / ladder.INIT).is_file():
            return
        resumed_rng = rng_state()   # build_model reseeds torch: the resumed RNG must go on untouched
        seeded = run.seeded_model()
        set_rng_state(resumed_rng)
        self.work.mkdir(parents=True, exist_ok=True)
        write_json(self.work / ladder.INIT, {"init_sha256": ladder.weights_sha256(seeded), "seed": run.recipe.seed})

    def write(self, run, done: int) -> None:
        model_now = run.engine.final_model()   # every rank: collective with ZeRO-3
        if run.engine.writer:
            self.ensure_init(run)
            prev = [r for r in ladder.read_rungs(self.work) if r["step"] < done]
            parent = prev[-1]["sha256"] if prev else read_json(self.work / ladder.INIT)["init_sha256"]
            ladder.write_rung(model_now, self.work, {
                "step": done, "stage": "pretrain", "stage_step": done, "tokens_seen": done * run.tokens_per_step,
                "rows_consumed": done * run.order.batch_size, "parent_sha256": parent},
                tokenizer_dir=run.dirs.tokenizer)
        barrier(run.ctx)

    def rollback(self, run, step: int) -> None:
        if run.engine.writer:
            ladder.drop_after(self.work, step)


# --------------------------------------------------------------------------- checkpoints


def timings_path(root: Path, step: int) -> Path:
    """Wall-clock numbers of a checkpoint: apart from it and from every stage output (DVC hashes
    artifacts/pretrain whole), in artifacts/timings/pretrain/step-NNNNNNN.json."""
    return Path(root).parent.parent / "timings" / "pretrain" / f"step-{step:07d}.json"


def save_checkpoint(root: Path, step: int, engine, history: list, ctx: Context, lineage: dict,
                    speeds: list | None = None) -> Path | None:
    """Atomically: the engine's files and state, RNG states, byte counters, history, cursor `step`."""
    if ctx.rank == 0:
        ckpt.begin(root, step)
    barrier(ctx)
    tmp = ckpt.tmp_dir(root, step)
    comm = engine.comm
    state = {"step": step, **engine.save(tmp, ctx.rank), "rng": rng_state(),
             "comm": {"bytes_sent": comm.bytes_sent, "calls": comm.calls, "by_kind": dict(comm.by_kind),
                      "ledger": comm.ledger()},
             "history": history if ctx.rank == 0 else []}
    torch.save(state, tmp / f"state-rank{ctx.rank}.pt")
    if ctx.rank == 0 and engine.bytes_sent_per_worker() is not None:
        # the byte ledger up to this checkpoint (bytes this worker sent, by collective/tag/part)
        write_json(tmp / "ledger.json", {"step": step, "bytes_sent": comm.bytes_sent, "ledger": comm.ledger()})
    if ctx.rank == 0 and speeds is not None:
        # wall-clock numbers live apart from the checkpoint, so equal runs write bit-identical checkpoints
        write_json(timings_path(root, step), speeds)
    barrier(ctx)
    path = None
    if ctx.rank == 0:
        path = ckpt.commit(root, step, lineage)
    barrier(ctx)
    return path


def load_checkpoint(path: Path, engine, ctx: Context) -> tuple[int, list, list]:
    """Restore engine, RNG and byte counters from `path`; returns (step, history, timings)."""
    sfile = path / f"state-rank{ctx.rank}.pt"
    for f in [sfile, *engine.files(path, ctx.rank)]:
        if not f.exists():
            raise CheckpointError(f"{f}: missing; was the checkpoint written with another world size or engine?")
    state = torch.load(sfile, map_location=ctx.device, weights_only=True)
    engine.load(path, state, ctx.rank)
    set_rng_state({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state["rng"].items()})
    comm = engine.comm
    if "comm" in state:
        comm.bytes_sent, comm.calls = state["comm"]["bytes_sent"], state["comm"]["calls"]
        comm.by_kind.clear()
        comm.by_kind.update(state["comm"]["by_kind"])
        comm.load_ledger(state["comm"].get("ledger", {}))
    timings = timings_path(path.parent, state["step"])
    return state["step"], state["history"], (read_json(timings) if timings.is_file() else [])


class CheckpointHook(BaseHook):
    """Every rank takes part in a checkpoint (each saves its own state file); torchft: the writer alone
    (the replicas are separate jobs). Stops the run after a signal, once its checkpoint is written."""

    def save(self, run, step: int) -> None:
        engine = run.engine
        if run.ctx.world_size == 1 and not engine.writer:
            return
        save_checkpoint(run.root, step, engine, run.history, run.ctx, {**run.lineage, "parent": run.parent},
                        run.speeds)
        run.parent = f"step-{step:07d}"
        if run.ctx.rank == 0:
            run.fresh.committed(ckpt.step_dir(run.root, step))
            for gone in ckpt.prune(run.root, run.cfg.keep_last):
                timings_path(run.root, int(gone.name[5:])).unlink(missing_ok=True)

    def sync(self, run, point: SyncPoint) -> None:
        if point.save:
            self.save(run, point.done)
        if point.signum and point.done < run.total:
            name = signal.Signals(point.signum).name
            raise TrainingStopped(f"stopped by {name} after step {point.done} of {run.total}; checkpoint "
                                  f"{run.root / f'step-{point.done:07d}'} written; resume with --resume latest")

    def end(self, run) -> dict | None:
        if run.start == run.total and run.total > 0 and not ckpt.list_steps(run.root):
            self.save(run, run.total)
        return None


# --------------------------------------------------------------------------- outputs


class OutputHook(BaseHook):
    """The writer of the last committed step writes the stage's outputs (pipeline/pretrain/outputs.py)."""

    def end(self, run) -> dict | None:
        engine = run.engine
        final = engine.final_model()   # collective with ZeRO-3
        metrics = {
            "steps": run.total, "tokens": run.total * run.tokens_per_step, "params": count_params(final),
            "warmup_steps": min(run.warm, run.total - run.start),
            "world_size": run.ctx.world_size, "mode": engine.lineage["mode"], "engine": engine.name,
            "bytes_sent_per_worker": engine.bytes_sent_per_worker(), "comm": engine.comm.stats(),
            "byte_ledger": engine.comm.ledger() if engine.bytes_sent_per_worker() is not None else None,
            **engine.metrics(),
        }
        if run.cfg.distributed.islands > 1:   # hybrid layout: the traffic inside islands and across them apart
            led = engine.comm.ledger()
            metrics["islands"] = {"islands": run.cfg.distributed.islands, **{
                f"{scope}_bytes_per_worker": sum(v["bytes"] for k, v in led.items() if k.startswith(f"{scope}:"))
                for scope in ("intra_island", "inter_island", "global")}}
        if engine.writer:
            where = {"step": run.total, "rows_consumed": run.total * run.order.batch_size,
                     "tokens_seen": run.total * run.tokens_per_step}
            metrics = outputs.write(run.recipe, run.out_dir, final, run.history, metrics, run.dirs,
                                    {**run.lineage, **where}, run.parent, run.speeds)
        return metrics
