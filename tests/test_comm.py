"""Byte accounting: what Comm counts equals the analytic count for every mode (2 gloo workers)."""

from __future__ import annotations

import math

from pipeline.lowcomm.compress import message_nbytes
from pipeline.lowcomm.demo import demo_bytes_per_step
from tests.test_lowcomm import dist_cfg, run_workers, tiny_model

STEPS = 12


def _all_modes(comm):
    runs = {
        "ddp": dist_cfg("ddp"),
        "diloco": dist_cfg("diloco", inner_steps=4),
        "diloco-fp16": dist_cfg("diloco", inner_steps=4, compression={"kind": "fp16"}),
        "diloco-int8": dist_cfg("diloco", inner_steps=4, compression={"kind": "int8", "block_size": 64}),
        "diloco-int4-top10": dist_cfg("diloco", inner_steps=3, warmup_sync_steps=3,
                                      compression={"kind": "int4", "block_size": 32, "topk_fraction": 0.1}),
        "sparseloco": dist_cfg("diloco", inner_steps=4, compression={
            "kind": "int2", "block_size": 64, "topk_fraction": 0.05, "topk_chunk": 128}),
        "demo": dist_cfg("demo"),
    }
    out = {}
    for name, cfg in runs.items():
        before = comm.bytes_sent
        run_workers(comm, cfg, STEPS, 0.01)
        out[name] = comm.bytes_sent - before
    return out


def test_bytes_sent_equal_the_analytic_count_for_every_mode():
    from pipeline.lowcomm.loop import spawn
    n = sum(p.numel() for p in tiny_model().parameters())
    numels = [p.numel() for p in tiny_model().parameters()]
    expected = {
        "ddp": STEPS * n * 4,                                         # fp32 gradients every step
        "diloco": (STEPS // 4) * n * 4,                               # fp32 pseudo-gradient per sync
        "diloco-fp16": (STEPS // 4) * n * 2,
        "diloco-int8": (STEPS // 4) * (math.ceil(n / 64) * 64 + math.ceil(n / 64) * 4),
        # 3 ddp warm-up steps, then 3 syncs of top-10% int4 (payload + scales + int32 positions)
        "diloco-int4-top10": 3 * n * 4 + 3 * message_nbytes(n, "int4", 32, 0.1),
        # 5% of every 128-entry chunk, 2-bit values + fp32 scale per 64 kept + int16 in-chunk offsets
        "sparseloco": (STEPS // 4) * message_nbytes(n, "int2", 64, 0.05, 128),
        "demo": STEPS * demo_bytes_per_step(numels, 16, 4),
    }
    for rank in spawn(_all_modes, 2):
        assert rank == expected
    # int8 + fp32 scales per 64: ~3.6x fewer bytes than fp32 here (676 params: the last block is padded)
    assert expected["diloco-int8"] < expected["diloco"] / 3.5
    k = 6 * 7    # 676 = 5 chunks of 128 + one of 36: ceil(128 * 5%) = 7 kept in each
    assert expected["sparseloco"] == (STEPS // 4) * (math.ceil(k / 4) + 4 + 2 * k)
