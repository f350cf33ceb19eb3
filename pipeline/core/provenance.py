"""Provenance: what produced an artifact. Written beside every stage output (provenance.json)."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import yaml

import pipeline
from pipeline.core.config import (Recipe, config_sha256, manifest_lock_path, recipe_dict, recipe_path, recipe_sha256,
                                  recipe_subset)
from pipeline.core.io import read_json, sha256_file
from pipeline.core.numerics import in_force
from pipeline.core.paths import ARTIFACTS


# paths no stage reads (dvc.yaml lists what each one does): changes to them move neither the lineage's
# code commit nor its dirty flag
NOT_CHAIN = (":(top,exclude)dvc.lock", ":(top,glob,exclude)**/*.md", ":(top,exclude)tests",
             ":(top,exclude)bench", ":(top,exclude).ci", ":(top,exclude)LICENSE")


def git_commit(cwd: str | Path = ".") -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = run("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return {"commit": None, "dirty": None}
    # dvc.lock is the record DVC writes while the chain runs (lineage embeds its stage hashes), not
    # code: a commit that only refreshes it, and its rewrite during `dvc repro`, leave the code as it
    # was. Nor can prose, tests, benchmarks or CI change what a stage writes (NOT_CHAIN). So `commit` is
    # the last commit that changed anything else, and `dirty` ignores them; then `make repro` on a fresh
    # clone of a commit with a current dvc.lock rewrites that lock unchanged, also after a README fix.
    code = run("log", "-1", "--format=%H", "--", ":/", *NOT_CHAIN)
    status = run("status", "--porcelain", "--untracked-files=no", "--", ":/", *NOT_CHAIN)
    commit = code.stdout.strip() if code is not None and code.returncode == 0 and code.stdout.strip() else \
        head.stdout.strip()
    return {"commit": commit, "dirty": bool(status and status.stdout.strip())}


# The recipe keys each stage reads (a top-level key, or a dotted path into a section). A stage's
# provenance.json records and hashes only these, so editing another stage's section (say
# posttrain.lr) leaves the bytes of this stage's output, and its entry in dvc.lock, unchanged.
# dvc.yaml lists the same keys as each stage's params (tests/test_dvc_chain.py checks both agree),
# so DVC reruns a stage exactly when one of them changes. The release embeds the whole recipe in its
# lineage (recreate checks `recipe_sha256` against it), so its provenance covers the whole recipe.
STAGE_KEYS: dict[str, list[str]] = {
    "ingest": ["data"],
    "tokenizer": ["seed", "data.manifest", "tokenizer"],
    "tokenize": ["data.manifest", "tokenize"],
    "blend": ["seed", "data.manifest", "blend"],
    "pretrain": ["seed", "pretrain", "platform"],
    "posttrain": ["seed", "data.manifest", "tokenize.val_per_mille", "posttrain", "platform"],
    "quantize": ["name", "seed", "blend.seq_len", "quantize", "platform"],
    "evaluate": ["seed", "evaluate", "platform"],
}


def provenance(stage: str, recipe: Recipe, inputs: dict[str, str] | None = None, **extra) -> dict:
    """The recipe keys the stage reads (STAGE_KEYS) with their hash, input hashes and code version of
    one stage output.

    No timestamps, host names or git commit: equal inputs give a byte-identical file, so a commit
    that does not touch a stage's code leaves its DVC output hash (in dvc.lock) as it was. The
    commit is recorded once, in the release lineage (chain_lineage).
    """
    keys = STAGE_KEYS.get(stage)
    if keys is not None and "platform" in keys and "numerics" not in extra:
        # the stages that compute with torch record the numerics in force (pipeline/core/numerics.py):
        # machine-independent under portable, the CPU's own choices under native
        extra["numerics"] = in_force()
    scope = {"config_keys": keys, "config": recipe_subset(recipe, keys), "config_sha256": config_sha256(recipe, keys)} \
        if keys is not None else {"config_keys": None, "config": recipe_dict(recipe), "recipe_sha256": recipe_sha256(recipe)}
    return {
        "stage": stage,
        "recipe_file": recipe_path(recipe),
        **scope,
        "inputs": dict(sorted((inputs or {}).items())),
        "code": {"omp_version": pipeline.__version__},
        "python": platform.python_version(),
        **extra,
    }


LOCK_FILE = Path("requirements.lock")   # every Python package make setup installs, pinned with hashes
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s\\;]+)", re.M)


def locked_packages(lock: Path = LOCK_FILE) -> dict[str, str]:
    """name -> version pinned by the environment lock (empty when there is none)."""
    if not lock.is_file():
        return {}
    return {m.group(1).lower(): m.group(2) for m in _PIN.finditer(lock.read_text(encoding="utf-8"))}


def installed_versions(names) -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in sorted(names):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(lock: Path = LOCK_FILE) -> dict:
    """The lock's sha256 and the installed version of each package it pins (and torch): equal on
    every machine set up from the lock, so it can sit in the published lineage."""
    pins = locked_packages(lock)
    return {"lock_file": lock.as_posix(), "lock_sha256": sha256_file(lock) if lock.is_file() else None,
            "packages": installed_versions({*pins, "torch"})}


def _stage_numerics(artifacts: Path) -> dict:
    """The numerics each torch stage recorded in its provenance.json (pipeline/core/numerics.py)."""
    out = {}
    for stage in ("pretrain", "posttrain", "quantize", "evaluate"):
        p = Path(artifacts) / stage / "provenance.json"
        if p.is_file():
            out[stage] = read_json(p).get("numerics")
    return out


def _file_entry(path: Path) -> dict:
    return {"path": path.as_posix(), "sha256": sha256_file(path), "text": path.read_text(encoding="utf-8")}


def dvc_lock_stages(path: Path = Path("dvc.lock")) -> dict:
    """Stage → {cmd, deps, params, outs} with their hashes, from dvc.lock (empty if not run by DVC)."""
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {})


def _decontamination(artifacts: Path) -> dict:
    """tokenize.json's record of the eval files training was decontaminated against."""
    p = Path(artifacts) / "tokenize" / "tokenize.json"
    return (read_json(p).get("decontamination") if p.is_file() else None) or {"enabled": False}


