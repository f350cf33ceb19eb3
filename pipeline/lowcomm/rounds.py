"""Fault-tolerant DiLoCo on torchft: workers may die or join while training goes on.

Membership, quorum, process groups and live recovery all come from torchft; our code is the outer
step (DiLoCoStrategy: compression, error feedback) and the byte accounting (Comm). Per worker:

    one replica group = one process = one torchft Manager (with its own TCPStore and a
    fault-tolerant gloo process group); one Lighthouse for the whole job decides the quorum.

One *round* = H inner steps + one outer sync, and it is the unit torchft commits:

    manager.start_quorum()        quorum of the replicas alive now; a replica whose step is behind
                                  (a late or restarted one) heals here: torchft fetches the state
                                  of a healthy peer over HTTP and calls our load_state_dict
    comm.begin_round()            rank / world size = participating rank / participant count
    H inner steps                 on this replica's shard of global batches round*H .. round*H+H-1
    outer sync                    pseudo-gradient through manager.allreduce (fp32) or an all-gather
                                  of packed compressed messages on the torchft process group
    manager.should_commit()       True: the round is kept and torchft's step (= rounds done) +1.
                                  False (a peer died, a collective failed): everything is rolled
                                  back to the state at the round start and the round is redone
                                  with the next quorum.

Data rule (deterministic given membership): in a round with W participants, the replica with
participating rank r trains on rows [r*B/W, (r+1)*B/W) of each global batch (B rows). A committed
round therefore trains on every row of its H global batches exactly once, whoever is alive; a
round that loses a worker is discarded and redone, so no shard is ever missing or counted twice.
The global batch must split evenly over every participant count that can occur.

The state a joiner receives (and the snapshot a failed round rolls back to) is: replica weights,
inner optimizer state, DiLoCo state (global params, outer momentum, error-feedback residuals,
step). torchft's own state (its step = rounds committed) comes with it, so the data cursor is
`rounds committed × H`. A joiner thus starts from the peer's inner AdamW moments (a warm start) and
its error-feedback residual: the mean residual over the participants, which is what the next
compressed mean adds back, stays what it was. Participating ranks follow the sorted replica ids.

Starting a replica (first start or restart after a crash): build the model, optimizer, strategy
and data first, and create the Manager (make_manager) only right before the first round. A Manager
heartbeats to the Lighthouse from the moment it exists, and the Lighthouse will not form a new
quorum while half or more of the heartbeating replicas are not asking for one (torchft's split-brain
rule, src/lighthouse.rs quorum_compute). A restarted replica that heartbeats but spends seconds in
set-up therefore stalls every survivor whose next quorum is not a "fast" one (the first quorum after
a peer died) for that long; a replica that heartbeats and never asks (a test holding it back) stalls
them until the quorum timeout. `start_replica` enforces the order: set-up done, Manager, first quorum.

Rounds (round_range): the first `warmup_sync_steps` rounds are one synchronous (ddp) step each,
the gradient all-reduce going through torchft; every later round is H inner steps. With streaming
fragments (F > 1) a round holds the F fragment syncs that fall into its H steps, and torchft commits
them together: a failed round rolls all of them back. A healed joiner copies its peer's replica as
a whole (local weights of fragments not yet synced included), as a DiLoCo worker restarted from a
peer's checkpoint would.

Limits: a replica group is one process; a collective that hangs rather than fails is cut off by the
Manager timeout (gloo timeout).
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket
import time
import urllib.request
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import AllgatherOptions, ReduceOp

from pipeline.core.comm import Comm
from pipeline.lowcomm.lighthouse import lighthouse_status, wait_lighthouse  # noqa: F401 - re-exported
from pipeline.lowcomm.loop import train_steps


class ManagerComm(Comm):
    """Comm whose collectives go through a torchft Manager and its fault-tolerant process group.

    Bytes are counted as in Comm (numel × element_size of what this worker contributes), for every
    attempt: a round that is later rolled back still sent its bytes. A failed collective does not
    raise: torchft records the error (manager.errored()), the returned tensors are garbage, and
    should_commit() then returns False so the driver discards the round.
    """

    def __init__(self, manager, pg):
        super().__init__(group=None)
        self.manager = manager
        self.pg = pg
        self.distributed = True
        self.failed_collectives = 0

    def begin_round(self) -> None:
        """Take rank and world size from the quorum just formed (fixed for the whole round)."""
        rank = self.manager.participating_rank()
        if rank is None:
            # only with torchft's FIXED_WITH_SPARES mode, which make_manager does not use
            raise RuntimeError("torchft: this replica is a spare in the current quorum; the DiLoCo "
                               "driver needs every replica to participate (WorldSizeMode.DYNAMIC)")
        self.world_size = self.manager.num_participants()
        self.rank = rank

    def all_reduce(self, t: torch.Tensor, op: str = "sum", tag: str = "all_reduce",
                   part: str = "payload") -> torch.Tensor:
        self._count(tag, self.nbytes(t), "all_reduce", part)
        work = self.manager.allreduce(t, reduce_op=ReduceOp.AVG if op == "avg" else ReduceOp.SUM)
        if not work.wait():
            self.failed_collectives += 1
        return t

    def all_gather(self, t: torch.Tensor, tag: str = "all_gather", part: str = "payload") -> list[torch.Tensor]:
        self._count(tag, self.nbytes(t), "all_gather", part)
        out = [torch.zeros_like(t) for _ in range(self.world_size)]
        if self.manager.errored() is not None:
            return out                      # the round is already lost: skip the wire
        if self.world_size == 1:
            out[0].copy_(t)
            return out
        try:
            self.pg.allgather([out], [t.contiguous()], AllgatherOptions()).wait()
        except Exception as e:              # a dead peer: gloo raises; torchft decides what next
            self.failed_collectives += 1
            self.manager.report_error(e)
        return out

    def broadcast(self, t, src=0, tag="broadcast"):
        raise NotImplementedError("ManagerComm: broadcast is not used by DiLoCo; torchft heals "
                                  "joining replicas instead")

    def barrier(self) -> None:
        raise NotImplementedError("ManagerComm: no barrier across replica groups; the quorum is "
                                  "the synchronisation point")

    def stats(self) -> dict:
        return {**super().stats(), "failed_collectives": self.failed_collectives}


class ReplicaState:
    """What one replica hands to a joining peer and rolls back to: a snapshot, never live tensors.

    torchft's HTTP transport keeps the returned dict and serves it while this replica already trains
    on (CPU tensors are not copied on its side), so everything is cloned here.
    """

    def __init__(self, model: torch.nn.Module, optimizer, strategy, extra: dict | None = None):
        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.extra = extra or {}            # name -> object with state_dict / load_state_dict (scheduler, ...)
        self.healed: list[dict] = []        # what load_state_dict received (for logs and tests)

    def state_dict(self) -> dict:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "strategy": self.strategy.state_dict(),
                **{k: copy.deepcopy(o.state_dict()) for k, o in self.extra.items()}}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        for k, o in self.extra.items():
            o.load_state_dict(copy.deepcopy(state[k]))

    def load_state_dict(self, state: dict) -> None:
        """torchft's heal callback: a state fetched from a live peer."""
        self.restore(state)
        self.healed.append(state)


