"""Training throughput: our trainer vs a bare reference loop, on the same batches, in one run.

The reference loop is the same transformers LlamaForCausalLM + torch AdamW over the same
published batches (pre-loaded as tensors), with no pipeline code: no strategy, byte counting,
stop/NaN agreement, schedule or progress bar. Both use the same torch thread count. Our number is
the trainer's own step-loop tokens/s (evaluations and checkpoint writes excluded, as in
metrics.json); `overhead` = 1 - ours / reference.

    python bench/throughput.py [--recipe recipes/tiny.yaml] [--steps 30] [--models tiny,20m]

Needs the data stages' artifacts (artifacts/blend, tokenize, tokenizer) in the working directory.
On a GPU it also prints MFU (6 x params x tokens/s over the GPU's peak bf16 FLOP/s).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_recipe
from pipeline.data import PublishedOrder
from pipeline.model import build_model, count_params, special_ids, vocab_size

SIZES = {
    "tiny": None,  # the recipe's own model
    "20m": {"layers": 6, "hidden_size": 512, "heads": 8, "kv_heads": 4, "intermediate_size": 1376},
    "125m": {"layers": 12, "hidden_size": 768, "heads": 12, "kv_heads": 12, "intermediate_size": 2048},
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def reference_loop(recipe, batches: list[torch.Tensor], device, autocast: bool) -> float:
    """tokens/s of a plain loop: forward, backward, clip, AdamW step."""
    cfg = recipe.pretrain
    tok_dir = Path("artifacts/tokenizer")
    model = build_model(cfg.model, vocab_size(tok_dir), batches[0].shape[1], special_ids(tok_dir),
                        seed=recipe.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    batches = [b.to(device) for b in batches]
    warm = 0  # the trainer's tokens/s counts every step too
    for i, x in enumerate(batches):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(b.numel() for b in batches[warm:]) / (time.perf_counter() - t0)


def ours(recipe, out: Path) -> dict:
    from pipeline.pretrain.trainer import train

    return train(recipe, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/tiny.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--models", default="tiny,20m")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for size in a.models.split(","):
        over = {"pretrain": {"steps": a.steps, "eval_every_steps": 10**6, "checkpoint_every_steps": 10**6,
                             "eval_tokens": 256, "log_every_steps": 10**6}}
        if SIZES[size]:
            over["pretrain"]["model"] = SIZES[size]
        recipe = load_recipe(a.recipe, overrides=over)
        order = PublishedOrder()
        batches = [torch.from_numpy(np.ascontiguousarray(order.batch(s))) for s in range(a.steps)]
        with tempfile.TemporaryDirectory() as tmp:
            m = ours(recipe, Path(tmp) / "pretrain")
        autocast = device.type == "cuda" and recipe.pretrain.precision != "fp32"
        ref = reference_loop(recipe, batches, device, autocast)
        n = count_params(build_model(recipe.pretrain.model, vocab_size(Path("artifacts/tokenizer")), order.seq_len))
        row = {"model": size, "params": n, "ours": m["tokens_per_s"], "reference": ref}
        if device.type == "cuda":
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
            row["mfu"] = 6 * n * m["tokens_per_s"] / peak if peak else None
        rows.append(row)
    print(f"\ndevice: {device} ({torch.get_num_threads()} threads), {a.steps} steps of "
          f"{order.batch_size}x{order.seq_len} tokens\n")
    print("| model | params | ours tokens/s | reference tokens/s | ours / reference | overhead |"
          + (" MFU |" if device.type == "cuda" else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else ""))
    for r in rows:
        ratio = r["ours"] / r["reference"]
        line = (f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['ours']:,.0f} | {r['reference']:,.0f} | "
                f"{ratio:.3f} | {100 * (1 - ratio):+.1f}% |")
        if device.type == "cuda":
            line += f" {r['mfu']:.1%} |" if r.get("mfu") else " n/a |"
        print(line)


if __name__ == "__main__":
    main()
