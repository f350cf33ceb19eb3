"""Fault tolerance (torchrun --max-restarts path): a worker killed with SIGKILL mid-run, the group
restarted from the last outer sync, ends with weights bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "lowcomm_elastic_worker.py"


def torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", str(WORKER), str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.e2e
def test_killed_worker_restarts_from_last_sync_bitwise(tmp_path):
    clean = torchrun(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed = torchrun(tmp_path / "killed", "10")     # rank 1 dies at step 10 (last sync: step 8)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "Signals.SIGKILL" in killed.stderr or "SIGKILL" in killed.stderr or "-9" in killed.stderr
    for r in range(2):
        a = torch.load(tmp_path / "clean" / f"final_rank{r}.pt", weights_only=True)
        b = torch.load(tmp_path / "killed" / f"final_rank{r}.pt", weights_only=True)
        assert a["start"] == 0 and b["start"] == 8        # the restart resumed from the sync at step 8
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), (r, k)
