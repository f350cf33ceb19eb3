"""Engines: what the one training loop (pipeline/pretrain/trainer.py) asks of whatever updates the model.

The loop owns the published batches, the stop/NaN agreement, the sync points and the hooks (history,
ladder, checkpoints, outputs: pipeline/pretrain/hooks.py); an engine owns the model's update, its own
state, and its unit of commit. `Engine` below is that contract, declared; three engines keep it:

    PlainEngine      our model + the recipe's AdamW and schedule + a Strategy (pipeline.lowcomm:
                     single, ddp, diloco, demo) over torchrun's process group
    DeepSpeedEngine  DeepSpeed ZeRO (stage 0-3) with the same torch AdamW and schedule
    TorchftEngine    PlainEngine's DiLoCo with its collectives on a torchft Manager; the unit of commit
                     is a round (pipeline.lowcomm.rounds.Rounds: quorum and heal before, commit or
                     roll back after)

Per step the loop calls begin_step, forward_backward, update, end_step. For the first two engines
every step commits at once; the torchft engine commits at the end of each round, or rolls the round
back, and then the loop undoes what its hooks did after the round's first step (`Outcome`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model

from pipeline.core.comm import Comm
from pipeline.core.config import PretrainCfg, Recipe, recipe_path
from pipeline.core.errors import RecipeError
from pipeline.core.io import write_json
from pipeline.core.schedule import pretrain_lr_factor
from pipeline.lowcomm.modes import make_strategy
from pipeline.lowcomm.rounds import ManagerComm, ReplicaState, Rounds, make_manager, round_of, rounds_in, wait_lighthouse
from pipeline.lowcomm.strategy import Strategy, apply_update


@dataclass
class Outcome:
    """What a step left behind: `committed` (the state after it is kept; sync points may run),
    else pending (inside a torchft round) or, with `restart` set, rolled back to that step.
    `record`: engine facts for the history record of a committed sync point (torchft: round, replicas)."""
    committed: bool = True
    restart: int | None = None
    record: dict = field(default_factory=dict)


COMMITTED = Outcome()


@dataclass(frozen=True)
class ReplicaSpec:
    """Engine torchft: this process is replica group `replica_id` of the job whose Lighthouse is at
    `address`; `control` holds the job's control files; `resume` as given to the worker."""
    replica_id: int
    address: str
    control: Path
    resume: str
    joining: bool


@runtime_checkable
class Engine(Protocol):
    name: str
    comm: Comm
    lineage: dict                 # mode, engine: recorded in every checkpoint and in the release
    collective_forward: bool      # evaluation runs on every rank (ZeRO-3 gathers shards), else on the writer
    graceful_stop: bool           # SIGTERM/SIGINT: checkpoint at the next sync point and stop (else: die)

    def shard(self, batch): ...                                  # this worker's rows (numpy)
    def begin_step(self, step: int) -> int | None: ...          # the step to train next; None: all done
    def forward_backward(self, rows: torch.Tensor) -> torch.Tensor: ...   # mean loss, on the device
    @property
    def lr(self) -> float: ...                                   # the LR the next update uses
    def update(self, step: int) -> torch.Tensor | None: ...      # grad norm, on the device
    def end_step(self, step: int, loss: torch.Tensor) -> Outcome: ...
    @property
    def synced(self) -> bool: ...                                # after an outer sync: checkpoint now
    @property
    def writer(self) -> bool: ...                                # writes history, rungs, checkpoints, outputs
    def setup(self) -> None: ...
    def save(self, tmp: Path, rank: int) -> dict: ...
    def files(self, path: Path, rank: int) -> list[Path]: ...
    def load(self, path: Path, state: dict, rank: int) -> None: ...
    @property
    def forward_module(self) -> torch.nn.Module: ...
    def final_model(self) -> torch.nn.Module: ...               # full weights on the writer
    def bytes_sent_per_worker(self) -> int | None: ...
    def metrics(self) -> dict: ...                              # engine facts for metrics.json
    def close(self) -> None: ...


def make_adamw(cfg: PretrainCfg, device: torch.device | str = "cpu"):
    """The recipe's AdamW: fused kernels on CUDA, foreach (multi-tensor) on CPU."""
    kind = torch.device(device).type

    def make(params):
        params = list(params)
        # no weight decay on norms (1-D); embeddings and matrices decay
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        impl = {"fused": True} if kind == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl)
    return make


def lr_lambda(cfg: PretrainCfg, total: int):
    return lambda s: pretrain_lr_factor(s, cfg, total)


