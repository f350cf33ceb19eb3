"""Communication benchmark: bytes each worker sends vs held-out loss, ddp against DiLoCo and DeMo.

    python bench/comm.py [--workers 2] [--steps 384] [--seq-len 64]     (~14 runs; see the README for timings)

Every run trains the same small Llama (transformers' LlamaForCausalLM, same seed) on the same
published data order (artifacts/blend + artifacts/tokenize of the tiny recipe): global batch N of
every run is the published batch N, cut to the first `--seq-len` tokens, split over the workers.
So all runs see the same tokens; only the strategy differs. Workers are real processes on a gloo
group; all traffic goes through pipeline.core.comm.Comm, which counts the bytes each worker sends.

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

    python bench/comm.py --parity --preset tuned     (issue #27: the fair, tuned parity benchmark)

runs the long-horizon parity mode with the settings the README documents (32 rows x 64 tokens per
worker step over the tiny recipe's blend at twice its tokens, built by the blend stage's code under
artifacts/bench/blend-1310720; the ddp lr and DiLoCo's inner lr / outer optimizer as swept at seed 0,
evaluations at multiples of every H, 3 seeds, the diagnostics at seed 0) and writes
bench/results/comm_parity_tuned.{runs.jsonl,json,md,png}. ~43 min on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.config import DistributedCfg
from pipeline.core.order import PublishedOrder
from pipeline.core.io import atomic_write_text, write_json
from pipeline.lowcomm.diloco import _assign
from pipeline.lowcomm.loop import make_strategy, spawn, train_steps


def build_model(vocab: int, seed: int = 0, hidden: int = 96, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def long_batches(order: PublishedOrder, seq_len: int):
    """Batch s of a horizon longer than the published order: the published batches cut into
    windows of `seq_len` tokens, window 0 of every batch first, then window 1, ... (then again from
    the start: epochs). All runs read the same sequence, so only the strategy differs."""
    windows = order.seq_len // seq_len

    def batch_of(step: int):
        b, w = step % order.steps, (step // order.steps) % windows
        return order.batch(b)[:, w * seq_len:(w + 1) * seq_len]
    return batch_of, order.steps * windows


def row_batches(order: PublishedOrder, seq_len: int, rows: int):
    """Global batch s of `rows` rows of `seq_len` tokens: the window stream of long_batches (window 0
    of every published batch, then window 1, ...; each window a block of the published batch's rows),
    read `rows` rows at a time, so a batch may span two windows. Returns (batch_of, distinct batches
    before the stream repeats)."""
    windows, per = order.seq_len // seq_len, order.batch_size
    total = order.steps * windows * per

    def window(k: int) -> np.ndarray:
        b, w = k % order.steps, (k // order.steps) % windows
        return order.batch(b)[:, w * seq_len:(w + 1) * seq_len]

    def batch_of(step: int) -> np.ndarray:
        out, r, end = [], (step * rows) % total, (step * rows) % total + rows
        while r < end:
            k, i = divmod(r, per)
            take = min(per - i, end - r)
            out.append(window(k % (order.steps * windows))[i:i + take])
            r += take
        return np.concatenate(out)
    return batch_of, total // rows


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
    batch_of, _ = long_batches(order, args.seq_len)   # --steps may exceed the published order's steps
    train_steps(model, strategy, opt, batch_of, lm_loss, 0, args.steps, clip=1.0,
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


# options of a --parity-runs spec, appended with "+": numbers as key=value, switches bare
SPEC_NUMBERS = {"lr": float, "olr": float, "mom": float, "b": int, "F": int, "ef": float, "warm": int}
SPEC_SWITCHES = {"cmean", "nonest", "noef", "w1", "rows"}


def parse_run(spec: str, olr: float, mom: float) -> tuple[str, dict]:
    """"ddp", "single" or "H:kind[@fraction/chunk]", each optionally followed by "+option"s ->
    (label, settings). Options: lr=X (ddp lr / DiLoCo inner lr, default --lr), olr=X, mom=X (outer
    lr and momentum, default --outer-lr / --outer-momentum), nonest (heavy-ball, not Nesterov), b=N
    (quantization block), F=N (streaming fragments), warm=N (ddp warm-start steps, their bytes
    counted), ef=X (error-feedback decay), noef (no error feedback), cmean (top-k mean over the
    workers that sent each entry), w1 (diagnostic: DiLoCo of one worker, each worker alone on its
    shard). "single": one worker alone on its shard (plain AdamW, nothing sent).
    Settings are the DistributedCfg dict; options that are not part of it (lr, w1, single) go
    under settings["bench"]. A spec without options gives the settings it always gave (--resume)."""
    base, *opts = spec.split("+")
    nums, switches = {}, set()
    for o in opts:
        k, eq, v = o.partition("=")
        if eq and k in SPEC_NUMBERS:
            nums[k] = SPEC_NUMBERS[k](v)
        elif not eq and o in SPEC_SWITCHES:
            switches.add(o)
        else:
            raise ValueError(f"--parity-runs {spec!r}: unknown option {o!r} (numbers {sorted(SPEC_NUMBERS)}, "
                             f"switches {sorted(SPEC_SWITCHES)})")
    bench = {"lr": nums.pop("lr")} if "lr" in nums else {}
    if base in ("ddp", "single"):
        if nums or switches:
            raise ValueError(f"--parity-runs {spec!r}: {base} takes only lr=")
        d = {"mode": base}
        label = "ddp" if base == "ddp" else "one worker alone (AdamW, no comm)"
        if bench:
            label += f" lr {bench['lr']:g}"
        if base == "single":
            bench["single"] = True
        return label, ({**d, "bench": bench} if bench else d)
    h, rest = base.split(":")
    kind, _, topk = rest.partition("@")
    o_lr, o_mom = nums.pop("olr", olr), nums.pop("mom", mom)
    d = diloco(int(h), o_lr, o_mom, kind, nums.pop("warm", 0), nums.pop("b", 64))
    label = f"diloco H={h} {'fp32' if kind == 'none' else kind}"
    if topk:
        frac, chunk = topk.split("/")
        d["diloco"]["compression"].update(topk_fraction=float(frac), topk_chunk=int(chunk))
        label = f"sparseloco H={h} top{float(frac) * 100:g}% {kind}"
    c = d["diloco"]["compression"]
    if c["block_size"] != 64:
        label += f" block {c['block_size']}"
    if "F" in nums:
        d["diloco"]["fragments"] = nums.pop("F")
        label += f" F={d['diloco']['fragments']}"
    if "ef" in nums:
        c["error_feedback_decay"] = nums.pop("ef")
        label += f" ef-decay {c['error_feedback_decay']:g}"
    if "noef" in switches:
        c["error_feedback"] = False
        label += " no-EF"
    if "cmean" in switches:
        c["mean_over"] = "contributors"
        label += " mean/contrib"
    if "nonest" in switches:
        d["diloco"]["nesterov"] = False
    if d["diloco"]["warmup_sync_steps"]:
        label += f" warm {d['diloco']['warmup_sync_steps']}"
    if o_lr != olr or o_mom != mom or "nonest" in switches:
        label += f" outer {o_lr:g}/{o_mom:g}{' hb' if 'nonest' in switches else ''}"
    if "lr" in bench:
        label += f" inner lr {bench['lr']:g}"
    if "rows" in switches:
        if kind != "none" or topk:
            raise ValueError(f"--parity-runs {spec!r}: rows (the row-aware embedding mean) is fp32 only")
        bench["row_mean"] = True
        label += " embed rows / workers that saw them"
    if "w1" in switches:
        bench["one_worker"] = True
        label = f"1-worker {label}"
    return label, ({**d, "bench": bench} if bench else d)


def row_mean_diloco(comm, cfg, model):
    """Diagnostic for one suspected cause: an input-embedding row whose token only one worker saw
    during the phase moves on that worker alone, and the mean over workers halves its update. This
    DiLoCo (fp32 only) averages each input-embedding row over the workers whose rows held that token
    in the phase (counts all-reduced at each sync, their bytes counted), every other entry over all."""
    from pipeline.lowcomm.diloco import DiLoCoStrategy, _flat

    emb = model.get_input_embeddings().weight

    class RowMeanDiLoCo(DiLoCoStrategy):
        def setup(self, m):
            super().setup(m)
            self.seen = torch.zeros(emb.shape[0])
            i = next(k for k, p in enumerate(self.params) if p is emb)
            self.emb_at = next((f, sum(self.params[j].numel() for j in idx[:idx.index(i)]))
                               for f, idx in enumerate(self.groups) if i in idx)

        def shard(self, batch):
            rows = super().shard(batch)
            self.seen[torch.as_tensor(np.unique(rows))] = 1.0
            return rows

        def outer_sync(self, f):
            fr, idx = self.state["fragments"][f], self.groups[f]
            total = self.comm.all_reduce(fr["global"] - _flat(self.params, idx), tag="pseudo_grad")
            avg = total / self.comm.world_size
            if f == self.emb_at[0]:
                count = self.comm.all_reduce(self.seen.clone(), tag="rows_seen")
                off, (v, d) = self.emb_at[1], emb.shape
                rows = total[off:off + v * d].view(v, d)
                avg[off:off + v * d].view(v, d)[count > 0] = rows[count > 0] / count[count > 0, None]
                self.seen.zero_()
            self._outer_step(fr, avg)
            _assign(self.params, idx, fr["global"])
            self.state["syncs"] += 1
    return RowMeanDiLoCo(comm, cfg)


def parity_plan(comm, args) -> list[dict]:
    """Long-horizon parity: every run (ddp and each DiLoCo setting) for every seed, held-out loss of
    the agreed (global) model every --eval-every steps. Runs in sequence on one gloo group."""
    import torch.distributed as tdist

    from pipeline.lowcomm.diloco import DiLoCoStrategy
    from pipeline.lowcomm.strategy import Strategy

    torch.set_num_threads(max(1, args.threads))
    order = PublishedOrder(args.blend, args.tokenize, verify=True)   # built by main() for --blend-tokens
    if args.rows_per_worker:
        batch_of, distinct = row_batches(order, args.seq_len, args.rows_per_worker * comm.world_size)
    else:
        batch_of, distinct = long_batches(order, args.seq_len)
    rows = heldout(order, args.seq_len, args.eval_windows)
    vocab = max(int(max(t.max() for t in order.tokens)) + 1, 4096)
    specs = ["ddp", *args.parity_runs.split(",")] if args.with_ddp else args.parity_runs.split(",")
    # diagnostic "w1": every worker its own group of one (all ranks create every group, in order)
    solo = ([tdist.new_group([r]) for r in range(comm.world_size)]
            if any("+w1" in s for s in specs) and comm.world_size > 1 else None)
    out = []
    done = {(r["seed"], json.dumps(r["settings"], sort_keys=True)) for r in finished_runs(args)}
    diag_seeds = {int(x) for x in args.diagnostic_seeds.split(",")} if args.diagnostic_seeds else None
    for seed in map(int, args.seeds.split(",")):
        for spec in specs:
            label, settings = parse_run(spec, args.outer_lr, args.outer_momentum)
            if (seed, json.dumps(settings, sort_keys=True)) in done:   # --resume: finished earlier
                continue
            if diag_seeds is not None and is_diagnostic(settings) and seed not in diag_seeds:
                continue
            bench = settings.get("bench", {})
            dist = {k: v for k, v in settings.items() if k != "bench"}
            model = build_model(vocab, seed, args.hidden, args.layers)
            shadow = build_model(vocab, seed, args.hidden, args.layers)   # the global model, for evals
            lr = bench.get("lr", args.lr)
            if bench.get("single"):
                mode, strategy = "single", Strategy(comm)      # shards by the group: its own rows only
            else:
                cfg = DistributedCfg.model_validate(dist)
                mode = cfg.mode
                if bench.get("one_worker") and solo is not None:
                    strategy = DiLoCoStrategy(comm.scoped(solo[comm.rank], "solo"), cfg)
                    strategy.shard = Strategy(comm).shard      # still only this worker's rows
                elif bench.get("row_mean"):
                    strategy = row_mean_diloco(comm, cfg, model)
                else:
                    strategy = make_strategy(cfg, comm)
            if mode == "diloco":
                dc = cfg.diloco
                if (args.steps - dc.warmup_sync_steps) % dc.inner_steps:
                    raise ValueError(f"{spec}: H={dc.inner_steps} does not divide {args.steps} - "
                                     f"{dc.warmup_sync_steps} steps: the run would not end on a sync")
                if args.strict_eval and dc.fragments == 1 and args.eval_every % dc.inner_steps:
                    raise ValueError(f"{spec}: --eval-every {args.eval_every} is not a multiple of H="
                                     f"{dc.inner_steps} (evaluations would see a stale global model)")
            opt = strategy.build_optimizer(list(model.parameters()), lambda ps: torch.optim.AdamW(
                ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.1))
            strategy.setup(model)
            warm = min(100, args.steps // 20)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, warm, args.steps, "cosine"))
            curve, before, t0 = [], comm.bytes_sent, time.perf_counter()

            def on_step(step: int, _loss: float) -> None:
                sched.step()
                if (step + 1) % args.eval_every and step + 1 != args.steps:
                    return
                if mode == "diloco":
                    ps = list(shadow.parameters())
                    for f, idx in enumerate(strategy.groups):
                        _assign(ps, idx, strategy.state["fragments"][f]["global"])
                    m = shadow
                else:
                    m = model
                curve.append({"step": step + 1, "val": eval_loss(m, rows),
                              "bytes": comm.bytes_sent - before})
            train_steps(model, strategy, opt, batch_of, lm_loss, 0, args.steps, clip=1.0, on_step=on_step)
            row = {"label": label, "spec": spec, "seed": seed, "mode": mode, "steps": args.steps,
                   "n_params": sum(q.numel() for q in model.parameters()), "settings": settings,
                   "bytes_per_worker": comm.bytes_sent - before, "val_loss": curve[-1]["val"],
                   "curve": curve, "wall_s": round(time.perf_counter() - t0, 1),
                   # syncs (a streaming run counts each fragment's), ddp steps, or 0 (nothing sent)
                   "outer_steps": (strategy.state["syncs"] if mode == "diloco"
                                   else args.steps if mode == "ddp" else 0),
                   "distinct_batches": distinct, "lr": lr}
            if args.rows_per_worker:   # rows absent: the published batch split (older runs)
                row.update(rows_per_worker=args.rows_per_worker, seq_len=args.seq_len, hidden=args.hidden,
                           eval_windows=args.eval_windows)
            if args.blend_tokens:      # absent: the published tiny order as it is
                row["blend_tokens"] = args.blend_tokens
            if comm.rank == 0:
                print(f"seed {seed} {label:60s} bytes/worker {row['bytes_per_worker']:>14,d}  "
                      f"val {row['val_loss']:.4f}  {row['wall_s']:.0f}s", flush=True)
                # each finished run at once: a long benchmark cut short still reports (--report-only)
                Path(args.out).mkdir(parents=True, exist_ok=True)
                with open(runs_path(args), "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            out.append(row)
    return out


def larger_blend(args) -> str:
    """--blend-tokens N: the published order of the tiny recipe with `blend.tokens: N`, written by the
    blend stage's own code (same sources, shares and seed) under artifacts/bench/blend-N. An existing
    one is reused when the recipe-keys hash its blend.json records is this recipe's (PublishedOrder
    then checks its file hashes); returns its folder."""
    from pipeline import blend
    from pipeline.core.config import config_sha256, load_recipe
    from pipeline.core.io import read_json
    from pipeline.core.provenance import STAGE_KEYS

    out = Path("artifacts/bench") / f"blend-{args.blend_tokens}"
    recipe = load_recipe(args.blend_recipe, {"blend": {"tokens": args.blend_tokens}})
    if not (out / "blend.json").is_file():
        report = blend.run(recipe, Path(args.tokenize), out)
        print(blend.mixture_table(report), flush=True)
    want = config_sha256(recipe, STAGE_KEYS["blend"])
    if read_json(out / "blend.json").get("config_sha256") != want:
        raise SystemExit(f"{out / 'blend.json'}: config_sha256 is not that of {args.blend_recipe} with "
                         f"blend.tokens {args.blend_tokens}; remove the folder to rebuild it")
    return str(out)


def runs_path(args) -> Path:
    return Path(args.out) / f"{args.name}.runs.jsonl"


def finished_runs(args) -> list[dict]:
    """Runs already in <name>.runs.jsonl (--resume, --report-only), with this invocation's settings."""
    path = runs_path(args)
    if not path.exists():
        return []
    specs = ["ddp", *args.parity_runs.split(",")] if args.with_ddp else args.parity_runs.split(",")
    parsed = {s: parse_run(s, args.outer_lr, args.outer_momentum) for s in specs}
    settings = [d for _, d in parsed.values()]
    # a matched row takes this invocation's spec and label (the same settings may be spelt differently)
    names = {json.dumps(d, sort_keys=True): (s, label) for s, (label, d) in parsed.items()}
    # the lr a run uses (its +lr= or --lr) is part of what must match; older rows do not record it
    wanted = {json.dumps(d, sort_keys=True): d.get("bench", {}).get("lr", args.lr) for d in settings}
    same = (lambda r: r.get("rows_per_worker", 0) == args.rows_per_worker and
            r.get("blend_tokens", 0) == args.blend_tokens and
            (not args.rows_per_worker or (r["seq_len"], r["hidden"], r["eval_windows"]) ==
             (args.seq_len, args.hidden, args.eval_windows)))
    last = {}
    for r in map(json.loads, path.read_text().splitlines()):
        key = json.dumps(r["settings"], sort_keys=True)
        if key in wanted and r["steps"] == args.steps and same(r) and r.get("lr", wanted[key]) == wanted[key]:
            r["spec"], r["label"] = names[key]
            last[(r["seed"], key)] = r      # a run appended twice (copied rows): the last one counts
    return list(last.values())


