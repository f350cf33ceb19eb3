"""release: `artifacts/release/<name>/`, a repository ready for the Hugging Face Hub.

    config.json, model.safetensors, generation_config.json, tokenizer files   the chosen variant
    base/                      the pretrained model (when the top is the post-trained one)
    quantized/<variant>/       transformers-loadable quantized variants
    gguf/*.gguf                llama.cpp / ollama files
    checkpoints/step-NNNNNNN/  the checkpoint ladder (pipeline/core/ladder.py): HF folders of the published steps
    learning_curves.png        every rung's scores against tokens seen (the evaluate stage's ladder.png)
    data/indices.npy, data/blend.json    the published data order
    recipe.yaml                the resolved recipe (every parameter of the chain)
    lineage.json               the whole experiment chain (pipeline.core.provenance.chain_lineage)
    README.md                  the model card (YAML front matter with model-index)

The tokenizer and config files are written so that transformers 4.x reads them too
(`tokenizer_class: PreTrainedTokenizerFast`, inline chat template, `rope_theta`, `torch_dtype`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from pipeline.core import ladder, leaderboard as lb
from pipeline.core.config import Recipe, recipe_dict, recipe_path
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_dir, read_json, sha256_file, write_json
from pipeline.core.provenance import chain_lineage, provenance
from pipeline.core.log import status
from pipeline.core.paths import ARTIFACTS, OUT as STAGE_OUT
from pipeline.core.integrity import check_name, check_relpath, seal, tree_files, verify_file, verify_stage

OUT = STAGE_OUT["release"]
ART = ARTIFACTS
SKIP = {"lineage.json", "provenance.json", "rung.json"}


def copy_model_dir(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in SKIP:
            shutil.copyfile(f, dst / f.name)
    make_compatible(dst)


def make_compatible(d: Path) -> None:
    """Fields transformers 4.x needs beside the ones transformers 5.x writes."""
    tc, cj = d / "tokenizer_config.json", d / "config.json"
    if tc.is_file():
        cfg = read_json(tc)
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        positions = read_json(cj).get("max_position_embeddings") if cj.is_file() else None
        if positions:  # not the tokenizers default of 1e30 / 1e6: the model sees this many tokens
            cfg["model_max_length"] = positions
        if "chat_template" not in cfg and (d / "chat_template.jinja").is_file():
            cfg["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        write_json(tc, cfg)
    if cj.is_file():
        cfg = read_json(cj)
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in cfg and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        if "torch_dtype" not in cfg and "dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
        write_json(cj, cfg)


def _variant_dir(variant: str) -> Path:
    d = ART / variant / "final"
    if not (d / "model.safetensors").is_file():
        raise PipelineError(f"{d / 'model.safetensors'}: not found; run the {variant} stage first "
                            f"(or set release.variant)")
    return d


NOT_METRICS = {"alias", "sample_len"}   # lm-eval bookkeeping, not scores
CHAT_TASK = "omp_arith_gen_chat"       # the task post-training is for: the release must beat its base there


def _eval_rows(variant: str) -> tuple[list[dict], str | None]:
    """(task, metric, value) rows of the released variant's lm-eval results, and the leaderboard text."""
    res_dir = ART / "evaluate" / "results"
    board = ART / "evaluate" / "leaderboard.md"
    rows = []
    f = res_dir / f"{variant}.json"
    if f.is_file():
        for task, metrics in sorted(read_json(f).get("results", {}).items()):
            for key, value in sorted(metrics.items()):
                name = key.split(",")[0]
                if not isinstance(value, (int, float)) or "_stderr" in key or name in NOT_METRICS:
                    continue
                rows.append({"task": task, "metric": name, "value": float(value)})
    return rows, (board.read_text(encoding="utf-8") if board.is_file() else None)


