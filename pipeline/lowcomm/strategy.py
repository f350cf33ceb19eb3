"""How workers keep their model replicas in agreement: one interface, one class per mode, one registry.

The trainer (pipeline/pretrain) drives the same model and the same inner step for every mode; only
the strategy changes (a recipe switch, `pretrain.distributed.mode`). Per training step:

    batch rows of this worker = strategy.shard(global_batch)    # (rows, seq_len)
    forward / backward (gradient accumulation over micro-batches)
    strategy.sync_gradients(model)                              # ddp: all-reduce grads; else no-op
    apply_update(...): clip grad norm; optimizer.step(); scheduler.step(); optimizer.zero_grad();
                       strategy.after_step(model, optimizer, step)   # diloco: outer sync every H steps

`apply_update` is that second half, shared by the trainer's plain engine
(pipeline/pretrain/engines.py) and the small driver in pipeline/lowcomm/loop.py, so the order of
the hooks is written once. The registry of modes is pipeline/lowcomm/modes.py (it imports every strategy; they import only
this base). The optimizer comes from strategy.build_optimizer (DeMo replaces AdamW
with its own). Anything the strategy keeps across steps (global params, outer momentum,
error-feedback buffers) is returned by state_dict() and restored by load_state_dict(), and goes into
every checkpoint. All communication goes through `self.comm` (pipeline.core.comm.Comm), which counts bytes.

This package imports nothing from pipeline.pretrain: the trainer depends on it, not the reverse.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.comm import Comm


class Strategy:
    """One worker alone, or replicas that never talk (the base of every mode)."""

    name = "single"
    synced = False       # True right after a step that ended with an outer sync (the trainer checkpoints then)
    # True when the workers' weights differ between syncs, so each rank's replica is checkpointed
    # on its own (model-rank<r>.safetensors); False when every rank holds rank 0's weights.
    per_rank_weights = False

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
    params × 4 bytes per step per worker. At world size 1 there is nobody to talk to: the bytes a
    worker would send are counted and the gradients are left alone (no flatten and copy back).
    """

    name = "ddp"

    def sync_gradients(self, model: torch.nn.Module) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        if self.comm.world_size == 1:
            self.comm.count("grad", 4 * sum(g.numel() for g in grads))
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self.comm.all_reduce(flat, op="avg", tag="grad")
        i = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[i:i + n].view_as(g))
            i += n


def grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor | None:
    """Clip to `max_norm` (None: measure only); the total norm stays on the device (no host sync)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return None
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def apply_update(model: torch.nn.Module, strategy: Strategy, optimizer, step: int, clip: float | None = None,
                 scheduler=None, measure: bool = True) -> torch.Tensor | None:
    """The second half of a step, after backward and sync_gradients: clip, optimizer and scheduler
    step, zero the gradients, strategy.after_step. Returns the pre-clip grad norm (a device tensor),
    or None when neither clipping nor `measure` asked for it."""
    gnorm = grad_norm(list(model.parameters()), clip) if (clip or measure) else None
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    strategy.after_step(model, optimizer, step)
    return gnorm
