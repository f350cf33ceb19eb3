"""Multi-node launch from the recipe (pretrain.distributed.nodes): the command lines `omp pretrain`
runs, the recipe checks, and a real 2-"node" torchrun job on this host (two `omp pretrain
--node-rank` processes meeting at a c10d rendezvous) that ends on the one-process weights bitwise."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config import load_recipe, recipe_sha256
from pipeline.core.errors import RecipeError
from pipeline.core.io import read_json, sha256_file
from pipeline.pretrain.launch import launch_command
from pipeline.pretrain.trainer import DataDirs
from tests.conftest import MICRO, omp

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def recipe(**dist):
    return load_recipe(MICRO, overrides={"pretrain": {"distributed": dist}}, check_files=False)


def command(r, node_rank=None):
    return launch_command(r, Path("spec.json"), Path("out"), "none", DataDirs(), node_rank)


def test_torchrun_command_lines_for_one_and_two_nodes():
    tail = ["-m", "pipeline.pretrain.worker", "--spec", "spec.json", "--out", "out", "--resume", "none",
            "--blend-dir", "artifacts/blend", "--tokenize-dir", "artifacts/tokenize",
            "--tokenizer-dir", "artifacts/tokenizer"]
    run = [sys.executable, "-m", "torch.distributed.run"]
    assert command(recipe(world_size=4)) == [*run, "--standalone", "--nproc_per_node=4", *tail]
    two = recipe(world_size=4, nodes={"nnodes": 2, "rdzv_endpoint": "10.0.0.1:29400", "rdzv_id": "run7"})
    assert command(two) == [*run, "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
                            "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=run7", *tail]
    assert command(two, node_rank=1)[3:5] == ["--nnodes=2", "--node-rank=1"]
    # where it runs is not what it computes: the recipe hash ignores nodes and torchft settings
    assert recipe_sha256(two) == recipe_sha256(recipe(world_size=4))


def test_deepspeed_hostfile_command_line():
    r = recipe(world_size=4, engine="deepspeed",
               nodes={"nnodes": 2, "hostfile": "hosts.txt", "master_port": 29600})
    assert command(r)[:10] == ["deepspeed", "--hostfile", "hosts.txt", "--num_nodes=2", "--num_gpus=2",
                               "--master_port", "29600", "--no_local_rank", "--module", "pipeline.pretrain.worker"]


@pytest.mark.parametrize("dist, key, words", [
    ({"world_size": 2, "nodes": {"nnodes": 2}}, "pretrain.distributed.nodes", "needs rdzv_endpoint"),
    ({"world_size": 3, "nodes": {"nnodes": 2, "rdzv_endpoint": "h:1"}}, "pretrain.distributed",
     "does not split over nodes.nnodes 2"),
    ({"nodes": {"rdzv_endpoint": "no-port"}}, "pretrain.distributed.nodes", "is not host:port"),
    ({"nodes": {"hostfile": "h"}}, "pretrain.distributed", "nodes.hostfile is for engine deepspeed"),
    ({"engine": "torchft"}, "pretrain.distributed", "mode must be diloco"),
])
def test_bad_layouts_name_the_key(dist, key, words):
    with pytest.raises(RecipeError) as e:
        recipe(**dist)
    assert f"micro.yaml: {key}" in str(e.value) and words in str(e.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_two_nodes_on_one_host_equal_one_node(micro_data, copy_workdir):
    work = copy_workdir(micro_data)
    (work / "tests/recipes/micro_one.yaml").write_text(
        "base: micro.yaml\npretrain: {steps: 10, distributed: {world_size: 2}}\n")
    (work / "tests/recipes/micro_2n.yaml").write_text(
        "base: micro.yaml\npretrain:\n  steps: 10\n  distributed:\n    world_size: 2\n"
        f"    nodes: {{nnodes: 2, rdzv_endpoint: 'localhost:{free_port()}', rdzv_id: t2n}}\n")
    omp("pretrain", "--recipe", "tests/recipes/micro_one.yaml", cwd=work, env=ENV)
    one = sha256_file(work / "artifacts/pretrain/final/model.safetensors")
    env = {**os.environ, "PYTHONHASHSEED": "0", **ENV}
    nodes = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "pretrain", "--recipe",
                               "tests/recipes/micro_2n.yaml", "--node-rank", str(n)], cwd=work, env=env,
                              stdout=open(work / f"node{n}.log", "w"), stderr=subprocess.STDOUT)
             for n in (0, 1)]
    for n, p in enumerate(nodes):
        assert p.wait(timeout=300) == 0, (work / f"node{n}.log").read_text()[-3000:]
    m = read_json(work / "artifacts/pretrain/metrics.json")
    assert m["world_size"] == 2 and m["steps"] == 10
    assert sha256_file(work / "artifacts/pretrain/final/model.safetensors") == one


def test_torchft_layout_errors(tmp_path, monkeypatch):
    from pipeline.core.errors import PipelineError
    from pipeline.pretrain import ft

    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    r = load_recipe(MICRO, overrides={"pretrain": {"distributed": {"mode": "diloco", "engine": "torchft",
                                                                    "world_size": 2}}}, check_files=False)
    with pytest.raises(PipelineError, match="each must be in 0..1"):
        ft.launch(r, tmp_path / "out", "none", DataDirs(), [2])
    with pytest.raises(PipelineError, match="name its Lighthouse"):
        ft.launch(r, tmp_path / "out", "none", DataDirs(), [1])
    r3 = load_recipe(MICRO, overrides={"pretrain": {"distributed": {"mode": "diloco", "engine": "torchft",
                                                                     "world_size": 3}}}, check_files=False)
    with pytest.raises(RecipeError, match="blend.global_batch_size: 8 rows do not split over 3 replicas"):
        ft.launch(r3, tmp_path / "out", "none", DataDirs(), None)
