"""evaluate: the real lm-evaluation-harness on every model variant of the chain.

Variants are found on disk: `artifacts/pretrain/final` (pretrain), `artifacts/posttrain/final`
(posttrain) and each entry of `artifacts/quantize/report.json` (HF directories; GGUF files go
through lm-eval's `gguf` model, which needs a llama.cpp server: with `evaluate.gguf_server_python`
each GGUF is served in turn (gguf_server.py), with `evaluate.gguf_base_url` a server you run is
used; otherwise they are skipped with a message).

Output `artifacts/evaluate/`:
  results/<variant>.json   lm-eval's results (versions, configs, n-samples) + `omp` (model sha256)
  samples/<variant>.json   per-item scores from lm-eval's log_samples (higher is better), for the arena
  contamination.json       items per task sharing an n-gram with the tokens training saw
  arena.json               Bradley-Terry ratings with bootstrap 95% intervals
  leaderboard.md / .html / .png, provenance.json
  ladder.json / .csv / .png  learning curves: every checkpoint-ladder rung on `evaluate.ladder.tasks`
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

from pipeline.core import leaderboard, numerics
from pipeline.core.config import Recipe, recipe_path
from pipeline.core.errors import PipelineError, RecipeError
from pipeline.core.io import atomic_dir, canonical_json, read_json, sha256_bytes, sha256_tree, write_json
from pipeline.core.paths import ARTIFACTS, OUT as STAGE_OUT
from pipeline.core.provenance import provenance
from pipeline.core.log import status
from pipeline.core.integrity import check_relpath, seal, verify_model_dir, verify_stage
from pipeline.evaluate import arena, contamination, curves
from pipeline.evaluate.gguf_server import gguf_tasks, served, usable_python
from pipeline.evaluate.harness import Variant, add_bits_per_byte_stderr, item_scores, jsonable, load_lm

OUT = STAGE_OUT["evaluate"]
# lm-eval result keys that change from run to run, commit to commit or boot to boot (pretty_env_info
# holds lscpu's BogoMIPS) without the scores changing
VOLATILE = ("date", "start_time", "end_time", "total_evaluation_time_seconds", "git_hash", "upper_git_hash",
            "pretty_env_info")
BASELINE = "pretrain"


def speed_up_lm_eval() -> None:
    """Two per-call costs of lm-eval that buy nothing when one process runs it ~20 times (5 variants, the
    chat tasks, a dozen ladder rungs), measured on tiny at ~40% of the stage's wall time:
    - every `simple_evaluate` records torch's `collect_env` (lscpu, pip list: ~1.3 s of subprocesses);
      the environment does not change within a process, so it is collected once and reused;
    - every prompt renders its task's Jinja template from source (`Environment.from_string`: 6,500
      compilations per stage); compiled templates are kept per template string.
    Results are identical (same strings, same rendered prompts); idempotent."""
    import lm_eval.utils   # lm_eval: heavy, loaded by the stage's run only (as below)
    import torch.utils.collect_env as collect_env

    if not getattr(collect_env.get_pretty_env_info, "_omp_cached", False):
        cached = functools.cache(collect_env.get_pretty_env_info)
        cached._omp_cached = True
        collect_env.get_pretty_env_info = cached
    if not getattr(lm_eval.utils.apply_template, "_omp_cached", False):
        compiled = functools.lru_cache(maxsize=4096)(lm_eval.utils.env.from_string)

        def apply_template(template: str, doc: dict) -> str:
            return compiled(template).render(**doc)

        apply_template._omp_cached = True
        lm_eval.utils.apply_template = apply_template


def discover_variants(artifacts: Path = ARTIFACTS) -> list[Variant]:
    """Every model variant present under `artifacts`, baseline first."""
    found = []
    for name in ("pretrain", "posttrain"):
        d = artifacts / name / "final"
        if (d / "config.json").is_file():
            verify_model_dir(d)
            # the base runs the chat tasks too (its tokenizer has the template): the released chat
            # model is compared with its base on the same prompts
            found.append(Variant(name, d, "hf", chat=True))
    qdir = artifacts / "quantize"
    report = qdir / "report.json"
    if qdir.is_dir():
        verify_stage(qdir)  # every variant file as the quantize stage recorded it
    if report.is_file():
        for v in read_json(report).get("variants", []):
            if "name" not in v or "path" not in v:
                raise PipelineError(f"{report}: variant entry {v!r} lacks name or path")
            path = qdir / check_relpath(v["path"], f"{report}: variants.{v['name']}.path")
            fmt = "gguf" if str(v.get("format", "")).lower() == "gguf" or path.suffix == ".gguf" else "hf"
            found.append(Variant(f"quant-{v['name']}", path, fmt, chat=True))
    elif qdir.is_dir():  # no report yet: take what is there
        for d in sorted(p for p in qdir.iterdir() if (p / "config.json").is_file()):
            found.append(Variant(f"quant-{d.name}", d, "hf", chat=True))
        for f in sorted(qdir.glob("gguf/*.gguf")):
            found.append(Variant(f"quant-{f.stem}", f, "gguf", chat=True))
    return found


def model_sha256(path: Path) -> dict:
    """sha256 of the weights file(s) and of the whole directory listing (name -> sha256)."""
    if path.is_file():
        h = sha256_tree(path.parent)[path.name]
        return {"model_sha256": h, "weights": {path.name: h}}
    tree = sha256_tree(path)
    weights = {k: v for k, v in tree.items() if k.endswith((".safetensors", ".gguf", ".bin"))}
    return {"model_sha256": sha256_bytes(canonical_json(tree).encode()), "weights": weights}


def offline() -> str | None:
    """Why the hub cannot be used (None if it can): standard tasks download their data from it."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(k, "").lower() in ("1", "true", "yes"):
            return f"{k} is set"
    import socket

    try:  # a quick probe, so a machine without network skips instead of waiting on retries
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as e:
        return f"huggingface.co unreachable ({type(e).__name__})"
    return None


