"""The same training loop with DeepSpeed ZeRO (stage 1/2/3 from the recipe) as the engine.

Launched under torchrun like the plain workers (DS_ACCELERATOR=cpu and gloo on CPU). DeepSpeed
owns gradient averaging, partitioning, accumulation and clipping; we keep the published batches,
the schedule, the torch AdamW (so curves compare with plain data parallel), stop/NaN handling,
checkpoint manifests and the outputs. DeepSpeed's own checkpoint files go inside our checkpoint
directory (`ds/`), covered by the same sha256 manifest.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline import checkpoint as ckpt
from pipeline.comm import Comm, init_process_group
from pipeline.config import Recipe, recipe_dict, recipe_sha256
from pipeline.data import PublishedOrder
from pipeline.errors import RecipeError
from pipeline.io import read_json, write_json
from pipeline.lineage import git_commit
from pipeline.model import build_model, count_params, special_ids, vocab_size
from pipeline.pretrain.trainer import (Context, DataDirs, StopFlag, TrainingDiverged, TrainingStopped, agree, cpu_cores,
                                       evaluate, lr_factor, make_adamw, rng_state, seed_worker, set_determinism,
                                       set_rng_state, val_windows)


def ds_config(recipe: Recipe, global_batch: int, world_size: int) -> dict:
    cfg = recipe.pretrain
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world_size // cfg.grad_accum_steps,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": torch.cuda.is_available() and cfg.precision != "fp32"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def full_state_model(engine, recipe: Recipe, vocab: int, seq_len: int, ids: dict):
    """An unpartitioned copy of the weights on rank 0 (ZeRO-3 gathers its shards)."""
    import deepspeed

    module = engine.module
    if recipe.pretrain.distributed.zero_stage < 3:
        return module
    copy = build_model(recipe.pretrain.model, vocab, seq_len, ids, seed=recipe.seed)
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if dist.get_rank() == 0:
            copy.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()}, strict=False)
    return copy


def train(recipe: Recipe, out_dir: Path, resume: str = "none", dirs: DataDirs | None = None) -> dict:
    import deepspeed
    from tqdm import tqdm

    dirs = dirs or DataDirs()
    cfg = recipe.pretrain
    if not dist.is_initialized():
        init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    ctx = Context(rank=dist.get_rank(), world_size=dist.get_world_size())
    set_determinism(cfg.threads or max(1, cpu_cores() // ctx.world_size))

    order = PublishedOrder(dirs.blend, dirs.tokenize)
    if cfg.steps is not None and cfg.steps > order.steps:
        raise RecipeError(getattr(recipe, "_path", "<recipe>"), "pretrain.steps",
                          f"{cfg.steps} steps, but the published order has {order.steps} (blend.tokens); "
                          "raise blend.tokens or lower pretrain.steps")
    total = cfg.steps or order.steps
    if (order.batch_size // ctx.world_size) % cfg.grad_accum_steps or order.batch_size % ctx.world_size:
        raise RecipeError(getattr(recipe, "_path", "<recipe>"), "pretrain.grad_accum_steps",
                          f"global batch {order.batch_size} does not split into {ctx.world_size} workers x "
                          f"{cfg.grad_accum_steps} micro-batches")
    vocab, ids = vocab_size(dirs.tokenizer), special_ids(dirs.tokenizer)
    model = build_model(cfg.model, vocab, order.seq_len, ids, seed=recipe.seed)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), optimizer=make_adamw(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total)),
        config=ds_config(recipe, order.batch_size, ctx.world_size))
    ctx.device = engine.device
    seed_worker(recipe.seed, ctx.rank)
    comm = Comm()  # DeepSpeed's own collectives are not counted here; see metrics["comm"]

    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    start, history, speeds, parent = 0, [], [], None
    path = ckpt.resolve(resume, root, warn=(print if ctx.rank == 0 else (lambda *_: None)))
    fresh = ckpt.FreshStart(root, fresh=path is None)  # old checkpoints go once this run's first is written
    run_hashes = {"recipe_sha256": recipe_sha256(recipe), "indices_sha256": order.meta["indices_sha256"],
                  "recipe": recipe_dict(recipe)}
    mismatch = ckpt.check_resume(path, run_hashes, ckpt.accepts_mismatch(resume)) if path is not None else None
    dist.barrier()
    if path is not None:
        engine.load_checkpoint(str(path / "ds"), tag="ds")
        state = torch.load(path / f"state-rank{ctx.rank}.pt", weights_only=True)
        set_rng_state(state["rng"])
        start, history = state["step"], state["history"]
        timings = path / "timings.json"
        speeds = read_json(timings) if timings.is_file() else []
        parent = path.name
        if ctx.rank == 0:
            print(f"resumed from {path} (step {start})")

    lineage = {"git": git_commit(), **run_hashes, "world_size": ctx.world_size,
               "mode": "ddp", "engine": f"deepspeed-zero{cfg.distributed.zero_stage}"}
    if mismatch:
        lineage["resume_mismatch"] = mismatch
    windows = val_windows(order, order.seq_len, cfg.eval_tokens)
    if start == 0:
        val = evaluate(engine, windows, ctx)  # every rank runs it: ZeRO-3 forward is collective
        if ctx.rank == 0:
            history.append({"step": 0, "val": val})

    def checkpoint(step: int) -> None:
        nonlocal parent
        if ctx.rank == 0:
            ckpt.begin(root, step)
        dist.barrier()
        tmp = ckpt.tmp_dir(root, step)
        engine.save_checkpoint(str(tmp / "ds"), tag="ds")
        torch.save({"step": step, "rng": rng_state(), "history": history if ctx.rank == 0 else []},
                   tmp / f"state-rank{ctx.rank}.pt")
        if ctx.rank == 0:
            write_json(tmp / "timings.json", speeds)
        dist.barrier()
        if ctx.rank == 0:
            ckpt.commit(root, step, {**lineage, "parent": parent})
            fresh.committed(ckpt.step_dir(root, step))
            ckpt.prune(root, cfg.keep_last)
        parent = f"step-{step:07d}"
        dist.barrier()

    shard_rows = order.batch_size // ctx.world_size
    tokens_per_step = order.batch_size * order.seq_len
    train_s, trained = 0.0, 0
    bar = tqdm(total=total, initial=start, disable=ctx.rank != 0, unit="step", dynamic_ncols=True)
    with StopFlag() as stop:
        for step in range(start, total):
            t0 = time.perf_counter()
            rows = torch.from_numpy(np.ascontiguousarray(
                order.batch(step)[ctx.rank * shard_rows:(ctx.rank + 1) * shard_rows]))
            micro = rows.chunk(cfg.grad_accum_steps)
            loss_sum = 0.0
            for i, x in enumerate(micro):
                loss = engine(input_ids=x.to(engine.device), labels=x.to(engine.device)).loss
                engine.backward(loss)
                loss_sum += float(loss.detach()) / len(micro)
                if i < len(micro) - 1:
                    engine.step()
            loss, signum = agree(loss_sum, stop.signum, ctx)
            if not math.isfinite(loss):
                good = fresh.own(ckpt.list_steps(root))
                raise TrainingDiverged(f"non-finite loss ({loss}) at step {step}; weights not updated; last good "
                                       f"checkpoint: {good[-1][1] if good else 'none'}")
            lr = engine.get_lr()[0]
            engine.step()
            gnorm = engine.get_global_grad_norm()
            dt = time.perf_counter() - t0
            train_s, trained, done = train_s + dt, trained + 1, step + 1
            rec = None
            if done % cfg.log_every_steps == 0 or done == total:
                rec = {"step": done, "loss": loss, "lr": lr, "grad_norm": float(gnorm) if gnorm is not None else None}
                speeds.append({"step": done, "tokens_per_s": tokens_per_step / dt})
            if done % cfg.eval_every_steps == 0 or done == total:
                val = evaluate(engine, windows, ctx)
                if ctx.rank == 0:
                    rec = {**(rec or {"step": done}), "val": val}
            if rec and ctx.rank == 0:
                history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step * trained / train_s:,.0f}")
            if done % cfg.checkpoint_every_steps == 0 or done == total or signum:
                checkpoint(done)
            if signum and done < total:
                bar.close()
                raise TrainingStopped(f"stopped by {signal.Signals(signum).name} after step {done} of {total}; "
                                      f"checkpoint {root / f'step-{done:07d}'} written; resume with --resume latest")
    bar.close()
    full = full_state_model(engine, recipe, vocab, order.seq_len, ids)
    metrics = {
        "steps": total, "tokens": total * tokens_per_step, "params": count_params(full),
        "tokens_per_s": (tokens_per_step * trained / train_s) if train_s else None,
        "train_seconds": train_s, "world_size": ctx.world_size, "mode": "ddp",
        "engine": f"deepspeed-zero{cfg.distributed.zero_stage}",
        "bytes_sent_per_worker": None, "comm": comm.stats(),
    }
    if ctx.rank == 0:
        from pipeline.pretrain import outputs
        metrics = outputs.write(recipe, out_dir, full, history, metrics, dirs, lineage, parent, speeds)
    dist.barrier()
    return metrics
