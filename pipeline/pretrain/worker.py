"""One training process: a torchrun worker (`python -m torch.distributed.run ... -m pipeline.pretrain.worker
--spec ...`) or a torchft replica (`... --replica-id I --lighthouse URL`). Both run the trainer's one loop."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.core import numerics
from pipeline.core.errors import PipelineError
from pipeline.core.io import write_json
from pipeline.core.paths import DataDirs
from pipeline.pretrain.launch import EXIT_FILE, load_spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", default="none")
    p.add_argument("--blend-dir", default=str(DataDirs.blend))
    p.add_argument("--tokenize-dir", default=str(DataDirs.tokenize))
    p.add_argument("--tokenizer-dir", default=str(DataDirs.tokenizer))
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--replica-id", type=int, default=None, help="engine torchft: this replica group")
    p.add_argument("--lighthouse", default=None, help="engine torchft: the Lighthouse address")
    a = p.parse_args(argv)

    recipe = load_spec(Path(a.spec))
    try:   # the launcher gave this process the profile's environment: checked, threads set, before torch loads
        numerics.enter_recipe(recipe, "pretrain", where=f"{a.spec} (pretrain worker)")
    except PipelineError as e:
        if os.environ.get("RANK", "0") == "0":
            write_json(Path(a.out) / EXIT_FILE, {"message": str(e)})
        print(f"error: {e}", file=sys.stderr)
        return 2
    # torch (and so the trainer) loads only now, after the numerics profile is in force (core/numerics.py)
    import torch.distributed as dist

    from pipeline.pretrain.trainer import train  # torch: only after the profile is in force (above)

    dirs = DataDirs(Path(a.blend_dir), Path(a.tokenize_dir), Path(a.tokenizer_dir))
    replica = (a.replica_id, a.lighthouse) if a.replica_id is not None else None
    try:
        train(recipe, Path(a.out), a.resume, dirs, stop_at=a.stop_at, replica=replica)
    except PipelineError as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_json(Path(a.out) / EXIT_FILE, {"message": str(e)})
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
