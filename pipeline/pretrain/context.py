"""Where a training process stands: its rank and device, and the process-wide state that
makes two runs equal (thread count, deterministic kernels, seeds, RNG states). No model, no engine."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from pipeline.core.comm import init_process_group


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: bool = False
    control: object = None   # process group for stop agreement (gloo: CPU ints, no device sync); None: default


def init_distributed(backend: str) -> Context:
    """torch.distributed from torchrun's environment (WORLD_SIZE > 1), else one process."""
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


def replica_context(replica_id: int) -> Context:
    """A torchft replica group of one process: no torch.distributed group of its own (its collectives
    go through the torchft Manager); on a GPU host the replicas spread over the GPUs."""
    ctx = Context()
    if torch.cuda.is_available():
        ctx.device = torch.device("cuda", replica_id % torch.cuda.device_count())
        torch.cuda.set_device(ctx.device)
    return ctx


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


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def agree_signal(signum: int, ctx: Context) -> int:
    """The signal any worker got (MAX over workers), so every worker stops after the same step.

    Control traffic over a gloo group (CPU ints: no device sync), not counted as training bytes.
    """
    if ctx.world_size == 1:
        return signum
    sig = torch.tensor([signum], dtype=torch.int64)
    dist.all_reduce(sig, op=dist.ReduceOp.MAX, group=ctx.control)
    return int(sig[0])