def task_manager(include_path: Path, defaults: bool):
    from lm_eval.tasks import TaskManager   # lm_eval: heavy, loaded by the stage's run only

    return TaskManager(include_path=str(include_path), include_defaults=defaults)


def check_tasks(tm, names: list[str], recipe_file: str, key: str) -> None:
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise RecipeError(recipe_file, key, f"unknown lm-eval task(s) {', '.join(unknown)} "
                                            f"(not in {tm.include_path or 'the built-in tasks'})")


def merge_results(a: dict | None, b: dict) -> dict:
    """Fold a second simple_evaluate result (other tasks) into the first."""
    if a is None:
        return b
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "samples"):
        if isinstance(b.get(key), dict):
            a.setdefault(key, {}).update(b[key])
    return a


def evaluate_variant(variant: Variant, cfg, tm, std_tm=None, seed: int = 0,
                     base_url: str | None = None) -> tuple[dict, dict, list[str]]:
    """lm-eval results (its own format + `omp`), per-item scores, and notes on what was skipped.
    `base_url`: the llama.cpp server serving a GGUF variant."""
    from lm_eval import simple_evaluate   # lm_eval: heavy, loaded by the stage's run only

    notes: list[str] = []
    start = time.perf_counter()
    tasks = list(cfg.tasks)
    if variant.format == "gguf":
        if not base_url:
            return {}, {}, [f"{variant.name}: GGUF {variant.path} skipped: lm-eval's gguf model needs a "
                            "llama.cpp server (set evaluate.gguf_server_python or evaluate.gguf_base_url)"]
        tasks, rolling = gguf_tasks(tm, tasks)
        if rolling:
            notes.append(f"{variant.name}: {', '.join(rolling)} skipped: lm-eval's gguf model has no "
                         "loglikelihood_rolling (perplexity)")
        lm_args = dict(model="gguf", model_args={"base_url": base_url})
    else:
        lm_args = dict(model=load_lm(variant, cfg.batch_size, cfg.device, cfg.precision))
    # bootstrap_iters > 0 turns on lm-eval's stderr: closed form for mean metrics (acc, exact_match),
    # no resampling for ours; bits_per_byte gets its stderr from the items below (ratio_stderr)
    common = dict(limit=cfg.limit, log_samples=True, random_seed=seed, numpy_random_seed=seed,
                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=100)
    result = simple_evaluate(**lm_args, tasks=tasks, task_manager=tm, **common)
    if variant.chat and cfg.chat_tasks and variant.format == "hf":
        chat = simple_evaluate(**lm_args, tasks=list(cfg.chat_tasks), task_manager=tm,
                               apply_chat_template=True, **common)
        result = merge_results(result, chat)
    if cfg.standard_tasks:
        if std_tm is None:
            notes.append(f"{variant.name}: standard tasks {', '.join(cfg.standard_tasks)} skipped: offline; "
                         "they download their data from the hub")
        else:
            try:
                std = simple_evaluate(**lm_args, tasks=list(cfg.standard_tasks), task_manager=std_tm, **common)
                result = merge_results(result, std)
            except Exception as e:  # noqa: BLE001 - any hub/network failure means: skip, say why
                notes.append(f"{variant.name}: standard tasks skipped: {type(e).__name__}: {str(e)[:200]}")
    samples = result.pop("samples", {})
    result = jsonable(result)
    add_bits_per_byte_stderr(result, jsonable(samples))
    # wall-clock and commit-specific fields go to artifacts/timings/evaluate.json, outside every DVC
    # output (DESIGN.md: timings apart): equal inputs give byte-equal results
    timing = {k: result.pop(k) for k in VOLATILE if k in result}
    timing["eval_seconds"] = round(time.perf_counter() - start, 1)
    result["omp"] = {"variant": variant.name, "model_path": str(variant.path), "format": variant.format,
                     **model_sha256(variant.path), "limit": cfg.limit, "notes": notes}
    result["omp"]["timing"] = timing  # popped by run() into artifacts/timings/evaluate.json
    return result, item_scores(jsonable(samples)), notes


