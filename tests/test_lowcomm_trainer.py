"""DiLoCo through the real trainer (`omp pretrain`, 2 torchrun workers on gloo): bytes, loss, a
checkpoint at every outer sync, and a bitwise restart from one of them."""

from __future__ import annotations

import pytest

from pipeline.core.io import read_json, sha256_file
from pipeline.lowcomm.compress import message_nbytes
from tests.conftest import omp

RECIPE = """base: micro.yaml
name: micro-diloco
pretrain:
  steps: 40
  checkpoint_every_steps: 1000   # only the per-sync checkpoints (and the last step)
  keep_last: 4
  eval_every_steps: 20
  eval_tokens: 2048
  distributed:
    mode: diloco
    world_size: 2
    diloco: {inner_steps: 10, outer_lr: 0.7, outer_momentum: 0.5, compression: {kind: int4, block_size: 64}}
"""


ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def pretrain_with(work, name: str, recipe: str, *extra: str) -> dict:
    """`omp pretrain` in `work` on the recipe text `recipe` (saved as tests/recipes/<name>.yaml)."""
    (work / f"tests/recipes/{name}.yaml").write_text(recipe)
    omp("pretrain", "--recipe", f"tests/recipes/{name}.yaml", *extra, cwd=work, env=ENV)
    return read_json(work / "artifacts/pretrain/metrics.json")


