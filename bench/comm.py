"""Communication benchmark: bytes each worker sends vs held-out loss, ddp against DiLoCo and DeMo.

    python bench/comm.py [--workers 2] [--steps 384] [--seq-len 64]     (~14 runs; see the README for timings)

Every run trains the same small Llama (transformers' LlamaForCausalLM, same seed) on the same
published data order (artifacts/blend + artifacts/tokenize of the tiny recipe): global batch N of
every run is the published batch N, cut to the first `--seq-len` tokens, split over the workers.
So all runs see the same tokens; only the strategy differs. Workers are real processes on a gloo
group; all traffic goes through pipeline.comm.Comm, which counts the bytes each worker sends.

Tuning effort is the same on both sides: ddp gets a 3-point lr sweep (its best lr is the baseline
and the inner lr of every other run); DiLoCo gets a 3-point sweep of (outer lr, outer momentum) at
the headline setting (--tune-h, --tune-kind: the >= 1000x point), and the winner is used for every
other DiLoCo run. Horizons are divisors of the step count so every DiLoCo run ends on a sync (the
evaluated model is the agreed global one).

Why the outer optimizer is swept: with S = steps / H outer syncs, the paper's Nesterov 0.7 / 0.9
(Douillard et al. 2023, ~88k steps) is far from best. Measured here (384 steps, 2 workers, int4,
H=192, i.e. 2 syncs): 0.7/0.9 -> +14.4% held-out loss vs ddp, 1.0/0 (plain averaging) -> +5.9%,
1.3/0 -> +4.9%, 1.6/0 -> +7.3%.

Writes artifacts/bench/comm.json ({"runs": [...]}), comm.md (table) and comm.png (loss vs bytes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import DistributedCfg
from pipeline.data import PublishedOrder
from pipeline.io import atomic_write_text, write_json
from pipeline.lowcomm.loop import make_strategy, spawn, train_steps


def build_model(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def lm_loss(model, rows) -> torch.Tensor:
    ids = torch.as_tensor(rows)
    return model(input_ids=ids, labels=ids).loss


def heldout(order: PublishedOrder, seq_len: int, windows_per_source: int = 16) -> torch.Tensor:
    rows = []
    for name in order.names:
        val = np.asarray(order.val_tokens(name), dtype=np.int64)
        n = min(windows_per_source, len(val) // seq_len)
        rows += [val[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    return torch.as_tensor(np.stack(rows))


@torch.no_grad()
def eval_loss(model, rows: torch.Tensor) -> float:
    model.eval()
    losses = [float(lm_loss(model, rows[i:i + 8])) for i in range(0, len(rows), 8)]
    model.train()
    return float(np.mean(losses))


def cosine_factor(step: int, warmup: int, total: int, schedule: str = "cosine", floor: float = 0.1) -> float:
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * frac))


def train_one(comm, order: PublishedOrder, args, lr: float, dist: dict) -> dict:
    """One run on this worker; every worker evaluates (replicas agree), so all make the same choices."""
    vocab = int(max(t.max() for t in order.tokens)) + 1
    model = build_model(max(vocab, 4096))
    cfg = DistributedCfg.model_validate(dist)
    strategy = make_strategy(cfg, comm)
    opt = strategy.build_optimizer(list(model.parameters()),
                                   lambda p: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.95), weight_decay=0.1))
    strategy.setup(model)
    if cfg.mode == "diloco" and (args.steps - cfg.diloco.warmup_sync_steps) % cfg.diloco.inner_steps:
        raise ValueError(f"H={cfg.diloco.inner_steps} does not divide {args.steps} steps: the run would "
                         "not end on a sync")
    # the same schedule for every run (--schedule): constant, or warmup + cosine down to 10% of the peak
    warm = min(20, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, warm, args.steps, args.schedule))
    before, t0 = comm.bytes_sent, time.perf_counter()
    train_steps(model, strategy, opt, lambda s: order.batch(s)[:, :args.seq_len], lm_loss, 0, args.steps, clip=1.0,
                on_step=lambda _s, _l: sched.step())
    wall = time.perf_counter() - t0
    return {"bytes": comm.bytes_sent - before, "val": eval_loss(model, heldout(order, args.seq_len)),
            "wall_s": wall, "n_params": sum(p.numel() for p in model.parameters())}


def diloco(h: int, lr: float, mom: float, kind: str = "none", warmup: int = 0, block: int = 64) -> dict:
    return {"mode": "diloco", "diloco": {"inner_steps": h, "outer_lr": lr, "outer_momentum": mom,
                                         "warmup_sync_steps": warmup,
                                         "compression": {"kind": kind, "block_size": block}}}


def plan(comm, args) -> list[dict]:
    """The whole benchmark on one worker process (runs in sequence on the same gloo group)."""
    torch.set_num_threads(max(1, args.threads))
    order = PublishedOrder(args.blend, args.tokenize, verify=True)

    def run(label: str, lr: float, dist: dict) -> dict:
        r = train_one(comm, order, args, lr, dist)
        row = {"mode": dist["mode"], "label": label, "steps": args.steps, "n_params": r["n_params"],
               "bytes_per_worker": r["bytes"], "val_loss": r["val"], "wall_s": round(r["wall_s"], 1),
               "lr": lr, "settings": dist}
        if comm.rank == 0:
            print(f"{label:36s} bytes/worker {r['bytes']:>14,d}  val {r['val']:.4f}  {r['wall_s']:.0f}s", flush=True)
        return row

    runs = [run(f"ddp lr={lr}", lr, {"mode": "ddp"}) for lr in map(float, args.ddp_lrs.split(","))]
    base = min(runs, key=lambda r: r["val_loss"])
    lr = base["lr"]
    tuned = []
    for pair in args.outer.split(","):
        olr, mom = map(float, pair.split(":"))
        tuned.append(run(f"diloco H={args.tune_h} {args.tune_kind} outer {olr}/{mom}", lr,
                         diloco(args.tune_h, olr, mom, args.tune_kind)))
    best = min(tuned, key=lambda r: r["val_loss"])["settings"]["diloco"]
    olr, mom = best["outer_lr"], best["outer_momentum"]
    runs += tuned
    for spec in args.runs.split(","):
        h, kind = spec.split(":")
        runs.append(run(f"diloco H={h} {kind}", lr, diloco(int(h), olr, mom, kind)))
    runs.append(run("demo chunk 64 top-8 sign", lr, {"mode": "demo", "demo": {"chunk_size": 64, "topk": 8}}))

    # exactly one ddp row in the contract: the tuned baseline; the other sweep points are "ddp-sweep"
    for r in runs:
        if r["mode"] == "ddp" and r is not base:
            r["mode"] = "ddp-sweep"
        r["reduction_vs_ddp"] = round(base["bytes_per_worker"] / max(r["bytes_per_worker"], 1), 1)
        r["loss_gap_pct"] = round(100 * (r["val_loss"] - base["val_loss"]) / base["val_loss"], 2)
    return runs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--steps", type=int, default=384)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="constant",
                   help="lr schedule of every run; constant won for ddp at 384 steps here "
                        "(held-out 4.187 at lr 1e-3 vs 4.217 at the best cosine lr, 4e-3)")
    p.add_argument("--blend", default="artifacts/blend")
    p.add_argument("--tokenize", default="artifacts/tokenize")
    p.add_argument("--ddp-lrs", default="0.001,0.002,0.003")
    p.add_argument("--outer", default="0.7:0.9,1.0:0.0,1.3:0.0",
                   help="outer lr:momentum pairs swept at --tune-h / --tune-kind")
    p.add_argument("--tune-h", type=int, default=192)
    p.add_argument("--tune-kind", default="int4", help="compression of the tuned (headline) setting")
    p.add_argument("--runs", default="12:none,48:none,48:int8,48:int4,96:int4,48:sign,192:sign",
                   help="further DiLoCo runs H:compression (H must divide --steps)")
    p.add_argument("--out", default="artifacts/bench")
    args = p.parse_args()
    runs = spawn(plan, args.workers, args)[0]
    write_outputs(Path(args.out), runs, args)


def write_outputs(out: Path, runs: list[dict], args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comm.json", {"runs": runs, "workers": args.workers, "seq_len": args.seq_len,
                                   "steps": args.steps})
    lines = [f"{args.workers} workers, {args.steps} steps, seq {args.seq_len}, same published data order\n",
             "| run | bytes / worker | reduction vs ddp | held-out loss | gap % | wall s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['label']} | {r['bytes_per_worker']:,} | {r['reduction_vs_ddp']:,}x | "
                     f"{r['val_loss']:.4f} | {r['loss_gap_pct']:+.2f} | {r['wall_s']} |")
    base = next(r for r in runs if r["mode"] == "ddp")
    outer = [r for r in runs if "outer" in r["label"]]
    won = min(outer, key=lambda r: r["val_loss"])["settings"]["diloco"] if outer else None
    lines.append(f"\nWinning settings: ddp lr {base['lr']} (of {args.ddp_lrs}); DiLoCo outer lr/momentum "
                 f"{won['outer_lr']}/{won['outer_momentum'] if won else '-'} (of {args.outer}, swept at "
                 f"H={args.tune_h} {args.tune_kind}).")
    for floor in (1000, 3000):
        ok = [r for r in runs if r["reduction_vs_ddp"] >= floor]
        if ok:
            b = min(ok, key=lambda r: r["loss_gap_pct"])
            verdict = "meets" if b["loss_gap_pct"] <= 2.0 else "misses"
            lines.append(f"Best at >= {floor}x fewer bytes: {b['label']} ({b['reduction_vs_ddp']:,}x) at "
                         f"{b['loss_gap_pct']:+.2f}% held-out loss: {verdict} the <= 2% target.")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "comm.md", table)
    print(table)
    plot(out / "comm.png", runs)


def plot(path: Path, runs: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.scatter(r["bytes_per_worker"], r["val_loss"], marker="s" if r["mode"].startswith("ddp") else "o")
        ax.annotate(r["label"], (r["bytes_per_worker"], r["val_loss"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per worker (log)")
    ax.set_ylabel("held-out loss")
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


if __name__ == "__main__":
    main()
