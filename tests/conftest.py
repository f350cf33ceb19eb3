"""Shared fixtures. The micro recipe (tests/recipes/micro.yaml) runs each stage in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import numerics

# the test process runs stages in-process too: pin the default profile's numerics before any test
# module imports torch (the `omp` processes the tests start pin their own, and inherit these)
for _k, _v in numerics.pinned_env("portable", 2).items():
    os.environ.setdefault(_k, _v)
assert "torch" not in sys.modules, "conftest must run before torch is imported"

REPO = Path(__file__).resolve().parents[1]
MICRO = "tests/recipes/micro.yaml"
DATA_STAGES = ["ingest", "tokenizer", "tokenize", "blend"]


def omp(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `omp` command line in `cwd` (a subprocess, as DVC runs it)."""
    full_env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"omp {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_workdir(dest: Path) -> Path:
    """A working directory with the repo's recipes, manifests and test recipes (no artifacts)."""
    dest.mkdir(parents=True, exist_ok=True)
    for d in ["recipes", "data_manifests", "tests/recipes", "evals"]:
        if (REPO / d).exists():
            shutil.copytree(REPO / d, dest / d, dirs_exist_ok=True)
    return dest


def run_data_stages(workdir: Path, recipe: str = MICRO) -> Path:
    for stage in DATA_STAGES:
        omp(stage, "--recipe", recipe, cwd=workdir)
    return workdir


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    """A workdir where the micro recipe's data stages have run: artifacts/{ingest,tokenizer,tokenize,blend}.

    Read-only for tests: copy it (copy_workdir) before running anything that writes.
    """
    return run_data_stages(make_workdir(tmp_path_factory.mktemp("micro")))


@pytest.fixture
def copy_workdir(tmp_path):
    def _copy(src: Path) -> Path:
        dst = tmp_path / "work"
        shutil.copytree(src, dst, symlinks=True)
        return dst
    return _copy


# --------------------------------------------------------------------------- soak (make soak)


def pytest_addoption(parser):
    parser.addoption("--repeat", type=int, default=1,
                     help="run each selected test N times (tests/soak.py uses it to prove stability)")


def pytest_generate_tests(metafunc):
    n = metafunc.config.getoption("--repeat")
    if n > 1:
        metafunc.fixturenames.append("soak_run")
        metafunc.parametrize("soak_run", range(n), ids=[f"run{i + 1:02d}" for i in range(n)])
