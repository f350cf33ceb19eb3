"""`pretrain.distributed.engine: torchft` through `omp pretrain`, with real processes, a real
Lighthouse and gloo: a replica killed with SIGKILL mid-run is restarted by `omp pretrain` and heals
from its live peer; a replica started late by a second `omp pretrain` joins and heals. In both, the
final weights are bitwise those of plain DiLoCo (`omp pretrain`, engine torchrun) with the same
membership, and the ladder is written as by every engine (the trainer's one loop runs torchft too): the torchrun run resumes from the torchft run's checkpoint at the round the replica
(re)joined, with worker 1 given worker 0's state there, which is what torchft's heal does.

Processes are ordered by files (checkpoint manifests, the replicas' pid and waiting files) and by
the Lighthouse's state (OMP_FT_WAIT), never by sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.io import read_json, sha256_file, write_json
from tests.conftest import omp

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
H, STEPS = 5, 20

RECIPE = f"""base: micro.yaml
name: micro-ft
pretrain:
  steps: {STEPS}
  checkpoint_every_steps: 1000
  keep_last: 20
  eval_every_steps: 20
  eval_tokens: 1024
  distributed:
    mode: diloco
    engine: torchft
    world_size: 2
    diloco: {{inner_steps: {H}, outer_lr: 0.7, outer_momentum: 0.5, compression: {{kind: COMPRESSION}}}}
    torchft: {{min_replicas: MIN}}
