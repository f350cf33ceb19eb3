"""What a worker failure and a live recovery cost with our DiLoCo on torchft (CPU, gloo).

    PYTHONPATH=. python bench/torchft_recovery.py [width ...]

Scenario per model width (the scenario of tests/test_lowcomm_torchft.py, 10 rounds of H=5):
two replicas train; replica 1 SIGKILLs itself inside round 2; replica 0 sees the collective fail,
rolls the round back and, once the lighthouse drops replica 1 (heartbeat timeout 1 s), redoes it
alone; replica 1 is restarted and heals from replica 0 at round 6; both finish together.
Prints, from replica 0's and the restarted replica's round logs: the state a joiner receives,
a normal round, the failed round, the re-quorum after the failure, and the joiner's heal.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tests.test_lowcomm_torchft import H, logs, start

ROUNDS, KILL_ROUND, JOIN_ROUND = 10, 2, 6


def scenario(lighthouse: str, out: Path, width: int) -> tuple[dict, dict]:
    def spec(tag, replica, **kw):
        return {"replica": replica, "lighthouse": lighthouse, "rounds": ROUNDS, "inner_steps": H,
                "out": str(out), "tag": tag, "width": width, **kw}

    # ordered as tests/test_lowcomm_torchft.py orders the kill test (Lighthouse state and files)
    r0 = start(spec("r0", 0, wait_for=[[0, "participants_healthy", 1], [JOIN_ROUND, "participants_healthy", 1]]))
    r1 = start(spec("r1", 1, kill_at_step=KILL_ROUND * H + 1, wait_for=[[0, "heartbeating", 2]]))
    r1.wait(timeout=300)
    r1b = start(spec("r1b", 1, start_after=f"at_r0_{JOIN_ROUND}"))
    for p in (r0, r1b):
        p.wait(timeout=300)
    if (r0.returncode, r1b.returncode) != (0, 0):
        raise RuntimeError(logs(out))
    load = lambda tag: torch.load(out / f"{tag}.pt", weights_only=True)  # noqa: E731
    return load("r0"), load("r1b")


def row(width: int, a: dict, b: dict) -> str:
    log = a["log"]
    failed = next(e for e in log if not e["committed"])
    after = log[log.index(failed) + 1]
    normal = [e["seconds"] for e in log
              if e["committed"] and e["world_size"] == 2 and e["round"] != JOIN_ROUND]
    heal = b["log"][0]
    n = a["global"].numel()
    attempts = len(log)
    return (f"| {n:,} | {a['state_bytes'] / 1e3:,.0f} | {statistics.median(normal):.3f} | "
            f"{failed['seconds']:.3f} | {after['quorum_seconds']:.2f} | {heal['quorum_seconds']:.2f} | "
            f"{attempts} / {sum(e['committed'] for e in log)} | {a['bytes_sent'] / 1e3:,.0f} |")


def main() -> None:
    from torchft._torchft import LighthouseServer

    widths = [int(w) for w in sys.argv[1:]] or [32, 4096, 65536]
    print("| params | state a joiner fetches (kB) | normal round (s) | failed round (s) | "
          "re-quorum after failure (s) | joiner's first quorum incl. heal (s) | rounds tried / committed | "
          "replica 0 sent (kB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for width in widths:
        server = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=2000, quorum_tick_ms=50,
                                  heartbeat_timeout_ms=1000)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                a, b = scenario(server.address(), Path(tmp), width)
        finally:
            server.shutdown()
        print(row(width, a, b), flush=True)
    print(f"(H={H}, {ROUNDS} rounds, 2 replicas, fp32 pseudo-gradients; the joiner's first quorum "
          "includes a 1 s line-up wait of the test harness; re-quorum waits for the lighthouse "
          "heartbeat timeout of 1 s)")


if __name__ == "__main__":
    sys.exit(main())
