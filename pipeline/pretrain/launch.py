"""Start training the way the recipe says: in-process (world_size 1) or torchrun workers.

torchrun (`python -m torch.distributed.run --standalone`) does process launch and rendezvous;
engine `deepspeed` runs the same workers with DeepSpeed ZeRO inside (DS_ACCELERATOR=cpu on CPU).
The resolved recipe goes to the workers as JSON, so a recipe built with overrides in Python
(load_recipe(path, overrides=...)) trains exactly as given.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.config import Recipe, recipe_dict, recipe_path
from pipeline.errors import PipelineError
from pipeline.io import read_json, write_json

OUT = Path("artifacts/pretrain")
EXIT_FILE = ".exit.json"  # rank 0's reason for a non-zero exit, read back by the launcher


def run(recipe: Recipe, out_dir: Path = OUT, resume: str = "none", dirs=None, stop_at: int | None = None) -> dict:
    from pipeline.pretrain.trainer import DataDirs

    dirs = dirs or DataDirs()
    d = recipe.pretrain.distributed
    if d.world_size == 1 and d.engine == "torchrun":
        from pipeline.pretrain.trainer import train

        return train(recipe, Path(out_dir), resume, dirs, stop_at=stop_at)
    return launch_workers(recipe, Path(out_dir), resume, dirs, stop_at)


def worker_threads(recipe: Recipe) -> int:
    from pipeline.pretrain.trainer import cpu_cores

    return recipe.pretrain.threads or max(1, cpu_cores() // recipe.pretrain.distributed.world_size)


def launch_workers(recipe: Recipe, out_dir: Path, resume: str, dirs, stop_at: int | None = None) -> dict:
    d = recipe.pretrain.distributed
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EXIT_FILE).unlink(missing_ok=True)
    spec = out_dir / ".recipe.json"
    write_json(spec, {"path": recipe_path(recipe), "recipe": recipe_dict(recipe)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={d.world_size}",
           "-m", "pipeline.pretrain.worker", "--spec", str(spec), "--out", str(out_dir), "--resume", resume,
           "--blend-dir", str(dirs.blend), "--tokenize-dir", str(dirs.tokenize),
           "--tokenizer-dir", str(dirs.tokenizer), *(["--stop-at", str(stop_at)] if stop_at is not None else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(worker_threads(recipe))}
    if d.engine == "deepspeed":
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):  # torchrun passes it on to every worker, which checkpoints and exits
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc != 0:
        reason = out_dir / EXIT_FILE
        msg = read_json(reason)["message"] if reason.is_file() else f"torchrun exited with status {rc}"
        raise PipelineError(msg)
    if stop_at is not None and not (out_dir / "metrics.json").is_file():
        return {"stopped_at": stop_at}
    timings = out_dir.parent / "timings" / "pretrain.json"
    return {**read_json(out_dir / "metrics.json"),
            **{k: v for k, v in (read_json(timings) if timings.is_file() else {}).items() if k != "speeds"}}


def load_spec(path: Path) -> Recipe:
    data = json.loads(Path(path).read_text())
    recipe = Recipe.model_validate(data["recipe"])
    object.__setattr__(recipe, "_path", data["path"])
    return recipe
