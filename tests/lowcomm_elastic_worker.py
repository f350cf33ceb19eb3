"""A 2-worker DiLoCo run under torchrun, checkpointing at every outer sync (see test_lowcomm_elastic).

    torchrun --nproc-per-node 2 --max-restarts 1 tests/lowcomm_elastic_worker.py OUT_DIR [KILL_AT_STEP]

With KILL_AT_STEP, rank 1 SIGKILLs itself at that step on the first attempt only; torchrun then
restarts both workers, which resume from the newest sync every worker has written.
"""

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.comm import Comm, init_process_group  # noqa: E402
from pipeline.lowcomm.elastic import SyncCheckpointer  # noqa: E402
from pipeline.lowcomm.loop import make_strategy, train_steps  # noqa: E402
from tests.test_lowcomm import batch_of, dist_cfg, mse, tiny_model  # noqa: E402

STEPS = 24


def main(out: Path, kill_at: int | None) -> None:
    torch.set_num_threads(1)
    init_process_group("gloo")
    comm = Comm()
    cfg = dist_cfg("diloco", inner_steps=4, compression={"kind": "int4", "block_size": 32})
    model = tiny_model()
    strategy = make_strategy(cfg, comm)
    opt = strategy.build_optimizer(list(model.parameters()), lambda p: torch.optim.AdamW(p, lr=0.01))
    ckpt = SyncCheckpointer(out / "sync", comm, model, opt)
    start = ckpt.restore(strategy)
    strategy.setup(model)
    strategy.on_sync = ckpt
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def maybe_die(step, _loss):
        if kill_at is not None and first_attempt and comm.rank == 1 and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    train_steps(model, strategy, opt, batch_of, mse, start, STEPS, on_step=maybe_die)
    torch.save({"weights": model.state_dict(), "start": start}, out / f"final_rank{comm.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
