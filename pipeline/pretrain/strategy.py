"""How workers keep their model replicas in agreement: one interface, one class per mode.

The trainer drives the same model and the same inner step for every mode; only the strategy
changes (a recipe switch, `pretrain.distributed.mode`). Per training step the trainer does:

    batch rows of this worker = strategy.shard(global_batch)    # (rows, seq_len)
    forward / backward (gradient accumulation over micro-batches)
    strategy.sync_gradients(model)                              # ddp: all-reduce grads; else no-op
    clip grad norm; optimizer.step(); scheduler.step(); optimizer.zero_grad()
    strategy.after_step(model, optimizer, step)                 # diloco: outer sync every H steps

The optimizer comes from strategy.build_optimizer (DeMo replaces AdamW with its own). Anything the
strategy keeps across steps (global params, outer momentum, error-feedback buffers) is returned by
state_dict() and restored by load_state_dict(), and goes into every checkpoint. All communication
goes through `self.comm` (pipeline.comm.Comm), which counts bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.comm import Comm


class Strategy:
    name = "single"
    synced = False       # True right after a step that ended with an outer sync (the trainer checkpoints then)

    def __init__(self, comm: Comm, cfg=None):
        self.comm = comm
        self.cfg = cfg

    # -- data: each worker takes a contiguous, equal slice of every global batch
    def shard(self, batch: np.ndarray) -> np.ndarray:
        w, r = self.comm.world_size, self.comm.rank
        if batch.shape[0] % w:
            raise ValueError(f"global batch of {batch.shape[0]} rows does not split over {w} workers")
        n = batch.shape[0] // w
        return batch[r * n:(r + 1) * n]

    def build_optimizer(self, params, make_default):
        """`make_default(params)` builds the recipe's AdamW; strategies may replace it."""
        return make_default(params)

    def setup(self, model: torch.nn.Module) -> None:
        """Called once after the model is built (and after a checkpoint is loaded)."""

    def sync_gradients(self, model: torch.nn.Module) -> None:
        pass

    def after_step(self, model: torch.nn.Module, optimizer, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DDPStrategy(Strategy):
    """Synchronous data parallel, the baseline: all-reduce (average) every gradient every step.

    Gradients are flattened into one fp32 buffer per step, so the byte count is exactly
    params × 4 bytes per step per worker.
    """

    name = "ddp"

    def sync_gradients(self, model: torch.nn.Module) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self.comm.all_reduce(flat, op="avg", tag="grad")
        i = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[i:i + n].view_as(g))
            i += n


def make_strategy(dist_cfg, comm: Comm) -> Strategy:
    """The strategy of `pretrain.distributed.mode`; the low-communication ones are imported lazily."""
    if dist_cfg.mode == "ddp":
        return DDPStrategy(comm, dist_cfg)
    if dist_cfg.mode == "diloco":
        from pipeline.lowcomm.diloco import DiLoCoStrategy

        return DiLoCoStrategy(comm, dist_cfg)
    if dist_cfg.mode == "demo":
        from pipeline.lowcomm.demo import DeMoStrategy

        return DeMoStrategy(comm, dist_cfg)
    raise ValueError(f"pretrain.distributed.mode: unknown mode {dist_cfg.mode!r}")
