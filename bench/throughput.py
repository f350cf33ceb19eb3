"""Training throughput: our trainer vs a bare loop with the same settings, tokens/s and MFU, in one run.

The bare loop is the same transformers LlamaForCausalLM, the same AdamW (fused on CUDA, foreach on
CPU), the same clip, bf16 autocast and torch.compile setting, under the same determinism settings
(`set_determinism`), over the same published batches already on the device: no pipeline code (no
strategy, byte counting, stop agreement, schedule, sync points, progress bar). Both exclude the
same warm-up steps (1, or 3 with compile) from their steady-state tokens/s; ours is the trainer's
own `metrics.json` tokens_per_s (evaluations and checkpoint writes excluded).

MFU = 6 · N · tokens/s / peak FLOP/s, with N the non-embedding parameters (Kaplan et al. 2020,
"Scaling Laws for Neural Language Models", C ≈ 6N per token; attention's 6·L·s·d term is left
out, so MFU is slightly understated at long sequences). Peak: --peak-tflops, or the dense bf16
peak of a known GPU (H100/H200 SXM 989 TFLOP/s, A100 312).

    python bench/throughput.py --device cpu --models tiny --steps 40
    python bench/throughput.py --numerics portable,native,compatible --steps 40 --repeats 3

`--numerics` runs each CPU numerics profile (pipeline/core/numerics.py) in a process of its own (the pins
must be in the environment before torch loads), alternating them `--repeats` times, and prints their
tokens/s side by side: pretraining on the recipe (the trainer), an SFT-shaped training pass
(posttrain's batch x max_len_tokens rows, same model and AdamW) and a held-out eval pass (no_grad
forwards, evaluate's batch size), plus each profile's cost against native.
    python bench/throughput.py --device cuda --models 125m --compile --precision bf16 --steps 60

Needs the data stages' artifacts (artifacts/blend, tokenize, tokenizer) in the working directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "tiny": None,  # the recipe's own model
    "20m": {"layers": 6, "hidden_size": 512, "heads": 8, "kv_heads": 4, "intermediate_size": 1376},
    "125m": {"layers": 12, "hidden_size": 768, "heads": 12, "kv_heads": 12, "intermediate_size": 2048,
             "tie_embeddings": False},
    "350m": {"layers": 24, "hidden_size": 1024, "heads": 16, "kv_heads": 16, "intermediate_size": 2816,
             "tie_embeddings": False},
    "1b": {"layers": 22, "hidden_size": 2048, "heads": 32, "kv_heads": 4, "intermediate_size": 5632,
           "tie_embeddings": False},
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def non_embedding_params(model) -> int:
    """Parameters outside the token embedding and the output head (counted once if tied)."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in skip)