@pytest.mark.e2e
@pytest.mark.slow   # ~40 s of two-worker start-up: `make test` stays under 15 min on 2 cores
def test_trainer_runs_diloco_int4_on_two_workers(micro_data, copy_workdir):
    work = copy_workdir(micro_data)
    m = pretrain_with(work, "micro_diloco", RECIPE)
    assert m["mode"] == "diloco" and m["world_size"] == 2
    # 4 outer syncs, each an int4 message (packed payload + fp32 scale per 64) and nothing else
    assert m["comm"]["by_kind"] == {"pseudo_grad": 4 * message_nbytes(m["params"], "int4", 64)}
    assert m["val_loss_final"] < m["val_loss_initial"] - 1.0
    # the byte ledger splits them: packed int4 levels (two per byte) and one fp32 scale per block
    blocks = -(-m["params"] // 64)
    ledger = {"all_gather/pseudo_grad/payload": {"bytes": 4 * blocks * 32, "calls": 4},
              "all_gather/pseudo_grad/scales": {"bytes": 4 * blocks * 4, "calls": 4}}
    assert m["byte_ledger"] == ledger

    # every outer sync (H=10) wrote a checkpoint holding the agreed global state
    root = work / "artifacts/pretrain/checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == [f"step-{s:07d}" for s in (10, 20, 30, 40)]
    import torch
    st = torch.load(root / "step-0000030/state-rank1.pt", weights_only=True)
    assert st["step"] == 30 and st["strategy"]["step"] == 30 and st["strategy"]["syncs"] == 3
    fr = st["strategy"]["fragments"][0]
    assert fr["global"].numel() == m["params"] and fr["residual"].abs().sum() > 0   # int4 error feedback
    # each checkpoint carries the ledger up to its step (in its sha256 manifest)
    at30 = read_json(root / "step-0000030/ledger.json")
    assert at30["ledger"]["all_gather/pseudo_grad/scales"] == {"bytes": 3 * blocks * 4, "calls": 3}
    assert "ledger.json" in read_json(root / "step-0000030/manifest.json")["files"]
    # a restart from the sync at step 30 ends with the uninterrupted run's weights, bit for bit,
    # and the same ledger (carried over from the checkpoint)
    final = sha256_file(work / "artifacts/pretrain/final/model.safetensors")
    m2 = pretrain_with(work, "micro_diloco", RECIPE, "--resume", str(root / "step-0000030"))
    assert sha256_file(work / "artifacts/pretrain/final/model.safetensors") == final
    assert m2["byte_ledger"] == ledger


DEMO = """base: micro.yaml
name: micro-demo
pretrain:
  steps: 20
  checkpoint_every_steps: 20
  eval_every_steps: 20
  eval_tokens: 2048
  distributed:
    mode: demo
    world_size: 2
    demo: {chunk_size: 64, topk: 8}
"""


@pytest.mark.e2e
@pytest.mark.slow   # ~21 s, as above
def test_trainer_runs_demo_on_two_workers(micro_data, copy_workdir):
    m = pretrain_with(copy_workdir(micro_data), "micro_demo", DEMO)
    assert m["mode"] == "demo" and m["world_size"] == 2
    # every step all-gathers, per chunk of 64 entries (chunks do not cross tensors), 8 uint8 positions
    # and 8 fp32 values: (1 + 4) * 8 / 64 = 0.625 bytes per parameter per step, vs ddp's 4
    kinds = m["comm"]["by_kind"]
    assert set(kinds) == {"demo_positions", "demo_values"}
    assert kinds["demo_values"] == 4 * kinds["demo_positions"]
    chunks_per_step = kinds["demo_positions"] // (20 * 8)
    assert m["params"] / 64 <= chunks_per_step <= m["params"] / 64 + 64, (chunks_per_step, m["params"])
    assert m["val_loss_final"] < m["val_loss_initial"] - 0.5


ISLANDS = """base: micro.yaml
name: micro-islands
pretrain:
  steps: 20
  checkpoint_every_steps: 1000
  eval_every_steps: 20
  eval_tokens: 1024
  GRAD_ACCUM
  distributed:
    mode: diloco
    world_size: WS
    ISLANDS
    diloco: {inner_steps: 5, outer_lr: 0.7, outer_momentum: 0.5}
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_islands_ddp_inside_diloco_across_equals_diloco_with_accumulation(micro_data, copy_workdir):
    """islands: 2 of 2 torchrun workers each (DDP inside, DiLoCo across) trains exactly what DiLoCo
    on 2 workers with 2 accumulation micro-batches trains (an island = one DiLoCo worker whose
    micro-batches run on two processes): bitwise equal weights; the bytes inside and across islands
    are reported apart."""
    work = copy_workdir(micro_data)
    m = pretrain_with(work, "micro_islands", ISLANDS.replace("GRAD_ACCUM", "").replace("WS", "4")
                      .replace("ISLANDS", "islands: 2"))
    p = m["params"]
    assert m["islands"] == {"islands": 2, "intra_island_bytes_per_worker": 4 * p * 20,
                            "inter_island_bytes_per_worker": 4 * p * 4, "global_bytes_per_worker": 0}
    assert m["byte_ledger"] == {"inter_island:all_reduce/pseudo_grad/payload": {"bytes": 4 * p * 4, "calls": 4},
                                "intra_island:all_reduce/grad/payload": {"bytes": 4 * p * 20, "calls": 20}}
    assert m["bytes_sent_per_worker"] == 4 * p * 24
    ref = pretrain_with(work, "micro_islands_ref", ISLANDS.replace("GRAD_ACCUM", "grad_accum_steps: 2")
                        .replace("WS", "2").replace("ISLANDS", ""))
    assert ref["model_sha256"] == m["model_sha256"]


def test_islands_need_diloco_on_torchrun_and_an_even_split():
    from pipeline.core.config import load_recipe, recipe_sha256
    from pipeline.core.errors import RecipeError
    from tests.conftest import MICRO

    def r(**d):
        return load_recipe(MICRO, overrides={"pretrain": {"distributed": d}}, check_files=False)

    for bad, words in [({"mode": "diloco", "world_size": 3, "islands": 2}, "does not split into 2 islands"),
                       ({"world_size": 4, "islands": 2}, "needs mode diloco and engine torchrun")]:
        with pytest.raises(RecipeError, match=words):
            r(**bad)
    # islands: 1 (the default) leaves the recipe (and its hash) as it was
    assert "islands" not in r(mode="diloco").model_dump()["pretrain"]["distributed"]
    assert recipe_sha256(r(mode="diloco", islands=1)) == recipe_sha256(r(mode="diloco"))