def safe_http_transport(timeout: timedelta):
    """torchft's HTTP checkpoint transport, but unpickling only what weights_only allows.

    torchft loads a peer's state with weights_only=False (to carry arbitrary objects such as LR
    schedulers). Ours is tensors, numbers, strings and the optimizer's plain dicts, so we keep the
    project rule: nothing received from the network may run code when it is loaded.
    """
    # torchft loads only in a torchft run (every pretrain process imports this module)
    from torchft.checkpointing._serialization import _streaming_load
    from torchft.checkpointing.http_transport import HTTPTransport

    class SafeHTTPTransport(HTTPTransport):
        @classmethod
        def _load_from_address(cls, address: str, timeout: timedelta) -> object:
            with urllib.request.urlopen(address, timeout=timeout.total_seconds()) as f:
                return _streaming_load(f, weights_only=True)

    return SafeHTTPTransport(timeout=timeout, num_chunks=0)


def make_manager(replica_id: str, lighthouse_addr: str, replica: ReplicaState, min_replicas: int = 1,
                 timeout_seconds: float = 10.0, quorum_timeout_seconds: float = 60.0):
    """A torchft Manager for a one-process replica group, with its own TCPStore and gloo group.

    Returns (manager, pg, store); keep the store alive as long as the manager.
    `replica_id` should end in the replica index (torchft derives a global rank from its digits).
    The store listens on every interface and is advertised to the quorum under this host's name
    (OMP_FT_HOST overrides it), as torchft's Manager server is: peers on other hosts connect to it.
    """
    from torchft import Manager, ProcessGroupGloo  # only in a torchft run, as above

    timeout = timedelta(seconds=timeout_seconds)
    host = os.environ.get("OMP_FT_HOST") or socket.gethostname()
    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    pg = ProcessGroupGloo(timeout=timeout)
    manager = Manager(pg=pg, min_replica_size=min_replicas, use_async_quorum=False,
                      load_state_dict=replica.load_state_dict, state_dict=replica.state_dict,
                      replica_id=replica_id, store_addr=host, store_port=store.port, rank=0, hostname=host,
                      world_size=1, lighthouse_addr=lighthouse_addr, timeout=timeout,
                      quorum_timeout=timedelta(seconds=quorum_timeout_seconds),
                      connect_timeout=timeout, init_sync=False,
                      checkpoint_transport=safe_http_transport(timeout))
    return manager, pg, store


