"""Provenance: what produced an artifact. Written beside every stage output (provenance.json)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pipeline
from pipeline.config import Recipe, recipe_dict, recipe_path, recipe_sha256


def git_commit(cwd: str | Path = ".") -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = run("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return {"commit": None, "dirty": None}
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.stdout.strip(), "dirty": bool(status and status.stdout.strip())}


def provenance(stage: str, recipe: Recipe, inputs: dict[str, str] | None = None, **extra) -> dict:
    """The resolved recipe section, input hashes and code version of one stage output.

    No timestamps or host names: equal inputs give a byte-identical file.
    """
    sections = {"ingest": ["data"], "tokenizer": ["data", "tokenizer"], "tokenize": ["tokenize"],
                "blend": ["blend"]}.get(stage, [stage])
    full = recipe_dict(recipe)
    return {
        "stage": stage,
        "recipe_name": recipe.name,
        "recipe_file": recipe_path(recipe),
        "recipe_sha256": recipe_sha256(recipe),
        "config": {k: full[k] for k in sections if k in full},
        "seed": recipe.seed,
        "inputs": dict(sorted((inputs or {}).items())),
        "code": {"omp_version": pipeline.__version__, **git_commit()},
        "python": platform.python_version(),
        **extra,
    }
