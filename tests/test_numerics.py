"""CPU numerics profiles (pipeline/core/numerics.py): pinned before torch loads, recorded, checked, and
the same bits whatever the CPU lets MKL use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.core import numerics
from pipeline.core.io import read_json, sha256_file
from tests.conftest import MICRO, REPO

PIN_VARS = (*numerics.ISA_VARS, *numerics.THREAD_VARS, numerics.PROFILE_VAR, "MKL_ENABLE_INSTRUCTIONS")


def clean_env(**extra: str) -> dict:
    """The environment of a user's fresh shell: none of the pins this test process runs under."""
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARS}
    env.update(extra)
    return env


def test_pinned_env_of_each_profile():
    p = numerics.pinned_env("portable", 3)
    assert p["ATEN_CPU_CAPABILITY"] == "avx2" and p["MKL_CBWR"] == "AVX2" and p["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert p["OMP_NUM_THREADS"] == p["MKL_NUM_THREADS"] == "3" and p["MKL_DYNAMIC"] == "FALSE"
    assert numerics.pinned_env("compatible", 1)["MKL_CBWR"] == "COMPATIBLE"
    assert numerics.pinned_env("native", 4) == {numerics.PROFILE_VAR: "native"}
    with pytest.raises(numerics.NumericsError, match="not one of"):
        numerics.pinned_env("fast", 1)
    # case and spacing do not make a conflict; another value does, and is named
    assert numerics.conflicts(p, {"MKL_CBWR": "avx2", "ATEN_CPU_CAPABILITY": "AVX2"}) == []
    bad = numerics.conflicts(p, {"ATEN_CPU_CAPABILITY": "avx512", "OMP_NUM_THREADS": "8"})
    assert len(bad) == 2 and "ATEN_CPU_CAPABILITY=avx512" in bad[0] and "OMP_NUM_THREADS=8" in bad[1]


def python_env(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)


def test_enter_pins_before_torch_and_records_what_is_in_force():
    code = ("import json, sys; from pipeline.core import numerics; numerics.enter('portable', 1, 'test');"
            "assert 'torch' not in sys.modules; import torch; print(json.dumps(numerics.in_force()))")
    proc = python_env(code, clean_env())
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["profile"] == "portable" and rec["torch_cpu_capability"] == "AVX2" and rec["threads"] == 1
    assert rec["pins"]["MKL_CBWR"] == "AVX2" and rec["torch"].startswith("2.13.0")
    # MKL's own report of its branch: AVX2 on Intel, AUTO where MKL refuses the AVX2 branch (other vendors)
    assert rec["mkl_cnr"] in ("AVX2", "AUTO")
    native = python_env("import json; from pipeline.core import numerics; numerics.enter('native', 1, 't');"
                        "import torch; print(json.dumps(numerics.in_force()))", clean_env())
    assert native.returncode == 0, native.stderr
    assert json.loads(native.stdout.strip().splitlines()[-1])["mkl_cnr"] == "OFF"


def test_enter_refuses_a_conflict_and_a_late_start():
    conflict = python_env("from pipeline.core import numerics; numerics.enter('portable', 2, 'recipes/x.yaml')",
                          clean_env(ATEN_CPU_CAPABILITY="default"))
    assert conflict.returncode != 0
    assert "recipes/x.yaml" in conflict.stderr and "ATEN_CPU_CAPABILITY=default" in conflict.stderr
    late = python_env("import torch; from pipeline.core import numerics; numerics.enter('portable', 2, 'r.yaml')",
                      clean_env())
    assert late.returncode != 0 and "torch was imported before" in late.stderr


def test_omp_refuses_a_conflicting_environment_naming_the_variable(micro_data):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "pretrain", "--recipe", MICRO], cwd=micro_data,
                          env=clean_env(MKL_CBWR="AVX512"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "platform.numerics" in proc.stderr and "MKL_CBWR=AVX512" in proc.stderr
    assert not (micro_data / "artifacts/pretrain").exists()


def test_compare_says_what_is_expected():
    rec = {"profile": "portable", "torch": "2.13.0", "torch_cpu_capability": "AVX2", "threads": 2, "mkl": "2024.2",
           "onednn": "3.12.0", "mkl_cnr": "AVX2", "pins": {"MKL_CBWR": "AVX2"}}
    assert numerics.compare(rec, dict(rec)) == ("bitwise", [])
    expect, diffs = numerics.compare(rec, {**rec, "mkl_cnr": "AUTO"})
    assert expect == "tolerance" and diffs == ["mkl_cnr: recorded 'AVX2', here 'AUTO'"]
    nat = {**rec, "profile": "native", "torch_cpu_capability": "AVX512", "mkl_cnr": "OFF", "pins": {}}
    assert numerics.compare(nat, dict(nat))[0] == "bitwise-same-cpu"
    assert numerics.compare(nat, {**nat, "torch_cpu_capability": "AVX2"})[0] == "tolerance"
    assert numerics.compare(None, rec)[0] == "tolerance"


SHORT = """base: micro.yaml
pretrain: {steps: 12, checkpoint_every_steps: 12, eval_every_steps: 12, ladder: {every: 12, steps: []}}
posttrain: {steps: 6, dpo: {enabled: false}, eval_problems: 8, replay_examples: 0}
quantize: {methods: [int8-rtn, int4-gptq], calib_windows: 4, eval_windows: 4, gguf: [Q8_0]}
platform: {numerics: %s}
"""


def chain_files(work) -> dict[str, str]:
    """sha256 of every file pretrain, posttrain and quantize wrote, but the timing and machine files."""
    out = {}
    for stage in ("pretrain", "posttrain", "quantize"):
        for p in sorted((work / "artifacts" / stage).rglob("*")):
            if p.is_file() and "checkpoints" not in p.parts:
                out[p.relative_to(work).as_posix()] = sha256_file(p)
    return out


def run_chain(src, dst, profile: str, env: dict) -> dict[str, str]:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    (dst / "tests/recipes/short.yaml").write_text(SHORT % profile)
    for stage in ("pretrain", "posttrain", "quantize"):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", stage, "--recipe", "tests/recipes/short.yaml"],
                              cwd=dst, env={**env, "PYTHONHASHSEED": "0"}, capture_output=True, text=True)
        assert proc.returncode == 0, f"{stage} ({profile}): {proc.stderr[-2000:]}"
    return chain_files(dst)


