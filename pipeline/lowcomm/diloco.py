"""DiLoCo (Douillard et al. 2023) and its streaming variant (Douillard et al. 2025) as a Strategy.

Each worker trains its own replica with its own inner optimizer (AdamW from the recipe) on its own
shard of every published global batch. Every H inner steps the workers agree again:

    delta_w   = theta_global - theta_local_w            (pseudo-gradient, one flat fp32 vector)
    delta     = mean_w compress(delta_w + residual_w)   (all-gather of the packed messages, or an
                                                         fp32 all-reduce when compression is none)
    theta_global <- outer Nesterov SGD(theta_global, delta; outer_lr, outer_momentum)
    theta_local  <- theta_global                         (inner optimizer state stays local)

Compressed messages are all-gathered rather than all-reduced: int4 levels with per-worker scales
cannot be summed on the wire. Every worker decodes all messages in rank order and sums them the
same way, so the global parameters stay bitwise identical on every worker.

Streaming (fragments F > 1): the parameter list is cut into F contiguous fragments; fragment f is
synced when (inner step - f*H/F) is a multiple of H, so each sync moves about 1/F of the model and
the syncs are spread over the H steps. F = 1 is plain DiLoCo.

`warmup_sync_steps` synchronous (ddp) steps run before the first inner phase: at short horizons a
common starting point helps the outer optimizer (see the comm benchmark).
"""

from __future__ import annotations

import torch

from pipeline.comm import Comm
from pipeline.lowcomm.compress import ErrorFeedback, _global_positions, decompress
from pipeline.lowcomm.strategy import DDPStrategy, Strategy


