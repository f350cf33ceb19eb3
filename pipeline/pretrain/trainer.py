"""The one pretraining loop: in-process (world size 1), under torchrun, with DeepSpeed, and as a torchft
replica. `prepare()` builds a Run (distributed context, determinism, data, model, engine, resume);
`loop()` steps it and calls the hooks (pipeline/pretrain/hooks.py). Per step:

    step = engine.begin_step(step)                     # torchft: a round's quorum (a heal may move it)
    rows = engine.shard(order.batch(step))             # the published global batch N, nothing else
    loss = engine.forward_backward(rows)               # micro-batches; strategy.sync_gradients
    agree on SIGTERM/SIGINT across workers             # a few bytes of control traffic
    engine.update(step)                                # clip; optimizer, scheduler; after_step
    outcome = engine.end_step(step, loss)              # committed, pending (inside a torchft round),
                                                       # or rolled back: hooks undo, the round reruns

No host synchronisation inside a step: losses and grad norms stay on the device until a *sync
point* (a log, evaluation, checkpoint or ladder step, a signal, the end of warm-up), which only a
committed step can be (a ladder step inside a torchft round writes its rung, nothing else). There
the loop reads them all at once, averages them over workers, and stops on the first non-finite one:
nothing is logged, evaluated, written to the ladder or checkpointed after a non-finite step. A
checkpoint written after step s holds everything the next step reads (weights, optimizer,
scheduler, strategy, RNG states, byte counters, metric history, cursor s), so resuming from it
gives the same bits as never stopping.
"""

from __future__ import annotations

import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.core import checkpoint as ckpt
from pipeline.core import ladder, numerics
from pipeline.core.config import PretrainCfg, Recipe, recipe_dict, recipe_path, recipe_sha256
from pipeline.core.errors import RecipeError, TrainingDiverged
from pipeline.core.io import write_json
from pipeline.core.model import build_model, special_ids, vocab_size
from pipeline.core.order import PublishedOrder
from pipeline.core.provenance import environment, git_commit
from pipeline.core.paths import DataDirs
from pipeline.pretrain.context import (Context, agree_signal, barrier, init_distributed,
                                       replica_context, seed_worker, set_determinism)
from pipeline.pretrain.engines import Engine, ReplicaSpec, init_deepspeed, make_engine
from pipeline.pretrain.hooks import (CheckpointHook, HistoryHook, Hook, LadderHook, OutputHook, SyncPoint,
                                     load_checkpoint)

cpu_cores = numerics.cpu_cores   # kept importable from here (bench scripts)


@dataclass
class Run:
    """Everything prepare() builds and the loop and its hooks share."""
    recipe: Recipe
    ctx: Context
    order: PublishedOrder
    engine: Engine
    dirs: DataDirs
    out_dir: Path
    total: int                    # the run's last step (the schedule's length)
    stop: int                     # where this process stops (`omp recreate --step`: earlier)
    start: int                    # the cursor resumed from (0: fresh)
    rung_steps: set[int]
    lineage: dict
    windows: dict
    seeded_model: Callable[[], torch.nn.Module]
    fresh: ckpt.FreshStart
    history: list = field(default_factory=list)
    speeds: list = field(default_factory=list)
    parent: str | None = None     # the checkpoint this run's next one follows
    resumed_from: Path | None = None
    joining: bool = False         # torchft: the state comes from a live peer at the first quorum
    ended_early: bool = False     # torchft: peers committed every round before this replica's next one

    @property
    def cfg(self) -> PretrainCfg:
        return self.recipe.pretrain

    @property
    def root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        return self.order.batch_size * self.order.seq_len

    @property
    def warm(self) -> int:
        return warmup_steps(self.cfg)


# --------------------------------------------------------------------------- prepare


def val_windows(order: PublishedOrder, seq_len: int, eval_tokens: int) -> dict[str, torch.Tensor]:
    """The first `eval_tokens` held-out tokens of each source as (n, seq_len) windows."""
    out = {}
    for name in order.names:
        toks = np.asarray(order.val_tokens(name), dtype=np.int64)
        n = min(eval_tokens, len(toks)) // seq_len
        if n == 0:
            if len(toks) < 2:
                continue
            out[name] = torch.from_numpy(toks[None, :])
        else:
            out[name] = torch.from_numpy(toks[: n * seq_len].reshape(n, seq_len))
    return out


