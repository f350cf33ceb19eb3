"""What a torchft Lighthouse will decide next, read from its /status page (torchft's dashboard).

Plain HTTP, no torch: the launcher (`omp pretrain`, pipeline/pretrain/ft.py) polls it to choose how a
dead replica restarts, before any process of its own loads torch; tests order replicas by it.
"""

from __future__ import annotations

import re
import time
import urllib.request

_STATUS = re.compile(r"\[(\d+)/(\d+) participants healthy\]\[(\d+) heartbeating\]")


def lighthouse_status(address: str, timeout: float = 5.0) -> dict:
    """What the Lighthouse will decide next, read from its /status page (torchft's dashboard):
    participants_healthy (replicas asking for the next quorum, alive), participants (asking),
    heartbeating (alive), status (torchft's one-line reason)."""
    with urllib.request.urlopen(address.rstrip("/") + "/status", timeout=timeout) as f:
        page = f.read().decode("utf-8", "replace")
    line = next((ln for ln in page.splitlines() if "Next quorum status:" in ln), "")
    m = _STATUS.search(line)
    if m is None:
        raise RuntimeError(f"torchft lighthouse {address}: unrecognised /status page: {line or page[:200]!r}")
    return {"participants_healthy": int(m[1]), "participants": int(m[2]), "heartbeating": int(m[3]),
            "status": line.split("Next quorum status:", 1)[1].strip()}


def wait_lighthouse(address: str, key: str, at_least: int, seconds: float = 120.0) -> dict:
    """Block until lighthouse_status(address)[key] >= at_least (polling its state, not guessing by time)."""
    end = time.monotonic() + seconds
    while True:
        st = lighthouse_status(address)
        if st[key] >= at_least:
            return st
        if time.monotonic() > end:
            raise TimeoutError(f"torchft lighthouse {address}: {key} stayed below {at_least} for "
                               f"{seconds} s; last status: {st['status']}")
        time.sleep(0.02)