class PlainEngine:
    """Our model, the recipe's optimizer and schedule, and a Strategy for the workers' agreement."""

    collective_forward = False   # evaluation runs on rank 0 alone
    graceful_stop = True

    def __init__(self, recipe: Recipe, model: torch.nn.Module, ctx, total: int, comm: Comm | None = None):
        cfg = recipe.pretrain
        self.cfg, self.ctx = cfg, ctx
        self.model = model.to(ctx.device)
        self.comm = comm if comm is not None else Comm()   # engine torchft: a ManagerComm
        self.strategy: Strategy = make_strategy(cfg.distributed, self.comm)
        self.optimizer = self.strategy.build_optimizer(self.model.parameters(), make_adamw(cfg, ctx.device))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total))
        self.fwd = torch.compile(self.model) if cfg.compile else self.model
        self.name = "in-process" if ctx.world_size == 1 else cfg.distributed.engine
        self.lineage = {"mode": cfg.distributed.mode}

    # -- the step
    def shard(self, batch):
        return self.strategy.shard(batch)

    def begin_step(self, step: int) -> int | None:
        return step

    def forward_backward(self, rows: torch.Tensor) -> torch.Tensor:
        micro = rows.chunk(self.cfg.grad_accum_steps)
        total = None
        for x in micro:
            with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.ctx.autocast):
                loss = self.fwd(input_ids=x, labels=x).loss / len(micro)
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.strategy.sync_gradients(self.model)
        return total

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def update(self, step: int) -> torch.Tensor | None:
        return apply_update(self.model, self.strategy, self.optimizer, step, self.cfg.grad_clip, self.scheduler)

    def end_step(self, step: int, loss: torch.Tensor) -> Outcome:
        return COMMITTED

    @property
    def synced(self) -> bool:
        return self.strategy.synced

    @property
    def writer(self) -> bool:
        return self.ctx.rank == 0

    # -- state
    def setup(self) -> None:
        self.strategy.setup(self.model)

    def save(self, tmp: Path, rank: int) -> dict:
        if rank == 0:
            save_model(self.model, str(tmp / "model.safetensors"))
        elif self.strategy.per_rank_weights:
            save_model(self.model, str(tmp / f"model-rank{rank}.safetensors"))
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "strategy": self.strategy.state_dict()}

    def files(self, path: Path, rank: int) -> list[Path]:
        """What `load` reads from a checkpoint besides the state file."""
        per_rank = rank > 0 and self.strategy.per_rank_weights
        return [path / (f"model-rank{rank}.safetensors" if per_rank else "model.safetensors")]

    def load(self, path: Path, state: dict, rank: int) -> None:
        load_model(self.model, str(self.files(path, rank)[0]), device=str(self.ctx.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_state_dict(state["strategy"])

    @property
    def forward_module(self) -> torch.nn.Module:
        return self.model

    def final_model(self) -> torch.nn.Module:
        return self.model

    def bytes_sent_per_worker(self) -> int | None:
        return self.comm.stats()["bytes_sent"]

    def metrics(self) -> dict:
        return {"world_size": self.ctx.world_size}

    def close(self) -> None:
        pass


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


def init_deepspeed() -> None:
    # deepspeed is imported only by a deepspeed run: it costs seconds and may JIT-compile extensions
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo")


class DeepSpeedEngine:
    """DeepSpeed ZeRO as the engine (launched under torchrun; DS_ACCELERATOR=cpu and gloo on CPU).

    DeepSpeed owns gradient averaging, partitioning, accumulation and clipping; we keep the
    published batches, the schedule, the torch AdamW (so curves compare with plain data parallel).
    Its checkpoint files go inside our checkpoint directory (`ds/`), under the same sha256 manifest.
    DeepSpeed's collectives are its own: they are not counted in `comm`.
    """

    collective_forward = True    # ZeRO-3's forward gathers shards: every rank evaluates
    graceful_stop = True
    synced = False               # no outer syncs: checkpoints follow checkpoint_every_steps alone

    def __init__(self, recipe: Recipe, model: torch.nn.Module, ctx, total: int, global_batch: int):
        import deepspeed  # only in a deepspeed run (see init_deepspeed)

        cfg = recipe.pretrain   # mode ddp, no compile: checked when the recipe loads (core/config.py)
        self.recipe, self.cfg, self.ctx = recipe, cfg, ctx
        self.module = model
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), optimizer=make_adamw(cfg, ctx.device),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total)),
            config=ds_config(recipe, global_batch, ctx.world_size))
        ctx.device = self.engine.device
        self.comm = Comm()
        self._sharder = Strategy(self.comm)
        self.name = f"deepspeed-zero{cfg.distributed.zero_stage}"
        self.lineage = {"mode": "ddp", "engine": self.name}

    def shard(self, batch):
        return self._sharder.shard(batch)

    def begin_step(self, step: int) -> int | None:
        return step

    def forward_backward(self, rows: torch.Tensor) -> torch.Tensor:
        micro = rows.chunk(self.cfg.grad_accum_steps)
        total = None
        for i, x in enumerate(micro):
            loss = self.engine(input_ids=x, labels=x).loss
            self.engine.backward(loss)            # DeepSpeed divides by the accumulation steps
            part = loss.detach() / len(micro)
            total = part if total is None else total + part
            if i < len(micro) - 1:
                self.engine.step()                 # not a boundary: DeepSpeed only counts it
        return total

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def update(self, step: int):
        self.engine.step()
        g = self.engine.get_global_grad_norm()
        return None if g is None else torch.as_tensor(g)

    def end_step(self, step: int, loss: torch.Tensor) -> Outcome:
        return COMMITTED

    @property
    def writer(self) -> bool:
        return self.ctx.rank == 0

    def setup(self) -> None:
        pass

    def save(self, tmp: Path, rank: int) -> dict:
        self.engine.save_checkpoint(str(tmp / "ds"), tag="ds")
        return {}

    def files(self, path: Path, rank: int) -> list[Path]:
        return [path / "ds"]

    def load(self, path: Path, state: dict, rank: int) -> None:
        self.engine.load_checkpoint(str(path / "ds"), tag="ds")

    @property
    def forward_module(self):
        return self.engine

    def final_model(self) -> torch.nn.Module:
        """An unpartitioned copy of the weights on rank 0 (ZeRO-3 gathers its shards)."""
        import deepspeed  # only in a deepspeed run (see init_deepspeed)

        module = self.engine.module
        if self.cfg.distributed.zero_stage < 3:
            return module
        copy = type(module)(module.config)
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if dist.get_rank() == 0:
                copy.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()}, strict=False)
        return copy.float()

    def bytes_sent_per_worker(self) -> None:
        return None

    def metrics(self) -> dict:
        return {"world_size": self.ctx.world_size}

    def close(self) -> None:
        pass