def bare_loop(recipe, batches: list, device, autocast: bool, compile_: bool, warm: int) -> float:
    """Steady-state tokens/s of a plain loop: forward, backward, clip, AdamW step, zero_grad."""
    import torch

    # torch-importing modules only here: main() sets CUDA_VISIBLE_DEVICES / the numerics pins first
    from pipeline.core.model import build_model, special_ids, vocab_size
    from pipeline.pretrain.engines import make_adamw

    cfg = recipe.pretrain
    tok_dir = Path("artifacts/tokenizer")
    model = build_model(cfg.model, vocab_size(tok_dir), batches[0].shape[1], special_ids(tok_dir),
                        seed=recipe.seed).to(device)
    opt = make_adamw(cfg, device)(model.parameters())
    fwd = torch.compile(model) if compile_ else model
    batches = [b.to(device) for b in batches]
    t0 = time.perf_counter()
    for i, x in enumerate(batches):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        micro = x.chunk(cfg.grad_accum_steps)
        for m in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = fwd(input_ids=m, labels=m).loss / len(micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(b.numel() for b in batches[warm:]) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="recipes/tiny.yaml")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--models", default="tiny", help=f"comma-separated: {', '.join(SIZES)}")
    ap.add_argument("--compile", action="store_true", help="torch.compile both loops")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: by GPU name)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="alternate ours/bare this many times; tokens/s: the best; ratio: the median of the pairs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's, or all cores)")
    ap.add_argument("--numerics", default=None, metavar="P,Q,...",
                    help="compare CPU numerics profiles (portable, compatible, native) side by side")
    ap.add_argument("--as-profile", default=None, help=argparse.SUPPRESS)   # one child of --numerics
    a = ap.parse_args(argv)
    if a.numerics:
        return compare_numerics(a, argv if argv is not None else sys.argv[1:])
    if a.as_profile:
        return profile_child(a)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""   # before anything initialises CUDA

    import numpy as np
    import torch

    # after CUDA_VISIBLE_DEVICES (and in profile_child the numerics pins): the modules below load torch
    from pipeline.core.config import load_recipe
    from pipeline.core.order import PublishedOrder
    from pipeline.core.model import build_model, count_params, vocab_size
    from pipeline.pretrain.trainer import cpu_cores, set_determinism, train, warmup_steps

    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    order = PublishedOrder()
    rows = []
    for size in a.models.split(","):
        over = {"pretrain": {"steps": a.steps, "eval_every_steps": 10**6, "checkpoint_every_steps": 10**6,
                             "eval_tokens": 256, "log_every_steps": 10**6, "compile": a.compile,
                             "precision": a.precision}}
        if SIZES[size]:
            over["pretrain"]["model"] = SIZES[size]
        if a.threads:
            over["pretrain"]["threads"] = a.threads
        recipe = load_recipe(a.recipe, overrides=over)
        cfg = recipe.pretrain
        threads = cfg.threads or cpu_cores()
        warm = warmup_steps(cfg)
        autocast = device.type == "cuda" and cfg.precision != "fp32" or cfg.precision == "bf16"
        batches = [torch.from_numpy(np.ascontiguousarray(order.batch(s))) for s in range(min(a.steps, order.steps))]
        ours, bare = [], []
        for _ in range(a.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                ours.append(train(recipe, Path(tmp) / "pretrain")["tokens_per_s"])
            set_determinism(threads, device)
            bare.append(bare_loop(recipe, batches, device, autocast, a.compile, warm))
        with torch.device("meta"):
            m = build_model(cfg.model, vocab_size(Path("artifacts/tokenizer")), order.seq_len)
        n_total, n = count_params(m), non_embedding_params(m)
        peak = a.peak_tflops
        if peak is None and device.type == "cuda":
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        pairs = sorted(o / b for o, b in zip(ours, bare))
        rows.append({"model": size, "params": n_total, "N": n, "ours": max(ours), "bare": max(bare), "peak": peak,
                     "ratio": pairs[len(pairs) // 2]})

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\ndevice: {where}; {a.steps} steps of {order.batch_size}x{order.seq_len} tokens; compile={a.compile}; "
          f"precision={a.precision}; deterministic; {a.repeats} alternating pair(s); first {warm} step(s) excluded")
    print("MFU = 6 * N * tokens/s / peak, N = non-embedding parameters\n")
    print("| model | params | N (non-emb.) | ours tokens/s | bare tokens/s | ours / bare | MFU ours | MFU bare |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        def mfu(tps):
            return f"{6 * r['N'] * tps / (r['peak'] * 1e12):.1%}" if r["peak"] else "n/a"
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['N'] / 1e6:.1f}M | {r['ours']:,.0f} | {r['bare']:,.0f} | "
              f"{r['ratio']:.3f} | {mfu(r['ours'])} | {mfu(r['bare'])} |")
    return 0


def compare_numerics(a, argv: list[str]) -> int:
    """Parent of --numerics: one child process per profile and repeat, alternating; best of each."""
    import json
    import subprocess

    from pipeline.core import numerics   # light (no torch); imported with the rest of this mode

    profiles = a.numerics.split(",")
    bad = [p for p in profiles if p not in numerics.PROFILES]
    if bad:
        print(f"error: --numerics: unknown profile(s) {bad} (choose from {', '.join(numerics.PROFILES)})", file=sys.stderr)
        return 2
    rest, skip = [], False
    for x in argv:   # the child gets the same options, less --numerics
        if skip:
            skip = False
            continue
        if x == "--numerics":
            skip = True
            continue
        if not x.startswith("--numerics="):
            rest.append(x)
    clean = {k: v for k, v in os.environ.items()
             if k not in (*numerics.ISA_VARS, *numerics.THREAD_VARS, numerics.PROFILE_VAR)}
    best: dict[str, dict] = {}
    for r in range(a.repeats):
        for prof in profiles:
            proc = subprocess.run([sys.executable, __file__, *rest, "--repeats", "1", "--as-profile", prof],
                                  env={**clean, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"repeat {r + 1}/{a.repeats} {prof}: " + ", ".join(f"{k} {v:,.0f}" for k, v in res["tps"].items()),
                  file=sys.stderr, flush=True)
            cur = best.setdefault(prof, {"tps": {}, "numerics": res["numerics"]})
            for k, v in res["tps"].items():
                cur["tps"][k] = max(cur["tps"].get(k, 0.0), v)
    m = numerics.machine()
    print(f"\nCPU: {m['cpu_model']} ({m['vendor']}; {', '.join(m['isa'])}); {a.steps} steps; best of {a.repeats} "
          "alternating run(s) per profile; tokens/s (cost against native)\n")
    kinds = [("pretrain", "pretrain (trainer)"), ("sft", "SFT-shaped training"), ("eval", "held-out eval")]
    print("| profile | ATen | MKL branch | threads | " + " | ".join(k[1] for k in kinds) + " |")
    print("|---|---|---|---:|" + "---:|" * len(kinds))
    base = best.get("native")
    for prof in profiles:
        b, n = best[prof], best[prof]["numerics"]
        cells = []
        for k, _ in kinds:
            v = b["tps"][k]
            cost = f" ({v / base['tps'][k] - 1:+.1%})" if base and prof != "native" else ""
            cells.append(f"{v:,.0f}{cost}")
        print(f"| {prof} | {n['torch_cpu_capability']} | {n['mkl_cnr']} | {n['threads']} | " + " | ".join(cells) + " |")
    return 0


def profile_child(a) -> int:
    """One profile in this process: pins first, then torch; prints one JSON line of tokens/s."""
    import json

    # pins first, then torch: nothing that loads torch may be imported before numerics.enter below
    from pipeline.core import numerics
    from pipeline.core.config import load_recipe

    probe = load_recipe(a.recipe)
    threads = a.threads or probe.platform.threads
    numerics.enter(a.as_profile, threads, "bench/throughput.py --numerics")
    import numpy as np
    import torch

    from pipeline.core.order import PublishedOrder   # after the pins (torch)
    from pipeline.pretrain.trainer import train, val_windows

    over = {"pretrain": {"steps": a.steps, "eval_every_steps": 10**6, "checkpoint_every_steps": 10**6,
                         "eval_tokens": 256, "log_every_steps": 10**6, "threads": threads},
            "platform": {"numerics": a.as_profile, "threads": threads}}
    recipe = load_recipe(a.recipe, overrides=over)
    torch.set_num_threads(threads)
    tps = {}
    with tempfile.TemporaryDirectory() as tmp:
        tps["pretrain"] = train(recipe, Path(tmp) / "pretrain")["tokens_per_s"]
    order = PublishedOrder()
    pt = recipe.posttrain
    flat = np.concatenate([order.batch(s).reshape(-1) for s in range(min(a.steps, order.steps))])
    per = pt.batch_size * pt.max_len_tokens
    sft = [torch.from_numpy(flat[i * per:(i + 1) * per].reshape(pt.batch_size, pt.max_len_tokens).astype(np.int64))
           for i in range(min(a.steps, len(flat) // per))]
    tps["sft"] = bare_loop(recipe, sft, torch.device("cpu"), False, False, 1)
    from pipeline.core.model import build_model, special_ids, vocab_size   # after the pins (torch)

    tok_dir = Path("artifacts/tokenizer")
    model = build_model(recipe.pretrain.model, vocab_size(tok_dir), order.seq_len, special_ids(tok_dir), seed=recipe.seed)
    model.eval()
    windows = torch.cat(list(val_windows(order, order.seq_len, 16 * order.seq_len * 4).values()))
    bs = recipe.evaluate.batch_size
    with torch.no_grad():
        model(input_ids=windows[:bs])
        t0 = time.perf_counter()
        for i in range(0, len(windows), bs):
            model(input_ids=windows[i:i + bs], labels=windows[i:i + bs])
        tps["eval"] = windows.numel() / (time.perf_counter() - t0)
    print(json.dumps({"tps": tps, "numerics": numerics.in_force()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
