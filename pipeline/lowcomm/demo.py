"""DeMo, decoupled momentum optimization (Peng, Quesnelle & Kingma 2024), as a Strategy + optimizer.

No gradient is all-reduced. Every step each worker, for each parameter:
    m <- beta * m + g                              (local momentum, never synchronized)
    split m (flattened, zero-padded) into chunks of `chunk_size`; DCT-II each chunk (orthonormal)
    keep the `topk` largest-magnitude DCT components per chunk       -> (positions, values)
    m <- m - IDCT(kept components)                 (what is sent is removed from the local momentum)
then all workers all-gather (positions, values) of every parameter in two flat messages, average
the gathered components, inverse-DCT them into Q and step
    theta <- theta * (1 - lr * weight_decay) - lr * (sign(Q) if sign else Q).
Every worker decodes the same gathered messages in rank order, so the replicas stay identical.

Chunks are 1-D over the flattened tensor (the paper chunks 2-D weights in 2-D); the fast-moving
components the DCT isolates are the same idea, and 1-D keeps the code and the byte count simple.
Bytes per worker per step = n_chunks * topk * (4 bytes of value + 1/2/4 bytes of position).
"""

from __future__ import annotations

import math

import torch

from pipeline.core.comm import Comm
from pipeline.lowcomm.strategy import Strategy


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix C (n x n): coefficients = C @ x, and x = C.T @ coefficients."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.float()


def to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    flat = x.reshape(-1)
    n = math.ceil(flat.numel() / chunk)
    out = torch.zeros(n * chunk, dtype=torch.float32)
    out[:flat.numel()] = flat
    return out.view(n, chunk)


def from_chunks(chunks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return chunks.reshape(-1)[:like.numel()].view_as(like)


def topk_per_chunk(coeffs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_chunks, chunk) -> positions (n_chunks, k) int64 and their values."""
    idx = torch.topk(coeffs.abs(), k, dim=1, sorted=False).indices
    return idx, torch.gather(coeffs, 1, idx)


def index_dtype(chunk: int) -> torch.dtype:
    return torch.uint8 if chunk <= 256 else torch.int16 if chunk <= 32768 else torch.int32


class DeMoOptimizer(torch.optim.Optimizer):
    def __init__(self, params, comm: Comm, lr: float, weight_decay: float = 0.0, chunk_size: int = 64,
                 topk: int = 8, momentum_decay: float = 0.999, sign: bool = True):
        if topk > chunk_size:
            raise ValueError(f"pretrain.distributed.demo.topk={topk} exceeds chunk_size={chunk_size}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.comm, self.chunk, self.k, self.beta, self.sign = comm, chunk_size, topk, momentum_decay, sign
        self.C = dct_matrix(chunk_size)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        items = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not items:
            return loss
        positions, values, shapes = [], [], []
        for _, p in items:
            st = self.state[p]
            if "momentum" not in st:
                st["momentum"] = torch.zeros_like(p, dtype=torch.float32)
            m = st["momentum"]
            m.mul_(self.beta).add_(p.grad.float())
            coeffs = to_chunks(m, self.chunk) @ self.C.T
            idx, val = topk_per_chunk(coeffs, self.k)
            sent = torch.zeros_like(coeffs).scatter_(1, idx, val)
            m.sub_(from_chunks(sent @ self.C, m))
            positions.append(idx.reshape(-1))
            values.append(val.reshape(-1))
            shapes.append(coeffs.shape)
        pos_msg = torch.cat(positions).to(index_dtype(self.chunk))
        val_msg = torch.cat(values)
        all_pos = self.comm.all_gather(pos_msg, tag="demo_positions", part="indices")
        all_val = self.comm.all_gather(val_msg, tag="demo_values", part="values")
        self._apply(items, shapes, all_pos, all_val)
        return loss

    def _apply(self, items, shapes, all_pos, all_val) -> None:
        off = 0
        for (group, p), shape in zip(items, shapes):
            n = shape[0] * self.k
            dense = torch.zeros(shape, dtype=torch.float32)
            for pos, val in zip(all_pos, all_val):  # rank order: the same sum on every worker
                dense.scatter_add_(1, pos[off:off + n].long().view(shape[0], self.k),
                                   val[off:off + n].view(shape[0], self.k))
            off += n
            q = from_chunks((dense / len(all_pos)) @ self.C, p)
            update = q.sign() if self.sign else q
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.sub_(group["lr"] * update.to(p.dtype))


def demo_bytes_per_step(param_numels: list[int], chunk: int, k: int) -> int:
    """Analytic bytes one worker sends per DeMo step (positions + fp32 values)."""
    n_chunks = sum(math.ceil(n / chunk) for n in param_numels)
    return n_chunks * k * (4 + torch.empty(0, dtype=index_dtype(chunk)).element_size())


class DeMoStrategy(Strategy):
    name = "demo"
    # equal by construction (the same gathered messages decoded in rank order), but each rank keeps
    # its own copy so a resume never rests on that argument
    per_rank_weights = True

    def build_optimizer(self, params, make_default):
        default = make_default(params)
        c = self.cfg.demo
        groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g.get("weight_decay", 0.0)}
                  for g in default.param_groups]
        return DeMoOptimizer(groups, self.comm, lr=groups[0]["lr"], chunk_size=c.chunk_size, topk=c.topk,
                             momentum_decay=c.momentum_decay, sign=c.sign)
