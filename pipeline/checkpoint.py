"""Checkpoint directories: written atomically, verified by a sha256 manifest, keep-last-K.

Layout of one checkpoint, `<root>/step-XXXXXXX/`:
    manifest.json          {"step", "files": {name: {"sha256", "bytes"}}, "lineage": {...}}
    model.safetensors      weights (rank 0; other ranks' replicas as model-rank<r>.safetensors when they differ)
    state-rank<r>.pt       optimizer, scheduler, strategy state, RNG states, data cursor of rank r

Every rank writes its files into one temporary sibling (`.step-XXXXXXX.tmp`); rank 0 then hashes
them into manifest.json (written last) and renames the directory into place. A directory without
a manifest, or whose files do not match it, is never loaded: `latest_valid` skips it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pipeline.errors import CheckpointError
from pipeline.io import _fsync_dir, read_json, sha256_file, write_json

NAME = re.compile(r"^step-(\d{7})$")
MANIFEST = "manifest.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def tmp_dir(root: Path, step: int) -> Path:
    return Path(root) / f".step-{step:07d}.tmp"


def begin(root: Path, step: int) -> Path:
    """Rank 0, before the other ranks write: a fresh, empty temporary directory for `step`."""
    tmp = tmp_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-write
    tmp.mkdir(parents=True)
    return tmp


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def commit(root: Path, step: int, lineage: dict) -> Path:
    """Rank 0, after every rank wrote its files: manifest, then one rename. Returns the final dir."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    files = {}
    for p in sorted(x for x in tmp.rglob("*") if x.is_file()):  # engines (DeepSpeed) write subdirectories
        fsync_file(p)
        files[p.relative_to(tmp).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    write_json(tmp / MANIFEST, {"step": step, "files": files, "lineage": lineage})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(Path(root))
    return final


def verify(path: Path) -> dict:
    """The manifest of checkpoint `path` if every file matches it; CheckpointError naming the file otherwise."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (checkpoint incomplete)")
    try:
        manifest = read_json(mpath)
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, manifest says {rec['bytes']} (truncated?)")
        got = sha256_file(f)
        if got != rec["sha256"]:
            raise CheckpointError(f"{f}: sha256 {got[:16]}… does not match {MANIFEST} ({rec['sha256'][:16]}…)")
    return manifest


def list_steps(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories under root, oldest first (temporary ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME.match(p.name)) and p.is_dir()]
    return sorted(out)


def latest(root: Path) -> Path:
    """The newest checkpoint, verified; its error if it is damaged (no silent fallback)."""
    steps = list_steps(root)
    if not steps:
        raise CheckpointError(f"{root}: no checkpoints to resume from")
    verify(steps[-1][1])
    return steps[-1][1]


def latest_valid(root: Path, warn=print) -> Path:
    """The newest checkpoint that verifies, skipping (and reporting) damaged newer ones."""
    steps = list_steps(root)
    for _step, path in reversed(steps):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"skipping damaged checkpoint: {e}")
    raise CheckpointError(f"{root}: no valid checkpoint to resume from ({len(steps)} found, all damaged)")


def resolve(spec: str, root: Path, warn=print) -> Path | None:
    """`--resume` value → checkpoint dir: none | latest | latest-valid | a path."""
    if spec in ("none", ""):
        return None
    if spec == "latest":
        return latest(root)
    if spec == "latest-valid":
        return latest_valid(root, warn)
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    verify(path)
    return path


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; returns what was removed."""
    steps = list_steps(root)
    gone = [p for _s, p in steps[:-keep_last]] if keep_last > 0 else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
