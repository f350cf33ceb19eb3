"""Restart from the last outer sync: the torchrun elastic (--max-restarts) fault-tolerance path.

At every outer sync each worker writes its state: the global state the sync agreed on (θ_global,
outer momentum, error-feedback residuals, step = data cursor, inside strategy.state_dict()) and its
own replica and inner optimizer. When a worker dies (kill -9), torchrun restarts the group; every
worker then loads the newest sync that *all* workers have written and trains on. Because the data
order and the RNG are deterministic, the final weights equal an uninterrupted run's bitwise.

Files: <dir>/rank<r>/step<NNNNNNNN>.pt, written atomically (temp + fsync + rename), loaded with
torch.load(weights_only=True); the last `keep` syncs are kept per rank.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from pipeline.core.comm import Comm
from pipeline.core.errors import CheckpointError
from pipeline.core.io import atomic_write_bytes


class SyncCheckpointer:
    def __init__(self, root: str | Path, comm: Comm, model: torch.nn.Module, optimizer, keep: int = 2):
        self.dir = Path(root) / f"rank{comm.rank}"
        self.comm, self.model, self.optimizer, self.keep = comm, model, optimizer, keep

    def __call__(self, strategy, step: int) -> None:
        """Use as `strategy.on_sync`: called after the outer sync that ended `step`."""
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "strategy": strategy.state_dict(), "step": step + 1}, buf)
        atomic_write_bytes(self.dir / f"step{step + 1:08d}.pt", buf.getvalue())
        for old in sorted(self.dir.glob("step*.pt"))[:-self.keep]:
            old.unlink(missing_ok=True)

    def _steps(self) -> list[int]:
        return sorted(int(p.stem[4:]) for p in self.dir.glob("step*.pt"))

    def restore(self, strategy) -> int:
        """Load the newest common sync into model, optimizer and strategy; returns the next step."""
        step = self._common_step()
        if step == 0:
            return 0
        path = self.dir / f"step{step:08d}.pt"
        try:
            state = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a checkpoint error
            raise CheckpointError(f"{path}: cannot be read ({e}); delete it to restart from the sync before") from None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        strategy.load_state_dict(state["strategy"])
        return int(state["step"])

    def _common_step(self) -> int:
        mine = self._steps()
        if not (self.comm.distributed and self.comm.world_size > 1):
            return mine[-1] if mine else 0
        # every worker's list of steps, padded to `keep` entries; choose the newest present on all
        t = torch.tensor((mine[-self.keep:] + [0] * self.keep)[:self.keep], dtype=torch.int64)
        lists = self.comm.all_gather(t, tag="control")
        common = set(lists[0].tolist())
        for other in lists[1:]:
            common &= set(other.tolist())
        return max(common | {0})
