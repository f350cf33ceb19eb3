"""The registry: `pretrain.distributed.mode` -> its Strategy. Kept apart from the base class
(pipeline/lowcomm/strategy.py) so the strategies import the base and the registry imports them,
with no circle between them."""

from __future__ import annotations

from pipeline.core.comm import Comm
from pipeline.lowcomm.demo import DeMoStrategy
from pipeline.lowcomm.diloco import DiLoCoStrategy, IslandDiLoCoStrategy
from pipeline.lowcomm.strategy import DDPStrategy, Strategy


def _diloco(comm: Comm, cfg) -> Strategy:
    if getattr(cfg, "islands", 1) > 1:
        return IslandDiLoCoStrategy(comm, cfg)
    return DiLoCoStrategy(comm, cfg)


# mode -> constructor(comm, dist_cfg)
STRATEGIES = {"single": Strategy, "ddp": DDPStrategy, "diloco": _diloco, "demo": DeMoStrategy}


def make_strategy(dist_cfg, comm: Comm) -> Strategy:
    """The strategy of `pretrain.distributed.mode`."""
    try:
        make = STRATEGIES[dist_cfg.mode]
    except KeyError:
        raise ValueError(f"pretrain.distributed.mode: unknown mode {dist_cfg.mode!r}") from None
    return make(comm, dist_cfg)
