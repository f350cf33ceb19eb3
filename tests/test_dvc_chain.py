"""End to end: DVC runs the data stages of the tiny recipe in a temporary copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core.io import read_json, sha256_file
from tests.conftest import REPO


def copy_repo(dest: Path) -> Path:
    """The repo's tracked and untracked-but-not-ignored files (what a clone would have, plus edits)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout


@pytest.mark.e2e
def test_dvc_repro_blend_on_a_fresh_clone_leaves_git_clean(tmp_path):
    """The committed dvc.lock is current: on a fresh clone, `dvc repro` rewrites it byte for byte, so
    `git status` stays clean and a release made by `make repro` records `dirty: false`.

    (This used to assert that the lock held only the data stages: it was written by a run of the
    data stages and then left stale as the code moved. The committed lock is the record of the
    whole chain; a change to a stage's code or parameters must come with the refreshed lock, and this
    test holds that for the data stages, which are cheap to run here.)"""
    from pipeline.core.provenance import git_commit

    repo = copy_repo(tmp_path / "repo")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "clone")
    committed = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([os.path.join(bindir, "dvc"), "repro", "blend"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    stale = [s for s in ("ingest", "tokenizer", "tokenize", "blend") if lock[s] != committed.get(s)]
    assert not stale, (f"the committed dvc.lock is stale for {stale}: run `make repro` (or `dvc repro blend`) "
                       "and commit dvc.lock")
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert git_commit(repo) == {"commit": git(repo, "rev-parse", "HEAD").strip(), "dirty": False}
    assert lock["blend"]["params"]["recipes/tiny.yaml"]["blend"]["seq_len"] == 256
    meta = read_json(repo / "artifacts/blend/blend.json")
    assert meta["indices_sha256"] == sha256_file(repo / "artifacts/blend/indices.npy")
    assert all(abs(s["realized_share"] - s["target_share"]) <= 0.01 for s in meta["sources"])
    assert np.load(repo / "artifacts/blend/indices.npy").shape == (meta["instances"], 2)
    # a second repro is a no-op: every stage is up to date
    again = subprocess.run([os.path.join(bindir, "dvc"), "repro", "blend"], cwd=repo, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0 and "Running stage" not in again.stdout
    status = subprocess.run([os.path.join(bindir, "dvc"), "status", "blend"], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert "up to date" in status.stdout.lower() or status.stdout.strip() == "", status.stdout
    # the stages after the data are too slow to run here; their lock entries must still match the code
    # and parameters of this tree: `dvc status` may only report what is missing because it was not run
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert sorted(committed) == sorted(stages), "dvc.lock must hold every stage of dvc.yaml: commit it after `make repro`"
    full = subprocess.run([os.path.join(bindir, "dvc"), "status", "--json"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-3000:]
    stale = {}
    for stage, changes in json.loads(full.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):          # "changed command", "always changed", ...
                stale.setdefault(stage, []).append(change)
                continue
            for kind, paths in change.items():
                for path, what in (paths.items() if isinstance(paths, dict) else []):
                    if not (what in ("deleted", "not in cache") and path.startswith("artifacts/")):
                        stale.setdefault(stage, []).append(f"{kind}: {path} {what}")
    assert not stale, f"the committed dvc.lock is stale (run `make repro` and commit dvc.lock): {stale}"


@pytest.mark.e2e
def test_dvc_push_pull_through_the_default_local_remote(tmp_path):
    """The default remote is a local directory, so `dvc push` / `dvc pull` work offline."""
    repo = copy_repo(tmp_path / "repo")
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"]}
    dvc = os.path.join(bindir, "dvc")

    def run(*args):
        p = subprocess.run([dvc, *args], cwd=repo, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return p

    run("repro", "ingest")
    digest = sha256_file(repo / "artifacts/ingest/ingest.json")
    run("push", "ingest")
    assert any((repo / ".dvcstore").rglob("*")), "push wrote nothing to the local remote"
    shutil.rmtree(repo / "artifacts")
    shutil.rmtree(repo / ".dvc/cache")
    run("pull", "ingest")
    assert sha256_file(repo / "artifacts/ingest/ingest.json") == digest


def test_every_stage_params_section_exists_in_the_default_recipe():
    """DVC refuses a stage whose params section is missing from the recipe file ("Parameters 'x' are
    missing"), so `make repro` would stop at that stage. A default left implicit is not enough."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    recipe_path = yaml.safe_load((REPO / "params.yaml").read_text())["recipe"]
    recipe = yaml.safe_load((REPO / recipe_path).read_text())
    missing = []
    for name, stage in dvc["stages"].items():
        for entry in stage.get("params", []):
            if isinstance(entry, dict):
                for file, keys in entry.items():
                    assert file == "${recipe}", f"dvc.yaml: stages.{name}.params: unexpected file {file}"
                    missing += [f"{name}:{k}" for k in keys if not _has_key(recipe, k)]
    assert not missing, f"{recipe_path} lacks sections that dvc.yaml stages read: {missing}"


def _has_key(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def test_dvc_params_are_the_recipe_keys_each_stage_hashes_into_its_provenance():
    """DVC reruns a stage when one of its params changes; provenance.json hashes the keys the stage
    reads (STAGE_KEYS). They must be the same list, or an edit either reruns nothing that reads it or
    changes an output DVC did not rerun."""
    from pipeline.core.provenance import STAGE_KEYS

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    listed = {name: [k for e in stage.get("params", []) for k in e["${recipe}"]]
              for name, stage in dvc["stages"].items()}
    assert {n: listed[n] for n in STAGE_KEYS} == STAGE_KEYS
    assert set(listed) - set(STAGE_KEYS) == {"release"}  # the release covers the whole recipe


def test_an_edit_of_one_section_changes_only_the_provenance_of_stages_that_read_it():
    """The committed dvc.lock holds the data stages: an edit of posttrain's section (or evaluate's)
    must leave their provenance.json, hence their output hash, byte-identical."""
    from pipeline.core.config import load_recipe
    from pipeline.core.io import canonical_json
    from pipeline.core.provenance import STAGE_KEYS, provenance

    tiny = REPO / "recipes/tiny.yaml"
    base = load_recipe(tiny, check_files=False)

    def changed(overrides):
        other = load_recipe(tiny, overrides=overrides, check_files=False)
        return {s for s in list(STAGE_KEYS) + ["release"]
                if canonical_json(provenance(s, base)) != canonical_json(provenance(s, other))}

    assert changed({"posttrain": {"lr": 0.5}}) == {"posttrain", "release"}
    assert changed({"evaluate": {"limit": 7}}) == {"evaluate", "release"}
    assert changed({"seed": 99}) == {"tokenizer", "blend", "pretrain", "posttrain", "quantize", "evaluate", "release"}
    assert changed({"blend": {"seq_len": 128}}) == {"blend", "quantize", "release"}
    assert changed({"tokenize": {"val_per_mille": 30}}) == {"tokenize", "posttrain", "release"}
    # where the data stages run is recorded by ingest alone and hashed by none
    ray = changed({"data": {"executor": "ray", "workers": 3}})
    assert ray == {"ingest", "release"}
    other = load_recipe(tiny, overrides={"data": {"executor": "ray", "workers": 3}}, check_files=False)
    assert provenance("ingest", other)["config_sha256"] == provenance("ingest", base)["config_sha256"]
    assert provenance("release", other)["recipe_sha256"] == provenance("release", base)["recipe_sha256"]
    # a nested execution-only key (pretrain.distributed.nodes) is recorded but not hashed either
    nodes = load_recipe(tiny, overrides={"pretrain": {"distributed": {"nodes": {"rdzv_endpoint": "h:1"}}}},
                        check_files=False)
    assert provenance("pretrain", nodes)["config"]["pretrain"]["distributed"]["nodes"]["rdzv_endpoint"] == "h:1"
    assert provenance("pretrain", nodes)["config_sha256"] == provenance("pretrain", base)["config_sha256"]


def test_lineage_commit_is_the_code_commit_and_dvc_lock_is_not_dirt(tmp_path):
    """dvc.lock is what `dvc repro` writes; refreshing it (in the work tree or in a commit of its own)
    changes no code, so the lineage's commit and dirty flag do not move with it."""
    from pipeline.core.provenance import git_commit

    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    (repo / "dvc.lock").write_text("stages: {}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "code")
    code_commit = git(repo, "rev-parse", "HEAD").strip()
    (repo / "dvc.lock").write_text("stages: {a: 1}\n")
    assert git_commit(repo) == {"commit": code_commit, "dirty": False}
    git(repo, "commit", "-qam", "refresh dvc.lock")
    assert git(repo, "rev-parse", "HEAD").strip() != code_commit
    assert git_commit(repo) == {"commit": code_commit, "dirty": False}
    (repo / "code.py").write_text("x = 2\n")
    assert git_commit(repo)["dirty"] is True
    git(repo, "commit", "-qam", "code 2")
    code_commit = git(repo, "rev-parse", "HEAD").strip()
    assert git_commit(repo) == {"commit": code_commit, "dirty": False}
    # prose, tests and benchmarks are read by no stage: editing or committing them moves nothing
    for path in ("README.md", "docs/guide.md", "tests/test_x.py", "bench/b.py"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("new\n")
        git(repo, "add", path)
        assert git_commit(repo) == {"commit": code_commit, "dirty": False}, path
        git(repo, "commit", "-qm", f"edit {path}")
        assert git_commit(repo) == {"commit": code_commit, "dirty": False}, path
    (repo / "code.md.py").write_text("y = 1\n")   # code whose name merely contains .md
    git(repo, "add", "code.md.py")
    assert git_commit(repo)["dirty"] is True
