"""DiLoCo through the real trainer (`omp pretrain`, 2 torchrun workers on gloo): bytes and loss."""

from __future__ import annotations

import pytest

from pipeline.io import read_json
from pipeline.lowcomm.compress import message_nbytes
from tests.conftest import omp

RECIPE = """base: micro.yaml
name: micro-diloco
pretrain:
  steps: 40
  checkpoint_every_steps: 20
  eval_every_steps: 20
  eval_tokens: 2048
  distributed:
    mode: diloco
    world_size: 2
    diloco: {inner_steps: 10, outer_lr: 0.7, outer_momentum: 0.5, compression: {kind: int4, block_size: 64}}
"""


@pytest.mark.e2e
def test_trainer_runs_diloco_int4_on_two_workers(micro_data, copy_workdir):
    work = copy_workdir(micro_data)
    (work / "tests/recipes/micro_diloco.yaml").write_text(RECIPE)
    omp("pretrain", "--recipe", "tests/recipes/micro_diloco.yaml", cwd=work,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    m = read_json(work / "artifacts/pretrain/metrics.json")
    assert m["mode"] == "diloco" and m["world_size"] == 2
    # 4 outer syncs, each an int4 message (packed payload + fp32 scale per 64) and nothing else
    assert m["comm"]["by_kind"] == {"pseudo_grad": 4 * message_nbytes(m["params"], "int4", 64)}
    assert m["val_loss_final"] < m["val_loss_initial"] - 1.0