def chain_lineage(recipe: Recipe, artifacts: Path = ARTIFACTS) -> dict:
    """The whole experiment chain of a run: code, recipe, data manifests and locks (text + sha256),
    dvc.lock stage hashes, the published order's hashes and every checkpoint's sha256 and parent.

    Holds no environment, host name or token: it is published as is.
    """
    manifest = Path(recipe.data.manifest)
    manifests = [_file_entry(manifest)]
    if manifest_lock_path(manifest).is_file():
        manifests.append(_file_entry(manifest_lock_path(manifest)))
    blend = read_json(artifacts / "blend" / "blend.json")
    checkpoints = []
    pre = artifacts / "pretrain" / "final" / "model.safetensors"
    pre_sha = sha256_file(pre) if pre.is_file() else None
    if pre_sha:
        pre_lin = artifacts / "pretrain" / "final" / "lineage.json"
        parent = read_json(pre_lin).get("parent_checkpoint") if pre_lin.is_file() else None
        metrics = artifacts / "pretrain" / "metrics.json"
        ledger = read_json(metrics).get("byte_ledger") if metrics.is_file() else None
        checkpoints.append({"stage": "pretrain", "name": "pretrain", "sha256": pre_sha, "parent": parent,
                            "byte_ledger": ledger})
    post = artifacts / "posttrain" / "final" / "model.safetensors"
    post_sha = sha256_file(post) if post.is_file() else None
    if post_sha:
        checkpoints.append({"stage": "posttrain", "name": "posttrain", "sha256": post_sha, "parent": pre_sha})
    qreport = artifacts / "quantize" / "report.json"
    if qreport.is_file():
        for v in read_json(qreport).get("variants", []):
            p = artifacts / "quantize" / v.get("path", v["name"])
            files = sorted(p.glob("*.safetensors")) if p.is_dir() else ([p] if p.is_file() else [])
            if files:
                checkpoints.append({"stage": "quantize", "name": v["name"], "format": v.get("format"),
                                    "sha256": sha256_file(files[0]), "file": files[0].name,
                                    "parent": post_sha or pre_sha})
    import torch   # its version only; the data stages import this module and must not load torch

    return {
        "format": 1,
        "name": recipe.release.name or recipe.name,
        "code": {"omp_version": pipeline.__version__, **git_commit()},
        "recipe": recipe_dict(recipe),
        "recipe_file": recipe_path(recipe),
        "recipe_sha256": recipe_sha256(recipe),
        "manifests": manifests,
        # every stage but the release itself (its own entry is the hash of a previous release)
        "dvc_lock": {k: v for k, v in dvc_lock_stages().items() if k != "release"},
        "data": {"indices_sha256": blend["indices_sha256"], "blend_json_sha256": sha256_file(artifacts / "blend" / "blend.json"),
                 "token_files": blend["token_files"], "tokenizer_sha256": blend["tokenizer_sha256"],
                 "seed": blend["seed"], "steps": blend["steps"],
                 # the eval items the training split was decontaminated against: training inputs too
                 "decontamination": _decontamination(artifacts)},
        "checkpoints": checkpoints,
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        # what decided the bits of each torch stage, and the locked environment (omp recreate compares
        # both with the running machine before any work); the CPU model is kept apart
        # (artifacts/timings/machine-<stage>.json): it would make two recreations' releases differ
        "numerics": _stage_numerics(artifacts),
        "environment": environment(),
    }