def start_replica(replica_id: str, lighthouse_addr: str, model: torch.nn.Module, strategy, optimizer,
                  comm: "ManagerComm", batch_of, loss_of, rounds: int, **kw) -> tuple[list[dict], "ReplicaState"]:
    """Join (or rejoin) the job and train until `rounds` rounds are committed.

    Everything slow (model, optimizer, strategy set-up, data) must be done before this is called:
    the Manager is created here, and the first quorum is asked for at once, so a (re)starting
    replica heartbeats only while it is ready to join (see the module docstring). `kw` goes to
    make_manager (timeouts) and run_rounds (hooks)."""
    mk = {k: kw.pop(k) for k in ("min_replicas", "timeout_seconds", "quorum_timeout_seconds") if k in kw}
    replica = ReplicaState(model, optimizer, strategy)
    manager, pg, store = make_manager(replica_id, lighthouse_addr, replica, **mk)
    comm.manager, comm.pg = manager, pg
    try:
        return run_rounds(model, strategy, optimizer, replica, manager, comm, batch_of, loss_of, rounds, **kw), replica
    finally:
        manager.shutdown(wait=False)
        del store


def tensor_sha256(t: torch.Tensor) -> str:
    """Bitwise fingerprint of a tensor (to compare replicas without keeping copies)."""
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def round_range(d, r: int) -> tuple[int, int]:
    """Steps [start, stop) of round r: warm-up rounds are one synchronous step, the others H steps."""
    w = d.warmup_sync_steps
    if r < w:
        return r, r + 1
    start = w + (r - w) * d.inner_steps
    return start, start + d.inner_steps


def rounds_in(d, steps: int) -> int:
    """How many rounds `steps` training steps are; ValueError if they do not end on a round."""
    w, h = d.warmup_sync_steps, d.inner_steps
    if steps < w or (steps - w) % h:
        raise ValueError(f"{steps} steps do not end on a round ({w} warm-up steps, then rounds of "
                         f"inner_steps={h})")
    return w + (steps - w) // h


def round_of(d, step: int) -> int:
    """The round that starts at `step` (a round boundary)."""
    return rounds_in(d, step)