def versus_base(variant: str, base: str = "pretrain") -> list[dict]:
    """Per task both were scored on: the released variant against its base, with stderr and n, and
    whether it is better / worse beyond noise (the leaderboard's rule) or within it."""
    res_dir = ART / "evaluate" / "results"
    files = {v: res_dir / f"{v}.json" for v in (base, variant)}
    if variant == base or not all(f.is_file() for f in files.values()):
        return []
    tasks, cells = lb.table({v: read_json(f) for v, f in files.items()})
    out = []
    for t in tasks:
        if t not in cells[base] or t not in cells[variant]:
            continue
        b, r = cells[base][t], cells[variant][t]
        delta = r.value - b.value
        better = delta < 0 if r.metric in lb.LOWER_IS_BETTER else delta > 0
        verdict = ("better" if better else "worse") if lb.significant(variant, t, cells, base) else \
            ("within noise" if delta else "equal")
        out.append({"task": t, "metric": r.metric, "base": b.value, "base_stderr": b.stderr,
                    "released": r.value, "released_stderr": r.stderr, "n": r.n, "delta": delta,
                    "verdict": verdict, "lost": not better and delta != 0})
    return out


def _pm(v: float, se: float | None) -> str:
    return f"{v:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def comparison_lines(rows: list[dict], variant: str) -> list[str]:
    lines = [f"| task (metric) | n | base | {variant} | Δ | |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['task']} ({r['metric']}) | {r['n'] if r['n'] is not None else '?'} | "
                     f"{_pm(r['base'], r['base_stderr'])} | {_pm(r['released'], r['released_stderr'])} | "
                     f"{r['delta']:+.3f} | {r['verdict']} |")
    return lines


def warnings_vs_base(rows: list[dict], variant: str) -> list[str]:
    """What a user must hear: the released variant does not beat its base on the chat task (the
    task post-training is for), or is worse than it beyond noise on any task."""
    out = []
    for r in rows:
        if r["task"] == CHAT_TASK and r["verdict"] != "better":
            out.append(f"the released variant `{variant}` does not beat its base on {r['task']} "
                       f"({r['released']:.3f} vs {r['base']:.3f}, n={r['n']}, {r['verdict']}): "
                       "post-training did not pay off")
        elif r["verdict"] == "worse":
            out.append(f"`{variant}` is worse than its base on {r['task']} beyond noise "
                       f"({r['metric']} {r['released']:.4f} vs {r['base']:.4f}, n={r['n']})")
    return out


