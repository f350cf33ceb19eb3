"""quantize: weight-only int8 / int4 variants of the post-trained model, and GGUF files.

Input: `artifacts/posttrain/final/` and the held-out token files of the blend (calibration and
perplexity windows, disjoint). Output `artifacts/quantize/`:
  <variant>/            compressed-tensors pack-quantized directory (AutoModelForCausalLM loads it)
  gguf/model-<type>.gguf  F16 / Q8_0 / Q4_0 for llama.cpp and ollama
  report.json, report.md, provenance.json

Variants: int8-rtn (per output channel), int4-rtn-g<G> and int4-gptq-g<G> (groups of G input
columns; a layer whose width G does not divide gets the largest divisor of its width below G). Every variant's perplexity is measured by the same code on the same held-out windows;
GGUF files are read back, dequantized into the transformers model and measured the same way.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core import numerics
from pipeline.core.config import Recipe
from pipeline.core.device import autocast, resolve as resolve_device
from pipeline.core.errors import CheckpointError, DataIntegrityError
from pipeline.core.io import atomic_dir, atomic_write_text, sha256_file, write_json
from pipeline.core.order import PublishedOrder
from pipeline.core.paths import OUT as STAGE_OUT, final_dir
from pipeline.core.provenance import provenance
from pipeline.core.integrity import seal, verify_model_dir
from pipeline.quantize.compressed import save_quantized
from pipeline.quantize.gguf_export import export_gguf, load_into
from pipeline.quantize.gptq import HessianHook, quantize_gptq
from pipeline.quantize.rtn import dequantize, effective_group, quantize_rtn

MODEL_DIR = final_dir("posttrain")
BLEND_DIR = STAGE_OUT["blend"]
TOKENIZE_DIR = STAGE_OUT["tokenize"]
OUT = STAGE_OUT["quantize"]


# --------------------------------------------------------------------------- held-out windows


def heldout_windows(blend_dir: Path, tokenize_dir: Path, seq_len: int, n_eval: int, n_calib: int):
    """(eval, calib): int64 arrays (n, seq_len) of non-overlapping held-out windows.

    Windows are cut from every source's val tokens and interleaved source by source (so both sets
    cover the mixture); even positions go to evaluation, odd ones to calibration: never the same
    tokens in both.
    """
    order = PublishedOrder(blend_dir, tokenize_dir)
    per_source = []
    for name in order.names:
        val = np.asarray(order.val_tokens(name), dtype=np.int64)
        n = len(val) // seq_len
        per_source.append([val[i * seq_len:(i + 1) * seq_len] for i in range(n)])
    mixed = [w for group in _interleave(per_source) for w in group]
    eval_w, calib_w = mixed[0::2][:n_eval], mixed[1::2][:n_calib]
    if not eval_w or not calib_w:
        raise DataIntegrityError(f"{tokenize_dir}: held-out split has fewer than 2 windows of {seq_len} tokens")
    return np.stack(eval_w), np.stack(calib_w)


def _interleave(lists):
    for i in range(max(len(x) for x in lists)):
        yield [x[i] for x in lists if i < len(x)]


@torch.no_grad()
def perplexity(model, windows: np.ndarray, batch_size: int = 8, device: torch.device | None = None,
               precision: str = "fp32") -> float:
    """exp(mean next-token NLL) over every predicted token of the windows (on `device`, if given)."""
    model = model.to(device) if device is not None else model
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows[i:i + batch_size]).to(dev)
        with autocast(dev, precision):
            logits = model(input_ids=ids).logits[:, :-1]
        logits = logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


# --------------------------------------------------------------------------- methods


def quantizable(model) -> dict[str, torch.nn.Linear]:
    """The Linear layers of the decoder blocks (embeddings, norms and lm_head stay float)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def layer_group(m: torch.nn.Linear, group_size: int | None) -> int | None:
    return None if group_size is None else effective_group(m.in_features, group_size)


def quantize_model_rtn(model, bits: int, group_size: int | None) -> dict:
    return {n: quantize_rtn(m.weight, bits, layer_group(m, group_size)) for n, m in quantizable(model).items()}


@torch.no_grad()
def quantize_model_gptq(model, calib: np.ndarray, bits: int, group_size: int | None, damp: float,
                        device: torch.device | None = None) -> dict:
    """GPTQ block by block: the inputs of block L are computed with blocks < L already quantized,
    so each block corrects for the error of those before it. `model` is modified in place.
    The calibration forwards run on `device` (if given); the Hessians and the solve stay on the CPU
    in float64, so the quantized weights do not depend on where the forwards ran beyond their inputs."""
    home = next(model.parameters()).device
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    layers = quantizable(model)
    blocks = sorted({n.split(".layers.")[1].split(".")[0] for n in layers}, key=int)
    out = {}
    for b in tqdm(blocks, desc="gptq", mininterval=2):
        mods = {n: m for n, m in layers.items() if n.split(".layers.")[1].split(".")[0] == b}
        hooks = {n: HessianHook(m) for n, m in mods.items()}
        for i in range(0, len(calib), 8):
            model(input_ids=torch.from_numpy(calib[i:i + 8]).to(dev))
        for n, m in mods.items():
            # group_size None: one group spanning the row, i.e. one scale per output channel
            q, s = quantize_gptq(m.weight.cpu(), hooks[n].hessian(), bits,
                                 layer_group(m, group_size) or m.in_features, damp)
            m.weight.copy_(dequantize(q, s).to(dev))
            out[n] = (q, s)
    model.to(home)
    return out


