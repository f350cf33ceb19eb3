"""The evaluate stage: the real lm-eval harness, offline, on a tiny Llama with our local tasks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MICRO, REPO, omp
from tests.tiny_model import micro_pretrained  # noqa: F401 - fixture

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE)


def add_random_variant(work: Path) -> Path:
    """A randomly initialised Llama of the pretrained model's shape, laid out as a quantize variant."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    import torch

    src = work / "artifacts/pretrain/final"
    torch.manual_seed(1)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(str(src)))
    out = work / "artifacts/quantize/random-init"
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    (work / "artifacts/quantize/report.json").write_text(json.dumps(
        {"baseline_ppl": None, "variants": [{"name": "random-init", "format": "hf", "bytes": 0, "ppl": None,
                                             "ppl_delta_pct": None, "path": "random-init"}]}))
    from pipeline.core.integrity import seal

    seal(work / "artifacts/quantize", {"stage": "quantize", "stand_in": "tests/test_evaluate.py"})
    return out


def add_ladder(work: Path) -> None:
    """Two rungs as the pretrain stage writes them: step 0 (a random initialization) and step 60 (the
    stand-in's trained weights), sealed with the stage's other outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core import ladder
    from pipeline.core.integrity import seal

    final = work / "artifacts/pretrain/final"
    tok = AutoTokenizer.from_pretrained(str(final))
    root = work / "artifacts/pretrain/ladder"
    init = AutoModelForCausalLM.from_pretrained(str(work / "artifacts/quantize/random-init"))
    a = ladder.write_rung(init, root, {"step": 0, "stage": "pretrain", "stage_step": 0, "tokens_seen": 0,
                                       "rows_consumed": 0, "parent_sha256": "0" * 64}, tokenizer=tok)
    ladder.write_rung(AutoModelForCausalLM.from_pretrained(str(final)), root, {
        "step": 60, "stage": "pretrain", "stage_step": 60, "tokens_seen": 60 * 8 * 64, "rows_consumed": 60 * 8,
        "parent_sha256": a["sha256"]}, tokenizer=tok)
    seal(final.parent, {"stage": "pretrain", "stand_in": "tests/test_evaluate.py"})


@pytest.fixture(scope="module")
def evaluated(micro_pretrained, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("evaluate") / "work"
    shutil.copytree(micro_pretrained, work, symlinks=True)
    add_random_variant(work)
    add_ladder(work)
    proc = omp("evaluate", "--recipe", MICRO, cwd=work, env=OFFLINE)
    return work, proc


@pytest.mark.e2e
def test_evaluate_writes_lm_eval_results_for_every_variant(evaluated):
    from pipeline.evaluate import model_sha256

    work, _ = evaluated
    out = work / "artifacts/evaluate"
    assert sorted(p.name for p in (out / "results").iterdir()) == ["pretrain.json", "quant-random-init.json"]
    res = json.loads((out / "results/pretrain.json").read_text())
    for key in ("results", "versions", "configs", "n-samples", "lm_eval_version", "higher_is_better"):
        assert key in res, key
    assert res["omp"]["model_sha256"] == model_sha256(work / "artifacts/pretrain/final")["model_sha256"]
    # the base runs the chat task too (its tokenizer has the template): post-training is judged against it
    assert set(res["results"]) == {"omp_ppl_python_docs", "omp_ppl_python_code", "omp_ppl_arithmetic",
                                   "omp_arith_mc", "omp_code_mc", "omp_arith_gen", "omp_arith_gen_chat"}
    assert res["n-samples"]["omp_arith_mc"]["effective"] == 24  # micro: evaluate.limit
    # every primary metric has a standard error: lm-eval's closed form for acc, ours for bits_per_byte
    r = res["results"]
    acc, se = r["omp_arith_mc"]["acc,none"], r["omp_arith_mc"]["acc_stderr,none"]
    assert abs(se - (acc * (1 - acc) / 23) ** 0.5) < 1e-9  # sample stddev / sqrt(n), n = 24
    bpb_se = r["omp_ppl_python_code"]["bits_per_byte_stderr,none"]
    assert isinstance(bpb_se, float) and 0 < bpb_se < r["omp_ppl_python_code"]["bits_per_byte,none"]
    for name in ("leaderboard.md", "leaderboard.html", "leaderboard.png", "arena.json", "contamination.json",
                 "metrics.json", "provenance.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_trained_model_beats_random_init(evaluated):
    work, _ = evaluated
    r = {v: json.loads((work / f"artifacts/evaluate/results/{v}.json").read_text())["results"]
         for v in ("pretrain", "quant-random-init")}
    for task in ("omp_ppl_python_docs", "omp_ppl_python_code", "omp_ppl_arithmetic"):
        trained, rand = r["pretrain"][task]["bits_per_byte,none"], r["quant-random-init"][task]["bits_per_byte,none"]
        # measured (micro, 60 steps): docs 3.98 vs 5.13, code 3.84 vs 4.76, arithmetic 1.78 vs 5.54
        assert trained < 0.9 * rand, (task, trained, rand)
    arena = json.loads((work / "artifacts/evaluate/arena.json").read_text())
    top = arena["variants"][0]
    assert top["name"] == "pretrain" and top["lo"] > arena["variants"][1]["hi"], arena


@pytest.mark.e2e
def test_learning_curves_score_every_rung(evaluated):
    """evaluate.ladder: every rung on the perplexity tasks and one multiple-choice task (micro: 8 items)."""
    work, _ = evaluated
    out = work / "artifacts/evaluate"
    rows = json.loads((out / "ladder.json").read_text())
    tasks = {"omp_ppl_python_docs", "omp_ppl_python_code", "omp_ppl_arithmetic", "omp_arith_mc"}
    assert {(r["step"], r["task"]) for r in rows} == {(s, t) for s in (0, 60) for t in tasks}
    by = {(r["step"], r["task"]): r for r in rows}
    assert by[(60, "omp_arith_mc")]["metric"] == "acc" and by[(60, "omp_arith_mc")]["n"] == 8
    for t in tasks - {"omp_arith_mc"}:   # the trained rung beats the initialization, beyond its stderr
        a, b = by[(0, t)], by[(60, t)]
        assert a["metric"] == "bits_per_byte" and b["value"] + 2 * b["stderr"] < a["value"] - 2 * a["stderr"], (a, b)
    lines = (out / "ladder.csv").read_text().splitlines()
    assert lines[0] == "step,stage,tokens_seen,omp_arith_mc,omp_ppl_arithmetic,omp_ppl_python_code,omp_ppl_python_docs"
    assert [ln.split(",")[:3] for ln in lines[1:]] == [["0", "pretrain", "0"], ["60", "pretrain", "30720"]]
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prov = json.loads((out / "provenance.json").read_text())["outputs"]
    assert {"ladder.json", "ladder.csv", "ladder.png"} <= set(prov)


@pytest.mark.e2e
def test_contamination_every_heldout_task_is_clean(evaluated):
    """The tokenize stage cut eval n-grams out of training, so no held-out task overlaps (tests/test_decontamination.py)."""
    work, _ = evaluated
    c = json.loads((work / "artifacts/evaluate/contamination.json").read_text())
    assert c["ngram"] == 13 and c["training_steps"] == 80 and c["training_decontamination"]["enabled"]
    for task in ("omp_arith_mc", "omp_arith_gen", "omp_ppl_arithmetic"):
        assert c["tasks"][task] == {**c["tasks"][task], "items": 200, "overlapping": 0}
    assert {t: v["overlapping"] for t, v in c["tasks"].items()} == {t: 0 for t in c["tasks"]}
    assert c["tasks"]["omp_code_mc"]["items"] == 120 and c["tasks"]["omp_ppl_python_code"]["items"] == 40


def test_contamination_flags_an_item_copied_from_training(micro_data, tmp_path):
    """Positive control: text taken from global batch 3 must be reported as overlapping."""
    from pipeline.core.order import PublishedOrder
    from pipeline.evaluate import contamination
    from pipeline.tokenizer import load

    art = micro_data / "artifacts"
    order = PublishedOrder(art / "blend", art / "tokenize")
    tok = load(art / "tokenizer")
    seen = tok.decode(order.batch(3)[0][5:45].tolist())
    (tmp_path / "tasks").mkdir()
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "copied", "text": seen}) + "\n"
                                          + json.dumps({"id": "novel", "text": "zq xv " * 30}) + "\n")
    (tmp_path / "tasks/t.yaml").write_text(
        f"task: probe\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'items.jsonl'}\n")
    rep = contamination.report(art, tmp_path, 13, tasks_dir=tmp_path / "tasks")
    assert rep["tasks"]["probe"]["items"] == 2
    assert rep["tasks"]["probe"]["overlapping_ids"] == ["copied"]


def test_ngram_hash_is_order_sensitive():
    from pipeline.evaluate.contamination import ngram_hashes

    h = ngram_hashes(np.array([[1, 2, 3], [3, 2, 1], [1, 2, 3]]))
    assert h[0] == h[2] and h[0] != h[1]


def test_unknown_task_is_a_recipe_error(micro_pretrained, tmp_path):  # noqa: F811
    work = tmp_path / "w"
    shutil.copytree(micro_pretrained, work, symlinks=True)
    bad = work / "tests/recipes/bad_eval.yaml"
    bad.write_text("base: micro.yaml\nevaluate:\n  tasks: [omp_no_such_task]\n")
    proc = omp("evaluate", "--recipe", "tests/recipes/bad_eval.yaml", cwd=work, check=False, env=OFFLINE)
    assert proc.returncode == 2
    assert "bad_eval.yaml: evaluate.tasks" in proc.stderr and "omp_no_such_task" in proc.stderr


def test_no_model_is_a_clear_error(micro_data, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(micro_data, work, symlinks=True)
    proc = omp("evaluate", "--recipe", MICRO, cwd=work, check=False, env=OFFLINE)
    assert proc.returncode == 2 and "artifacts/pretrain/final" in proc.stderr and "pretrain stage" in proc.stderr


def test_unknown_recipe_key_names_it(tmp_path):
    from pipeline.core.config import load_recipe
    from pipeline.core.errors import RecipeError

    p = tmp_path / "r.yaml"
    p.write_text("name: x\nevaluate:\n  limt: 3\n")
    with pytest.raises(RecipeError, match=r"evaluate\.limt: unknown key"):
        load_recipe(p, check_files=False)


def test_discover_variants_reads_quantize_report(tmp_path):
    from pipeline.evaluate import discover_variants

    for d in ("pretrain/final", "posttrain/final", "quantize/int8-rtn"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "config.json").write_text("{}")
    (tmp_path / "quantize/gguf").mkdir()
    (tmp_path / "quantize/gguf/m-Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "quantize/report.json").write_text(json.dumps({"baseline_ppl": 1.0, "variants": [
        {"name": "int8-rtn", "format": "int8", "bytes": 1, "ppl": 1.0, "ppl_delta_pct": 0.0, "path": "int8-rtn"},
        {"name": "Q8_0", "format": "gguf", "bytes": 1, "ppl": 1.0, "ppl_delta_pct": 0.0,
         "path": "gguf/m-Q8_0.gguf"}]}))
    from pipeline.core.integrity import seal

    for stage in ("pretrain", "posttrain", "quantize"):  # recorded as the stages record their outputs
        seal(tmp_path / stage, {"stage": stage})
    got = [(v.name, v.format, v.chat) for v in discover_variants(tmp_path)]
    # the base runs the chat task too: post-training is judged against it on the same prompts
    assert got == [("pretrain", "hf", True), ("posttrain", "hf", True), ("quant-int8-rtn", "hf", True),
                   ("quant-Q8_0", "gguf", True)]


def test_eval_data_regenerates_byte_identically(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "evals/make_data.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    committed = sorted(p.name for p in (REPO / "evals/data").glob("*.jsonl"))
    assert committed == sorted(p.name for p in tmp_path.glob("*.jsonl"))
    for name in committed:
        assert (tmp_path / name).read_bytes() == (REPO / "evals/data" / name).read_bytes(), name
    total = sum((REPO / "evals/data" / n).stat().st_size for n in committed)
    assert total < 400_000
    rows = [json.loads(x) for x in (REPO / "evals/data/arithmetic.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and all(r["choices"][r["label"]] == r["answer"] for r in rows)


def test_bits_per_byte_stderr_is_the_ratio_estimator_stderr():
    import math

    from pipeline.evaluate.harness import ratio_stderr

    # equal byte counts: the ratio is a plain mean of per-item bits per byte, so its stderr is the mean's
    pairs = [(-10.0, 8), (-14.0, 8), (-9.0, 8), (-20.0, 8)]
    x = [-ll / math.log(2) / b for ll, b in pairs]
    mu = sum(x) / 4
    expect = math.sqrt(sum((v - mu) ** 2 for v in x) / 3) / 2
    assert abs(ratio_stderr(pairs) - expect) < 1e-12
    assert ratio_stderr(pairs[:1]) is None


def test_lm_eval_speed_up_renders_the_same_prompts_and_collects_the_environment_once():
    """evaluate's lm-eval speed-up (compiled templates kept, environment collected once) changes no
    prompt and no recorded field; a second call does not wrap twice."""
    import lm_eval.utils
    import torch.utils.collect_env as collect_env

    from pipeline.evaluate import speed_up_lm_eval

    tmpl = "Q: {{ question | regex_replace('\\\\s+', ' ') }}\nA:"
    docs = [{"question": "What  is\n2 + 2?"}, {"question": "7 -  3"}]
    before = [lm_eval.utils.apply_template(tmpl, d) for d in docs]
    speed_up_lm_eval()
    fn = lm_eval.utils.apply_template
    speed_up_lm_eval()
    assert lm_eval.utils.apply_template is fn
    assert [fn(tmpl, d) for d in docs] == before == ["Q: What is 2 + 2?\nA:", "Q: 7 - 3\nA:"]
    first = collect_env.get_pretty_env_info()
    assert "PyTorch version" in first and collect_env.get_pretty_env_info() is first
