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
            "pipeline.lowcomm.compress, pipeline.lowcomm.loop, pipeline.lowcomm.rounds, pipeline.lowcomm.elastic\n"
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.pretrain')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_registry_and_per_rank_weights():
    from pipeline.core.comm import Comm
    from pipeline.core.config import DistributedCfg
    from pipeline.lowcomm.modes import STRATEGIES, make_strategy

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


def _protocol_members(proto) -> set[str]:
    return {n for n in vars(proto) if not n.startswith("_")} | set(getattr(proto, "__annotations__", {}))


@pytest.mark.parametrize("cls", ["PlainEngine", "DeepSpeedEngine", "TorchftEngine"])
def test_every_engine_keeps_the_declared_protocol(cls):
    """The loop talks to engines only through `Engine`: each engine class defines every method and
    property of it (attributes set in __init__ are checked on live instances below)."""
    from pipeline.pretrain import engines

    members = _protocol_members(engines.Engine) - {"name", "comm", "lineage"}
    missing = sorted(m for m in members if not hasattr(getattr(engines, cls), m))
    assert not missing, f"{cls} lacks {missing} of the Engine protocol"


def test_plain_and_torchft_engines_are_engines_and_commit_as_declared(tmp_path):
    """A PlainEngine commits every step; a TorchftEngine (built, never connected: no Lighthouse)
    is an Engine too, refuses a run that does not end on a round, and writes before its first round
    only as replica 0 started fresh."""
    from pipeline.core.config import Recipe
    from pipeline.core.errors import RecipeError
    from pipeline.pretrain.context import Context
    from pipeline.pretrain.engines import COMMITTED, Engine, PlainEngine, ReplicaSpec, make_engine

    model = torch.nn.Linear(4, 4)
    plain = PlainEngine(Recipe(name="t"), model, Context(), 10)
    assert isinstance(plain, Engine) and plain.writer and plain.begin_step(3) == 3
    assert plain.end_step(3, torch.tensor(1.0)) is COMMITTED
    ft = Recipe.model_validate({"name": "t", "pretrain": {"distributed": {
        "mode": "diloco", "engine": "torchft", "world_size": 2, "diloco": {"inner_steps": 5}}}})
    spec = ReplicaSpec(0, "http://localhost:1", tmp_path, "none", joining=False)
    e = make_engine(ft, torch.nn.Linear(4, 4), Context(), 20, 8, replica=spec)
    assert isinstance(e, Engine) and e.name == "torchft" and e.total_rounds == 4 and e.writer
    assert not e.graceful_stop and e.metrics()["world_size"] == 2
    joiner = make_engine(ft, torch.nn.Linear(4, 4), Context(), 20, 8,
                         replica=ReplicaSpec(0, "http://localhost:1", tmp_path, "join", joining=True))
    assert not joiner.writer
    with pytest.raises(RecipeError, match=r"inner_steps: engine torchft: 22 steps do not end on a round"):
        make_engine(ft, torch.nn.Linear(4, 4), Context(), 22, 8, replica=spec)
    with pytest.raises(RecipeError, match="runs as replica processes"):
        make_engine(ft, torch.nn.Linear(4, 4), Context(), 20, 8)


def test_pretrain_and_posttrain_share_one_schedule():
    """One lr_factor: pretrain's recipe schedule and posttrain's cosine to zero are the same code."""
    import inspect

    from pipeline import posttrain
    from pipeline.core import schedule
    from pipeline.core.config import PretrainCfg

    cfg = PretrainCfg(warmup_steps=3, min_lr_ratio=0.1)
    assert [schedule.pretrain_lr_factor(s, cfg, 10) for s in (0, 2, 3, 10)] == [1 / 3, 1.0, 1.0, 0.1]
    assert schedule.lr_factor(5, 10, 0, floor=0.0) == 0.5
    assert "schedule.lr_factor" in inspect.getsource(posttrain) or "lr_factor(" in inspect.getsource(posttrain)


def test_set_determinism_settings():
    from pipeline.pretrain.context import set_determinism

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
