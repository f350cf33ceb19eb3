"""The one pretraining loop: the same code in-process (world size 1), under torchrun, and with DeepSpeed.

setup (distributed context, determinism, model, engine) / resume (engine state + RNG + cursor +
history) / steps / finish (final model, metrics, outputs). What differs between engines sits
behind the adapter interface of pipeline/pretrain/engines.py (plain model + optimizer + Strategy,
or DeepSpeed ZeRO). Per step:

    rows = engine.shard(order.batch(step))            # the published global batch N, nothing else
    loss = engine.forward_backward(rows)               # micro-batches; strategy.sync_gradients
    agree on SIGTERM/SIGINT across workers             # a few bytes of control traffic
    engine.update(step)                                # clip; optimizer, scheduler; after_step

No host synchronisation inside a step: losses and grad norms stay on the device until a *sync
point* (a log, evaluation or checkpoint step, a signal, the end of warm-up). There the loop reads
them all at once, averages them over workers, and stops on the first non-finite one: nothing is
logged, evaluated or checkpointed after a non-finite step. A checkpoint written after step s holds
everything the next step reads (weights, optimizer, scheduler, strategy, RNG states, byte counters,
metric history, cursor s), so resuming from it gives the same bits as never stopping.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.core import checkpoint as ckpt
from pipeline.core import ladder
from pipeline.core.comm import Comm, init_process_group
from pipeline.core.config import PretrainCfg, Recipe, recipe_dict, recipe_sha256
from pipeline.core.order import PublishedOrder
from pipeline.core.errors import PipelineError, RecipeError
from pipeline.core.io import read_json, write_json
from pipeline.core import numerics
from pipeline.core.provenance import environment, git_commit
from pipeline.core.model import build_model, count_params, special_ids, vocab_size
from pipeline.pretrain.engines import make_adamw, make_engine  # noqa: F401 - make_adamw re-exported


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
    control: object = None   # process group for stop agreement (gloo: CPU ints, no device sync); None: default


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
    control = None
    if ws > 1 and dist.get_backend() != "gloo":
        control = dist.new_group(backend="gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Context(rank=rank, world_size=ws, device=device, control=control)


cpu_cores = numerics.cpu_cores   # kept importable from here (bench scripts)


def set_determinism(threads: int, device: torch.device | None = None) -> None:
    """Same inputs, same code, same kind of hardware -> the same bits.

    A fixed thread count fixes the order of CPU reductions. On CUDA, deterministic algorithms are
    enforced (warn_only=False: with warn_only=True cuDNN's SDPA backward stayed non-deterministic
    and two identical runs differed); an op without a deterministic kernel then fails loudly instead
    of silently breaking the promise. cuBLAS needs a fixed workspace (CUBLAS_WORKSPACE_CONFIG).
    `fill_uninitialized_memory` is turned off (it costs ~7% on a GPU): it only matters to code
    that reads memory it never wrote, and the trainer never does: every buffer it allocates empty
    (all_gather outputs, optimizer state) is fully written before it is read.
    """
    torch.set_num_threads(threads)
    cuda = (device is not None and torch.device(device).type == "cuda") or (
        device is None and torch.cuda.is_available())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=not cuda)
    torch.utils.deterministic.fill_uninitialized_memory = False
    if cuda:
        torch.backends.cudnn.benchmark = False


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


def timings_path(root: Path, step: int) -> Path:
    """Wall-clock numbers of a checkpoint: apart from it and from every stage output (DVC hashes
    artifacts/pretrain whole), in artifacts/timings/pretrain/step-NNNNNNN.json."""
    return Path(root).parent.parent / "timings" / "pretrain" / f"step-{step:07d}.json"


def save_checkpoint(root: Path, step: int, engine, history: list, ctx: Context, lineage: dict,
                    speeds: list | None = None) -> Path | None:
    """Atomically: the engine's files and state, RNG states, byte counters, history, cursor `step`."""
    if ctx.rank == 0:
        ckpt.begin(root, step)
    _barrier(ctx)
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
    _barrier(ctx)
    path = None
    if ctx.rank == 0:
        path = ckpt.commit(root, step, lineage)
    _barrier(ctx)
    return path


