"""One torchft replica group (one process) running our DiLoCo; started by tests/test_lowcomm_torchft.py.

    python -m tests.lowcomm_torchft_worker '<json spec>'

spec: replica (int), lighthouse (address), rounds, inner_steps, out (dir), compression (kind),
      wait_for ([[round, what, n], ...]: before asking for the quorum of that round, wait until
      what is true: what = a file name in out (n omitted: the file exists), or a key of
      pipeline.lowcomm.rounds.lighthouse_status ("participants_healthy": peers already asking for the
      next quorum; "heartbeating": replicas alive) that reaches n. Ordering is by files and by the
      Lighthouse's own state, never by sleeping),
      kill_at_step (SIGKILL itself after that inner step, or null), tag (name of the result file),
      start_after (a file name in out: wait for it before starting the Manager, so that the
      lighthouse does not see this replica heartbeating before it is meant to join).
      width (optional: hidden width of the model, for the recovery benchmark; default the tests'
      tiny_model).
Right before asking torchft for the quorum of round r it touches `at_<tag>_<r>` in out (then does
its waits), so a test can line up who joins when; it writes `<tag>.pt` (a dict of tensors and
numbers, loadable with weights_only=True) when it finishes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch


def wait_for(path: Path, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"worker: {path} did not appear within {seconds} s")
        time.sleep(0.02)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def main(spec: dict) -> None:
    from pipeline.lowcomm.rounds import ManagerComm, start_replica, tensor_sha256, wait_lighthouse
    from pipeline.lowcomm.loop import make_strategy
    from tests.test_lowcomm import batch_of, dist_cfg, mse, tiny_model, val_loss

    torch.set_num_threads(1)
    out = Path(spec["out"])
    cfg = dist_cfg("diloco", inner_steps=spec["inner_steps"], outer_lr=0.7, outer_momentum=0.6,
                   compression={"kind": spec.get("compression", "none")})
    model = tiny_model()
    if spec.get("width"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, spec["width"]), torch.nn.Tanh(),
                                    torch.nn.Linear(spec["width"], 4))
    start_val = val_loss(model)

    # the comm needs the manager and the manager needs the state callbacks: build in that order
    comm = ManagerComm(None, None)
    strategy = make_strategy(cfg, comm)
    opt = strategy.build_optimizer(list(model.parameters()),
                                   lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.0))
    strategy.setup(model)
    if spec.get("start_after"):
        wait_for(out / spec["start_after"])

    waits: dict[int, list] = {}
    for r, *what in spec.get("wait_for", []):
        waits.setdefault(int(r), []).append(what)

    def on_round(r: int) -> None:
        (out / f"at_{spec['tag']}_{r}").touch()
        for what in waits.pop(r, []):
            if len(what) == 1:
                wait_for(out / what[0])
            else:
                wait_lighthouse(spec["lighthouse"], what[0], int(what[1]))

    def on_step(step: int, loss: float) -> None:
        if spec.get("kill_at_step") is not None and step == spec["kill_at_step"]:
            os.kill(os.getpid(), signal.SIGKILL)

    log, replica = start_replica(f"replica{spec['replica']}", spec["lighthouse"], model, strategy, opt, comm,
                                 batch_of, mse, spec["rounds"], timeout_seconds=10,
                                 quorum_timeout_seconds=60, on_round=on_round, on_step=on_step)
    healed = replica.healed[0] if replica.healed else None
    result = {
        "log": [{k: v for k, v in e.items()} for e in log],
        "global": strategy.state["fragments"][0]["global"].clone(),
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "start_val": start_val, "end_val": val_loss(model),
        "bytes_sent": comm.bytes_sent, "failed_collectives": comm.failed_collectives,
        "healed_global_sha256": None if healed is None else
        tensor_sha256(healed["strategy"]["fragments"][0]["global"]),
        "healed_syncs": None if healed is None else healed["strategy"]["syncs"],
        "state_bytes": sum(t.numel() * t.element_size() for t in _tensors(replica.state_dict())),
    }
    tmp = out / f"{spec['tag']}.pt.tmp"
    torch.save(result, tmp)
    os.replace(tmp, out / f"{spec['tag']}.pt")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
