"""Every collective of training goes through here, so the bytes each worker sends are counted.

Convention (documented in the README): the bytes a worker *sends* for a collective are the payload
it contributes — `numel × element_size` of the (packed) tensor it puts in:
  - all_reduce: the whole tensor (what a worker hands to the collective, whatever the algorithm);
  - all_gather: the worker's own tensor;
  - broadcast: the tensor on the source rank, 0 elsewhere.
This is the algorithm-independent count used in the DiLoCo/DeMo papers' comparisons; a ring
all-reduce moves about 2×(W−1)/W of it on the wire. Compressed payloads are counted packed
(e.g. int4 = numel/2 bytes) plus their scales.

With world size 1 (no process group) the collectives are identities and still count bytes, so a
single-process run reports what one worker would send.

The byte ledger (`Comm.ledger()`) splits the same bytes by collective, tag and part of the message:
`all_gather/pseudo_grad/payload`, `.../scales`, `.../indices` for a compressed outer sync,
`all_reduce/grad/payload` for data parallel. Its bytes add up to `bytes_sent`; the trainer writes
it into every checkpoint (ledger.json) and metrics.json, and `omp recreate` compares it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist


def init_process_group(backend: str = "gloo", timeout: timedelta = timedelta(minutes=10)) -> None:
    """`dist.init_process_group` from torchrun's environment, safe across elastic restarts.

    Under torchrun the workers share the agent's TCPStore, and it is *not* emptied when the group
    restarts after a failure (`--max-restarts`): a restarted rank can read the address the dead
    rank published in the previous attempt, gloo's connect is refused, and the group hangs or
    dies (seen here with torch 2.13). Keys are therefore put under a prefix per restart attempt.
    Outside torchrun's agent store this is plain `init_process_group(backend)`.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"omp/attempt{attempt}/", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=timeout)


class Comm:
    def __init__(self, group=None):
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.bytes_sent = 0
        self.calls = 0
        self.by_kind: dict[str, int] = defaultdict(int)
        self.entries: dict[str, list[int]] = {}    # "collective/tag/part" -> [bytes, calls]
        self.parent: Comm | None = None
        self.scope = ""

    def scoped(self, group, scope: str) -> "Comm":
        """A Comm on `group` whose bytes are also counted here, ledger keys prefixed `scope:`
        (islands: intra_island / inter_island)."""
        child = Comm(group)
        child.parent, child.scope = self, scope
        return child

    def count(self, kind: str, nbytes: int, collective: str = "all_reduce", part: str = "payload") -> None:
        """Count bytes a worker would send without a collective (world size 1)."""
        self._count(kind, nbytes, collective, part)

    def _count(self, kind: str, nbytes: int, collective: str = "other", part: str = "payload") -> None:
        self.bytes_sent += nbytes
        self.by_kind[kind] += nbytes
        self.calls += 1
        e = self.entries.setdefault(f"{collective}/{kind}/{part}", [0, 0])
        e[0] += nbytes
        e[1] += 1
        if self.parent is not None:
            self.parent._count(kind, nbytes, f"{self.scope}:{collective}", part)

    def ledger(self) -> dict:
        """Bytes this worker sent, by collective/tag/part, with the number of calls of each."""
        return {k: {"bytes": b, "calls": c} for k, (b, c) in sorted(self.entries.items())}

    def load_ledger(self, ledger: dict) -> None:
        self.entries = {k: [int(v["bytes"]), int(v["calls"])] for k, v in ledger.items()}

    @staticmethod
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def all_reduce(self, t: torch.Tensor, op: str = "sum", tag: str = "all_reduce",
                   part: str = "payload") -> torch.Tensor:
        """In place. op: 'sum' or 'avg' (avg = sum / world_size, done here so gloo supports it)."""
        self._count(tag, self.nbytes(t), "all_reduce", part)
        if self.distributed and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        if op == "avg" and self.world_size > 1:
            t.div_(self.world_size)
        return t

    def all_gather(self, t: torch.Tensor, tag: str = "all_gather", part: str = "payload") -> list[torch.Tensor]:
        """Every worker's `t` (same shape and dtype on all workers), in rank order."""
        self._count(tag, self.nbytes(t), "all_gather", part)
        if not (self.distributed and self.world_size > 1):
            return [t.clone()]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return out

    def broadcast(self, t: torch.Tensor, src: int = 0, tag: str = "broadcast") -> torch.Tensor:
        if self.rank == src:
            self._count(tag, self.nbytes(t), "broadcast")
        if self.distributed and self.world_size > 1:
            dist.broadcast(t, src=src, group=self.group)
        return t

    def barrier(self) -> None:
        if self.distributed and self.world_size > 1:
            dist.barrier(group=self.group)

    def stats(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "calls": self.calls, "by_kind": dict(self.by_kind)}