def warmup_steps(cfg: PretrainCfg) -> int:
    """Steps at the start of a process kept out of the steady-state tokens/s (allocator, autotuning,
    and with torch.compile the compilation and its recompile for the second step)."""
    return 3 if cfg.compile else 1


def prepare(recipe: Recipe, out_dir: Path, resume: str = "none", dirs: DataDirs | None = None,
            stop_at: int | None = None, replica: tuple[int, str] | None = None) -> Run:
    """Set up this worker: context, determinism, data, model, engine, and the state to resume from.

    `replica` (engine torchft): (replica id, Lighthouse address); `resume` may then also be `join`
    (the state comes from a live peer) or `latest-or-none` (a restart: the latest checkpoint if any)."""
    dirs = dirs or DataDirs()
    cfg = recipe.pretrain
    where = recipe_path(recipe)
    ctx = replica_context(replica[0]) if replica is not None else init_distributed(cfg.distributed.backend)
    if cfg.distributed.engine == "deepspeed":
        init_deepspeed()
    ctx.autocast = ctx.device.type == "cuda" and cfg.precision != "fp32" or cfg.precision == "bf16"
    set_determinism(numerics.threads_for(recipe, "pretrain"), ctx.device)

    order = PublishedOrder(dirs.blend, dirs.tokenize)
    if cfg.steps is not None and cfg.steps > order.steps:
        raise RecipeError(where, "pretrain.steps",
                          f"{cfg.steps} steps, but the published order has {order.steps} (blend.tokens); "
                          "raise blend.tokens or lower pretrain.steps")
    total = cfg.steps or order.steps
    late = [s for s in cfg.ladder.steps if s > total]
    if late:
        raise RecipeError(where, "pretrain.ladder.steps", f"step(s) {late} beyond the run's last step {total}")
    stop = total if stop_at is None else min(stop_at, total)
    rows = order.batch_size // ctx.world_size
    if order.batch_size % ctx.world_size or rows % cfg.grad_accum_steps:
        raise RecipeError(where, "pretrain.grad_accum_steps",
                          f"global batch {order.batch_size} does not split into {ctx.world_size} workers x "
                          f"{cfg.grad_accum_steps} micro-batches")

    def seeded_model() -> torch.nn.Module:   # the initialization: the first ladder rung's parent
        return build_model(cfg.model, vocab_size(dirs.tokenizer), order.seq_len, special_ids(dirs.tokenizer),
                           seed=recipe.seed)

    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    spec, joining = resume, False
    if replica is not None:
        joining = resume in ("join", "latest-or-none")
        if resume == "latest-or-none":
            spec = "latest" if ckpt.list_steps(root) else "none"
    model = seeded_model()
    ft = ReplicaSpec(replica[0], replica[1], root / "torchft", resume, joining) if replica is not None else None
    engine = make_engine(recipe, model, ctx, total, order.batch_size, replica=ft)
    seed_worker(recipe.seed, ctx.rank)

    # -- resume
    path = None if spec == "join" else ckpt.resolve(spec, root, warn=(print if ctx.rank == 0 else (lambda *_: None)))
    # a fresh run: older checkpoints belong to another run; removed once this run's first one is
    # written (torchft: by replica 0 started fresh, never by a joiner)
    fresh = ckpt.FreshStart(root, fresh=path is None and not joining and (replica is None or replica[0] == 0))
    run_hashes = {"recipe_sha256": recipe_sha256(recipe), "indices_sha256": order.meta["indices_sha256"],
                  "recipe": recipe_dict(recipe)}
    mismatch = ckpt.check_resume(path, run_hashes, ckpt.accepts_mismatch(resume)) if path is not None else None
    barrier(ctx)
    start, history, speeds, parent = 0, [], [], None
    if path is not None:
        start, history, speeds = load_checkpoint(path, engine, ctx)
        parent = path.name
        if ctx.rank == 0:
            print(f"resumed from {path} (step {start})")
    engine.setup()
    if hasattr(engine, "attach_history"):
        engine.attach_history(history)

    lineage = {"git": git_commit(), **run_hashes, "world_size": engine.metrics()["world_size"], **engine.lineage,
               "numerics": numerics.in_force(), "environment": environment()}
    if mismatch:
        lineage["resume_mismatch"] = mismatch  # resumed on purpose from another run's checkpoint
    # held-out windows before any hook runs: bad input (a damaged val file) stops the run before it
    # touches the ladder
    windows = val_windows(order, order.seq_len, cfg.eval_tokens)
    return Run(recipe=recipe, ctx=ctx, order=order, engine=engine, dirs=dirs, out_dir=out_dir, total=total,
               stop=stop, start=start, rung_steps=set(ladder.steps(cfg.ladder, total)), lineage=lineage,
               windows=windows, seeded_model=seeded_model, fresh=fresh, history=history, speeds=speeds,
               parent=parent, resumed_from=path, joining=joining)


