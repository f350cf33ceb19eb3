"""DiLoCo on torchft with real processes, a real Lighthouse and gloo: a late joiner heals from a
peer; a worker killed with SIGKILL does not stop the run, and when restarted it heals and trains on.

Each replica group is one process (tests/lowcomm_torchft_worker.py) with its own torchft Manager.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.lowcomm.compress import message_nbytes

ROOT = Path(__file__).resolve().parents[1]
H = 5


@pytest.fixture
def lighthouse():
    from torchft._torchft import LighthouseServer

    # heartbeat timeout 2 s: a SIGKILLed replica leaves the quorum after ~2 s, not the default 5 s,
    # and a live one on a busy machine is not taken for dead
    server = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=2000, quorum_tick_ms=50,
                              heartbeat_timeout_ms=2000)
    yield server.address()
    server.shutdown()


def start(spec: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = open(Path(spec["out"]) / f"{spec['tag']}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "tests.lowcomm_torchft_worker", json.dumps(spec)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], out: Path, seconds: float = 150) -> None:
    end = time.monotonic() + seconds
    try:
        for p in procs:
            p.wait(timeout=max(1.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("torchft workers did not finish in time; logs:\n" + logs(out))


def logs(out: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(out.glob("*.log")))


def result(out: Path, tag: str) -> dict:
    path = out / f"{tag}.pt"
    assert path.exists(), f"{tag} wrote no result; logs:\n{logs(out)}"
    return torch.load(path, weights_only=True)


def spec(out: Path, lighthouse: str, replica: int, tag: str, rounds: int, **kw) -> dict:
    return {"replica": replica, "lighthouse": lighthouse, "rounds": rounds, "inner_steps": H,
            "out": str(out), "tag": tag, **kw}


def _train_on_gloo(comm, cfg, stop: int, state: dict | None) -> dict:
    from tests.test_lowcomm import run_workers

    # torch.multiprocessing hands both workers the same shared-memory tensors, and AdamW's
    # load_state_dict keeps them (no copy for the same dtype/device): without this copy the two
    # workers would step one shared Adam state
    return run_workers(comm, cfg, stop, 0.01, resume=copy.deepcopy(state), stop=stop)


def replay_without_torchft(compression: str, schedule: list[tuple[int, int]]) -> dict:
    """DiLoCo with a given membership, without torchft: `schedule` = [(workers, until step), ...];
    one worker runs in process, two on plain gloo (torch.multiprocessing); each phase starts from
    worker 0's state at the end of the last one, on every worker (as a healed joiner does).
    Returns worker 0's final weights."""
    from pipeline.core.comm import Comm
    from pipeline.lowcomm.loop import spawn
    from tests.test_lowcomm import dist_cfg

    cfg = dist_cfg("diloco", inner_steps=H, outer_lr=0.7, outer_momentum=0.6,
                   compression={"kind": compression})
    state, out = None, None
    for workers, stop in schedule:
        out = _train_on_gloo(Comm(), cfg, stop, state) if workers == 1 else \
            spawn(_train_on_gloo, workers, cfg, stop, state)[0]
        state = out["state"]
    return out["weights"]