def model_card(recipe: Recipe, lineage: dict, name: str, curves: bool = False) -> str:
    cfg = recipe.release
    blend = read_json(ART / "blend" / "blend.json")
    manifest = yaml.safe_load(Path(recipe.data.manifest).read_text())
    # hub ids of hub sources; offline sources by their manifest name (they have no hub page)
    datasets = [s["repo_id"] if s.get("kind") == "hf" else s["name"] for s in manifest["sources"]]
    evals, board = _eval_rows(cfg.variant)
    vs_base = versus_base(cfg.variant) if cfg.variant != "pretrain" else []
    front = {
        "license": cfg.license,
        "language": list(cfg.language),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "datasets": datasets,
        "tags": ["open-model-pipeline", "llama", f"recipe-{recipe.name}",
                 f"pretrain-{recipe.pretrain.distributed.mode}", *cfg.tags],
    }
    # the base weights ship inside this repo (base/); `base_model` (a hub id) when they are published too
    if cfg.base_model:
        front["base_model"] = cfg.base_model
        front["base_model_relation"] = "finetune"
    if evals:
        front["model-index"] = [{"name": name, "results": [
            {"task": {"type": "text-generation"}, "dataset": {"name": r["task"], "type": r["task"]},
             "metrics": [{"type": r["metric"], "value": round(r["value"], 6), "name": r["metric"]}]}
            for r in evals]}]
    pre = ART / "pretrain" / "metrics.json"
    pm = read_json(pre) if pre.is_file() else {}
    post = ART / "posttrain" / "metrics.json"
    qm = ART / "quantize" / "report.json"
    dist = recipe.pretrain.distributed
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {name}", "",
             f"A {recipe.pretrain.model.layers}-layer Llama-architecture model trained end to end by "
             f"Open Model Pipeline (`omp` {lineage['code'].get('omp_version')}) from recipe `{recipe.name}`. "
             f"The released weights are the **{cfg.variant}** model"
             + (" (a ChatML chat model: generation stops at `<|im_end|>`); the pretrained base is in `base/`"
                if cfg.variant == "posttrain" else "")
             + "; every artifact of the chain can be recreated from `lineage.json`.", "",
             "```python", "from transformers import pipeline", "",
             "chat = pipeline(\"text-generation\", model=\"path/to/this/folder\")",
             "print(chat([{\"role\": \"user\", \"content\": \"What is 12 + 30?\"}], max_new_tokens=8)"
             "[0][\"generated_text\"][-1][\"content\"])", "```", "",
             "## Training data", "",
             "| source | license | target share | realized share | tokens | epochs |", "|---|---|---:|---:|---:|---:|"]
    lic = {s["name"]: s.get("license", "") for s in manifest["sources"]}
    for s in blend["sources"]:
        lines.append(f"| {s['name']} | {lic.get(s['name'], '')} | {s['target_share']:.3f} | {s['realized_share']:.3f} | "
                     f"{s['tokens']:,} | {s['epochs']:.2f} |")
    lines += ["", f"{blend['steps']} steps × {blend['global_batch_size']} sequences × {blend['seq_len']} tokens; "
              f"the exact order is `data/indices.npy` (sha256 `{blend['indices_sha256']}`).", "",
              "## Training procedure", "",
              f"- distributed mode: **{dist.mode}**, {dist.world_size} worker(s), engine {dist.engine}"]
    if dist.mode == "diloco":
        d = dist.diloco
        lines.append(f"- DiLoCo: H={d.inner_steps} inner steps, outer lr {d.outer_lr}, momentum {d.outer_momentum}, "
                     f"compression {d.compression.kind}")
    if pm:
        # no wall-clock figures (tokens/s): two recreations give a byte-identical card
        for k in ("bytes_sent_per_worker", "tokens", "val_loss_initial", "val_loss_final"):
            if pm.get(k) is not None:
                v = pm[k]
                lines.append(f"- {k}: {v:,.4g}" if isinstance(v, float) else f"- {k}: {v:,}")
    if post.is_file():
        m = read_json(post)
        n = m.get("arith_eval_problems")
        lines.append(f"- post-training (SFT{' + DPO' if m.get('dpo_steps') else ''}): held-out arithmetic exact "
                     f"match, greedy, n={n}: base {m.get('arith_em_before')} (its Q:/A: format), "
                     f"{m.get('arith_em_before_chat')} (chat format) → {m.get('arith_em_after')} (chat format)")
    lines += ["", "<details><summary>recipe (resolved)</summary>", "", "```yaml",
              yaml.safe_dump(recipe_dict(recipe), sort_keys=False).strip(), "```", "</details>", "",
              "## Evaluation", ""]
    if vs_base:
        lines += [f"### {cfg.variant} against its base (pretrain)", "",
                  "Same items, lm-eval; value ± standard error. A difference counts only beyond 1.96 standard "
                  "errors of the difference.", "", *comparison_lines(vs_base, cfg.variant), ""]
        for w in warnings_vs_base(vs_base, cfg.variant):
            lines += [f"> **Warning:** {w}.", ""]
    if board:
        lines.append(board.strip())
    elif evals:
        lines += ["| task | metric | value |", "|---|---|---:|"]
        lines += [f"| {r['task']} | {r['metric']} | {r['value']:.4f} |" for r in evals]
    else:
        lines.append("No lm-eval results were present when this release was made.")
    lines += ["", "## Quantization", ""]
    if qm.is_file():
        q = read_json(qm)
        lines += [f"Baseline held-out perplexity: {q.get('baseline_ppl', float('nan')):.4f}", "",
                  "| variant | format | bytes | perplexity | Δ% |", "|---|---|---:|---:|---:|"]
        for v in q.get("variants", []):
            lines.append(f"| {v['name']} | {v.get('format', '')} | {v.get('bytes', 0):,} | "
                         f"{v.get('ppl', float('nan')):.4f} | {v.get('ppl_delta_pct', float('nan')):+.2f} |")
    else:
        lines.append("No quantized variants in this release.")
    commit = lineage["code"].get("commit")
    lines += ["", *ladder_lines(lineage.get("ladder") or {}, cfg.repo_id, curves=curves)]
    lines += ["## How to recreate this model", "",
              "With the Open Model Pipeline source"
              + (f" at commit `{commit}`" if commit else " at the commit named by `code.commit` in lineage.json")
              + " and Python 3.11:", "", "```",
              *([f"git checkout {commit}"] if commit else []),
              "make setup        # .venv: torch 2.13.0 (CPU), then the pipeline and its pinned dependencies",
              ".venv/bin/omp recreate path/to/this/folder   # reruns the chain from lineage.json; compares every tensor",
              "```", "",
              "`lineage.json` holds the git commit, the resolved recipe, the data manifests and their lock "
              "hashes, the dvc.lock stage hashes, the indices sha256 and the sha256 and parent of every checkpoint.", ""]
    return "\n".join(lines)


