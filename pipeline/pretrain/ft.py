"""`pretrain.distributed.engine: torchft`: fault-tolerant DiLoCo behind `omp pretrain`.

This module is the launcher and the Lighthouse. One replica group = one process
(`python -m pipeline.pretrain.worker --replica-id I`) running the trainer's one loop with the torchft
engine (pipeline/pretrain/engines.py TorchftEngine: the recipe's AdamW, schedule, clipping and DiLoCo
strategy, collectives on a torchft Manager; rounds, quorum, heal and rollback from
pipeline.lowcomm.rounds.Rounds; data rule: participating rank r of W trains on rows
[r*B/W, (r+1)*B/W) of every global batch). It writes history, ladder rungs and checkpoints as every
engine does.

    omp pretrain                       one host: starts a torchft Lighthouse in this process, then
                                       world_size replica processes, and supervises them: one that
                                       dies is restarted (torchft.max_restarts each) and heals from
                                       a live peer (or, when none heartbeats, resumes from the
                                       latest checkpoint)
    omp lighthouse --port P            several hosts: the Lighthouse, once
    omp pretrain --lighthouse URL --replica-ids 2,3     on each host: its share of the replicas

Checkpoints: after every committed round the replica at participating rank 0 (replica 0 while it
is alive) writes artifacts/pretrain/checkpoints/step-N (its weights, inner optimizer, scheduler,
DiLoCo state, the byte ledger, the history), the ladder rungs that fell in the round (a rolled-back
round's are removed) and, at the end, the stage's outputs.
Control files (the Lighthouse address, replica pids, each replica's round log) live in
checkpoints/torchft/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


from pipeline.core import numerics
from pipeline.core.config import Recipe, recipe_dict, recipe_path
from pipeline.core.errors import PipelineError, RecipeError
from pipeline.core.io import read_json, write_json
from pipeline.lowcomm.lighthouse import lighthouse_status

CONTROL = "torchft"            # under checkpoints/


def control_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints" / CONTROL


# --------------------------------------------------------------------------- the Lighthouse


def start_lighthouse(bind: str, min_replicas: int, join_timeout_ms: int, heartbeat_timeout_ms: int):
    from torchft._torchft import LighthouseServer  # torchft loads only where a Lighthouse runs

    return LighthouseServer(bind=bind, min_replicas=min_replicas, join_timeout_ms=join_timeout_ms,
                            quorum_tick_ms=50, heartbeat_timeout_ms=heartbeat_timeout_ms)


def serve_lighthouse(port: int, min_replicas: int, join_timeout_ms: int, heartbeat_timeout_ms: int,
                     address_file: Path | None = None) -> None:
    """`omp lighthouse`: serve until SIGTERM / SIGINT; prints (and writes) the address replicas use."""
    server = start_lighthouse(f"[::]:{port}", min_replicas, join_timeout_ms, heartbeat_timeout_ms)
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        address = server.address()
        if address_file is not None:
            write_json(Path(address_file), {"address": address})
        print(f"torchft lighthouse at {address} (min_replicas {min_replicas}); "
              f"replicas: omp pretrain --lighthouse {address} --replica-ids ...", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.shutdown()


# --------------------------------------------------------------------------- the launcher


def check_layout(recipe: Recipe, replica_ids: list[int]) -> None:
    d = recipe.pretrain.distributed
    where = recipe_path(recipe)
    bad = [i for i in replica_ids if not 0 <= i < d.world_size]
    if bad or not replica_ids:
        raise PipelineError(f"--replica-ids {replica_ids}: each must be in 0..{d.world_size - 1} "
                            f"(pretrain.distributed.world_size {d.world_size} of {where})")
    b = recipe.blend.global_batch_size
    uneven = [w for w in range(1, d.world_size + 1) if b % w]
    if uneven:
        raise RecipeError(where, "blend.global_batch_size",
                          f"{b} rows do not split over {uneven[0]} replicas; engine torchft needs a global "
                          f"batch that splits over every replica count 1..{d.world_size}")


def launch(recipe: Recipe, out_dir: Path, resume: str, dirs, replica_ids: list[int] | None = None,
           lighthouse: str | None = None) -> dict:
    """Start (and supervise) this host's replica processes; returns metrics.json when replica 0's
    outputs are here, else a summary."""
    d = recipe.pretrain.distributed
    ft = d.torchft
    ids = list(range(d.world_size)) if replica_ids is None else list(replica_ids)
    check_layout(recipe, ids)
    out_dir = Path(out_dir)
    ctl = control_dir(out_dir)
    ctl.mkdir(parents=True, exist_ok=True)
    (out_dir / ".exit.json").unlink(missing_ok=True)
    address = lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE") or ft.lighthouse
    if address is None and 0 not in ids:
        raise PipelineError(f"--replica-ids {','.join(map(str, ids))} joins a job whose replica 0 runs elsewhere: "
                            "name its Lighthouse (--lighthouse http://HOST:PORT or TORCHFT_LIGHTHOUSE)")
    # torchft logs every quorum tick at info level; keep warnings and errors (RUST_LOG=info: all of it)
    os.environ.setdefault("RUST_LOG", "warn")
    server = None
    if address is None:
        server = start_lighthouse("[::]:0", ft.min_replicas, ft.join_timeout_ms, ft.heartbeat_timeout_ms)
        address = server.address()
    write_json(ctl / "lighthouse.json", {"address": address})
    spec = ctl / f"recipe-{os.getpid()}.json"
    write_json(spec, {"path": recipe_path(recipe), "recipe": recipe_dict(recipe)})
    env = numerics.child_env(numerics.threads_for(recipe, "pretrain"))

    def start(i: int, how: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pipeline.pretrain.worker", "--spec", str(spec), "--out", str(out_dir),
               "--resume", how, "--blend-dir", str(dirs.blend), "--tokenize-dir", str(dirs.tokenize),
               "--tokenizer-dir", str(dirs.tokenizer), "--replica-id", str(i), "--lighthouse", address]
        p = subprocess.Popen(cmd, env=env)
        write_json(ctl / f"replica{i}.pid.json", {"pid": p.pid})
        return p

    procs = {i: start(i, resume) for i in ids}
    restarts = {i: 0 for i in ids}
    stopping = {"signum": 0}

    def forward(signum, _frame):
        stopping["signum"] = signum
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failure = None
    try:
        while not all(p.poll() == 0 for p in procs.values()):
            for i, p in list(procs.items()):
                rc = p.poll()
                if rc in (None, 0):
                    continue
                if rc == 2 or stopping["signum"] or restarts[i] >= ft.max_restarts:
                    failure = failure or (i, rc)
                    continue
                # died (a signal, a crash): heal from a live peer, or resume from the latest checkpoint
                try:
                    alive = lighthouse_status(address)["heartbeating"] > 0
                except OSError:
                    alive = False
                restarts[i] += 1
                print(f"torchft replica {i} exited with status {rc}; restart {restarts[i]} of "
                      f"{ft.max_restarts} ({'heals from a live peer' if alive else 'resumes from the latest checkpoint'})",
                      file=sys.stderr, flush=True)
                procs[i] = start(i, "join" if alive else "latest-or-none")
            if failure is not None:
                for p in procs.values():
                    if p.poll() is None:
                        p.terminate()
                for p in procs.values():
                    p.wait()
                break
            time.sleep(0.05)   # supervision poll (not an ordering: children are watched, never waited for by time)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if server is not None:
            server.shutdown()
        spec.unlink(missing_ok=True)
    write_json(ctl / f"launcher-{'-'.join(map(str, ids))}.json", {"replicas": ids, "restarts": restarts})
    if failure is not None:
        reason = out_dir / ".exit.json"
        i, rc = failure
        msg = read_json(reason)["message"] if reason.is_file() else f"torchft replica {i} exited with status {rc}"
        raise PipelineError(msg)
    if 0 in ids and (out_dir / "metrics.json").is_file():
        return read_json(out_dir / "metrics.json")
    return {"message": f"torchft replicas {ids} finished; the outputs are written by replica 0's host"}