def load_checkpoint(path: Path, engine, ctx: Context) -> tuple[int, list, list]:
    """Restore engine, RNG and byte counters from `path`; returns (step, history, timings)."""
    sfile = path / f"state-rank{ctx.rank}.pt"
    for f in [sfile, *engine.files(path, ctx.rank)]:
        if not f.exists():
            raise ckpt.CheckpointError(f"{f}: missing; was the checkpoint written with another world size or engine?")
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


def warmup_steps(cfg: PretrainCfg) -> int:
    """Steps at the start of a process kept out of the steady-state tokens/s (allocator, autotuning,
    and with torch.compile the compilation and its recompile for the second step)."""
    return 3 if cfg.compile else 1


def train(recipe: Recipe, out_dir: Path, resume: str = "none", dirs: DataDirs | None = None,
          stop_at: int | None = None) -> dict:
    """Train (or resume) on this worker; rank 0 writes the outputs. Returns the metrics dict.

    `stop_at` N (`omp recreate --step N`): stop after step N, with the ladder rungs up to N written
    and nothing else (no final model, no metrics); the schedule is still the whole run's."""
    dirs = dirs or DataDirs()
    cfg = recipe.pretrain
    # -- setup
    ctx = init_distributed(cfg.distributed.backend)
    if cfg.distributed.engine == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo")
    ctx.autocast = ctx.device.type == "cuda" and cfg.precision != "fp32" or cfg.precision == "bf16"
    set_determinism(numerics.threads_for(recipe, "pretrain"), ctx.device)

    order = PublishedOrder(dirs.blend, dirs.tokenize)
    if cfg.steps is not None and cfg.steps > order.steps:
        raise RecipeError(getattr(recipe, "_path", "<recipe>"), "pretrain.steps",
                          f"{cfg.steps} steps, but the published order has {order.steps} (blend.tokens); "
                          "raise blend.tokens or lower pretrain.steps")
    total = cfg.steps or order.steps
    rung_steps = ladder.steps(cfg.ladder, total)
    late = [s for s in cfg.ladder.steps if s > total]
    if late:
        raise RecipeError(getattr(recipe, "_path", "<recipe>"), "pretrain.ladder.steps",
                          f"step(s) {late} beyond the run's last step {total}")
    stop = total if stop_at is None else min(stop_at, total)
    rows = order.batch_size // ctx.world_size
    if order.batch_size % ctx.world_size or rows % cfg.grad_accum_steps:
        raise RecipeError(getattr(recipe, "_path", "<recipe>"), "pretrain.grad_accum_steps",
                          f"global batch {order.batch_size} does not split into {ctx.world_size} workers x "
                          f"{cfg.grad_accum_steps} micro-batches")

    def seeded_model() -> torch.nn.Module:   # the initialization: the first ladder rung's parent
        return build_model(cfg.model, vocab_size(dirs.tokenizer), order.seq_len, special_ids(dirs.tokenizer),
                           seed=recipe.seed)

    model = seeded_model()
    engine = make_engine(recipe, model, ctx, total, order.batch_size)
    seed_worker(recipe.seed, ctx.rank)

    # -- resume
    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    start, history, speeds, parent = 0, [], [], None
    path = ckpt.resolve(resume, root, warn=(print if ctx.rank == 0 else (lambda *_: None)))
    # a fresh run: older checkpoints belong to another run; removed once this run's first one is written
    fresh = ckpt.FreshStart(root, fresh=path is None)
    run_hashes = {"recipe_sha256": recipe_sha256(recipe), "indices_sha256": order.meta["indices_sha256"],
                  "recipe": recipe_dict(recipe)}
    mismatch = ckpt.check_resume(path, run_hashes, ckpt.accepts_mismatch(resume)) if path is not None else None
    _barrier(ctx)
    if path is not None:
        start, history, speeds = load_checkpoint(path, engine, ctx)
        parent = path.name
        if ctx.rank == 0:
            print(f"resumed from {path} (step {start})")
    engine.setup()

    lineage = {"git": git_commit(), **run_hashes, "world_size": ctx.world_size, **engine.lineage,
               "numerics": numerics.in_force(), "environment": environment()}
    tokens_per_step = order.batch_size * order.seq_len
    # held-out windows first: bad input (a damaged val file) stops the run before it touches the ladder
    windows = val_windows(order, order.seq_len, cfg.eval_tokens)
    # -- the ladder: rungs of this run in checkpoints/ladder/ (kept on resume, like the checkpoints)
    work = root / "ladder"
    rung_at = set(rung_steps)
    if ctx.rank == 0:
        if path is None:
            shutil.rmtree(work, ignore_errors=True)   # a previous run's rungs: this run starts over
        else:
            ladder.drop_after(work, start)
    _barrier(ctx)
    if start == 0:
        init = engine.final_model()   # collective with ZeRO-3
        if ctx.rank == 0:
            work.mkdir(parents=True, exist_ok=True)
            write_json(work / ladder.INIT, {"init_sha256": ladder.weights_sha256(init), "seed": recipe.seed})
    elif ctx.rank == 0 and not (work / ladder.INIT).is_file():
        # resumed from a checkpoint written without a ladder (another engine's, e.g. torchft's): the
        # initialization is the seed's, rebuilt the way it was built above, so the chain still starts there
        resumed_rng = rng_state()   # build_model reseeds torch: the resumed RNG must go on untouched
        seeded = seeded_model()
        set_rng_state(resumed_rng)
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / ladder.INIT, {"init_sha256": ladder.weights_sha256(seeded), "seed": recipe.seed})
        del seeded
    prev_rung = ladder.read_rungs(work)[-1:] if ctx.rank == 0 else []

    def write_rung(step: int) -> None:
        model_now = engine.final_model()   # every rank: collective with ZeRO-3
        if ctx.rank == 0:
            parent = prev_rung[0]["sha256"] if prev_rung else read_json(work / ladder.INIT)["init_sha256"]
            rec = ladder.write_rung(model_now, work, {
                "step": step, "stage": "pretrain", "stage_step": step, "tokens_seen": step * tokens_per_step,
                "rows_consumed": step * order.batch_size, "parent_sha256": parent}, tokenizer_dir=dirs.tokenizer)
            prev_rung[:] = [rec]
        _barrier(ctx)
    if mismatch:
        lineage["resume_mismatch"] = mismatch  # resumed on purpose from another run's checkpoint

    def evaluate_now() -> dict | None:
        if engine.collective_forward:
            val = evaluate(engine.forward_module, windows, ctx)   # every rank: the forward is collective
            return val if ctx.rank == 0 else None
        return evaluate(engine.forward_module, windows, ctx) if ctx.rank == 0 else None

    if start == 0:
        val = evaluate_now()
        if ctx.rank == 0:
            history.append({"step": 0, "val": val})
        if 0 in rung_at:
            write_rung(0)

    def checkpoint(step: int) -> Path | None:
        nonlocal parent
        p = save_checkpoint(root, step, engine, history, ctx, {**lineage, "parent": parent}, speeds)
        parent = f"step-{step:07d}"
        if ctx.rank == 0:
            fresh.committed(ckpt.step_dir(root, step))
            for gone in ckpt.prune(root, cfg.keep_last):
                timings_path(root, int(gone.name[5:])).unlink(missing_ok=True)
        return p

    # -- steps
    warm = warmup_steps(cfg)
    train_s = warmup_s = 0.0
    trained = 0
    pending: list[tuple[int, torch.Tensor, object, float]] = []   # (step, loss, grad norm, lr)
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, disable=ctx.rank != 0, unit="step", dynamic_ncols=True)
    clock = Clock(ctx.device)
    with StopFlag() as stopflag, Batches(order, engine.shard, ctx.device, stop) as batches:
        clock.mark()
        for step in range(start, stop):
            x = batches.get(step)
            lr = engine.lr
            loss = engine.forward_backward(x)
            signum = agree_signal(stopflag.signum, ctx)
            gnorm = engine.update(step)
            pending.append((step, loss, gnorm, lr))
            done = step + 1
            bar.update(1)
            log = done % cfg.log_every_steps == 0 or done == total
            ev = done % cfg.eval_every_steps == 0 or done == total
            save = done % cfg.checkpoint_every_steps == 0 or done == total or bool(signum) or engine.synced
            rung = done in rung_at
            if not (log or ev or save or rung or done - start == warm):
                continue
            # -- a sync point: everything queued so far is read back once
            seconds = clock.lap()
            steady = done - start > warm
            if steady:
                train_s, trained = train_s + seconds, trained + len(pending)
            else:
                warmup_s += seconds
            losses = settle(pending, ctx, root)
            n_steps, (_, _, gnorm, lr) = len(pending), pending[-1]
            pending.clear()
            rec = None
            if log:
                rec = {"step": done, "loss": losses[-1], "lr": lr,
                       "grad_norm": None if gnorm is None else float(gnorm)}
                if steady:
                    speeds.append({"step": done, "tokens_per_s": tokens_per_step * n_steps / seconds})
            if ev:
                val = evaluate_now()
                if ctx.rank == 0:
                    rec = {**(rec or {"step": done}), "val": val}
            if rec and ctx.rank == 0:
                history.append(rec)
            rate = tokens_per_step * trained / train_s if train_s else tokens_per_step * n_steps / seconds
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
            if rung:
                write_rung(done)
            if save:
                checkpoint(done)
            if signum and done < total:
                bar.close()
                name = signal.Signals(signum).name
                raise TrainingStopped(f"stopped by {name} after step {done} of {total}; checkpoint "
                                      f"{root / f'step-{done:07d}'} written; resume with --resume latest")
            clock.mark()
    bar.close()
    if stop < total:   # stop_at: the rungs up to `stop` are written; the run is not finished
        return {"steps": stop, "stopped_at": stop, "rungs": sorted(s for s in rung_at if s <= stop)}
    if start == total and total > 0 and not ckpt.list_steps(root):
        checkpoint(total)

    # -- finish
    final = engine.final_model()
    if not trained and warmup_s:   # a run shorter than its warm-up: report what there is
        trained_tokens, seconds = tokens_per_step * (total - start), warmup_s
    else:
        trained_tokens, seconds = tokens_per_step * trained, train_s
    metrics = {
        "steps": total, "tokens": total * tokens_per_step, "params": count_params(final),
        "warmup_steps": min(warm, total - start),
        "world_size": ctx.world_size, "mode": engine.lineage["mode"], "engine": engine.name,
        "bytes_sent_per_worker": engine.bytes_sent_per_worker(), "comm": engine.comm.stats(),
        "byte_ledger": engine.comm.ledger() if engine.bytes_sent_per_worker() is not None else None,
    }
    if cfg.distributed.islands > 1:   # hybrid layout: the traffic inside islands and across them apart
        ledger = engine.comm.ledger()
        metrics["islands"] = {"islands": cfg.distributed.islands, **{
            f"{scope}_bytes_per_worker": sum(v["bytes"] for k, v in ledger.items() if k.startswith(f"{scope}:"))
            for scope in ("intra_island", "inter_island", "global")}}
    # wall-clock figures: returned, and written to artifacts/timings/pretrain.json, never into the
    # stage output (DVC hashes it, the release lineage quotes that hash)
    timings = {"tokens_per_s": (trained_tokens / seconds) if seconds else None,
               "train_seconds": train_s + warmup_s, "warmup_seconds": warmup_s, "speeds": speeds}
    if ctx.rank == 0:
        from pipeline.pretrain import outputs
        where = {"step": total, "rows_consumed": total * order.batch_size, "tokens_seen": total * tokens_per_step}
        metrics = outputs.write(recipe, out_dir, final, history, metrics, dirs, {**lineage, **where}, parent, speeds)
        write_json(out_dir.parent / "timings" / "pretrain.json", timings)
    metrics = {**metrics, **{k: v for k, v in timings.items() if k != "speeds"}}
    _barrier(ctx)
    return metrics


def agree_signal(signum: int, ctx: Context) -> int:
    """The signal any worker got (MAX over workers), so every worker stops after the same step.

    Control traffic over a gloo group (CPU ints: no device sync), not counted as training bytes.
    """
    if ctx.world_size == 1:
        return signum
    sig = torch.tensor([signum], dtype=torch.int64)
    dist.all_reduce(sig, op=dist.ReduceOp.MAX, group=ctx.control)
    return int(sig[0])


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