def ladder_rungs(variant: str) -> list[tuple[dict, Path]]:
    """(rung record, folder) of every rung behind the released variant: pretraining's, then
    post-training's when the post-trained model is released."""
    out = []
    for stage in ("pretrain", "posttrain") if variant == "posttrain" else ("pretrain",):
        root = ART / stage / "ladder"
        out += [(r, root / ladder.rung_name(r["step"])) for r in ladder.read_rungs(root)]
    return out


def ladder_lineage(recipe: Recipe, rel: Path, rungs: list[tuple[dict, Path]]) -> dict:
    """lineage.json `ladder`: per rung its step, tokens seen, rows of the published order consumed,
    parent sha256 and the sha256 of each of its files as published (checkpoints/step-NNNNNNN/)."""
    summary = ART / "pretrain" / "ladder" / ladder.SUMMARY
    init = read_json(summary) if summary.is_file() else {}
    out = []
    for r, _src in rungs:
        path = f"checkpoints/{ladder.rung_name(r['step'])}"
        files = {p.name: sha256_file(p) for p in sorted((rel / path).iterdir()) if p.is_file()}
        out.append({k: r[k] for k in ("step", "stage", "stage_step", "tokens_seen", "rows_consumed",
                                      "sha256", "parent_sha256")} | {"path": path, "files": files})
    return {"init_sha256": init.get("init_sha256"), "seed": recipe.seed,
            "global_batch_size": recipe.blend.global_batch_size, "seq_len": recipe.blend.seq_len, "rungs": out}


CURVES = "learning_curves.png"


