"""Low-communication strategies: compression, error feedback, DCT, DiLoCo and DeMo on real gloo groups."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.comm import Comm
from pipeline.config import DistributedCfg
from pipeline.lowcomm.compress import (ErrorFeedback, compress, decompress, dequantize_blockwise,
                                       message_nbytes, quantize_blockwise)
from pipeline.lowcomm.demo import DeMoOptimizer, dct_matrix, from_chunks, to_chunks, topk_per_chunk
from pipeline.lowcomm.loop import make_strategy, spawn, train_steps

# ----------------------------------------------------------------------------- a small task

GLOBAL_BATCH = 8


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def batch_of(step: int) -> torch.Tensor:
    """Global batch `step` of a fixed regression task: rows of [x (16) | y (4)], deterministic."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 16, generator=g)
    w = torch.linspace(-1, 1, 64).view(16, 4)
    return torch.cat([x, torch.sin(x @ w)], dim=1)


def mse(model, rows):
    return torch.nn.functional.mse_loss(model(rows[:, :16]), rows[:, 16:])


def val_loss(model) -> float:
    with torch.no_grad():
        return float(mse(model, torch.cat([batch_of(10_000 + i) for i in range(8)])))


def dist_cfg(mode: str, **diloco) -> DistributedCfg:
    return DistributedCfg.model_validate({"mode": mode, "diloco": diloco, "demo": {"chunk_size": 16, "topk": 4}})


def run_workers(comm: Comm, cfg: DistributedCfg, steps: int, lr: float, opt_kind: str = "adamw",
                resume: dict | None = None, stop: int | None = None) -> dict:
    """One worker's run; returns its weights, byte count, and (when stopped early) its full state."""
    model = tiny_model()
    strategy = make_strategy(cfg, comm)
    make = (lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0)) if opt_kind == "adamw" else \
        (lambda p: torch.optim.SGD(p, lr=lr))
    opt = strategy.build_optimizer(list(model.parameters()), make)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        strategy.load_state_dict(resume["strategy"])
        start = resume["step"]
    strategy.setup(model)
    end = steps if stop is None else stop
    train_steps(model, strategy, opt, batch_of, mse, start, end)
    out = {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "bytes": comm.bytes_sent,
           "val": val_loss(model), "n_params": sum(p.numel() for p in model.parameters())}
    if stop is not None:
        out["state"] = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "strategy": strategy.state_dict(), "step": stop}
    return out


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- compression


@pytest.mark.parametrize("kind,levels", [("int8", 127), ("int4", 7)])
def test_blockwise_quantization_error_is_within_half_a_level(kind, levels):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.linspace(1e-4, 1e-1, 1000)
    payload, scales = quantize_blockwise(x, kind, 64)
    y = dequantize_blockwise(payload, scales, kind, x.numel(), 64)
    blocks = torch.nn.functional.pad(x, (0, 24)).view(-1, 64)
    bound = (blocks.abs().amax(1) / levels / 2).repeat_interleave(64)[:1000]
    assert torch.all((x - y).abs() <= bound * (1 + 1e-5))
    assert payload.numel() * payload.element_size() == (1024 if kind == "int8" else 512)
    assert scales.numel() == 16


def test_fp16_and_packed_sizes_match_the_analytic_count():
    x = torch.randn(777)
    for kind in ["none", "fp16", "int8", "int4", "int2", "sign"]:
        for frac, chunk in [(None, None), (0.1, None), (0.02, 100), (0.3, 64)]:
            p = compress(x, kind, 32, frac, chunk)
            assert p.nbytes == message_nbytes(777, kind, 32, frac, chunk), (kind, frac, chunk)
            y = decompress(p, 32)
            assert y.shape == x.shape
    assert message_nbytes(1024, "int4", 64) == 512 + 16 * 4          # payload + fp32 scales
    assert message_nbytes(1024, "sign", 64) == 128 + 16 * 4          # one bit each + fp32 scales
    assert (decompress(compress(x, "fp16"), 64) - x).abs().max() <= x.abs().max() * 2 ** -11


def test_sign_keeps_signs_and_block_mean_magnitude():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * torch.linspace(1e-4, 1e-1, 1000)
    payload, scales = quantize_blockwise(x, "sign", 64)
    y = dequantize_blockwise(payload, scales, "sign", x.numel(), 64)
    assert payload.dtype == torch.uint8 and payload.numel() == 125 and scales.numel() == 16
    assert torch.equal(torch.sign(y), torch.where(x >= 0, 1.0, -1.0))
    for b in range(16):   # per block: |y| is the block's mean |x| (the last block has 40 real entries)
        xb, yb = x[b * 64:(b + 1) * 64], y[b * 64:(b + 1) * 64]
        assert torch.allclose(yb.abs(), xb.abs().mean().expand_as(yb), rtol=1e-6)
        # the scaled sign is a contraction: it never moves further from x than zero does
        assert float((yb - xb).norm()) <= float(xb.norm()) * (1 + 1e-6)