def group_counts(quantized: dict) -> dict[str, int]:
    """How many layers use each group size ("channel": one scale per row)."""
    counts: dict[str, int] = {}
    for q, s in quantized.values():
        key = "channel" if s.shape[1] == 1 else str(q.shape[1] // s.shape[1])
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def apply_dequantized(model, quantized: dict) -> None:
    with torch.no_grad():
        layers = quantizable(model)
        for n, (q, s) in quantized.items():
            layers[n].weight.copy_(dequantize(q, s))


def variant_specs(cfg) -> list[tuple[str, str, int, int | None]]:
    """(variant name, method, bits, group size) for each method of the recipe."""
    g = cfg.group_size
    table = {"int8-rtn": ("int8-rtn", "rtn", 8, None),
             "int4-rtn": (f"int4-rtn-g{g}", "rtn", 4, g),
             "int4-gptq": (f"int4-gptq-g{g}", "gptq", 4, g)}
    return [table[m] for m in cfg.methods]


GGUF_NAMES = {"F16": "gguf-f16", "Q8_0": "gguf-int8-q8_0", "Q4_0": "gguf-int4-q4_0"}


# --------------------------------------------------------------------------- stage


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "model.safetensors").is_file():
        raise CheckpointError(f"{model_dir}: no model.safetensors; run the posttrain stage first")
    verify_model_dir(model_dir)  # as the posttrain stage recorded it
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    # local_files_only: a local folder, and transformers writes this flag into the tokenizer_config.json
    # it saves; left to the environment (HF_HUB_OFFLINE), two runs would differ in that byte
    return model.eval(), AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def _entry(name, fmt, path: Path, rel: str, ppl: float, base: float) -> dict:
    size = sum(p.stat().st_size for p in path.rglob("*.safetensors")) if path.is_dir() else path.stat().st_size
    return {"name": name, "format": fmt, "bytes": size, "ppl": ppl,
            "ppl_delta_pct": 100.0 * (ppl - base) / base, "path": rel}


def run(recipe: Recipe, model_dir: Path = MODEL_DIR, blend_dir: Path = BLEND_DIR,
        tokenize_dir: Path = TOKENIZE_DIR, out_dir: Path = OUT) -> dict:
    cfg = recipe.quantize
    torch.manual_seed(recipe.seed)
    numerics.enter_recipe(recipe, "quantize")   # checks the pins; the same threads in-process as under `omp`
    model, tok = _load(model_dir)
    eval_w, calib_w = heldout_windows(blend_dir, tokenize_dir, cfg.seq_len or recipe.blend.seq_len,
                                      cfg.eval_windows, cfg.calib_windows)
    dev = resolve_device(cfg.device, getattr(recipe, "_path", "<recipe>"), "quantize.device")

    def ppl(m) -> float:   # on the stage's device; the model comes back to the CPU for saving
        try:
            return perplexity(m, eval_w, device=dev, precision=cfg.precision)
        finally:
            m.to("cpu")

    base_ppl = ppl(model)
    report = {"baseline_ppl": base_ppl, "baseline_bytes": (model_dir / "model.safetensors").stat().st_size,
              "eval_windows": int(len(eval_w)), "calib_windows": int(len(calib_w)),
              "seq_len": int(eval_w.shape[1]), "source_model": str(model_dir),
              "source_sha256": sha256_file(model_dir / "model.safetensors"), "variants": []}
    with atomic_dir(out_dir) as tmp:
        for name, method, bits, group in tqdm(variant_specs(cfg), desc="quantize"):
            work = copy.deepcopy(model)
            if method == "gptq":
                q = quantize_model_gptq(work, calib_w, bits, group, cfg.gptq_damp, device=dev)
            else:
                q = quantize_model_rtn(work, bits, group)
                apply_dequantized(work, q)
            save_quantized(model, tok, q, bits, tmp / name)
            entry = _entry(name, "compressed-tensors-pack-quantized", tmp / name, name, ppl(work), base_ppl)
            entry["layers_by_group_size"] = group_counts(q)
            report["variants"].append(entry)
        (tmp / "gguf").mkdir()
        for file_type in cfg.gguf:
            path = tmp / "gguf" / f"model-{file_type.lower()}.gguf"
            export_gguf(model, model_dir, path, file_type, name=recipe.name)
            work = copy.deepcopy(model)
            load_into(work, path)
            report["variants"].append(_entry(GGUF_NAMES[file_type], f"gguf-{file_type}", path,
                                             f"gguf/{path.name}", ppl(work), base_ppl))
        write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", report_markdown(report))
        seal(tmp, provenance(
            "quantize", recipe, {"posttrain_model": report["source_sha256"],
                                 "blend": sha256_file(blend_dir / "blend.json")}))
    return report


def report_markdown(report: dict) -> str:
    lines = ["# Quantization report", "",
             f"Held-out perplexity over {report['eval_windows']} windows of {report['seq_len']} tokens "
             f"(GPTQ calibrated on {report['calib_windows']} other held-out windows).", "",
             "| variant | format | MiB | perplexity | Δ ppl % |", "|---|---|---:|---:|---:|",
             f"| baseline (fp32) | safetensors | {report['baseline_bytes'] / 2**20:.2f} | "
             f"{report['baseline_ppl']:.3f} | 0.00 |"]
    for v in report["variants"]:
        lines.append(f"| {v['name']} | {v['format']} | {v['bytes'] / 2**20:.2f} | {v['ppl']:.3f} | "
                     f"{v['ppl_delta_pct']:+.2f} |")
    return "\n".join(lines) + "\n"