class Rounds:
    """torchft's unit of commit, one round at a time (the protocol both drivers share: run_rounds
    below, and the trainer's torchft engine, pipeline/pretrain/engines.py):

        entry = rounds.begin()        quorum (a behind replica heals here), participating rank and
                                      world size, a snapshot of the replica; None when every round
                                      is committed (a heal can bring a replica to the end)
        ... train steps entry["steps"][0] .. entry["steps"][1]-1 ...
        rounds.end(entry, losses)     should_commit: True keeps the round; False restores the
                                      snapshot (the caller redoes the round with the next quorum)
    """

    def __init__(self, manager, comm: ManagerComm, replica: ReplicaState, d, rounds: int,
                 on_round: Callable[[int], None] | None = None, max_failed_rounds: int = 20):
        self.manager, self.comm, self.replica, self.d, self.rounds = manager, comm, replica, d, rounds
        self.on_round, self.max_failed_rounds = on_round, max_failed_rounds
        self.log: list[dict] = []
        self.failed = 0
        self._snapshot, self._t0 = None, 0.0

    def done(self) -> bool:
        return self.manager.current_step() >= self.rounds

    def begin(self) -> dict | None:
        if self.on_round is not None:
            self.on_round(self.manager.current_step())
        self._t0 = time.monotonic()
        healed_before = len(self.replica.healed)
        self.manager.start_quorum()
        quorum_seconds = time.monotonic() - self._t0
        self.comm.begin_round()
        r = self.manager.current_step()          # after a heal: the peer's count of committed rounds
        if r >= self.rounds:
            return None
        start, stop = round_range(self.d, r)
        entry = {"round": r, "world_size": self.comm.world_size, "rank": self.comm.rank,
                 "quorum_seconds": quorum_seconds,
                 "healed": len(self.replica.healed) > healed_before,
                 "global_sha256": tensor_sha256(self.replica.strategy.state["fragments"][0]["global"]),
                 "steps": [start, stop]}
        self._snapshot = self.replica.state_dict()
        return entry

    def end(self, entry: dict, losses: list[float]) -> bool:
        committed = self.manager.should_commit()
        if not committed:
            self.replica.restore(self._snapshot)
            self.failed += 1
            if self.failed > self.max_failed_rounds:
                raise RuntimeError(f"torchft: {self.failed} rounds in a row failed to commit; last error "
                                   f"{self.manager.errored()}")
        else:
            self.failed = 0
        self._snapshot = None
        entry.update(committed=committed, loss=sum(losses) / len(losses), seconds=time.monotonic() - self._t0,
                     bytes_sent=self.comm.bytes_sent)
        self.log.append(entry)
        return committed


def run_rounds(model: torch.nn.Module, strategy, optimizer, replica: ReplicaState, manager,
               comm: ManagerComm, batch_of: Callable[[int], object],
               loss_of: Callable[[torch.nn.Module, object], torch.Tensor], rounds: int,
               on_round: Callable[[int], None] | None = None,
               on_step: Callable[[int, float], None] | None = None,
               max_failed_rounds: int = 20,
               on_commit: Callable[[dict], None] | None = None) -> list[dict]:
    """Train until torchft has committed `rounds` rounds; returns one log entry per attempt
    (round, world_size, rank, healed, committed, mean inner loss, seconds, quorum_seconds,
    bytes_sent so far, global_sha256 = sha256 of the global parameters at the round start).

    The small driver of the lowcomm tests and benchmarks (pretraining runs torchft through the
    trainer's one loop instead). `strategy` is a DiLoCoStrategy built on `comm` and already set up
    on `model`; `on_commit(entry)` runs after each committed round.
    """
    protocol = Rounds(manager, comm, replica, strategy.d, rounds, on_round, max_failed_rounds)
    while not protocol.done():
        entry = protocol.begin()
        if entry is None:
            break
        losses: list[float] = []

        def step_hook(step: int, loss: float) -> None:
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss)

        start, stop = entry["steps"]
        train_steps(model, strategy, optimizer, batch_of, loss_of, start, stop, on_step=step_hook)
        if protocol.end(entry, losses) and on_commit is not None:
            on_commit(entry)
    return protocol.log
