"""ingest and tokenize on Ray: byte-identical to the local executor, with 1 and with 4 workers,
and when Ray's worker processes are killed mid-ingest (Ray reruns their units).

One local Ray (4 CPUs) for the module, shut down after it; the stages run in this process."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from pipeline import blend, ingest, tokenize
from pipeline.core.config import load_recipe
from pipeline.core.io import read_json, sha256_tree
from tests.conftest import REPO
from tests.test_data_filters import near_copy, prose

MANIFEST = """name: exec
sources:
  - name: arithmetic
    kind: builtin
    builtin: synthetic-arithmetic
    license: CC0-1.0
    weight: 0.5
    arithmetic: {docs: 600, problems_per_doc: 8, max_operand: 99}
  - name: notes
    kind: local
    paths: [notes.jsonl]
    format: jsonl
    license: CC0-1.0
    weight: 0.5
    seed: 2
    filters: {min_chars: 20, steps: [{kind: quality}], near_dedup: {threshold: 0.7}}
"""


@pytest.fixture(scope="module")
def workdir(micro_data, tmp_path_factory) -> Path:
    """micro_data's tokenizer and eval tasks, with a manifest of 13 arithmetic units and 4 of notes
    (prose with near copies, exact copies and short lines)."""
    wd = tmp_path_factory.mktemp("executor")
    shutil.copytree(micro_data / "evals", wd / "evals")
    shutil.copytree(micro_data / "artifacts/tokenizer", wd / "artifacts/tokenizer")
    docs = [prose(i, 90) for i in range(150)]
    docs += [near_copy(docs[i], 1) for i in range(0, 40, 4)] + docs[:5] + ["short"] * 3
    (wd / "notes.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (wd / "exec.yaml").write_text(MANIFEST)
    (wd / "r.yaml").write_text(f"base: {REPO / 'tests/recipes/micro.yaml'}\nname: exec\n"
                               "data: {manifest: exec.yaml, lock: false, unit_docs: 50}\n"
                               "tokenize: {batch_docs: 16}\n")
    return wd


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "RAYON_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def run_data_stages(wd: Path, name: str, on_unit=None, **data) -> Path:
    """ingest, tokenize and blend of r.yaml with `data` overrides, into wd/<name>/."""
    cwd = os.getcwd()
    os.chdir(wd)
    try:
        recipe = load_recipe("r.yaml", overrides={"data": data})
        out = Path(name)
        ingest.run(recipe, out_dir=out / "ingest", on_unit=on_unit)
        tokenize.run(recipe, ingest_dir=out / "ingest", tokenizer_dir=Path("artifacts/tokenizer"),
                     out_dir=out / "tokenize")
        blend.run(recipe, tokenize_dir=out / "tokenize", out_dir=out / "blend")
    finally:
        os.chdir(cwd)
    return wd / name


def data_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file of the three stages but ingest/provenance.json, which records the
    recipe's `data` section, and so the executor."""
    return {f"{stage}/{k}": v for stage in ("ingest", "tokenize", "blend") for k, v in sha256_tree(out / stage).items()
            if f"{stage}/{k}" != "ingest/provenance.json"}


def test_ray_with_1_and_4_workers_is_byte_identical_to_local(workdir, ray_cluster):
    local = run_data_stages(workdir, "local", executor="local")
    ray1 = run_data_stages(workdir, "ray1", executor="ray", workers=1)
    killed = []

    def kill_ray_workers(source, i, n):
        """After the first unit is back, SIGKILL every Ray worker process, busy or idle: Ray runs
        their units again on new workers (max_retries), and nothing in the output changes."""
        import psutil

        if not killed and (source, i) == ("arithmetic", 0):
            for p in psutil.Process().children(recursive=True):
                name = (p.cmdline() or [""])[0]
                if name in ("ray::IDLE", "ray::ingest_unit"):  # task workers, not Ray's own agents
                    killed.append(name)
                    p.send_signal(signal.SIGKILL)

    ray4 = run_data_stages(workdir, "ray4", on_unit=kill_ray_workers, executor="ray", workers=4)
    assert killed, "no Ray worker process was found to kill"
    expected = data_hashes(local)
    assert {"ingest/notes/shard-00000.jsonl", "ingest/ingest.json", "tokenize/notes/train.npy",
            "tokenize/notes/train_docs.npy", "tokenize/arithmetic/val.npy", "tokenize/tokenize.json",
            "blend/indices.npy", "blend/blend.json", "tokenize/provenance.json"} <= set(expected)
    assert data_hashes(ray1) == expected
    assert data_hashes(ray4) == expected
    meta = read_json(local / "ingest/ingest.json")["sources"]
    assert meta["notes"]["raw_documents"] == 168
    assert meta["notes"]["removed"] == {"length": 3, "quality": 0, "exact_dedup": 5, "near_dedup": 10, "limits": 0}
    assert meta["arithmetic"]["documents"] == 600
    for out, workers in ((ray1, 1), (ray4, 4)):
        assert read_json(out / "ingest/provenance.json")["config"]["data"]["workers"] == workers
    # the units ran as Ray tasks, in 4 worker processes at most
    tasks = [e for e in ray_cluster.timeline() if e.get("cat") == "task::ingest_unit"]
    assert tasks and 1 <= len({e["pid"] for e in tasks}) <= 4


def test_execution_keys_leave_the_recipe_hash_alone():
    from pipeline.core.config import recipe_sha256

    micro = REPO / "tests/recipes/micro.yaml"
    base = recipe_sha256(load_recipe(micro, check_files=False))
    ray = {"executor": "ray", "workers": 3, "ray_address": "10.0.0.1:6379", "unit_docs": 7}
    assert recipe_sha256(load_recipe(micro, overrides={"data": ray}, check_files=False)) == base
    assert recipe_sha256(load_recipe(micro, overrides={"data": {"lock": False}}, check_files=False)) != base
