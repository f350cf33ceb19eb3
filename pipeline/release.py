"""release: `artifacts/release/<name>/`, a repository ready for the Hugging Face Hub.

    config.json, model.safetensors, generation_config.json, tokenizer files   the chosen variant
    base/                      the pretrained model (when the top is the post-trained one)
    quantized/<variant>/       transformers-loadable quantized variants
    gguf/*.gguf                llama.cpp / ollama files
    data/indices.npy, data/blend.json    the published data order
    recipe.yaml                the resolved recipe (every parameter of the chain)
    lineage.json               the whole experiment chain (pipeline.lineage.chain_lineage)
    README.md                  the model card (YAML front matter with model-index)

The tokenizer and config files are written so that transformers 4.x reads them too
(`tokenizer_class: PreTrainedTokenizerFast`, inline chat template, `rope_theta`, `torch_dtype`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from pipeline.config import Recipe, recipe_dict, recipe_path
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, sha256_file, write_json
from pipeline.lineage import chain_lineage, provenance
from pipeline.verify import check_name, check_relpath, outputs_of, seal, verify_file, verify_stage

OUT = Path("artifacts/release")
ART = Path("artifacts")
SKIP = {"lineage.json", "provenance.json"}


def copy_model_dir(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in SKIP:
            shutil.copyfile(f, dst / f.name)
    make_compatible(dst)


def make_compatible(d: Path) -> None:
    """Fields transformers 4.x needs beside the ones transformers 5.x writes."""
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        cfg = read_json(tc)
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        if "chat_template" not in cfg and (d / "chat_template.jinja").is_file():
            cfg["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        write_json(tc, cfg)
    cj = d / "config.json"
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


def _eval_rows(variant: str) -> tuple[list[dict], str | None]:
    """(task, metric, value) rows of the released variant's lm-eval results, and the leaderboard text."""
    res_dir = ART / "evaluate" / "results"
    board = ART / "evaluate" / "leaderboard.md"
    rows = []
    f = res_dir / f"{variant}.json"
    if f.is_file():
        for task, metrics in sorted(read_json(f).get("results", {}).items()):
            for key, value in sorted(metrics.items()):
                if not isinstance(value, (int, float)) or "_stderr" in key or key == "alias":
                    continue
                rows.append({"task": task, "metric": key.split(",")[0], "value": float(value)})
    return rows, (board.read_text(encoding="utf-8") if board.is_file() else None)


def model_card(recipe: Recipe, lineage: dict, name: str) -> str:
    cfg = recipe.release
    blend = read_json(ART / "blend" / "blend.json")
    manifest = yaml.safe_load(Path(recipe.data.manifest).read_text())
    datasets = [s["repo_id"] for s in manifest["sources"] if s.get("kind") == "hf"]
    evals, board = _eval_rows(cfg.variant)
    front = {
        "license": cfg.license,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["open-model-pipeline", "llama", f"recipe-{recipe.name}",
                 f"pretrain-{recipe.pretrain.distributed.mode}", *cfg.tags],
    }
    if datasets:
        front["datasets"] = datasets
    # no `base_model`: the Hub takes a repo id there, and the base weights ship inside this repo (base/)
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
             f"[Open Model Pipeline](https://github.com/) from recipe `{recipe.name}`. The released weights are the "
             f"**{cfg.variant}** model; every artifact of the chain can be recreated from `lineage.json`.", "",
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
        for k in ("bytes_sent_per_worker", "tokens", "tokens_per_s", "val_loss_initial", "val_loss_final"):
            if pm.get(k) is not None:
                v = pm[k]
                lines.append(f"- {k}: {v:,.4g}" if isinstance(v, float) else f"- {k}: {v:,}")
    if post.is_file():
        m = read_json(post)
        lines.append(f"- post-training: arithmetic exact match {m.get('arith_em_before')} → {m.get('arith_em_after')}")
    lines += ["", "<details><summary>recipe (resolved)</summary>", "", "```yaml",
              yaml.safe_dump(recipe_dict(recipe), sort_keys=False).strip(), "```", "</details>", "",
              "## Evaluation", ""]
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
    lines += ["", "## How to recreate this model", "", "```",
              "pip install open-model-pipeline   # or: git clone <this pipeline> && make setup",
              f"git checkout {lineage['code'].get('commit') or '<commit in lineage.json>'}",
              "omp recreate ./   # reruns the chain from lineage.json; compares every tensor", "```", "",
              "`lineage.json` holds the git commit, the resolved recipe, the data manifests and their lock "
              "hashes, the dvc.lock stage hashes, the indices sha256 and the sha256 and parent of every checkpoint.", ""]
    return "\n".join(lines)


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
        (rel / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(recipe), sort_keys=False), encoding="utf-8")
        lineage["model_sha256"] = sha256_file(rel / "model.safetensors")
        (rel / "README.md").write_text(model_card(recipe, lineage, name), encoding="utf-8")
        # every file of the release but lineage.json itself: `omp recreate` checks them all first
        lineage["files"] = outputs_of(rel)
        lineage["files"].pop("lineage.json", None)
        write_json(rel / "lineage.json", lineage)
        seal(tmp, provenance("release", recipe, {"model": lineage["model_sha256"],
                                                                          "indices": lineage["data"]["indices_sha256"]}))
    print(f"release written to {out_dir / name}")
    return out_dir / name
