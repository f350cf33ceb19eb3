"""Quantization benchmark: held-out perplexity and size of RTN vs GPTQ over bit widths and group sizes.

Run in a workdir where the data stages and posttrain (or a model dir given with --model) exist:

    python bench/quantize.py --recipe recipes/tiny.yaml [--model artifacts/posttrain/final]

Prints one table (a benchmark, not a test): weight bytes of the quantized Linear layers, the mean
relative layer output error on held-out inputs (what GPTQ minimizes), perplexity on the same held-out
windows the quantize stage uses, and its change against the float model.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from pipeline.core.config import load_recipe
from pipeline.quantize.gptq import HessianHook
from pipeline.quantize import (_load, apply_dequantized, heldout_windows, perplexity, quantizable,
                               quantize_model_gptq, quantize_model_rtn)


def linear_bytes(model, bits: int | None, group: int | None) -> int:
    """Bytes of the decoder Linear weights: packed codes plus one float32 scale per row or group."""
    total = 0
    for m in quantizable(model).values():
        out, cols = m.weight.shape
        if bits is None:
            total += out * cols * 4
        else:
            total += out * cols * bits // 8 + out * (cols // group if group else 1) * 4
    return total


def eval_hessians(model, windows) -> dict:
    """X^T X of every decoder Linear's inputs on the evaluation windows (float model)."""
    import torch

    hooks = {n: HessianHook(m) for n, m in quantizable(model).items()}
    with torch.no_grad():
        for i in range(0, len(windows), 8):
            model(input_ids=torch.from_numpy(windows[i:i + 8]))
    return {n: h.hessian() for n, h in hooks.items()}


def output_error(model, work, hessians) -> float:
    """Mean over Linear layers of ||X (W - Wq)^T||^2 / ||X W^T||^2 on the held-out inputs X:
    the layer-wise error GPTQ minimizes, measured on data it was not calibrated on."""
    ref, got, errs = quantizable(model), quantizable(work), []
    for n, h in hessians.items():
        w, d = ref[n].weight.detach().double(), (ref[n].weight - got[n].weight).detach().double()
        errs.append(float(((d @ h) * d).sum() / ((w @ h) * w).sum()))
    return sum(errs) / len(errs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="recipes/tiny.yaml")
    p.add_argument("--model", default="artifacts/posttrain/final")
    p.add_argument("--groups", default="32,128,channel", help="int4 group sizes; channel = one scale per row")
    args = p.parse_args()
    recipe = load_recipe(args.recipe)
    cfg = recipe.quantize
    model, _tok = _load(Path(args.model))
    eval_w, calib_w = heldout_windows(Path("artifacts/blend"), Path("artifacts/tokenize"),
                                      cfg.seq_len or recipe.blend.seq_len, cfg.eval_windows, cfg.calib_windows)
    base = perplexity(model, eval_w)
    hessians = eval_hessians(model, eval_w)
    rows = [("fp32", "-", "-", linear_bytes(model, None, None), 0.0, base, 0.0)]
    groups = [None if g == "channel" else int(g) for g in args.groups.split(",")]
    runs = [("rtn", 8, None), ("gptq", 8, None)] + [(m, 4, g) for g in groups for m in ("rtn", "gptq")]
    for method, bits, group in runs:
        work = copy.deepcopy(model)
        t0 = time.perf_counter()
        if method == "gptq":
            quantize_model_gptq(work, calib_w, bits, group, cfg.gptq_damp)
        else:
            apply_dequantized(work, quantize_model_rtn(work, bits, group))
        secs = time.perf_counter() - t0
        ppl = perplexity(work, eval_w)
        rows.append((f"int{bits}-{method}", group or "channel", f"{secs:.1f}", linear_bytes(model, bits, group),
                     output_error(model, work, hessians), ppl, 100 * (ppl - base) / base))
    print(f"\nheld-out: {len(eval_w)} windows x {eval_w.shape[1]} tokens; GPTQ calibration: {len(calib_w)} windows")
    print(f"{'variant':<12} {'group':>8} {'quant s':>8} {'linear KiB':>11} {'layer err':>10} {'ppl':>9} {'Δ ppl %':>8}")
    for name, group, secs, size, err, ppl, delta in rows:
        print(f"{name:<12} {str(group):>8} {secs:>8} {size / 1024:>11.1f} {err:>10.2e} {ppl:>9.3f} {delta:>+8.2f}")


if __name__ == "__main__":
    main()