@pytest.mark.e2e
def test_late_joiner_heals_from_a_peer_and_trains_on(tmp_path, lighthouse):
    # int4 + error feedback: the packed messages go through an all-gather on torchft's process
    # group (the fp32 all-reduce through manager.allreduce is the kill test's path)
    rounds, join, compression = 12, 3, "int4"
    # replica 0 trains alone; before round `join` it waits until the Lighthouse shows replica 1
    # asking for a quorum, so that replica 1 joins exactly at round `join`
    r0 = start(spec(tmp_path, lighthouse, 0, "r0", rounds, compression=compression,
                    wait_for=[[join, "participants_healthy", 1]]))
    # replica 1 starts its Manager (and so heartbeats) only once replica 0 is at round `join`
    r1 = start(spec(tmp_path, lighthouse, 1, "r1", rounds, compression=compression,
                    start_after=f"at_r0_{join}"))
    finish([r0, r1], tmp_path)
    assert (r0.returncode, r1.returncode) == (0, 0), logs(tmp_path)
    a, b = result(tmp_path, "r0"), result(tmp_path, "r1")

    # replica 0: alone for the first `join` rounds, then with replica 1 until the end
    assert [e["world_size"] for e in a["log"]] == [1] * join + [2] * (rounds - join)
    assert all(e["committed"] for e in a["log"])
    # replica 1 healed at its first round, starting at round `join`, with replica 0's state bitwise
    first = b["log"][0]
    assert first["healed"] and first["round"] == join and b["healed_syncs"] == join
    assert b["healed_global_sha256"] == a["log"][join]["global_sha256"]
    assert first["global_sha256"] == a["log"][join]["global_sha256"]
    assert a["log"][join]["global_sha256"] != a["log"][0]["global_sha256"]     # it did move
    assert [e["round"] for e in b["log"]] == list(range(join, rounds))
    # both end with the same global and replica weights, and the loss fell
    assert torch.equal(a["global"], b["global"])
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert a["end_val"] < 0.9 * a["start_val"], (a["start_val"], a["end_val"])
    # and it is exactly DiLoCo with that membership, run without torchft
    replay = replay_without_torchft(compression, [(1, join * H), (2, rounds * H)])
    assert all(torch.equal(a["weights"][k], replay[k]) for k in replay)
    # bytes: one pseudo-gradient message per round (fp32 all-reduce or packed int4 + fp32 scales)
    per_round = message_nbytes(a["global"].numel(), compression, 64)
    assert per_round == 352 + 44                    # 676 params: 11 blocks of 64 int4 + fp32 scales
    assert a["bytes_sent"] == rounds * per_round
    assert b["bytes_sent"] == (rounds - join) * per_round


@pytest.mark.e2e
def test_sigkilled_worker_does_not_stop_the_run_and_heals_when_restarted(tmp_path, lighthouse):
    rounds, kill_round = 10, 2
    kill_step = kill_round * H + 1                 # inside the inner phase of round `kill_round`
    # Order, by the Lighthouse's state and by files (no sleeps):
    # round 0: replica 1 asks once both replicas heartbeat; replica 0 asks once replica 1 is asking,
    #          so the first quorum has both;
    # round 6: the restarted replica 1 (tag r1b) starts its Manager only when replica 0 is at round
    #          6 (a replica that heartbeats but does not ask for a quorum blocks the survivor's
    #          first quorum after the kill: torchft's split-brain rule; the cause of issue 18), and
    #          replica 0 asks once r1b is asking, so r1b joins exactly at round 6.
    r0 = start(spec(tmp_path, lighthouse, 0, "r0", rounds,
                    wait_for=[[0, "participants_healthy", 1], [6, "participants_healthy", 1]]))
    r1 = start(spec(tmp_path, lighthouse, 1, "r1", rounds, kill_at_step=kill_step,
                    wait_for=[[0, "heartbeating", 2]]))
    try:
        r1.wait(timeout=120)
    except subprocess.TimeoutExpired:
        r0.kill(), r1.kill()
        pytest.fail("replica 1 did not reach its kill step; logs:\n" + logs(tmp_path))
    assert r1.returncode == -signal.SIGKILL, logs(tmp_path)
    r1b = start(spec(tmp_path, lighthouse, 1, "r1b", rounds, start_after="at_r0_6"))
    finish([r0, r1b], tmp_path)
    assert (r0.returncode, r1b.returncode) == (0, 0), logs(tmp_path)
    a, b = result(tmp_path, "r0"), result(tmp_path, "r1b")

    # replica 0: round `kill_round` failed once (its peer died mid-round) and was redone alone
    failed = [e for e in a["log"] if not e["committed"]]
    assert [e["round"] for e in failed] == [kill_round] and failed[0]["world_size"] == 2
    committed = [e for e in a["log"] if e["committed"]]
    assert [e["round"] for e in committed] == list(range(rounds))
    sizes = [2] * kill_round + [1] * (6 - kill_round) + [2] * (rounds - 6)
    assert [e["world_size"] for e in committed] == sizes
    assert a["failed_collectives"] >= 1
    # the redo started from the state the failed attempt started from (rolled back, bitwise)
    assert failed[0]["global_sha256"] == committed[kill_round]["global_sha256"]
    # every attempt sent its fp32 pseudo-gradient, the failed one included
    assert a["bytes_sent"] == (rounds + 1) * message_nbytes(a["global"].numel(), "none")
    # the restarted replica healed at round 6 from replica 0 and both finished on the same weights
    assert b["log"][0]["healed"] and b["log"][0]["round"] == 6
    assert b["healed_global_sha256"] == committed[6]["global_sha256"]
    assert torch.equal(a["global"], b["global"])
    assert a["end_val"] < 0.9 * a["start_val"], (a["start_val"], a["end_val"])
    # and it is exactly DiLoCo run without torchft with the membership of the committed rounds:
    # the rollback restored replica 0's weights, inner optimizer and outer state
    replay = replay_without_torchft("none", [(2, kill_round * H), (1, 6 * H), (2, rounds * H)])
    assert all(torch.equal(a["weights"][k], replay[k]) for k in replay)