class _History:
    """The metric history travels with a heal (a joiner may later write checkpoints and outputs)."""

    def __init__(self, history: list):
        self.history = history

    def state_dict(self) -> dict:
        return {"json": json.dumps(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history[:] = json.loads(state["json"])


def wait_hooks(control: Path, replica_id: int, address: str):
    """OMP_FT_WAIT='[[round, key, n], ...]' (tests, operations): before asking for the quorum of that
    round, touch <control>/waiting-replicaI-roundR and wait until the Lighthouse's `key`
    (lighthouse_status: participants_healthy, heartbeating) reaches n."""
    waits: dict[int, list] = {}
    for r, key, n in json.loads(os.environ.get("OMP_FT_WAIT", "[]")):
        waits.setdefault(int(r), []).append((key, int(n)))

    def on_round(r: int) -> None:
        for key, n in waits.pop(r, []):
            (control / f"waiting-replica{replica_id}-round{r}").touch()
            wait_lighthouse(address, key, n)
    return on_round


class TorchftEngine(PlainEngine):
    """`pretrain.distributed.engine: torchft`: one replica group = this process; DiLoCo rounds whose
    outer syncs go through a torchft Manager (ManagerComm), committed by the Lighthouse's quorum.

    Data rule (pipeline/lowcomm/rounds.py): in a round with W participants, participating rank r trains
    on rows [r*B/W, (r+1)*B/W) of each global batch. The writer (history, rungs, checkpoints, outputs)
    is the round's participating rank 0; before the first round, replica 0 unless it joins.
    The Manager is created at the first begin_step, once everything slow is done (it heartbeats from
    creation; see rounds.py on the Lighthouse's split-brain rule).
    """

    graceful_stop = False   # the launcher supervises replicas: a signal ends one, torchft heals or restarts it

    def __init__(self, recipe: Recipe, model: torch.nn.Module, ctx, total: int, spec: ReplicaSpec):
        super().__init__(recipe, model, ctx, total, comm=ManagerComm(None, None))
        d = recipe.pretrain.distributed
        try:
            self.total_rounds = rounds_in(d.diloco, total)
        except ValueError as e:
            raise RecipeError(recipe_path(recipe), "pretrain.distributed.diloco.inner_steps",
                              f"engine torchft: {e}") from None
        self.d, self.spec = d, spec
        self.replica_id, self.address, self.joining = spec.replica_id, spec.address, spec.joining
        self.on_round = wait_hooks(spec.control, spec.replica_id, spec.address)
        self.name = "torchft"
        self.lineage = {"mode": "diloco", "engine": "torchft"}
        self.manager = self.store = self.rounds = self.replica = None
        self.history: list = []
        self.entry: dict | None = None
        self.losses: list[float] = []

    def attach_history(self, history: list) -> None:
        """The loop's history list: handed to a joiner with the rest of the state."""
        self.history = history

    def _connect(self, step: int) -> None:
        ft = self.d.torchft
        self.replica = ReplicaState(self.model, self.optimizer, self.strategy,
                                    extra={"scheduler": self.scheduler, "history": _History(self.history)})
        self.manager, pg, self.store = make_manager(
            f"replica{self.replica_id}", self.address, self.replica, min_replicas=ft.min_replicas,
            timeout_seconds=ft.timeout_seconds, quorum_timeout_seconds=ft.quorum_timeout_seconds)
        self.comm.manager, self.comm.pg = self.manager, pg
        if step:   # resumed from a checkpoint at a round boundary: torchft's step = rounds committed
            self.manager.load_state_dict({"step": round_of(self.d.diloco, step), "batches_committed": 0})
        self.rounds = Rounds(self.manager, self.comm, self.replica, self.d.diloco, self.total_rounds,
                             on_round=self.on_round)

    def begin_step(self, step: int) -> int | None:
        if self.entry is not None:
            return step                       # inside a round
        if self.manager is None:
            self._connect(step)
        if self.rounds.done():
            return None
        self.entry = self.rounds.begin()
        if self.entry is None:
            return None
        self.losses = []
        self.joining = False
        return self.entry["steps"][0]         # after a heal: the peer's round start

    def end_step(self, step: int, loss: torch.Tensor) -> Outcome:
        start, stop = self.entry["steps"]
        self.losses.append(float(loss))
        if step + 1 < stop:
            return Outcome(committed=False)
        entry, self.entry = self.entry, None
        if not self.rounds.end(entry, self.losses):
            return Outcome(committed=False, restart=start)
        return Outcome(record={"round": entry["round"], "replicas": entry["world_size"]})

    @property
    def writer(self) -> bool:
        if self.entry is None and not (self.rounds and self.rounds.log):   # before the first round
            return self.replica_id == 0 and not self.joining
        return self.comm.rank == 0   # the participating rank of the current (or last) round

    def metrics(self) -> dict:
        log = self.rounds.log if self.rounds else []
        return {"world_size": self.d.world_size, "torchft": {
            "replica": self.replica_id, "rounds": self.total_rounds,
            "healed": len(self.replica.healed) if self.replica else 0,
            "attempts": [{k: e[k] for k in ("round", "world_size", "rank", "committed", "healed", "steps")}
                         for e in log]}}

    def round_log(self) -> list[dict]:
        return [{k: v for k, v in e.items() if k not in ("quorum_seconds", "seconds")}
                for e in (self.rounds.log if self.rounds else [])]

    def close(self) -> None:
        """Shut the Manager down and leave this replica's round log in the control folder."""
        if self.manager is not None:
            self.manager.shutdown(wait=False)
            self.manager = self.store = None
        write_json(self.spec.control / f"replica{self.replica_id}-{os.getpid()}.log.json",
                   {"replica": self.replica_id, "resume": self.spec.resume,
                    "healed": len(self.replica.healed) if self.replica else 0, "attempts": self.round_log(),
                    "bytes_sent": self.comm.bytes_sent, "ledger": self.comm.ledger()})


def make_engine(recipe: Recipe, model: torch.nn.Module, ctx, total: int, global_batch: int,
                replica: ReplicaSpec | None = None):
    """The engine of `pretrain.distributed.engine` (torchft: `replica` says which replica this is)."""
    engine = recipe.pretrain.distributed.engine
    if engine == "deepspeed":
        return DeepSpeedEngine(recipe, model, ctx, total, global_batch)
    if engine == "torchft":
        if replica is None:
            raise RecipeError(recipe_path(recipe), "pretrain.distributed.engine",
                              "engine torchft runs as replica processes started by `omp pretrain`")
        return TorchftEngine(recipe, model, ctx, total, replica)
    return PlainEngine(recipe, model, ctx, total)
