"""Verified reads and confined paths: the one place a recorded hash is checked and a path is admitted.

Every stage records the sha256 of each file it writes in its `provenance.json` (`outputs`,
relative POSIX path -> sha256; `seal` writes it as the last file of the stage). A later reader
calls `verify_stage(stage_dir)` (or `verified(stage_dir, rel)`) before it uses what it reads: a
file that is missing, added or changed is refused by name (`DataIntegrityError`, exit 2). Other
records (blend.json for the published order, a checkpoint's manifest, a release's lineage.json)
are checked through the same `verify_file` / `verify_tree`.

Paths that come from a recipe, a data manifest or a lineage go through `check_name`,
`check_relpath`, `check_hub_id` or `confine`: names are `[A-Za-z0-9._-]` (not starting with a
dot), relative paths are such names joined by `/`, hub ids are `org/name`, and a local path must
resolve inside the project (the current directory) unless it lies under a root the recipe or
manifest lists explicitly in `allow_paths`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from pipeline.core.errors import DataIntegrityError, PipelineError
from pipeline.core.io import read_json, sha256_file, write_json

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
PROVENANCE = "provenance.json"
NOT_SEALED = ("checkpoints/",)  # pretrain checkpoints carry their own manifests (pipeline.core.checkpoint)
# dot-files (temporaries, the launcher's .recipe.json / .exit.json) are never outputs and never read


class PathError(PipelineError):
    """A path or name from a recipe, manifest or lineage would leave its folder or is malformed."""


# --------------------------------------------------------------------------- names and paths


def check_name(value, what: str) -> str:
    """One path component: `[A-Za-z0-9._-]`, not starting with a dot, at most 128 characters."""
    if not isinstance(value, str) or not NAME.match(value) or len(value) > 128:
        raise PathError(f"{what}: {value!r} is not a plain name ([A-Za-z0-9._-], not starting with '.', "
                        "at most 128 characters)")
    return value


def check_relpath(value, what: str) -> str:
    """A relative POSIX path whose every component is a plain name (no '..', no absolute path)."""
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise PathError(f"{what}: {value!r} is not a relative path")
    for part in value.split("/"):
        if not NAME.match(part) or len(part) > 128:
            raise PathError(f"{what}: {value!r} is not a relative path of plain names "
                            "([A-Za-z0-9._-] per component; no '..', no absolute path)")
    return value


def check_hub_id(value, what: str) -> str:
    if not isinstance(value, str) or not HUB_ID.match(value) or len(value) > 200:
        raise PathError(f"{what}: {value!r} is not a hub id of the form org/name")
    return value


def inside(path: Path, root: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
        return True
    except ValueError:
        return False


def confine(path, what: str, allow: Iterable[str] = (), root: Path | None = None) -> Path:
    """`path` if it resolves (symlinks followed) inside `root` (default: the current directory, the
    project) or under one of the `allow` roots; PathError naming `what` otherwise."""
    if not isinstance(path, (str, os.PathLike)) or not str(path) or "\0" in str(path):
        raise PathError(f"{what}: {path!r} is not a path")
    root = Path(root or Path.cwd())
    p = Path(path)
    if inside(p, root) or any(inside(p, Path(a)) for a in allow):
        return p
    raise PathError(f"{what}: {path} is outside the project ({root}); list its folder in allow_paths "
                    "to read it on purpose")


# --------------------------------------------------------------------------- verified reads


def verify_file(path, sha256: str, what: str) -> Path:
    """`path` if its sha256 equals the one `what` recorded; DataIntegrityError naming both otherwise."""
    path = Path(path)
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise DataIntegrityError(f"{what}: no valid sha256 recorded for {path}")
    if path.is_symlink() or not path.is_file():
        raise DataIntegrityError(f"{path}: missing or not a plain file (recorded in {what})")
    got = sha256_file(path)
    if got != sha256:
        raise DataIntegrityError(f"{path}: sha256 {got[:16]}… does not match {what} ({sha256[:16]}…); "
                                 "the file was changed after it was written")
    return path


def tree_files(root: Path, skip: Iterable[str] = (), hidden: bool = False) -> list[str]:
    """Relative POSIX paths of the files (and symlinks) under root, minus `skip` (names, or folder
    prefixes ending in '/') and, unless `hidden`, dot-files and dot-folders."""
    skip = tuple(skip)
    out = []
    for dirpath, dirnames, files in os.walk(root):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = sorted(d for d in dirnames if (hidden or not d.startswith(".")) and d not in links)
        for f in sorted(files + links):
            if f.startswith(".") and not hidden:
                continue
            rel = Path(dirpath, f).relative_to(root).as_posix()
            if rel in skip or any(s.endswith("/") and rel.startswith(s) for s in skip):
                continue
            out.append(rel)
    return sorted(out)


def verify_tree(root, files: dict, what: str, skip: Iterable[str] = (), extra_ok: bool = False,
                hidden: bool = False) -> None:
    """Every file recorded in `files` (relative path -> sha256) is under `root` unchanged, and no other
    file is there (unless `extra_ok`). The first missing, changed or extra file is named."""
    root = Path(root)
    if not isinstance(files, dict):
        raise DataIntegrityError(f"{what}: no file list recorded")
    for rel in sorted(files):
        check_relpath(rel, f"{what}: file name")
        verify_file(root / rel, files[rel], what)
    if not extra_ok:
        extra = [r for r in tree_files(root, skip, hidden) if r not in files]
        if extra:
            raise DataIntegrityError(f"{root / extra[0]}: not recorded in {what} "
                                     f"({len(extra)} unrecorded file(s)); refusing a folder with added files")


def outputs_of(tmp: Path) -> dict[str, str]:
    """sha256 of every file a stage wrote under `tmp` (its provenance and checkpoints excepted)."""
    return {rel: sha256_file(Path(tmp) / rel) for rel in tree_files(tmp, (PROVENANCE, *NOT_SEALED))}


def seal(tmp: Path, prov: dict) -> dict:
    """Write `provenance.json` last, with the sha256 of every other output of the stage."""
    prov = {**prov, "outputs": outputs_of(tmp)}
    write_json(Path(tmp) / PROVENANCE, prov)
    return prov


def stage_record(stage_dir) -> dict:
    stage_dir = Path(stage_dir)
    p = stage_dir / PROVENANCE
    if not p.is_file():
        raise DataIntegrityError(f"{p}: not found; run the {stage_dir.name} stage first")
    rec = read_json(p)
    if not isinstance(rec, dict) or not isinstance(rec.get("outputs"), dict):
        raise DataIntegrityError(f"{p}: records no outputs (written by an older version?); rerun the "
                                 f"{stage_dir.name} stage")
    return rec


def verify_stage(stage_dir, under: str | None = None) -> dict:
    """Check every recorded output of a stage (or those under the folder `under`) before reading it;
    files added there are refused too. Returns the stage's provenance record."""
    stage_dir = Path(stage_dir)
    rec = stage_record(stage_dir)
    files = rec["outputs"]
    what = f"{stage_dir / PROVENANCE}"
    if under is None:
        verify_tree(stage_dir, files, what, skip=(PROVENANCE, *NOT_SEALED))
    else:
        prefix = under.rstrip("/") + "/"
        sub = {r[len(prefix):]: h for r, h in files.items() if r.startswith(prefix)}
        if not sub:
            raise DataIntegrityError(f"{stage_dir / under}: not recorded in {what}; rerun the {stage_dir.name} stage")
        verify_tree(stage_dir / under, sub, what)
    return rec


def verified(stage_dir, rel: str) -> Path:
    """One output of a stage, checked against the stage's record before it is read."""
    stage_dir = Path(stage_dir)
    rec = stage_record(stage_dir)
    if rel not in rec["outputs"]:
        raise DataIntegrityError(f"{stage_dir / rel}: not recorded in {stage_dir / PROVENANCE}")
    return verify_file(stage_dir / rel, rec["outputs"][rel], str(stage_dir / PROVENANCE))


def verify_model_dir(model_dir) -> Path:
    """A stage's model folder (e.g. artifacts/pretrain/final), checked against that stage's record."""
    model_dir = Path(model_dir)
    verify_stage(model_dir.parent, under=model_dir.name)
    return model_dir
