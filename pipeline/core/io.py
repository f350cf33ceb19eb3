"""Hashing and atomic writes: the one place the pipeline writes files that later stages read.

Every artifact is written to a temporary sibling first and renamed into place, so an
interrupted stage never leaves a half-written file or directory where a reader would find it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.errors import DataIntegrityError

CHUNK_BYTES = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and fixed separators: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Pretty, key-sorted JSON written atomically (byte-identical for equal objects)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parsed JSON; a file that is not UTF-8 JSON is DataIntegrityError naming it (and the line)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataIntegrityError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataIntegrityError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def clean_leftovers(path: str | os.PathLike) -> None:
    """Temporary siblings (`.<name>.tmp-*`, `.<name>.old-*`) a killed run left beside `path`.

    Called at the start of the next write of `path` (which holds the stage lock): if the kill came
    between the two renames of the fallback swap, `path` is missing and the old folder is put back.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if not path.exists() and olds:
        os.replace(olds[-1], path)
        olds = olds[:-1]
    for p in [*olds, *path.parent.glob(f".{path.name}.tmp-*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _link_tree(src: Path, dst: Path) -> None:
    """`dst` gets the files of `src` as hard links (no copy; the files are immutable once written)."""
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(Path(root) / name, dst / rel / name)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Build a directory in a temporary sibling; on success it replaces `path` in one atomic swap.

    Every output of a stage is written there, so a kill never leaves a mix of two runs: readers see
    the old folder whole or the new one whole. `keep` names subfolders of the old `path` written
    during the run (pretrain's checkpoints/) that carry over (hard links) into the new one. On an
    exception the temporary directory is removed and whatever was at `path` before is untouched;
    after a kill, the next write of `path` removes what is left (clean_leftovers).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        for name in keep:
            if (path / name).is_dir() and not (tmp / name).exists():
                _link_tree(path / name, tmp / name)
        if path.exists() and _exchange(tmp, path):
            _fsync_dir(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        else:
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_tree(root: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under root, keyed by POSIX relative path, in sorted order."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out