# --------------------------------------------------------------------------- the loop


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checks it between steps (never mid-update).
    Disabled (default handlers: the process ends) for engines whose launcher supervises them."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if self.enabled:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Batches:
    """This worker's rows of each published global batch, as a tensor on the training device.

    On CUDA a background thread reads, shards and pins the next step's rows while the current step
    trains, and the copy to the GPU is asynchronous (non_blocking from pinned memory). On CPU the
    rows are read when asked for: there is nothing to overlap with.
    """

    def __init__(self, order: PublishedOrder, shard, device: torch.device, stop: int):
        self.order, self.shard, self.device, self.stop = order, shard, device, stop
        self.cuda = device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="omp-batches") if self.cuda else None
        self._next = None   # (step, future)

    def _host(self, step: int) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(self.shard(self.order.batch(step))))
        return t.pin_memory() if self.cuda else t

    def get(self, step: int) -> torch.Tensor:
        if self._pool is None:
            return self._host(step)
        if self._next is not None and self._next[0] == step:
            rows = self._next[1].result()
        else:
            rows = self._host(step)
        self._next = (step + 1, self._pool.submit(self._host, step + 1)) if step + 1 < self.stop else None
        return rows.to(self.device, non_blocking=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class Clock:
    """Wall time between sync points; on CUDA it waits for the queued work first."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t0 = time.perf_counter()

    def mark(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - self.t0


def settle(pending: list, ctx: Context, root: Path) -> list[float]:
    """The losses of the steps since the last sync point, averaged over workers, read in one go.

    A non-finite one stops the run (on every worker alike: they read the same averages) before
    anything after it is logged, evaluated or checkpointed.
    """
    losses = torch.stack([p[1].reshape(()) for p in pending]).double()
    if ctx.world_size > 1:
        dist.all_reduce(losses)
        losses /= ctx.world_size
    values = losses.tolist()
    for (step, *_), v in zip(pending, values):
        if not math.isfinite(v):
            good = ckpt.list_steps(root)
            raise TrainingDiverged(f"non-finite loss ({v}) at step {step}; nothing after it was kept; last good "
                                   f"checkpoint: {good[-1][1] if good else 'none'}")
    return values


def default_hooks() -> list[Hook]:
    return [HistoryHook(), LadderHook(), CheckpointHook(), OutputHook()]


def loop(run: Run, hooks: list[Hook]) -> dict:
    """Step `run` from its cursor to its stop, calling `hooks`; returns the metrics dict."""
    engine, ctx, cfg = run.engine, run.ctx, run.cfg
    for h in hooks:
        h.start(run)
    warm = run.warm
    train_s = warmup_s = 0.0
    trained = 0
    pending: list[tuple[int, torch.Tensor, object, float]] = []   # (step, loss, grad norm, lr)
    due = {"log": False, "eval": False, "save": False}               # since the last sync point
    bar = tqdm(total=run.total, initial=run.start, disable=ctx.rank != 0 or getattr(engine, "replica_id", 0) != 0,
               unit="step", dynamic_ncols=True)
    clock = Clock(ctx.device)
    with StopFlag(engine.graceful_stop) as stopflag, Batches(run.order, engine.shard, ctx.device, run.stop) as batches:
        clock.mark()
        step = run.start
        while step < run.stop:
            begun = engine.begin_step(step)
            if begun is None:             # torchft: the peers committed every round already
                run.ended_early = True
                break
            if begun != step:             # torchft: healed from a live peer, at its round start
                step = begun
                bar.n = step
            x = batches.get(step)
            lr = engine.lr
            loss = engine.forward_backward(x)
            signum = agree_signal(stopflag.signum, ctx)
            gnorm = engine.update(step)
            pending.append((step, loss, gnorm, lr))
            outcome = engine.end_step(step, loss)
            if outcome.restart is not None:   # torchft: the round was rolled back; redo it
                pending = [p for p in pending if p[0] < outcome.restart]
                for h in hooks:
                    h.rollback(run, outcome.restart)
                step = bar.n = outcome.restart
                continue
            done = step + 1
            step = done
            bar.update(1)
            due["log"] |= done % cfg.log_every_steps == 0 or done == run.total
            due["eval"] |= done % cfg.eval_every_steps == 0 or done == run.total
            due["save"] |= done % cfg.checkpoint_every_steps == 0 or done == run.total or bool(signum) or engine.synced
            rung = done in run.rung_steps
            sync = outcome.committed and (any(due.values()) or bool(outcome.record) or done - run.start == warm)
            if not (sync or rung):
                continue
            # -- a sync point: everything queued so far is read back once
            seconds = clock.lap()
            steady = done - run.start > warm
            if steady:
                train_s, trained = train_s + seconds, trained + len(pending)
            else:
                warmup_s += seconds
            losses = settle(pending, ctx, run.root)
            n_steps, (_, _, gnorm, lr) = len(pending), pending[-1]
            pending.clear()
            point = SyncPoint(done, rung=rung)
            if sync:
                point = SyncPoint(done, log=due["log"] or bool(outcome.record), eval=due["eval"], save=due["save"],
                                  rung=rung, signum=signum, losses=losses, grad_norm=gnorm, lr=lr,
                                  record=outcome.record)
                due = dict.fromkeys(due, False)
                if point.log and steady:
                    run.speeds.append({"step": done, "tokens_per_s": run.tokens_per_step * n_steps / seconds})
            rate = run.tokens_per_step * trained / train_s if train_s else run.tokens_per_step * n_steps / seconds
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
            for h in hooks:
                h.sync(run, point)
            clock.mark()
    bar.close()
    if run.stop < run.total:   # stop_at: the rungs up to `stop` are written; the run is not finished
        return {"steps": run.stop, "stopped_at": run.stop, "rungs": sorted(s for s in run.rung_steps if s <= run.stop)}
    if run.ended_early:
        return {}

    metrics: dict = {}
    for h in hooks:
        metrics = h.end(run) or metrics
    if not trained and warmup_s:   # a run shorter than its warm-up: report what there is
        trained_tokens, seconds = run.tokens_per_step * (run.total - run.start), warmup_s
    else:
        trained_tokens, seconds = run.tokens_per_step * trained, train_s
    # wall-clock figures: returned, and written to artifacts/timings/pretrain.json, never into the
    # stage output (DVC hashes it, the release lineage quotes that hash)
    timings = {"tokens_per_s": (trained_tokens / seconds) if seconds else None,
               "train_seconds": train_s + warmup_s, "warmup_seconds": warmup_s, "speeds": run.speeds}
    if engine.writer:
        write_json(run.out_dir.parent / "timings" / "pretrain.json", timings)
    metrics = {**metrics, **{k: v for k, v in timings.items() if k != "speeds"}}
    barrier(ctx)
    return metrics


def train(recipe: Recipe, out_dir: Path, resume: str = "none", dirs: DataDirs | None = None,
          stop_at: int | None = None, replica: tuple[int, str] | None = None) -> dict:
    """Train (or resume) on this worker; the engine's writer writes the outputs. Returns the metrics dict.

    `stop_at` N (`omp recreate --step N`): stop after step N, with the ladder rungs up to N written
    and nothing else (no final model, no metrics); the schedule is still the whole run's.
    `replica` (engine torchft): this process is replica group (id, Lighthouse address)."""
    run = prepare(recipe, out_dir, resume, dirs, stop_at, replica)
    try:
        return loop(run, default_hooks())
    finally:
        run.engine.close()
