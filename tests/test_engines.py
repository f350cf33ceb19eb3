"""The one loop's pieces without training: the strategy package, engine settings, GPU recipes."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO


def test_strategy_package_does_not_import_the_trainer():
    """pipeline.lowcomm (strategies, DiLoCo, DeMo, compression, drivers) depends on nothing in
    pipeline.pretrain: the trainer imports it, never the reverse (no import cycle)."""
    code = ("import sys\n"
            "import pipeline.lowcomm.strategy, pipeline.lowcomm.diloco, pipeline.lowcomm.demo, "
            "pipeline.lowcomm.compress, pipeline.lowcomm.loop, pipeline.lowcomm.ft, pipeline.lowcomm.elastic\n"
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.pretrain')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_registry_and_per_rank_weights():
    from pipeline.core.comm import Comm
    from pipeline.core.config import DistributedCfg
    from pipeline.lowcomm.strategy import STRATEGIES, make_strategy

    assert set(STRATEGIES) == {"single", "ddp", "diloco", "demo"}
    kinds = {m: make_strategy(DistributedCfg(mode=m), Comm()) for m in ("ddp", "diloco", "demo")}
    assert {m: type(s).__name__ for m, s in kinds.items()} == {
        "ddp": "DDPStrategy", "diloco": "DiLoCoStrategy", "demo": "DeMoStrategy"}
    assert {m: s.per_rank_weights for m, s in kinds.items()} == {"ddp": False, "diloco": True, "demo": True}
    with pytest.raises(ValueError, match="unknown mode 'zero'"):
        make_strategy(SimpleNamespace(mode="zero"), Comm())


def test_ddp_at_world_size_one_counts_bytes_and_leaves_gradients_alone():
    from pipeline.core.comm import Comm
    from pipeline.lowcomm.strategy import DDPStrategy

    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    model(torch.ones(4, 5)).sum().backward()
    before = [(p.grad, p.grad.clone()) for p in model.parameters()]
    comm = Comm()
    DDPStrategy(comm).sync_gradients(model)
    # the very same tensors, the same bits: no flatten and copy back when there is nobody to talk to
    assert all(p.grad is g and torch.equal(g, c) for p, (g, c) in zip(model.parameters(), before))
    assert comm.stats() == {"bytes_sent": 4 * (5 * 3 + 3 + 3 * 2 + 2), "calls": 1, "by_kind": {"grad": 104}}


def test_adamw_is_fused_on_cuda_and_foreach_on_cpu():
    from pipeline.core.config import PretrainCfg
    from pipeline.pretrain.engines import make_adamw

    p = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))]
    opt = make_adamw(PretrainCfg(), "cpu")(p)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    if torch.cuda.is_available():
        q = [torch.nn.Parameter(torch.ones(2, 2, device="cuda"))]
        assert make_adamw(PretrainCfg(), "cuda")(q).defaults["fused"] is True


def test_set_determinism_settings():
    from pipeline.pretrain.trainer import set_determinism

    threads = torch.get_num_threads()
    try:
        set_determinism(1, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
        assert torch.is_deterministic_algorithms_warn_only_enabled()        # CPU: warn only
        assert torch.utils.deterministic.fill_uninitialized_memory is False
        if torch.cuda.is_available():
            set_determinism(1, torch.device("cuda"))
            assert not torch.is_deterministic_algorithms_warn_only_enabled()  # CUDA: errors, never silent
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name, low, high", [("gpu-125m", 110e6, 140e6), ("gpu-1b", 1.0e9, 1.2e9)])
def test_gpu_recipes_load_and_have_their_size(name, low, high, monkeypatch):
    from pipeline.core.config import load_recipe
    from pipeline.core.model import build_model, count_params

    monkeypatch.chdir(REPO)
    r = load_recipe(f"recipes/{name}.yaml")
    p = r.pretrain
    assert p.precision == "bf16" and p.compile and r.name == name
    assert r.blend.global_batch_size % p.grad_accum_steps == 0
    with torch.device("meta"):
        n = count_params(build_model(p.model, r.tokenizer.vocab_size, r.blend.seq_len))
    assert low <= n <= high, n


def test_stage_device_and_precision_settings():
    from pipeline.core.config import Recipe
    from pipeline.core.device import autocast, resolve, use_bf16
    from pipeline.core.errors import RecipeError

    r = Recipe.model_validate({"name": "x", "posttrain": {"device": "cpu", "precision": "fp32"},
                               "quantize": {"device": "auto"}, "evaluate": {"precision": "bf16"}})
    assert (r.posttrain.device, r.quantize.device, r.evaluate.device) == ("cpu", "auto", "auto")
    with pytest.raises(Exception, match="device"):
        Recipe.model_validate({"name": "x", "posttrain": {"device": "tpu"}})
    cpu = torch.device("cpu")
    assert resolve("cpu") == cpu
    assert resolve("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # auto precision: fp32 on CPU (the offline default stays bitwise), bf16 autocast on CUDA
    assert not use_bf16(cpu, "auto") and use_bf16(cpu, "bf16") and use_bf16(torch.device("cuda"), "auto")
    with autocast(cpu, "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match=r"r.yaml: posttrain.device: cuda asked for, but no CUDA device"):
            resolve("cuda", "r.yaml", "posttrain.device")