def test_int2_rounds_to_the_nearest_of_four_levels():
    x = torch.tensor([3.0, 2.1, 1.9, 0.2, -0.2, -1.9, -2.1, -3.0, 1.0])   # one block, absmax 3 -> scale 1
    payload, scales = quantize_blockwise(x, "int2", 64)
    assert payload.dtype == torch.uint8 and payload.numel() == 3 and scales.tolist() == [1.0]
    y = dequantize_blockwise(payload, scales, "int2", x.numel(), 64)
    assert y.tolist() == [3.0, 3.0, 1.0, 1.0, -1.0, -1.0, -3.0, -3.0, 1.0]
    assert message_nbytes(1024, "int2", 64) == 256 + 16 * 4            # two bits each + fp32 scales


def test_chunked_topk_keeps_each_chunks_largest_and_breaks_ties_by_position():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0,    1.0, 1.0, -1.0, 1.0,    7.0, 0.5])   # chunks of 4: 4, 4, 2
    p = compress(x, "none", 64, topk_fraction=0.5, topk_chunk=4)
    assert p.indices.dtype == torch.int16 and p.indices.tolist() == [1, 3, 0, 1, 0, 1]   # in-chunk offsets
    assert p.nbytes == 6 * 4 + 6 * 2 == message_nbytes(10, "none", 64, 0.5, 4)
    y = decompress(p, 64)
    assert y.tolist() == [0.0, -5.0, 0.0, 3.0, 1.0, 1.0, 0.0, 0.0, 7.0, 0.5]
    # the same input gives the same message, whatever the order of equal magnitudes came from
    assert torch.equal(compress(x.clone(), "none", 64, 0.5, 4).indices, p.indices)
    with pytest.raises(ValueError, match="topk_chunk=40000"):
        compress(torch.randn(50_000), "int2", 64, 0.01, 40_000)


def test_topk_keeps_the_largest_entries():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, -2.0])
    y = decompress(compress(x, "none", 64, topk_fraction=0.5), 64)
    assert torch.equal(y, torch.tensor([0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 1.0, -2.0]))


@pytest.mark.parametrize("kind", ["int8", "int4", "sign"])
def test_error_feedback_keeps_accumulated_error_bounded(kind):
    # one large entry per block makes the small entries fall below one quantization level, so
    # without error feedback they are never sent and the error grows linearly with the syncs
    n, syncs = 256, 400
    g = torch.Generator().manual_seed(1)
    ef, plain = ErrorFeedback(n, True), ErrorFeedback(n, False)
    true_sum = torch.zeros(n)
    ef_sum, plain_sum = torch.zeros(n), torch.zeros(n)
    worst, worst_first_half = 0.0, 0.0
    for t in range(syncs):
        x = 1e-3 * (1 + 0.1 * torch.randn(n, generator=g))
        x[::64] = 1.0
        true_sum += x
        ef_sum += ef.compress(x, kind, 64, None)[1]
        plain_sum += plain.compress(x, kind, 64, None)[1]
        worst = max(worst, float((ef_sum - true_sum).abs().max()))
        worst_first_half = worst if t < syncs // 2 else worst_first_half
    if kind == "sign":
        # one bit cannot say "1.0 here, 1e-3 elsewhere": the residual of the spike builds up until its
        # sign dominates the block, then drains; it stays bounded (no growth after the first half)
        # while without error feedback the error grows by ~1 per sync
        assert worst <= 1.05 * worst_first_half and worst < 0.1 * float((plain_sum - true_sum).abs().max())
        return
    # with EF the accumulated error equals the last residual: at most half a level of the largest block
    level = 1.0 / (127 if kind == "int8" else 7)
    assert worst <= level
    assert float((plain_sum - true_sum).abs().max()) > 0.1 * syncs * 1e-3


