"""`pretrain.distributed.engine: torchft`: fault-tolerant DiLoCo behind `omp pretrain`.

One replica group = one process (`python -m pipeline.pretrain.worker --replica-id I`), running the
trainer's own pieces (PublishedOrder, build_model, PlainEngine: the recipe's AdamW, schedule,
clipping and the DiLoCo strategy) with its collectives on a torchft Manager (ManagerComm). The
rounds, quorum, heal and rollback are pipeline.lowcomm.ft.run_rounds; see its docstring for the
data rule (participating rank r of W trains on rows [r*B/W, (r+1)*B/W) of every global batch).

    omp pretrain                       one host: starts a torchft Lighthouse in this process, then
                                       world_size replica processes, and supervises them: one that
                                       dies is restarted (torchft.max_restarts each) and heals from
                                       a live peer (or, when none heartbeats, resumes from the
                                       latest checkpoint)
    omp lighthouse --port P            several hosts: the Lighthouse, once
    omp pretrain --lighthouse URL --replica-ids 2,3     on each host: its share of the replicas

Checkpoints: after every committed round the replica at participating rank 0 (replica 0 while it
is alive) writes artifacts/pretrain/checkpoints/step-N (its weights, inner optimizer, scheduler,
DiLoCo state, the byte ledger, the history, the round log) and, at the end, the stage's outputs.
Control files (the Lighthouse address, replica pids, each replica's round log) live in
checkpoints/torchft/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from pipeline.core import numerics
from pipeline.core.config import Recipe, recipe_dict, recipe_path
from pipeline.core.errors import PipelineError, RecipeError
from pipeline.core.io import read_json, write_json

CONTROL = "torchft"            # under checkpoints/


def control_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints" / CONTROL


# --------------------------------------------------------------------------- the Lighthouse


def start_lighthouse(bind: str, min_replicas: int, join_timeout_ms: int, heartbeat_timeout_ms: int):
    from torchft._torchft import LighthouseServer

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
    from pipeline.lowcomm.ft import lighthouse_status

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


# --------------------------------------------------------------------------- one replica


class _History:
    """The metric history travels with a heal (a joiner may later write checkpoints and outputs)."""

    def __init__(self, history: list):
        self.history = history

    def state_dict(self) -> dict:
        return {"json": json.dumps(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history[:] = json.loads(state["json"])


def _wait_hooks(out_dir: Path, replica_id: int, address: str):
    """OMP_FT_WAIT='[[round, key, n], ...]' (tests, operations): before asking for the quorum of that
    round, touch checkpoints/torchft/waiting-replicaI-roundR and wait until the Lighthouse's
    `key` (lighthouse_status: participants_healthy, heartbeating) reaches n."""
    from pipeline.lowcomm.ft import wait_lighthouse

    waits: dict[int, list] = {}
    for r, key, n in json.loads(os.environ.get("OMP_FT_WAIT", "[]")):
        waits.setdefault(int(r), []).append((key, int(n)))

    def on_round(r: int) -> None:
        for key, n in waits.pop(r, []):
            (control_dir(out_dir) / f"waiting-replica{replica_id}-round{r}").touch()
            wait_lighthouse(address, key, n)
    return on_round


def train_replica(recipe: Recipe, out_dir: Path, resume: str, dirs, replica_id: int, address: str) -> dict:
    from pipeline.core import checkpoint as ckpt
    from pipeline.core.provenance import environment, git_commit
    from pipeline.lowcomm.ft import ManagerComm, ReplicaState, make_manager, round_of, rounds_in, run_rounds
    from pipeline.core.config import recipe_sha256
    from pipeline.core.order import PublishedOrder
    from pipeline.core.model import build_model, count_params, special_ids, vocab_size
    from pipeline.pretrain.engines import PlainEngine
    from pipeline.pretrain.trainer import (Context, evaluate, load_checkpoint, save_checkpoint,
                                           seed_worker, set_determinism, val_windows)

    cfg = recipe.pretrain
    d = cfg.distributed
    where = recipe_path(recipe)
    ctx = Context()
    if torch.cuda.is_available():   # replicas of one host spread over its GPUs
        ctx.device = torch.device("cuda", replica_id % torch.cuda.device_count())
        torch.cuda.set_device(ctx.device)
    ctx.autocast = ctx.device.type == "cuda" and cfg.precision != "fp32" or cfg.precision == "bf16"
    set_determinism(numerics.threads_for(recipe, "pretrain"), ctx.device)
    order = PublishedOrder(dirs.blend, dirs.tokenize)
    total = cfg.steps or order.steps
    try:
        rounds = rounds_in(d.diloco, total)
    except ValueError as e:
        raise RecipeError(where, "pretrain.distributed.diloco.inner_steps", f"engine torchft: {e}") from None

    model = build_model(cfg.model, vocab_size(dirs.tokenizer), order.seq_len, special_ids(dirs.tokenizer),
                        seed=recipe.seed)
    comm = ManagerComm(None, None)
    engine = PlainEngine(recipe, model, ctx, total, comm=comm)
    engine.name = "torchft"
    seed_worker(recipe.seed, 0)

    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    spec = resume
    if resume == "latest-or-none":
        spec = "latest" if ckpt.list_steps(root) else "none"
    joining = resume in ("join", "latest-or-none")
    path = None if spec == "join" else ckpt.resolve(spec, root)
    # only replica 0, started fresh, clears an older run's checkpoints (a joiner never does)
    fresh = ckpt.FreshStart(root, fresh=path is None and not joining and replica_id == 0)
    run_hashes = {"recipe_sha256": recipe_sha256(recipe), "indices_sha256": order.meta["indices_sha256"],
                  "recipe": recipe_dict(recipe)}
    mismatch = ckpt.check_resume(path, run_hashes, ckpt.accepts_mismatch(resume)) if path is not None else None
    start, history, parent = 0, [], None
    if path is not None:
        start, history, _ = load_checkpoint(path, engine, ctx)
        parent = path.name
    engine.setup()
    lineage = {"git": git_commit(), **run_hashes, "world_size": d.world_size, "mode": "diloco",
               "numerics": numerics.in_force(), "environment": environment(),
               "engine": "torchft"}
    if mismatch:
        lineage["resume_mismatch"] = mismatch
    windows = val_windows(order, order.seq_len, cfg.eval_tokens)
    if start == 0 and not joining:
        history.append({"step": 0, "val": evaluate(model, windows, ctx)})

    replica = ReplicaState(model, engine.optimizer, engine.strategy,
                           extra={"scheduler": engine.scheduler, "history": _History(history)})
    round_log: list[dict] = []

    def train_round(a: int, b: int, hook) -> None:
        for step in range(a, b):
            x = torch.from_numpy(engine.shard(order.batch(step))).to(ctx.device)
            loss = engine.forward_backward(x)
            engine.update(step)
            hook(step, float(loss))

    def on_commit(entry: dict) -> None:
        nonlocal parent
        round_log.append(entry)
        done = entry["steps"][1]
        if comm.rank != 0:        # one writer per round: the participating rank 0
            return
        rec = {"step": done, "loss": entry["loss"], "lr": engine.lr, "round": entry["round"],
               "replicas": entry["world_size"]}
        if done % cfg.eval_every_steps == 0 or done == total:
            rec["val"] = evaluate(model, windows, ctx)
        history.append(rec)
        save_checkpoint(root, done, engine, history, ctx, {**lineage, "parent": parent})
        parent = f"step-{done:07d}"
        fresh.committed(ckpt.step_dir(root, done))
        ckpt.prune(root, cfg.keep_last)

    ft = d.torchft
    replica_name = f"replica{replica_id}"
    # set-up is done: only now the Manager (it heartbeats from creation; see pipeline/lowcomm/ft.py)
    manager, pg, store = make_manager(replica_name, address, replica, min_replicas=ft.min_replicas,
                                      timeout_seconds=ft.timeout_seconds,
                                      quorum_timeout_seconds=ft.quorum_timeout_seconds)
    comm.manager, comm.pg = manager, pg
    if start:
        manager.load_state_dict({"step": round_of(d.diloco, start), "batches_committed": 0})
    try:
        log = run_rounds(model, engine.strategy, engine.optimizer, replica, manager, comm, None, None, rounds,
                         on_round=_wait_hooks(out_dir, replica_id, address), train_round=train_round,
                         on_commit=on_commit)
    finally:
        manager.shutdown(wait=False)
        del store
    attempts = [{k: v for k, v in e.items() if k != "quorum_seconds" and k != "seconds"} for e in log]
    write_json(control_dir(out_dir) / f"{replica_name}-{os.getpid()}.log.json",
               {"replica": replica_id, "resume": resume, "healed": len(replica.healed), "attempts": attempts,
                "bytes_sent": comm.bytes_sent, "ledger": comm.ledger()})
    last = log[-1] if log else None
    if last is None or last["rank"] != 0:
        return {}
    # the participating rank 0 of the last round writes the stage's outputs
    from pipeline.pretrain import outputs

    tokens_per_step = order.batch_size * order.seq_len
    metrics = {
        "steps": total, "tokens": total * tokens_per_step, "params": count_params(model),
        "warmup_steps": 0, "world_size": d.world_size, "mode": "diloco", "engine": "torchft",
        "bytes_sent_per_worker": comm.bytes_sent, "comm": comm.stats(), "byte_ledger": comm.ledger(),
        "torchft": {"replica": replica_id, "rounds": rounds, "healed": len(replica.healed),
                    "attempts": [{k: e[k] for k in ("round", "world_size", "rank", "committed", "healed", "steps")}
                                 for e in log]},
    }
    out = outputs.write(recipe, out_dir, model, history, metrics, dirs, lineage, parent, [])
    # wall-clock figures apart from the stage output (as the trainer's): artifacts/timings/pretrain.json
    timings = {"tokens_per_s": None, "train_seconds": sum(e["seconds"] for e in log), "warmup_seconds": 0.0}
    write_json(out_dir.parent / "timings" / "pretrain.json", timings)
    return {**out, **timings}
