"""Engine adapters: what the one training loop (pipeline/pretrain/trainer.py) asks of an engine.

The loop owns the published batches, the stop/NaN agreement, the schedule of logs, evaluations and
checkpoints, the RNG states and the outputs; an engine owns the model's update and its own state:

    shard(global_batch) -> this worker's rows          (numpy, before they go to the device)
    forward_backward(rows) -> mean loss                 (a device tensor: no host sync)
    lr                                                  (the learning rate the next update uses)
    update(step) -> grad norm                           (a device tensor or None)
    save(tmp_dir, rank) -> extra state / load(path, state, rank)
    forward_module, collective_forward                  (what evaluation calls, and on which ranks)
    final_model()                                       (full weights on rank 0, for final/)

PlainEngine is our model + a torch optimizer + a Strategy (pipeline.lowcomm: single, ddp, diloco,
demo); DeepSpeedEngine is DeepSpeed ZeRO (stage 0-3) with the same torch AdamW and schedule.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.comm import Comm
from pipeline.core.config import PretrainCfg, Recipe
from pipeline.core.errors import RecipeError
from pipeline.lowcomm.strategy import Strategy, apply_update, make_strategy


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
    from pipeline.pretrain.trainer import lr_factor

    return lambda s: lr_factor(s, cfg, total)


class PlainEngine:
    """Our model, the recipe's optimizer and schedule, and a Strategy for the workers' agreement."""

    collective_forward = False   # evaluation runs on rank 0 alone

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

    @property
    def synced(self) -> bool:
        return self.strategy.synced

    # -- state
    def setup(self) -> None:
        self.strategy.setup(self.model)

    def save(self, tmp: Path, rank: int) -> dict:
        from safetensors.torch import save_model

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
        from safetensors.torch import load_model

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


class DeepSpeedEngine:
    """DeepSpeed ZeRO as the engine (launched under torchrun; DS_ACCELERATOR=cpu and gloo on CPU).

    DeepSpeed owns gradient averaging, partitioning, accumulation and clipping; we keep the
    published batches, the schedule, the torch AdamW (so curves compare with plain data parallel).
    Its checkpoint files go inside our checkpoint directory (`ds/`), under the same sha256 manifest.
    DeepSpeed's collectives are its own: they are not counted in `comm`.
    """

    collective_forward = True    # ZeRO-3's forward gathers shards: every rank evaluates

    def __init__(self, recipe: Recipe, model: torch.nn.Module, ctx, total: int, global_batch: int):
        import deepspeed

        cfg = recipe.pretrain
        where = getattr(recipe, "_path", "<recipe>")
        if cfg.distributed.mode != "ddp":
            raise RecipeError(where, "pretrain.distributed.mode",
                              f"engine deepspeed trains data parallel only (mode ddp), not {cfg.distributed.mode!r}")
        if cfg.compile:
            raise RecipeError(where, "pretrain.compile", "not supported with engine deepspeed")
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
        self.synced = False

    def shard(self, batch):
        return self._sharder.shard(batch)

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
        import deepspeed
        import torch.distributed as dist

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


def make_engine(recipe: Recipe, model: torch.nn.Module, ctx, total: int, global_batch: int):
    if recipe.pretrain.distributed.engine == "deepspeed":
        return DeepSpeedEngine(recipe, model, ctx, total, global_batch)
    return PlainEngine(recipe, model, ctx, total)