"""


def recipes(work: Path, compression: str, min_replicas: int) -> tuple[str, str]:
    """The torchft recipe and the same DiLoCo on plain torchrun workers."""
    text = RECIPE.replace("COMPRESSION", compression).replace("MIN", str(min_replicas))
    (work / "tests/recipes/micro_ft.yaml").write_text(text)
    (work / "tests/recipes/micro_ft_plain.yaml").write_text(text.replace("engine: torchft", "engine: torchrun"))
    return "tests/recipes/micro_ft.yaml", "tests/recipes/micro_ft_plain.yaml"


def start_omp(work: Path, *args: str, env: dict | None = None, log: str = "omp") -> subprocess.Popen:
    """`omp ...` in `work`, stdout and stderr to a file (never a pipe nobody drains)."""
    out = open(work / f"{log}.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=work, stdout=out,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, "PYTHONHASHSEED": "0", **ENV, **(env or {})})
    p.log = work / f"{log}.log"
    return p


def ctl(work: Path) -> Path:
    return work / "artifacts/pretrain/checkpoints/torchft"


def wait_file(path: Path, procs, seconds: float = 240) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"omp pretrain ended before {path.name}:\n{p.log.read_text()[-3000:]}")
        assert time.monotonic() < end, f"{path} did not appear in {seconds} s"
        time.sleep(0.01)


def finish(p, seconds: float = 240) -> str:
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"omp pretrain did not finish in {seconds} s:\n{p.log.read_text()[-4000:]}") from None
    err = p.log.read_text()
    assert p.returncode == 0, err[-4000:]
    return err


def replica_logs(work: Path, replica: int) -> list[dict]:
    return [read_json(f) for f in sorted(ctl(work).glob(f"replica{replica}-*.log.json"))]


def replay_from(work: Path, step: int, plain: str) -> str:
    """Plain DiLoCo on 2 torchrun workers from the torchft run's checkpoint at `step`, worker 1
    starting from worker 0's state (as a healed replica does); returns the final weights' sha256."""
    src = work / f"artifacts/pretrain/checkpoints/step-{step:07d}"
    dst = work / f"replay-step-{step}"
    shutil.copytree(src, dst)
    shutil.copyfile(dst / "state-rank0.pt", dst / "state-rank1.pt")
    shutil.copyfile(dst / "model.safetensors", dst / "model-rank1.safetensors")
    man = read_json(dst / "manifest.json")
    man["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                    for p in sorted(dst.iterdir()) if p.name != "manifest.json"}
    write_json(dst / "manifest.json", man)
    keep = work / "ft-final.safetensors"
    shutil.copyfile(work / "artifacts/pretrain/final/model.safetensors", keep)
    omp("pretrain", "--recipe", plain, "--resume", str(dst), "--accept-mismatch", cwd=work, env=ENV)
    return sha256_file(work / "artifacts/pretrain/final/model.safetensors")


@pytest.mark.e2e
def test_sigkilled_replica_is_restarted_heals_and_ends_on_plain_diloco_weights(micro_data, copy_workdir):
    work = copy_workdir(micro_data)
    ft, plain = recipes(work, "none", min_replicas=2)   # rounds wait for both: membership 2 throughout
    p = start_omp(work, "pretrain", "--recipe", ft)
    wait_file(work / f"artifacts/pretrain/checkpoints/step-{H:07d}/manifest.json", [p])   # round 0 committed
    os.kill(read_json(ctl(work) / "replica1.pid.json")["pid"], signal.SIGKILL)
    err = finish(p)
    assert "torchft replica 1 exited with status -9; restart 1 of 3 (heals from a live peer)" in err
    m = read_json(work / "artifacts/pretrain/metrics.json")
    assert m["engine"] == "torchft" and m["steps"] == STEPS and m["val_loss_final"] < m["val_loss_initial"]
    assert read_json(ctl(work) / "launcher-0-1.json")["restarts"] == {"0": 0, "1": 1}

    # replica 0: every round committed with both replicas; the round the kill hit (if it was in
    # flight) failed and was redone after the restart
    att = m["torchft"]["attempts"]
    done = [a for a in att if a["committed"]]
    assert [a["round"] for a in done] == list(range(STEPS // H)) and {a["world_size"] for a in done} == {2}
    assert all(a["world_size"] == 2 for a in att if not a["committed"])
    # the restarted replica healed from replica 0 at its first round and trained to the end
    (log,) = [lg for lg in replica_logs(work, 1) if lg["resume"] == "join"]
    k = log["attempts"][0]["round"]
    assert log["healed"] == 1 and log["attempts"][0]["healed"] and 1 <= k < STEPS // H
    assert [a["round"] for a in log["attempts"] if a["committed"]] == list(range(k, STEPS // H))
    # bytes: every attempt sent its fp32 pseudo-gradient (a failed one too)
    assert m["byte_ledger"] == {"all_reduce/pseudo_grad/payload": {"bytes": len(att) * 4 * m["params"],
                                                                   "calls": len(att)}}
    assert read_json(work / f"artifacts/pretrain/checkpoints/step-{k * H:07d}/ledger.json")["bytes_sent"] > 0
    # the torchft engine runs the trainer's one loop: its ladder is written like every engine's
    # (rung 8 falls inside round 1; a round rolled back by the kill loses its rungs and rewrites them)
    lad = read_json(work / "artifacts/pretrain/ladder/ladder.json")
    assert [r["step"] for r in lad["rungs"]] == [0, 8, STEPS]
    assert lad["rungs"][0]["parent_sha256"] == lad["init_sha256"]
    assert all(b["parent_sha256"] == a["sha256"] for a, b in zip(lad["rungs"], lad["rungs"][1:]))
    assert lad["rungs"][-1]["sha256"] == m["model_sha256"]
    # bitwise: plain DiLoCo with the same membership
    assert replay_from(work, k * H, plain) == m["model_sha256"]


@pytest.mark.e2e
@pytest.mark.slow
def test_late_replica_from_a_second_omp_pretrain_heals_and_ends_on_plain_diloco_weights(micro_data, copy_workdir):
    work = copy_workdir(micro_data)
    ft, plain = recipes(work, "int4", min_replicas=1)
    join = 2
    # replica 0 trains alone; before round `join` it waits until a second replica asks for a quorum
    p0 = start_omp(work, "pretrain", "--recipe", ft, "--replica-ids", "0",
                   env={"OMP_FT_WAIT": json.dumps([[join, "participants_healthy", 1]])})
    wait_file(ctl(work) / f"waiting-replica0-round{join}", [p0])
    address = read_json(ctl(work) / "lighthouse.json")["address"]
    p1 = start_omp(work, "pretrain", "--recipe", ft, "--replica-ids", "1", "--lighthouse", address, log="joiner")
    finish(p1)
    finish(p0)
    m = read_json(work / "artifacts/pretrain/metrics.json")
    assert [a["world_size"] for a in m["torchft"]["attempts"]] == [1] * join + [2] * (STEPS // H - join)
    (log,) = replica_logs(work, 1)
    assert log["healed"] == 1 and log["attempts"][0]["round"] == join and log["attempts"][0]["healed"]
    # int4 messages: packed levels and fp32 scales apart in the ledger, one message per round
    blocks = -(-m["params"] // 64)
    assert m["byte_ledger"] == {
        "all_gather/pseudo_grad/payload": {"bytes": 4 * blocks * 32, "calls": 4},
        "all_gather/pseudo_grad/scales": {"bytes": 4 * blocks * 4, "calls": 4}}
    assert log["ledger"]["all_gather/pseudo_grad/scales"]["calls"] == STEPS // H - join
    # bitwise: one DiLoCo worker until round `join`, then two, the second from the first's state
    assert replay_from(work, join * H, plain) == m["model_sha256"]
