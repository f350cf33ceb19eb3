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

from pipeline.core.errors import CheckpointError, DataIntegrityError
from pipeline.core.io import _fsync_dir, read_json, sha256_file, write_json

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
    except (ValueError, KeyError, TypeError, DataIntegrityError) as e:
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


ACCEPT = "!"  # `--resume latest!` (what `omp pretrain --accept-mismatch` passes): resume despite a mismatch


def accepts_mismatch(spec: str) -> bool:
    return spec.endswith(ACCEPT)


def resolve(spec: str, root: Path, warn=print) -> Path | None:
    """`--resume` value → checkpoint dir: none | latest | latest-valid | a path (a trailing `!`:
    accept a recipe / data-order mismatch, see check_resume)."""
    spec = spec[:-1] if accepts_mismatch(spec) else spec
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


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    """Key paths where two recipe dicts differ (e.g. pretrain.lr)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


RESUME_KEYS = ("recipe_sha256", "indices_sha256")


def check_resume(path: Path, run: dict, accept: bool = False) -> dict | None:
    """A checkpoint resumes only the run that made it: its recipe_sha256 and indices_sha256 must equal
    this run's (`run`), or CheckpointError names what differs (and the recipe keys, where both
    recipes are recorded). With `accept`, the mismatch is returned, to be recorded in the lineage."""
    lineage = read_json(Path(path) / MANIFEST).get("lineage") or {}
    differs = [k for k in RESUME_KEYS if lineage.get(k) != run.get(k)]
    if not differs:
        return None
    keys = _diff_keys(lineage["recipe"], run["recipe"]) if isinstance(lineage.get("recipe"), dict) and \
        isinstance(run.get("recipe"), dict) else []
    detail = "; ".join(f"{k} {str(lineage.get(k))[:12]}… (this run {str(run.get(k))[:12]}…)" for k in differs)
    if keys:
        detail += f"; recipe keys that differ: {', '.join(keys[:12])}"
    if not accept:
        raise CheckpointError(f"{path}: made by another run: {detail}. Refusing to resume (weights would not "
                              "match what the lineage records); --accept-mismatch resumes anyway and records both")
    return {"checkpoint": str(path), "differs": differs, "recipe_keys": keys,
            "checkpoint_hashes": {k: lineage.get(k) for k in RESUME_KEYS},
            "run_hashes": {k: run.get(k) for k in RESUME_KEYS}}


class FreshStart:
    """A fresh run leaves the previous run's checkpoints in place until its own first checkpoint is
    committed (a run that fails at once destroys nothing); then they are removed."""

    def __init__(self, root: Path, fresh: bool):
        self.root = Path(root)
        self.stale = [p for _s, p in list_steps(root)] if fresh else []

    def own(self, steps: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
        """The checkpoints this run wrote (for messages such as 'last good checkpoint')."""
        return [(s, p) for s, p in steps if p not in self.stale]

    def committed(self, written: Path) -> None:
        for p in self.stale:
            if p != Path(written):
                shutil.rmtree(p, ignore_errors=True)
        self.stale = []