def ddp_equivalent_step(base_curve: list[dict], val: float) -> float | None:
    """The step at which the ddp baseline's held-out curve first reaches `val` (linear between
    evaluations); None when ddp never gets that low, 0 when even its first evaluation is lower."""
    prev = None
    for c in base_curve:
        if c["val"] <= val:
            if prev is None:
                return 0.0
            f = (prev["val"] - val) / max(prev["val"] - c["val"], 1e-12)
            return prev["step"] + f * (c["step"] - prev["step"])
        prev = c
    return None


def is_diagnostic(settings: dict) -> bool:
    """One worker alone, 1-worker DiLoCo, the row-aware embedding mean, or DiLoCo at H=1."""
    b = settings.get("bench", {})
    return bool(b.get("single") or b.get("one_worker") or b.get("row_mean")) or (
        settings["mode"] == "diloco" and settings["diloco"]["inner_steps"] == 1)


def parity_outputs(out: Path, runs: list[dict], args) -> None:
    """<name>.json, <name>.md (mean and spread over seeds) and <name>.png (gap vs steps).

    Several ddp specs (an lr sweep): the baseline is the one with the lowest mean final held-out loss
    over the seeds; the others are listed as ddp-sweep rows. Gaps are per seed against the baseline's
    run of the same seed, at the same evaluation steps."""
    out.mkdir(parents=True, exist_ok=True)
    name = args.name
    ddp_specs = list(dict.fromkeys(r["spec"] for r in runs if r["mode"] == "ddp"))
    if not ddp_specs:
        raise SystemExit(f"{runs_path(args)}: no finished ddp run with these settings: nothing to compare with")
    seeds_of = {sp: {r["seed"] for r in runs if r["spec"] == sp} for sp in ddp_specs}
    base_spec = min(ddp_specs, key=lambda sp: (-len(seeds_of[sp]), np.mean(
        [r["val_loss"] for r in runs if r["spec"] == sp])))
    base = {r["seed"]: r for r in runs if r["spec"] == base_spec}
    runs = sorted((r for r in runs if r["seed"] in base),
                  key=lambda r: (r["mode"] != "ddp", r["spec"] != base_spec, r["seed"]))
    seeds = sorted(base)
    for r in runs:
        b = base[r["seed"]]
        r["reduction_vs_ddp"] = round(b["bytes_per_worker"] / max(r["bytes_per_worker"], 1), 1)
        bval = {c["step"]: c["val"] for c in b["curve"]}
        r["gap_curve_pct"] = [100 * (c["val"] - bval[c["step"]]) / bval[c["step"]] for c in r["curve"]
                              if c["step"] in bval]
        r["gap_steps"] = [c["step"] for c in r["curve"] if c["step"] in bval]
        r["ddp_equivalent_step"] = ddp_equivalent_step(b["curve"], r["val_loss"])
    write_json(out / f"{name}.json", {"runs": runs, "workers": args.workers, "seq_len": args.seq_len,
                                      "steps": args.steps, "seeds": seeds, "baseline": base_spec})
    specs = list(dict.fromkeys(r["spec"] for r in runs))
    n_params, r0 = runs[0]["n_params"], runs[0]
    rows = (f"{args.rows_per_worker} rows x {args.seq_len} tokens per worker step"
            if args.rows_per_worker else f"the published batch split, seq {args.seq_len}")
    lines = [f"{args.workers} workers, {args.steps} steps (cosine, warm-up), {rows}, "
             f"{n_params:,}-parameter Llama ({args.hidden} wide, {args.layers} layers), seeds {seeds}, "
             f"{r0['distinct_batches']:,} distinct batches"
             f"{f' of a {args.blend_tokens:,}-token order' if args.blend_tokens else ''}; ddp baseline lr {base[seeds[0]].get('lr', args.lr):g}; "
             f"DiLoCo outer {args.outer_lr}/{args.outer_momentum} and inner lr {args.lr:g} unless the row says\n",
             "| run | outer steps | bytes / worker | fewer bytes than ddp | held-out loss (mean ± sd) "
             "| gap % (mean, min..max) | gap % per seed | ddp reaches it at step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def summary(spec: str) -> dict:
        rs = [r for r in runs if r["spec"] == spec]
        g = np.array([r["gap_curve_pct"][-1] for r in rs])
        eq = [r["ddp_equivalent_step"] for r in rs]
        return {"rs": rs, "v": np.array([r["val_loss"] for r in rs]), "g": g,
                "eq": "—" if any(e is None for e in eq) else f"{np.mean(eq):,.0f}",
                "red": min(r["reduction_vs_ddp"] for r in rs)}

    def line(spec: str) -> str:
        m = summary(spec)
        rs, v, g = m["rs"], m["v"], m["g"]
        label = rs[0]["label"] + (" (baseline)" if spec == base_spec else " (sweep)" if rs[0]["mode"] == "ddp" else "")
        gap = "—" if spec == base_spec else f"{g.mean():+.2f} ({g.min():+.2f}..{g.max():+.2f})"
        per = "—" if spec == base_spec else " / ".join(f"{x:+.2f}" for x in g)
        bytes_ = f"{rs[0]['bytes_per_worker']:,}" if len({r['bytes_per_worker'] for r in rs}) == 1 else \
            f"{int(np.mean([r['bytes_per_worker'] for r in rs])):,} (mean)"
        red = f"{m['red']:,}x" if rs[0]["bytes_per_worker"] else "(sends nothing)"
        return (f"| {label} | {rs[0]['outer_steps']} | {bytes_} | {red} | "
                f"{v.mean():.4f} ± {v.std():.4f} | {gap} | {per} | {m['eq']} |")

    main_specs = [sp for sp in specs if not is_diagnostic(next(r for r in runs if r["spec"] == sp)["settings"])]
    diag_specs = [sp for sp in specs if sp not in main_specs]
    lines += [line(sp) for sp in main_specs]
    if diag_specs:
        lines += ["\nDiagnostics (same tokens per worker as every DiLoCo worker; bytes as counted):\n",
                  lines[1], lines[2]] + [line(sp) for sp in diag_specs]
    for floor in (1000, 3000):
        ok = [sp for sp in main_specs if sp not in ddp_specs and summary(sp)["red"] >= floor]
        if ok:
            best = min(ok, key=lambda sp: summary(sp)["g"].mean())
            m = summary(best)
            lines.append(f"\nBest at >= {floor:,}x fewer bytes: {m['rs'][0]['label']} ({m['red']:,}x) at "
                         f"{m['g'].mean():+.2f}% mean held-out loss gap "
                         f"(seeds {m['g'].min():+.2f}..{m['g'].max():+.2f})"
                         f": {'meets' if m['g'].mean() <= 2.0 else 'misses'} the <= 2% target.")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / f"{name}.md", table)
    print(table)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for spec in main_specs:
        if spec in ddp_specs:
            continue
        rs = [r for r in runs if r["spec"] == spec]
        steps = rs[0]["gap_steps"]
        g = np.array([r["gap_curve_pct"] for r in rs])
        line_, = ax.plot(steps, g.mean(0), label=f"{rs[0]['label']} ({summary(spec)['red']:,.0f}x)")
        ax.fill_between(steps, g.min(0), g.max(0), alpha=0.2, color=line_.get_color())
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(2, color="k", lw=0.8, ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss gap vs ddp (%)")
    ax.set_title(f"Parity curve: mean and min..max over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}", fontsize=11)
    ax.legend(fontsize=7)
    tmp = out / f".{name}.tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    tmp.replace(out / f"{name}.png")


# --preset NAME: the defaults of one documented benchmark (explicit flags still override them)
PRESETS = {
    "tuned": {
        "_doc": "the fair, tuned parity benchmark of the README (issue #27): 32 rows x 64 tokens per worker "
                "step, 1,000 steps over a 1,310,720-token published order (the tiny recipe's blend at twice "
                "its tokens, read 3.1 times), the ddp lr and DiLoCo's inner lr and outer optimizer swept "
                "beforehand at seed 0 (README), evaluations at multiples of every H, 3 seeds",
        "steps": 1000, "eval_every": 200, "seq_len": 64, "rows_per_worker": 32, "hidden": 64,
        "eval_windows": 64, "blend_tokens": 1310720, "lr": 0.004, "outer_lr": 1.25, "outer_momentum": 0.0,
        "with_ddp": False, "strict_eval": True, "diagnostic_seeds": "0", "name": "comm_parity_tuned",
        "out": "bench/results",
        "parity_runs": "ddp+lr=0.008,40:sign+b=256,100:sign+b=1024,40:none,single,1:none,1:none+lr=0.008+olr=1.0,"
                       "40:sign+b=256+w1",
    },
}


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
    g = p.add_argument_group("long-horizon parity curve (--parity)")
    g.add_argument("--parity", action="store_true",
                   help="run the parity benchmark instead: ddp and --parity-runs for each of --seeds, held-out "
                        "loss of the agreed model every --eval-every steps (comm_parity.{json,md,png})")
    g.add_argument("--parity-runs", default="40:none,160:int4,50:sign,16:int2@0.02/4096",
                   help="H:kind[@topk_fraction/topk_chunk]; the defaults are >= 1000x fewer bytes than ddp "
                        "except fp32 (the uncompressed reference)")
    g.add_argument("--seeds", default="0,1,2")
    g.add_argument("--eval-every", type=int, default=200)
    g.add_argument("--lr", type=float, default=2e-3, help="ddp lr and DiLoCo inner lr (peak of the cosine)")
    g.add_argument("--outer-lr", type=float, default=1.0)
    g.add_argument("--outer-momentum", type=float, default=0.0)
    g.add_argument("--hidden", type=int, default=96, help="model width (a smaller model makes long CPU runs cheap)")
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--resume", action="store_true",
                   help="keep comm_parity.runs.jsonl and skip the runs (seed, settings) it already holds")
    g.add_argument("--report-only", action="store_true",
                   help="write the parity table and curve from the runs finished so far (<name>.runs.jsonl)")
    g.add_argument("--name", default="comm_parity", help="file stem of the parity outputs under --out")
    g.add_argument("--rows-per-worker", type=int, default=0,
                   help="rows of --seq-len tokens per worker step (0: the published batch split over the "
                        "workers, as before); batches then run over the window stream --rows-per-worker at a time")
    g.add_argument("--eval-windows", type=int, default=16, help="held-out windows per source")
    g.add_argument("--blend-tokens", type=int, default=0,
                   help="train on a larger published order: the blend stage run on --blend-recipe with "
                        "blend.tokens N, written to artifacts/bench/blend-N (0: --blend as it is)")
    g.add_argument("--blend-recipe", default="recipes/tiny.yaml")
    g.add_argument("--no-ddp", dest="with_ddp", action="store_false",
                   help="do not add the plain 'ddp' run (when --parity-runs lists its own ddp+lr=... runs)")
    g.add_argument("--diagnostic-seeds", default="",
                   help="run the diagnostic specs (single, +w1, +rows, H=1) only for these seeds (default: all)")
    g.add_argument("--strict-eval", action="store_true",
                   help="refuse DiLoCo runs whose H does not divide --eval-every")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of the defaults above (explicit flags still win): " +
                        "; ".join(f"{k}: {v['_doc']}" for k, v in PRESETS.items()))
    pre, _ = p.parse_known_args()
    if pre.preset:
        p.set_defaults(**{k: v for k, v in PRESETS[pre.preset].items() if k != "_doc"})
    args = p.parse_args()
    if args.report_only:
        wanted = {int(x) for x in args.seeds.split(",")}
        parity_outputs(Path(args.out), [r for r in finished_runs(args) if r["seed"] in wanted], args)
        return
    if args.parity:
        if args.blend_tokens:
            args.blend = larger_blend(args)
        if not args.resume:
            runs_path(args).unlink(missing_ok=True)
        runs = finished_runs(args) if args.resume else []
        runs += spawn(parity_plan, args.workers, args)[0]
        parity_outputs(Path(args.out), runs, args)
        return
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