@pytest.mark.e2e
def test_portable_gives_the_same_files_whatever_mkl_may_use_native_does_not(micro_data, tmp_path):
    """Other CPUs emulated on this one: MKL limited to AVX2 (MKL_ENABLE_INSTRUCTIONS, what an AVX2-only
    Intel CPU offers it) or not. Under portable the pretrain, posttrain and quantize files (weights,
    ladder, GGUF, reports, provenance) are identical. The control: under native, a CPU whose ATen
    dispatch differs too (ATEN_CPU_CAPABILITY=default, a CPU without AVX2 as ATen sees it) gives other
    weights, so this test fails if the profiles stop deciding the bits."""
    a = run_chain(micro_data, tmp_path / "portable", "portable", clean_env())
    b = run_chain(micro_data, tmp_path / "portable-mkl-avx2", "portable", clean_env(MKL_ENABLE_INSTRUCTIONS="AVX2"))
    assert a == b, [k for k in a if a[k] != b.get(k)]
    assert len(a) > 20 and any(k.endswith(".gguf") for k in a)
    prov = read_json(tmp_path / "portable/artifacts/pretrain/provenance.json")["numerics"]
    assert prov["profile"] == "portable" and prov["torch_cpu_capability"] == "AVX2"
    lin = read_json(tmp_path / "portable/artifacts/pretrain/final/lineage.json")
    assert lin["numerics"] == prov and lin["environment"]["packages"]["torch"].startswith("2.13.0")
    machine = read_json(tmp_path / "portable/artifacts/timings/machine-pretrain.json")
    assert machine["cpu_model"] and "avx2" in machine["isa"]

    n1 = run_chain(micro_data, tmp_path / "native", "native", clean_env())
    n2 = run_chain(micro_data, tmp_path / "native-other-cpu", "native",
                   clean_env(MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="default"))
    w = "artifacts/pretrain/final/model.safetensors"
    assert n1[w] != n2[w], "native runs on two emulated CPUs gave the same weights: the control cannot fail"
    assert read_json(tmp_path / "native-other-cpu/artifacts/pretrain/provenance.json")["numerics"][
        "torch_cpu_capability"] == "DEFAULT"
