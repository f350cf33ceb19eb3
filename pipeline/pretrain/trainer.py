"""The pretraining loop of one worker: the same code in-process (world size 1) and under torchrun.

Per step (the order pipeline/pretrain/strategy.py documents):
    rows = strategy.shard(order.batch(step))          # the published global batch N, nothing else
    forward/backward over grad_accum_steps micro-batches
    strategy.sync_gradients(model)
    agree on loss / stop across workers; non-finite loss → stop before the update
    clip; optimizer.step(); scheduler.step(); optimizer.zero_grad()
    strategy.after_step(model, optimizer, step)

A checkpoint written after step s holds everything the next step reads (weights, optimizer,
scheduler, strategy, RNG states, byte counters, metric history, cursor s), so resuming from it
gives the same bits as never stopping.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline import checkpoint as ckpt
from pipeline.comm import Comm, init_process_group
from pipeline.config import recipe_dict, PretrainCfg, Recipe, recipe_sha256
from pipeline.data import PublishedOrder
from pipeline.errors import PipelineError, RecipeError
from pipeline.io import read_json, write_json
from pipeline.lineage import git_commit
from pipeline.model import build_model, count_params, special_ids, vocab_size
from pipeline.pretrain.strategy import make_strategy


class TrainingStopped(PipelineError):
    """Stopped by a signal after writing a checkpoint; resume with `--resume latest`."""


class TrainingDiverged(PipelineError):
    """A non-finite loss: nothing after the last good checkpoint was kept."""


@dataclass
class DataDirs:
    blend: Path = Path("artifacts/blend")
    tokenize: Path = Path("artifacts/tokenize")
    tokenizer: Path = Path("artifacts/tokenizer")


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: bool = False


# --------------------------------------------------------------------------- setup


def init_distributed(backend: str) -> Context:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if ws > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    ws = dist.get_world_size() if dist.is_initialized() else 1
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Context(rank=rank, world_size=ws, device=device)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_determinism(threads: int) -> None:
    # A fixed thread count fixes the order of CPU reductions, so equal inputs give equal bits.
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def seed_worker(seed: int, rank: int) -> None:
    s = seed * 1000 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def lr_factor(step: int, cfg: PretrainCfg, total: int) -> float:
    """Multiplier of cfg.lr at `step` (0-based): linear warmup, then cosine or WSD decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = total - max(1, int(total * cfg.decay_fraction))
        if step < decay_start:
            return 1.0
        frac = (step - decay_start + 1) / max(1, total - decay_start)
        return 1.0 - (1.0 - floor) * frac
    span = max(1, total - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_adamw(cfg: PretrainCfg):
    def make(params):
        params = list(params)
        # no weight decay on norms (1-D); embeddings and matrices decay
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return make


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


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {"python": random.getstate(), "torch": torch.get_rng_state(),
          "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                    "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, strategy, comm: Comm,
                    history: list, ctx: Context, lineage: dict, per_rank_weights: bool,
                    speeds: list | None = None) -> Path | None:
    from safetensors.torch import save_model

    if ctx.rank == 0:
        ckpt.begin(root, step)
    _barrier(ctx)
    tmp = ckpt.tmp_dir(root, step)
    if ctx.rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
    elif per_rank_weights:
        save_model(model, str(tmp / f"model-rank{ctx.rank}.safetensors"))
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "strategy": strategy.state_dict(), "rng": rng_state(),
             "comm": {"bytes_sent": comm.bytes_sent, "calls": comm.calls, "by_kind": dict(comm.by_kind)},
             "history": history if ctx.rank == 0 else []}
    torch.save(state, tmp / f"state-rank{ctx.rank}.pt")
    if ctx.rank == 0 and speeds is not None:
        # wall-clock numbers live apart from the state, so equal runs write bit-identical state files
        write_json(tmp / "timings.json", speeds)
    _barrier(ctx)
    path = None
    if ctx.rank == 0:
        path = ckpt.commit(root, step, lineage)
    _barrier(ctx)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, strategy, comm: Comm, ctx: Context,
                    per_rank_weights: bool) -> tuple[int, list, list]:
    from safetensors.torch import load_model

    wfile = path / ("model.safetensors" if ctx.rank == 0 or not per_rank_weights
                    else f"model-rank{ctx.rank}.safetensors")
    sfile = path / f"state-rank{ctx.rank}.pt"
    for f in (wfile, sfile):
        if not f.is_file():
            raise ckpt.CheckpointError(f"{f}: missing; was the checkpoint written with another world size?")
    load_model(model, str(wfile), device=str(ctx.device))
    state = torch.load(sfile, map_location=ctx.device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    strategy.load_state_dict(state["strategy"])
    set_rng_state({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state["rng"].items()})
    comm.bytes_sent, comm.calls = state["comm"]["bytes_sent"], state["comm"]["calls"]
    comm.by_kind.clear()
    comm.by_kind.update(state["comm"]["by_kind"])
    timings = path / "timings.json"
    return state["step"], state["history"], (read_json(timings) if timings.is_file() else [])


# --------------------------------------------------------------------------- the loop


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checks it between steps (never mid-update)."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(recipe: Recipe, out_dir: Path, resume: str = "none", dirs: DataDirs | None = None) -> dict:
    """Train (or resume) on this worker; rank 0 writes the outputs. Returns the metrics dict."""
    dirs = dirs or DataDirs()
    cfg = recipe.pretrain
    ctx = init_distributed(cfg.distributed.backend)
    ctx.autocast = ctx.device.type == "cuda" and cfg.precision != "fp32" or cfg.precision == "bf16"
    set_determinism(cfg.threads or max(1, cpu_cores() // ctx.world_size))

    order = PublishedOrder(dirs.blend, dirs.tokenize)
    if cfg.steps is not None and cfg.steps > order.steps:
        raise RecipeError(getattr(recipe, "_path", "<recipe>"), "pretrain.steps",
                          f"{cfg.steps} steps, but the published order has {order.steps} (blend.tokens); "
                          "raise blend.tokens or lower pretrain.steps")
    total = cfg.steps or order.steps
    rows = order.batch_size // ctx.world_size
    if order.batch_size % ctx.world_size or rows % cfg.grad_accum_steps:
        raise RecipeError(getattr(recipe, "_path", "<recipe>"), "pretrain.grad_accum_steps",
                          f"global batch {order.batch_size} does not split into {ctx.world_size} workers x "
                          f"{cfg.grad_accum_steps} micro-batches")

    model = build_model(cfg.model, vocab_size(dirs.tokenizer), order.seq_len, special_ids(dirs.tokenizer),
                        seed=recipe.seed).to(ctx.device)
    comm = Comm()
    strategy = make_strategy(cfg.distributed, comm)
    optimizer = strategy.build_optimizer(model.parameters(), make_adamw(cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total))
    seed_worker(recipe.seed, ctx.rank)

    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    per_rank = cfg.distributed.mode != "ddp"
    start, history, speeds, parent = 0, [], [], None
    path = ckpt.resolve(resume, root, warn=(print if ctx.rank == 0 else (lambda *_: None)))
    # a fresh run: older checkpoints belong to another run; removed once this run's first one is written
    fresh = ckpt.FreshStart(root, fresh=path is None)
    run_hashes = {"recipe_sha256": recipe_sha256(recipe), "indices_sha256": order.meta["indices_sha256"],
                  "recipe": recipe_dict(recipe)}
    mismatch = ckpt.check_resume(path, run_hashes, ckpt.accepts_mismatch(resume)) if path is not None else None
    _barrier(ctx)
    if path is not None:
        start, history, speeds = load_checkpoint(path, model, optimizer, scheduler, strategy, comm, ctx, per_rank)
        parent = path.name
        if ctx.rank == 0:
            print(f"resumed from {path} (step {start})")
    strategy.setup(model)

    lineage = {"git": git_commit(), **run_hashes, "world_size": ctx.world_size, "mode": cfg.distributed.mode}
    if mismatch:
        lineage["resume_mismatch"] = mismatch  # resumed on purpose from another run's checkpoint
    windows = val_windows(order, order.seq_len, cfg.eval_tokens)
    fwd = torch.compile(model) if cfg.compile else model
    if start == 0 and ctx.rank == 0:
        history.append({"step": 0, "val": evaluate(model, windows, ctx)})

    def checkpoint(step: int) -> Path | None:
        nonlocal parent
        p = save_checkpoint(root, step, model, optimizer, scheduler, strategy, comm, history, ctx,
                            {**lineage, "parent": parent}, per_rank, speeds)
        parent = f"step-{step:07d}"
        if ctx.rank == 0:
            fresh.committed(ckpt.step_dir(root, step))
            ckpt.prune(root, cfg.keep_last)
        return p

    tokens_per_step = order.batch_size * order.seq_len
    train_s, trained = 0.0, 0
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, disable=ctx.rank != 0, unit="step", dynamic_ncols=True)
    with StopFlag() as stop:
        for step in range(start, total):
            t0 = time.perf_counter()
            loss = train_step(fwd, model, order, step, strategy, optimizer, cfg, ctx)
            loss, signum = agree(loss, stop.signum, ctx)
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                good = fresh.own(ckpt.list_steps(root))
                raise TrainingDiverged(f"non-finite loss ({loss}) at step {step}; weights not updated; last good "
                                       f"checkpoint: {good[-1][1] if good else 'none'}")
            gnorm = clip(model, cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            strategy.after_step(model, optimizer, step)
            dt = time.perf_counter() - t0
            train_s, trained = train_s + dt, trained + 1
            done = step + 1
            rec = None
            if done % cfg.log_every_steps == 0 or done == total:
                rec = {"step": done, "loss": loss, "lr": lr, "grad_norm": gnorm}
                speeds.append({"step": done, "tokens_per_s": tokens_per_step / dt})
            if (done % cfg.eval_every_steps == 0 or done == total) and ctx.rank == 0:
                rec = rec or {"step": done}
                rec["val"] = evaluate(model, windows, ctx)
            if rec and ctx.rank == 0:
                history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step * trained / train_s:,.0f}")
            if done % cfg.checkpoint_every_steps == 0 or done == total or signum or strategy.synced:
                checkpoint(done)
            if signum and done < total:
                bar.close()
                name = signal.Signals(signum).name
                raise TrainingStopped(f"stopped by {name} after step {done} of {total}; checkpoint "
                                      f"{root / f'step-{done:07d}'} written; resume with --resume latest")
    bar.close()
    if start == total and total > 0 and not ckpt.list_steps(root):
        checkpoint(total)
    metrics = {
        "steps": total, "tokens": total * tokens_per_step, "params": count_params(model),
        "tokens_per_s": (tokens_per_step * trained / train_s) if train_s else None,
        "train_seconds": train_s, "world_size": ctx.world_size, "mode": cfg.distributed.mode,
        "engine": "in-process" if ctx.world_size == 1 else cfg.distributed.engine,
        "bytes_sent_per_worker": comm.stats()["bytes_sent"], "comm": comm.stats(),
    }
    if ctx.rank == 0:
        from pipeline.pretrain import outputs
        metrics = outputs.write(recipe, out_dir, model, history, metrics, dirs, lineage, parent, speeds)
    _barrier(ctx)
    return metrics


def agree(loss: float, signum: int, ctx: Context) -> tuple[float, int]:
    """Mean loss over workers (for the log and the NaN check) and the signal any worker got.

    Control traffic, not counted as training bytes; every worker then stops at the same step.
    """
    if ctx.world_size == 1:
        return loss, signum
    t = torch.tensor([loss], dtype=torch.float64)
    sig = torch.tensor([signum], dtype=torch.int64)
    dist.all_reduce(t)
    dist.all_reduce(sig, op=dist.ReduceOp.MAX)
    return float(t[0]) / ctx.world_size, int(sig[0])


def train_step(fwd, model, order: PublishedOrder, step: int, strategy, optimizer, cfg: PretrainCfg,
               ctx: Context) -> float:
    """Forward/backward of this worker's rows of global batch `step`, then sync. Returns the mean loss."""
    rows = torch.from_numpy(np.ascontiguousarray(strategy.shard(order.batch(step))))
    micro = rows.chunk(cfg.grad_accum_steps)
    total = 0.0
    for x in micro:
        x = x.to(ctx.device)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
            loss = fwd(input_ids=x, labels=x).loss / len(micro)
        loss.backward()
        total += float(loss.detach())
    strategy.sync_gradients(model)
    return total


def clip(model, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        return float(torch.norm(torch.stack([p.grad.norm() for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
