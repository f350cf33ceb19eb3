"""The checkpoint ladder: which steps are rungs (pipeline/core/ladder.py)."""

from __future__ import annotations

import pytest

from pipeline.core import ladder
from pipeline.core.config import LadderCfg


def test_default_ladder_is_the_open_suites_style():
    # Pythia's: step 0, 1, 2, 4, ..., 512, then every 1000 to the last step
    got = ladder.steps(LadderCfg(), 143_000)
    assert got[:11] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert got[11:] == list(range(1000, 143_001, 1000)) and len(got) == 154


@pytest.mark.parametrize("cfg,total,expect", [
    (dict(every=128), 384, [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 384]),       # tiny: 11 rungs
    (dict(powers_of_two=False, every=40, steps=[8]), 80, [0, 8, 40, 80]),       # micro
    (dict(initial=False, powers_of_two=False, every=None), 50, [50]),          # the last step always
    (dict(powers_of_two=False, every=7), 20, [0, 7, 14, 20]),                  # last step not a multiple
    (dict(enabled=False), 80, []),
])
def test_ladder_steps(cfg, total, expect):
    assert ladder.steps(LadderCfg(**cfg), total) == expect