def _fragments(params: list[torch.nn.Parameter], n: int) -> list[list[int]]:
    """Split parameter indices into n contiguous groups of roughly equal numel."""
    total = sum(p.numel() for p in params)
    groups: list[list[int]] = [[] for _ in range(n)]
    acc = 0
    for i, p in enumerate(params):
        g = min(n - 1, acc * n // max(total, 1))
        groups[g].append(i)
        acc += p.numel()
    empty = [i for i, g in enumerate(groups) if not g]
    if empty:
        raise ValueError(f"pretrain.distributed.diloco.fragments={n} exceeds what {len(params)} "
                         "parameter tensors can be split into")
    return groups


def _flat(params: list[torch.nn.Parameter], idx: list[int]) -> torch.Tensor:
    return torch.cat([params[i].detach().reshape(-1).float() for i in idx])


def _assign(params: list[torch.nn.Parameter], idx: list[int], flat: torch.Tensor) -> None:
    off = 0
    with torch.no_grad():
        for i in idx:
            p = params[i]
            p.copy_(flat[off:off + p.numel()].view_as(p).to(p.dtype))
            off += p.numel()


def _kept_positions(msg) -> torch.Tensor:
    """Positions a top-k message carries (global indices into the flat vector)."""
    return _global_positions(msg.indices, msg.numel, msg.chunk, msg.per_chunk)


class DiLoCoStrategy(Strategy):
    name = "diloco"
    per_rank_weights = True   # replicas drift apart for H steps between syncs

    def __init__(self, comm: Comm, cfg=None):
        super().__init__(comm, cfg)
        self.d = cfg.diloco
        self.c = self.d.compression
        self.params: list[torch.nn.Parameter] = []
        self.groups: list[list[int]] = []
        self.state: dict | None = None     # global params, momentum, residuals per fragment; syncs
        self.on_sync = None                # callable(strategy, step) after each outer sync (checkpointing)
        self._ddp = DDPStrategy(comm, cfg)
        self._step = 0                     # steps done (set by after_step; sync_gradients reads it)

    # -- lineage: which rows of each global batch this worker trains on
    def shard_info(self, global_batch_size: int) -> dict:
        n = global_batch_size // self.comm.world_size
        return {"rank": self.comm.rank, "world_size": self.comm.world_size,
                "rows_of_each_global_batch": [self.comm.rank * n, (self.comm.rank + 1) * n]}

    def build_optimizer(self, params, make_default):
        opt = make_default(params)
        if self.d.inner_optimizer == "sgd":
            # plain SGD at the recipe's learning rate: used by the DiLoCo == DDP sanity anchor
            groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g.get("weight_decay", 0.0)}
                      for g in opt.param_groups]
            opt = torch.optim.SGD(groups, lr=opt.param_groups[0]["lr"])
        return opt

    def setup(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.groups = _fragments(self.params, self.d.fragments)
        if self.state is None:
            self.state = {"syncs": 0, "fragments": []}
            for idx in self.groups:
                g = _flat(self.params, idx)
                self.state["fragments"].append({
                    "global": g.clone(), "momentum": torch.zeros_like(g),
                    "ef": ErrorFeedback(g.numel(), self.c.error_feedback,
                                        self.c.error_feedback_decay)})
        else:
            # resumed: the replica starts from the last agreed global parameters
            for f, idx in enumerate(self.groups):
                if self.state["fragments"][f]["global"].numel() != sum(self.params[i].numel() for i in idx):
                    raise ValueError("DiLoCo state does not match the model's parameters (fragment "
                                     f"{f}); was the checkpoint written with another model or fragments?")

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def _in_warmup(self, step: int) -> bool:
        return step < self.d.warmup_sync_steps

    def sync_gradients(self, model: torch.nn.Module) -> None:
        if self._in_warmup(self._step):
            self._ddp.sync_gradients(model)

    def after_step(self, model: torch.nn.Module, optimizer, step: int) -> None:
        self._step = step + 1
        self.synced = False
        if self._in_warmup(step):
            # replicas are identical after a ddp step: that is the new global point
            for f, idx in enumerate(self.groups):
                self.state["fragments"][f]["global"] = _flat(self.params, idx)
            return
        inner = step + 1 - self.d.warmup_sync_steps
        H, F = self.d.inner_steps, len(self.groups)
        synced = False
        for f in range(F):
            k = inner - (f * H) // F
            if k > 0 and k % H == 0:
                self.outer_sync(f)
                synced = True
        self.synced = synced and self.d.checkpoint_every_sync
        if synced and self.on_sync is not None:
            self.on_sync(self, step)

    def outer_sync(self, f: int) -> None:
        fr, idx = self.state["fragments"][f], self.groups[f]
        delta = fr["global"] - _flat(self.params, idx)
        if self.c.kind == "none" and self.c.topk_fraction is None:
            avg = self.comm.all_reduce(delta, op="avg", tag="pseudo_grad")
        else:
            avg = self._compressed_mean(fr["ef"], delta)
        self._outer_step(fr, avg)
        _assign(self.params, idx, fr["global"])
        self.state["syncs"] += 1

    def _compressed_mean(self, ef: ErrorFeedback, delta: torch.Tensor) -> torch.Tensor:
        packed, _ = ef.compress(delta, self.c.kind, self.c.block_size, self.c.topk_fraction, self.c.topk_chunk)
        # sent as raw bytes (the same count), so every dtype (int16 offsets too) crosses any backend;
        # each part (payload, scales, indices) under its own name in the byte ledger
        gathered = [[g.view(t.dtype) for g in self.comm.all_gather(t.view(torch.uint8), tag="pseudo_grad", part=name)]
                    for name, t in packed.parts()]
        total = torch.zeros_like(delta)
        contributors = torch.zeros_like(delta) if self.c.mean_over == "contributors" else None
        for w in range(self.comm.world_size):
            parts = iter(g[w] for g in gathered)
            msg = type(packed)(packed.kind, packed.numel, next(parts),
                               next(parts) if packed.scales is not None else None,
                               next(parts) if packed.indices is not None else None,
                               packed.chunk, packed.per_chunk)
            total += decompress(msg, self.c.block_size)
            if contributors is not None:
                # SparseLoCo: an entry's mean is over the workers whose top-k kept it
                contributors[_kept_positions(msg)] += 1
        if contributors is not None:
            return total / contributors.clamp_(min=1)
        return total / self.comm.world_size

    def _outer_step(self, fr: dict, delta: torch.Tensor) -> None:
        """SGD with (Nesterov) momentum on the pseudo-gradient, as torch.optim.SGD computes it.

        The same ops as torch's single-tensor SGD (`add(x, alpha=a)` rounds once where `x + a * y`
        rounds twice): that keeps us bitwise equal to torchft's DiLoCo, whose outer optimizer is a
        torch.optim.SGD (tests/test_torchft_crosscheck.py). A zero momentum buffer times mu plus
        delta equals torch's first-step `clone(delta)` exactly.
        """
        mu, lr = self.d.outer_momentum, self.d.outer_lr
        step = delta
        if mu > 0:
            fr["momentum"].mul_(mu).add_(delta)
            step = delta.add(fr["momentum"], alpha=mu) if self.d.nesterov else fr["momentum"]
        fr["global"] = fr["global"].add(step, alpha=-lr)

    def state_dict(self) -> dict:
        if self.state is None:
            return {}
        return {"syncs": self.state["syncs"], "step": self._step, "fragments": [
            {"global": fr["global"].clone(), "momentum": fr["momentum"].clone(),
             "residual": fr["ef"].residual.clone()} for fr in self.state["fragments"]]}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        frs = []
        for fr in state["fragments"]:
            ef = ErrorFeedback(fr["global"].numel(), self.c.error_feedback, self.c.error_feedback_decay)
            ef.residual = fr["residual"].clone()
            frs.append({"global": fr["global"].clone(), "momentum": fr["momentum"].clone(), "ef": ef})
        self.state = {"syncs": state["syncs"], "fragments": frs}
        self._step = state.get("step", 0)


class IslandDiLoCoStrategy(DiLoCoStrategy):
    """Hybrid layout (`pretrain.distributed.islands: N`): data parallel inside each island of
    k = W/N workers (ranks i*k .. i*k+k-1: a gradient all-reduce every step), DiLoCo across the
    islands. The workers of an island hold the same weights, so worker j of every island runs the
    outer sync with worker j of the others (its inter-island group): each island's pseudo-gradient
    crosses the slow links once per worker slot, spread over k parallel groups. Rows: global rank r
    trains rows [r*B/W, (r+1)*B/W), so island i trains its contiguous B/N rows.

    Bytes are counted per scope in the ledger (`intra_island:` every step's gradients,
    `inter_island:` the outer syncs) and added up in `comm` as for any mode.
    """

    def __init__(self, comm: Comm, cfg=None):
        import torch.distributed as dist

        n, w, rank = cfg.islands, comm.world_size, comm.rank
        if w % n:
            raise ValueError(f"pretrain.distributed.islands: world_size {w} does not split into {n} islands")
        k = w // n
        # every rank creates every group, in the same order (torch.distributed's rule)
        intra = [dist.new_group(list(range(i * k, (i + 1) * k))) for i in range(n)]
        inter = [dist.new_group([i * k + j for i in range(n)]) for j in range(k)]
        island, local = divmod(rank, k)
        self.global_comm = comm
        self.intra = comm.scoped(intra[island], "intra_island")
        self.inter = comm.scoped(inter[local], "inter_island")
        super().__init__(self.inter, cfg)
        self._island_ddp = DDPStrategy(self.intra, cfg)
        self._ddp = DDPStrategy(comm.scoped(None, "global"), cfg)   # synchronous warm-up: every worker
        self.island, self.islands = island, n

    def shard(self, batch):
        return Strategy(self.global_comm).shard(batch)

    def shard_info(self, global_batch_size: int) -> dict:
        n = global_batch_size // self.global_comm.world_size
        r = self.global_comm.rank
        return {"rank": r, "world_size": self.global_comm.world_size, "island": self.island,
                "rows_of_each_global_batch": [r * n, (r + 1) * n]}

    def sync_gradients(self, model: torch.nn.Module) -> None:
        if self._in_warmup(self._step):
            self._ddp.sync_gradients(model)
        else:
            self._island_ddp.sync_gradients(model)