def run(recipe: Recipe, artifacts: Path = ARTIFACTS, out_dir: Path = OUT) -> dict:
    numerics.enter_recipe(recipe, "evaluate")   # checks the pins; the same threads in-process as under `omp`

    cfg, rfile = recipe.evaluate, recipe_path(recipe)
    include = Path(cfg.include_path)
    if not include.is_dir():
        raise RecipeError(rfile, "evaluate.include_path", f"{include} is not a directory of lm-eval task YAMLs")
    variants = discover_variants(artifacts)
    if cfg.variants is not None:
        missing = sorted(set(cfg.variants) - {v.name for v in variants})
        if missing:
            raise RecipeError(rfile, "evaluate.variants", f"no such variant(s) on disk: {', '.join(missing)} "
                                                          f"(found: {', '.join(v.name for v in variants) or 'none'})")
        variants = [v for v in variants if v.name in cfg.variants]
    if not variants:
        raise PipelineError(f"{artifacts}/pretrain/final: no model to evaluate; run the pretrain stage first")

    speed_up_lm_eval()
    tm = task_manager(include, defaults=False)
    check_tasks(tm, list(cfg.tasks) + list(cfg.chat_tasks), rfile, "evaluate.tasks")
    check_tasks(tm, list(cfg.ladder.tasks), rfile, "evaluate.ladder.tasks")
    std_tm, why = None, (offline() if cfg.standard_tasks else None)
    if why:
        status(f"evaluate: standard tasks {', '.join(cfg.standard_tasks)} skipped: offline ({why}); "
              "run with network to include them")
    elif cfg.standard_tasks:
        std_tm = task_manager(include, defaults=True)
        check_tasks(std_tm, list(cfg.standard_tasks), rfile, "evaluate.standard_tasks")

    results, scores, notes = {}, {}, []
    gguf_why = None
    if any(v.format == "gguf" for v in variants) and not cfg.gguf_base_url:
        gguf_why = usable_python(cfg.gguf_server_python)
    for v in variants:
        status(f"evaluate: {v.name} ({v.path})")
        if v.format == "gguf" and gguf_why:
            nt = [f"{v.name}: GGUF {v.path} skipped: {gguf_why} (lm-eval's gguf model needs a llama.cpp "
                  "server: point it at a Python with llama-cpp-python[server], or set evaluate.gguf_base_url)"]
            res, sc = {}, {}
        elif v.format == "gguf" and not cfg.gguf_base_url:
            with tempfile.TemporaryDirectory() as logs, \
                    served(cfg.gguf_server_python, v.path, Path(logs) / "server.log", threads=os.cpu_count() or 2) as url:
                res, sc, nt = evaluate_variant(v, cfg, tm, std_tm, seed=recipe.seed, base_url=url)
        else:
            res, sc, nt = evaluate_variant(v, cfg, tm, std_tm, seed=recipe.seed, base_url=cfg.gguf_base_url)
        notes += nt
        for n in nt:
            status(f"evaluate: {n}")
        if res:
            results[v.name], scores[v.name] = res, sc

    ladder_rows = curves.score(recipe, tm, curves.rungs(artifacts)) if cfg.ladder.tasks else []
    timings = {name: res["omp"].pop("timing", {}) for name, res in results.items()}
    contam = contamination.report(artifacts, Path("evals/data"), cfg.contamination_ngram)
    ratings = arena.ratings(scores, rounds=cfg.bootstrap_rounds, seed=recipe.seed,
                            baseline=BASELINE if BASELINE in scores else None)
    with atomic_dir(out_dir) as tmp:
        for name in results:
            write_json(tmp / "results" / f"{name}.json", results[name])
            write_json(tmp / "samples" / f"{name}.json", scores[name])
        write_json(tmp / "contamination.json", contam)
        write_json(tmp / "arena.json", ratings)
        write_json(tmp / "metrics.json", leaderboard.flat_metrics(results))
        leaderboard.write(tmp, results, ratings, contam)
        if ladder_rows:
            curves.write(tmp, ladder_rows)
        inputs = {f"{v.name}": model_sha256(v.path)["model_sha256"] for v in variants}
        seal(tmp, provenance("evaluate", recipe, inputs, notes=notes))
    timings_file = Path(out_dir).parent / "timings" / "evaluate.json"   # artifacts/timings/evaluate.json
    timings_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(timings_file, timings)
    print(leaderboard.markdown(results, ratings, contam))
    return {"results": results, "arena": ratings, "contamination": contam, "notes": notes}
