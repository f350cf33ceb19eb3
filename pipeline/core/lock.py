"""One writer per stage output: a lock file beside the output folder.

`output_lock("artifacts/pretrain")` creates `artifacts/.pretrain.lock` with O_CREAT|O_EXCL (atomic on
local filesystems), holding {"pid", "host", "command"}. A second run refuses naming the holder's
pid. A lock whose process is gone (same host, pid not alive) is stale: it is taken over, so a run
killed with -9 never blocks the next one. The lock sits outside the folder it guards, so swapping
the folder in one rename (pipeline.core.io.atomic_dir) keeps it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import PipelineError


class LockedError(PipelineError):
    """Another live process holds the lock of this output."""


def lock_path(out_dir) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.lock")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def acquire(out_dir, command: str = "") -> Path:
    """Take the lock of `out_dir`; LockedError naming the holder if a live process has it."""
    path = lock_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv[:2])}
    # the content is complete before the lock is visible: write a private file, then link it into
    # place (link fails with EEXIST when the lock exists, atomically)
    tmp = path.with_name(f"{path.name}.{me['pid']}.tmp")
    tmp.write_text(json.dumps(me), encoding="utf-8")
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                pass
            held = _holder(path)
            if held and (held.get("host") != me["host"] or pid_alive(int(held.get("pid", -1)))):
                raise LockedError(f"{Path(out_dir)}: in use by pid {held.get('pid')} on {held.get('host')} "
                                  f"({held.get('command', '?')}); lock file {path}. Wait for it to finish, or "
                                  "remove the lock file if that process is gone")
            # stale (its process is gone, or unreadable): remove it only if it is still what we judged
            with contextlib.suppress(FileNotFoundError):
                if _holder(path) == held:
                    path.unlink()
    finally:
        tmp.unlink(missing_ok=True)
    raise LockedError(f"{Path(out_dir)}: could not take the lock {path} (contended)")


def release(path: Path) -> None:
    held = _holder(path)
    if held and held.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def output_lock(out_dir, command: str = "") -> Iterator[Path]:
    path = acquire(out_dir, command)
    try:
        yield path
    finally:
        release(path)