def test_sparseloco_style_topk_int2_with_error_feedback_stays_bounded():
    """2% chunked top-k + 2-bit values: each message drops 98% of the entries, but with error feedback
    what was sent in total tracks the true total (the error is the last residual, which does not grow);
    without it the dropped mass piles up sync after sync."""
    n, syncs = 1024, 300
    g = torch.Generator().manual_seed(3)
    ef, plain = ErrorFeedback(n, True), ErrorFeedback(n, False)
    true_sum, ef_sum, plain_sum = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    errs = []
    for _ in range(syncs):
        x = 1e-3 * torch.randn(n, generator=g) + 2e-4        # a drift every entry shares
        true_sum += x
        ef_sum += ef.compress(x, "int2", 64, 0.02, 256)[1]
        plain_sum += plain.compress(x, "int2", 64, 0.02, 256)[1]
        errs.append(float((ef_sum - true_sum).abs().max()))
    assert max(errs[syncs // 2:]) <= 1.5 * max(errs[:syncs // 2])
    assert errs[-1] < 0.2 * float((plain_sum - true_sum).abs().max())


# ----------------------------------------------------------------------------- DeMo pieces


def test_dct_round_trip_and_orthonormality():
    c = dct_matrix(32)
    assert torch.allclose(c @ c.T, torch.eye(32), atol=1e-5)
    x = torch.randn(5, 7, 11)
    chunks = to_chunks(x, 32)
    back = from_chunks((chunks @ c.T) @ c, x)
    assert torch.allclose(back, x, atol=1e-5)
    # a pure cosine of frequency 3 has a single DCT component
    n = torch.arange(32, dtype=torch.float32)
    coeffs = c @ torch.cos(math.pi * (2 * n + 1) * 3 / 64)
    assert int(coeffs.abs().argmax()) == 3 and float(coeffs.abs().sort().values[-2]) < 1e-4


def test_topk_per_chunk_selects_largest_magnitudes():
    coeffs = torch.tensor([[0.1, -3.0, 2.0, 0.5], [4.0, 0.0, -0.2, -1.0]])
    idx, val = topk_per_chunk(coeffs, 2)
    assert sorted(idx[0].tolist()) == [1, 2] and sorted(idx[1].tolist()) == [0, 3]
    assert torch.equal(torch.gather(coeffs, 1, idx), val)


def test_demo_removes_sent_components_from_momentum():
    p = torch.nn.Parameter(torch.zeros(64))
    opt = DeMoOptimizer([p], Comm(), lr=0.1, chunk_size=16, topk=16, momentum_decay=0.9, sign=False)
    p.grad = torch.randn(64)
    g = p.grad.clone()
    opt.step()
    # topk == chunk: everything is sent, nothing stays in the momentum, the update is the gradient
    assert opt.state[p]["momentum"].abs().max() < 1e-5
    assert torch.allclose(p.detach(), -0.1 * g, atol=1e-5)


def test_demo_short_run_loss_falls():
    r = run_workers(Comm(), dist_cfg("demo"), steps=60, lr=0.01)
    adamw = run_workers(Comm(), dist_cfg("ddp"), steps=60, lr=0.01)
    assert r["val"] < 0.85 * val_loss(tiny_model())
    assert r["val"] < 1.05 * adamw["val"]       # as good as AdamW on this task (0.487 vs 0.503)


# ----------------------------------------------------------------------------- DiLoCo, world size 1


def test_diloco_single_worker_trains():
    # with 8 syncs the paper's outer momentum 0.9 overshoots (val 0.69 > start 0.61); 0.5 does not
    cfg = dist_cfg("diloco", inner_steps=5, outer_lr=0.7, outer_momentum=0.5)
    assert run_workers(Comm(), cfg, 40, 0.01)["val"] < 0.9 * val_loss(tiny_model())


def test_streaming_fragments_sync_a_fraction_each_time():
    cfg = dist_cfg("diloco", inner_steps=8, fragments=2)
    r = run_workers(Comm(), cfg, 32, 0.01)
    # each fragment syncs every 8 steps (fragment 1 offset by 4): 4 + 3 syncs of about half the model
    n = r["n_params"]
    assert 0.3 * 7 * n * 4 < r["bytes"] < 0.7 * 8 * n * 4


# ----------------------------------------------------------------------------- 2 gloo workers


def test_sanity_anchor_diloco_h1_sgd_equals_ddp():
    # diloco: theta - mean(theta - (theta - lr*g_w)) ; ddp: theta - lr*mean(g_w). Equal in exact
    # arithmetic; in fp32 the extra subtraction rounds differently, so a stated tolerance of 1e-6.
    ranks = spawn(_ddp_and_anchor, 2, 12, 0.05)
    for k, v in ranks[0]["ddp"].items():
        assert torch.allclose(v, ranks[0]["diloco"][k], rtol=0, atol=1e-6), k
    assert same(ranks[0]["diloco"], ranks[1]["diloco"])  # replicas agree after every sync


def _ddp_and_anchor(comm, steps, lr):
    ddp = run_workers(comm, dist_cfg("ddp"), steps, lr, "sgd")["weights"]
    anchor = dist_cfg("diloco", inner_steps=1, outer_lr=1.0, outer_momentum=0.0, nesterov=False,
                      inner_optimizer="sgd")
    return {"ddp": ddp, "diloco": run_workers(comm, anchor, steps, lr, "adamw")["weights"]}


@pytest.mark.parametrize("kind", ["none", "int4"])
def test_two_worker_diloco_is_deterministic_and_resumable(kind):
    cfg = dist_cfg("diloco", inner_steps=4, compression={"kind": kind, "block_size": 32})
    ranks = spawn(_run_twice_and_resume, 2, cfg)
    for r in ranks:
        assert same(r["a"], r["b"]), "two runs differ"
        assert same(r["a"], r["resumed"]), "stopping at step 10 and resuming changes the weights"
    assert same(ranks[0]["a"], ranks[1]["a"]), "replicas differ after the last sync"


def _run_twice_and_resume(comm, cfg):
    """In one worker process: a full run, another full run, and a run stopped at step 10 then
    resumed from its state dicts (model, inner optimizer, strategy) by fresh objects."""
    a = run_workers(comm, cfg, 20, 0.01)["weights"]
    b = run_workers(comm, cfg, 20, 0.01)["weights"]
    first = run_workers(comm, cfg, 20, 0.01, "adamw", None, 10)
    resumed = run_workers(comm, cfg, 20, 0.01, "adamw", first["state"])["weights"]
    return {"a": a, "b": b, "resumed": resumed}


# ----------------------------------------------------------------------------- SparseLoCo's recipe (options)


def test_sparseloco_options_default_off_and_out_of_the_resolved_recipe():
    from pipeline.config import OuterCompressionCfg

    c = OuterCompressionCfg()
    assert (c.error_feedback_decay, c.mean_over) == (1.0, "workers")
    # at their defaults the keys are not in the dump, so existing recipes keep their hash
    assert "error_feedback_decay" not in c.model_dump() and "mean_over" not in c.model_dump()
    on = OuterCompressionCfg(kind="int2", topk_fraction=0.1, error_feedback_decay=0.9, mean_over="contributors")
    assert on.model_dump()["error_feedback_decay"] == 0.9 and on.model_dump()["mean_over"] == "contributors"
    with pytest.raises(ValueError, match="contributors needs topk_fraction"):
        OuterCompressionCfg(kind="sign", mean_over="contributors")
    with pytest.raises(ValueError):
        OuterCompressionCfg(error_feedback_decay=1.5)


def test_error_feedback_decay_scales_the_residual_before_adding():
    x1 = torch.tensor([4.0, 1.0, -2.0, 0.5])
    x2 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    plain, decayed = ErrorFeedback(4, True), ErrorFeedback(4, True, decay=0.5)
    for ef in (plain, decayed):
        ef.compress(x1, "none", 64, 0.25)            # keeps 4.0; residual [0, 1, -2, 0.5]
    assert torch.equal(plain.residual, decayed.residual)
    _, sent_plain = plain.compress(x2, "none", 64, 0.25)
    _, sent_decayed = decayed.compress(x2, "none", 64, 0.25)
    # plain: x2 + r = [0.1, 1.2, -1.7, 0.9] -> sends -1.7; decayed: x2 + r/2 = [0.1, 0.7, -0.7, 0.65]
    # -> sends 0.7 (ties by position), and the new residual is target - sent
    assert torch.equal(sent_plain, torch.tensor([0.0, 0.0, -1.7, 0.0]))
    assert torch.allclose(sent_decayed, torch.tensor([0.0, 0.7, 0.0, 0.0]))
    assert torch.allclose(decayed.residual, torch.tensor([0.1, 0.0, -0.7, 0.65]))


def test_mean_over_contributors_divides_each_entry_by_the_workers_that_sent_it():
    ranks = spawn(_contributor_means, 2)
    for r in ranks:
        # rank 0 keeps entries 0, 1; rank 1 keeps 1, 3 (top half of 4): entry 1 from both
        assert torch.allclose(r["workers"], torch.tensor([5.0, 2.5, 0.0, -4.0]))
        assert torch.allclose(r["contributors"], torch.tensor([10.0, 2.5, 0.0, -8.0]))
    assert torch.equal(ranks[0]["contributors"], ranks[1]["contributors"])


def _contributor_means(comm):
    from pipeline.lowcomm.compress import ErrorFeedback as EF
    from pipeline.lowcomm.diloco import DiLoCoStrategy

    delta = torch.tensor([10.0, 3.0, 0.1, 0.2]) if comm.rank == 0 else torch.tensor([0.0, 2.0, 0.1, -8.0])
    out = {}
    for mean in ("workers", "contributors"):
        cfg = dist_cfg("diloco", compression={"kind": "none", "topk_fraction": 0.5, "mean_over": mean,
                                              "error_feedback": False})
        s = DiLoCoStrategy(comm, cfg)
        out[mean] = s._compressed_mean(EF(4, False), delta)
    return out
