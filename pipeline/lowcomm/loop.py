"""A small driver for the strategies: the trainer's per-step protocol, on real gloo process groups.

Used by the low-communication tests, the torchft driver (pipeline/lowcomm/rounds.py) and bench/comm.py.
Its update half is `pipeline.lowcomm.strategy.apply_update`, the function the trainer's plain
engine calls, so the hooks run in the trainer's order and what it measures is what the trainer
does; process launch and rendezvous are torch.multiprocessing + torch.distributed (gloo).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.core.comm import Comm
from pipeline.lowcomm.modes import make_strategy  # noqa: F401 - re-exported (benchmarks, tests)
from pipeline.lowcomm.strategy import Strategy, apply_update


def train_steps(model: torch.nn.Module, strategy: Strategy, optimizer, batch_of: Callable[[int], object],
                loss_of: Callable[[torch.nn.Module, object], torch.Tensor], start: int, stop: int,
                clip: float | None = None, on_step: Callable[[int, float], None] | None = None) -> None:
    """Steps start..stop-1: shard, forward/backward, sync_gradients, then apply_update (clip, step,
    zero_grad, after_step)."""
    for step in range(start, stop):
        rows = strategy.shard(batch_of(step))
        loss = loss_of(model, rows)
        loss.backward()
        strategy.sync_gradients(model)
        apply_update(model, strategy, optimizer, step, clip=clip, measure=False)
        if on_step is not None:
            on_step(step, float(loss))


def _die_with_parent() -> None:
    """A worker whose launcher is killed (not only Ctrl-C on the whole group) stops too, instead of
    computing on for nobody (Linux: PR_SET_PDEATHSIG)."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:          # the launcher died before the call above
        os._exit(1)


def _worker(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, out_dir: str) -> None:
    _die_with_parent()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(Comm(), *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args) -> list:
    """Run `fn(comm, *args)` on `world_size` gloo workers (processes); returns each rank's result.

    `fn` must be importable (module level) so the spawned processes can find it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "init")
        mp.start_processes(_worker, args=(world_size, init_file, fn, args, tmp), nprocs=world_size,
                           join=True, start_method="spawn")
        out = []
        for r in range(world_size):
            with open(Path(tmp) / f"rank{r}.pkl", "rb") as f:
                out.append(pickle.load(f))
        return out
