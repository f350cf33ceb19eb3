"""The learning-rate schedule of every training stage (pretrain, posttrain): one function.

`lr_factor` is the multiplier of the peak LR at a 0-based step. Pretrain calls it with its recipe's
warm-up, schedule, floor and decay fraction; posttrain with its warm-up and a cosine to zero. The
arithmetic is written once so both stages' floats come from the same expressions.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup_steps: int = 0, schedule: str = "cosine", floor: float = 0.0,
              decay_fraction: float = 0.2) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from 1 to `floor` at step `total`, or (`wsd`)
    flat until the last `decay_fraction` of the run and a linear decay to `floor` over it."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "wsd":
        decay_start = total - max(1, int(total * decay_fraction))
        if step < decay_start:
            return 1.0
        frac = (step - decay_start + 1) / max(1, total - decay_start)
        return 1.0 - (1.0 - floor) * frac
    span = max(1, total - warmup_steps)
    frac = min(1.0, (step - warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def pretrain_lr_factor(step: int, cfg, total: int) -> float:
    """lr_factor with a PretrainCfg's warmup_steps, schedule, min_lr_ratio and decay_fraction."""
    return lr_factor(step, total, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)
