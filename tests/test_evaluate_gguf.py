"""GGUF variants through lm-eval's `gguf` model and a llama-cpp-python server.

llama-cpp-python is not a project dependency (it compiles llama.cpp for ~10 min), so the end-to-end
test runs only where a Python with `llama_cpp.server` exists: $OMP_LLAMA_CPP_PYTHON, or
/tmp/llamacpp-venv/bin/python. Elsewhere it is skipped, and the skip path itself is tested.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, omp
from tests.tiny_model import micro_pretrained  # noqa: F401 - fixture

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE)
LLAMA_PYTHON = os.environ.get("OMP_LLAMA_CPP_PYTHON", "/tmp/llamacpp-venv/bin/python")


def test_gguf_tasks_leave_out_perplexity():
    from pipeline.evaluate import task_manager
    from pipeline.evaluate.gguf_server import gguf_tasks

    tm = task_manager(REPO / "evals/tasks", defaults=False)
    ok, rolling = gguf_tasks(tm, ["omp_ppl_python_docs", "omp_arith_mc", "omp_code_mc", "omp_arith_gen",
                                  "omp_ppl_arithmetic"])
    assert ok == ["omp_arith_mc", "omp_code_mc", "omp_arith_gen"]
    assert rolling == ["omp_ppl_python_docs", "omp_ppl_arithmetic"]


def test_unusable_server_python_says_why(tmp_path):
    from pipeline.evaluate.gguf_server import usable_python

    assert usable_python(None) == "evaluate.gguf_server_python is not set"
    assert "does not exist" in usable_python(str(tmp_path / "no-python"))
    if "llama_cpp" not in sys.modules:  # the project's own venv has no llama-cpp-python
        assert "cannot import llama_cpp.server" in usable_python(sys.executable)


def add_gguf_variant(work: Path, file_type: str = "F16") -> Path:
    """The pretrained model exported to GGUF, laid out as the quantize stage lays it out."""
    from transformers import AutoModelForCausalLM

    from pipeline.quantize.gguf_export import export_gguf

    src = work / "artifacts/pretrain/final"
    out = work / f"artifacts/quantize/gguf/micro-{file_type}.gguf"
    out.parent.mkdir(parents=True)
    export_gguf(AutoModelForCausalLM.from_pretrained(str(src)), src, out, file_type)
    (work / "artifacts/quantize/report.json").write_text(json.dumps({"baseline_ppl": None, "variants": [
        {"name": file_type, "format": "gguf", "bytes": out.stat().st_size, "ppl": None, "ppl_delta_pct": None,
         "path": f"gguf/{out.name}"}]}))
    from pipeline.core.integrity import seal

    seal(work / "artifacts/quantize", {"stage": "quantize", "stand_in": "tests/test_evaluate_gguf.py"})
    return out


@pytest.mark.e2e
def test_gguf_variant_through_lm_eval_agrees_with_transformers(request, tmp_path):
    from pipeline.evaluate.gguf_server import usable_python

    why = usable_python(LLAMA_PYTHON)
    if why:  # before asking for the trained model, so a skip costs nothing
        pytest.skip(f"no llama-cpp-python server: {why}")
    work = tmp_path / "w"
    shutil.copytree(request.getfixturevalue("micro_pretrained"), work, symlinks=True)
    add_gguf_variant(work)
    (work / "tests/recipes/gguf.yaml").write_text(
        "base: micro.yaml\nevaluate:\n  variants: [pretrain, quant-F16]\n  chat_tasks: []\n  limit: 12\n"
        "  tasks: [omp_arith_mc, omp_code_mc, omp_ppl_arithmetic]\n"
        f"  gguf_server_python: {LLAMA_PYTHON}\n")
    proc = omp("evaluate", "--recipe", "tests/recipes/gguf.yaml", cwd=work, env=OFFLINE)
    out = work / "artifacts/evaluate"
    gg = json.loads((out / "results/quant-F16.json").read_text())
    hf = json.loads((out / "results/pretrain.json").read_text())
    assert gg["omp"]["format"] == "gguf" and set(gg["results"]) == {"omp_arith_mc", "omp_code_mc"}
    assert any("omp_ppl_arithmetic skipped" in n and "loglikelihood_rolling" in n for n in gg["omp"]["notes"])
    assert gg["n-samples"]["omp_arith_mc"]["effective"] == 12
    # item by item, the F16 GGUF under llama.cpp picks the same choice as transformers on nearly every item
    items = {v: json.loads((out / f"samples/{v}.json").read_text()) for v in ("pretrain", "quant-F16")}
    for task in ("omp_arith_mc", "omp_code_mc"):
        a, b = items["pretrain"][task], items["quant-F16"][task]
        assert a.keys() == b.keys() and len(a) == 12
        agree = sum(a[k] == b[k] for k in a)
        # measured: 12/12 on both (per request, |loglik| within 1.6e-3 of transformers given the same BOS)
        assert agree >= 11, (task, agree, hf["results"][task], gg["results"][task])
    assert "quant-F16" in (out / "leaderboard.md").read_text()
    assert "quant-F16" in proc.stdout
