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

from pipeline.core import numerics
from pipeline.core.config import Recipe, recipe_dict, recipe_path
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_json, write_json
from pipeline.core.paths import OUT as STAGE_OUT
from pipeline.pretrain import ft
from pipeline.core.paths import DataDirs

OUT = STAGE_OUT["pretrain"]
EXIT_FILE = ".exit.json"  # rank 0's reason for a non-zero exit, read back by the launcher


def run(recipe: Recipe, out_dir: Path = OUT, resume: str = "none", dirs=None, node_rank: int | None = None,
        replica_ids: list[int] | None = None, lighthouse: str | None = None, stop_at: int | None = None) -> dict:
    dirs = dirs or DataDirs()
    d = recipe.pretrain.distributed
    if d.engine == "torchft":
        return ft.launch(recipe, Path(out_dir), resume, dirs, replica_ids, lighthouse)
    if d.world_size == 1 and d.engine == "torchrun":
        # torch loads here, not at the top: the launcher and the workers' entry point import this
        # module before the numerics profile is in force (it must be set before torch loads)
        from pipeline.pretrain.trainer import train

        return train(recipe, Path(out_dir), resume, dirs, stop_at=stop_at)
    return launch_workers(recipe, Path(out_dir), resume, dirs, node_rank, stop_at)


def worker_args(spec: Path, out_dir: Path, resume: str, dirs, stop_at: int | None = None) -> list[str]:
    return ["--spec", str(spec), "--out", str(out_dir), "--resume", resume, "--blend-dir", str(dirs.blend),
            "--tokenize-dir", str(dirs.tokenize), "--tokenizer-dir", str(dirs.tokenizer),
            *(["--stop-at", str(stop_at)] if stop_at is not None else [])]


def launch_command(recipe: Recipe, spec: Path, out_dir: Path, resume: str, dirs,
                   node_rank: int | None = None, stop_at: int | None = None) -> list[str]:
    """The command line that starts this node's workers.

    One node: `torchrun --standalone --nproc_per_node=W`. Several (pretrain.distributed.nodes):
    `torchrun --nnodes=N --nproc_per_node=W/N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT
    --rdzv-id=ID` on every node (the same command everywhere; torchrun's c10d rendezvous assigns
    node ranks, or `node_rank` pins this one: `omp pretrain --node-rank`). Engine deepspeed with
    `nodes.hostfile`: DeepSpeed's own launcher, run once on the first host, which starts every
    host's workers over pdsh/ssh (`deepspeed --hostfile F --num_nodes N --num_gpus W/N`).
    """
    d = recipe.pretrain.distributed
    n = d.nodes
    per_node = n.world_size_per_node(d.world_size)
    target = ["-m", "pipeline.pretrain.worker", *worker_args(spec, out_dir, resume, dirs, stop_at)]
    if d.engine == "deepspeed" and n.hostfile is not None:
        return ["deepspeed", "--hostfile", n.hostfile, f"--num_nodes={n.nnodes}", f"--num_gpus={per_node}",
                "--master_port", str(n.master_port), "--no_local_rank", "--module", "pipeline.pretrain.worker",
                *worker_args(spec, out_dir, resume, dirs, stop_at)]
    run = [sys.executable, "-m", "torch.distributed.run"]
    if n.nnodes == 1:
        return [*run, "--standalone", f"--nproc_per_node={per_node}", *target]
    rank = [f"--node-rank={node_rank}"] if node_rank is not None else []
    return [*run, f"--nnodes={n.nnodes}", *rank, f"--nproc_per_node={per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={n.rdzv_endpoint}", f"--rdzv-id={n.rdzv_id}", *target]


def launch_workers(recipe: Recipe, out_dir: Path, resume: str, dirs, node_rank: int | None = None,
                   stop_at: int | None = None) -> dict:
    d = recipe.pretrain.distributed
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EXIT_FILE).unlink(missing_ok=True)
    spec = out_dir / ".recipe.json"
    write_json(spec, {"path": recipe_path(recipe), "recipe": recipe_dict(recipe)})
    cmd = launch_command(recipe, spec, out_dir, resume, dirs, node_rank, stop_at)
    env = numerics.child_env(numerics.threads_for(recipe, "pretrain"))
    if d.engine == "deepspeed":
        import torch  # torch's CUDA probe, in the launcher only (see run)

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
    if not (out_dir / "metrics.json").is_file():   # a node without global rank 0 writes no outputs
        return {"node_only": True}
    timings = out_dir.parent / "timings" / "pretrain.json"
    return {**read_json(out_dir / "metrics.json"),
            **{k: v for k, v in (read_json(timings) if timings.is_file() else {}).items() if k != "speeds"}}


def load_spec(path: Path) -> Recipe:
    data = json.loads(Path(path).read_text())
    recipe = Recipe.model_validate(data["recipe"])
    object.__setattr__(recipe, "_path", data["path"])
    return recipe