@pytest.mark.e2e
@pytest.mark.parametrize("extra", [{}, {"warmup_sync_steps": 3, "fragments": 2}], ids=["plain", "warmup-streaming"])
def test_one_replica_on_torchft_equals_plain_diloco(tmp_path, lighthouse, extra):
    """Driving the outer step through torchft changes nothing in the math: one replica, in process,
    gives bitwise the weights of DiLoCoStrategy on a plain Comm, and counts the same bytes; also
    with synchronous warm-up steps (one round each) and streaming fragments (F syncs per round)."""
    from pipeline.core.comm import Comm
    from pipeline.lowcomm.rounds import ManagerComm, ReplicaState, make_manager, round_range, rounds_in, run_rounds
    from pipeline.lowcomm.loop import make_strategy, train_steps
    from tests.test_lowcomm import batch_of, dist_cfg, mse, tiny_model

    cfg = dist_cfg("diloco", inner_steps=H, outer_lr=0.7, outer_momentum=0.6, **extra)
    steps = extra.get("warmup_sync_steps", 0) + 3 * H
    rounds = rounds_in(cfg.diloco, steps)
    assert rounds == 3 + extra.get("warmup_sync_steps", 0)
    assert [round_range(cfg.diloco, r) for r in range(rounds)][-1] == (steps - H, steps)

    def build(comm):
        model = tiny_model()
        strategy = make_strategy(cfg, comm)
        opt = strategy.build_optimizer(list(model.parameters()),
                                       lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.0))
        strategy.setup(model)
        return model, strategy, opt

    plain = Comm()
    m0, s0, o0 = build(plain)
    train_steps(m0, s0, o0, batch_of, mse, 0, steps)

    comm = ManagerComm(None, None)
    model, strategy, opt = build(comm)
    replica = ReplicaState(model, opt, strategy)
    manager, pg, store = make_manager("replica0", lighthouse, replica, timeout_seconds=10,
                                      quorum_timeout_seconds=20)
    comm.manager, comm.pg = manager, pg
    try:
        log = run_rounds(model, strategy, opt, replica, manager, comm, batch_of, mse, rounds)
    finally:
        manager.shutdown(wait=False)
    assert [(e["round"], e["world_size"], e["committed"]) for e in log] == [(r, 1, True) for r in range(rounds)]
    assert manager.current_step() == rounds and strategy.state["syncs"] == s0.state["syncs"]
    assert all(torch.equal(v, m0.state_dict()[k]) for k, v in model.state_dict().items())
    assert comm.bytes_sent == plain.bytes_sent and comm.ledger() == plain.ledger()
    if not extra:
        assert comm.bytes_sent == 3 * 2704
    else:   # 3 warm-up gradient all-reduces (fp32), then per fragment one pseudo-gradient per H steps
        assert plain.ledger()["all_reduce/grad/payload"] == {"bytes": 3 * 2704, "calls": 3}
        assert plain.ledger()["all_reduce/pseudo_grad/payload"]["calls"] == s0.state["syncs"] > 3


def test_rounds_must_end_on_the_run_length():
    from pipeline.lowcomm.rounds import rounds_in
    from tests.test_lowcomm import dist_cfg

    d = dist_cfg("diloco", inner_steps=H, warmup_sync_steps=2).diloco
    assert rounds_in(d, 2 + 4 * H) == 6
    with pytest.raises(ValueError, match="do not end on a round"):
        rounds_in(d, 4 * H)
