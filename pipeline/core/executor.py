"""Where the data stages run their units of work: in this process, or as tasks on a Ray cluster.

A stage cuts its input into units whose boundaries depend only on the data (a fixed number of
documents, one hub shard), maps one pure function over them, and consumes the results in unit
order. The bytes it writes therefore do not depend on the executor or on the number of workers:
`local`, Ray with 1 worker and Ray with N workers give the same files (tests/test_data_executor.py).

`data.executor: ray` joins the cluster at `data.ray_address` or `$RAY_ADDRESS` (start one with
`ray start --head --num-cpus N` and, on the other machines, `ray start --address HEAD:6379`), or
else starts a local Ray for the run with `data.workers` CPUs and stops it afterwards. `pipeline`
must be importable on every node (install the project there); the stage's outputs are written by
the driver only, so only the machine running `omp` needs the artifacts folder.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pipeline
from pipeline.core import numerics
from pipeline.core.errors import PipelineError

# Units a stage keeps in flight per worker: enough to keep workers busy while the driver writes
# results in order, bounded so that results do not pile up in memory.
BACKLOG_PER_WORKER = 2


class LocalExecutor:
    """Runs every unit in this process, one after another (the tokenizers library still uses all cores)."""

    name = "local"
    workers = 1

    def map(self, fn: Callable, jobs: Iterable[tuple], **shared: Any) -> Iterator[Any]:
        for args in jobs:
            yield fn(*args, **shared)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RayExecutor:
    """Runs units as Ray tasks (1 CPU each), at most `workers` at once; results come back in unit order.

    If Ray is already initialized in this process (a test, a notebook) it is used as it is and left
    running; otherwise this joins `address` / $RAY_ADDRESS or starts a local Ray, and `close`
    disconnects (stopping the local Ray it started)."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None):
        import ray

        self._ray = ray
        self._owner = not ray.is_initialized()
        if self._owner:
            address = address or os.environ.get("RAY_ADDRESS") or None
            # the workers import the same `pipeline` as this driver, and use one thread each
            root = str(Path(pipeline.__file__).resolve().parents[1])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
            env = {"PYTHONPATH": path, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                   # the numerics profile of the driver (pipeline/core/numerics.py), for any torch a task loads
                   **{k: os.environ[k] for k in (*numerics.ISA_VARS, numerics.PROFILE_VAR) if k in os.environ}}
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "runtime_env": {"env_vars": env}}
            if address is None:
                kwargs["num_cpus"] = workers or os.cpu_count() or 1
            ray.init(address=address, **kwargs)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(cpus, 1)

    def map(self, fn: Callable, jobs: Iterable[tuple], **shared: Any) -> Iterator[Any]:
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=3)(fn)
        refs = {k: ray.put(v) for k, v in shared.items()}  # shipped once, not once per unit
        cap = BACKLOG_PER_WORKER * self.workers
        running: set = set()    # submitted, not finished
        order: deque = deque()  # submitted, not yet yielded, in unit order
        jobs = iter(jobs)
        exhausted = False
        while True:
            # keep `workers` tasks running and at most `cap` results unconsumed
            while not exhausted and len(running) < self.workers and len(order) < cap:
                args = next(jobs, None)
                if args is None:
                    exhausted = True
                    break
                ref = remote.remote(*args, **refs)
                running.add(ref)
                order.append(ref)
            if not order:
                return
            if order[0] in running:  # wait for any task, so a free slot is refilled at once
                ready, _ = ray.wait(list(running), num_returns=1)
                running.difference_update(ready)
                continue
            yield self._get(order.popleft())

    def _get(self, ref):
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, PipelineError):  # bad input: the same one-line error as local
                raise e.cause from None
            raise

    def close(self) -> None:
        if self._owner and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_executor(data_cfg) -> LocalExecutor | RayExecutor:
    """The executor a recipe's `data` section asks for."""
    if data_cfg.executor == "ray":
        return RayExecutor(data_cfg.workers, data_cfg.ray_address)
    return LocalExecutor()