def ladder_lines(lin: dict, repo_id: str | None, curves: bool = False) -> list[str]:
    """The model card's ladder table, how to load a rung, and the learning curves."""
    rungs = lin.get("rungs") or []
    if not rungs:
        return []
    repo = repo_id or "ORG/NAME"
    first = rungs[len(rungs) // 2]["path"].split("/")[-1]
    lines = ["## Checkpoint ladder", "",
             f"{len(rungs)} checkpoints (rungs) of the run, each a complete model folder in `checkpoints/` and, "
             "on the hub, a branch of the same name. A rung's parent is the rung before it (the first rung's, the "
             f"initialization of seed {lin['seed']}); rows consumed = rows `0 : rows` of `data/indices.npy` "
             "(`omp batch --step 0 .. step-1`). `omp verify` checks every file and the parent chain; "
             "`omp recreate . --step N` retrains only up to step N and compares that rung bitwise.", "",
             "```python", "from transformers import AutoModelForCausalLM", "",
             f'model = AutoModelForCausalLM.from_pretrained("{repo}", revision="{first}")', "```", "",
             "| step | stage | tokens seen | rows consumed | sha256 (model.safetensors) | parent |",
             "|---:|---|---:|---:|---|---|"]
    for r in rungs:
        lines.append(f"| {r['step']} | {r['stage']} (step {r['stage_step']}) | {r['tokens_seen']:,} | "
                     f"{r['rows_consumed']:,} | `{r['sha256'][:16]}` | `{r['parent_sha256'][:16]}` |")
    if curves:
        lines += ["", "### Learning curves", "",
                  "Every rung scored with lm-eval on the perplexity tasks (bits per byte, lower is better) and a "
                  "multiple-choice task (accuracy), on the first `evaluate.ladder.limit` items, against tokens "
                  "seen (± standard error):", "", f"![learning curves]({CURVES})"]
    return lines + [""]


def verify_inputs(recipe: Recipe) -> None:
    """Every stage output the release copies or quotes, checked against its stage's record first."""
    for stage in ("blend", "pretrain", "posttrain", "quantize", "evaluate"):
        if (ART / stage).is_dir():
            verify_stage(ART / stage)


def run(recipe: Recipe, out_dir: Path = OUT) -> Path:
    cfg = recipe.release
    name = check_name(cfg.name or recipe.name, f"{recipe_path(recipe)}: release.name")
    top = _variant_dir(cfg.variant)
    verify_inputs(recipe)
    lineage = chain_lineage(recipe, ART)
    lineage["released_variant"] = cfg.variant
    for w in warnings_vs_base(versus_base(cfg.variant), cfg.variant) if cfg.variant != "pretrain" else []:
        status(f"release: warning: {w}")
    with atomic_dir(out_dir) as tmp:
        rel = tmp / name
        copy_model_dir(top, rel)
        if cfg.variant == "posttrain" and cfg.include_base:
            copy_model_dir(_variant_dir("pretrain"), rel / "base")
        qreport = ART / "quantize" / "report.json"
        if cfg.include_quantized and qreport.is_file():
            for v in read_json(qreport).get("variants", []):
                src = ART / "quantize" / check_relpath(v.get("path", v["name"]), f"{qreport}: variant path")
                if src.is_dir():
                    copy_model_dir(src, rel / "quantized" / check_name(v["name"], f"{qreport}: variant name"))
        gguf = sorted((ART / "quantize" / "gguf").glob("*.gguf"))
        if cfg.include_gguf and gguf:
            (rel / "gguf").mkdir()
            for g in gguf:
                shutil.copyfile(g, rel / "gguf" / g.name)
        (rel / "data").mkdir()
        for f in ("indices.npy", "blend.json"):
            shutil.copyfile(ART / "blend" / f, rel / "data" / f)
        # training was decontaminated against these eval files: recreating the tokens needs them
        for f, digest in lineage["data"]["decontamination"].get("files", {}).items():
            check_relpath(f, "tokenize.json: decontamination file")
            (rel / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(verify_file(f, digest, "artifacts/tokenize/tokenize.json"), rel / f)
        if cfg.include_ladder:
            rungs = ladder_rungs(cfg.variant)
            for _r, src in rungs:
                copy_model_dir(src, rel / "checkpoints" / src.name)
            lineage["ladder"] = ladder_lineage(recipe, rel, rungs)
            if rungs and (ART / "evaluate" / "ladder.png").is_file():
                shutil.copyfile(ART / "evaluate" / "ladder.png", rel / CURVES)
        (rel / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(recipe), sort_keys=False), encoding="utf-8")
        lineage["model_sha256"] = sha256_file(rel / "model.safetensors")
        (rel / "README.md").write_text(model_card(recipe, lineage, name, curves=(rel / CURVES).is_file()),
                                       encoding="utf-8")
        # every file of the release but lineage.json itself: `omp recreate` checks them all first
        # (checkpoints/ too: here it is the ladder, published files, not pretrain's resume checkpoints)
        lineage["files"] = {f: sha256_file(rel / f) for f in tree_files(rel, ("lineage.json",))}
        write_json(rel / "lineage.json", lineage)
        seal(tmp, provenance("release", recipe, {"model": lineage["model_sha256"],
                                                                          "indices": lineage["data"]["indices_sha256"]}))
    status(f"release written to {out_dir / name}")
    return out_dir / name
